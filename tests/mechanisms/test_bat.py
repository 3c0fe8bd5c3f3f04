"""BAT non-local block: timm parity in float64 (odd H and W, several block sizes and groups),
the block algebra against the Kronecker form, weights, maps and errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import attnzoo
from attnzoo import BATNonLocalAttention
from attnzoo.convert import convert, from_timm

D = torch.float64


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


def compare(theirs: nn.Module, channels: int, sizes, train: bool) -> BATNonLocalAttention:
    theirs = randomize(theirs).train(train)
    theirs.dropout.p = 0.0  # dropout draws differ; everything else runs in training mode
    ours = from_timm(theirs)
    assert isinstance(ours, BATNonLocalAttention) and ours.training == train
    for b, h, w in sizes:
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
def test_create_attn_parity(train):
    create_attn = pytest.importorskip("timm.layers").create_attn
    default = attnzoo.create("bat", 32)
    assert default.dropout.p == create_attn("bat", 32).dropout.p == 0.2
    ours = compare(create_attn("bat", 32), 32, [(2, 7, 21), (3, 14, 7)], train)
    assert ours.rd_channels == default.rd_channels == 8


@pytest.mark.parametrize("train", [False, True])
def test_options_parity(train):
    nl = pytest.importorskip("timm.layers.non_local_attn")
    compare(nl.BatNonLocalAttn(16, block_size=3, groups=4, rd_channels=8), 16, [(2, 9, 15), (2, 3, 3)], train)
    compare(nl.BatNonLocalAttn(12, block_size=5, groups=1, act_layer=nn.SiLU), 12, [(2, 5, 25)], train)
    compare(nl.BatNonLocalAttn(24, block_size=1, groups=2), 24, [(2, 3, 5)], train)


def test_convert_dispatches_and_refuses():
    nl = pytest.importorskip("timm.layers.non_local_attn")
    assert isinstance(convert(nl.BatNonLocalAttn(16, block_size=2)), BATNonLocalAttention)
    group_norm = pytest.importorskip("timm.layers").GroupNorm1
    with pytest.raises(TypeError, match="not a BatchNorm2d"):
        from_timm(nl.BatNonLocalAttn(16, norm_layer=group_norm))


def test_blocks_equal_the_kronecker_form():
    torch.manual_seed(0)
    ba = BATNonLocalAttention(16, block_size=3, groups=2, rd_channels=8, dtype=D).eval().ba
    x = torch.randn(2, 8, 6, 9, dtype=D)
    p, q = ba.matrices(x)  # (B, G, b, b)
    big_p = torch.kron(p, torch.eye(2, dtype=D))  # (B, G, H, H)
    big_q = torch.kron(q, torch.eye(3, dtype=D))  # (B, G, W, W)
    xg = x.view(2, 2, 4, 6, 9)  # (B, G, C/G, H, W)
    ref = ba.conv2((big_p[:, :, None] @ xg @ big_q[:, :, None]).reshape(2, 8, 6, 9))
    y, weights = ba(x)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, 2, 3, dtype=D))


def test_factory_keywords_weights_and_maps():
    meta = BATNonLocalAttention(16, block_size=2, device="meta")
    assert all(t.is_meta for t in meta.state_dict().values())
    module = BATNonLocalAttention(16, block_size=2, dtype=D).eval()
    assert all(t.dtype == D for t in module.state_dict().values() if t.is_floating_point())
    x = torch.randn(2, 16, 4, 6, dtype=D)
    out, weights = module(x, need_weights=True)
    assert weights.shape == (2, 2, 2, 2, 2)
    torch.testing.assert_close(out, module(x))
    with attnzoo.capture_maps(module) as maps:
        module(x)
    (rows,) = next(iter(maps.values()))
    assert rows.kind == "rows" and rows.grid == rows.query_grid == (2, 2) and rows.data.shape[:2] == (2, 2)


def test_map_rows_rebuild_the_transform_from_every_block():
    # BAT recorded P's rows and Q's rows apart; `attnzoo maps bat` drew P's alone (horizontal bands, the
    # column mixing left out). One record: query block (i, k) over the blocks (j, l), P[i, j] Q[l, k].
    torch.manual_seed(0)
    module = randomize(BATNonLocalAttention(16, block_size=3, dtype=D)).eval()
    x = torch.randn(2, 16, 6, 9, dtype=D)  # blocks of 2 x 3 pixels
    points = [(0, 0), (5, 8), (2, 4), (3, 1)]  # pixels in blocks (0, 0), (2, 2), (1, 1), (1, 0)
    mixed = []  # the transform's output, before the transform's own closing convolution
    module.ba.conv2.register_forward_pre_hook(lambda mod, args: mixed.append(args[0]))
    with attnzoo.capture_maps(module, queries=points) as maps, torch.no_grad():
        module(x)
        z, y = module.conv1(x), mixed[0]  # (B, C', H, W) each
    (rows,) = maps["BATNonLocalAttention"]
    assert rows.queries.tolist() == [0, 8, 4, 3] and rows.grid == (3, 3)
    torch.testing.assert_close(rows.data.sum(-1), torch.ones(2, 2, 4, dtype=D))
    groups, per = rows.data.shape[1], z.shape[1] // rows.data.shape[1]
    for q, (py, px) in enumerate(points):
        a, e = py % 2, px % 3  # the offset inside the block: the pixels it takes from every block
        keys = z[:, :, a::2, e::3].reshape(2, groups, per, 9)  # (B, G, C'/G, blocks)
        rebuilt = torch.einsum("bgk,bgck->bgc", rows.data[:, :, q], keys)
        torch.testing.assert_close(rebuilt.reshape(2, -1), y[:, :, py, px])


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="multiples of block_size=7"):
        BATNonLocalAttention(16)(torch.randn(2, 16, 7, 8))
    with pytest.raises(ValueError, match="rd_channels=6 must be divisible by groups=4"):
        BATNonLocalAttention(16, rd_channels=6, groups=4)
    with pytest.raises(ValueError, match="proj_drop must be <= 1"):
        BATNonLocalAttention(16, proj_drop=1.5)
    with pytest.raises(ValueError, match=r"expects x of shape \(B, 16, H, W\)"):
        BATNonLocalAttention(16)(torch.randn(2, 8, 7, 7))
