"""CrossFormer's LSDA attention: parity with fightingcv-attention's `Crossformer.Attention` and
`CrossFormerBlock` (float64, random weights), the official block's padding and mask (a reference
written from cheerss/CrossFormer's `CrossFormerBlock.forward` around fightingcv's attention), weights,
map capture, checkpoints and errors."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnzoo
from attnzoo.convert import convert, from_fightingcv
from attnzoo.mechanisms.crossformer import CrossFormerAttention, CrossFormerGroupAttention, group_partition

crossformer = pytest.importorskip("fightingcv_attention.attention.Crossformer", reason="fightingcv missing")

D = torch.float64
TOL = {"atol": 1e-10, "rtol": 1e-10}


def randomised(module: nn.Module, seed: int = 0) -> nn.Module:
    """float64 with every parameter from N(0, 0.3^2) (the `biases` coordinates buffer is kept)."""
    gen = torch.Generator().manual_seed(seed)
    module = module.to(D)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=D) * 0.3)
    return module


def x_of(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


def fcv_attention(*args, **kwargs) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.meshgrid without indexing=
        return randomised(crossformer.Attention(*args, **kwargs)).eval()


@pytest.mark.parametrize(
    "dim, group, heads, options",
    [
        (32, (3, 3), 2, {}),
        (64, (4, 2), 4, {"qkv_bias": False, "qk_scale": 0.3}),
        (48, (2, 5), 3, {"position_bias": False}),
        (16, (1, 4), 1, {"qk_scale": 0.0}),  # 0 means the default scale, as `qk_scale or ...`
        (8, (2, 2), 2, {}),  # a bias MLP of width 0: a constant per head -> position_bias=False
    ],
)
def test_attention_parity_with_fightingcv(dim, group, heads, options):
    theirs = fcv_attention(dim, group, heads, **options)
    ours = from_fightingcv(copy.deepcopy(theirs))
    assert type(ours) is CrossFormerGroupAttention and type(convert(theirs)) is CrossFormerGroupAttention
    assert ours.position_bias == (options.get("position_bias", True) and dim >= 16)
    n = group[0] * group[1]
    xa, xb = x_of(6, n, dim).requires_grad_(), x_of(6, n, dim).requires_grad_()
    mask = torch.zeros(3, n, n, dtype=D)
    mask[:, :, -1] = -1e6  # the official mask value on a padded key
    mask[1, : n // 2, 0] = -100.0
    for m in (None, mask):
        out_a, out_b = ours(xa, m), theirs(xb, m)
        torch.testing.assert_close(out_a, out_b, **TOL)
        g = torch.randn_like(out_b)
        out_a.backward(g)
        out_b.backward(g)
        torch.testing.assert_close(xa.grad, xb.grad, **TOL)
    with attnzoo.fused_attn(False):
        torch.testing.assert_close(ours(xa, mask), theirs(xb, mask), **TOL)


@pytest.mark.parametrize("group, n", [(4, 16), (4, 9), ((3, 5), 7), ((np.int64(2), np.int64(2)), 4)])
def test_without_position_bias_any_group_size_and_token_count_run_as_in_fightingcv(group, n):
    """Without the position bias fightingcv never reads `group_size` (an int runs too) nor checks N."""
    theirs = fcv_attention(32, group, 2, position_bias=False)
    ours = from_fightingcv(copy.deepcopy(theirs))
    assert ours.group_size == ((group, group) if isinstance(group, int) else tuple(int(g) for g in group))
    x = x_of(6, n, 32)
    mask = torch.zeros(3, n, n, dtype=D)
    mask[1, :, 0] = -100.0
    for m in (None, mask):
        torch.testing.assert_close(ours(x, m), theirs(x, m), **TOL)
    with attnzoo.capture_maps(ours) as maps:
        ours(x)
    (record,) = maps["CrossFormerGroupAttention"]
    area = ours.group_size[0] * ours.group_size[1]
    assert record.grid == (ours.group_size if n == area else (1, n)) and record.data.shape == (6, 2, n, n)


@pytest.mark.parametrize("group", ["ab", (4,), (2.0, 2), (True, 2), None])
def test_converter_refuses_a_group_size_that_is_no_pair_of_ints(group):
    theirs = crossformer.Attention(32, group, 2, position_bias=False)
    with pytest.raises(TypeError, match="group_size=.* is no int nor \\(height, width\\) pair of ints"):
        from_fightingcv(theirs)


def test_converter_refuses_a_residual_bias():
    theirs = fcv_attention(32, (2, 2), 2)
    theirs.pos.residual = True
    with pytest.raises(TypeError, match="residual=True"):
        from_fightingcv(theirs)


@pytest.mark.parametrize("name", ["biases", "relative_position_index"])
def test_converter_refuses_changed_derived_buffers(name):
    """attnzoo derives them from group_size: a module whose buffer was changed would convert to other
    outputs (a checkpoint with other ones is refused on loading too)."""
    theirs = crossformer.Attention(32, (3, 3), 2, position_bias=True)
    with torch.no_grad():
        getattr(theirs, name).add_(1)
    with pytest.raises(TypeError, match=f"its {name} buffer is not the one of a \\(3, 3\\) group"):
        from_fightingcv(theirs)


def test_fightingcv_and_official_state_dicts_load_strictly():
    theirs = fcv_attention(32, (3, 2), 2)
    state = theirs.state_dict()
    assert {"biases", "relative_position_index"} <= set(state)  # fightingcv's buffers are persistent
    ours = CrossFormerGroupAttention(32, (3, 2), 2, dtype=D)
    ours.load_state_dict(state, strict=True)  # the derived buffers are checked and dropped
    official = {k: v for k, v in state.items() if k not in ("biases", "relative_position_index")}
    ours.load_state_dict(official, strict=True)
    assert set(ours.state_dict()) == set(official)
    with pytest.raises(RuntimeError, match="relative_position_index.*group_size"):
        CrossFormerGroupAttention(32, (2, 3), 2, dtype=D).load_state_dict(state, strict=True)


@pytest.mark.parametrize("dim", [8, 32])
def test_fightingcv_checkpoint_loads_after_replace(dim):
    """Below dim 16 fightingcv's bias MLP is 0 wide (converted to position_bias=False); its checkpoint,
    zero-size `pos.*` entries and derived buffers included, still loads strictly into the swap."""
    model = nn.Sequential(fcv_attention(dim, (2, 2), 2))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = x_of(3, 4, dim)
    expected = model(x)
    attnzoo.replace(model, crossformer.Attention)
    assert type(model[0]) is CrossFormerGroupAttention and model[0].position_bias == (dim >= 16)
    model.load_state_dict(state, strict=True)
    torch.testing.assert_close(model(x), expected, **TOL)
    with pytest.raises(RuntimeError, match="Unexpected key"):  # a real bias MLP does not fit
        CrossFormerGroupAttention(32, (2, 2), 2, position_bias=False, dtype=D).load_state_dict(
            fcv_attention(32, (2, 2), 2).state_dict(), strict=True)


def test_bias_layernorm_settings_carry_over():
    theirs = fcv_attention(64, (3, 3), 4)
    for norm in theirs.pos.modules():
        if isinstance(norm, nn.LayerNorm):
            norm.eps = 1e-2
    ours = from_fightingcv(theirs)
    assert {m.eps for m in ours.modules() if isinstance(m, nn.LayerNorm)} == {1e-2}
    x = x_of(2, 9, 64)
    torch.testing.assert_close(ours(x), theirs(x), **TOL)


class _Zero(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def block_attention(size, heads, group, lsda_flag, dim=32):
    """fightingcv's `CrossFormerBlock` reduced to its attention path: x + LSDA(x)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        block = crossformer.CrossFormerBlock(dim, size, heads, group_size=group, lsda_flag=lsda_flag)
    block.norm1, block.mlp = nn.Identity(), _Zero()
    return randomised(block).eval()


