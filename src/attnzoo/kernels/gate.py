"""Fused channel/spatial gating: ``out = x * cg[b, c] * sg[b, h, w]`` with a lean backward.

Shared by the gating family (SE, CBAM and its parts, the seed's dual gated block). A channel gate
``cg`` comes from statistics of ``x`` pooled over H, W (mean and/or max) through a small learned
function (an MLP); a spatial gate ``sg`` comes from statistics of the channel-gated tensor pooled
over C (mean and/or max) through another small function (a k x k convolution).

Plain autograd over that composition keeps the channel-gated tensor, materialises the gradient of
every pooling as a full-size tensor and adds them one by one (timm's ``amax`` also builds an
equality mask over the whole input). `_GateFn` instead

- runs the small functions on their (B, C) / (B, 1, H, W) inputs in a little autograd graph of their
  own, kept on the context, so their backward is a vector-Jacobian product on small tensors;
- saves only ``x`` (the caller's tensor), the two gates and the argmax indices (int64 of pooled size);
- in backward, materialises one full-size product ``g * x``, reduces it with two matrix products
  (sum over C weighted by ``cg``, sum over H, W weighted by ``sg``), and writes the input gradient in
  two fused multiply-adds, scattering the max-pool gradients to their argmax positions.

Memory per step: the output plus one full-size temporary, against three to five in plain autograd.

Double backward (``create_graph=True``: gradient penalties, ``gradgradcheck``) recomputes the gate
with plain differentiable ops in backward (`_gate_plain`), so second derivatives are exact;
under functorch transforms, dispatch modes (``FlopCounterMode``), ``torch.compile`` and
``torch.jit.trace`` the plain ops run from the start (`attnzoo.kernels.route.composite_required`).
Under ``torch.no_grad()`` (or with nothing requiring grad) the kernel is bypassed and the max
statistics use ``amax``, which skips computing indices. In training the plain ops also run where
they measured faster for the shape class in this process (`attnzoo.kernels.choose`, site ``"gate"``;
``ATTNZOO_KERNEL_GATE=fused|plain|auto`` overrides). Under autocast the gates may come out in
the low precision while ``x`` does not: backward computes in ``x``'s dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from attnzoo._checks import check_shape
from attnzoo.kernels import choose
from attnzoo.kernels.route import (
    autocast_state,
    composite_required,
    recompute_grads,
    stale_closure,
    swapped_parameters,
    without_autocast,
)

__all__ = ["GatePlan", "fused_gate", "to_batch_first", "small_graph", "small_vjp"]

STATS = ("mean", "max")

# A small differentiable function kept with its graph: (output, leaf inputs).
Graph = tuple[Tensor, list[Tensor]]


@dataclass(frozen=True)
class GatePlan:
    """What to pool and which small functions turn the pooled statistics into gates.

    Args:
        channel_fn: Maps the channel statistics, each (B, C), to the channel gate (B, C); ``None``
            for no channel gate.
        channel_stats: Which statistics over H, W ``channel_fn`` takes, in order ("mean", "max").
        spatial_fn: Maps the spatial statistics, each (B, 1, H, W), to the spatial gate
            (B, 1, H, W); ``None`` for no spatial gate.
        spatial_stats: Which statistics over C ``spatial_fn`` takes, in order.
    """

    channel_fn: Callable[..., Tensor] | None = None
    channel_stats: tuple[str, ...] = ()
    spatial_fn: Callable[..., Tensor] | None = None
    spatial_stats: tuple[str, ...] = ()


def to_batch_first(x: object, batch_first: bool, who: str, **sizes: Any) -> Tensor:
    """Check a 4-D input and return it as a (B, C, H, W) view (the seed's ``batch_first=False``
    means the input is (C, B, H, W))."""
    check_shape(x, who, "B C H W" if batch_first else "C B H W", **sizes)
    t = cast(Tensor, x)
    return t if batch_first else t.permute(1, 0, 2, 3)  # (C, B, H, W) -> (B, C, H, W)


def small_graph(
    fn: Callable[..., Tensor], inputs: Sequence[Tensor], track: bool
) -> tuple[Tensor, Graph | None]:
    """Run ``fn`` on small tensors; with ``track``, keep its graph for `small_vjp`."""
    if not track:
        with torch.no_grad():
            return fn(*inputs), None
    leaves = [t.detach().requires_grad_() for t in inputs]
    with torch.enable_grad():
        out = fn(*leaves)
    return out.detach(), (out, leaves)


def small_vjp(
    graph: Graph, grad: Tensor, params: Sequence[Tensor]
) -> tuple[list[Tensor | None], list[Tensor | None]]:
    """Gradients of the kept small graph: (w.r.t. its leaf inputs, w.r.t. ``params``)."""
    out, leaves = graph
    wanted = [p for p in params if p.requires_grad]
    # retain_graph: the outer graph may be run backward again (retain_graph there, gradcheck)
    # grad in the graph's dtype: under autocast the small function may compute in bfloat16
    grad = grad.to(out.dtype)
    grads = torch.autograd.grad(out, [*leaves, *wanted], grad, allow_unused=True, retain_graph=True)
    by_param = iter(grads[len(leaves) :])
    return list(grads[: len(leaves)]), [next(by_param) if p.requires_grad else None for p in params]


def _flat(t: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, C, H*W); a view for contiguous and channels_last tensors."""
    return t.flatten(2)  # (B, C, H, W) -> (B, C, HW)


