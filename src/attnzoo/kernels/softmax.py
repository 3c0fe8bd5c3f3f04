"""Softmax over a short last axis (outlook attention's k*k = 9 neighbours) as a few plain passes.

torch's CPU softmax falls to a slow path when the softmax axis is shorter than one vector register
(16 floats on AVX-512, 8 on AVX2): forward and backward over 3M floats took 38-46 ms in rows of 4 to
15 on the AVX-512 kind, and on AVX2 in rows of 4 to 7 (8-12 ms from 9 up; 4-6 ms for rows of 16 and
more on both). `short_softmax` takes the row maxima, exponentiates in base 2 (`exp2` runs about 2.5x
faster than `exp` on CPU) and divides by the row sums: 8-19 ms on both kinds, so 0.20-0.43 of
torch's time in rows under 16 on AVX-512, 0.26-0.68 in rows under 10 on AVX2 and level above (VOLO's
outlook weights `(B, h, N, 9, 9)`: 3M floats in rows of 9). The same values up to rounding. Its backward is
`p (g - sum(g p))` in three passes (the saved output p); under ``create_graph=True`` the same formula
runs with differentiable ops on the saved output, so second derivatives are exact.

Rows wider than `MAX_WIDTH`, half precision, autocast, other devices, and functorch transforms or
tracing (`attnzoo.kernels.route`) take ``torch.softmax``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from attnzoo._checks import autocast_on
from attnzoo.kernels.route import composite_required

__all__ = ["LOG2E", "MAX_WIDTH", "short_softmax"]

MAX_WIDTH = 15  # widest softmax axis that takes the plain passes: torch's is as fast from one vector up
LOG2E = 1.0 / math.log(2.0)  # exp(x) = exp2(x * LOG2E); torch's exp2 runs about 2.5x faster on CPU


class _ShortSoftmax(torch.autograd.Function):
    """Softmax over the last axis of `x` `(..., n)` by max, exp2 and sum passes."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        # contiguous like torch's softmax output, so a dropout after it draws the same mask
        p = torch.empty_like(x, memory_format=torch.contiguous_format)
        torch.sub(x, x.amax(-1, keepdim=True), out=p).mul_(LOG2E).exp2_()  # (..., n), exp(x - max)
        p.div_(p.sum(-1, keepdim=True))
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (p,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the formula with differentiable ops
            return p * (grad - (grad * p).sum(-1, keepdim=True))
        gp = grad * p
        return gp.sub_(p * gp.sum(-1, keepdim=True))


def short_softmax(x: Tensor) -> Tensor:
    """``x.softmax(-1)`` for `x` `(..., n)`, by plain passes where the last axis is short (module
    docstring); the same values up to rounding."""
    plain = (
        x.shape[-1] > MAX_WIDTH
        or x.device.type != "cpu"
        or x.dtype not in (torch.float32, torch.float64)
        or autocast_on(x.device.type)
        or composite_required()
    )
    return x.softmax(-1) if plain else _ShortSoftmax.apply(x)
