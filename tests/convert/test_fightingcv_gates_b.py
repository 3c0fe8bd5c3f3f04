"""from_fightingcv, group b (gates): fightingcv-attention's PSA, polarized self-attention (parallel and
sequential), DoubleAttention and S2Attention -> the canonical classes, float64 outputs within 1e-10 of
the real modules, and the canonical classes against the papers' formulas."""

from __future__ import annotations

import pytest
import torch
from _parity import TOL, D, randomize, x_of
from torch import nn

import attnzoo
from attnzoo import PyramidSplitAttention
from attnzoo.convert import convert, from_fightingcv

WHY = "fightingcv_attention is not installed"
psa_mod = pytest.importorskip("fightingcv_attention.attention.PSA", reason=WHY)


# ---------------------------------------------------------------------------------------------
# PSA


def fcv_psa(channels: int, reduction: int, s: int) -> nn.Module:
    theirs = psa_mod.PSA(channel=channels, reduction=reduction, S=s)
    return randomize(theirs, extra=(*theirs.convs, *theirs.se_blocks))


@pytest.mark.parametrize(
    ("channels", "reduction", "s", "size"),
    [(64, 4, 4, (7, 7)), (48, 2, 3, (5, 9)), (32, 8, 2, (6, 1)), (30, 1, 5, (3, 4)), (8, 1, 1, (4, 4))],
)
def test_psa_matches_fightingcv(channels, reduction, s, size):
    theirs = fcv_psa(channels, reduction, s)
    ours = from_fightingcv(theirs)
    assert type(ours) is PyramidSplitAttention and ours.split_input and not ours.shared_se
    x = x_of(2, channels, *size)
    with torch.no_grad():
        expected = theirs(x.clone())  # fightingcv writes its branch outputs into its input
        torch.testing.assert_close(ours(x), expected, **TOL)


def test_psa_convert_keeps_dtype_and_mode_and_copies():
    theirs = fcv_psa(16, 2, 4).train()
    ours = convert(theirs)
    assert isinstance(ours, PyramidSplitAttention) and ours.training
    assert ours.convs[0].weight.dtype == D
    with torch.no_grad():
        theirs.convs[0].weight.zero_()
    assert ours.convs[0].weight.abs().sum() > 0


def test_psa_canonical_follows_the_official_module():
    """The default module is the official PSAModule: every branch convolves the whole input
    (grouped), one biased SE module is shared, softmax across the branches."""
    ours = randomize(PyramidSplitAttention(64, dtype=D))
    x = x_of(2, 64, 5, 6)
    feats = [conv(x) for conv in ours.convs]  # each (B, 16, H, W)
    assert [c.groups for c in ours.convs] == [1, 4, 8, 16]
    assert [c.kernel_size for c in ours.convs] == [(3, 3), (5, 5), (7, 7), (9, 9)]
    assert ours.convs[0].bias is None and ours.fc1.bias is not None and ours.fc1.out_channels == 1

    def se(f: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(ours.fc2(torch.relu(ours.fc1(f.mean((2, 3), keepdim=True)))))

    z = torch.stack([se(f) for f in feats], 1)  # (B, 4, 16, 1, 1)
    a = z.softmax(1)
    expected = torch.cat([f * a[:, i] for i, f in enumerate(feats)], 1)
    out, weights = ours(x, need_weights=True)
    torch.testing.assert_close(out, expected, **TOL)
    torch.testing.assert_close(weights, a[..., 0, 0], **TOL)
    torch.testing.assert_close(weights.sum(1), torch.ones(2, 16, dtype=D), **TOL)


def test_psa_errors_name_the_argument():
    with pytest.raises(ValueError, match="channels=30 must be divisible by len\\(kernel_sizes\\)=4"):
        PyramidSplitAttention(30)
    with pytest.raises(ValueError, match="branch \\(C / S\\)=8 must be divisible by groups=16"):
        PyramidSplitAttention(32, groups=(1, 4, 8, 16))
    assert [c.groups for c in PyramidSplitAttention(16).convs] == [1, 4, 4, 4]
    with pytest.raises(ValueError, match="kernel_sizes must be odd"):
        PyramidSplitAttention(64, kernel_sizes=(3, 4, 5, 7))
    with pytest.raises(ValueError, match="one entry per kernel size"):
        PyramidSplitAttention(64, groups=(1, 2))
    with pytest.raises(ValueError, match="expects x of shape \\(B, 64, H, W\\)"):
        attnzoo.create("psa", 64)(torch.randn(2, 32, 5, 5))


# ---------------------------------------------------------------------------------------------
# Polarized self-attention

polar_mod = pytest.importorskip("fightingcv_attention.attention.PolarizedSelfAttention", reason=WHY)
POLAR = [
    (polar_mod.ParallelPolarizedSelfAttention, attnzoo.ParallelPolarizedSelfAttention),
    (polar_mod.SequentialPolarizedSelfAttention, attnzoo.SequentialPolarizedSelfAttention),
]


@pytest.mark.parametrize("pair", range(2))
@pytest.mark.parametrize(("channels", "size"), [(64, (7, 7)), (9, (5, 3)), (2, (1, 6)), (33, (4, 4))])
def test_polarized_matches_fightingcv(pair, channels, size):
    fcv_cls, cls = POLAR[pair]
    theirs = randomize(fcv_cls(channel=channels)).eval()
    ours = from_fightingcv(theirs)
    assert type(ours) is cls
    xa, xb = x_of(3, channels, *size).requires_grad_(), x_of(3, channels, *size).requires_grad_()
    out_a, out_b = ours(xa), theirs(xb)
    torch.testing.assert_close(out_a, out_b, **TOL)
    g = torch.randn_like(out_b)
    out_a.backward(g)
    out_b.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, **TOL)
    out, gate = ours(xa, need_weights=True)
    torch.testing.assert_close(out, xa * gate, **TOL)


