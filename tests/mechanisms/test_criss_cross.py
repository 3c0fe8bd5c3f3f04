"""Criss-cross attention: fightingcv parity in float64, the mask on the centre, weights, errors."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo import CrissCrossAttention
from attnzoo.convert import from_fightingcv

fcv = pytest.importorskip("fightingcv_attention.attention.CrissCrossAttention", reason="fightingcv missing")


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)


def reference(module: CrissCrossAttention, x: torch.Tensor) -> torch.Tensor:
    """Dense check: each position's softmax over its row and column (centre once), by loops."""
    q, k, v = module.query_conv(x), module.key_conv(x), module.value_conv(x)
    _, _, height, width = x.shape
    out = torch.empty_like(x)
    for i in range(height):
        for j in range(width):
            keys = [(a, j) for a in range(height) if a != i] + [(i, b) for b in range(width)]
            kk = torch.stack([k[:, :, a, b] for a, b in keys], -1)  # (B, c', P)
            vv = torch.stack([v[:, :, a, b] for a, b in keys], -1)  # (B, C, P)
            w = torch.einsum("bc,bcp->bp", q[:, :, i, j], kk).softmax(-1)
            out[:, :, i, j] = torch.einsum("bp,bcp->bc", w, vv)
    return module.gamma * out + x


@pytest.mark.parametrize("channels,height,width", [(16, 5, 7), (24, 7, 3), (64, 1, 6), (8, 4, 1)])
@pytest.mark.parametrize("train", [False, True])
def test_matches_fightingcv_float64(channels, height, width, train):
    torch.manual_seed(0)
    theirs = fcv.CrissCrossAttention(channels).double().train(train)
    randomize(theirs)
    ours = from_fightingcv(theirs)
    assert isinstance(ours, CrissCrossAttention) and ours.training == train
    x = torch.randn(2, channels, height, width, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(ours(x), reference(ours, x), atol=1e-10, rtol=1e-10)


def test_weights_centre_counted_once_and_capture_rows():
    torch.manual_seed(0)
    cca = CrissCrossAttention(16, rd_channels=3).double()
    randomize(cca)
    x = torch.randn(2, 16, 5, 6, dtype=torch.float64)
    out, weights = cca(x, need_weights=True)
    assert weights.shape == (2, 5, 6, 11)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 5, 6, dtype=torch.float64))
    diag = weights[..., :5].diagonal(dim1=1, dim2=3)  # (B, W, H): column weight of (i, j) on itself
    assert torch.equal(diag, torch.zeros_like(diag))
    torch.testing.assert_close(out, cca(x))
    with attnzoo.capture_maps(cca, queries=[(2, 3)]) as maps:
        cca(x)
    (rec,) = maps[""] if "" in maps else next(iter(maps.values()))
    assert rec.kind == "rows" and rec.data.shape == (2, 1, 1, 30)
    row = rec.data[:, 0, 0].reshape(2, 5, 6)
    torch.testing.assert_close(row[:, :, 3], weights[:, 2, 3, :5] + torch.nn.functional.one_hot(
        torch.tensor(2), 5).double() * weights[:, 2, 3, 5 + 3, None])
    torch.testing.assert_close(row.sum((1, 2)), torch.ones(2, dtype=torch.float64))
    off = row.clone()
    off[:, 2, :] = 0
    off[:, :, 3] = 0
    assert torch.equal(off, torch.zeros_like(off))


@pytest.mark.filterwarnings("ignore:Initializing zero-element")
def test_options_and_errors():
    assert CrissCrossAttention(64).rd_channels == 8
    assert CrissCrossAttention(4).rd_channels == 1
    assert CrissCrossAttention(64, reduction=4).query_conv.out_channels == 16
    meta = CrissCrossAttention(32, device="meta", dtype=torch.float64)
    assert all(p.is_meta and p.dtype == torch.float64 for p in meta.parameters())
    with pytest.raises(ValueError, match="rd_channels"):
        CrissCrossAttention(8, rd_channels=0)
    with pytest.raises(ValueError, match=r"\(B, 8, H, W\)"):
        CrissCrossAttention(8)(torch.randn(1, 4, 3, 3))
    tiny = fcv.CrissCrossAttention(4)  # zero query/key channels: fightingcv fails in the forward
    with pytest.raises(RuntimeError):
        tiny(torch.randn(1, 4, 3, 3))
    with pytest.raises(TypeError, match="in_dim=4"):
        from_fightingcv(tiny)
