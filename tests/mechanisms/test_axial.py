"""Axial attention: fightingcv parity in float64 (sum and stacked), weights, refusals, errors."""

from __future__ import annotations

import pytest
import torch

from attnzoo import AxialAttention
from attnzoo.convert import from_fightingcv

fcv = pytest.importorskip("fightingcv_attention.attention.Axial_attention", reason="fightingcv missing")


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)


CONFIGS = [  # dim, heads, dim_heads, sum_axial_out, H, W
    (16, 2, None, True, 5, 7),
    (16, 2, None, False, 5, 7),
    (24, 3, 5, True, 7, 3),
    (12, 1, None, False, 1, 6),
    (32, 8, None, True, 6, 1),
]


@pytest.mark.parametrize("dim,heads,dim_heads,sum_out,height,width", CONFIGS)
@pytest.mark.parametrize("train", [False, True])
def test_matches_fightingcv_float64(dim, heads, dim_heads, sum_out, height, width, train):
    torch.manual_seed(0)
    theirs = fcv.AxialAttention(dim, heads=heads, dim_heads=dim_heads, sum_axial_out=sum_out)
    theirs = theirs.double().train(train)
    randomize(theirs)
    ours = from_fightingcv(theirs)
    assert isinstance(ours, AxialAttention) and ours.training == train and ours.sum_axes == sum_out
    x = torch.randn(2, height, width, dim, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-10, rtol=1e-10)


def test_weights_follow_the_axes():
    torch.manual_seed(0)
    axial = AxialAttention(8, num_heads=2, sum_axes=True).double()
    x = torch.randn(2, 4, 5, 8, dtype=torch.float64)
    out, weights = axial(x, need_weights=True)
    assert weights.shape == (2, 2, 4, 5, 9)
    torch.testing.assert_close(out, axial(x))
    ones = torch.ones(2, 2, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(weights[..., :4].sum(-1), ones)
    torch.testing.assert_close(weights[..., 4:].sum(-1), ones)
    # column (0, 3) by hand: softmax over the four positions (k, 3) of the H pass
    q = axial.attn_h.q(x[:, :, 3]).reshape(2, 4, 2, 4).transpose(1, 2)  # (B, h, H, e)
    k = axial.attn_h.kv(x[:, :, 3])[..., :8].reshape(2, 4, 2, 4).transpose(1, 2)
    expected = (q @ k.transpose(-1, -2) / 2.0).softmax(-1)  # (B, h, H, H)
    torch.testing.assert_close(weights[:, :, :, 3, :4], expected)


def test_refusals_options_and_errors():
    with pytest.raises(TypeError, match="dim_index=1"):
        from_fightingcv(fcv.AxialAttention(8, heads=2, dim_index=1))
    with pytest.raises(TypeError, match="num_dimensions=3"):
        from_fightingcv(fcv.AxialAttention(8, num_dimensions=3, heads=2))
    assert AxialAttention(24, num_heads=3, head_dim=5).attn_w.q.out_features == 15
    meta = AxialAttention(16, device="meta", dtype=torch.float64)
    assert all(p.is_meta and p.dtype == torch.float64 for p in meta.parameters())
    with pytest.raises(ValueError, match="num_heads=5"):
        AxialAttention(16, num_heads=5)
    with pytest.raises(ValueError, match=r"\(B, H, W, 16\)"):
        AxialAttention(16)(torch.randn(1, 16, 3, 3))
