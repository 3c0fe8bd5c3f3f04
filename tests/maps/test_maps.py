"""Map capture: recorded only inside the block, rows equal a float64 reference, the fused path stays fused."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import attnzoo
import attnzoo.functional as functional
from attnzoo.maps import DEFAULT_QUERIES, capture_maps, capturing, query_indices, record, record_rows


class ToySelfAttention(nn.Module):
    """Global single-head self-attention over a (B, C, H, W) map that records rows and a gate."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.qk = nn.Conv2d(channels, 2 * channels, 1)
        self.gate = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k = self.qk(x).flatten(2).transpose(1, 2).unsqueeze(1).chunk(2, dim=-1)  # (B, 1, N, C) each
        v = x.flatten(2).transpose(1, 2).unsqueeze(1)  # (B, 1, N, C)
        out = attnzoo.attend(q, k, v, causal=causal)
        gate = torch.sigmoid(self.gate(x.mean((2, 3))))  # (B, C)
        if capturing():
            record_rows(self, q, k, grid=(h, w), causal=causal)
            record(self, "channel", gate)
        return out.squeeze(1).transpose(1, 2).reshape(b, c, h, w) * gate[:, :, None, None]  # (B, C, H, W)


def _reference_rows(
    module: ToySelfAttention, x: torch.Tensor, idx: torch.Tensor, causal: bool
) -> torch.Tensor:
    q, k = module.qk(x).flatten(2).transpose(1, 2).chunk(2, dim=-1)  # (B, N, C)
    scores = q @ k.transpose(1, 2) / q.shape[-1] ** 0.5  # (B, N, N)
    if causal:
        n = scores.shape[-1]
        scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    return scores.softmax(-1)[:, idx]  # (B, Q, N)


@pytest.mark.parametrize("causal", [False, True])
def test_rows_equal_reference_for_chosen_queries(causal):
    model = nn.Sequential(nn.Identity(), ToySelfAttention(4)).double()
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    with capture_maps(model, queries=[(0.5, 0.5), (0, 0), (4, 5), (0.99, 0.0)]) as maps:
        model[1](model[0](x), causal)
    assert set(maps) == {"1"}
    rows, gate = maps["1"]
    assert rows.kind == "rows" and gate.kind == "channel"
    # (0.5, 0.5) -> (2, 3); (0, 0) -> 0; (4, 5) -> last; (0.99, 0.0) -> row 4, col 0.
    assert rows.queries.tolist() == [2 * 6 + 3, 0, 29, 24]
    assert rows.grid == (5, 6) and rows.query_grid == (5, 6)
    assert rows.data.shape == (2, 1, 4, 30)
    ref = _reference_rows(model[1], x, rows.queries, causal)
    torch.testing.assert_close(rows.data[:, 0], ref, atol=1e-12, rtol=1e-12)
    assert not rows.data.requires_grad
    assert gate.data.shape == (2, 4)


def test_nothing_recorded_and_no_weights_computed_outside_capture(monkeypatch):
    calls = []
    real = functional._attend_math

    def spy(*args, **kwargs):
        calls.append(args[-1])  # need_weights
        return real(*args, **kwargs)

    monkeypatch.setattr(functional, "_attend_math", spy)
    model = ToySelfAttention(4)
    x = torch.randn(1, 4, 3, 3)
    assert not capturing()
    model(x)
    assert calls == []  # the fused path only
    with capture_maps(model) as maps:
        assert capturing()
        model(x)
    assert not capturing()
    assert calls == [True]  # only the selected rows went through the math path
    model(x)  # calls after the block add nothing
    assert list(maps) == ["ToySelfAttention"]  # the root module is named by its class
    assert len(maps["ToySelfAttention"]) == 2


def test_default_queries_include_the_centre_and_are_unique():
    idx = query_indices((7, 7))
    assert idx[0].item() == 3 * 7 + 3
    assert len(idx) == len(DEFAULT_QUERIES)
    assert query_indices((1, 1)).tolist() == [0]  # every point falls on the one position
    # 1-D grids use the last coordinate; 3-D grids take the middle frame.
    assert query_indices((10,))[0].item() == 5
    assert query_indices((3, 4, 4))[0].item() == 1 * 16 + 2 * 4 + 2


def test_token_grid_places_queries_of_sequences_on_the_map():
    with capture_maps(token_grid=(4, 6)):
        assert query_indices((24,))[0].item() == 2 * 6 + 3  # the centre of the 4 x 6 map
        assert query_indices((10,))[0].item() == 5  # another length: a plain sequence
    with pytest.raises(ValueError, match="token_grid"):
        capture_maps(token_grid=(0, 3))


