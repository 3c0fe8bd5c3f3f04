"""SK's branch selection as one autograd Function: ``sum_i a_i * U_i`` with ``a = fn(mean_hw(sum_i U_i))``.

The branches are never stacked or concatenated: ``mean_hw(sum_i U_i)`` is a sum of per-branch
means, and backward writes each branch gradient in one fused multiply-add. Double backward
recomputes the selection with plain ops (`_select_plain`); functorch transforms, dispatch modes
(`FlopCounterMode`), `torch.compile` and `torch.jit.trace` run the plain ops from the start, and so
does training where they measured faster for the shape class in this process
(`attnzoo.kernels.choose`, site ``"select"``; ``ATTNZOO_KERNEL_SELECT=fused|plain|auto`` overrides).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from attnzoo.kernels import choose
from attnzoo.kernels.gate import small_graph, small_vjp
from attnzoo.kernels.route import (
    autocast_state,
    composite_required,
    recompute_grads,
    stale_closure,
    without_autocast,
)

__all__ = ["select_branches"]


def _select_forward(branches: Sequence[Tensor], fn: Callable[[Tensor], Tensor], track: bool):
    s = branches[0].mean((2, 3))  # (B, C): mean over H, W of the summed branches
    for u in branches[1:]:
        s = s + u.mean((2, 3))
    a, graph = small_graph(fn, [s], track)  # (B, M, C)
    out = branches[0] * a[:, 0, :, None, None]  # (B, C) -> (B, C, 1, 1)
    for i, u in enumerate(branches[1:], start=1):
        out.addcmul_(u, a[:, i, :, None, None])
    return out, a, graph


def _select_plain(
    fn: Callable[[Tensor], Tensor], *branches: Tensor, kept: list[Tensor] | None = None
) -> Tensor:
    """The selection with plain differentiable ops: the composite twin of `_SelectFn` (``kept``
    receives the branch weights, for `stale_closure`)."""
    pooled = branches[0].mean((2, 3))  # (B, C)
    for u in branches[1:]:
        pooled = pooled + u.mean((2, 3))
    a = fn(pooled)  # (B, M, C)
    if kept is not None:
        kept.append(a)
    out = branches[0] * a[:, 0, :, None, None]  # (B, C) -> (B, C, 1, 1)
    for i, u in enumerate(branches[1:], start=1):
        out = out + u * a[:, i, :, None, None]
    return out


class _SelectFn(torch.autograd.Function):
    """``sum_i a_i * U_i`` with ``a = fn(mean_hw(sum_i U_i))``; the tensors are the M branches,
    then the parameters ``fn`` uses."""

    @staticmethod
    def forward(ctx, fn: Callable[[Tensor], Tensor], n: int, *tensors: Tensor) -> Tensor:  # type: ignore[override]
        branches, ctx.params, ctx.fn, ctx.autocast = tensors[:n], tensors[n:], fn, autocast_state(tensors[0])
        out, ctx.a, ctx.graph = _select_forward(branches, fn, track=True)
        ctx.save_for_backward(*branches)
        return out

    @staticmethod
    @without_autocast
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        branches = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate the plain ops instead
            n, kept = len(branches), list[Tensor]()
            grads = recompute_grads(
                lambda *t: _select_plain(ctx.fn, *t[:n], kept=kept),
                [*branches, *ctx.params], g, ctx.needs_input_grad[2:], ctx.autocast,
            )
            stale_closure("SK selection", ctx.a, kept[0])
            return (None, None, *grads)
        g = g.to(branches[0].dtype)
        a: Tensor = ctx.a  # (B, M, C)
        d_a = torch.stack([(g * u).sum((2, 3)) for u in branches], dim=1)  # (B, M, C)
        (d_s,), grads_p = small_vjp(ctx.graph, d_a, ctx.params)
        H, W = g.shape[-2:]
        base = None if d_s is None else (d_s / (H * W))[:, :, None, None]  # (B, C) -> (B, C, 1, 1)
        grads_u: list[Tensor | None] = []
        for i, _ in enumerate(branches):
            if not ctx.needs_input_grad[2 + i]:
                grads_u.append(None)
                continue
            a_i = a[:, i, :, None, None]  # (B, C) -> (B, C, 1, 1)
            grads_u.append(g * a_i if base is None else torch.addcmul(base, g, a_i))
        return (None, None, *grads_u, *grads_p)


def select_branches(
    branches: Sequence[Tensor], attention: Callable[[Tensor], Tensor], params: Sequence[Tensor]
) -> Tensor:
    """``sum_i a_i * U_i`` with ``a = attention(mean_hw(sum_i U_i))``, ``a`` of shape (B, M, C).

    Args:
        branches: The M branch outputs U_i, each (B, C, H, W).
        attention: Maps the pooled sum (B, C) to the branch weights (B, M, C).
        params: The parameters ``attention`` uses (their gradients flow through the kernel).

    Shape:
        - Output: (B, C, H, W).
    """
    if composite_required(dispatch=True):  # functorch, dispatch modes, compile, tracing: plain ops throughout
        return _select_plain(attention, *branches)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (*branches, *params)):
        if _choice(branches) == "plain":
            return _select_plain(attention, *branches)
        return _SelectFn.apply(attention, len(branches), *branches, *params)
    with torch.no_grad():
        return _select_forward(branches, attention, track=False)[0]


def _stand_in(s: Tensor, m: int) -> Tensor:
    """Parameter-free branch weights (B, M, C) from the pooled sum (B, C), for timing."""
    return torch.stack([s * (i + 1) for i in range(m)], dim=1).softmax(1)  # (B, M, C)


def _choice(branches: Sequence[Tensor]) -> str:
    """``"fused"`` or ``"plain"`` in training (site ``"select"`` of `attnzoo.kernels.choose`), timed
    with a parameter-free stand-in for the attention function (no batch-norm update, no map capture)."""
    m = len(branches)
    B, C, H, W = branches[0].shape
    key = (m, *(choose.bucket(n) for n in (B, C, H * W)), branches[0].dtype)
    fn = functools.partial(_stand_in, m=m)
    candidates = {
        "fused": choose.workload(lambda *t: _SelectFn.apply(fn, m, *t), branches, True),
        "plain": choose.workload(lambda *t: _select_plain(fn, *t), branches, True),
    }
    elements = sum(u.numel() for u in branches)
    return choose.choose("select", key, candidates, static="fused", elements=elements,
                         device=branches[0].device)
