"""Index rules and gathered attention of 1-, 2- and 3-D neighbourhood attention (NAT / DiNAT).

The rules are NATTEN's (SHI-Labs/NATTEN), written here from its documented semantics, one axis at a
time. On an axis of length L with kernel k and dilation d, position i belongs to the dilation group
$g = i \\bmod d$, which holds the positions $g, g + d, g + 2d, \\dots$ ($L_g = \\lceil (L - g) / d \\rceil$ of
them); i is number $m = \\lfloor i / d \\rfloor$ in its group. The neighbourhood is taken inside the group:

- non-causal: the k group members from $s = \\min(\\max(m - \\lfloor k/2 \\rfloor, 0), L_g - k)$ on, so the
  window shifts inward at the borders and every query has exactly k keys (needs $L_g \\ge k$, which
  $L \\ge k d$ guarantees);
- causal: the members $\\max(m - k + 1, 0) \\dots m$, so the first queries of a group have fewer keys.

Key number j of the window sits at $(s + j)\\,d + g$, and its relative position bias is entry
$(s + j) - m + k - 1$ of a table of $2k - 1$ per axis. An N-D neighbourhood is the product of the
axes' windows, `kernel**N` keys in row-major order of the per-axis offsets.

`neighbourhood_attend` gathers each query's keys and values with one `index_select` each, so time and
memory are $O(N K d)$ for N queries with K = prod(kernel) keys, never N x N; composite ops only, so
autograd, double backward and `torch.func` work.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["axis_window", "neighbourhood_index", "neighbourhood_attend"]


def axis_window(
    length: int, kernel: int, dilation: int, causal: bool, device: torch.device | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Keys, bias entries and validity of every query's window along one axis.

    Returns:
        `(keys, rel, valid)`, each `(L, k)`: the key positions (clamped to a valid key where the
        causal window has fewer than k keys), the relative-position-bias entries in `[0, 2k - 1)`,
        and whether the key is part of the window (all True unless causal).
    """
    i = torch.arange(length, device=device)
    group, member = i % dilation, i // dilation  # (L,) each
    group_len = (length - group + dilation - 1) // dilation  # (L,) L_g
    j = torch.arange(kernel, device=device)
    if causal:
        start = (member - kernel + 1).clamp_min(0)
        pos = start[:, None] + j  # (L, k) group members
        valid = pos <= member[:, None]
        pos = torch.minimum(pos, member[:, None])
    else:
        start = torch.minimum((member - kernel // 2).clamp_min(0), group_len - kernel)
        pos = start[:, None] + j  # (L, k)
        valid = torch.ones(length, kernel, dtype=torch.bool, device=device)
    keys = pos * dilation + group[:, None]  # (L, k)
    rel = pos - member[:, None] + kernel - 1  # (L, k)
    return keys, rel, valid


def neighbourhood_index(
    sizes: Sequence[int],
    kernel: Sequence[int],
    dilation: Sequence[int],
    causal: Sequence[bool],
    device: torch.device | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Flat key indices, flat bias-table indices and validity of an N-D neighbourhood.

    Queries and keys are numbered row-major over `sizes`; the bias table is numbered row-major over
    `(2 k_1 - 1, ..., 2 k_N - 1)`.

    Returns:
        `(keys, rel, valid)`, each `(N, K)` with N = prod(sizes), K = prod(kernel); `valid` is None
        when no axis is causal (every key is valid).
    """
    dims = len(sizes)
    parts = []
    for axis, (size, k, d, c) in enumerate(zip(sizes, kernel, dilation, causal, strict=True)):
        # Broadcast shape: queries over (S_1..S_N), then keys over (k_1..k_N); this axis at `axis`.
        shape = [1] * (2 * dims)
        shape[axis], shape[dims + axis] = size, k
        parts.append(tuple(t.reshape(shape) for t in axis_window(size, k, d, c, device)))
    keys, rel, valid = parts[0]
    for (ax_keys, ax_rel, ax_valid), size, k in zip(parts[1:], sizes[1:], kernel[1:], strict=True):
        keys = keys * size + ax_keys
        rel = rel * (2 * k - 1) + ax_rel
        valid = valid & ax_valid
    full = (*sizes, *kernel)
    n, kk = math.prod(sizes), math.prod(kernel)
    keys = keys.expand(full).reshape(n, kk)  # (S_1..S_N, k_1..k_N) -> (N, K)
    rel = rel.expand(full).reshape(n, kk)  # (N, K)
    mask = valid.expand(full).reshape(n, kk) if any(causal) else None  # (N, K)
    return keys, rel, mask


def neighbourhood_attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    keys: Tensor,
    *,
    bias: Tensor | None = None,
    valid: Tensor | None = None,
    dropout_p: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Softmax attention of every query over its gathered neighbourhood (scale already in `q`).

    Args:
        q: Queries `(B, h, N, d)`, already multiplied by the scale.
        k: Keys `(B, h, N, d)`.
        v: Values `(B, h, N, d)`.
        keys: `(N, K)` key index of each query's K neighbours.
        bias: Additive logits bias broadcastable to `(B, h, N, K)`. Default: None.
        valid: `(N, K)` bool, False for keys outside a causal window. Default: None.
        dropout_p: Dropout on the weights. Default: 0.

    Returns:
        `(out, weights)`: `(B, h, N, d)` and the softmax weights `(B, h, N, K)` (before dropout).
    """
    n, kk = keys.shape
    flat = keys.reshape(-1)  # (N*K,)
    k_n = k.index_select(2, flat).unflatten(2, (n, kk))  # (B, h, N, K, d)
    v_n = v.index_select(2, flat).unflatten(2, (n, kk))  # (B, h, N, K, d)
    logits = (q.unsqueeze(-2) * k_n).sum(-1)  # (B, h, N, K)
    low = logits.dtype in (torch.float16, torch.bfloat16)
    if low:
        logits = logits.float()
    if bias is not None:
        logits = logits + bias
    if valid is not None:  # every query keeps itself, so no row is all -inf
        logits = logits.masked_fill(~valid, float("-inf"))
    weights = logits.softmax(-1).to(q.dtype)  # (B, h, N, K)
    dropped = torch.nn.functional.dropout(weights, dropout_p) if dropout_p > 0 else weights
    out = (dropped.unsqueeze(-1) * v_n).sum(-2)  # (B, h, N, d)
    return out, weights