def test_polarized_official_form_and_state_dict():
    """`bias=False, layer_norm=False` is the official code's form: no LayerNorm, no biases."""
    ours = attnzoo.ParallelPolarizedSelfAttention(16, bias=False, layer_norm=False, dtype=D)
    assert sorted(ours.state_dict()) == sorted(
        f"{n}.weight" for n in ("ch_wv", "ch_wq", "ch_wz", "sp_wv", "sp_wq")
    )
    randomize(ours)
    x = x_of(2, 16, 3, 5)
    flat = x.flatten(2)
    p = torch.einsum("oc,bcn->bon", ours.ch_wq.weight[:, :, 0, 0], flat).softmax(-1)  # (B, 1, N)
    v = torch.einsum("oc,bcn->bon", ours.ch_wv.weight[:, :, 0, 0], flat)  # (B, 8, N)
    a_ch = torch.sigmoid(ours.ch_wz.weight[:, :, 0, 0] @ (v @ p.transpose(1, 2)))  # (B, 16, 1)
    q = (ours.sp_wq.weight[:, :, 0, 0] @ flat.mean(-1, keepdim=True)).softmax(1)  # (B, 8, 1)
    a_sp = torch.sigmoid(q.transpose(1, 2) @ torch.einsum("oc,bcn->bon", ours.sp_wv.weight[:, :, 0, 0], flat))
    expected = (flat * a_ch + flat * a_sp).reshape_as(x)
    torch.testing.assert_close(ours(x), expected, **TOL)


# ---------------------------------------------------------------------------------------------
# DoubleAttention (A²-Nets)

a2_mod = pytest.importorskip("fightingcv_attention.attention.A2Atttention", reason=WHY)


@pytest.mark.filterwarnings("ignore:Implicit dimension choice")
@pytest.mark.parametrize(
    ("channels", "c_m", "c_n", "reconstruct", "shape"),
    [(64, 16, 16, True, (3, 7, 7)), (12, 5, 3, True, (2, 5, 3)), (10, 4, 7, False, (4, 1, 6)),
     (8, 8, 2, True, (1, 3, 3))],
)
def test_double_attention_matches_fightingcv(channels, c_m, c_n, reconstruct, shape):
    theirs = randomize(a2_mod.DoubleAttention(channels, c_m, c_n, reconstruct))
    ours = from_fightingcv(theirs)
    assert type(ours) is attnzoo.DoubleAttention and ours.softmax_over == "batch"
    b, h, w = shape
    xa, xb = x_of(b, channels, h, w).requires_grad_(), x_of(b, channels, h, w).requires_grad_()
    out_a, out_b = ours(xa), theirs(xb)
    torch.testing.assert_close(out_a, out_b, **TOL)
    g = torch.randn_like(out_b)
    out_a.backward(g)
    out_b.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, **TOL)


