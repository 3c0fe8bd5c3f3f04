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

`neighbourhood_attend` gathers each query's keys and values with `index_select`, never an N x N map.
Its composite twin (`_gathered`) gathers all of them at once, `(B, h, N, K, d)` for N queries with
K = prod(kernel) keys, and autograd keeps both gathers for backward. In eager float32/float64 a custom
autograd function (`_ChunkedNeighbourhood`) runs instead, token-major (each key one row, so a
gather or scatter moves whole rows): a block of queries at a time (about
`_CHUNK_BYTES` of gathered keys, which stays in cache), it finishes the block's rows (logits, bias,
mask, softmax, dropout, output) and keeps only q, k, v and the `(B, h, N, K)` weights; backward
gathers each block's keys and values again and scatters their gradients with `index_add_`. Peak
memory is then O(N d + N K) instead of O(N K d), and the step is faster (cache-resident blocks).
Double backward differentiates the twin; `torch.func`, `torch.compile` and half precision run it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

from attnzoo.functional import fused_enabled
from attnzoo.kernels import token_rows as layout
from attnzoo.kernels.route import composite_required, own_nodes, without_autocast

__all__ = ["axis_window", "neighbourhood_index", "neighbourhood_attend"]

_CHUNK_BYTES = 1 << 20  # gathered keys (or values) per block of queries in `_ChunkedNeighbourhood`


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

    In eager float32/float64 a chunked kernel runs (`_ChunkedNeighbourhood`, see the module
    docstring); the composite ops (`_gathered`) run under `torch.func` transforms, `torch.compile`,
    `torch.export`, `torch.jit.trace`, for half precision and with `attnzoo.fused_attn(False)`.
    Both give the same values, weights and gradients; with dropout the kernel draws its mask as
    `torch.nn.functional.dropout` does on CPU, so one seed gives one mask on either path.

    Args:
        q: Queries `(B, h, N, d)`, already multiplied by the scale.
        k: Keys `(B, h, S, d)`.
        v: Values `(B, h, S, dv)`.
        keys: `(N, K)` key index (into S) of each query's K neighbours.
        bias: Additive logits bias broadcastable to `(B, h, N, K)`. Default: None.
        valid: `(N, K)` bool, False for keys outside a causal window. Default: None.
        dropout_p: Dropout on the weights. Default: 0.

    Returns:
        `(out, weights)`: `(B, h, N, dv)` and the softmax weights `(B, h, N, K)` (before dropout).
    """
    if _kernel_applies(q, k, v, bias, dropout_p):
        b, h, n = q.shape[:3]
        noise = None
        if dropout_p > 0:  # F.dropout's CPU rule: a Bernoulli(1 - p) draw over the weights, / (1 - p)
            noise = q.new_empty(b, h, n, keys.shape[1]).bernoulli_(1.0 - dropout_p).div_(1.0 - dropout_p)
        out, weights = _ChunkedNeighbourhood.apply(q, k, v, keys, bias, valid, noise)
        return out, weights
    return _gathered(q, k, v, keys, bias, valid, dropout_p=dropout_p)


def _kernel_applies(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, dropout_p: float) -> bool:
    return (
        fused_enabled()
        and q.dtype in (torch.float32, torch.float64)
        and all(t.dtype == q.dtype and t.dim() == 4 for t in (q, k, v))
        and (bias is None or (bias.dtype == q.dtype and bias.dim() <= 4))
        and dropout_p < 1.0
        and not composite_required()
    )


def _gathered(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    keys: Tensor,
    bias: Tensor | None,
    valid: Tensor | None,
    *,
    dropout_p: float = 0.0,
    noise: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The composite twin: every neighbourhood gathered at once (`(B, h, N, K, d)` keys and values).

    Dropout is `F.dropout(weights, dropout_p)`, or `weights * noise` with the kernel's mask (double
    backward recomputes with it).
    """
    n, kk = keys.shape
    flat = keys.reshape(-1)  # (N*K,)
    k_n = k.index_select(2, flat).unflatten(2, (n, kk))  # (B, h, N, K, d)
    v_n = v.index_select(2, flat).unflatten(2, (n, kk))  # (B, h, N, K, dv)
    # Batched products under a dispatch mode, which FlopCounterMode counts (as the kernel's `layout.scores`).
    counted = layout.counting()
    logits = (q.unsqueeze(-2) @ k_n.mT).squeeze(-2) if counted else (q.unsqueeze(-2) * k_n).sum(-1)
    low = logits.dtype in (torch.float16, torch.bfloat16)
    if low:
        logits = logits.float()
    if bias is not None:
        logits = logits + bias
    if valid is not None:  # every query keeps itself, so no row is all -inf
        logits = logits.masked_fill(~valid, float("-inf"))
    weights = logits.softmax(-1).to(q.dtype)  # (B, h, N, K)
    if noise is not None:
        dropped = weights * noise
    else:
        dropped = torch.nn.functional.dropout(weights, dropout_p) if dropout_p > 0 else weights
    out = (dropped.unsqueeze(-2) @ v_n).squeeze(-2) if counted else (dropped.unsqueeze(-1) * v_n).sum(-2)
    return out, weights


