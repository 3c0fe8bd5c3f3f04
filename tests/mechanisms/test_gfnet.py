"""Global filter (GFNet): fightingcv parity (it computes in float32), the circular convolution, errors."""

from __future__ import annotations

import copy

import pytest
import torch

from attnzoo import GlobalFilter
from attnzoo.convert import from_fightingcv

fcv = pytest.importorskip("fightingcv_attention.attention.gfnet", reason="fightingcv (or timm) missing")


def circular(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """out[b, i, j, c] = sum_{p, q} x[b, p, q, c] k[(i - p) % H, (j - q) % W, c], by loops over (p, q)."""
    out = torch.zeros_like(x)
    for p in range(x.shape[1]):
        for q in range(x.shape[2]):
            shifted = torch.roll(kernel, shifts=(p, q), dims=(0, 1))  # k[(i - p), (j - q)]
            out = out + x[:, p : p + 1, q : q + 1, :] * shifted
    return out


@pytest.mark.parametrize("dim,height,width", [(8, 14, 14), (5, 7, 9), (3, 6, 5), (4, 1, 1), (6, 4, 8)])
def test_matches_fightingcv(dim, height, width):
    theirs = fcv.GlobalFilter(dim, h=height, w=width // 2 + 1)
    ours = from_fightingcv(theirs)
    assert isinstance(ours, GlobalFilter)
    x = torch.randn(2, height, width, dim)
    expected = theirs(x.reshape(2, height * width, dim), spatial_size=(height, width)).reshape(x.shape)
    torch.testing.assert_close(ours(x), expected, atol=1e-6, rtol=1e-5)
    # fightingcv casts every input to float32: its float64 numbers are float32-accurate only
    ours64 = from_fightingcv(theirs.double())
    x64 = x.double()
    theirs64 = theirs(x64.reshape(2, height * width, dim), spatial_size=(height, width))
    assert theirs64.dtype == torch.float64 and ours64(x64).dtype == torch.float64
    torch.testing.assert_close(ours64(x64), theirs64.reshape(x.shape), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("height,width", [(5, 7), (6, 8), (1, 4), (4, 1)])
@pytest.mark.parametrize("train", [False, True])
def test_is_a_circular_convolution_float64(height, width, train):
    torch.manual_seed(0)
    gf = GlobalFilter(3, feat_size=(height, width), dtype=torch.float64).train(train)
    with torch.no_grad():
        gf.complex_weight.normal_()
    x = torch.randn(2, height, width, 3, dtype=torch.float64)
    out, kernel = gf(x, need_weights=True)
    assert kernel.shape == (height, width, 3)
    torch.testing.assert_close(out, circular(x, kernel), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(gf(x), out, atol=0, rtol=0)


def test_sizes_and_errors():
    gf = GlobalFilter(4, feat_size=(6, 8))  # 5 frequencies: W = 8 or 9
    assert gf(torch.randn(1, 6, 9, 4)).shape == (1, 6, 9, 4)
    assert copy.deepcopy(gf).bfloat16()(torch.randn(1, 6, 8, 4).bfloat16()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="got W=7"):
        gf(torch.randn(1, 6, 7, 4))
    with pytest.raises(ValueError, match=r"\(B, 6, W, 4\)"):
        gf(torch.randn(1, 5, 8, 4))
    with pytest.raises(ValueError, match="feat_size must be an int or a pair"):
        GlobalFilter(4, feat_size=(1, 2, 3))
    with pytest.raises(TypeError, match="feat_size must be an int or a pair of ints, got float"):
        GlobalFilter(4, feat_size=2.0)
    meta = GlobalFilter(16, device="meta", dtype=torch.float64)
    assert meta.complex_weight.is_meta and meta.complex_weight.dtype == torch.float64
    assert meta.complex_weight.shape == (14, 8, 16, 2)


def test_captured_rows_are_the_filter_magnitude_at_each_offset():
    import attnzoo

    m = GlobalFilter(8, feat_size=(5, 6)).double()
    x = torch.randn(2, 5, 6, 8, dtype=torch.float64)
    expected, kernel = m(x, need_weights=True)  # (H, W, C)
    with attnzoo.capture_maps(m) as maps:
        y = m(x)
    (entry,) = [r for records in maps.values() for r in records]
    assert entry.kind == "rows" and entry.grid == (5, 6) and tuple(entry.data.shape) == (2, 1, 5, 30)
    magnitude = kernel.abs().mean(-1)  # (H, W)
    for n, q in enumerate(entry.queries.tolist()):
        i, j = divmod(q, 6)
        ref = torch.stack([torch.stack([magnitude[(i - p) % 5, (j - r) % 6] for r in range(6)])
                           for p in range(5)])
        torch.testing.assert_close(entry.data[:, 0, n], ref.flatten().expand(2, -1))
    assert "filter" in entry.meta["note"]
    torch.testing.assert_close(y, expected, atol=0, rtol=0)
