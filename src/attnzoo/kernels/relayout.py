"""A linear layer on a re-laid-out copy of its input, without keeping the copy for backward.

ViP's height and width branches permute the map's segments before their projections: autograd
keeps the permuted copy (as large as the input) for the weight gradient, although the input it
was made from is kept anyway. `relaid_linear` keeps the input instead and re-lays it out in
backward (one cheap copy, made when the forward's tensors are being freed), so the step's peak
holds one input-sized tensor fewer per branch.

Double backward (``create_graph=True``) recomputes the gradients from the plain ops
(`attnzoo.kernels.route.recompute_grads`); under functorch transforms, ``torch.compile`` and
``torch.jit.trace``, for a hooked or subclassed layer (`attnzoo.kernels.route.plain_module`), mixed
dtypes, autocast (which runs the layer in low precision) and no-grad calls, the layer is called on the
copy as usual.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import autocast_on
from attnzoo.kernels.route import (
    autocast_state,
    composite_required,
    plain_module,
    recompute_grads,
    without_autocast,
)

__all__ = ["relaid_linear"]

Relayout = Callable[[Tensor], Tensor]


def relaid_linear(x: Tensor, relayout: Relayout, restore: Relayout, linear: nn.Module) -> Tensor:
    """``linear(relayout(x))``, keeping `x` rather than the re-laid-out copy for backward.

    Args:
        x: The input, any shape.
        relayout: Maps `x` to the linear layer's input `(*, in_features)` (permutes and reshapes only).
            Kept for backward: let it close over shapes, not tensors (saved-tensor hooks see only
            the saved `x`).
        restore: Maps a tensor laid out as ``relayout(x)`` back to `x`'s shape and order (the inverse).
        linear: An ``nn.Linear``.

    Returns:
        `(*, out_features)`.
    """
    tensors = [x, *linear.parameters()]
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    same = all(t.dtype == x.dtype and t.device == x.device for t in tensors)
    plain = not (wants_grad and same and plain_module(linear, nn.Linear))
    if plain or autocast_on(x.device.type) or composite_required():  # autocast: the layer's own low precision
        return linear(relayout(x))
    return _RelaidLinearFn.apply(x, linear.weight, linear.bias, relayout, restore)


class _RelaidLinearFn(torch.autograd.Function):
    """``F.linear(relayout(x), weight, bias)``; saves x and the weight, re-lays x out in backward."""

    @staticmethod
    @without_autocast
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, relayout: Relayout, restore: Relayout
    ) -> Tensor:
        out = F.linear(relayout(x), weight, bias)  # the copy is freed here
        ctx.save_for_backward(x, weight, bias)
        ctx.relayout, ctx.restore, ctx.autocast = relayout, restore, autocast_state(x)
        return out

    @staticmethod
    @without_autocast
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight, bias = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph=True: differentiate the plain ops instead
            grads = recompute_grads(
                lambda t, w, b: F.linear(ctx.relayout(t), w, b), [x, weight, bias], g, needs, ctx.autocast
            )
            return (*grads, None, None)
        rows = g.reshape(-1, g.shape[-1])  # (M, out)
        grad_x = ctx.restore(torch.matmul(g, weight)) if needs[0] else None
        grad_w = rows.t() @ ctx.relayout(x).reshape(-1, weight.shape[1]) if needs[1] else None  # (out, in)
        grad_b = rows.sum(0) if bias is not None and needs[2] else None
        return grad_x, grad_w, grad_b, None, None
