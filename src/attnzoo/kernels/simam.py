"""SimAM's parameter-free energy gate, ``x * sigmoid(d^2 / (4 (v + lambda)) + 1/2)``, with a lean backward.

With ``d = x - mean_hw(x)`` and ``v = sum_hw(d^2) / (H W - 1)`` per (sample, channel), plain autograd
keeps ``d``, ``d^2``, the logits and the gate, five full-size tensors, and makes as many again in
backward. `_SimAMFn` saves only ``x`` and the two (B, C, 1, 1) statistics; its backward rebuilds
``d`` and the gate, a few samples at a time in three block-sized buffers, and writes the input
gradient:

    g_z = g x s (1 - s),    g_k = sum_hw(g_z d^2),    g_v = -4 k^2 g_k,
    g_d = 2 d (k g_z + g_v / n),    g_x = g s + g_d - mean_hw(g_d),

with ``k = 1 / (4 (v + lambda))`` and ``n = H W - 1``. Double backward (``create_graph=True``)
differentiates the plain ops (`attnzoo.kernels.route.recompute_grads`); functorch transforms,
``torch.compile``, ``jit.trace``, no-grad calls and mixed dtypes run the plain ops from the start.
"""

from __future__ import annotations

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

__all__ = ["simam_gate", "simam_plain"]


def simam_plain(x: Tensor, e_lambda: float) -> tuple[Tensor, Tensor]:
    """The composite twin: the output and the gate `(B, C, H, W)`, as the paper's code writes them."""
    n = max(x.shape[2] * x.shape[3] - 1, 1)
    dev2 = (x - x.mean((2, 3), keepdim=True)).square()  # (B, C, H, W)
    var = dev2.sum((2, 3), keepdim=True) / n  # (B, C, 1, 1)
    gate = torch.sigmoid(dev2 / (4 * (var + e_lambda)) + 0.5)
    return x * gate, gate


def simam_gate(x: Tensor, e_lambda: float) -> Tensor:
    """SimAM's gated map.

    Args:
        x: The map `(B, C, H, W)`.
        e_lambda: The energy's regulariser lambda.

    Returns:
        `(B, C, H, W)`.
    """
    if not (torch.is_grad_enabled() and x.requires_grad) or composite_required():
        return simam_plain(x, e_lambda)[0]
    return _SimAMFn.apply(x, e_lambda)


def _statistics(x: Tensor, e_lambda: float) -> tuple[Tensor, Tensor, int]:
    """The mean (B, C, 1, 1), ``k = 1 / (4 (v + lambda))`` (B, C, 1, 1) and n = max(H W - 1, 1)."""
    n = max(x.shape[2] * x.shape[3] - 1, 1)
    mean = x.mean((2, 3), keepdim=True)
    if x.shape[2] * x.shape[3] == 1:  # one position: no deviation
        return mean, torch.full_like(mean, 1.0 / (4 * e_lambda)), n
    var = torch.var(x, (2, 3), correction=1, keepdim=True)  # sum of squared deviations / n, one pass
    return mean, 1.0 / (4 * (var + e_lambda)), n


class _SimAMFn(torch.autograd.Function):
    """``x * sigmoid(k (x - mean)^2 + 1/2)``; saves x and the (B, C, 1, 1) statistics. Both passes run
    a few samples at a time, so the chain of elementwise steps works on blocks that stay in cache."""

    @staticmethod
    @without_autocast
    def forward(ctx: Any, x: Tensor, e_lambda: float) -> Tensor:  # type: ignore[override]
        mean, k, n = _statistics(x, e_lambda)
        out = torch.empty_like(x)
        for rows in sample_blocks(x):  # d, then the gate, then the output, in the output's block
            block = torch.sub(x[rows], mean[rows], out=out[rows])
            block.square_().mul_(k[rows]).add_(0.5).sigmoid_().mul_(x[rows])
        ctx.save_for_backward(x, mean, k)
        ctx.n, ctx.e_lambda, ctx.autocast = n, e_lambda, autocast_state(x)
        return out

    @staticmethod
    @without_autocast
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, None]:  # type: ignore[override]
        x, mean, k = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate the plain ops instead
            (grad,) = recompute_grads(
                lambda t: simam_plain(t, ctx.e_lambda)[0], [x], g, [True], ctx.autocast
            )
            return grad, None
        g = g.to(x.dtype)
        grad = torch.empty_like(x)
        blocks = sample_blocks(x)
        d, s, t = (torch.empty_like(x[blocks[0]]) for _ in range(3))  # block buffers, reused
        for rows in blocks:
            size = x[rows].shape[0]
            _backward_block(
                x[rows], g[rows], mean[rows], k[rows], ctx.n, grad[rows], d[:size], s[:size], t[:size]
            )
        return grad, None


def _backward_block(
    x: Tensor, g: Tensor, mean: Tensor, k: Tensor, n: int, grad: Tensor, d: Tensor, s: Tensor, t: Tensor
) -> None:
    """The input gradient of one block of samples into ``grad``; ``d``, ``s``, ``t`` are scratch."""
    torch.sub(x, mean, out=d)
    torch.mul(d, d, out=s).mul_(k).add_(0.5).sigmoid_()  # the gate
    torch.mul(g, x, out=t).mul_(s)  # g_z = g x s (1 - s) = g x s - (g x s) s
    t.addcmul_(t, s, value=-1)
    torch.mul(s, g, out=grad)  # g s, the direct part of the input gradient
    t.mul_(d)  # g_z d
    g_k = torch.einsum("bchw,bchw->bc", t, d)[:, :, None, None]  # sum of g_z d^2, (B, C, 1, 1)
    g_v = g_k.mul_(k.square()).mul_(-4)
    area = x.shape[2] * x.shape[3]
    # g_d = 2 k (g_z d) + (2 g_v / n) d, and its mean over H, W
    scale_t, scale_d = 2 * k, 2 * g_v / n
    mean_gd = (scale_t * t.sum((2, 3), keepdim=True) + scale_d * d.sum((2, 3), keepdim=True)) / area
    grad.addcmul_(t, scale_t).addcmul_(d, scale_d).sub_(mean_gd)
