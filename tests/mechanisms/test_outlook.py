"""Outlook attention: fightingcv parity where it runs, timm (VOLO) parity elsewhere, float64."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo import OutlookAttention
from attnzoo.convert import from_fightingcv, from_timm

fcv = pytest.importorskip("fightingcv_attention.attention.OutlookAttention", reason="fightingcv missing")


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)


@pytest.mark.parametrize("dim,heads,qkv_bias,height,width", [
    (16, 1, False, 5, 7), (24, 3, True, 7, 3), (8, 2, False, 1, 6), (32, 4, True, 6, 6),
])
def test_matches_fightingcv_float64(dim, heads, qkv_bias, height, width):
    torch.manual_seed(0)
    theirs = fcv.OutlookAttention(dim, num_heads=heads, qkv_bias=qkv_bias, attn_drop=0.0).double().eval()
    randomize(theirs)
    ours = from_fightingcv(theirs)
    assert isinstance(ours, OutlookAttention) and not ours.training
    x = torch.randn(2, height, width, dim, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-10, rtol=1e-10)


def test_matches_fightingcv_in_training_with_dropout():
    theirs = fcv.OutlookAttention(16, num_heads=2).double().train()  # attn_drop=0.1 on both dropouts
    randomize(theirs)
    ours = from_fightingcv(theirs)
    assert ours.training and ours.attn_drop.p == ours.proj_drop.p == 0.1
    x = torch.randn(2, 5, 7, 16, dtype=torch.float64)
    torch.manual_seed(3)
    expected = theirs(x)
    torch.manual_seed(3)
    torch.testing.assert_close(ours(x), expected, atol=1e-10, rtol=1e-10)


def test_fightingcv_fails_off_its_defaults_and_is_refused():
    theirs = fcv.OutlookAttention(16, stride=2).double()
    with pytest.raises(RuntimeError):  # its Unfold(kernel_size, padding, stride) sets dilation and padding
        theirs(torch.randn(1, 6, 6, 16, dtype=torch.float64))
    with pytest.raises(TypeError, match="stride=2"):
        from_fightingcv(theirs)
    with pytest.raises(TypeError, match="kernel_size=5"):
        from_fightingcv(fcv.OutlookAttention(16, kernel_size=5, padding=2))


@pytest.mark.parametrize("dim,heads,kernel,padding,stride,height,width", [
    (16, 2, 3, 1, 2, 7, 5), (12, 3, 5, 2, 1, 5, 6), (8, 1, 3, 1, 3, 7, 8), (16, 4, 5, 2, 2, 9, 4),
    (6, 2, 1, 0, 1, 4, 5),
])
@pytest.mark.parametrize("train", [False, True])
def test_matches_timm_volo_float64(dim, heads, kernel, padding, stride, height, width, train):
    volo = pytest.importorskip("timm.models.volo", reason="timm missing")
    torch.manual_seed(0)
    theirs = volo.OutlookAttention(dim, heads, kernel_size=kernel, padding=padding, stride=stride,
                                   qkv_bias=True, attn_drop=0.2, proj_drop=0.1).double().train(train)
    randomize(theirs)
    ours = from_timm(theirs)
    assert type(ours) is OutlookAttention and ours.training == train and ours.stride == stride
    assert (ours.attn_drop.p, ours.proj_drop.p) == (0.2, 0.1)  # with train=True the masks must agree
    x = torch.randn(2, height, width, dim, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(1)
    want = theirs(x)
    torch.manual_seed(1)
    got = ours(x)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    grad = torch.randn_like(got)
    torch.testing.assert_close(torch.autograd.grad(got, x, grad)[0], torch.autograd.grad(want, x, grad)[0],
                               atol=1e-10, rtol=1e-10)


def test_replace_in_a_timm_volo_model():
    volo = pytest.importorskip("timm.models.volo", reason="timm missing")
    torch.manual_seed(0)
    model = volo.VOLO(layers=(1, 1, 1, 1), img_size=64, embed_dims=(32, 64, 64, 64), num_heads=(2, 2, 2, 2),
                      stem_hidden_dim=16, num_classes=5).double().eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
    attnzoo.replace(model, volo.OutlookAttention)
    assert [type(m) for m in model.modules() if type(m).__name__ == "OutlookAttention"] == [OutlookAttention]
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, atol=1e-10, rtol=1e-10)
    model.train()
    model(x).square().mean().backward()  # one training step's gradients are finite
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_weights_and_errors():
    outlook = OutlookAttention(8, num_heads=2, stride=2).double()
    x = torch.randn(2, 5, 7, 8, dtype=torch.float64)
    out, weights = outlook(x, need_weights=True)
    assert weights.shape == (2, 2, 12, 9, 9)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, 12, 9, dtype=torch.float64))
    torch.testing.assert_close(out, outlook(x))
    assert OutlookAttention(8, kernel_size=5).padding == 2
    meta = OutlookAttention(16, device="meta", dtype=torch.float64)
    assert all(p.is_meta and p.dtype == torch.float64 for p in meta.parameters())
    with pytest.raises(ValueError, match="num_heads=3"):
        OutlookAttention(16, num_heads=3)
    with pytest.raises(ValueError, match="got H=6"):
        OutlookAttention(8, kernel_size=4, padding=1)(torch.randn(1, 6, 6, 8))
    with pytest.raises(ValueError, match=r"\(B, H, W, 8\)"):
        OutlookAttention(8)(torch.randn(1, 8, 3, 3))


def test_captured_rows_rebuild_the_output():
    """Each recorded row, times the number of windows covering the query (9 inside the map), weighs
    the values into the query's output (before the projection); rows sum to 1 away from the border."""
    import attnzoo

    m = OutlookAttention(8, num_heads=2).double().eval()
    x = torch.randn(2, 12, 12, 8, dtype=torch.float64)
    expected = m(x)
    with attnzoo.capture_maps(m) as maps:
        y = m(x)
    (entry,) = [r for records in maps.values() for r in records]
    assert entry.kind == "rows" and entry.grid == (12, 12) and entry.query_grid == (12, 12)
    count = len(entry.queries)
    assert tuple(entry.data.shape) == (2, 2, count, 144)
    torch.testing.assert_close(entry.data.sum(-1), torch.ones(2, 2, count, dtype=torch.float64))
    v = m.v(x).reshape(2, 144, 2, 4).transpose(1, 2)  # (B, h, N, d)
    mixed = (9 * entry.data @ v).transpose(1, 2).flatten(2)  # (B, Q, C)
    torch.testing.assert_close(m.proj(mixed), y.reshape(2, 144, 8)[:, entry.queries])
    torch.testing.assert_close(y, expected, atol=0, rtol=0)
