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


@pytest.mark.parametrize("sum_axes", [False, True])
def test_captured_rows_compose_the_two_passes(sum_axes):
    """Stacked: position (i', j') reaches query (i, j) through row key (i, j') of the W pass, which
    took it from column j' in the H pass; summed: half of each pass's weights. Rows sum to 1."""
    import attnzoo

    m = AxialAttention(16, num_heads=2, sum_axes=sum_axes).double().eval()
    randomize(m)
    x = torch.randn(2, 5, 7, 16, dtype=torch.float64)
    expected, w = m(x, need_weights=True)  # (B, h, H, W, H + W)
    with attnzoo.capture_maps(m) as maps:
        y = m(x)
    (entry,) = [r for records in maps.values() for r in records]
    assert entry.kind == "rows" and entry.grid == (5, 7) and entry.query_grid == (5, 7)
    count = len(entry.queries)
    assert tuple(entry.data.shape) == (2, 1, count, 35)
    col, row = w[..., :5].mean(1), w[..., 5:].mean(1)  # (B, H, W, H), (B, H, W, W)
    for n, q in enumerate(entry.queries.tolist()):
        i, j = divmod(q, 7)
        if sum_axes:
            ref = torch.zeros(2, 5, 7, dtype=torch.float64)
            ref[:, :, j] += 0.5 * col[:, i, j]
            ref[:, i, :] += 0.5 * row[:, i, j]
        else:
            ref = col[:, i].transpose(1, 2) * row[:, i, j][:, None, :]  # (B, H, W): [i', j']
        torch.testing.assert_close(entry.data[:, 0, n], ref.flatten(1))
    torch.testing.assert_close(entry.data.sum(-1), torch.ones(2, 1, count, dtype=torch.float64))
    torch.testing.assert_close(y, expected)
