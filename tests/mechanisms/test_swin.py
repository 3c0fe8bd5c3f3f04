"""Swin window attention: the fast kernel and the weights against a plain float64 reference, window
partition/reverse, the shifted-window mask, and ShiftedWindowAttention on maps of any size (small
maps included); the official, timm and torchvision comparisons are in test_swin_official.py."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import golden_files

import attnzoo
from attnzoo import (
    ShiftedWindowAttention,
    WindowAttention,
    shifted_window_mask,
    window_partition,
    window_reverse,
)
from attnzoo.kernels.biased import biased_attention

F64 = dict(atol=1e-10, rtol=1e-10)


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)


def reference_window_attention(
    m: WindowAttention, x: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The official forward written out with explicit index arithmetic (no helper of attnzoo)."""
    windows, n, c = x.shape
    h, (wh, ww) = m.num_heads, m.window_size
    qkv = m.qkv(x).reshape(windows, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * m.scale, qkv[1], qkv[2]
    logits = q @ k.transpose(-2, -1)
    bias = torch.empty(h, n, n, dtype=x.dtype)
    for i, j in itertools.product(range(n), range(n)):
        dh, dw = i // ww - j // ww, i % ww - j % ww
        bias[:, i, j] = m.relative_position_bias_table[(dh + wh - 1) * (2 * ww - 1) + dw + ww - 1]
    logits = logits + bias
    if mask is not None:
        nw = mask.shape[0]
        logits = (logits.view(windows // nw, nw, h, n, n) + mask[None, :, None]).view(windows, h, n, n)
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(windows, n, c)
    return m.proj(out)


def test_official_mask_recording_equals_shifted_window_mask():
    for path in golden_files("swin_window_*.pt"):
        g = torch.load(path, weights_only=True)
        if "mask" in g["inputs"]:
            mask = g["inputs"]["mask"]
            nw, n = mask.shape[0], mask.shape[1]
            wh, ww = g["kwargs"]["window_size"]
            # swin_window_02: a 14 x 14 map, window 7, shift 3 (recorded from the official block)
            if (nw, n, wh, ww) == (4, 49, 7, 7):
                built = shifted_window_mask(14, 14, 7, 3, dtype=mask.dtype)
                assert torch.equal(built, mask)


@pytest.mark.parametrize("res, window, shift", [((8, 8), 4, 2), ((14, 14), 7, 3), ((12, 9), 3, 1)])
def test_shifted_window_mask_equals_timm_block(res, window, shift):
    swin = pytest.importorskip("timm.models.swin_transformer")
    block = swin.SwinTransformerBlock(8, res, num_heads=2, window_size=window, shift_size=shift)
    want = (
        block.get_attn_mask(torch.zeros(1, *res, 8)) if hasattr(block, "get_attn_mask") else block.attn_mask
    )
    assert torch.equal(shifted_window_mask(*res, window, shift), want)


@pytest.mark.parametrize("window, heads, masked", [((3, 3), 2, False), ((2, 4), 3, True), ((4, 2), 1, True)])
def test_kernel_values_and_gradients_equal_reference(window, heads, masked):
    torch.manual_seed(0)
    dim = 6 * heads
    m = WindowAttention(dim, window, heads, qk_scale=None if heads != 3 else 0.3).double()
    randomize(m)
    n = window[0] * window[1]
    x = torch.randn(6, n, dim, dtype=torch.float64, requires_grad=True)
    mask = (
        shifted_window_mask(2 * window[0], 3 * window[1], window, (1, 1), dtype=torch.float64)
        if masked
        else None
    )
    if masked:
        x = torch.randn(12, n, dim, dtype=torch.float64, requires_grad=True)  # B = 2 images x nW = 6
    out = m(x, mask=mask)  # the kernel (fused path, gradients recorded)
    ref = reference_window_attention(m, x, mask)
    torch.testing.assert_close(out, ref, **F64)
    params = [x, m.relative_position_bias_table, m.qkv.weight, m.proj.weight]
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, params, grad_out)
    want = torch.autograd.grad(ref, params, grad_out)
    for a, b in zip(got, want, strict=False):
        torch.testing.assert_close(a, b, **F64)
    with torch.no_grad():  # inference runs the same kernel without saving anything
        torch.testing.assert_close(m(x, mask=mask), ref.detach(), **F64)


def reference_window_weights(m: WindowAttention, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The softmax weights of `reference_window_attention`, `(B*nW, h, N, N)`."""
    windows, n, c = x.shape
    h = m.num_heads
    qkv = m.qkv(x).reshape(windows, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
    logits = (qkv[0] * m.scale) @ qkv[1].transpose(-2, -1) + m.relative_position_bias()
    if mask is not None:
        nw = mask.shape[0]
        logits = (logits.view(windows // nw, nw, h, n, n) + mask[None, :, None]).view(windows, h, n, n)
    return logits.softmax(-1)


def test_need_weights_returns_the_window_weights():
    torch.manual_seed(0)
    m = WindowAttention(12, (2, 3), 3, dtype=torch.float64)
    randomize(m, 8)
    mask = shifted_window_mask(4, 6, (2, 3), (1, 1), dtype=torch.float64)  # nW = 4
    x = torch.randn(8, 6, 12, dtype=torch.float64)
    out, weights = m(x, mask=mask, need_weights=True)
    torch.testing.assert_close(out, reference_window_attention(m, x, mask), **F64)
    torch.testing.assert_close(weights, reference_window_weights(m, x, mask), **F64)
    assert weights.shape == (8, 3, 6, 6)
    # the map module: the windows of the rolled, padded map; padded keys get no weight
    swin = ShiftedWindowAttention(12, (2, 3), 3, dtype=torch.float64)
    swin.attn.load_state_dict(m.state_dict())
    img = torch.randn(2, 3, 5, 12, dtype=torch.float64)  # padded to 4 x 6: nW = 4 per image
    out, weights = swin(img, need_weights=True)
    torch.testing.assert_close(out, swin(img), **F64)
    assert weights.shape == (8, 3, 6, 6)
    torch.testing.assert_close(weights.sum(-1), torch.ones(8, 3, 6, dtype=torch.float64), **F64)
    padded = torch.zeros(4, 6, dtype=torch.bool)
    padded[3:], padded[:, 5:] = True, True
    rolled = torch.roll(padded, (-1, -1), (0, 1))[None, :, :, None]  # (1, Hp, Wp, 1)
    keys = window_partition(rolled, (2, 3)).reshape(4, 6).repeat(2, 1)  # (B*nW, N)
    assert torch.all(weights.masked_select(keys[:, None, None, :].expand_as(weights)) < 1e-300)


def test_kernel_float32_matches_math_path_and_timm():
    swin = pytest.importorskip("timm.models.swin_transformer")
    torch.manual_seed(0)
    m = WindowAttention(24, (7, 7), 3)
    randomize(m, 1)
    theirs = swin.WindowAttention(24, 3, window_size=7)
    theirs.load_state_dict(m.state_dict(), strict=True)
    x = torch.randn(8, 49, 24, requires_grad=True)
    out = m(x)
    torch.testing.assert_close(out, theirs(x), atol=1e-5, rtol=1e-4)
    (gx,) = torch.autograd.grad(out.sum(), x)
    with attnzoo.fused_attn(False):
        (gref,) = torch.autograd.grad(m(x).sum(), x)
    torch.testing.assert_close(gx, gref, atol=1e-5, rtol=1e-4)


def test_kernel_dropout_is_inverted_dropout_on_the_weights():
    torch.manual_seed(0)
    qkv = torch.randn(4, 6, 3, 2, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, 6, 6, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(11)
    out = biased_attention(qkv, bias, scale=0.4, dropout_p=0.5)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    weights = ((q * 0.4) @ k.transpose(-2, -1) + bias).softmax(-1)
    torch.manual_seed(11)
    keep = torch.empty_like(weights, dtype=torch.bool).bernoulli_(0.5)
    want = ((weights * keep / 0.5) @ v).transpose(1, 2).reshape(4, 6, 10)
    torch.testing.assert_close(out, want, **F64)
    grad_out = torch.randn_like(out)
    for a, b in zip(
        torch.autograd.grad(out, (qkv, bias), grad_out),
        torch.autograd.grad(want, (qkv, bias), grad_out),
        strict=False,
    ):
        torch.testing.assert_close(a, b, **F64)
    assert 0.3 < (keep.double().mean()) < 0.7


def test_window_partition_and_reverse():
    x = torch.arange(2 * 6 * 8 * 3).reshape(2, 6, 8, 3)
    windows = window_partition(x, (3, 4))
    assert windows.shape == (8, 3, 4, 3)
    for b, i, j in itertools.product(range(2), range(2), range(2)):
        assert torch.equal(windows[b * 4 + i * 2 + j], x[b, 3 * i : 3 * i + 3, 4 * j : 4 * j + 4])
    assert torch.equal(window_reverse(windows, (3, 4), 6, 8), x)
    assert torch.equal(window_reverse(window_partition(x, 2), 2, 6, 8), x)
    with pytest.raises(ValueError, match="divisible by the window"):
        window_partition(x, 5)
    with pytest.raises(ValueError, match="window_reverse expects"):
        window_reverse(windows, (3, 4), 6, 7)
    with pytest.raises(ValueError, match="expects x of shape"):
        window_partition(x[0], 2)


def test_window_helpers_refuse_bad_sizes_and_a_non_additive_mask_dtype():
    windows = window_partition(torch.randn(2, 4, 4, 3), 2)
    # H=0 raised ZeroDivisionError, H=-4 a raw reshape error, a float H torch's reshape TypeError
    with pytest.raises(ValueError, match="window_reverse expects H >= 1, got 0"):
        window_reverse(windows, 2, 0, 4)
    with pytest.raises(TypeError, match="window_reverse expects W to be an int, got float 4.0"):
        window_reverse(windows, 2, 4, 4.0)
    with pytest.raises(ValueError, match="shifted_window_mask expects H >= 1, got -4"):
        shifted_window_mask(-4, 8, 4, 2)
    # a bool mask is "True = may attend" in attend: 0 / -100 as bools masked exactly the allowed keys
    with pytest.raises(TypeError, match="expects dtype to be a floating torch.dtype .*got torch.bool"):
        shifted_window_mask(8, 8, 4, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="value must be a number, got nan"):
        shifted_window_mask(8, 8, 4, 2, value=float("nan"))


def reference_shifted(m: ShiftedWindowAttention, x: torch.Tensor) -> torch.Tensor:
    """Per-token definition on the real map (no padding, rolling or partition).

    Swin's small-map rule first: along a side no longer than the window, the window is the side and
    the shift 0. Token p then sits at (i - sh) mod Hp, (j - sw) mod Wp of the rolled, padded map; it
    attends to the real tokens of its window and region with the bias of their offset, read from
    the full window's table.
    """
    att = m.attn
    b, height, width, c = x.shape
    (twh, tww), h = m.window_size, att.num_heads
    wh, ww = min(twh, height), min(tww, width)
    sh = 0 if height <= twh else m.shift_size[0]
    sw = 0 if width <= tww else m.shift_size[1]
    hp, wp = -(-height // wh) * wh, -(-width // ww) * ww
    qkv = att.qkv(x).reshape(b, height * width, 3, h, c // h)
    q, k, v = qkv[:, :, 0] * att.scale, qkv[:, :, 1], qkv[:, :, 2]
    pos = [((i - sh) % hp, (j - sw) % wp) for i in range(height) for j in range(width)]

    def region(r, size, win, s):
        return 0 if r < size - win else (1 if (s == 0 or r < size - s) else 2)

    out = torch.zeros(b, height * width, h, c // h, dtype=x.dtype)
    for p, (ri, rj) in enumerate(pos):
        keys, bias_rows = [], []
        for t, (ti, tj) in enumerate(pos):
            same_window = (ri // wh, rj // ww) == (ti // wh, tj // ww)
            same_region = (region(ri, hp, wh, sh), region(rj, wp, ww, sw)) == (
                region(ti, hp, wh, sh),
                region(tj, wp, ww, sw),
            )
            if same_window and same_region:
                dh, dw = ri % wh - ti % wh, rj % ww - tj % ww
                keys.append(t)
                bias_rows.append((dh + twh - 1) * (2 * tww - 1) + dw + tww - 1)
        logits = (
            torch.einsum("bhd,bkhd->bhk", q[:, p], k[:, keys]) + att.relative_position_bias_table[bias_rows].T
        )
        out[:, p] = torch.einsum("bhk,bkhd->bhd", logits.softmax(-1), v[:, keys])
    return att.proj(out.reshape(b, height, width, c))


@pytest.mark.parametrize(
    "size, window, shift",
    [
        ((4, 6), (2, 3), (1, 1)),
        ((5, 7), (2, 3), (1, 2)),
        ((3, 3), 2, 1),
        ((7, 4), (3, 2), 0),
        ((2, 5), (4, 4), (2, 2)),  # small along H: window (2, 4), no shift along H
        ((3, 9), (4, 4), (2, 2)),  # the same, with a row the old full-window shift would cut off
        ((3, 3), 4, 2),  # smaller than the window both ways: one 3 x 3 window, no shift
    ],
)
def test_shifted_window_attention_equals_reference(size, window, shift):
    torch.manual_seed(0)
    m = ShiftedWindowAttention(8, window, 2, shift_size=shift).double()
    randomize(m, 2)
    x = torch.randn(2, *size, 8, dtype=torch.float64, requires_grad=True)
    out = m(x)
    ref = reference_shifted(m, x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, ref, **F64)
    grad_out = torch.randn_like(out)
    params = [x, m.attn.relative_position_bias_table, m.attn.qkv.weight]
    for a, b in zip(
        torch.autograd.grad(out, params, grad_out), torch.autograd.grad(ref, params, grad_out), strict=False
    ):
        torch.testing.assert_close(a, b, **F64)
    with attnzoo.fused_attn(False), torch.no_grad():
        torch.testing.assert_close(m(x), ref.detach(), **F64)


def test_shifted_window_attention_divisible_equals_official_composition_and_nchw():
    torch.manual_seed(0)
    m = ShiftedWindowAttention(8, 4, 2).double()  # shift defaults to half the window
    randomize(m, 3)
    assert m.shift_size == (2, 2)
    x = torch.randn(2, 8, 12, 8, dtype=torch.float64)
    rolled = torch.roll(x, (-2, -2), (1, 2))
    windows = window_partition(rolled, 4).reshape(-1, 16, 8)
    out = m.attn(windows, mask=shifted_window_mask(8, 12, 4, 2, dtype=torch.float64))
    want = torch.roll(window_reverse(out.reshape(-1, 4, 4, 8), 4, 8, 12), (2, 2), (1, 2))
    torch.testing.assert_close(m(x), want, **F64)
    nchw = ShiftedWindowAttention(8, 4, 2, layout="NCHW").double()
    nchw.load_state_dict(m.state_dict(), strict=True)
    torch.testing.assert_close(nchw(x.permute(0, 3, 1, 2)), want.permute(0, 3, 1, 2), **F64)


def test_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match="dim=10 must be divisible by num_heads=4"):
        WindowAttention(10, (2, 2), 4)
    with pytest.raises(ValueError, match="window_size must be an int or a pair"):
        WindowAttention(8, (2, 2, 2), 2)
    with pytest.raises(ValueError, match="window_size must be >= 1"):
        WindowAttention(8, (0, 2), 2)
    with pytest.raises(ValueError, match="shift_size must be smaller"):
        ShiftedWindowAttention(8, (2, 3), 2, shift_size=(1, 3))
    with pytest.raises(ValueError, match="layout must be one of"):
        ShiftedWindowAttention(8, 2, 2, layout="NHCW")
    m = WindowAttention(8, (2, 3), 2)
    with pytest.raises(ValueError, match=r"expects x of shape \(B, 6, 8\) with N=6, got \(4, 5, 8\)"):
        m(torch.randn(4, 5, 8))
    with pytest.raises(ValueError, match=r"expects x of shape \(B, 6, 8\) with C=8"):
        m(torch.randn(4, 6, 9))
    with pytest.raises(
        ValueError, match=r"expects mask of shape \(nW, 6, 6\) with nW dividing x.shape\[0\]=4"
    ):
        m(torch.randn(4, 6, 8), mask=torch.zeros(3, 6, 6))
    with pytest.raises(ValueError, match="expects mask of shape"):
        m(torch.randn(4, 6, 8), mask=torch.zeros(2, 6, 5))
    with pytest.raises(TypeError, match="dtype"):
        m(torch.randn(4, 6, 8), mask=torch.zeros(2, 6, 6, dtype=torch.bool))
    s = ShiftedWindowAttention(8, 2, 2, layout="NCHW")
    with pytest.raises(ValueError, match=r"expects x of shape \(B, 8, H, W\)"):
        s(torch.randn(1, 5, 5, 8))
