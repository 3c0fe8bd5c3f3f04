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


def fcv_mask(b: int, h: int, nq: int, nk: int, seed: int) -> torch.Tensor:
    """fightingcv's mask (True = masked), every query keeping at least one key (else fightingcv's NaN)."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, h, nq, nk, generator=gen) > 0.6
    mask[..., 0] = False
    return mask


SDPA_CONFIGS = [(16, 4, 4, 4, 7, 7), (12, 5, 3, 2, 6, 9), (8, 8, 8, 1, 1, 3), (10, 3, 7, 3, 5, 5)]


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(("d_model", "d_k", "d_v", "h", "nq", "nk"), SDPA_CONFIGS)
def test_sdpa_matches_fightingcv(d_model, d_k, d_v, h, nq, nk, masked, train):
    from fightingcv_attention.attention.SelfAttention import ScaledDotProductAttention

    theirs = randomise(ScaledDotProductAttention(d_model, d_k, d_v, h, dropout=0.0), d_model + h).train(train)
    ours = from_fightingcv(theirs)
    assert type(ours) is attnzoo.MultiHeadAttention and (ours.head_dim, ours.value_head_dim) == (d_k, d_v)
    assert ours.training == train
    q = torch.randn(2, nq, d_model, dtype=torch.float64)
    k, v = (torch.randn(2, nk, d_model, dtype=torch.float64) for _ in range(2))
    mask = fcv_mask(2, h, nq, nk, nq + nk) if masked else None
    expected = theirs(q, k, v, attention_mask=mask)
    torch.testing.assert_close(ours(q, k, v, mask=None if mask is None else ~mask), expected, **TOL)
    if nq == nk and not masked:  # self-attention: the fused one-GEMM path
        torch.testing.assert_close(ours(q), theirs(q, q, q), **TOL)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(("d_model", "h", "nq", "nk"), [(16, 4, 7, 7), (12, 3, 5, 9), (6, 1, 1, 4)])
def test_simplified_sdpa_matches_fightingcv(d_model, h, nq, nk, masked):
    from fightingcv_attention.attention.SimplifiedSelfAttention import SimplifiedScaledDotProductAttention

    theirs = randomise(SimplifiedScaledDotProductAttention(d_model, h, dropout=0.0), d_model).eval()
    ours = from_fightingcv(theirs)
    q = torch.randn(2, nq, d_model, dtype=torch.float64)
    k, v = (torch.randn(2, nk, d_model, dtype=torch.float64) for _ in range(2))
    mask = fcv_mask(2, h, nq, nk, nq) if masked else None
    expected = theirs(q, k, v, attention_mask=mask)
    torch.testing.assert_close(ours(q, k, v, mask=None if mask is None else ~mask), expected, **TOL)
    bad = SimplifiedScaledDotProductAttention(10, 3)
    with pytest.raises(TypeError, match="not divisible by h=3"):
        from_fightingcv(bad)


def test_mha_head_widths_are_backward_compatible():
    plain = attnzoo.MultiHeadAttention(12, 3)
    assert plain.head_dim == plain.value_head_dim == 4 and plain.Wq.weight.shape == (12, 12)
    wide = attnzoo.MultiHeadAttention(10, 3, head_dim=5, value_head_dim=2)  # 3 does not divide 10
    assert wide.Wq.weight.shape == (15, 10) and wide.Wv.weight.shape == (6, 10)
    assert wide.fc.weight.shape == (10, 6)
    out, weights = wide(torch.randn(2, 4, 10), need_weights=True)
    assert out.shape == (2, 4, 10) and weights.shape == (2, 3, 4, 4)
    with pytest.raises(ValueError, match="dim=10 must be divisible by num_heads=3"):
        attnzoo.MultiHeadAttention(10, 3)