def _pool_hw(x: Tensor, stats: tuple[str, ...], track: bool) -> tuple[list[Tensor], Tensor | None]:
    """Statistics over H, W, each (B, C); with ``track`` the argmax (B, C, 1, 1) for backward."""
    out, index = [], None
    for stat in stats:
        if stat == "mean":
            out.append(x.mean((2, 3)))
        elif track:  # adaptive_max_pool2d's indexed kernel is about twice as fast as max(dim)
            value, index = F.adaptive_max_pool2d(x, 1, return_indices=True)
            out.append(value.flatten(1))  # (B, C, 1, 1) -> (B, C)
        else:
            out.append(x.amax((2, 3)))
    return out, index


def _pool_c(y: Tensor, stats: tuple[str, ...], track: bool) -> tuple[list[Tensor], Tensor | None]:
    """Statistics over C, each (B, 1, H, W); with ``track`` the argmax (B, 1, H, W) for backward."""
    out, index = [], None
    for stat in stats:
        if stat == "mean":
            out.append(y.mean(1, keepdim=True))
        elif track:
            value, index = y.max(1, keepdim=True)
            out.append(value)
        else:
            out.append(y.amax(1, keepdim=True))
    return out, index


def _gate_forward(x: Tensor, plan: GatePlan, track: bool) -> tuple[Tensor, dict[str, object]]:
    saved: dict[str, object] = {}
    y = x
    if plan.channel_fn is not None:
        stats, saved["c_index"] = _pool_hw(x, plan.channel_stats, track)
        cg, saved["c_graph"] = small_graph(plan.channel_fn, stats, track)
        saved["cg"] = cg
        y = x * cg[:, :, None, None]  # (B, C) -> (B, C, 1, 1)
    if plan.spatial_fn is not None:
        stats, saved["s_index"] = _pool_c(y, plan.spatial_stats, track)
        sg, saved["s_graph"] = small_graph(plan.spatial_fn, stats, track)
        saved["sg"] = sg
        y = y.mul_(sg) if y is not x else x * sg  # the channel-gated tensor is not kept
    return y, saved


def _gate_plain(x: Tensor, plan: GatePlan, gates: dict[str, Tensor] | None = None) -> Tensor:
    """The gate with plain differentiable ops: the composite twin of `_GateFn` (``gates`` receives
    the channel and spatial gates, for `stale_closure`)."""
    y, gates = x, {} if gates is None else gates
    if plan.channel_fn is not None:
        stats = [x.mean((2, 3)) if s == "mean" else x.amax((2, 3)) for s in plan.channel_stats]  # (B, C)
        gates["cg"] = plan.channel_fn(*stats)
        y = x * gates["cg"][:, :, None, None]  # (B, C) -> (B, C, 1, 1)
    if plan.spatial_fn is not None:
        stats = [y.mean(1, keepdim=True) if s == "mean" else y.amax(1, keepdim=True)
                 for s in plan.spatial_stats]
        gates["sg"] = plan.spatial_fn(*stats)
        y = y * gates["sg"]  # (B, 1, H, W) gate
    return y


