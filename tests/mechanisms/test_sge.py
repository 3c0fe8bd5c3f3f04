"""SGE: parity with fightingcv's SpatialGroupEnhance in float64, the official initialisation, the
1x1-map and constant-input cases where the official code gives NaN, errors."""

from __future__ import annotations

import pytest
import torch
from _fightingcv import D, check_parity

from attnzoo import SpatialGroupEnhance

sge = pytest.importorskip("fightingcv_attention.attention.SGE", reason="fightingcv is needed for parity")

CASES = [(8, (3, 64, 7, 7)), (4, (2, 12, 5, 9)), (3, (2, 3, 1, 6)), (16, (1, 32, 3, 1)), (1, (2, 5, 4, 3))]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_from_fightingcv_matches_spatial_group_enhance(case):
    groups, shape = CASES[case]
    ours = check_parity(sge.SpatialGroupEnhance(groups), shape, SpatialGroupEnhance)
    assert ours.groups == groups and ours.channels is None


def official(x, weight, bias, groups):
    """The official forward step by step (unbiased std + 1e-5)."""
    b, c, h, w = x.shape
    xg = x.reshape(b * groups, -1, h, w)
    t = (xg * xg.mean((2, 3), keepdim=True)).sum(1).reshape(b * groups, -1)
    t = t - t.mean(1, keepdim=True)
    t = (t / (t.std(1, keepdim=True) + 1e-5)).reshape(b, groups, h, w) * weight + bias
    return (xg * torch.sigmoid(t.reshape(b * groups, 1, h, w))).reshape(b, c, h, w)


def test_official_initialisation_and_default_groups():
    ours = SpatialGroupEnhance(128, dtype=D)
    assert ours.groups == 64 and torch.equal(ours.bias, torch.ones(1, 64, 1, 1, dtype=D))
    assert SpatialGroupEnhance(48).groups == 16
    with torch.no_grad():
        ours.weight.normal_()
        ours.bias.normal_()
    x = torch.randn(2, 128, 6, 5, dtype=D)
    out, gate = ours(x, need_weights=True)
    torch.testing.assert_close(out, official(x, ours.weight, ours.bias, 64), atol=1e-12, rtol=0)
    assert gate.shape == (2, 64, 6, 5)


def test_single_position_and_constant_maps_are_finite():
    ours = SpatialGroupEnhance(8, 4, dtype=D)
    x = torch.randn(2, 8, 1, 1, dtype=D)
    out, gate = ours(x, need_weights=True)
    torch.testing.assert_close(gate, torch.sigmoid(ours.bias).expand(2, 4, 1, 1))
    with pytest.warns(UserWarning, match="degrees of freedom"):
        assert torch.isnan(sge.SpatialGroupEnhance(4).double()(x)).all()  # fightingcv: 0 / NaN
    xc = torch.ones(2, 8, 3, 3, dtype=D, requires_grad=True)
    ours(xc).sum().backward()
    assert torch.isfinite(xc.grad).all()


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="channels=12 must be divisible by groups=8"):
        SpatialGroupEnhance(12, 8)
    with pytest.raises(ValueError, match=r"expects x of shape \(B, 16, H, W\)"):
        SpatialGroupEnhance(16)(torch.randn(2, 8, 3, 3))
