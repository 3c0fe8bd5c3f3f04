"""ParNet attention: parity with fightingcv's ParNetAttention in float64 (eval and train), the paper's
block (skip BatchNorm, no conv biases) against a plain reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _fightingcv import D, check_parity, randomised

from attnzoo import ParNetAttention

parnet = pytest.importorskip(
    "fightingcv_attention.attention.ParNetAttention", reason="fightingcv is needed for parity"
)

CASES = [(64, (3, 64, 7, 7)), (12, (2, 12, 5, 9)), (3, (2, 3, 1, 6)), (16, (4, 16, 8, 3))]


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_from_fightingcv_matches_parnet_attention(case, train):
    channels, shape = CASES[case]
    ours = check_parity(parnet.ParNetAttention(channels), shape, ParNetAttention, train=train)
    assert isinstance(ours.skip_norm, torch.nn.Identity) and ours.conv1x1[0].bias is not None


def test_paper_block_against_reference():
    ours = randomised(ParNetAttention(6)).eval()
    assert ours.conv1x1[0].bias is None and ours.conv3x3[0].bias is None
    x = torch.randn(2, 6, 5, 7, dtype=D)

    def bn(m, t):
        return F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)

    skip = bn(ours.skip_norm, x)
    gate = torch.sigmoid(F.conv2d(skip.mean((2, 3), keepdim=True), ours.se.weight, ours.se.bias))
    branch1 = bn(ours.conv1x1[1], F.conv2d(x, ours.conv1x1[0].weight))
    branch3 = bn(ours.conv3x3[1], F.conv2d(x, ours.conv3x3[0].weight, padding=1))
    out, weights = ours(x, need_weights=True)
    torch.testing.assert_close(out, F.silu(branch1 + branch3 + skip * gate), atol=1e-12, rtol=0)
    torch.testing.assert_close(weights, gate, atol=1e-15, rtol=0)  # the mean as a scaled sum
