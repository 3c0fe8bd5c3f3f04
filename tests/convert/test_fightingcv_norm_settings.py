"""Converted fightingcv modules keep the source's norm settings (eps, momentum), which no state_dict holds."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attnzoo.convert import from_fightingcv

WHY = "fightingcv_attention is not installed"
pytest.importorskip("fightingcv_attention", reason=WHY)


def _parnet():
    from fightingcv_attention.attention.ParNetAttention import ParNetAttention

    return ParNetAttention(24), (2, 24, 7, 9)


def _triplet():
    from fightingcv_attention.attention.TripletAttention import TripletAttention

    return TripletAttention(), (2, 8, 7, 9)


def _bam():
    from fightingcv_attention.attention.BAM import BAMBlock

    return BAMBlock(channel=32, reduction=4, dia_val=1), (2, 32, 8, 8)


def _mobilevit():
    from fightingcv_attention.attention.MobileViTAttention import MobileViTAttention

    return MobileViTAttention(in_channel=8, dim=64, kernel_size=3, patch_size=7), (2, 8, 14, 14)


def _running(module: nn.Module) -> list[torch.Tensor]:
    return [t for name, t in module.state_dict().items() if "running" in name]


@pytest.mark.parametrize("make", [_parnet, _triplet, _bam, _mobilevit], ids=lambda f: f.__name__[1:])
def test_non_default_eps_and_momentum_carry_over(make):
    torch.manual_seed(0)
    source, shape = make()
    source = source.double()
    norms = [m for m in source.modules() if isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm))]
    assert norms, "the source has norm layers to check"
    for norm in norms:
        norm.eps = 0.3
        if isinstance(norm, nn.modules.batchnorm._NormBase):
            norm.momentum = 0.5
    converted = from_fightingcv(source)
    x = torch.randn(shape, dtype=torch.float64)
    for training in (False, True):  # training also moves the running statistics
        source.train(training)
        converted.train(training)
        torch.testing.assert_close(converted(x), source(x), atol=1e-10, rtol=0)
    for ours, theirs in zip(_running(converted), _running(source), strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=0)


def test_norm_layers_that_do_not_pair_are_refused():
    from attnzoo.convert._timm_common import copy_norm_settings

    source = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    target = nn.Sequential(nn.Conv2d(4, 4, 1), nn.LayerNorm(4))
    unpaired = r"norm layers \['BatchNorm2d'\] do not pair with attnzoo's \['LayerNorm'\]"
    with pytest.raises(TypeError, match=unpaired):
        copy_norm_settings(source, target, "from_fightingcv")
    instance = nn.Sequential(nn.Conv2d(4, 4, 1), nn.InstanceNorm2d(4))  # a _NormBase too, not a BatchNorm
    with pytest.raises(TypeError, match=r"cannot convert Sequential: its norm layers \['BatchNorm2d'\]"):
        copy_norm_settings(source, instance, "from_fightingcv")
