"""The fused gate kernel (SE, CBAM, the dual gate) against plain ops, and under torch's tools."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tests.kernels.kernel_checks import (
    Holder,
    assert_autocast_bf16,
    assert_flop_counter,
    assert_gradgradcheck,
    assert_matches,
    assert_torch_func,
)
from torch import Tensor, nn

from attnzoo.kernels.gate import GatePlan, fused_gate

PLANS = [
    (("mean",), ()),
    (("mean", "max"), ()),
    ((), ("max",)),
    ((), ("mean", "max")),
    (("max",), ("max",)),
    (("mean", "max"), ("mean", "max")),
]
IDS = [f"c{'+'.join(c) or '-'}_s{'+'.join(s) or '-'}" for c, s in PLANS]
C = 4


def _channel(w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor):
    def fn(*stats: Tensor) -> Tensor:  # a shared MLP over each statistic, summed, then a sigmoid
        total = F.linear(F.relu(F.linear(stats[0], w1, b1)), w2, b2)
        for s in stats[1:]:
            total = total + F.linear(F.relu(F.linear(s, w1, b1)), w2, b2)
        return torch.sigmoid(total)

    return fn


def _spatial(w: Tensor, b: Tensor):
    return lambda *stats: torch.sigmoid(F.conv2d(torch.cat(stats, 1), w, b, padding=1))  # 3x3 conv


def gate(plan: tuple, x: Tensor, *params: Tensor) -> Tensor:
    """``fused_gate`` with a channel MLP (4 tensors) and a spatial 3x3 convolution (2 tensors)."""
    channel_stats, spatial_stats = plan
    c_params, s_params = (params[:4], params[4:]) if channel_stats else ((), params)
    spec = GatePlan(
        channel_fn=_channel(*c_params) if channel_stats else None,
        channel_stats=channel_stats,
        spatial_fn=_spatial(*s_params) if spatial_stats else None,
        spatial_stats=spatial_stats,
    )
    return fused_gate(x, spec, c_params, s_params)


def reference(plan: tuple, x: Tensor, *params: Tensor) -> Tensor:
    """The same gate written with plain ops: ``x * cg * sg`` from mean/amax statistics."""
    channel_stats, spatial_stats = plan
    c_params, s_params = (params[:4], params[4:]) if channel_stats else ((), params)
    y = x
    if channel_stats:
        stats = [x.mean((2, 3)) if s == "mean" else x.amax((2, 3)) for s in channel_stats]
        y = x * _channel(*c_params)(*stats)[:, :, None, None]
    if spatial_stats:
        stats = [y.mean(1, keepdim=True) if s == "mean" else y.amax(1, keepdim=True) for s in spatial_stats]
        y = y * _spatial(*s_params)(*stats)
    return y


def tensors(plan: tuple, dtype: torch.dtype = torch.float64, shape=(2, C, 3, 5)) -> list[Tensor]:
    gen = torch.Generator().manual_seed(0)
    out = [torch.randn(*shape, generator=gen, dtype=dtype)]
    if plan[0]:
        out += [torch.randn(*s, generator=gen, dtype=dtype) for s in ((3, C), (3,), (C, 3), (C,))]
    if plan[1]:
        out += [torch.randn(*s, generator=gen, dtype=dtype) for s in ((1, len(plan[1]), 3, 3), (1,))]
    return out


@pytest.mark.parametrize("plan", PLANS, ids=IDS)
def test_values_and_gradients_match_plain_ops(plan):
    assert_matches(lambda *t: gate(plan, *t), lambda *t: reference(plan, *t), tensors(plan))


def test_channels_last_input_matches_plain_ops():
    plan = PLANS[-1]
    x, *params = tensors(plan)
    x = x.contiguous(memory_format=torch.channels_last)
    assert_matches(lambda *t: gate(plan, *t), lambda *t: reference(plan, *t), [x, *params])


@pytest.mark.parametrize("plan", PLANS, ids=IDS)
def test_second_derivatives(plan):
    assert_gradgradcheck(lambda *t: gate(plan, *t), tensors(plan, shape=(2, C, 2, 3)))


@pytest.mark.parametrize("plan", PLANS, ids=IDS)
def test_gradient_penalty_equals_plain_ops(plan):
    results = []
    for run in (gate, reference):
        x, *params = [t.requires_grad_() for t in tensors(plan)]
        (g,) = torch.autograd.grad(run(plan, x, *params).square().sum(), x, create_graph=True)
        g.square().sum().backward()
        results.append([t.grad for t in (x, *params)])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_double_backward_refuses_a_swapped_closure():
    # The kernel recomputes the small function in a create_graph backward: if its parameters were
    # swapped since forward, it must say so rather than give wrong second derivatives.
    lin = nn.Linear(C, C, dtype=torch.float64)
    x = torch.randn(2, C, 3, 3, dtype=torch.float64, requires_grad=True)
    out = fused_gate(x, GatePlan(channel_fn=lambda s: torch.sigmoid(lin(s)), channel_stats=("mean",)),
                     tuple(lin.parameters()))
    with torch.no_grad():
        lin.weight.add_(1.0)  # in place: the kernel saved no copy of the parameter
    with pytest.raises(RuntimeError, match="gives other values than in forward"):
        torch.autograd.grad(out.square().sum(), x, create_graph=True)


@pytest.mark.parametrize("plan", PLANS, ids=IDS)
def test_flop_counter_with_backward(plan):
    assert_flop_counter(lambda *t: gate(plan, *t), tensors(plan, torch.float32))


@pytest.mark.parametrize("plan", PLANS, ids=IDS)
def test_torch_func_grad_over_functional_call(plan):
    assert_torch_func(Holder(lambda *t: gate(plan, *t), tensors(plan, torch.float32)))


class _LinearGate(nn.Module):
    """SE-like: nn.Linear layers compute the channel gate, so autocast runs them in bfloat16."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(C, 3), nn.ReLU(), nn.Linear(3, C), nn.Sigmoid())
        self.conv = nn.Conv2d(2, 1, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        plan = GatePlan(
            channel_fn=lambda a, m: self.fc(a) * self.fc(m),
            channel_stats=("mean", "max"),
            spatial_fn=lambda a, m: torch.sigmoid(self.conv(torch.cat([a, m], 1))),
            spatial_stats=("mean", "max"),
        )
        return fused_gate(x, plan, tuple(self.fc.parameters()), tuple(self.conv.parameters()))


def test_autocast_bf16_forward_and_backward():
    torch.manual_seed(0)
    assert_autocast_bf16(_LinearGate(), [torch.randn(2, C, 5, 6)])


@pytest.mark.parametrize("plan", PLANS, ids=IDS)
def test_autocast_bf16_plain_functions(plan):
    ts = tensors(plan, torch.float32)
    assert_autocast_bf16(lambda *t: gate(plan, *t), ts, lambda *t: reference(plan, *t))
