"""Light CBAM (lcbam): parity with timm's LightCbamModule in float64, the formula, errors, weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnzoo
from attnzoo import LightCBAM
from attnzoo.convert import convert, from_timm

timm_layers = pytest.importorskip("timm.layers", reason="timm is needed for the parity tests")
from timm.layers.cbam import LightCbamModule  # noqa: E402

D = torch.float64


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
    (lambda: timm_layers.create_attn("lcbam", 64), 64, (5, 7)),
    (lambda: LightCbamModule(24, spatial_kernel_size=3, mlp_bias=True), 24, (9, 4)),
    (lambda: LightCbamModule(40, rd_ratio=1 / 4, rd_divisor=8, spatial_kernel_size=5), 40, (3, 11)),
    (lambda: LightCbamModule(12, rd_channels=5, act_layer=nn.SiLU, gate_layer="hard_sigmoid"), 12, (7, 7)),
    (lambda: LightCbamModule(16, spatial_kernel_size=1), 16, (1, 6)),
]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("training", [False, True])
def test_from_timm_matches_timm_in_float64(case, training):
    build, channels, size = CASES[case]
    theirs = randomised(build()).train(training)
    ours = from_timm(theirs)
    assert type(ours) is LightCBAM and ours.training == training
    x = torch.randn(3, channels, *size, dtype=D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-10, rtol=0)
    torch.testing.assert_close(ours.state_dict(), theirs.state_dict(), atol=1e-12, rtol=0)  # BN statistics


@pytest.mark.parametrize("channels", [64, 24, 100])
def test_create_builds_timms_configuration(channels):
    theirs = randomised(timm_layers.create_attn("lcbam", channels)).eval()
    ours = attnzoo.create("lcbam", channels, dtype=D).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, channels, 5, 3, dtype=D)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-10, rtol=0)
    assert type(convert(theirs)) is LightCBAM


def test_formula_and_weights():
    m = randomised(LightCBAM(6, rd_channels=3, kernel_size=3)).eval()
    x = torch.randn(2, 6, 4, 5, dtype=D)
    pooled = 0.5 * x.mean((2, 3)) + 0.5 * x.amax((2, 3))  # (B, C)
    hidden = F.relu(pooled @ m.channel.fc1.weight[:, :, 0, 0].T)
    gate_c = torch.sigmoid(hidden @ m.channel.fc2.weight[:, :, 0, 0].T)  # (B, C)
    y = x * gate_c[:, :, None, None]
    spatial = 0.5 * y.mean(1, keepdim=True) + 0.5 * y.amax(1, keepdim=True)
    bn = m.spatial.conv.bn
    logits = F.batch_norm(F.conv2d(spatial, m.spatial.conv.conv.weight, padding=1), bn.running_mean,
                          bn.running_var, bn.weight, bn.bias, eps=bn.eps)
    gate_s = torch.sigmoid(logits)  # (B, 1, H, W)
    out, weights = m(x, need_weights=True)
    torch.testing.assert_close(out, y * gate_s)
    torch.testing.assert_close(weights, gate_c[:, :, None, None] * gate_s)
    torch.testing.assert_close(x * weights, out)


def test_capture_records_both_gates():
    m = LightCBAM(8, kernel_size=3).eval()
    with attnzoo.capture_maps(m) as maps:
        m(torch.randn(2, 8, 4, 6))
    [records] = maps.values()
    assert [r.kind for r in records] == ["channel", "spatial"]
    assert records[0].data.shape == (2, 8) and records[1].data.shape == (2, 4, 6)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        LightCBAM(8, kernel_size=4)
    with pytest.raises(ValueError, match="rd_channels"):
        LightCBAM(8, rd_channels=0)
    with pytest.raises(ValueError, match=r"expects x of shape \(B, 8, H, W\)"):
        LightCBAM(8)(torch.randn(2, 7, 3, 3))
    with pytest.raises(TypeError, match="from_timm cannot convert LightCbamModule"):
        from_timm(LightCbamModule(8, spatial_kernel_size=4))
