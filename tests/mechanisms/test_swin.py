"""Swin window attention: official golden files, the fast kernel against a plain float64 reference,
window partition/reverse, the shifted-window mask, and ShiftedWindowAttention on maps of any size."""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch
from conftest import golden_files

import attnzoo
import attnzoo.compat
from attnzoo import (
    ShiftedWindowAttention,
    WindowAttention,
    shifted_window_mask,
    window_partition,
    window_reverse,
)
from attnzoo.kernels.biased import biased_attention
from attnzoo.mechanisms.swin import small_map_window

F64 = dict(atol=1e-10, rtol=1e-10)


@contextlib.contextmanager
def default_dtype(name: str):
    old = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, name))
    try:
        yield
    finally:
        torch.set_default_dtype(old)


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


@pytest.mark.parametrize("path", golden_files("swin_window_*.pt"), ids=lambda p: p.name)
@pytest.mark.parametrize("path_kind", ["no_grad", "kernel", "math"])
@pytest.mark.parametrize(
    "cls", [attnzoo.compat.WindowAttention, WindowAttention], ids=["official", "canonical"]
)
def test_official_golden(path, path_kind, cls):
    g = torch.load(path, weights_only=True)
    dtype = getattr(torch, g["dtype"])
    with default_dtype(g["default_dtype"]):
        m = cls(**g["kwargs"]).to(dtype)
        m.load_state_dict(g["state_dict"], strict=True)  # the official keys, index included
        m.eval()
        keys = [k for k in g["state_dict"] if cls is attnzoo.compat.WindowAttention or "index" not in k]
        assert list(m.state_dict()) == keys  # the canonical state_dict has no index (as timm's)
        for key, value in m.state_dict().items():
            assert value.shape == g["state_dict"][key].shape and value.dtype == g["state_dict"][key].dtype, (
                key
            )
        assert torch.equal(m.relative_position_index, g["state_dict"]["relative_position_index"])
        args = [g["inputs"][a] for a in g["forward_args"]]
        kwargs = {k: g["inputs"][k] for k in g["forward_tensor_kwargs"]}
        with attnzoo.fused_attn(path_kind != "math"), torch.set_grad_enabled(path_kind != "no_grad"):
            out = m(*args, **kwargs, **g["forward_kwargs"])
    tol = 1e-8 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(out.detach(), g["output"], atol=tol, rtol=0)


def test_official_class_keeps_the_official_signature_and_keys():
    official = attnzoo.compat.WindowAttention
    assert official is not WindowAttention and issubclass(official, WindowAttention)
    with pytest.raises(TypeError, match="window_size"):
        official(8)  # no defaults, as the official module
    m = official(8, (2, 3), 2)
    assert list(m.state_dict()) == [
        "relative_position_bias_table",
        "relative_position_index",
        "qkv.weight",
        "qkv.bias",
        "proj.weight",
        "proj.bias",
    ]
    canon = WindowAttention(8, (2, 3), 2)
    assert "relative_position_index" not in canon.state_dict()
    canon.load_state_dict(m.state_dict(), strict=True)
    with pytest.raises(RuntimeError, match="Missing key.*relative_position_index"):
        official(8, (2, 3), 2).load_state_dict(canon.state_dict(), strict=True)  # as the official module


