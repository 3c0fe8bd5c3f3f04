"""Triplet attention: parity with fightingcv's TripletAttention (the official code) in float64, eval and
train, with and without the spatial branch; other kernel sizes against a permuting reference."""

from __future__ import annotations

import pytest
import torch
from _fightingcv import D, check_parity, randomised

from attnzoo import TripletAttention

triplet = pytest.importorskip(
    "fightingcv_attention.attention.TripletAttention", reason="fightingcv is needed for parity"
)

CASES = [(False, (3, 64, 7, 7)), (False, (2, 12, 5, 9)), (True, (2, 3, 1, 6)), (True, (4, 16, 8, 3))]


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_from_fightingcv_matches_triplet_attention(case, train):
    no_spatial, shape = CASES[case]
    ours = check_parity(triplet.TripletAttention(no_spatial), shape, TripletAttention, train=train)
    assert ours.no_spatial == no_spatial and ours.channels is None


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_other_kernel_sizes_match_the_permuting_reference(kernel_size):
    theirs = triplet.TripletAttention()
    for name in ("cw", "hc", "hw"):
        conv = triplet.BasicConv(2, 1, kernel_size, padding=(kernel_size - 1) // 2, relu=False)
        getattr(theirs, name).conv = conv
    theirs = randomised(theirs).eval()
    ours = TripletAttention(10, kernel_size, dtype=D).eval()
    ours.load_state_dict({k.replace("conv.conv", "conv").replace("conv.bn", "bn"): v
                          for k, v in theirs.state_dict().items()})
    x = torch.randn(2, 10, 6, 11, dtype=D)
    out, weights = ours(x, need_weights=True)
    with torch.no_grad():
        torch.testing.assert_close(out, theirs(x), atol=1e-10, rtol=0)
    torch.testing.assert_close(out, x * weights, atol=1e-12, rtol=0)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        TripletAttention(8, 4)
    with pytest.raises(ValueError, match=r"expects x of shape \(B, 8, H, W\)"):
        TripletAttention(8)(torch.randn(2, 4, 3, 3))


def test_replace_swaps_fightingcv_modules_in_a_model_with_their_weights():
    from torch import nn

    import attnzoo

    gate = randomised(triplet.TripletAttention()).float()
    model = nn.Sequential(nn.Conv2d(3, 8, 3), gate, nn.ReLU()).eval()
    x = torch.randn(2, 3, 9, 7)
    with torch.no_grad():
        expected = model(x)
    assert attnzoo.replace(model, triplet.TripletAttention) == ["1"]
    assert isinstance(model[1], TripletAttention)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
