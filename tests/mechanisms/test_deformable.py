"""Deformable attention (DAT): fightingcv parity (float64, random weights), the paper's coordinates in
the canonical class, need_weights, the captured map, and the error messages."""

from __future__ import annotations

import warnings

import pytest
import torch
from tests.convert._parity import TOL, randomize, x_of

import attnzoo
from attnzoo import DeformableAttention
from attnzoo.convert import from_fightingcv
from attnzoo.functional import attend
from attnzoo.mechanisms.deformable_fightingcv import FightingcvDeformableAttention

D = torch.float64


def _dat():
    return pytest.importorskip("fightingcv_attention.attention.DAT", reason="fightingcv missing")


def _theirs(q=(8, 8), kv=None, heads=4, hc=4, groups=2, stride=1, factor=2, use_pe=True, dwc_pe=False,
            no_off=False, fixed_pe=False, stage=2):
    kv = q if kv is None else kv
    return _dat().DAttentionBaseline(q, kv, heads, hc, groups, 0.0, 0.0, stride, factor, use_pe, dwc_pe,
                                     no_off, fixed_pe, stage)


CONFIGS = [
    {},
    {"use_pe": False},
    {"dwc_pe": True},
    {"use_pe": False, "dwc_pe": True},
    {"use_pe": False, "fixed_pe": True},
    {"dwc_pe": True, "fixed_pe": True},
    {"stride": 2},
    {"factor": -1},
    {"factor": 0},
    {"groups": 1},
    {"groups": 4},
    {"q": (7, 5)},
    {"q": (5, 9), "stride": 2, "stage": 0},
    {"q": (9, 7), "stride": 3, "factor": -1, "stage": 3, "groups": 1, "heads": 3},
    {"q": (1, 6), "stage": 3},
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=[str(c) or "default" for c in CONFIGS])
def test_matches_fightingcv(cfg):
    theirs = randomize(_theirs(**cfg)).eval()
    ours = from_fightingcv(theirs)
    assert isinstance(ours, FightingcvDeformableAttention) and not ours.training
    size = cfg.get("q", (8, 8))
    xa, xb = x_of(2, theirs.nc, *size).requires_grad_(), x_of(2, theirs.nc, *size).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fightingcv's meshgrid without indexing=
        expected, pos, _ = theirs(xb)
    out = ours(xa)
    torch.testing.assert_close(out, expected, **TOL)
    g = torch.randn_like(out)
    out.backward(g)
    expected.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, **TOL)
    # the sampling points, fightingcv's (y, x) order
    ours_pos = ours.points(ours.proj_q(xa), D).flip(-1).reshape(pos.shape)
    torch.testing.assert_close(ours_pos, pos, **TOL)


@pytest.mark.parametrize(("cfg", "why"), [
    ({"no_off": True}, "no_off=True: its forward calls offset.fill"),
    ({"fixed_pe": True}, "fixed_pe=True: its forward reads self.n_sample"),
])
def test_refuses_what_fightingcv_cannot_run(cfg, why):
    theirs = _theirs(**cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(AttributeError):
            theirs(torch.randn(1, 16, 8, 8))
    with pytest.raises(TypeError, match=why):
        from_fightingcv(theirs)


def test_converted_needs_the_table_size():
    ours = from_fightingcv(_theirs(q=(6, 6)))
    with pytest.raises(ValueError, match=r"expects x of shape \(B, 16, 6, 6\) \(feat_size.*got H=7, W=6"):
        ours(torch.randn(1, 16, 7, 6))


def _canonical(**kwargs):
    torch.manual_seed(0)
    m = DeformableAttention(8, **{"num_heads": 2, "feat_size": (5, 6), **kwargs}, dtype=D).eval()
    if isinstance(m.rpe_table, torch.nn.Parameter):
        with torch.no_grad():
            m.rpe_table.normal_()
    return m


def test_no_offsets_stride_1_is_multi_head_attention_over_the_pixels():
    m = _canonical(no_off=True, use_pe=False, groups=2)
    x = x_of(2, 8, 5, 6)
    projections = (m.proj_q, m.proj_k, m.proj_v)
    heads = [p(x).reshape(2, 2, 4, 30).transpose(-1, -2) for p in projections]  # (B, h, N, d) each
    expected = m.proj_out(attend(*heads).transpose(-1, -2).reshape(2, 8, 5, 6))
    torch.testing.assert_close(m(x), expected, **TOL)
    assert m.conv_offset is None


def test_zero_offsets_read_the_bias_table_at_integer_displacements():
    m = _canonical()
    with torch.no_grad():
        m.conv_offset[3].weight.zero_()
    x = x_of(2, 8, 5, 6)
    pos = m.points(m.proj_q(x), D).reshape(2, 30, 2)
    idx = torch.arange(30)
    qy, qx = idx // 6, idx % 6
    expected = m.rpe_table[:, qy[:, None] - qy[None, :] + 4, qx[:, None] - qx[None, :] + 5]  # (h, N, N)
    torch.testing.assert_close(m._bias(pos, 2, 5, 6, x)[1], expected, **TOL)


@pytest.mark.parametrize("factor", [0.5, 2.0, 0.0])
def test_offsets_stay_within_the_range(factor):
    m = _canonical(offset_range_factor=factor, stride=2)
    with torch.no_grad():
        m.conv_offset[3].weight.mul_(100.0)
    pos = m.points(m.proj_q(x_of(2, 8, 5, 6)), D)  # (B*g, 3, 3, 2)
    reference = m._reference(3, 3, D, pos.device)
    step = 2 / (3 - 1)  # a grid step, normalised
    assert (pos - reference).abs().max() <= factor * step / 2 + 1e-12
    clamped = _canonical(offset_range_factor=-1.0).points(m.proj_q(x_of(2, 8, 5, 6)) * 100, D)
    assert clamped.abs().max() <= 1.0


@pytest.mark.parametrize("kwargs", [{}, {"fixed_pe": True, "stride": 2}, {"dwc_pe": True}, {"use_pe": False}])
def test_need_weights(kwargs):
    m = _canonical(groups=2, **kwargs)
    x = x_of(2, 8, 5, 6)
    y, w = m(x, need_weights=True)
    hk, wk = m.key_size(5, 6)
    assert w.shape == (2, 2, 30, hk * wk)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, 30, dtype=D), **TOL)
    torch.testing.assert_close(m(x), y, **TOL)


