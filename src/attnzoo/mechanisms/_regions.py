"""Region helpers shared by the two Bi-Level Routing Attention modules (`biformer`, `biformer_nchw`).

A map `(N, H, W, C)` is cut into `n_h x n_w` regions of `rh x rw` tokens, row-major; each region
gathers the keys and values of its `topk` routed regions with one `index_select`, and multi-head
attention runs through `attnzoo.attend` (fused SDPA unless weights are asked for).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnzoo.functional import attend
from attnzoo.kernels.route import compile_fresh

__all__ = ["gather", "merge", "routed_attention", "side_conv", "to_image", "to_windows"]


def to_windows(x: Tensor, n_h: int, n_w: int) -> Tensor:
    """`(N, H, W, C)` -> `(N*n_h*n_w, (H/n_h)*(W/n_w), C)`; windows and tokens row-major."""
    n, h, w, c = x.shape
    x = x.view(n, n_h, h // n_h, n_w, w // n_w, c)  # (N, n_h, rh, n_w, rw, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(n * n_h * n_w, (h // n_h) * (w // n_w), c)


def to_image(x: Tensor, n: int, n_h: int, n_w: int, rh: int, rw: int) -> Tensor:
    """`(N*n_h*n_w, rh*rw, C)` -> the 6-D view `(N, n_h, rh, n_w, rw, C)` of the image (no copy)."""
    x = x.view(n, n_h, n_w, rh, rw, x.shape[-1])  # (N, n_h, n_w, rh, rw, C)
    return x.permute(0, 1, 3, 2, 4, 5)  # (N, n_h, rh, n_w, rw, C)


def side_conv(
    conv: nn.Conv2d | None, v: Tensor, n: int, n_h: int, n_w: int, rh: int, rw: int
) -> Tensor | None:
    """`conv` over the image of the window values `v` `(N*R, rh*rw, C)`: `(N, H, W, C)`."""
    if conv is None:
        return None
    image = to_image(v, n, n_h, n_w, rh, rw).reshape(n, n_h * rh, n_w * rw, -1)  # (N, H, W, C)
    image = compile_fresh(image.permute(0, 3, 1, 2))  # (N, C, H, W): a channels-last view in eager mode
    return conv(image).permute(0, 2, 3, 1)  # -> (N, H, W, C)


def merge(out: Tensor, side: Tensor | None, n: int, n_h: int, n_w: int, rh: int, rw: int) -> Tensor:
    """Window outputs `(N*R, rh*rw, C)` back to the `(N, H, W, C)` image, plus `side`."""
    image = to_image(out, n, n_h, n_w, rh, rw)  # (N, n_h, rh, n_w, rw, C)
    h, w, c = n_h * rh, n_w * rw, out.shape[-1]
    if side is None:
        return image.reshape(n, h, w, c)
    # `side` first: the sum takes its (contiguous) layout, so the reshape is a view.
    return (side.reshape(n, n_h, rh, n_w, rw, c) + image).reshape(n, h, w, c)


def gather(src: Tensor, r_idx: Tensor, r_weight: Tensor | None) -> Tensor:
    """The routed windows of every window: `(N*R, S, C)` -> `(N*R, topk*S, C)`."""
    n, regions, topk = r_idx.shape
    offset = torch.arange(n, device=r_idx.device).mul_(regions).view(n, 1, 1)
    sel = src.index_select(0, (r_idx + offset).reshape(-1))  # (N*R*topk, S, C): the only gathered copy
    if r_weight is not None:
        sel = sel * r_weight.reshape(-1, 1, 1).to(sel.dtype)
    return sel.view(n * regions, topk * src.shape[1], src.shape[2])


def routed_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    r_idx: Tensor,
    *,
    num_heads: int,
    scale: float,
    r_weight: Tensor | None = None,
    need_weights: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Token-to-token attention from each window to the keys/values of its routed windows.

    Args:
        q: Queries per window, `(N*R, L, c)` (any strides, last dim contiguous).
        k: Keys per window, `(N*R, S, c)`.
        v: Values per window, `(N*R, S, C)`.
        r_idx: Routed window indices, `(N, R, topk)`, int64.
        num_heads: Heads h; channels split as `(h, d)`.
        scale: Multiplies the logits.
        r_weight: `(N, R, topk)`; when given, the gathered keys **and** values are scaled by it
            (official soft routing). Default: None.
        need_weights: Also return the attention weights (math path). Default: False.

    Returns:
        `(out, weights)`: `out` `(N*R, L, C)`; `weights` `(N*R, h, L, topk*S)` or None.
    """
    qh = q.unflatten(-1, (num_heads, -1)).transpose(1, 2)  # (N*R, h, L, d)
    kh = gather(k, r_idx, r_weight).unflatten(-1, (num_heads, -1)).transpose(1, 2)  # (N*R, h, topk*S, d)
    vh = gather(v, r_idx, r_weight).unflatten(-1, (num_heads, -1)).transpose(1, 2)  # (N*R, h, topk*S, e)
    qh, kh, vh = compile_fresh(qh), compile_fresh(kh), compile_fresh(vh)  # saved by SDPA
    if need_weights:
        out, weights = attend(qh, kh, vh, scale=scale, need_weights=True)
    else:
        out, weights = attend(qh, kh, vh, scale=scale), None
    return out.transpose(1, 2).flatten(2), weights  # (N*R, L, C)
