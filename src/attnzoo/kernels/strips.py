"""Two strip gates on a map: ``out = x * g_h * g_w (+ x)`` with a lean backward.

Coordinate attention and its relatives (timm's ``CoordAttn``, ``SimpleCoordAttn``, ``EfficientLocalAttn``)
gate a map `(B, C, H, W)` by a column gate ``g_h`` `(B, C, H, 1)` and a row gate ``g_w`` `(B, C, 1, W)`.
Plain autograd over ``(x * g_h) * g_w`` keeps the full-size product ``x * g_h`` for the second
multiplication and builds two full-size products in backward (``g * x * g_w`` and ``g * (x g_h)``)
before reducing them. `_StripGateFn` saves only ``x`` and the two strips; its backward makes one
full-size product ``p = g * x`` and reduces it against each strip with a batched matrix-vector product
(``p @ g_w`` and ``g_h^T @ p``), then writes the input gradient in two passes.

Double backward (``create_graph=True``) recomputes the gradients from the plain ops
(`attnzoo.kernels.route.recompute_grads`); under functorch transforms, ``torch.compile`` and
``torch.jit.trace`` the plain ops run from the start. Other gate shapes, mixed dtypes (autocast) and
no-grad calls run the plain ops too.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from attnzoo.kernels.route import autocast_state, composite_required, recompute_grads, without_autocast

__all__ = ["strip_gate"]


def strip_gate(x: Tensor, gates: tuple[Tensor, ...], has_skip: bool = False) -> Tensor:
    """`x` times each gate in turn, plus `x` with `has_skip`.

    Args:
        x: The map `(B, C, H, W)`.
        gates: Factors broadcastable to `x`; the kernel runs for a `(B, C, H, 1)` and a `(B, C, 1, W)`
            strip (in either order), the plain ops otherwise.
        has_skip: Add `x` to the product.

    Returns:
        `(B, C, H, W)`.
    """
    strips = _strips(x, gates)
    wants_grad = torch.is_grad_enabled() and (x.requires_grad or any(g.requires_grad for g in gates))
    if strips is None or not wants_grad or composite_required():
        return _plain(x, gates, has_skip)
    return _StripGateFn.apply(x, *strips, has_skip)


def _plain(x: Tensor, gates: tuple[Tensor, ...], has_skip: bool) -> Tensor:
    """The composite twin: the factors one by one, as timm multiplies them."""
    out = x
    for gate in gates:
        out = out * gate
    return out + x if has_skip else out


def _strips(x: Tensor, gates: tuple[Tensor, ...]) -> tuple[Tensor, Tensor] | None:
    """`(g_h, g_w)` when `gates` are one `(B, C, H, 1)` and one `(B, C, 1, W)` strip of x's dtype."""
    if x.ndim != 4 or len(gates) != 2 or any(g.dtype != x.dtype or g.device != x.device for g in gates):
        return None
    b, c, h, w = x.shape
    column, row = (b, c, h, 1), (b, c, 1, w)
    first, second = (tuple(g.shape) for g in gates)
    if (first, second) == (column, row):
        return gates[0], gates[1]
    if (first, second) == (row, column):
        return gates[1], gates[0]
    return None


class _StripGateFn(torch.autograd.Function):
    """``x * g_h * g_w (+ x)``; saves x, g_h, g_w only."""

    @staticmethod
    @without_autocast
    def forward(ctx: Any, x: Tensor, g_h: Tensor, g_w: Tensor, has_skip: bool) -> Tensor:  # type: ignore[override]
        out = x * g_h
        out.mul_(g_w)  # in place: the product x * g_h is never kept
        if has_skip:
            out.add_(x)
        ctx.save_for_backward(x, g_h, g_w)
        ctx.has_skip, ctx.autocast = has_skip, autocast_state(x)
        return out

    @staticmethod
    @without_autocast
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, g_h, g_w = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph=True: differentiate the plain ops instead
            grads = recompute_grads(
                lambda t, a, b: _plain(t, (a, b), ctx.has_skip), [x, g_h, g_w], g, needs, ctx.autocast
            )
            return (*grads, None)
        b, c, h, w = x.shape
        grad_x = grad_h = grad_w = None
        if needs[1] or needs[2]:
            p = (g * x).reshape(b * c, h, w)  # (B, C, H, W) -> (B*C, H, W)
            if needs[1]:  # sum over W of p * g_w: (B*C, H, W) @ (B*C, W, 1)
                # g_w as a transposed (1, W) row: MKL's batched product is ~3x faster than on a
                # contiguous (W, 1) column
                column = g_w.reshape(b * c, 1, w).transpose(1, 2)  # (B*C, W, 1), strides (W, 1, W)
                grad_h = torch.bmm(p, column).view(b, c, h, 1)
            if needs[2]:  # sum over H of p * g_h: (B*C, 1, H) @ (B*C, H, W)
                grad_w = torch.bmm(g_h.reshape(b * c, 1, h), p).view(b, c, 1, w)
        if needs[0]:
            grad_x = g * g_h
            grad_x.mul_(g_w)
            if ctx.has_skip:
                grad_x.add_(g)
        return grad_x, grad_h, grad_w, None
