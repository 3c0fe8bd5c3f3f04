"""Shuffle attention: parity with fightingcv's ShuffleAttention in float64, the official defaults, the
weights, errors."""

from __future__ import annotations

import pytest
import torch
from _fightingcv import D, check_parity

import attnzoo
from attnzoo import ShuffleAttention

sa = pytest.importorskip(
    "fightingcv_attention.attention.ShuffleAttention", reason="fightingcv is needed for parity"
)

CASES = [
    ({"channel": 64, "G": 8}, (3, 64, 7, 7)),
    ({"channel": 48, "reduction": 4, "G": 4}, (2, 48, 5, 9)),
    ({"channel": 6, "G": 3}, (2, 6, 3, 1)),
    ({"channel": 32, "G": 1}, (1, 32, 4, 5)),
    ({"channel": 12, "G": 4}, (2, 12, 5, 3)),  # three channels per group: fightingcv splits 2 + 1
    ({"channel": 6, "G": 2}, (2, 6, 1, 7)),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_from_fightingcv_matches_shuffle_attention(case):
    kwargs, shape = CASES[case]
    ours = check_parity(sa.ShuffleAttention(**kwargs), shape, ShuffleAttention)
    assert ours.groups == kwargs["G"]


def test_defaults_and_weights():
    assert ShuffleAttention(256).groups == 64
    assert ShuffleAttention(64).groups == 32
    assert ShuffleAttention(24).groups == 4
    ours = ShuffleAttention(16, 2, dtype=D)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_()
    x = torch.randn(2, 16, 5, 3, dtype=D)
    out, weights = ours(x, need_weights=True)
    shuffled = (x * weights).reshape(2, 2, 8, 5, 3).transpose(1, 2).reshape(2, 16, 5, 3)
    torch.testing.assert_close(out, shuffled, atol=1e-12, rtol=0)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="channels=5 must be divisible by 2"):
        ShuffleAttention(5)
    with pytest.raises(ValueError, match=r"channels=12 must be divisible by 2 \* groups = 8"):
        ShuffleAttention(12, 4)


def test_fightingcv_configurations_that_cannot_run_are_refused():
    theirs = sa.ShuffleAttention(channel=10, G=2)  # groups of 5 channels: 3 + 2 against 2 weights
    with pytest.raises(RuntimeError):
        theirs(torch.randn(1, 10, 3, 3))
    with pytest.raises(TypeError, match="cannot convert ShuffleAttention: .*channels=10 must be divisible"):
        attnzoo.convert.from_fightingcv(theirs)