def test_nested_and_threads_are_isolated():
    model = ToySelfAttention(4)
    x = torch.randn(1, 4, 2, 2)
    seen_in_thread = []
    with capture_maps(model) as outer:
        with capture_maps(model) as inner:
            model(x)
        thread = threading.Thread(target=lambda: seen_in_thread.append(capturing()))
        thread.start()
        thread.join()
    assert seen_in_thread == [False]
    assert sum(len(v) for v in inner.values()) == 2
    assert outer == {}


def test_repeated_calls_are_listed_in_order():
    model = ToySelfAttention(4)
    with capture_maps(model) as maps:
        model(torch.randn(1, 4, 2, 2))
        model(torch.randn(3, 4, 2, 2))
    (records,) = maps.values()
    assert [r.data.shape[0] for r in records] == [1, 1, 3, 3]


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        capture_maps(queries=[(1.5, 0.5)])
    with pytest.raises(TypeError, match="int or float"):
        capture_maps(queries=[("a", 0)])
    with pytest.raises(ValueError, match="at least one"):
        capture_maps(queries=[])
    with pytest.raises(TypeError, match="nn.Module"):
        capture_maps("model")  # type: ignore[arg-type]
    with capture_maps(queries=[(9, 9)]):
        with pytest.raises(ValueError, match="outside a grid"):
            query_indices((3, 3))
        with pytest.raises(ValueError, match="kind"):
            record(nn.Identity(), "heat", torch.zeros(1))
        with pytest.raises(ValueError, match="cover"):
            record_rows(nn.Identity(), torch.zeros(1, 1, 5, 2), torch.zeros(1, 1, 5, 2), grid=(2, 2))


def test_exported():
    assert attnzoo.capture_maps is capture_maps


# ---------------------------------------------------------------------------------------------
# The families' records (each test skips until its family is registered)


def _create(name: str, **kwargs):
    if name not in {s.name for s in attnzoo.list_modules()}:
        pytest.skip(f"{name!r} is not registered (its family has not been merged)")
    torch.manual_seed(0)
    return attnzoo.create(name, **kwargs).double().eval()


def _only(maps, kind):
    found = [m for records in maps.values() for m in records if m.kind == kind]
    assert len(found) == 1, {k: [m.kind for m in v] for k, v in maps.items()}
    return found[0]


def test_se_records_its_channel_gate():
    se = _create("se", channels=8, reduction=2)
    x = torch.randn(2, 8, 5, 4, dtype=torch.float64)
    with capture_maps(se) as maps:
        out = se(x)
    gate = _only(maps, "channel").data
    assert gate.shape == (2, 8)
    torch.testing.assert_close(out, x * gate[:, :, None, None], atol=1e-12, rtol=1e-12)


def test_cbam_records_channel_and_spatial_gates_that_rebuild_the_output():
    cbam = _create("cbam", channels=8, reduction=2, kernel_size=3)
    x = torch.randn(2, 8, 6, 5, dtype=torch.float64, requires_grad=True)
    with capture_maps(cbam) as maps:
        out = cbam(x)
    out.sum().backward()  # the training path records too, once per forward
    assert set(maps) == {"ca", "sa"}
    channel, spatial = maps["ca"][0], maps["sa"][0]
    assert len(maps["ca"]) == 1 and channel.data.shape == (2, 8)
    assert spatial.kind == "spatial" and spatial.data.shape == (2, 6, 5) and spatial.grid == (6, 5)
    expected = x * channel.data[:, :, None, None] * spatial.data[:, None]
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


def test_sk_records_branch_weights_that_rebuild_the_output():
    sk = _create("sk", channels=4, num_branches=3, groups=2, min_rd_channels=2)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    with capture_maps(sk) as maps:
        out = sk(x)
    weights = _only(maps, "branch").data  # (B, M, C)
    assert weights.shape == (2, 3, 4)
    torch.testing.assert_close(weights.sum(1), torch.ones(2, 4, dtype=torch.float64))
    branches = torch.stack([conv(x) for conv in sk.convs], 1)  # (B, M, C, H, W)
    torch.testing.assert_close(out, (branches * weights[..., None, None]).sum(1), atol=1e-12, rtol=1e-12)


