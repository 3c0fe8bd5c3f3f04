"""Gather-Excite (ge): parity with timm's GatherExcite in float64, the paper's gathers, errors.

timm 1.0.31's GatherExcite constructor fails for every configuration with weights (it passes its
``device``/``dtype`` dict positionally, ``*dd``); ``timm_ge`` builds the module its constructor
means to build (the same sub-modules, with timm's own ``create_conv2d`` and ``ConvMlp``) on top of
a weightless instance, so the parity tests run timm's forward.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnzoo
from attnzoo import GatherExcite
from attnzoo.convert import convert, from_timm

timm_layers = pytest.importorskip("timm.layers", reason="timm is needed for the parity tests")
from timm.layers.create_conv2d import create_conv2d  # noqa: E402
from timm.layers.gather_excite import GatherExcite as TimmGatherExcite  # noqa: E402
from timm.layers.helpers import make_divisible  # noqa: E402
from timm.layers.mlp import ConvMlp  # noqa: E402

D = torch.float64


def timm_ge(channels, feat_size=None, extra_params=False, extent=0, use_mlp=True, rd_ratio=1 / 16,
            rd_channels=None, add_maxpool=False, act_layer=nn.ReLU, norm=True, gate_layer="sigmoid"):
    """timm's GatherExcite with the sub-modules its constructor means to build."""
    m = TimmGatherExcite(
        channels, extent=extent, use_mlp=False, add_maxpool=add_maxpool, gate_layer=gate_layer
    )
    if extra_params:
        m.gather = nn.Sequential()
        if extent == 0:
            conv = create_conv2d(channels, channels, kernel_size=feat_size, depthwise=True)
            m.gather.add_module("conv1", conv)
            if norm:
                m.gather.add_module("norm1", nn.BatchNorm2d(channels))
        else:
            num_conv = int(math.log2(extent))
            for i in range(num_conv):
                m.gather.add_module(
                    f"conv{i + 1}", create_conv2d(channels, channels, kernel_size=3, stride=2, depthwise=True)
                )
                if norm:
                    m.gather.add_module(f"norm{i + 1}", nn.BatchNorm2d(channels))
                if i != num_conv - 1:
                    m.gather.add_module(f"act{i + 1}", act_layer(inplace=True))
    if use_mlp:
        rd = rd_channels or make_divisible(channels * rd_ratio, 1, round_limit=0.0)
        m.mlp = ConvMlp(channels, rd, act_layer=act_layer)
    return m


def randomised(module: nn.Module, seed: int = 0) -> nn.Module:
    """float64, random weights and BatchNorm statistics."""
    gen = torch.Generator().manual_seed(seed)
    module = module.to(D)
    with torch.no_grad():
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            if t.is_floating_point():
                value = torch.randn(t.shape, generator=gen, dtype=D) * 0.5
                t.copy_(value.abs() + 0.5 if "running_var" in name else value)
    return module


CASES = [
    # (timm module, channels, (H, W))
    (lambda: timm_ge(64), 64, (5, 7)),
    (lambda: timm_layers.create_attn("ge", 24, use_mlp=False), 24, (9, 4)),
    (lambda: timm_ge(32, extent=2), 32, (9, 7)),
    (lambda: timm_ge(20, extent=4, add_maxpool=True, rd_channels=3), 20, (13, 6)),
    (lambda: timm_ge(12, extent=6, use_mlp=False), 12, (11, 17)),
    (lambda: timm_ge(16, add_maxpool=True, act_layer=nn.GELU), 16, (3, 3)),
    (lambda: timm_ge(16, extra_params=True, extent=2), 16, (9, 7)),
    (lambda: timm_ge(24, extra_params=True, extent=8, rd_ratio=1 / 4), 24, (21, 10)),
    (lambda: timm_ge(8, extra_params=True, extent=4, norm=False, use_mlp=False), 8, (5, 8)),
    (lambda: timm_ge(16, extra_params=True, feat_size=(5, 7)), 16, (5, 7)),
    (lambda: timm_ge(16, extra_params=True, feat_size=4, gate_layer="hard_sigmoid"), 16, (4, 4)),
]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("training", [False, True])
def test_from_timm_matches_timm_in_float64(case, training):
    build, channels, size = CASES[case]
    theirs = randomised(build()).train(training)
    ours = from_timm(theirs)
    assert type(ours) is GatherExcite and ours.training == training
    x = torch.randn(3, channels, *size, dtype=D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-10, rtol=0)
    torch.testing.assert_close(ours.state_dict(), theirs.state_dict(), atol=1e-12, rtol=0)  # BN statistics


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"extent": 2}, {"extent": 4, "add_maxpool": True}, {"extra_params": True, "extent": 4}],
)
def test_create_has_the_keys_timm_means(kwargs):
    """attnzoo.create("ge", C, ...) holds exactly the weights timm's constructor means to build."""
    theirs = randomised(timm_ge(32, **kwargs)).eval()
    ours = attnzoo.create("ge", 32, dtype=D, **kwargs).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 32, 9, 11, dtype=D)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-10, rtol=0)