@pytest.mark.parametrize("reconstruct", [True, False])
def test_double_attention_follows_the_paper(reconstruct):
    """Gathering maps: softmax over the positions; distribution vectors: softmax over descriptors."""
    ours = randomize(attnzoo.DoubleAttention(12, rd_channels=5, num_descriptors=3, reconstruct=reconstruct,
                                             dtype=D))
    x = x_of(2, 12, 4, 5)
    a, bm, v = ours.convA(x).flatten(2), ours.convB(x).flatten(2), ours.convV(x).flatten(2)
    g = a @ bm.softmax(-1).transpose(1, 2)  # (B, 5, 3)
    z = (g @ v.softmax(1)).reshape(2, 5, 4, 5)
    expected = ours.conv_reconstruct(z) if reconstruct else z
    out, maps = ours(x, need_weights=True)
    torch.testing.assert_close(out, expected, **TOL)
    torch.testing.assert_close(maps.sum((2, 3)), torch.ones(2, 3, dtype=D), **TOL)


def test_double_attention_rejects_bad_options():
    with pytest.raises(ValueError, match="softmax_over must be one of"):
        attnzoo.DoubleAttention(8, softmax_over="channels")
    with pytest.raises(ValueError, match="num_descriptors must be >= 1"):
        attnzoo.DoubleAttention(8, num_descriptors=0)


# ---------------------------------------------------------------------------------------------
# S2Attention (S²-MLPv2)

s2_mod = pytest.importorskip("fightingcv_attention.attention.S2Attention", reason=WHY)


@pytest.mark.parametrize(("b", "h", "w"), [(2, 7, 7), (1, 5, 3), (3, 1, 4), (2, 2, 1)])
def test_s2_matches_fightingcv(b, h, w):
    """fightingcv's S2Attention runs only for 512 channels (its split attention is built for 512)."""
    theirs = randomize(s2_mod.S2Attention(channels=512), seed=3)
    with torch.no_grad():  # keep the softmax logits moderate: random N(0, 1/4) weights at C = 512
        for p in theirs.parameters():
            p.mul_(0.1)
    ours = from_fightingcv(theirs)
    assert type(ours) is attnzoo.S2Attention and ours.shift == "fightingcv"
    xa, xb = x_of(b, 512, h, w).requires_grad_(), x_of(b, 512, h, w).requires_grad_()
    out_a, out_b = ours(xa), theirs(xb)
    torch.testing.assert_close(out_a, out_b, **TOL)
    g = torch.randn_like(out_b)
    out_a.backward(g)
    out_b.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, **TOL)


def test_s2_refuses_fightingcvs_broken_widths():
    with pytest.raises(TypeError, match="split attention is built for 512 channels"):
        from_fightingcv(s2_mod.S2Attention(channels=64))


def paper_shift(t: torch.Tensor, plan: list[tuple[int, int]]) -> torch.Tensor:
    """The paper's pseudo-code, out of place: `out[:, 1:] = t[:, :-1]` leaves out[:, 0] = t[:, 0]."""
    out = t.clone()
    c = t.shape[-1]
    bounds = (0, c // 4, c // 2, c * 3 // 4, c)
    for i, (dim, step) in enumerate(plan):
        sl = slice(bounds[i], bounds[i + 1])
        n = t.shape[dim]
        src = [slice(None)] * 3 + [sl]
        dst = [slice(None)] * 3 + [sl]
        src[dim], dst[dim] = (slice(0, n - 1), slice(1, n)) if step > 0 else (slice(1, n), slice(0, n - 1))
        out[tuple(dst)] = t[tuple(src)]
    return out


@pytest.mark.parametrize(("channels", "size"), [(8, (5, 6)), (13, (3, 7)), (64, (4, 4))])
def test_s2_follows_the_paper(channels, size):
    ours = randomize(attnzoo.S2Attention(channels, dtype=D))
    x = x_of(2, channels, *size)
    t = ours.mlp1(x.permute(0, 2, 3, 1))
    x1 = paper_shift(t[..., :channels], [(1, 1), (1, -1), (2, 1), (2, -1)])
    x2 = paper_shift(t[..., channels:2 * channels], [(2, 1), (2, -1), (1, 1), (1, -1)])
    x_all = torch.stack([x1, x2, t[..., 2 * channels:]], 1)  # (B, 3, H, W, C)
    a = x_all.sum((1, 2, 3))
    weights = ours.split_attention.mlp2(torch.nn.functional.gelu(ours.split_attention.mlp1(a)))
    weights = weights.reshape(2, 3, channels).softmax(1)
    expected = ours.mlp2((x_all * weights[:, :, None, None]).sum(1)).permute(0, 3, 1, 2)
    out, got = ours(x, need_weights=True)
    torch.testing.assert_close(out, expected, **TOL)
    torch.testing.assert_close(got, weights, **TOL)