def test_dual_gated_records_its_channel_and_spatial_gates():
    dual = _create("dual_gated", channels=4)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    with capture_maps(dual) as maps:
        dual(x)
    (records,) = maps.values()
    assert [m.kind for m in records] == ["channel", "spatial"]
    torch.testing.assert_close(records[0].data, torch.sigmoid(x.amax((2, 3))))
    mid = x + dual.channel_attention(x * records[0].data[:, :, None, None])
    torch.testing.assert_close(records[1].data, torch.sigmoid(mid.amax(1)), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_mha_rows_equal_its_weights(causal, monkeypatch):
    mha = _create("mha", dim=8, num_heads=2)
    q, kv = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(2, 5, 8, dtype=torch.float64)
    key_mask = torch.ones(2, 5, dtype=torch.bool)
    key_mask[1, 3:] = False
    _, weights = mha(q, kv, kv, need_weights=True, key_mask=key_mask, causal=causal)
    calls = []
    real = functional._attend_math
    monkeypatch.setattr(functional, "_attend_math", lambda *a, **k: calls.append(a[-1]) or real(*a, **k))
    mha(q, kv, kv, key_mask=key_mask, causal=causal)
    assert calls == []  # not capturing: the fused path
    with capture_maps(mha, queries=[0.0, 0.5, 1]) as maps:
        out = mha(q, kv, kv, key_mask=key_mask, causal=causal)
    rows = _only(maps, "rows")
    assert rows.queries.tolist() == [0, 2, 1] and rows.grid == (5,)
    torch.testing.assert_close(rows.data, weights[:, :, rows.queries], atol=1e-12, rtol=1e-12)
    assert calls == [True] and out.shape == (2, 5, 8)


def test_window_attention_records_every_window_row():
    attn = _create("window", dim=8, window_size=(2, 3), num_heads=2)
    x = torch.randn(4, 6, 8, dtype=torch.float64)
    mask = torch.zeros(2, 6, 6, dtype=torch.float64)
    mask[1, :, :2] = -100.0
    with capture_maps(attn) as maps:
        attn(x, mask=mask)
    rows = _only(maps, "rows")
    assert rows.data.shape == (4, 2, 6, 6) and rows.grid == (2, 3)
    q, k, _ = attn.qkv(x).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4)  # 3 x (B, h, N, d)
    bias = functional.gather_relative_bias(attn.relative_position_bias_table, attn.relative_position_index)
    logits = q @ k.transpose(-1, -2) * attn.scale + bias + mask.repeat(2, 1, 1)[:, None]
    torch.testing.assert_close(rows.data, logits.softmax(-1), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("shift", [(0, 0), (1, 1)])
def test_shifted_window_rows_over_the_map_rebuild_the_output(shift):
    swin = _create("shifted_window", dim=8, window_size=(2, 3), num_heads=2, shift_size=shift)
    x = torch.randn(2, 4, 6, 8, dtype=torch.float64)  # (B, H, W, C), sizes divisible by the window
    points = [(0, 0), (3, 5), (1, 2), (2, 4)]
    with capture_maps(swin, queries=points) as maps:
        out = swin(x)
    assert list(maps) == ["ShiftedWindowAttention"]  # the window record became a map record
    rows = _only(maps, "rows")
    assert rows.grid == (4, 6) and rows.data.shape == (2, 2, 4, 24)
    assert rows.queries.tolist() == [0, 23, 8, 16]
    torch.testing.assert_close(rows.data.sum(-1), torch.ones(2, 2, 4, dtype=torch.float64))
    assert ((rows.data > 0).sum(-1) == 6).all()  # one window of 2 x 3 keys
    v = swin.attn.qkv(x.reshape(2, 24, 8))[..., 16:].unflatten(-1, (2, 4))  # (B, HW, h, d)
    mixed = torch.einsum("bhqk,bkhd->bqhd", rows.data, v).flatten(2)  # (B, Q, C)
    torch.testing.assert_close(
        swin.attn.proj(mixed), out.reshape(2, 24, 8)[:, rows.queries], atol=1e-10, rtol=1e-10
    )


def test_temporal_rows_equal_a_reference():
    attn = _create("temporal", dim=8, num_frames=5, num_heads=2, qkv_bias=True)
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    with capture_maps(attn) as maps:
        attn(x)
    rows = _only(maps, "rows")
    q, k, _ = attn.qkv(x).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4)  # 3 x (B, h, T, d)
    table = attn.relative_position_bias_table
    bias = functional.gather_relative_bias(table, attn.relative_coords.view(5, 5))
    full = (q @ k.transpose(-1, -2) * attn.scale + bias).softmax(-1)
    torch.testing.assert_close(rows.data, full[:, :, rows.queries], atol=1e-12, rtol=1e-12)


