"""Swin window attention against the official, timm and torchvision code: official golden files
(compat.WindowAttention and the canonical class), timm and torchvision state_dicts loaded strictly,
the relative position index check, and Swin's small-map rule against torchvision and timm."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import golden_files

import attnzoo
import attnzoo.compat
from attnzoo import ShiftedWindowAttention, WindowAttention, shifted_window_mask
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
