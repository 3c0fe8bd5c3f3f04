"""SK's branch selection as one autograd Function: ``sum_i a_i * U_i`` with ``a = fn(mean_hw(sum_i U_i))``.

The branches are never stacked or concatenated: ``mean_hw(sum_i U_i)`` is a sum of per-branch
means, and backward writes each branch gradient in one fused multiply-add. Double backward
recomputes the selection with plain ops (`_select_plain`); functorch transforms, dispatch modes
(`FlopCounterMode`), `torch.compile` and `torch.jit.trace` run the plain ops from the start, and so
does training where they measured faster for the shape class in this process
(`attnzoo.kernels.choose`, site ``"select"``; ``ATTNZOO_KERNEL_SELECT=fused|plain|auto`` overrides).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from attnzoo.kernels import choose
from attnzoo.kernels.gate import small_graph, small_vjp
from attnzoo.kernels.route import (
    autocast_state,
    composite_required,
    recompute_grads,
    sample_blocks,
    stale_closure,
    swapped_parameters,
    without_autocast,
)

__all__ = ["select_branches", "select_splits", "select_with_weights"]


def _select_forward(branches: Sequence[Tensor], fn: Callable[[Tensor], Tensor], track: bool):
    a, graph = small_graph(fn, [_pool(branches)], track)  # (B, M, C)
    return _mix(branches, a), a, graph


def _pool(branches: Sequence[Tensor]) -> Tensor:
    """(B, C): the mean over H, W of the summed branches, as per-branch sums scaled once (a sum's
    gradient is an expanded view autograd adds to the branch's; a mean's is materialised first)."""
    pooled = branches[0].sum((2, 3))
    for u in branches[1:]:
        pooled = pooled + u.sum((2, 3))
    return pooled / (branches[0].shape[2] * branches[0].shape[3])


def _mix(branches: Sequence[Tensor], a: Tensor, out: Tensor | None = None) -> Tensor:
    """``sum_i a_i * U_i`` (B, C, H, W) for weights ``a`` (B, M, C), accumulated in place (into ``out``
    when given); not differentiable."""
    out = torch.mul(branches[0], a[:, 0, :, None, None], out=out)  # (B, C) -> (B, C, 1, 1)
    for i, u in enumerate(branches[1:], start=1):
        out.addcmul_(u, a[:, i, :, None, None])
    return out


def select_with_weights(
    branches: Sequence[Tensor], fn: Callable[[Tensor], Tensor]
) -> tuple[Tensor, Tensor]:
    """The selection and its weights with plain differentiable ops, for callers that return the
    weights (``need_weights``, map capture); the composite twin of `select_branches`.

    Args:
        branches: M maps `(B, C, H, W)`.
        fn: The pooled `(B, C)` -> the branch weights `(B, M, C)`.

    Returns:
        ``sum_i a_i * U_i`` `(B, C, H, W)` and the weights ``a`` `(B, M, C)`.
    """
    a = fn(_pool(branches))  # (B, C) -> (B, M, C)
    out = branches[0] * a[:, 0, :, None, None]  # (B, C) -> (B, C, 1, 1)
    for i, u in enumerate(branches[1:], start=1):
        out = torch.addcmul(out, u, a[:, i, :, None, None])  # one pass, no product buffer
    return out, a


def _select_plain(
    fn: Callable[[Tensor], Tensor], *branches: Tensor, kept: list[Tensor] | None = None
) -> Tensor:
    """`select_with_weights`'s output alone (``kept`` receives the weights, for `stale_closure`)."""
    out, a = select_with_weights(branches, fn)
    if kept is not None:
        kept.append(a)
    return out


class _SelectFn(torch.autograd.Function):
    """``sum_i a_i * U_i`` with ``a = fn(mean_hw(sum_i U_i))``; the tensors are the M branches,
    then the parameters ``fn`` uses."""

    @staticmethod
    def forward(ctx, fn: Callable[[Tensor], Tensor], n: int, *tensors: Tensor) -> Tensor:  # type: ignore[override]
        branches, ctx.params, ctx.fn, ctx.autocast = tensors[:n], tensors[n:], fn, autocast_state(tensors[0])
        ctx.rng = _rng_state(tensors[0].device)  # fn may draw dropout masks: a recompute replays them
        out, ctx.a, ctx.graph = _select_forward(branches, fn, track=True)
        ctx.save_for_backward(*branches)
        return out

    @staticmethod
    @without_autocast
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        branches = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate the plain ops instead
            n, kept = len(branches), list[Tensor]()
            with _replayed_rng(ctx.rng, branches[0].device):
                grads = recompute_grads(
                    lambda *t: _select_plain(ctx.fn, *t[:n], kept=kept),
                    [*branches, *ctx.params], g, ctx.needs_input_grad[2:], ctx.autocast, passed=n,
                )
            stale_closure("SK selection", ctx.a, kept[0])
            return (None, None, *grads)
        g = g.to(branches[0].dtype)
        base, grads_p = _pooled_grad(ctx, g, branches)
        grads_u: list[Tensor | None] = []
        for i, _ in enumerate(branches):
            grads_u.append(_branch_grad(ctx.a, g, base, i) if ctx.needs_input_grad[2 + i] else None)
        return (None, None, *grads_u, *grads_p)


