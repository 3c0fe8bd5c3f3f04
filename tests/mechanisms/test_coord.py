"""Strip-pooling gates (coord, scoord, ela, strip): timm and fightingcv parity in float64, options,
errors, weights and maps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import attnzoo
from attnzoo import CoordAttention, EfficientLocalAttention, SimpleCoordAttention, StripAttention
from attnzoo.convert import convert, from_timm

D = torch.float64
SHAPES = [(2, 5, 7), (3, 9, 4), (1, 1, 6), (2, 8, 8)]  # (B, H, W): odd, even, a single row


def randomize(module: nn.Module) -> nn.Module:
    """Random weights and BatchNorm statistics, float64."""
    gen = torch.Generator().manual_seed(0)
    module = module.to(D)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if "running_var" in name:
                tensor.copy_(torch.rand(tensor.shape, generator=gen, dtype=D) + 0.5)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=gen, dtype=D) * 0.5)
    return module


def compare(theirs: nn.Module, channels: int, train: bool) -> None:
    theirs = randomize(theirs).train(train)
    ours = from_timm(theirs)
    assert ours.training == train
    # torch's hardsigmoid backward multiplies by a float32 1/6 (docs/interop.md); attnzoo's HardSigmoid,
    # which a timm hard-sigmoid gate becomes, is exact
    hard = type(theirs.gate) is nn.Hardsigmoid
    assert type(ours.gate).__name__ == ("HardSigmoid" if hard else type(theirs.gate).__name__)
    grad_tol = {"atol": 1e-7, "rtol": 1e-5} if hard else {"atol": 1e-10, "rtol": 1e-10}
    for b, h, w in SHAPES:
        if train and b * h == 1 and isinstance(getattr(theirs, "bn1", None), nn.BatchNorm2d):
            continue  # BatchNorm in training refuses one value per channel
        x = torch.randn(b, channels, h, w, dtype=D, requires_grad=True)
        ref = theirs(x)
        out = ours(x)
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
        g_ref, = torch.autograd.grad(ref.square().sum(), x)
        g_out, = torch.autograd.grad(out.square().sum(), x)
        torch.testing.assert_close(g_out, g_ref, **grad_tol)
    for name, buf in theirs.named_buffers():  # same BatchNorm statistics after the same steps
        torch.testing.assert_close(ours.get_submodule(name.rpartition(".")[0]).get_buffer(
            name.rpartition(".")[2]), buf, atol=1e-12, rtol=0)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("name, channels", [("coord", 16), ("coord", 40), ("scoord", 24), ("ela", 12),
                                            ("strip", 10)])
def test_create_attn_parity(name, channels, train):
    create_attn = pytest.importorskip("timm.layers").create_attn
    theirs = create_attn(name, channels)
    compare(theirs, channels, train)
    ours = from_timm(theirs)
    assert type(ours) is type(attnzoo.create(name, channels))
    assert sum(p.numel() for p in ours.parameters()) == sum(
        p.numel() for p in attnzoo.create(name, channels).parameters()
    ), "attnzoo's defaults build timm's widths"


@pytest.mark.parametrize("train", [False, True])
def test_coord_options_parity(train):
    coord = pytest.importorskip("timm.layers.coord_attn")
    compare(coord.CoordAttn(24, rd_channels=6, bias=True, gate_layer="hard_sigmoid", has_skip=True), 24,
            train)
    compare(coord.CoordAttn(20, rd_ratio=0.5, norm_layer=None, act_layer=nn.ReLU), 20, train)
    compare(coord.SimpleCoordAttn(12, rd_channels=5, bias=False, has_skip=True), 12, train)
    compare(coord.SimpleCoordAttn(16, gate_layer="hard_sigmoid", act_layer=nn.GELU), 16, train)


def test_simple_coord_keeps_timms_keys_and_activation_weights():
    """An activation with weights (PReLU) converts; timm's Linear keys still load after replace."""
    coord = pytest.importorskip("timm.layers.coord_attn")
    for train in (False, True):
        compare(coord.SimpleCoordAttn(12, rd_channels=5, act_layer=nn.PReLU), 12, train)
    model = randomize(nn.Sequential(coord.SimpleCoordAttn(12, rd_channels=5, act_layer=nn.PReLU))).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 12, 5, 7, dtype=D)
    with torch.no_grad():
        before = model(x)
    assert attnzoo.replace(model, coord.SimpleCoordAttn) == ["0"]
    with torch.no_grad():
        for t in model.state_dict().values():
            t.zero_()
    model.load_state_dict(state, strict=True)  # fc1 / fc_h / fc_w (Linear) -> 1x1 convolutions
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=1e-10, rtol=0)
    model.load_state_dict(model.state_dict(), strict=True)