def test_global_convolution_spans_the_map_without_padding():
    """The paper's GE-theta with global extent: a depth-wise conv as large as the map gives one value."""
    m = randomised(GatherExcite(6, extra_params=True, feat_size=(3, 5), use_mlp=False)).eval()
    x = torch.randn(2, 6, 3, 5, dtype=D)
    conv, bn = m.gather.conv1, m.gather.norm1
    gathered = (x * conv.weight[:, 0]).sum((2, 3))  # (B, C)
    gathered = (gathered - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    out, gate = m(x, need_weights=True)
    torch.testing.assert_close(gate.flatten(1), torch.sigmoid(gathered))
    torch.testing.assert_close(out, x * torch.sigmoid(gathered)[:, :, None, None])
    with pytest.raises(ValueError, match=r"expects x of shape \(B, 6, 3, 5\)"):
        m(torch.randn(2, 6, 5, 5, dtype=D))


def test_pooling_gather_against_the_formula():
    m = GatherExcite(4, extent=2, use_mlp=False, dtype=D)
    x = torch.randn(2, 4, 5, 6, dtype=D)
    pooled = F.avg_pool2d(x, 3, 2, 1, count_include_pad=False)  # (B, C, 3, 3)
    gate = torch.sigmoid(pooled).repeat_interleave(2, -2).repeat_interleave(2, -1)[:, :, :5, :6]
    torch.testing.assert_close(m(x), x * gate)


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"extent": 3}, ValueError, "extent must be 0"),
        ({"extent": -2}, ValueError, "extent"),
        ({"extent": 6, "extra_params": True}, ValueError, "power of two"),
        ({"extra_params": True}, ValueError, "feat_size"),
        ({"extra_params": True, "feat_size": (3, 0)}, ValueError, "feat_size"),
        ({"extra_params": True, "feat_size": "7"}, TypeError, "feat_size"),
        ({"feat_size": "junk"}, TypeError, "feat_size"),  # checked where unused too
        ({"feat_size": (3.0, 3)}, TypeError, "feat_size"),
        ({"extent": 2, "extra_params": True, "feat_size": (0, 3)}, ValueError, "feat_size"),
        ({"norm_layer": "batchnorm"}, TypeError, "norm_layer"),
    ],
)
def test_bad_arguments(kwargs, error, words):
    with pytest.raises(error, match=words):
        GatherExcite(8, **kwargs)


def test_convert_dispatch_and_refusal():
    assert type(convert(timm_ge(16))) is GatherExcite
    broken = timm_ge(16, extra_params=True, extent=2)
    broken.gather.norm1.eps = "device"  # what timm 1.0.31's nn.BatchNorm2d(channels, *dd) would build
    with pytest.raises(TypeError, match="eps='device'"):
        from_timm(broken)


@pytest.mark.parametrize(
    "kwargs", [{"extent": 2, "add_maxpool": True}, {"extent": 4, "extra_params": True, "rd_channels": 2}]
)
def test_gradcheck_local_extents(kwargs):
    m = GatherExcite(4, dtype=D, **kwargs).eval()
    x = torch.randn(2, 4, 5, 6, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,))