class _GateFn(torch.autograd.Function):
    """``x -> x * cg * sg`` (see the module docstring); parameters of the small functions follow ``x``."""

    @staticmethod
    def forward(ctx, x: Tensor, plan: GatePlan, n_channel: int, *params: Tensor) -> Tensor:  # type: ignore[override]
        out, saved = _gate_forward(x, plan, track=True)
        ctx.save_for_backward(x)
        ctx.plan, ctx.saved, ctx.n_channel = plan, saved, n_channel
        ctx.params, ctx.autocast = params, autocast_state(x)
        return out

    @staticmethod
    @without_autocast
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        plan, saved = ctx.plan, ctx.saved
        if torch.is_grad_enabled():  # create_graph=True: differentiate the plain ops instead
            needs = [ctx.needs_input_grad[0], *ctx.needs_input_grad[3:]]
            gates: dict[str, Tensor] = {}
            grads = recompute_grads(
                lambda t, *_: _gate_plain(t, plan, gates), [x, *ctx.params], g, needs, ctx.autocast,
                passed=1,
            )
            for name, again in gates.items():
                stale_closure("gate", saved[name], again)
            return (grads[0], None, None, *grads[1:])
        c_params, s_params = ctx.params[: ctx.n_channel], ctx.params[ctx.n_channel :]
        B, C, H, W = x.shape
        g = g.to(x.dtype)
        cg: Tensor | None = None if saved.get("cg") is None else saved["cg"].to(x.dtype)  # (B, C)
        sg: Tensor | None = None if saved.get("sg") is None else saved["sg"].to(x.dtype)  # (B, 1, H, W)
        d_cg: Tensor | None = None
        gy = g  # gradient w.r.t. the channel-gated tensor y = x * cg
        grads_c: list[Tensor | None] = [None] * len(c_params)
        grads_s: list[Tensor | None] = [None] * len(s_params)

        # Gradients of the gates from one product g * x, reduced by two matrix products.
        prod = g * x
        if cg is not None and sg is not None:
            d_sg = torch.bmm(cg.unsqueeze(1), _flat(prod)).view(B, 1, H, W)  # sum_c g x cg
            d_cg = torch.bmm(_flat(prod), sg.reshape(B, H * W, 1)).view(B, C)  # sum_hw g x sg
        elif sg is not None:
            d_sg = prod.sum(1, keepdim=True)
        else:
            d_cg = prod.sum((2, 3))
        del prod

        if sg is not None:
            d_stats, grads_s = small_vjp(saved["s_graph"], d_sg, s_params)
            d_mean = d_max = None
            for stat, d in zip(plan.spatial_stats, d_stats, strict=True):
                if stat == "mean":
                    d_mean = None if d is None else d / C
                else:
                    d_max = d
            s_index = saved["s_index"]
            if d_cg is not None:  # the spatial statistics also depend on cg through y = x * cg
                if d_mean is not None:
                    d_cg = d_cg + torch.bmm(_flat(x), d_mean.reshape(B, H * W, 1)).view(B, C)
                if d_max is not None:
                    x_at = _flat(x).gather(1, _flat(s_index))  # (B, 1, HW): x at the argmax channel
                    src = (x_at * _flat(d_max)).reshape(B, H * W)
                    d_cg = d_cg.scatter_add(1, s_index.reshape(B, H * W), src)
            if ctx.needs_input_grad[0]:
                gy = torch.addcmul(d_mean, g, sg) if d_mean is not None else g * sg
                if d_max is not None:
                    gy = _scatter_flat(gy, 1, s_index, d_max)

        gx: Tensor | None = gy
        if cg is not None:
            d_stats, grads_c = small_vjp(saved["c_graph"], cast(Tensor, d_cg), c_params)
            gx = None
            if ctx.needs_input_grad[0]:
                cmean = cmax = None
                for stat, d in zip(plan.channel_stats, d_stats, strict=True):
                    if stat == "mean":
                        cmean = None if d is None else (d / (H * W))[:, :, None, None]  # (B, C, 1, 1)
                    else:
                        cmax = d
                cg4 = cg[:, :, None, None]  # (B, C) -> (B, C, 1, 1)
                if cmean is None:
                    gx = gy * cg4 if gy is g else gy.mul_(cg4)
                elif gy is g:
                    gx = torch.addcmul(cmean, g, cg4)
                else:
                    gx = torch.addcmul(cmean, gy, cg4, out=gy)
                if cmax is not None:
                    gx = _scatter_flat(gx, 2, saved["c_index"], cmax[:, :, None, None])
        if not ctx.needs_input_grad[0]:
            gx = None
        return (gx, None, None, *grads_c, *grads_s)