class _SelectSplitsFn(torch.autograd.Function):
    """`_SelectFn` for branches stored side by side in one map ``u`` (B, M*C, H, W): the gradient of
    ``u`` is written branch by branch into one buffer, not stacked from M separate gradients. With
    ``relu`` the branches are ``relu(u)``, made a few samples at a time and never held whole; the
    ReLU's backward masks the same buffer in place."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, fn: Callable[[Tensor], Tensor], m: int, relu: bool, u: Tensor, *params: Tensor
    ) -> Tensor:
        ctx.params, ctx.fn, ctx.m, ctx.relu, ctx.autocast = params, fn, m, relu, autocast_state(u)
        ctx.rng = _rng_state(u.device)  # fn may draw dropout masks: a recompute replays them
        if relu:
            out, ctx.a, ctx.graph = _relu_select_forward(u, m, fn, track=True)
        else:
            out, ctx.a, ctx.graph = _select_forward(_splits(u, m), fn, track=True)
        ctx.save_for_backward(u)
        return out

    @staticmethod
    @without_autocast
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        (u,) = ctx.saved_tensors
        act = torch.relu if ctx.relu else None
        if torch.is_grad_enabled():  # create_graph=True: differentiate the plain ops instead
            kept = list[Tensor]()
            with _replayed_rng(ctx.rng, u.device):
                grads = recompute_grads(
                    lambda t, *_: _select_plain(ctx.fn, *_splits(t, ctx.m, act), kept=kept),
                    [u, *ctx.params], g, ctx.needs_input_grad[3:], ctx.autocast, passed=1,
                )
            stale_closure("split selection", ctx.a, kept[0])
            return (None, None, None, *grads)
        g = g.to(u.dtype)
        base, grads_p = _pooled_grad(ctx, g, _splits(u, ctx.m), act)
        grad_u = None
        if ctx.needs_input_grad[3]:
            grad_u = torch.empty_like(u)
            for i, view in enumerate(_splits(grad_u, ctx.m)):
                _branch_grad(ctx.a, g, base, i, out=view)
            if ctx.relu:  # through the ReLU, in the same buffer
                torch.ops.aten.threshold_backward.grad_input(grad_u, u, 0, grad_input=grad_u)
        return (None, None, None, grad_u, *grads_p)


def _relu_select_forward(u: Tensor, m: int, fn: Callable[[Tensor], Tensor], track: bool):
    """`_select_forward` of the branches ``relu(u)``, a few samples at a time: ``relu(u)`` is made
    twice per block (for the pooled sum, then for the mix) and never held whole."""
    blocks = sample_blocks(u)
    pooled = [_pool(_splits(torch.relu(u[rows]), m)) for rows in blocks]
    s = pooled[0] if len(pooled) == 1 else torch.cat(pooled)  # (B, C)
    a, graph = small_graph(fn, [s], track)  # (B, M, C)
    out = u.new_empty(u.shape[0], u.shape[1] // m, *u.shape[2:])
    for rows in blocks:
        _mix(_splits(torch.relu(u[rows]), m), a[rows], out=out[rows])
    return out, a, graph


def _rng_state(device: torch.device) -> Tensor:
    """The random generator state that ``device``'s dropout draws from."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


