"""Dropout on attention weights followed by the product with the values, without keeping the dropped map.

``F.dropout(w, p) @ v`` on CPU keeps two ``(..., L, S)`` tensors for backward besides the softmax's
own output ``w``: torch's CPU dropout draws a float noise tensor (Bernoulli, divided by ``1 - p``),
which autograd saves for the product ``w * noise``, and the matrix product saves the dropped map
for the values' gradient. `dropout_product` draws the same noise with the same generator calls (a
seeded run gives the same mask and the same numbers as ``F.dropout``) and saves ``w`` and the noise:
one map fewer where the softmax keeps ``w`` anyway (`attend`'s usual case; where it masks dead rows
or casts half-precision weights, ``w`` is a map of its own and the total is the same as torch's).
Backward rebuilds the dropped map for the values' gradient (one elementwise pass). A bool mask would
save more, but every product with a bool tensor casts it to float first, which cost more time than
the map's memory is worth.

Double backward (``create_graph=True``) differentiates the same formulas written with plain ops.
Under functorch transforms, ``torch.compile``/``torch.jit.trace`` and autocast, for ``p`` outside
``(0, 1)``, broadcast batch dims or 1-D inputs, and where ``w`` needs no gradient,
`dropout_product` is ``F.dropout(w, p) @ v``.

Shape letters: ``...`` batch dims (the same for both), L queries, S keys, e value dim.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from attnzoo._checks import autocast_on
from attnzoo.kernels.route import composite_required

__all__ = ["dropout_product"]


class _DropoutProduct(torch.autograd.Function):
    """``dropout(w, p) @ v`` for ``w`` `(..., L, S)` and ``v`` `(..., S, e)` with equal batch dims."""

    @staticmethod
    def forward(ctx: Any, w: Tensor, v: Tensor, p: float) -> Tensor:
        # torch's CPU dropout (`_dropout_impl`): noise = bernoulli(1 - p) / (1 - p), out = w * noise.
        # empty_like keeps w's strides, as torch's does: the draws fill memory order, so a transposed
        # w gets the mask torch's dropout gives it
        noise = torch.empty_like(w).bernoulli_(1 - p)
        noise.div_(1 - p)  # (..., L, S)
        out = torch.matmul(w * noise, v)  # (..., L, e); the dropped map is freed here
        ctx.save_for_backward(w, v, noise)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        w, v, noise = ctx.saved_tensors
        need_w, need_v = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():  # create_graph=True: the same formulas as differentiable ops
            grad_w = (grad_out @ v.transpose(-2, -1)) * noise if need_w else None
            grad_v = (w * noise).transpose(-2, -1) @ grad_out if need_v else None
            return grad_w, grad_v, None
        grad_w = grad_v = None
        if need_v:  # the dropped map again, bit for bit: one (L, S) pass instead of keeping it
            grad_v = torch.matmul((w * noise).transpose(-2, -1), grad_out)  # (..., S, e)
        if need_w:
            grad_w = torch.matmul(grad_out, v.transpose(-2, -1)).mul_(noise)  # (..., L, S)
        return grad_w, grad_v, None


def dropout_product(w: Tensor, v: Tensor, p: float) -> Tensor:
    """``F.dropout(w, p, training=True) @ v`` without the dropped map saved for backward (module docstring).

    Args:
        w: Attention weights `(..., L, S)`.
        v: Values `(..., S, e)`.
        p: Dropout probability.

    Returns:
        `(..., L, e)`, equal (same generator draws, same rounding) to ``F.dropout(w, p) @ v``.
    """
    # Only where w needs a gradient: with v's alone, autograd keeps just the dropped map (one map),
    # which is less than w and the noise
    fused = (
        0.0 < p < 1.0
        and w.device.type == "cpu"
        and w.dim() >= 2 and v.dim() >= 2
        and w.shape[:-2] == v.shape[:-2]
        and w.dtype == v.dtype
        and torch.is_grad_enabled()
        and w.requires_grad
        and not autocast_on(w.device.type)
        and not composite_required()
    )
    if not fused:
        return F.dropout(w, p=p) @ v
    return _DropoutProduct.apply(w, v, p)