def _capture(m, x):
    with attnzoo.capture_maps(m) as maps:
        y = m(x)
    (record,) = next(iter(maps.values()))
    return y, record


def test_other_sizes_read_the_table_resized_and_capture_rows_over_the_pixels():
    m = _canonical(groups=2, stride=2)
    x = x_of(1, 8, 9, 4)
    y, record = _capture(m, x)
    assert y.shape == (1, 8, 9, 4)
    assert record.kind == "rows" and record.grid == (9, 4) and record.data.shape == (1, 2, 5, 36)
    assert torch.equal(record.queries, torch.tensor([18, 9, 11, 25, 27]))
    assert record.data.min() >= 0 and record.data.sum(-1).max() <= 1 + 1e-12  # outside shares dropped
    with torch.no_grad():
        m.conv_offset[3].weight.zero_()  # every key inside the map: rows sum to one
    _, record = _capture(m, x)
    torch.testing.assert_close(record.data.sum(-1), torch.ones(1, 2, 5, dtype=D), **TOL)
    # keys exactly on the pixels: the rows are the attention weights themselves
    m1 = _canonical(no_off=True, groups=2)
    x1 = x_of(1, 8, 5, 6)
    _, record = _capture(m1, x1)
    _, w1 = m1(x1, need_weights=True)
    torch.testing.assert_close(record.data, w1[:, :, record.queries], **TOL)


def test_for_input_and_create():
    assert attnzoo.get_spec("dat").for_input is not None
    assert attnzoo.create("dat", 64)(torch.randn(1, 64, 7, 9)).shape == (1, 64, 7, 9)
    m = attnzoo.create("deformable", 16, num_heads=4, stride=2, fixed_pe=True, feat_size=(6, 4))
    assert m.rpe_table.shape == (4, 24, 6)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"num_heads": 3}, "channels=8 must be divisible by num_heads=3"),
    ({"num_heads": 4, "groups": 3}, "num_heads=4 must be divisible by groups=3"),
    ({"dwc_pe": True, "fixed_pe": True}, "set one, got both"),
    ({"use_pe": False, "dwc_pe": True}, "need use_pe=True"),
    ({"offset_range_factor": float("inf")}, "offset_range_factor must be (a )?finite"),
    ({"feat_size": (3, 0)}, "feat_size must be >= 1"),
    ({"attn_drop": 1.5}, "attn_drop must be <= 1"),
])
def test_constructor_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DeformableAttention(8, **kwargs)


def test_input_errors():
    m = DeformableAttention(8, num_heads=2, fixed_pe=True, feat_size=(4, 4))
    with pytest.raises(ValueError, match=r"expects x of shape \(B, 8, H, W\) with C=8, got \(1, 6, 4, 4\)"):
        m(torch.randn(1, 6, 4, 4))
    with pytest.raises(ValueError, match=r"fixed_pe=True expects x of shape \(B, 8, 4, 4\).*got H=5, W=4"):
        m(torch.randn(1, 8, 5, 4))
    with pytest.raises(TypeError, match="floating-point"):
        m(torch.zeros(1, 8, 4, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="use_pe must be a bool"):
        DeformableAttention(8, use_pe="yes")  # type: ignore[arg-type]


def test_bilinear_sample_under_forward_ad_equals_grid_sample():
    """torch's grid sampler has no forward derivative; under forward-mode AD the corners are gathered
    with plain ops: the same values (points outside the map included) and tangents that match the
    reverse-mode derivative of grid_sample."""
    import torch.autograd.forward_ad as fwAD
    import torch.nn.functional as F

    from attnzoo.mechanisms._deformable import bilinear_sample

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, 7, generator=gen, dtype=torch.float64)
    grid = torch.rand(3, 6, 2, 2, generator=gen, dtype=torch.float64) * 2.6 - 1.3  # some points outside
    grid[0, :2] = torch.tensor([[-1.0, -1.0], [1 / 3, -0.5]], dtype=torch.float64)  # on pixel centres
    dx, dgrid = torch.randn_like(x), torch.randn_like(grid)
    sample = lambda a, b: F.grid_sample(a, b, mode="bilinear", padding_mode="zeros", align_corners=True)  # noqa: E731
    a, b = x.clone().requires_grad_(), grid.clone().requires_grad_()
    expected = sample(a, b)
    probe = torch.zeros_like(expected, requires_grad=True)  # J t = d/du <J^T u, t>
    ga, gb = torch.autograd.grad(expected, (a, b), probe, create_graph=True)
    (expected_tangent,) = torch.autograd.grad((ga * dx).sum() + (gb * dgrid).sum(), probe)
    with fwAD.dual_level():
        out = bilinear_sample(fwAD.make_dual(x, dx), fwAD.make_dual(grid, dgrid))
        value, tangent = fwAD.unpack_dual(out)
    torch.testing.assert_close(value, expected.detach(), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(tangent, expected_tangent, atol=1e-10, rtol=1e-10)
    _, by_func = torch.func.jvp(bilinear_sample, (x, grid), (dx, dgrid))
    torch.testing.assert_close(by_func, expected_tangent, atol=1e-10, rtol=1e-10)
