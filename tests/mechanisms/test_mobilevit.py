"""MobileViT block: fightingcv parity in float64, the paper's layers, patch order, errors."""

from __future__ import annotations

import pytest
import torch

from attnzoo import MobileViTBlock
from attnzoo.convert import from_fightingcv

fcv = pytest.importorskip(
    "fightingcv_attention.attention.MobileViTAttention", reason="fightingcv or its dependency einops missing"
)


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)


@pytest.mark.parametrize("channels,dim,kernel,patch,height,width", [
    (3, 16, 3, 7, 14, 7), (5, 24, 5, 3, 9, 15), (4, 8, 1, 1, 3, 5), (6, 32, 3, 2, 4, 10),
])
@pytest.mark.parametrize("train", [False, True])
def test_matches_fightingcv_float64(channels, dim, kernel, patch, height, width, train):
    theirs = fcv.MobileViTAttention(channels, dim, kernel_size=kernel, patch_size=patch).double().train(train)
    randomize(theirs)
    ours = from_fightingcv(theirs)
    assert isinstance(ours, MobileViTBlock) and ours.training == train and len(ours.layers) == 3
    x = torch.randn(2, channels, height, width, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-10, rtol=1e-10)


def test_fightingcv_needs_multiples_of_the_patch():
    theirs = fcv.MobileViTAttention(3, 16, patch_size=3).double()
    with pytest.raises(RuntimeError):  # EinopsError: einops cannot split 7 rows into patches of 3
        theirs(torch.randn(1, 3, 7, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="patch_size=3, got H=7"):
        from_fightingcv(theirs)(torch.randn(1, 3, 7, 6, dtype=torch.float64))


def test_paper_layers_and_weights():
    block = MobileViTBlock(8, transformer_dim=12, patch_size=2, depth=3, num_heads=3).double().eval()
    assert isinstance(block.conv1[1], torch.nn.BatchNorm2d) and isinstance(block.conv1[2], torch.nn.SiLU)
    assert block.conv1[0].bias is None and len(block.conv2) == 1 and block.conv2[0].bias is None
    assert isinstance(block.norm, torch.nn.LayerNorm) and block.layers[0].qkv.bias is not None
    x = torch.randn(2, 8, 6, 4, dtype=torch.float64)
    out, weights = block(x, need_weights=True)
    assert weights.shape == (2, 3, 4, 3, 6, 6)
    torch.testing.assert_close(out, block(x))
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3, 4, 3, 6, dtype=torch.float64))
    # a patch-pixel sequence sees only its own pixel position: changing pixel (0, 0) of every patch
    # leaves the transformer's input for the other positions alone, so conv-free blocks keep them.
    flat = MobileViTBlock(4, transformer_dim=8, kernel_size=1, norm_layer=None, act_layer=None)
    flat = flat.double().eval()
    y = torch.randn(1, 4, 4, 4, dtype=torch.float64)
    z = y.clone()
    z[:, :, 0::2, 0::2] += 1.0
    changed = (flat(y) - flat(z)).abs().sum(1)[0]  # (H, W)
    assert torch.equal(changed[1::2, :] == 0, torch.ones(2, 4, dtype=torch.bool))
    assert (changed[0::2, 0::2] > 0).all()


def test_options_and_errors():
    meta = MobileViTBlock(16, transformer_dim=32, device="meta", dtype=torch.float64)
    assert all(t.is_meta and t.dtype == torch.float64 for t in [*meta.parameters(), *meta.buffers()]
               if t.is_floating_point())
    with pytest.raises(ValueError, match="num_heads=5"):
        MobileViTBlock(16, num_heads=5)
    with pytest.raises(ValueError, match="kernel_size must be odd"):  # padding k // 2 would grow H and W
        MobileViTBlock(8, kernel_size=4)
    with pytest.raises(ValueError, match=r"\(B, 8, H, W\)"):
        MobileViTBlock(8)(torch.randn(1, 4, 4, 4))


def test_captured_rows_are_each_layers_weights_over_the_patches():
    import attnzoo

    m = MobileViTBlock(8, transformer_dim=16, num_heads=2, patch_size=2).double().eval()
    x = torch.randn(2, 8, 6, 8, dtype=torch.float64)
    expected, w = m(x, need_weights=True)  # (B, L, P, h, n, n)
    with attnzoo.capture_maps(m) as maps:
        y = m(x)
    assert sorted(maps) == ["layers.0", "layers.1"]
    for layer in range(2):
        (entry,) = maps[f"layers.{layer}"]
        assert entry.kind == "rows" and entry.grid == (3, 4) and entry.query_grid == (6, 8)
        count = len(entry.queries)
        assert tuple(entry.data.shape) == (2, 2, count, 12)
        for n, q in enumerate(entry.queries.tolist()):
            yy, xx = divmod(q, 8)
            ref = w[:, layer, (yy % 2) * 2 + xx % 2, :, (yy // 2) * 4 + xx // 2]  # (B, h, n)
            torch.testing.assert_close(entry.data[:, :, n], ref)
        torch.testing.assert_close(entry.data.sum(-1), torch.ones(2, 2, count, dtype=torch.float64))
    torch.testing.assert_close(y, expected)