def test_self_attention_block_rows_are_causal():
    block = _create("self_attention_block", dim=8, num_heads=2, head_dim=4, causal=True)
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    with capture_maps(block, queries=[0.0, 0.5]) as maps:
        block(x)
    rows = _only(maps, "rows")
    assert rows.queries.tolist() == [0, 3]
    _, weights = block(x, need_weights=True)  # (B, h, L, L)
    torch.testing.assert_close(rows.data, weights[:, :, rows.queries], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(rows.data.sum(-1), torch.ones(2, 2, 2, dtype=torch.float64))
    assert (rows.data[:, :, 0, 1:] == 0).all() and (rows.data[:, :, 1, 4:] == 0).all()


def _routed_reference(attn, r_idx, queries, size, n_win, region, heads):
    """Image rows from the module's own weights ``(N*R, h, L, topk*L)`` and its routing."""
    (height, width), (rh, rw) = size, region
    n, regions, topk = r_idx.shape
    expected = torch.zeros(n, heads, len(queries), height * width, dtype=attn.dtype)
    for qi, flat in enumerate(queries.tolist()):
        y, x = divmod(flat, width)
        home, local = (y // rh) * n_win + x // rw, (y % rh) * rw + x % rw
        for b in range(n):
            row = attn[b * regions + home, :, local]  # (h, topk*L)
            for t, region_index in enumerate(r_idx[b, home].tolist()):
                ry, rx = divmod(region_index, n_win)
                for m in range(rh * rw):
                    py, px = ry * rh + m // rw, rx * rw + m % rw
                    expected[b, :, qi, py * width + px] += row[:, t * rh * rw + m]
    return expected


@pytest.mark.parametrize("soft_routing", [False, True])
def test_bra_records_its_routing_and_rows_over_the_routed_regions(soft_routing):
    bra = _create("bra", dim=8, num_heads=2, n_win=2, topk=2, soft_routing=soft_routing, side_dwconv=0)
    x = torch.randn(2, 4, 6, 8, dtype=torch.float64)  # (N, H, W, C): regions of 2 x 3
    with torch.no_grad():
        _, r_weight, r_idx, attn = bra._forward(x, need_weights=True)
    with capture_maps(bra, queries=[(0, 0), (3, 5), (0.5, 0.5)]) as maps:
        bra(x)
    (routing, rows) = maps["BiLevelRoutingAttention"]
    assert routing.kind == "routing" and routing.grid == (2, 2)
    assert torch.equal(routing.data, r_idx)
    torch.testing.assert_close(routing.meta["weights"], r_weight)
    assert rows.kind == "rows" and rows.grid == (4, 6) and rows.data.shape == (2, 2, 3, 24)
    expected = _routed_reference(attn, r_idx, rows.queries, (4, 6), 2, (2, 3), 2)
    torch.testing.assert_close(rows.data, expected, atol=1e-12, rtol=1e-12)


def test_routing_records_the_regions_of_the_capture_query_points():
    # The regions were left to the plot, which resolved them after the capture closed: always the defaults.
    bra = _create("bra_nchw", channels=8, num_heads=2, n_win=4, topk=2)
    with torch.no_grad(), capture_maps(bra, queries=[(0.0, 0.0), (0.0, 1.0), (7, 0)]) as maps:
        bra(torch.randn(1, 8, 8, 12, dtype=torch.float64))
    routing = _only(maps, "routing")
    assert routing.grid == (4, 4) and routing.queries.tolist() == [0, 3, 12]  # (7, 0) -> region (3, 0)


def test_bra_nchw_records_routing_and_rows():
    bra = _create("bra_nchw", channels=8, num_heads=2, n_win=2, topk=3)
    x = torch.randn(1, 8, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        _, attn = bra(x, need_weights=True)  # (N, h, R, L, topk*L)
    with capture_maps(bra) as maps:
        bra(x)
    routing, rows = _only(maps, "routing"), _only(maps, "rows")
    assert routing.grid == (2, 2) and routing.data.shape == (1, 4, 3)
    attn = attn.transpose(1, 2).flatten(0, 1)  # (N*R, h, L, topk*L)
    expected = _routed_reference(attn, routing.data, rows.queries, (4, 4), 2, (2, 2), 2)
    torch.testing.assert_close(rows.data, expected, atol=1e-12, rtol=1e-12)


def test_acmix_rows_are_the_local_attention_of_the_attention_branch():
    from attnzoo.mechanisms.acmix import position_grid, reflect_pad

    acmix = _create("acmix", channels=4, out_channels=8, kernel_att=3, num_heads=2)
    x = torch.randn(1, 4, 6, 7, dtype=torch.float64)
    with capture_maps(acmix, queries=[(2, 3), (0, 0)]) as maps:
        acmix(x)
    rows = _only(maps, "rows")
    assert rows.grid == (6, 7) and rows.data.shape == (1, 2, 2, 42)
    torch.testing.assert_close(rows.data.sum(-1), torch.ones(1, 2, 2, dtype=torch.float64))
    # Reference: logits q . (k - pe) over the 3 x 3 neighbourhood, keys reflected at the border.
    d = 4
    q = acmix.conv1(x).view(1, 2, d, 6, 7) * d**-0.5
    k = (acmix.conv2(x) - acmix.conv_p(position_grid(6, 7, x.dtype, x.device)).repeat(1, 2, 1, 1)).view(
        1, 2, d, 6, 7
    )
    k_pad = reflect_pad(k.view(2, d, 6, 7), 1).view(1, 2, d, 8, 9)
    for qi, (y, x0) in enumerate([(2, 3), (0, 0)]):
        window = k_pad[0, :, :, y : y + 3, x0 : x0 + 3].flatten(-2)  # (h, d, 9)
        weights = torch.einsum("hd,hdk->hk", q[0, :, :, y, x0], window).softmax(-1)  # (h, 9)
        expected = torch.zeros(2, 6, 7, dtype=torch.float64)
        for j in range(9):
            py, px = abs(y + j // 3 - 1), abs(x0 + j % 3 - 1)  # reflection at the top/left border
            expected[:, py, px] += weights[:, j]
        torch.testing.assert_close(rows.data[0, :, qi], expected.flatten(1), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize(
    "name, kwargs, shape, key_grid",
    [
        ("sagan", {"channels": 8, "rd_channels": 2}, (2, 8, 6, 6), (6, 6)),
        ("channel_self_attention", {"channels": 8, "out_channels": 4}, (2, 8, 6, 6), (4,)),
        ("nonlocal", {"channels": 8}, (2, 8, 6, 6), (3, 3)),
        ("nonlocal", {"channels": 8, "pool_keys": False, "pairwise": "gaussian"}, (2, 8, 6, 6), (6, 6)),
        ("nonlocal", {"channels": 8, "pairwise": "dot_product"}, (2, 8, 6, 6), (3, 3)),
        ("nonlocal", {"channels": 8, "pairwise": "concatenation", "pool_keys": False}, (2, 8, 6, 6), (6, 6)),
    ],
)
def test_global_attention_rows_match_the_full_map(name, kwargs, shape, key_grid):
    """Captured rows equal the corresponding rows of the module's own full attention map."""
    torch.manual_seed(0)
    module = attnzoo.create(name, **kwargs).eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        _, full = module(x, need_weights=True)  # (B, L, S)
        with attnzoo.capture_maps(module) as maps:
            out = module(x)
    assert out.shape[0] == x.shape[0] and out.shape[2:] == x.shape[2:]
    (records,) = maps.values()
    rec = records[0]
    assert rec.kind == "rows" and rec.grid == key_grid
    torch.testing.assert_close(rec.data[:, 0], full[:, rec.queries], atol=1e-5, rtol=1e-4)
def test_sagan_rows_equal_its_attention_map():
    sagan = _create("sagan", channels=8, rd_channels=2)
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64)
    _, full = sagan(x, need_weights=True)  # (B, N, N)
    with capture_maps(sagan) as maps:
        sagan(x)
    rows = _only(maps, "rows")
    assert rows.grid == (5, 6) and rows.query_grid == (5, 6)
    torch.testing.assert_close(rows.data[:, 0], full[:, rows.queries], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize(
    "mode, dimension, shape",
    [
        ("embedded_gaussian", 2, (2, 4, 6, 5)),
        ("gaussian", 2, (1, 4, 4, 4)),
        ("dot_product", 3, (1, 4, 3, 4, 4)),
        ("concatenation", 1, (2, 4, 8)),
    ],
)
def test_nonlocal_rows_equal_its_attention_map(mode, dimension, shape):
    block = _create("nonlocal", channels=4, rd_channels=2, pairwise=mode, spatial_dims=dimension)
    x = torch.randn(*shape, dtype=torch.float64)
    _, full = block(x, need_weights=True)  # (B, N, N')
    with capture_maps(block) as maps:
        block(x)
    rows = _only(maps, "rows")
    spatial = shape[2:]
    pooled = (
        spatial[:-2] + (spatial[-2] // 2, spatial[-1] // 2)
        if dimension == 3
        else tuple(s // 2 for s in spatial)
    )
    assert rows.query_grid == spatial and rows.grid == pooled
    torch.testing.assert_close(rows.data[:, 0], full[:, rows.queries], atol=1e-12, rtol=1e-12)
