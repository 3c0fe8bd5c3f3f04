"""A weighted sum of same-shape branches, ``out = sum_i w_i * x_i``, with a lean backward.

ViP's reweighting (and any mixture of branches by per-sample, per-channel weights) multiplies each
branch by a weight that broadcasts over the spatial axes, then sums. Plain autograd over
``x_0 * w_0 + x_1 * w_1 + ...`` writes one full-size product per branch in forward, and in
backward one full-size product ``g * x_i`` per weight before reducing it to the weight's shape.
`_AddcmulFn` adds each branch's product into one buffer (``addcmul_``), saves the branch and its
weight only, and reduces ``g * x_i`` a few samples at a time (`attnzoo.kernels.route.sample_blocks`),
so its temporaries stay small and in cache. One node per branch (not one for the sum) keeps
backward's peak low: autograd frees each branch's saved tensors once that node has run.

Double backward (``create_graph=True``) recomputes the gradients from the plain ops
(`attnzoo.kernels.route.recompute_grads`); under functorch transforms, ``torch.compile`` and
``torch.jit.trace`` the plain ops run from the start, as they do for mixed dtypes (autocast),
weights that do not keep the batch axis, and no-grad calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from attnzoo.kernels.route import (
    autocast_state,
    composite_required,
    recompute_grads,
    sample_blocks,
    without_autocast,
)

__all__ = ["weighted_sum"]


def weighted_sum(parts: Sequence[Tensor], weights: Sequence[Tensor]) -> Tensor:
    """``parts[0] * weights[0] + parts[1] * weights[1] + ...``, in that order.

    Args:
        parts: Branches of one shape `(B, *)`, any strides (views of a projection's output).
        weights: One per branch, broadcastable to it, with the batch axis B first or of size 1
            elsewhere (per-sample, per-channel weights such as `(B, 1, 1, C)`).

    Returns:
        `(B, *)`, laid out like ``parts[0] * weights[0]``.
    """
    if len(parts) != len(weights) or not parts:
        raise ValueError(f"weighted_sum expects one weight per part, got {len(parts)} and {len(weights)}")
    tensors = (*parts, *weights)
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if not wants_grad or not _fits(parts, weights) or composite_required():
        return _plain(parts, weights)
    out = _AddcmulFn.apply(None, parts[0], weights[0])
    for part, weight in zip(parts[1:], weights[1:], strict=True):
        out = _AddcmulFn.apply(out, part, weight)
    return out


def _plain(parts: Sequence[Tensor], weights: Sequence[Tensor]) -> Tensor:
    """The composite twin."""
    out = parts[0] * weights[0]
    for part, weight in zip(parts[1:], weights[1:], strict=True):
        out = out + part * weight
    return out


def _fits(parts: Sequence[Tensor], weights: Sequence[Tensor]) -> bool:
    """Same shape, dtype and device everywhere; each weight keeps the batch axis and no larger axis."""
    first = parts[0]
    if first.ndim == 0 or any(p.shape != first.shape for p in parts):
        return False
    if any(t.dtype != first.dtype or t.device != first.device for t in (*parts, *weights)):
        return False
    return all(
        w.ndim == first.ndim and w.shape[0] == first.shape[0]
        and all(n in (1, m) for n, m in zip(w.shape[1:], first.shape[1:], strict=True))
        for w in weights
    )


class _AddcmulFn(torch.autograd.Function):
    """``acc + part * weight`` written into ``acc`` (or ``part * weight`` without one); saves the part
    and the weight only, and each branch is its own node, so backward frees a branch's saved part as
    soon as its gradients are made."""

    @staticmethod
    @without_autocast
    def forward(ctx: Any, acc: Tensor | None, part: Tensor, weight: Tensor) -> Tensor:  # type: ignore[override]
        if acc is None:
            out = part * weight
        else:
            out = acc.addcmul_(part, weight)  # in place: no product per branch
            ctx.mark_dirty(out)
        ctx.save_for_backward(part, weight)
        ctx.has_acc, ctx.autocast = acc is not None, autocast_state(part)
        return out

    @staticmethod
    @without_autocast
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        part, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: differentiate the plain ops instead
            grad_part, grad_weight = recompute_grads(
                lambda p, w: p * w, [part, weight], g, needs[1:], ctx.autocast
            )
        else:
            grad_weight = _reduced_product(g, part, weight) if needs[2] else None
            # contiguous, even for a permuted part: writing it in the part's layout (so that autograd
            # copies nothing) measured slower than this product and autograd's copy
            grad_part = g * weight if needs[1] else None
        return (g if ctx.has_acc and needs[0] else None), grad_part, grad_weight


def _reduced_product(g: Tensor, part: Tensor, weight: Tensor) -> Tensor:
    """``(g * part)`` summed to ``weight``'s shape, a few samples at a time."""
    axes = tuple(i for i in range(1, g.ndim) if weight.shape[i] == 1 and g.shape[i] != 1)
    if not axes:  # a full-size weight: nothing to reduce (an empty dim list would sum everything)
        return g * part
    out = torch.zeros(weight.shape, dtype=g.dtype, device=g.device)  # zeros: an empty batch has no block
    for rows in sample_blocks(g):
        torch.sum(g[rows] * part[rows], dim=axes, keepdim=True, out=out[rows])
    return out