def _scatter_flat(t: Tensor, dim: int, index: Tensor, src: Tensor) -> Tensor:
    """``t`` with ``src`` added at ``index`` along the flattened H*W (dim 2) or along C (dim 1)."""
    flat = t.view(t.shape[0], t.shape[1], -1) if _viewable(t) else t.contiguous().flatten(2)
    # (B, C, H, W) -> (B, C, HW); index/src (B, 1, H, W) or (B, C, 1, 1) flattened alike
    flat.scatter_add_(dim, _flat(index), _flat(src.to(t.dtype)))
    return flat.view(t.shape)


def _viewable(t: Tensor) -> bool:
    try:
        t.view(t.shape[0], t.shape[1], -1)
    except RuntimeError:
        return False
    return True


def fused_gate(
    x: Tensor, plan: GatePlan, channel_params: Sequence[Tensor] = (), spatial_params: Sequence[Tensor] = ()
) -> Tensor:
    """Apply the gates of ``plan`` to ``x`` (B, C, H, W); the parameters are those the small
    functions use (gradients reach them through the kept small graphs)."""
    params = (*channel_params, *spatial_params)
    if composite_required(dispatch=True):  # functorch, dispatch modes, compile, tracing: plain ops throughout
        return _gate_plain(x, plan)
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        if swapped_parameters((plan.channel_fn, plan.spatial_fn), params) or _choice(x, plan) == "plain":
            return _gate_plain(x, plan)
        return _GateFn.apply(x, plan, len(channel_params), *params)
    with torch.no_grad():
        return _gate_forward(x, plan, track=False)[0]


def _stand_in(*stats: Tensor) -> Tensor:
    """A small function without parameters or side effects, for timing: ``sigmoid(sum(stats))``."""
    total = stats[0]
    for t in stats[1:]:
        total = total + t
    return total.sigmoid()


def _choice(x: Tensor, plan: GatePlan) -> str:
    """``"fused"`` or ``"plain"`` in training (site ``"gate"`` of `attnzoo.kernels.choose`).

    The candidates are timed with parameter-free stand-ins for the plan's small functions (their
    cost is on (B, C) or (B, 1, H, W) tensors, the kernels' on (B, C, H, W)), so calibration
    updates no batch-norm statistics and records no maps.
    """
    stand_in = GatePlan(
        channel_fn=None if plan.channel_fn is None else _stand_in,
        channel_stats=plan.channel_stats,
        spatial_fn=None if plan.spatial_fn is None else _stand_in,
        spatial_stats=plan.spatial_stats,
    )
    B, C, H, W = x.shape
    layout = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    key = (*(choose.bucket(n) for n in (B, C, H * W)), plan.channel_fn is not None, plan.channel_stats,
           plan.spatial_fn is not None, plan.spatial_stats, layout, x.dtype)
    candidates = {
        "fused": choose.workload(lambda t: _GateFn.apply(t, stand_in, 0), (x,), True),
        "plain": choose.workload(lambda t: _gate_plain(t, stand_in), (x,), True),
    }
    return choose.choose("gate", key, candidates, static="fused", elements=x.numel(), device=x.device)