@pytest.mark.parametrize("train", [False, True])
def test_ela_strip_options_parity(train):
    coord = pytest.importorskip("timm.layers.coord_attn")
    compare(coord.EfficientLocalAttn(6, kernel_size=3, bias=True, has_skip=True), 6, train)
    compare(coord.EfficientLocalAttn(8, kernel_size=5, norm_layer=None, gate_layer="hard_sigmoid"), 8, train)
    compare(coord.EfficientLocalAttn(8, kernel_size=9, act_layer=nn.Identity), 8, train)
    compare(coord.StripAttn(7, kernel_size=5, bias=True, has_skip=True), 7, train)
    compare(coord.StripAttn(9, kernel_size=1, gate_layer="hard_sigmoid"), 9, train)


@pytest.mark.parametrize("make", ["CoordAttn", "SimpleCoordAttn", "EfficientLocalAttn", "StripAttn"])
def test_hard_sigmoid_gate_has_a_double_backward(make):
    """A timm hard-sigmoid gate converts to attnzoo's HardSigmoid: a gradient penalty (double backward)
    works, where torch's `hardsigmoid_backward` has no derivative."""
    coord = pytest.importorskip("timm.layers.coord_attn")
    ours = from_timm(randomize(getattr(coord, make)(8, gate_layer="hard_sigmoid"))).eval()
    x = torch.randn(2, 8, 5, 6, dtype=D, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: ours(t), (x,), fast_mode=True)


def test_convert_dispatches_and_refuses():
    coord = pytest.importorskip("timm.layers.coord_attn")
    assert isinstance(convert(coord.CoordAttn(16)), CoordAttention)
    with pytest.raises(TypeError, match="kernel_size=4 is even"):
        from_timm(coord.EfficientLocalAttn(8, kernel_size=4))
    with pytest.raises(TypeError, match="use_conv=False"):
        from_timm(coord.StripAttn(8, use_conv=False))
    with pytest.raises(TypeError, match="gate is a ReLU"):
        from_timm(coord.CoordAttn(16, gate_layer=nn.ReLU))
    with pytest.raises(TypeError, match="known timm classes"):
        from_timm(nn.Linear(2, 2))

    class Custom(coord.CoordAttn):
        def forward(self, x):
            return x

    with pytest.raises(TypeError, match="overrides forward"):
        from_timm(Custom(16))


def test_strip_without_conv_equals_the_formula():
    x = torch.randn(2, 4, 5, 3, dtype=D)
    out = StripAttention(4, use_conv=False, dtype=D)(x)
    torch.testing.assert_close(out, x * torch.sigmoid(x.mean(3, keepdim=True) + x.mean(2, keepdim=True)))


def test_coord_formula_by_hand():
    ca = randomize(CoordAttention(8, rd_channels=3, norm_layer=None)).eval()
    x = torch.randn(2, 8, 5, 4, dtype=D)
    w1, wh, ww = (m.weight[:, :, 0, 0] for m in (ca.conv1, ca.conv_h, ca.conv_w))
    hid_h = nn.functional.hardswish(torch.einsum("rc,bch->brh", w1, x.mean(3)))  # (B, r, H)
    hid_w = nn.functional.hardswish(torch.einsum("rc,bcw->brw", w1, x.mean(2)))  # (B, r, W)
    a_h = torch.sigmoid(torch.einsum("cr,brh->bch", wh, hid_h))[..., None]
    a_w = torch.sigmoid(torch.einsum("cr,brw->bcw", ww, hid_w))[:, :, None]
    out, gate = ca(x, need_weights=True)
    torch.testing.assert_close(gate, a_h * a_w, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out, x * a_h * a_w, atol=1e-12, rtol=1e-12)


