"""Weighted Permute-MLP (ViP): fightingcv parity in float64, the authors' branch order, errors."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo import WeightedPermuteMLP
from attnzoo.convert import from_fightingcv

fcv = pytest.importorskip("fightingcv_attention.attention.ViP", reason="fightingcv missing")


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.2)


@pytest.mark.parametrize("dim,seg,qkv_bias", [(16, 4, False), (24, 3, True), (35, 7, True), (8, 1, False)])
@pytest.mark.parametrize("train", [False, True])
def test_matches_fightingcv_float64(dim, seg, qkv_bias, train):
    theirs = fcv.WeightedPermuteMLP(dim, seg, qkv_bias=qkv_bias, proj_drop=0.3).double().train(train)
    randomize(theirs)
    assert isinstance(from_fightingcv(theirs), WeightedPermuteMLP)
    assert from_fightingcv(theirs).attn_drop.p == 0.1
    # the reweighting dropout's masks land on differently ordered outputs (the branches are reordered):
    # the same in distribution, not draw for draw, so the draw-for-draw check runs without it
    theirs.reweighting.drop.p = 0.0
    ours = from_fightingcv(theirs)
    assert ours.training == train and ours.proj_drop.p == 0.3
    x = torch.randn(2, seg, seg, dim, dtype=torch.float64)
    torch.manual_seed(5)
    expected = theirs(x)
    torch.manual_seed(5)  # the same dropout masks, drawn in the same order
    torch.testing.assert_close(ours(x), expected, atol=1e-10, rtol=1e-10)


def test_branches_by_hand_and_weights():
    torch.manual_seed(0)
    vip = WeightedPermuteMLP(6, segment_dim=3, qkv_bias=True).double()
    randomize(vip)
    x = torch.randn(2, 3, 3, 6, dtype=torch.float64)
    # height branch: segment g of column j is the vector (x[0, j, g], x[1, j, g], x[2, j, g]) of 3 x 2
    seg = x.reshape(2, 3, 3, 3, 2)  # (B, H, W, g, S)
    h = torch.empty_like(seg)
    w = torch.empty_like(seg)
    for j in range(3):
        for g in range(3):
            h[:, :, j, g] = vip.mlp_h(seg[:, :, j, g].reshape(2, 6)).reshape(2, 3, 2)
            w[:, j, :, g] = vip.mlp_w(seg[:, j, :, g].reshape(2, 6)).reshape(2, 3, 2)
    h, w, c = h.reshape(x.shape), w.reshape(x.shape), vip.mlp_c(x)
    a = vip.fc2(vip.act(vip.fc1((h + w + c).mean((1, 2))))).reshape(2, 6, 3).softmax(-1)  # (B, C, 3)
    expected = vip.proj(h * a[:, None, None, :, 0] + w * a[:, None, None, :, 1] + c * a[:, None, None, :, 2])
    out, weights = vip(x, need_weights=True)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(weights, a.transpose(1, 2))
    with attnzoo.capture_maps(vip) as maps:
        vip(x)
    (rec,) = next(iter(maps.values()))
    assert rec.kind == "branch" and rec.data.shape == (2, 3, 6)


def test_sizes_and_errors():
    theirs = fcv.WeightedPermuteMLP(16, 4)
    with pytest.raises(RuntimeError):  # its C x C layer over H S needs H == seg_dim
        theirs(torch.randn(1, 5, 4, 16))
    with pytest.raises(ValueError, match=r"\(B, 4, 4, 16\)"):
        WeightedPermuteMLP(16, segment_dim=4)(torch.randn(1, 5, 4, 16))
    with pytest.raises(ValueError, match="segment_dim=5"):
        WeightedPermuteMLP(16, segment_dim=5)
    meta = WeightedPermuteMLP(16, device="meta", dtype=torch.float64)
    assert all(p.is_meta and p.dtype == torch.float64 for p in meta.parameters())
