"""Halo attention (HaloNet): parity with timm's HaloAttn in float64, formula, errors, weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _token_mixing import D, check_parity, randomised

import attnzoo
from attnzoo import HaloAttention
from attnzoo.convert import convert, from_timm

timm_layers = pytest.importorskip("timm.layers", reason="timm is needed for the parity tests")
from timm.layers.halo_attn import HaloAttn  # noqa: E402

CASES = [
    # (timm module, input shape)
    (lambda: timm_layers.create_attn("halo", 32, block_size=4, halo_size=1), (2, 32, 8, 12)),
    (lambda: HaloAttn(12, num_heads=3, dim_head=5, block_size=3, halo_size=2, qkv_bias=True), (2, 12, 6, 9)),
    (lambda: HaloAttn(16, num_heads=4, block_size=4, halo_size=1, stride=2), (2, 16, 8, 8)),  # strided q
    # odd channels, dim_out != dim, odd block: stride 2 pools the output
    (lambda: HaloAttn(15, dim_out=24, num_heads=4, block_size=3, halo_size=1, stride=2), (2, 15, 6, 6)),
    (lambda: HaloAttn(16, num_heads=2, block_size=4, halo_size=2, stride=2, avg_down=True,
                      scale_pos_embed=True), (3, 16, 8, 4)),
    (lambda: HaloAttn(8, num_heads=1, block_size=2, halo_size=0, qk_ratio=2.0), (2, 8, 4, 2)),
]


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_from_timm_matches_timm_in_float64(case, training):
    build, shape = CASES[case]
    theirs = randomised(build())
    ours = from_timm(theirs)
    assert type(ours) is HaloAttention
    check_parity(theirs, ours, shape, training)


def test_create_loads_timms_state_dict():
    theirs = randomised(timm_layers.create_attn("halo", 64)).eval()  # block 8, halo 3, 8 heads
    ours = attnzoo.create("halo", 64, dtype=D).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(1, 64, 16, 8, dtype=D)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-10, rtol=0)
    assert type(convert(theirs)) is HaloAttention


@pytest.mark.parametrize("mask_padding", [False, True], ids=["zero_keys", "mask_padding"])
def test_formula_window_by_window(mask_padding):
    """Each query attends to the (b + 2 halo)^2 window around its block, zero-padded keys included
    (left out with `mask_padding`), with logits s q.k + q.(r^h[dy] + r^w[dx]) (offsets from the query
    to the key)."""
    b, halo, heads, d = 2, 1, 2, 3
    m = HaloAttention(4, num_heads=heads, head_dim=d, block_size=b, halo_size=halo, mask_padding=mask_padding)
    m = randomised(m).eval()
    x = torch.randn(1, 4, 4, 2, dtype=D)
    win = b + 2 * halo
    q = m.q(x).view(heads, d, 4, 2)  # (h, d, H, W)
    kv = F.pad(m.kv(x), [halo] * 4).view(heads, d + 2, 6, 4)  # (h, d + e, H + 2, W + 2)
    k, v = kv[:, :d], kv[:, d:]
    expected = torch.zeros(heads, 2, 4, 2, dtype=D)
    for h in range(heads):
        for y in range(4):
            for xq in range(2):
                y0, x0 = y // b * b, xq // b * b  # block corner; the window starts halo before it
                logits, values = [], []
                for wy in range(win):
                    for wx in range(win):
                        ky, kx = y0 + wy, x0 + wx  # padded coordinates
                        if mask_padding and not (halo <= ky < 4 + halo and halo <= kx < 2 + halo):
                            continue  # a padding key
                        rel = m.pos_embed.height_rel[wy - (y - y0) + win - 1]
                        rel = rel + m.pos_embed.width_rel[wx - (xq - x0) + win - 1]
                        qv = q[h, :, y, xq]
                        logits.append(qv @ k[h, :, ky, kx] * d**-0.5 + qv @ rel)
                        values.append(v[h, :, ky, kx])
                weights = torch.stack(logits).softmax(0)
                expected[h, :, y, xq] = weights @ torch.stack(values)
    out, weights = m(x, need_weights=True)
    torch.testing.assert_close(out, expected.reshape(1, 4, 4, 2), atol=1e-12, rtol=0)
    assert weights.shape == (1, heads, 2, b * b, win * win)
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, heads, 2, b * b, dtype=D))
    if mask_padding:  # block 0 (rows 0-1, cols 0-1): window rows -1..2, cols -1..2; the padding gets 0
        padding = torch.ones(win, win, dtype=torch.bool)
        padding[1:, 1:3] = False
        assert (weights[..., 0, :, padding.flatten()] == 0).all()
    with attnzoo.fused_attn(False):
        torch.testing.assert_close(m(x), out, atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"block_size": 2, "halo_size": 1},
        {"block_size": 4, "halo_size": 2, "stride": 2},  # strided queries
        {"block_size": 3, "halo_size": 1, "stride": 2, "scale_pos_embed": True},  # pooled output
        {"block_size": 2, "halo_size": 3, "qkv_bias": True},  # windows wider than the map
    ],
)
def test_mask_padding_renormalises_over_the_real_keys(kwargs):
    """With `mask_padding` the weights are the zero-key weights restricted to the keys on the map and
    renormalised; the padding values are zero, so the output before pooling is the zero-key output
    divided by the weight the real keys had. Blocks inside the map are unchanged."""
    plain = randomised(HaloAttention(8, num_heads=2, **kwargs)).eval()
    masked = HaloAttention(8, num_heads=2, mask_padding=True, **kwargs).to(D).eval()
    masked.load_state_dict(plain.state_dict())
    b, halo = kwargs["block_size"], kwargs["halo_size"]
    x = torch.randn(2, 8, 3 * b, 4 * b, dtype=D)
    y, w = plain(x, need_weights=True)
    y_m, w_m = masked(x, need_weights=True)
    real = masked._real_keys(3 * b, 4 * b, x.device)  # (nb, S)
    kept = w * real[:, None, :]  # (B, h, nb, L, S)
    torch.testing.assert_close(w_m, kept / kept.sum(-1, keepdim=True), atol=1e-12, rtol=0)
    inside = real.all(-1).reshape(3, 4)  # (bh, bw)
    assert inside.sum() == (2 if halo < b else 0)  # the middle row of blocks, except its ends
    if not plain.pool:  # unpooled: the output blockwise is y / (weight on the real keys)
        share = kept.sum(-1)  # (B, h, nb, L)
        qb = plain.query_block
        share = share.reshape(2, 2, 1, 3, 4, qb, qb).permute(0, 1, 2, 3, 5, 4, 6)  # (B, h, 1, bh, q, bw, q)
        expected = y.reshape(2, 2, 4, 3 * qb, 4 * qb) / share.reshape(2, 2, 1, 3 * qb, 4 * qb)
        torch.testing.assert_close(y_m, expected.reshape(y.shape), atol=1e-12, rtol=0)
    with attnzoo.fused_attn(False):
        torch.testing.assert_close(masked(x), y_m, atol=1e-12, rtol=0)
    with attnzoo.fused_attn(True):
        torch.testing.assert_close(masked(x), y_m, atol=1e-12, rtol=0)


def test_memory_is_local():
    """No N x N map: the weights have N * (b + 2 halo)^2 entries per head."""
    m = HaloAttention(8, num_heads=2, block_size=4, halo_size=1).eval()
    _, weights = m(torch.randn(1, 8, 32, 32), need_weights=True)
    assert weights.numel() == 2 * 32 * 32 * 6 * 6


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="num_heads"):
        HaloAttention(10, num_heads=4)
    with pytest.raises(ValueError, match="stride"):
        HaloAttention(8, stride=4)
    with pytest.raises(ValueError, match="halo_size"):
        HaloAttention(8, halo_size=-1)
    with pytest.raises(ValueError, match="block_size"):
        HaloAttention(8, block_size=4)(torch.randn(1, 8, 8, 6))
    with pytest.raises(ValueError, match="C=8"):
        HaloAttention(8, block_size=2)(torch.randn(1, 9, 4, 4))


def test_build_for_an_input_picks_a_dividing_block():
    from attnzoo.surgery.build import build

    built = build(attnzoo.get_spec("halo"), (2, 16, 6, 9))
    assert built.module.block_size == 3
    assert built.module(*built.inputs).shape == (2, 16, 6, 9)


@pytest.mark.parametrize("mask_padding", [False, True], ids=["zero_keys", "mask_padding"])
@pytest.mark.parametrize("stride", [1, 2])
def test_captured_rows_rebuild_the_output(stride, mask_padding):
    """Recorded rows over the whole map, weighted over the map's values, give the output (the padding
    keys have zero values, so dropping them from the rows changes nothing)."""
    m = HaloAttention(8, num_heads=2, block_size=2, halo_size=1, stride=stride, mask_padding=mask_padding)
    m = randomised(m).eval()
    x = torch.randn(1, 8, 6, 4, dtype=D)
    with attnzoo.capture_maps(m) as maps:
        y = m(x)
    (entry,) = [r for records in maps.values() for r in records]
    assert entry.kind == "rows" and entry.grid == (6, 4)
    values = m.kv(x)[:, :, :, :].view(1, 2, 8, 24)[:, :, 4:]  # (1, h, e, N): per head [k, v] channels
    rebuilt = torch.einsum("bhqn,bhen->bheq", entry.data, values).reshape(1, 8, -1)
    qh, qw = entry.query_grid
    torch.testing.assert_close(rebuilt, y.reshape(1, 8, qh * qw)[:, :, entry.queries], atol=1e-12, rtol=0)


def test_converted_module_is_an_independent_copy_in_timms_dtype_and_mode():
    theirs = randomised(HaloAttn(8, num_heads=2, block_size=2, halo_size=1)).train()
    ours = from_timm(theirs)
    assert ours.training and ours.q.weight.dtype == D
    with torch.no_grad():
        ours.q.weight.zero_()
    assert theirs.q.weight.abs().sum() > 0


def test_from_timm_refuses_a_subclass_that_overrides_forward():
    class Custom(HaloAttn):
        def forward(self, x):
            return x

    with pytest.raises(TypeError, match="overrides forward"):
        from_timm(Custom(8, num_heads=2, block_size=2, halo_size=1))
