"""BAM: parity with fightingcv's BAMBlock in float64 (eval and train), the paper's defaults, errors."""

from __future__ import annotations

import pytest
import torch
from _fightingcv import D, check_parity
from torch import nn

import attnzoo
from attnzoo import BottleneckAttentionModule

bam = pytest.importorskip("fightingcv_attention.attention.BAM", reason="fightingcv is needed for parity")

CASES = [
    # (BAMBlock kwargs, input shape): dia_val=1 runs on any size, dia_val=2 only where the map shrinks to 1x1
    ({"channel": 32, "reduction": 4, "dia_val": 1}, (3, 32, 5, 9)),
    ({"channel": 24, "reduction": 3, "dia_val": 1}, (2, 24, 7, 3)),
    ({"channel": 40, "reduction": 8, "dia_val": 2}, (4, 40, 7, 7)),
    ({"channel": 16, "reduction": 16, "dia_val": 1}, (2, 16, 1, 4)),
]


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_from_fightingcv_matches_bamblock(case, train):
    kwargs, shape = CASES[case]
    ours = check_parity(bam.BAMBlock(**kwargs), shape, BottleneckAttentionModule, train=train)
    assert ours.padding == 1 and ours.num_dilated == 3


def test_fightingcv_crash_is_a_value_error_here():
    theirs = bam.BAMBlock(channel=16, reduction=4, dia_val=2).eval()
    x = torch.randn(2, 16, 9, 9)
    with pytest.raises(RuntimeError):
        theirs(x)  # the dilated convolutions shrink 9 -> 3, which expand_as cannot broadcast
    ours = attnzoo.convert.from_fightingcv(theirs)
    with pytest.raises(ValueError, match="padding=1 with dilation=2 turns H=9 into 3"):
        ours(x)


class PaperBAM(nn.Module):
    """The paper's BAM step by step (the official code's layers, summed branches)."""

    def __init__(self, ours: BottleneckAttentionModule) -> None:
        super().__init__()
        self.ours = ours

    def forward(self, x):
        c, s = self.ours.channel_gate, self.ours.spatial_gate
        mc = c.fc_out(torch.relu(c.bn0(c.fc0(x.mean((2, 3))))))[:, :, None, None]
        h = torch.relu(s.bn_reduce(s.reduce(x)))
        for i in range(2):
            conv = getattr(s, f"conv{i}")
            assert conv.dilation == (4, 4) and conv.padding == (4, 4)
            h = torch.relu(getattr(s, f"bn{i}")(conv(h)))
        ms = s.conv_out(h)
        return x * (1 + torch.sigmoid(mc + ms)), mc, ms


def test_defaults_follow_the_paper_and_product_the_official_code():
    ours = BottleneckAttentionModule(32, dtype=D).eval()
    assert ours.rd_channels == 2
    x = torch.randn(2, 32, 11, 6, dtype=D)
    expected, mc, ms = PaperBAM(ours)(x)
    out, weights = ours(x, need_weights=True)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(out, x * (1 + weights), atol=1e-12, rtol=0)
    product = BottleneckAttentionModule(32, combine="product", dtype=D).eval()
    product.load_state_dict(ours.state_dict())
    torch.testing.assert_close(product(x), x * (1 + torch.sigmoid(mc * ms)), atol=1e-12, rtol=0)


def test_errors_name_the_argument():
    assert BottleneckAttentionModule(8).rd_channels == 1  # the official code: zero-width layers
    with pytest.raises(ValueError, match="reduction must be >= 1"):
        BottleneckAttentionModule(8, 0)
    with pytest.raises(ValueError, match="combine must be one of"):
        BottleneckAttentionModule(32, combine="mean")
    with pytest.raises(ValueError, match=r"expects x of shape \(B, 32, H, W\)"):
        BottleneckAttentionModule(32)(torch.randn(2, 16, 5, 5))