def test_fightingcv_parity():
    fcv = pytest.importorskip("fightingcv_attention.attention.CoordAttention")
    from attnzoo.convert.fightingcv import from_fightingcv

    for c, r in ((16, 32), (64, 4), (40, 8)):
        theirs = randomize(fcv.CoordAtt(c, c, reduction=r)).eval()
        ours = from_fightingcv(theirs)
        assert isinstance(ours, CoordAttention) and ours.rd_channels == max(8, c // r)
        for b, h, w in SHAPES:
            x = torch.randn(b, c, h, w, dtype=D)
            torch.testing.assert_close(ours(x), theirs(x), atol=1e-10, rtol=1e-10)
    with pytest.raises(TypeError, match="oup=8: the gate must have the input's width or 1"):
        from_fightingcv(fcv.CoordAtt(16, 8))


@pytest.mark.parametrize("train", [False, True])
def test_fightingcv_one_gate_for_every_channel(train):
    """fightingcv's ``CoordAtt(inp, oup=1)`` broadcasts one gate over the channels: ``gate_channels=1``."""
    fcv = pytest.importorskip("fightingcv_attention.attention.CoordAttention")
    from attnzoo.convert.fightingcv import from_fightingcv

    theirs = randomize(fcv.CoordAtt(16, 1, reduction=4)).train(train)
    ours = from_fightingcv(theirs)
    assert ours.conv_h.out_channels == ours.conv_w.out_channels == 1
    x = torch.randn(2, 16, 7, 9, dtype=D, requires_grad=True)
    expected = theirs(x)
    got, gate = ours(x, need_weights=True)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    (grad,), (want,) = torch.autograd.grad(got.sum(), x), torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(grad, want, atol=1e-10, rtol=1e-10)
    assert gate.shape == x.shape and torch.equal(gate[:, 0], gate[:, 5])  # one gate, every channel
    with pytest.raises(ValueError, match="gate_channels must be channels=16 or 1, got 4"):
        CoordAttention(16, gate_channels=4)


@pytest.mark.parametrize("additive", [False, True])
def test_one_gate_channel_returns_the_full_gate(additive):
    ca = CoordAttention(8, gate_channels=1, additive=additive, dtype=D).eval()
    assert "gate_channels=1" in repr(ca)
    x = torch.randn(2, 8, 5, 7, dtype=D)
    out, gate = ca(x, need_weights=True)
    assert gate.shape == x.shape and torch.equal(gate[:, 0], gate[:, 7])
    torch.testing.assert_close(out, x * gate, atol=1e-12, rtol=0)


CLASSES = [CoordAttention, SimpleCoordAttention, EfficientLocalAttention, StripAttention]


@pytest.mark.parametrize("cls", CLASSES)
def test_factory_keywords_and_weights(cls):
    meta = cls(16, device="meta")
    assert all(p.is_meta for p in meta.state_dict().values())
    module = cls(16, dtype=D).eval()
    assert all(t.dtype == D for t in module.state_dict().values() if t.is_floating_point())
    x = torch.randn(2, 16, 5, 3, dtype=D)
    out, gate = module(x, need_weights=True)
    assert gate.shape == x.shape and ((gate >= 0) & (gate <= 1)).all()
    torch.testing.assert_close(out, x * gate)
    torch.testing.assert_close(out, module(x))


def test_maps_are_recorded():
    module = CoordAttention(8).eval()
    with attnzoo.capture_maps(module) as maps:
        module(torch.randn(2, 8, 5, 7))
    (entry,) = next(iter(maps.values()))
    assert entry.kind == "spatial" and tuple(entry.data.shape) == (2, 5, 7) and entry.grid == (5, 7)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        EfficientLocalAttention(8, kernel_size=4)
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        StripAttention(8, kernel_size=2)
    with pytest.raises(ValueError, match="reduction must be > 0"):
        CoordAttention(8, reduction=0)
    with pytest.raises(TypeError, match="rd_channels must be an int"):
        CoordAttention(8, rd_channels=2.5)
    with pytest.raises(ValueError, match=r"expects x of shape \(B, 8, H, W\)"):
        CoordAttention(8)(torch.randn(2, 8, 5))
    with pytest.raises(ValueError, match="C=8"):
        SimpleCoordAttention(8)(torch.randn(2, 6, 5, 5))


def test_replace_swaps_timm_modules_in_a_model():
    coord = pytest.importorskip("timm.layers.coord_attn")
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), coord.CoordAttn(16), nn.ReLU(),
                          coord.EfficientLocalAttn(16, kernel_size=3)).to(D).eval()
    randomize(model)
    x = torch.randn(2, 3, 7, 9, dtype=D)
    ref = model(x)
    assert attnzoo.replace(model, coord.CoordAttn) == ["1"]
    assert attnzoo.replace(model, coord.EfficientLocalAttn) == ["3"]
    assert isinstance(model[1], CoordAttention) and isinstance(model[3], EfficientLocalAttention)
    torch.testing.assert_close(model(x), ref, atol=1e-10, rtol=1e-10)
