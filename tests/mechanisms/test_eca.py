"""ECA family (eca, ceca, ecam): parity with timm's EcaModule / CecaModule in float64, errors, maps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnzoo
from attnzoo import CircularEfficientChannelAttention, EfficientChannelAttention, EfficientChannelAttentionMlp
from attnzoo.convert import convert, from_timm

timm_layers = pytest.importorskip("timm.layers", reason="timm is needed for the parity tests")
from timm.layers.eca import CecaModule, EcaModule  # noqa: E402

D = torch.float64


def randomised(module: nn.Module, seed: int = 0) -> nn.Module:
    """``module`` in float64 with every parameter drawn from N(0, 1) (timm's inits give trivial gates)."""
    gen = torch.Generator().manual_seed(seed)
    module = module.to(D)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=D))
    return module


def check_parity(theirs: nn.Module, channels: int, size: tuple[int, int], expected: type) -> nn.Module:
    theirs = randomised(theirs).eval()
    ours = from_timm(theirs)
    assert type(ours) is expected
    x = torch.randn(3, channels, *size, dtype=D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-10, rtol=0)
    return ours


CASES = [
    # (timm module, channels of the input, (H, W), attnzoo class)
    (lambda: timm_layers.create_attn("eca", 64), 64, (5, 7), EfficientChannelAttention),
    (lambda: timm_layers.create_attn("eca", 512), 512, (3, 1), EfficientChannelAttention),  # k = 5
    (lambda: EcaModule(None, kernel_size=7), 12, (9, 4), EfficientChannelAttention),
    (lambda: EcaModule(64, gamma=1, gate_layer="hard_sigmoid"), 64, (1, 1), EfficientChannelAttention),
    (lambda: timm_layers.create_attn("ceca", 64), 64, (5, 7), CircularEfficientChannelAttention),
    (lambda: CecaModule(None, kernel_size=5), 6, (7, 3), CircularEfficientChannelAttention),
    (lambda: CecaModule(40, act_layer=nn.ReLU), 40, (4, 5), CircularEfficientChannelAttention),  # bias
    (lambda: timm_layers.create_attn("ecam", 64), 64, (5, 7), EfficientChannelAttentionMlp),
    (lambda: EcaModule(96, use_mlp=True, rd_channels=5, gamma=1), 96, (3, 5), EfficientChannelAttentionMlp),
    (
        lambda: EcaModule(24, use_mlp=True, rd_ratio=0.5, act_layer=nn.GELU),
        24, (6, 1), EfficientChannelAttentionMlp,
    ),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_from_timm_matches_timm_in_float64(case):
    build, channels, size, expected = CASES[case]
    check_parity(build(), channels, size, expected)


@pytest.mark.parametrize(
    ("name", "channels"), [("eca", 64), ("eca", 1000), ("ceca", 256), ("ecam", 64), ("ecam", 200)]
)
def test_create_builds_timms_configuration(name, channels):
    """attnzoo.create(name, C) has the shapes of timm's create_attn(name, C): its weights load strictly."""
    theirs = randomised(timm_layers.create_attn(name, channels)).eval()
    ours = attnzoo.create(name, channels, dtype=D).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, channels, 5, 3, dtype=D)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-10, rtol=0)


def test_convert_dispatches_and_keeps_device_dtype_and_mode():
    theirs = timm_layers.create_attn("eca", 32).to(D).train()
    ours = convert(theirs)
    assert isinstance(ours, EfficientChannelAttention) and ours.training
    assert ours.conv.weight.dtype == D
    # A converted ECA accepts any channel count, as timm's does.
    x = torch.randn(2, 5, 3, 3, dtype=D)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-12, rtol=0)


def test_circular_kernel_wider_than_the_channels_wraps_around():
    """Reference: the circular convolution written as a sum over taps, indices modulo C."""
    m = CircularEfficientChannelAttention(3, kernel_size=7, dtype=D)
    x = torch.randn(2, 3, 4, 5, dtype=D)
    s = x.mean((2, 3))  # (B, C)
    w = m.conv.weight[0, 0]  # (k,)
    logits = sum(w[j] * torch.roll(s, shifts=3 - j, dims=1) for j in range(7))  # s[(c + j - 3) % C]
    out, gate = m(x, need_weights=True)
    torch.testing.assert_close(gate, torch.sigmoid(logits), atol=1e-12, rtol=0)
    torch.testing.assert_close(out, x * gate[:, :, None, None], atol=1e-12, rtol=0)


def test_zero_padded_gate_against_conv1d():
    m = EfficientChannelAttention(10, kernel_size=5, dtype=D)
    x = torch.randn(2, 10, 3, 4, dtype=D)
    gate = torch.sigmoid(F.conv1d(x.mean((2, 3))[:, None], m.conv.weight, padding=2))[:, 0]
    out, weights = m(x, need_weights=True)
    torch.testing.assert_close(weights, gate)
    torch.testing.assert_close(out, x * gate[:, :, None, None])


@pytest.mark.parametrize(
    ("channels", "kernel"), [(1, 3), (4, 3), (16, 3), (64, 3), (128, 5), (1024, 5), (8192, 7), (2**20, 11)]
)
def test_adaptive_kernel_size(channels, kernel):
    assert EfficientChannelAttention(channels, device="meta").kernel_size == kernel


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"kernel_size": 4}, ValueError, "kernel_size must be odd"),
        ({"kernel_size": 0}, ValueError, "kernel_size"),
        ({"gamma": 0.0}, ValueError, "gamma must be > 0"),
        ({"beta": float("inf")}, ValueError, "beta must be (a )?finite"),
        ({"gate_layer": "sigmoid"}, TypeError, "gate_layer"),
    ],
)
def test_bad_arguments(kwargs, error, words):
    with pytest.raises(error, match=words):
        EfficientChannelAttention(8, **kwargs)


def test_mlp_bad_width():
    with pytest.raises(ValueError, match="rd_channels"):
        EfficientChannelAttentionMlp(8, rd_channels=0)
    with pytest.raises(TypeError, match="act_layer"):
        EfficientChannelAttentionMlp(8, act_layer=None)


def test_wrong_channels_message():
    with pytest.raises(ValueError, match=r"expects x of shape \(B, 8, H, W\)"):
        EfficientChannelAttention(8)(torch.randn(1, 4, 3, 3))


def test_from_timm_refuses_unknown_classes():
    with pytest.raises(TypeError, match="cannot convert torch.nn.modules.linear.Linear"):
        from_timm(nn.Linear(2, 2))


def test_capture_records_the_channel_gate():
    m = EfficientChannelAttentionMlp(16).eval()
    x = torch.randn(2, 16, 4, 4)
    with attnzoo.capture_maps(m) as maps:
        _, gate = m(x, need_weights=True)
    [record] = maps[""] if "" in maps else maps["EfficientChannelAttentionMlp"]
    assert record.kind == "channel"
    torch.testing.assert_close(record.data, gate)