def _step(q: Tensor, v: Tensor, kk: int) -> int:
    """Queries per chunk: about `_CHUNK_BYTES` of gathered keys (or values) for the whole batch."""
    b, h, _, d = q.shape
    per_query = b * h * kk * max(d, v.shape[-1]) * q.element_size()
    return max(1, _CHUNK_BYTES // per_query)


class _ChunkedNeighbourhood(torch.autograd.Function):
    """`_gathered`, a block of queries at a time, keeping nothing `K` times the input for backward.

    The kernel works token-major: queries `(N, B h, d)`, keys `(S, B h d)`, weights `(N, B h, K)`.
    Gathering a block's K neighbours is then one `index_select` of whole rows along dim 0, and
    backward scatters their gradients with one `index_add_` of whole rows. (Along the token axis of
    the head-major `(B h, S, d)` layout both ops run per element and took 4-5x as long.) Each block,
    about `_CHUNK_BYTES` (it stays in cache), is finished at once: logits, bias, mask, softmax,
    dropout, output. Saved for backward: q, k, v as given (backward lays them out again), the
    weights and the dropout mask; backward gathers each block's values and keys again. A
    `create_graph=True` backward differentiates `_gathered` instead (`recompute_grads` style), so
    double backward works.
    The outputs are `(B, h, N, .)` tensors stored token-major, written through `(N, B h, .)` views.
    """

    @staticmethod
    @without_autocast
    def forward(  # type: ignore[override]
        ctx: FunctionCtx, q: Tensor, k: Tensor, v: Tensor, keys: Tensor, bias: Tensor | None,
        valid: Tensor | None, noise: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        (b, h, n, d), dv = q.shape, v.shape[-1]
        bh, kk = b * h, keys.shape[1]
        qt = layout.token_major(q)  # (N, B h, d)
        kt, vt = layout.token_rows(k), layout.token_rows(v)  # (S, B h d|dv)
        noise_t = None if noise is None else layout.token_major(noise)  # (N, B h, K)
        bias_t = None if bias is None else layout.as_4d(bias).permute(2, 0, 1, 3)  # (N or 1, B?, h?, K?)
        # The outputs are (B, h, N, .) tensors of their own (not views, so the caller may edit them
        # in place) laid out token-major in memory; the kernel writes them through `(N, B h, .)` views.
        weights_bhn, out_bhn = layout.token_major_empty(q, kk), layout.token_major_empty(q, dv)
        weights, out = layout.token_major_view(weights_bhn), layout.token_major_view(out_bhn)  # (N, B h, .)
        step = _step(q, v, kk)
        for n0 in range(0, n, step):
            n1 = min(n, n0 + step)
            nc, idx = n1 - n0, keys[n0:n1].reshape(-1)  # (nc*K,)
            k_n = kt.index_select(0, idx).view(nc, kk, bh, d)  # (nc, K, B h, d)
            logits = layout.scores(qt[n0:n1], k_n)  # (nc, B h, K)
            del k_n
            if bias_t is not None:
                logits.view(nc, b, h, kk).add_(bias_t if bias_t.shape[0] == 1 else bias_t[n0:n1])
            if valid is not None:
                logits.masked_fill_(~valid[n0:n1].unsqueeze(1), float("-inf"))
            w = weights[n0:n1]
            torch.softmax(logits, -1, out=w)
            dropped = w if noise_t is None else w * noise_t[n0:n1]
            v_n = vt.index_select(0, idx).view(nc, kk, bh, dv)  # (nc, K, B h, dv)
            layout.mix(dropped, v_n, out[n0:n1])  # (nc, B h, dv)
        ctx.save_for_backward(q, k, v, keys, bias, valid, noise, weights_bhn)  # type: ignore[arg-type]  # None saves as None
        ctx.set_materialize_grads(False)
        return out_bhn, weights_bhn

    @staticmethod
    @without_autocast
    def backward(  # type: ignore[override]
        ctx: FunctionCtx, grad_out: Tensor | None, grad_weights: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        q, k, v, keys, bias, valid, noise, weights_bhn = ctx.saved_tensors  # type: ignore[attr-defined]
        (b, h, n, d), s, dv = q.shape, k.shape[2], v.shape[-1]
        bh, kk = b * h, keys.shape[1]
        needs = ctx.needs_input_grad  # type: ignore[attr-defined]
        if torch.is_grad_enabled():  # create_graph=True: differentiate the composite ops instead
            return _double_backward(q, k, v, keys, bias, valid, noise, grad_out, grad_weights, needs)
        weights = layout.token_major_view(weights_bhn)  # (N, B h, K)
        qt = layout.token_major(q)  # (N, B h, d); rebuilt, so the originals stay saved for double backward
        kt, vt = layout.token_rows(k), layout.token_rows(v)  # (S, B h d|dv)
        g_t = q.new_zeros(n, bh, dv) if grad_out is None else layout.token_major(grad_out)  # (N, B h, dv)
        gw_t = None if grad_weights is None else layout.token_major(grad_weights)  # (N, B h, K)
        noise_t = None if noise is None else layout.token_major(noise)  # (N, B h, K)
        grad_q = q.new_empty(n, bh, d)
        grad_k, grad_v = q.new_zeros(s, bh * d), q.new_zeros(s, bh * dv)
        bias4 = None if bias is None or not needs[4] else layout.as_4d(bias)
        grad_bias = None if bias4 is None else torch.zeros_like(bias4)
        step = _step(q, v, kk)
        for n0 in range(0, n, step):
            n1 = min(n, n0 + step)
            nc, idx = n1 - n0, keys[n0:n1].reshape(-1)
            g, w = g_t[n0:n1], weights[n0:n1]  # (nc, B h, dv), (nc, B h, K)
            dropped = w if noise_t is None else w * noise_t[n0:n1]
            v_n = vt.index_select(0, idx).view(nc, kk, bh, dv)  # (nc, K, B h, dv)
            grad_w = layout.scores(g, v_n)  # (nc, B h, K)
            del v_n
            grad_v_n = q.new_empty(nc, kk, bh, dv)  # `out=` keeps the row layout index_add_ needs
            layout.outer(dropped, g, grad_v_n)
            grad_v.index_add_(0, idx, grad_v_n.view(nc * kk, bh * dv))  # scattered onto (S, B h dv)
            del grad_v_n
            if noise_t is not None:
                grad_w *= noise_t[n0:n1]
            if gw_t is not None:
                grad_w += gw_t[n0:n1]
            grad_logits = torch._softmax_backward_data(grad_w, w, -1, w.dtype)  # (nc, B h, K)
            k_n = kt.index_select(0, idx).view(nc, kk, bh, d)  # (nc, K, B h, d)
            layout.mix(grad_logits, k_n, grad_q[n0:n1])  # (nc, B h, d)
            del k_n
            grad_k_n = q.new_empty(nc, kk, bh, d)
            layout.outer(grad_logits, qt[n0:n1], grad_k_n)
            grad_k.index_add_(0, idx, grad_k_n.view(nc * kk, bh * d))  # scattered onto (S, B h d)
            del grad_k_n
            if grad_bias is not None:
                rows_shape = layout.rows(cast(Tensor, bias4), n0, n1).shape  # bias4 is set when grad_bias is
                grad_rows = layout.head_major(grad_logits, b, h)  # (B, h, nc, K)
                layout.rows(grad_bias, n0, n1).add_(layout.reduce_to(grad_rows, rows_shape))
        grad_bias = None if grad_bias is None else grad_bias.view(bias.shape)
        grad_k, grad_v = grad_k.view(s, bh, d), grad_v.view(s, bh, dv)  # (S, B h d) -> (S, B h, d)
        return (
            layout.head_major(grad_q, b, h), layout.head_major(grad_k, b, h), layout.head_major(grad_v, b, h),
            None, grad_bias, None, None,
        )


def _double_backward(
    q: Tensor, k: Tensor, v: Tensor, keys: Tensor, bias: Tensor | None, valid: Tensor | None,
    noise: Tensor | None, grad_out: Tensor | None, grad_weights: Tensor | None, needs: tuple[bool, ...],
) -> tuple[Tensor | None, ...]:
    """Gradients of `_gathered` as differentiable functions of the inputs and incoming gradients."""
    with torch.enable_grad():
        q, k, v = own_nodes((q, k, v))  # partial derivatives, also for attention(x, x, x)
        (bias,) = own_nodes((bias,))
        out, weights = _gathered(q, k, v, keys, bias, valid, noise=noise)
    inputs = [q, k, v, None, bias]
    wanted = [t for t, need in zip(inputs, needs, strict=False) if need and t is not None and t.requires_grad]
    pairs = [(o, g) for o, g in ((out, grad_out), (weights, grad_weights)) if g is not None]
    found = iter(torch.autograd.grad(
        [o for o, _ in pairs], wanted, [g for _, g in pairs], create_graph=True, allow_unused=True
    )) if wanted and pairs else iter(())
    grads: list[Tensor | None] = []
    for t, need in zip(inputs, needs, strict=False):
        want = need and t is not None and t.requires_grad and bool(pairs)
        grads.append(next(found) if want else None)
    return (*grads, None, None)