@contextlib.contextmanager
def _replayed_rng(state: Tensor, device: torch.device) -> Iterator[None]:
    """Run the block from the generator state ``state`` (the forward's), leaving the caller's as it was,
    so a recomputed dropout draws the forward's mask (as ``torch.utils.checkpoint`` does)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if device.type == "cuda":
            torch.cuda.set_rng_state(state, device)
        else:
            torch.set_rng_state(state)
        yield


def _splits(u: Tensor, m: int, act: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, ...]:
    """The M branches (B, C, H, W) stored side by side in ``u`` (B, M*C, H, W), as views (of
    ``act(u)`` when ``act`` is given)."""
    u = u if act is None else act(u)
    return u.unflatten(1, (m, -1)).unbind(1)  # (B, M*C, H, W) -> (B, M, C, H, W) -> M x (B, C, H, W)


def _pooled_grad(
    ctx, g: Tensor, branches: Sequence[Tensor], act: Callable[[Tensor], Tensor] | None = None
) -> tuple[Tensor | None, list[Tensor | None]]:
    """Backward through the weights: the pooled sum's gradient broadcast over H, W (B, C, 1, 1)
    (None when the pooled input needs none) and the parameters' gradients. The branches are
    ``act(branch)`` when ``act`` is given."""
    d_a = torch.stack([_dots(g, u, act) for u in branches], dim=1)  # (B, M, C)
    (d_s,), grads_p = small_vjp(ctx.graph, d_a, ctx.params)
    H, W = g.shape[-2:]
    base = None if d_s is None else (d_s / (H * W))[:, :, None, None]  # (B, C) -> (B, C, 1, 1)
    return base, grads_p


def _dots(g: Tensor, u: Tensor, act: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """``(g * act(u)).sum((2, 3))`` (B, C) for maps (B, C, H, W), a few samples at a time, so the
    product is never held at full size."""
    parts = [(g[rows] * (u[rows] if act is None else act(u[rows]))).sum((2, 3)) for rows in sample_blocks(g)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _branch_grad(a: Tensor, g: Tensor, base: Tensor | None, i: int, out: Tensor | None = None) -> Tensor:
    """Branch i's gradient ``g a_i (+ base)`` in one fused pass (into ``out`` when given)."""
    a_i = a[:, i, :, None, None]  # (B, M, C) -> (B, C, 1, 1)
    if base is None:
        return torch.mul(g, a_i, out=out) if out is not None else g * a_i
    return torch.addcmul(base, g, a_i, out=out) if out is not None else torch.addcmul(base, g, a_i)


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
        if swapped_parameters((attention,), params) or _choice(branches) == "plain":
            return _select_plain(attention, *branches)
        return _SelectFn.apply(attention, len(branches), *branches, *params)
    with torch.no_grad():
        return _select_forward(branches, attention, track=False)[0]


def select_splits(
    u: Tensor, m: int, attention: Callable[[Tensor], Tensor], params: Sequence[Tensor], relu: bool = False
) -> Tensor:
    """`select_branches` for M branches stored side by side in the channels of one map.

    Args:
        u: The branches, (B, M*C, H, W): branch i is channels ``i*C`` to ``(i+1)*C``.
        m: Number of branches M.
        attention: Maps the pooled sum (B, C) to the branch weights (B, M, C).
        params: The parameters ``attention`` uses.
        relu: The branches are ``relu(u)``. Default: False.

    Shape:
        - Output: (B, C, H, W).
    """
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (u, *params))
    # (not under vmap, forward-mode AD or tracing, which cannot batch, differentiate or trace the
    # no-grad path's out= writes and dispatch checks: the plain ops below run there)
    plain_only = composite_required(dispatch=True)
    if not wants_grad and not plain_only:
        with torch.no_grad():
            if relu:
                return _relu_select_forward(u, m, attention, track=False)[0]
            return _select_forward(_splits(u, m), attention, track=False)[0]
    if plain_only or swapped_parameters((attention,), params) or _choice(_splits(u, m), (u, relu)) == "plain":
        return _select_plain(attention, *_splits(u, m, torch.relu if relu else None))
    return _SelectSplitsFn.apply(attention, m, relu, u, *params)


def _stand_in(s: Tensor, m: int) -> Tensor:
    """Parameter-free branch weights (B, M, C) from the pooled sum (B, C), for timing."""
    return torch.stack([s * (i + 1) for i in range(m)], dim=1).softmax(1)  # (B, M, C)


def _choice(branches: Sequence[Tensor], stacked: tuple[Tensor, bool] | None = None) -> str:
    """``"fused"`` or ``"plain"`` in training (site ``"select"`` of `attnzoo.kernels.choose`), timed
    with a parameter-free stand-in for the attention function (no batch-norm update, no map capture).
    With ``stacked`` (the map the branches are views of, and whether they are its ReLU) the kernels
    timed are `select_splits`'s: `_SelectSplitsFn` and the plain ops on the splits."""
    m = len(branches)
    B, C, H, W = branches[0].shape
    key = (m, *(choose.bucket(n) for n in (B, C, H * W)), branches[0].dtype,
           None if stacked is None else stacked[1])
    fn = functools.partial(_stand_in, m=m)
    if stacked is None:
        candidates = {
            "fused": choose.workload(lambda *t: _SelectFn.apply(fn, m, *t), branches, True),
            "plain": choose.workload(lambda *t: _select_plain(fn, *t), branches, True),
        }
    else:
        u, relu = stacked
        act = torch.relu if relu else None
        candidates = {
            "fused": choose.workload(lambda t: _SelectSplitsFn.apply(fn, m, relu, t), [u], True),
            "plain": choose.workload(lambda t: _select_plain(fn, *_splits(t, m, act)), [u], True),
        }
    elements = sum(u.numel() for u in branches)
    return choose.choose("select", key, candidates, static="fused", elements=elements,
                         device=branches[0].device)
