"""SimAM: parity with fightingcv's SimAM (the official code) in float64, 1x1 maps, device/dtype keywords."""

from __future__ import annotations

import pytest
import torch
from _fightingcv import D, check_parity

import attnzoo
from attnzoo import SimAM

simam = pytest.importorskip("fightingcv_attention.attention.SimAM", reason="fightingcv is needed for parity")

CASES = [((), (3, 64, 7, 7)), ((12, 1e-3), (2, 12, 5, 9)), ((None, 0.5), (2, 3, 1, 6)), ((), (1, 5, 2, 1))]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_from_fightingcv_matches_simam(case):
    args, shape = CASES[case]
    ours = check_parity(simam.SimAM(*args), shape, SimAM)
    assert ours.channels is None and ours.e_lambda == (args[1] if args else 1e-4)


def test_single_position_gives_sigmoid_half():
    x = torch.randn(2, 4, 1, 1, dtype=D)
    out, gate = SimAM(4)(x, need_weights=True)
    torch.testing.assert_close(gate, torch.full_like(x, torch.sigmoid(torch.tensor(0.5, dtype=D)).item()))
    torch.testing.assert_close(out, x * gate)
    assert torch.isnan(simam.SimAM()(x)).all()  # the official code: 0 / 0


def test_vocabulary_keywords_allocate_nothing():
    module = attnzoo.create("simam", 64, device="meta", dtype=torch.float64)
    assert list(module.parameters()) == [] and list(module.buffers()) == []
    with pytest.raises(ValueError, match=r"expects x of shape \(B, 64, H, W\)"):
        module(torch.randn(2, 8, 3, 3))
    with pytest.raises(ValueError, match="e_lambda must be > 0"):
        SimAM(8, -1.0)
