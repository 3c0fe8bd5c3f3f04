"""fightingcv token mixers (group A) against the real fightingcv classes, float64 within 1e-10."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.convert import from_fightingcv

fcv = pytest.importorskip("fightingcv_attention.attention", reason="fightingcv-attention is not installed")

TOL = {"atol": 1e-10, "rtol": 1e-10}


def randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """float64 copy with every parameter random (fightingcv's init is std 0.001: too tame to test)."""
    gen = torch.Generator().manual_seed(seed)
    module = module.double()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
    return module


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize(("dim", "slots", "n"), [(16, 8, 7), (12, 64, 49), (5, 3, 1)])
def test_external_matches_fightingcv(dim, slots, n, train):
    from fightingcv_attention.attention.ExternalAttention import ExternalAttention

    theirs = randomise(ExternalAttention(dim, S=slots), dim + slots).train(train)
    ours = from_fightingcv(theirs)
    assert isinstance(ours, attnzoo.ExternalAttention) and ours.training == train
    x = torch.randn(3, n, dim, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x), **TOL)
    out, weights = ours(x, need_weights=True)
    assert weights.shape == (3, n, slots)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, n, dtype=torch.float64), **TOL)
    torch.testing.assert_close(out, weights @ ours.mv.weight.T, **TOL)


def test_external_eps_and_errors():
    ea = attnzoo.create("external", 8, memory_size=4)
    assert ea.eps == 1e-9
    with pytest.raises(ValueError, match="x of shape"):
        ea(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="memory_size"):
        attnzoo.ExternalAttention(8, memory_size=0)
