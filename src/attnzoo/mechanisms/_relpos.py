"""Shared pieces of the timm token-mixing attentions (lambda, bottleneck, halo): argument checks,
timm's query/key head width, and the 2-D relative position logits of BoTNet and HaloNet.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from attnzoo._checks import check_float, check_int
from attnzoo.mechanisms._widths import check_width, make_divisible

__all__ = ["qk_head_width", "check_stride", "rel_logits_2d"]


def qk_head_width(
    out_channels: int, num_heads: int, head_dim: int | None, qk_ratio: float, who: str
) -> int:
    """timm's query/key head width: `head_dim`, else `make_divisible(out * qk_ratio, 8) // heads`."""
    if head_dim is not None:
        return check_int(head_dim, "head_dim", who)
    ratio = check_float(qk_ratio, "qk_ratio", who)
    if not (ratio > 0 and math.isfinite(ratio)):
        raise ValueError(f"{who}: qk_ratio must be a positive finite number, got {qk_ratio}")
    check_width(out_channels * ratio, "qk_ratio", qk_ratio, who)
    width = make_divisible(out_channels * ratio, 8) // num_heads
    if width < 1:
        raise ValueError(
            f"{who}: qk_ratio={qk_ratio} with num_heads={num_heads} gives a query/key head width of 0; "
            "pass head_dim"
        )
    return width


def check_stride(stride: object, who: str) -> int:
    """`stride` must be 1 or 2 (timm pools by 2 for stride 2; other strides it ignores or refuses)."""
    value = check_int(stride, "stride", who)
    if value not in (1, 2):
        raise ValueError(f"{who}: stride must be 1 or 2, got {value}")
    return value


def _offsets(queries: int, keys: int, table: int, device: torch.device) -> Tensor:
    """`index[i, j] = j - i + (table + 1) // 2 - 1`: the table row of key j seen from query i."""
    return torch.arange(keys, device=device)[None, :] - torch.arange(queries, device=device)[:, None] + (
        (table + 1) // 2 - 1
    )


def rel_logits_2d(q: Tensor, height_rel: Tensor, width_rel: Tensor, keys: tuple[int, int]) -> Tensor:
    """Relative position logits $q \\cdot r^h_{k_y - q_y} + q \\cdot r^w_{k_x - q_x}$ (Bello et al. 2019,
    BoTNet, HaloNet), with the offset counted from the table's centre row as timm's `rel_logits_1d`.

    Args:
        q: Queries `(..., Qh, Qw, d)` on their grid.
        height_rel: Table `(Th, d)` over vertical offsets.
        width_rel: Table `(Tw, d)` over horizontal offsets.
        keys: Key grid `(Kh, Kw)`.

    Returns:
        Logits `(..., Qh * Qw, Kh * Kw)`.
    """
    qh, qw = q.shape[-3], q.shape[-2]
    kh, kw = keys
    rows = height_rel[_offsets(qh, kh, height_rel.shape[0], q.device)]  # (Qh, Kh, d)
    cols = width_rel[_offsets(qw, kw, width_rel.shape[0], q.device)]  # (Qw, Kw, d)
    logits_h = torch.einsum("...yxd,ykd->...yxk", q, rows)  # (..., Qh, Qw, Kh)
    logits_w = torch.einsum("...yxd,xld->...yxl", q, cols)  # (..., Qh, Qw, Kw)
    both = logits_h[..., :, None] + logits_w[..., None, :]  # (..., Qh, Qw, Kh, Kw)
    return both.reshape(*q.shape[:-3], qh * qw, kh * kw)  # (..., Qh*Qw, Kh*Kw)
