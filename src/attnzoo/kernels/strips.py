"""Strip gates on a map, and the strip means that feed them, with lean backwards.

`strip_gate`: two strip gates, ``out = x * g_h * g_w (+ x)``.

Coordinate attention and its relatives (timm's ``CoordAttn``, ``SimpleCoordAttn``, ``EfficientLocalAttn``)
gate a map `(B, C, H, W)` by a column gate ``g_h`` `(B, C, H, 1)` and a row gate ``g_w`` `(B, C, 1, W)`.
Plain autograd over ``(x * g_h) * g_w`` keeps the full-size product ``x * g_h`` for the second
multiplication and builds two full-size products in backward (``g * x * g_w`` and ``g * (x g_h)``)
before reducing them. `_StripGateFn` saves only ``x`` and the two strips; its backward makes one
full-size product ``p = g * x`` and reduces it against each strip with a batched matrix-vector product
(``p @ g_w`` and ``g_h^T @ p``), then writes the input gradient in two passes.

`sum_gate`: one sigmoid gate of the sum of two strip logits, ``out = x * sigmoid(a_h + a_w) (+ x)``
(timm's ``SimpleCoordAttn`` and ``StripAttn``). Plain autograd keeps the gate and makes three
full-size tensors in backward (``g * x``, ``g * s``, the sigmoid's backward); `_SumGateFn` makes
the input gradient ``u = g * s`` and the logits' gradient in one buffer, ``t = u * x - (u * x) * s``.

`strip_means`: the row and column means ``(B, C, H, 1)`` and ``(B, C, 1, W)`` that all these gates
pool. Each ``mean`` materialises its own full-size gradient (``expand / n``) which autograd then adds
to the input gradient; `_StripMeansFn` writes the two broadcasts' sum in one pass instead.

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

__all__ = ["strip_gate", "strip_means", "sum_gate"]


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


def strip_means(x: Tensor) -> tuple[Tensor, Tensor]:
    """The mean over W and the mean over H of a map.

    Args:
        x: The map `(B, C, H, W)`.

    Returns:
        `(B, C, H, 1)` and `(B, C, 1, W)`.
    """
    if not (torch.is_grad_enabled() and x.requires_grad) or composite_required():
        return x.mean(3, keepdim=True), x.mean(2, keepdim=True)
    return _StripMeansFn.apply(x)


class _StripMeansFn(torch.autograd.Function):
    """``(x.mean(3), x.mean(2))``; the input gradient is written once, as one broadcast sum."""

    @staticmethod
    @without_autocast
    def forward(ctx: Any, x: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        ctx.size = x.shape
        ctx.set_materialize_grads(False)
        return x.mean(3, keepdim=True), x.mean(2, keepdim=True)

    @staticmethod
    @without_autocast
    def backward(ctx: Any, g_h: Tensor | None, g_w: Tensor | None) -> Tensor | None:  # type: ignore[override]
        # a linear map: with create_graph=True these same ops are differentiable as they stand
        h, w = ctx.size[2], ctx.size[3]
        if g_h is None and g_w is None:
            return None
        if g_h is None or g_w is None:  # one of the means unused
            part = g_h / w if g_h is not None else g_w / h  # type: ignore[operator]
            return part.expand(ctx.size)
        return torch.add(g_h / w, g_w / h)  # (B, C, H, 1) + (B, C, 1, W): one full-size write


def sum_gate(x: Tensor, a_h: Tensor, a_w: Tensor, has_skip: bool = False) -> Tensor:
    """``x * sigmoid(a_h + a_w)``, plus `x` with `has_skip`.

    Args:
        x: The map `(B, C, H, W)`.
        a_h: Column logits `(B, C, H, 1)`.
        a_w: Row logits `(B, C, 1, W)`.
        has_skip: Add `x` to the product.

    Returns:
        `(B, C, H, W)`.
    """
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, a_h, a_w))
    fits = (
        x.ndim == 4 and a_h.shape == (*x.shape[:3], 1) and a_w.shape == (*x.shape[:2], 1, x.shape[3])
        and a_h.dtype == a_w.dtype == x.dtype and a_h.device == a_w.device == x.device
    )
    if not fits or not wants_grad or composite_required():
        return _plain_sum_gate(x, a_h, a_w, has_skip)
    return _SumGateFn.apply(x, a_h, a_w, has_skip)


def _plain_sum_gate(x: Tensor, a_h: Tensor, a_w: Tensor, has_skip: bool) -> Tensor:
    """The composite twin, as timm writes it."""
    out = x * torch.sigmoid(a_h + a_w)
    return out + x if has_skip else out


class _SumGateFn(torch.autograd.Function):
    """``x * sigmoid(a_h + a_w) (+ x)``; saves x and the gate."""

    @staticmethod
    @without_autocast
    def forward(ctx: Any, x: Tensor, a_h: Tensor, a_w: Tensor, has_skip: bool) -> Tensor:  # type: ignore[override]
        gate = torch.add(a_h, a_w).sigmoid_()  # (B, C, H, W), made once
        out = x * gate
        if has_skip:
            out.add_(x)
        ctx.save_for_backward(x, a_h, a_w, gate)
        ctx.has_skip, ctx.autocast = has_skip, autocast_state(x)
        return out

    @staticmethod
    @without_autocast
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, a_h, a_w, gate = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph=True: differentiate the plain ops instead
            grads = recompute_grads(
                lambda t, p, q: _plain_sum_gate(t, p, q, ctx.has_skip), [x, a_h, a_w], g, needs, ctx.autocast
            )
            return (*grads, None)
        u = g * gate  # the input gradient of the product, g * s
        grad_h = grad_w = None
        if needs[1] or needs[2]:
            t = u * x  # g s x; the logits' gradient is g x s (1 - s) = t - t s, written over t
            t.addcmul_(t, gate, value=-1)
            grad_h = t.sum(3, keepdim=True) if needs[1] else None
            grad_w = t.sum(2, keepdim=True) if needs[2] else None
        grad_x = None
        if needs[0]:
            grad_x = u.add_(g) if ctx.has_skip else u
        return grad_x, grad_h, grad_w, None