@pytest.mark.parametrize("window, heads, masked", [((7, 7), 3, False), ((4, 6), 2, True), (5, 1, False)])
def test_loads_timm_state_dict_strict_and_equals_timm(window, heads, masked):
    swin = pytest.importorskip("timm.models.swin_transformer")
    torch.manual_seed(0)
    theirs = swin.WindowAttention(6 * heads, heads, window_size=window).double().eval()
    randomize(theirs, 4)
    assert "relative_position_index" not in theirs.state_dict()  # timm: a non-persistent buffer
    m = WindowAttention(6 * heads, window, heads, dtype=torch.float64).eval()
    m.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(m.state_dict(), strict=True)  # and back
    wh, ww = (window, window) if isinstance(window, int) else window
    mask = shifted_window_mask(2 * wh, 2 * ww, (wh, ww), (wh // 2, ww // 2), dtype=torch.float64)
    x = torch.randn(8 if masked else 5, wh * ww, 6 * heads, dtype=torch.float64)
    with torch.no_grad():
        want = theirs(x, mask=mask if masked else None)
        torch.testing.assert_close(m(x, mask=mask if masked else None), want, **F64)
        with attnzoo.fused_attn(False):
            torch.testing.assert_close(m(x, mask=mask if masked else None), want, **F64)


def test_a_wrong_relative_position_index_is_refused():
    m = WindowAttention(8, (2, 3), 2)
    state = attnzoo.compat.WindowAttention(8, (2, 3), 2).state_dict()
    state["relative_position_index"] = state["relative_position_index"].flip(0)
    with pytest.raises(RuntimeError, match=r"relative_position_index: the checkpoint's relative position"):
        m.load_state_dict(state, strict=True)
    other = attnzoo.compat.WindowAttention(8, (3, 2), 2).state_dict()  # same table size, other window
    with pytest.raises(RuntimeError, match=r"not the one of a \(2, 3\) window"):
        m.load_state_dict(other, strict=True)
    with pytest.raises(RuntimeError, match="relative_position_index"):  # inside a model: the prefix
        ShiftedWindowAttention(8, (2, 3), 2).load_state_dict({f"attn.{k}": v for k, v in other.items()})
    meta = WindowAttention(8, (2, 3), 2, device="meta")  # on meta only the shape can be checked
    meta.load_state_dict(attnzoo.compat.WindowAttention(8, (2, 3), 2).state_dict(), strict=True, assign=True)
    assert meta.qkv.weight.device.type == "cpu"


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


def test_small_map_rule_per_dimension():
    assert small_map_window((56, 56), (7, 7), (3, 3)) == ((7, 7), (3, 3))
    assert small_map_window((7, 7), (7, 7), (3, 3)) == ((7, 7), (0, 0))  # stage 4 at 224 x 224
    assert small_map_window((5, 5), (7, 7), (3, 3)) == ((5, 5), (0, 0))
    assert small_map_window((7, 14), (7, 7), (3, 3)) == ((7, 7), (0, 3))
    assert small_map_window((20, 4), (7, 7), (3, 3)) == ((7, 4), (3, 0))
    assert small_map_window((8, 8), (7, 7), (0, 0)) == ((7, 7), (0, 0))


@pytest.mark.parametrize("size", [(7, 7), (7, 14), (14, 7), (14, 14)])
def test_small_maps_equal_torchvision(size):
    tv = pytest.importorskip("torchvision.models.swin_transformer")
    torch.manual_seed(0)
    theirs = tv.ShiftedWindowAttention(12, [7, 7], [3, 3], 3).double().eval()
    randomize(theirs, 5)
    m = ShiftedWindowAttention(12, 7, 3, dtype=torch.float64).eval()  # shift: half the window, 3
    m.attn.load_state_dict(theirs.state_dict(), strict=True)  # torchvision saves the index too
    x = torch.randn(2, *size, 12, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(m(x), theirs(x), **F64)


def copy_timm_block(block, m: ShiftedWindowAttention) -> None:
    """timm's block attention (built for its clipped window) into `m`: the table's central block."""
    (wh, ww), (th, tw) = m.window_size, block.attn.window_size
    with torch.no_grad():
        m.attn.qkv.load_state_dict(block.attn.qkv.state_dict())
        m.attn.proj.load_state_dict(block.attn.proj.state_dict())
        table = m.attn.relative_position_bias_table.view(2 * wh - 1, 2 * ww - 1, -1)
        small = block.attn.relative_position_bias_table.view(2 * th - 1, 2 * tw - 1, -1)
        table[wh - th : wh + th - 1, ww - tw : ww + tw - 1] = small


@pytest.mark.parametrize("size", [(7, 7), (5, 5), (5, 14), (14, 3), (3, 2), (14, 14)])
def test_small_maps_equal_timm_block(size):
    swin = pytest.importorskip("timm.models.swin_transformer")
    torch.manual_seed(0)
    block = swin.SwinTransformerBlock(12, size, num_heads=3, window_size=7, shift_size=3).double().eval()
    randomize(block, 6)
    want_window, want_shift = small_map_window(size, (7, 7), (3, 3))
    assert (tuple(block.window_size), tuple(block.shift_size)) == (want_window, want_shift)
    m = ShiftedWindowAttention(12, 7, 3, dtype=torch.float64).eval()
    randomize(m, 7)  # entries outside the clipped window's offsets must not matter
    copy_timm_block(block, m)
    x = torch.randn(2, *size, 12, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(m(x), block._attn(x), **F64)


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
