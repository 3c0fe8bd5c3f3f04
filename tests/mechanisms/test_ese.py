"""Effective Squeeze-Excitation (ese): parity with timm's EffectiveSEModule in float64, errors, weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import attnzoo
from attnzoo import EffectiveSqueezeExcite
from attnzoo.convert import convert, from_timm

timm_layers = pytest.importorskip("timm.layers", reason="timm is needed for the parity tests")
from timm.layers.squeeze_excite import EffectiveSEModule  # noqa: E402

D = torch.float64


def randomised(module: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    module = module.to(D)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=D) * 0.5)
    return module


CASES = [
    (lambda: timm_layers.create_attn("ese", 64), 64, (5, 7)),
    (lambda: EffectiveSEModule(13, add_maxpool=True), 13, (9, 4)),
    (lambda: EffectiveSEModule(7, gate_layer="sigmoid"), 7, (1, 3)),
    (lambda: EffectiveSEModule(24, add_maxpool=True, gate_layer=nn.Tanh), 24, (3, 11)),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_from_timm_matches_timm_in_float64(case):
    build, channels, size = CASES[case]
    theirs = randomised(build()).eval()
    ours = from_timm(theirs)
    assert type(ours) is EffectiveSqueezeExcite and ours.add_maxpool == theirs.add_maxpool
    x = torch.randn(3, channels, *size, dtype=D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-10, rtol=0)


def test_create_matches_timm_create_attn():
    theirs = randomised(timm_layers.create_attn("ese", 32)).eval()
    ours = attnzoo.create("ese", 32, dtype=D).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 32, 5, 3, dtype=D)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-10, rtol=0)
    assert type(convert(theirs)) is EffectiveSqueezeExcite


def test_gate_against_the_formula():
    m = EffectiveSqueezeExcite(6, add_maxpool=True, dtype=D)
    x = torch.randn(2, 6, 4, 5, dtype=D)
    pooled = 0.5 * x.mean((2, 3)) + 0.5 * x.flatten(2).max(-1).values
    gate = (pooled @ m.fc.weight[:, :, 0, 0].T + m.fc.bias).div(6).add(0.5).clamp(0, 1)
    out, weights = m(x, need_weights=True)
    torch.testing.assert_close(weights, gate)
    torch.testing.assert_close(out, x * gate[:, :, None, None])


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"expects x of shape \(B, 6, H, W\)"):
        EffectiveSqueezeExcite(6)(torch.randn(2, 5, 3, 3))
    with pytest.raises(TypeError, match="gate_layer"):
        EffectiveSqueezeExcite(6, gate_layer="hard_sigmoid")
    with pytest.raises(ValueError, match="channels"):
        EffectiveSqueezeExcite(0)


def test_from_timm_refuses_a_replaced_fc():
    theirs = EffectiveSEModule(8)
    theirs.fc = nn.Conv2d(8, 8, 3, padding=1)
    with pytest.raises(TypeError, match="fc"):
        from_timm(theirs)


def test_default_gate_has_a_double_backward_and_matches_hardsigmoid():
    m = EffectiveSqueezeExcite(4, dtype=D)
    z = torch.linspace(-5, 5, 41, dtype=D)
    torch.testing.assert_close(m.gate(z), nn.functional.hardsigmoid(z), atol=1e-15, rtol=0)
    x = torch.randn(1, 4, 3, 2, dtype=D, requires_grad=True)
    assert torch.autograd.gradgradcheck(m, (x,))
    converted = from_timm(timm_layers.create_attn("ese", 4))
    assert type(converted.gate).__name__ == "HardSigmoid"
