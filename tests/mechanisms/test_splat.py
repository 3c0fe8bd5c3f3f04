"""Split attention (splat): timm parity in float64 (odd sizes, strides, groups, radix 1), weights,
maps and errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import attnzoo
from attnzoo import SplitAttention
from attnzoo.convert import convert, from_timm

D = torch.float64
SIZES = [(2, 7, 5), (3, 9, 9), (2, 6, 11)]  # (B, H, W); BatchNorm in training needs B > 1


def randomize(module: nn.Module) -> nn.Module:
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


def compare(theirs: nn.Module, channels: int, train: bool) -> SplitAttention:
    theirs = randomize(theirs).train(train)
    ours = from_timm(theirs)
    assert isinstance(ours, SplitAttention) and ours.training == train
    for b, h, w in SIZES:
        x = torch.randn(b, channels, h, w, dtype=D, requires_grad=True)
        ref = theirs(x.clone())  # timm's activations are in-place
        out = ours(x)
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
        g_ref, = torch.autograd.grad(ref.square().sum(), x)
        g_out, = torch.autograd.grad(out.square().sum(), x)
        torch.testing.assert_close(g_out, g_ref, atol=1e-10, rtol=1e-10)
    for name, buf in theirs.named_buffers():
        owner, _, leaf = name.rpartition(".")
        torch.testing.assert_close(ours.get_submodule(owner).get_buffer(leaf), buf, atol=1e-12, rtol=0)
    return ours


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("channels", [16, 24])
def test_create_attn_parity(channels, train):
    create_attn = pytest.importorskip("timm.layers").create_attn
    theirs = create_attn("splat", channels)
    ours = compare(theirs, channels, train)
    default = attnzoo.create("splat", channels)
    assert ours.rd_channels == default.rd_channels == theirs.fc1.out_channels


@pytest.mark.parametrize("train", [False, True])
def test_options_parity(train):
    split = pytest.importorskip("timm.layers.split_attn")
    bn = nn.BatchNorm2d
    compare(split.SplitAttn(16, out_channels=24, stride=2, groups=2, radix=2, norm_layer=bn), 16, train)
    compare(split.SplitAttn(12, out_channels=8, radix=1, rd_channels=5, kernel_size=5, bias=True), 12, train)
    compare(split.SplitAttn(12, radix=3, groups=2, rd_channels=4, dilation=2, padding=2), 12, train)
    compare(split.SplitAttn(8, kernel_size=1, act_layer=nn.SiLU, norm_layer=nn.BatchNorm2d), 8, train)


def test_convert_dispatches_and_refuses():
    split = pytest.importorskip("timm.layers.split_attn")
    assert isinstance(convert(split.SplitAttn(8)), SplitAttention)
    with pytest.raises(TypeError, match="reflect"):
        from_timm(split.SplitAttn(8, padding_mode="reflect"))


def test_formula_by_hand():
    torch.manual_seed(0)
    splat = SplitAttention(8, out_channels=6, radix=2, groups=2, rd_channels=4, dtype=D).eval()
    x = torch.randn(2, 8, 5, 7, dtype=D)
    u = torch.relu(splat.conv(x)).view(2, 2, 6, 5, 7)  # (B, R, C', H, W)
    s = u.sum(1).mean((2, 3))  # (B, C')
    logits = splat.fc2(torch.relu(splat.fc1(s[:, :, None, None]))).view(2, 2, 2, 3)  # (B, G, R, C'/G)
    a = logits.softmax(2).permute(0, 2, 1, 3).reshape(2, 2, 6)  # (B, R, C')
    out, weights = splat(x, need_weights=True)
    torch.testing.assert_close(weights, a)
    torch.testing.assert_close(out, (u * a[..., None, None]).sum(1))
    torch.testing.assert_close(weights.sum(1), torch.ones(2, 6, dtype=D))


def test_same_size_padding_for_every_dilation():
    out = SplitAttention(8, rd_channels=8, dilation=3, kernel_size=3)(torch.randn(1, 8, 9, 7))
    assert out.shape == (1, 8, 9, 7)


def test_factory_keywords_and_maps():
    meta = SplitAttention(16, norm_layer=nn.BatchNorm2d, device="meta")
    assert all(t.is_meta for t in meta.state_dict().values())
    module = SplitAttention(16, norm_layer=nn.BatchNorm2d, dtype=D).eval()
    assert all(t.dtype == D for t in module.state_dict().values() if t.is_floating_point())
    with attnzoo.capture_maps(module) as maps:
        module(torch.randn(2, 16, 5, 5, dtype=D))
    (entry,) = next(iter(maps.values()))
    assert entry.kind == "branch" and tuple(entry.data.shape) == (2, 2, 16)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="channels=10 must be divisible by groups \\* radix=4"):
        SplitAttention(10, groups=2)
    with pytest.raises(ValueError, match="out_channels=9 must be divisible by groups=2"):
        SplitAttention(8, out_channels=9, groups=2)
    with pytest.raises(ValueError, match="rd_channels=5 must be divisible by groups=2"):
        SplitAttention(8, groups=2, rd_channels=5)
    with pytest.raises(ValueError, match="radix must be >= 1"):
        SplitAttention(8, radix=0)
    with pytest.raises(ValueError, match=r"expects x of shape \(B, 8, H, W\)"):
        SplitAttention(8)(torch.randn(2, 4, 5, 5))


@pytest.mark.parametrize(("padding", "dilation", "size", "least"), [(0, 1, 1, 3), (0, 2, 3, 5), (1, 3, 2, 5)])
def test_a_map_smaller_than_the_kernel_is_refused_before_the_convolution(padding, dilation, size, least):
    module = SplitAttention(8, padding=padding, dilation=dilation)
    with pytest.raises(ValueError, match=f"x.H={size} padded by {padding} .* expected x.H >= {least}"):
        module(torch.randn(2, 8, size, 9))
    module(torch.randn(2, 8, least, least))  # the smallest map that fits runs
