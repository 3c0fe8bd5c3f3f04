"""attnzoo.replace(model, TimmClass) on timm's gates: every instance converted, the output unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import attnzoo

pytest.importorskip("timm.layers", reason="timm is needed to build the models")
from timm.layers.cbam import LightCbamModule  # noqa: E402
from timm.layers.eca import CecaModule, EcaModule  # noqa: E402
from timm.layers.gather_excite import GatherExcite  # noqa: E402
from timm.layers.global_context import GlobalContext  # noqa: E402
from timm.layers.squeeze_excite import EffectiveSEModule  # noqa: E402

D = torch.float64


def test_replace_converts_timm_gates_in_a_model():
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), EcaModule(16), CecaModule(16), EffectiveSEModule(16),
        GlobalContext(16, fuse_add=True), GatherExcite(16, extent=2, use_mlp=False),
        LightCbamModule(16, spatial_kernel_size=3),
    )
    gen = torch.Generator().manual_seed(0)
    model = model.to(D).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=D) * 0.5)
    x = torch.randn(2, 3, 7, 5, dtype=D)
    with torch.no_grad():
        before = model(x)
    for cls in (EcaModule, CecaModule, EffectiveSEModule, GlobalContext, GatherExcite, LightCbamModule):
        attnzoo.replace(model, cls)
    assert [type(m).__name__ for m in model[1:]] == [
        "EfficientChannelAttention", "CircularEfficientChannelAttention", "EffectiveSqueezeExcite",
        "GlobalContext", "GatherExcite", "LightCBAM",
    ]
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=1e-10, rtol=0)