@pytest.mark.parametrize(
    "size, group, lsda_flag, expected",
    [
        ((8, 8), 4, 0, ("short", 4)),
        ((8, 12), 4, 0, ("short", 4)),
        ((8, 8), 2, 1, ("long", 2)),  # interval H // G = 4
        ((8, 12), 4, 1, ("long", 4)),  # intervals (2, 3)
        ((5, 5), 7, 1, ("short", 5)),  # the small-map rule: SDA with G = min(H, W)
        ((6, 6), 6, 1, ("short", 6)),
    ],
)
def test_map_parity_with_the_fightingcv_block(size, group, lsda_flag, expected):
    theirs = block_attention(size, 2, group, lsda_flag)
    (h, w), g = size, min(group, min(size))
    distance = ("short", "long")[lsda_flag]
    ours = CrossFormerAttention(32, 2, group, interval=(h // g, w // g), distance=distance, dtype=D).eval()
    state = theirs.attn.state_dict()  # the block's attn.* keys; its buffers are those of the used group
    ours.attn.load_state_dict({k: v for k, v in state.items() if k.startswith(("qkv", "pos.", "proj"))})
    assert (ours.distance if min(size) > group else "short", ours.geometry(size)[0]) == expected
    x = x_of(2, h, w, 32)
    with torch.no_grad():
        expected_out = theirs(x.reshape(2, h * w, 32)) - x.reshape(2, h * w, 32)
        torch.testing.assert_close(ours(x).reshape(2, h * w, 32), expected_out, **TOL)


def official_lsda(attn: nn.Module, x: torch.Tensor, group: int, interval: int, lsda_flag: int):
    """The official `CrossFormerBlock.forward` attention path (pad_type 0, with its mask), around `attn`."""
    b, h, w, c = x.shape
    size_div = interval * group if lsda_flag == 1 else group
    pad_w, pad_h = (size_div - w % size_div) % size_div, (size_div - h % size_div) % size_div
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp, g, i = h + pad_h, w + pad_w, group, interval
    mask = torch.zeros((1, hp, wp, 1), dtype=x.dtype)
    if pad_h > 0:
        mask[:, -pad_h:, :, :] = -1
    if pad_w > 0:
        mask[:, :, -pad_w:, :] = -1
    if lsda_flag == 0:
        x = x.reshape(b, hp // g, g, wp // g, g, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, g * g, c)
        mask = mask.reshape(1, hp // g, g, wp // g, g, 1).permute(0, 1, 3, 2, 4, 5)
    else:
        rh, rw = hp // (g * i), wp // (g * i)
        x = x.reshape(b, rh, g, i, rw, g, i, c).permute(0, 1, 4, 3, 6, 2, 5, 7).reshape(-1, g * g, c)
        mask = mask.reshape(1, rh, g, i, rw, g, i, 1).permute(0, 1, 4, 3, 6, 2, 5, 7)
    mask = mask.reshape(-1, 1, g * g)
    attn_mask = torch.zeros((mask.shape[0], g * g, g * g), dtype=x.dtype).masked_fill(mask < 0, -1000000)
    out = attn(x, mask=attn_mask if (pad_h or pad_w) else None)
    if lsda_flag == 0:
        out = out.reshape(b, hp // g, wp // g, g, g, c).permute(0, 1, 3, 2, 4, 5)
    else:
        out = out.reshape(b, rh, rw, i, i, g, g, c).permute(0, 1, 5, 3, 2, 6, 4, 7)
    return out.reshape(b, hp, wp, c)[:, :h, :w]


@pytest.mark.parametrize(
    "size, group, interval, lsda_flag",
    [((5, 7), 2, 2, 1), ((9, 9), 3, 2, 1), ((3, 5), 2, 4, 1), ((17, 10), 3, 2, 1), ((5, 7), 3, 1, 0),
     ((10, 13), 4, 8, 0)],
)
def test_padding_follows_the_official_block(size, group, interval, lsda_flag):
    theirs = fcv_attention(32, (group, group), 2)
    ours = CrossFormerAttention(32, 2, group, interval, ("short", "long")[lsda_flag], dtype=D).eval()
    ours.attn.load_state_dict(theirs.state_dict(), strict=True)
    x = x_of(2, *size, 32).requires_grad_()
    out = ours(x)
    torch.testing.assert_close(out, official_lsda(theirs, x, group, interval, lsda_flag), **TOL)
    out.sum().backward()  # ((3, 5), 2, 4): some LDA groups hold padding only: still finite
    assert torch.isfinite(x.grad).all()


def test_padding_never_reaches_real_tokens():
    ours = CrossFormerAttention(32, 2, 3, 2, "long", dtype=D).eval()
    x = x_of(1, 7, 8, 32)
    big = torch.cat([torch.cat([x, x_of(1, 7, 4, 32, seed=2)], 2), x_of(1, 5, 12, 32, seed=3)], 1)  # 12 x 12
    masked = ours(x)
    assert not torch.allclose(masked, ours(big)[:, :7, :8])  # other tokens take part when real
    with attnzoo.fused_attn(False):
        torch.testing.assert_close(ours(x), masked, **TOL)


def test_need_weights():
    ours = CrossFormerAttention(32, 2, 2, 3, "long", dtype=D).eval()
    x = x_of(2, 5, 7, 32)
    out, weights = ours(x, need_weights=True)
    torch.testing.assert_close(out, ours(x), **TOL)
    assert weights.shape == (2 * 18, 2, 4, 4)  # padded to 6 x 12: 2 regions of 6 x 6, 9 groups each
    pad = torch.ones(6, 12, dtype=torch.bool)
    pad[:5, :7] = False
    keys = group_partition(pad[None, :, :, None], (2, 2), (3, 3)).reshape(-1, 4).repeat(2, 1)  # (B*nG, N)
    some_real = ~keys.all(-1)  # groups of padding only attend among themselves (outputs dropped)
    assert some_real.sum() < len(some_real)
    on_padding = weights[some_real].masked_select(keys[some_real][:, None, None, :].expand(-1, 2, 4, -1))
    assert on_padding.numel() and torch.equal(on_padding, torch.zeros_like(on_padding))
    torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights.sum(-1)), **TOL)


def test_need_weights_without_padding_or_bias():
    ours = CrossFormerAttention(32, 4, 4, distance="short", position_bias=False, dtype=D).eval()
    x = x_of(1, 8, 8, 32)
    out, weights = ours(x, need_weights=True)
    assert weights.shape == (4, 4, 16, 16)
    torch.testing.assert_close(out, ours(x), **TOL)


def test_capture_gives_rows_over_the_map():
    ours = CrossFormerAttention(32, 2, 2, 2, "long", dtype=D).eval()
    x = x_of(1, 4, 4, 32)
    with attnzoo.capture_maps(ours, queries=[(0, 0), (3, 2)]) as maps:
        ours(x)
    (name, records), = maps.items()
    rows = records[-1].data  # (B, h, Q, H*W)
    assert rows.shape == (1, 2, 2, 16)
    _, weights = ours(x, need_weights=True)  # one region of 4 x 4, groups (i, j) = offsets
    torch.testing.assert_close(rows[0, :, 0, [0, 2, 8, 10]], weights[0, :, 0], **TOL)  # group (0, 0)
    torch.testing.assert_close(rows[0, :, 1, [4, 6, 12, 14]], weights[2, :, 3], **TOL)  # offsets (1, 0)
    torch.testing.assert_close(rows.sum(-1), torch.ones(1, 2, 2, dtype=D), **TOL)


def test_create_and_device_dtype():
    m = attnzoo.create("crossformer", 64)
    assert isinstance(m, CrossFormerAttention) and m.attn.pos.pos_dim == 4
    assert CrossFormerAttention(8, 2).attn.pos.pos_dim == 1  # the official one is 0 wide below dim 16
    assert type(attnzoo.create("lsda", 64)) is CrossFormerAttention
    meta = CrossFormerAttention(64, device="meta", dtype=D)
    assert all(p.device.type == "meta" and p.dtype == D for p in meta.parameters())


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"dim": 32, "distance": "middle"}, ValueError, "distance must be one of"),
        ({"dim": 30, "num_heads": 4}, ValueError, "num_heads"),
        ({"dim": 32, "group_size": 0}, ValueError, "group_size"),
        ({"dim": 32, "interval": (2, 0)}, ValueError, "interval"),
        ({"dim": 32, "group_size": (2, 2)}, TypeError, "group_size"),
    ],
)
def test_constructor_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        CrossFormerAttention(**kwargs)


def test_forward_errors():
    ours = CrossFormerAttention(32, 2, 2)
    with pytest.raises(ValueError, match=r"expects x of shape \(B, H, W, 32\)"):
        ours(torch.randn(1, 4, 4, 16))
    group = CrossFormerGroupAttention(32, 2, 2)
    with pytest.raises(ValueError, match=r"expects x of shape \(B, 4, 32\)"):
        group(torch.randn(3, 5, 32))
    with pytest.raises(ValueError, match=r"expects mask of shape \(nG, 4, 4\)"):
        group(torch.randn(6, 4, 32), torch.zeros(4, 4, 4))
    with pytest.raises(TypeError, match="dtype"):
        group(torch.randn(6, 4, 32, dtype=D))
    with pytest.raises(TypeError, match="num_heads"):
        CrossFormerGroupAttention(32, 2, 2.0)
