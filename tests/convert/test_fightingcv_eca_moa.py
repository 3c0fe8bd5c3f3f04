"""from_fightingcv for ECAAttention, the MOA transformer's GlobalAttention and WindowAttention, and
CoAtNet's attention stages: float64 outputs (and input gradients) within 1e-10 of the real modules."""

from __future__ import annotations

import copy

import pytest
import torch
from _parity import TOL, D, randomize, x_of

import attnzoo
from attnzoo import EfficientChannelAttention, WindowAttention
from attnzoo.convert import convert, from_fightingcv
from attnzoo.mechanisms.moa import LegacyOverlappedAttention

WHY = "fightingcv_attention is not installed"
eca_mod = pytest.importorskip("fightingcv_attention.attention.ECAAttention", reason=WHY)
moa_mod = pytest.importorskip("fightingcv_attention.attention.MOATransformer", reason=WHY)
coat_mod = pytest.importorskip("fightingcv_attention.attention.CoAtNet", reason=WHY)
sa_mod = pytest.importorskip("fightingcv_attention.attention.SelfAttention", reason=WHY)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # fightingcv's torch.meshgrid


# ---------------------------------------------------------------------------------------------
# ECAAttention


@pytest.mark.parametrize(
    ("kernel", "channels", "size"),
    [(3, 64, (7, 7)), (1, 8, (5, 3)), (5, 24, (9, 1)), (7, 3, (4, 6)), (9, 130, (3, 5))],
)
def test_eca_matches_fightingcv(kernel, channels, size):
    theirs = randomize(eca_mod.ECAAttention(kernel_size=kernel))
    ours = from_fightingcv(theirs)
    assert type(ours) is EfficientChannelAttention and type(convert(theirs)) is EfficientChannelAttention
    assert ours.kernel_size == kernel and ours.conv.bias is not None and ours.channels is None
    x = x_of(2, channels, *size)
    torch.testing.assert_close(ours(x), theirs(x), **TOL)
    # The gate against the formula: sigmoid(conv1d(mean, w, b, zero padding)).
    out, gate = ours(x, need_weights=True)
    conv = theirs.conv
    expected = torch.sigmoid(torch.nn.functional.conv1d(x.mean((2, 3))[:, None], conv.weight, conv.bias,
                                                        padding=(kernel - 1) // 2))[:, 0]
    torch.testing.assert_close(gate, expected, **TOL)


def test_eca_even_kernel_is_refused():
    theirs = eca_mod.ECAAttention(kernel_size=4)
    with pytest.raises(RuntimeError):  # fightingcv itself fails: C - 1 gates
        theirs(torch.randn(1, 8, 3, 3))
    with pytest.raises(TypeError, match="kernel_size=4 is even"):
        from_fightingcv(theirs)


# ---------------------------------------------------------------------------------------------
# MOA GlobalAttention


def fcv_moa(dim, window, res, heads, **kwargs):
    return randomize(moa_mod.GlobalAttention(dim, (window, window), (res, res), heads, **kwargs))


@pytest.mark.parametrize(
    ("dim", "window", "res", "heads", "kwargs"),
    [
        (64, 14, 28, 4, {}),
        (96, 14, 14, 3, {"qkv_bias": False}),
        (64, 14, 42, 8, {"qk_scale": 0.3}),
        (32, 7, 7, 2, {}),  # window 7 runs on a one-window map only (key stride 14)
        (128, 7, 7, 8, {"qkv_bias": False}),
        (64, 4, 4, 1, {}),
    ],
)
@pytest.mark.parametrize("train", [False, True])
def test_moa_matches_fightingcv(dim, window, res, heads, kwargs, train):
    theirs = fcv_moa(dim, window, res, heads, **kwargs).train(train)
    ours = from_fightingcv(copy.deepcopy(theirs))
    assert type(ours) is LegacyOverlappedAttention and ours.training == train
    assert ours.feat_size == (res, res) and ours.rd_channels == dim // 32
    xa = x_of(2, res * res, dim).requires_grad_()
    xb = x_of(2, res * res, dim).requires_grad_()
    out_a, out_b = ours(xa, res, res), theirs(xb, res, res)
    torch.testing.assert_close(out_a, out_b, **TOL)
    g = torch.randn_like(out_b)
    out_a.backward(g)
    out_b.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, **TOL)


def test_moa_weights_are_fightingcvs_softmax():
    theirs = fcv_moa(64, 14, 28, 4)
    ours = from_fightingcv(theirs)
    x = x_of(2, 28 * 28, 64)
    out, weights = ours(x, 28, 28, need_weights=True)
    assert weights.shape == (2, 4, 4, 4)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 4, dtype=D), **TOL)
    torch.testing.assert_close(out, theirs(x, 28, 28), **TOL)


def test_moa_refuses_what_fightingcv_cannot_run():
    theirs = moa_mod.GlobalAttention(32, (7, 7), (14, 14), 2)  # key stride 14, window 7: 1 key, 4 queries
    with pytest.raises(RuntimeError):
        theirs(torch.randn(1, 196, 32), 14, 14)
    with pytest.raises(TypeError, match="key stride is 14, not its window 7"):
        from_fightingcv(theirs)
    ours = from_fightingcv(fcv_moa(64, 14, 28, 4))
    with pytest.raises(ValueError, match=r"input_resolution \(28, 28\).*H=14, W=56"):
        ours(x_of(1, 14 * 56, 64), 14, 56)


# ---------------------------------------------------------------------------------------------
# MOA WindowAttention (Swin's, without a mask argument)


@pytest.mark.parametrize(("dim", "window", "heads", "kwargs"),
                         [(32, 7, 4, {}), (48, 4, 3, {"qkv_bias": False}), (16, 2, 2, {"qk_scale": 0.5})])
def test_moa_window_attention_matches_fightingcv(dim, window, heads, kwargs):
    theirs = randomize(moa_mod.WindowAttention(dim, (window, window), heads, **kwargs))
    ours = from_fightingcv(theirs)
    assert type(ours) is WindowAttention
    x = x_of(6, window * window, dim)
    torch.testing.assert_close(ours(x), theirs(x), **TOL)


# ---------------------------------------------------------------------------------------------
# CoAtNet: its attention stages s3 and s4 are fightingcv's ScaledDotProductAttention


def test_coatnet_attention_stages_convert():
    torch.manual_seed(0)
    net = coat_mod.CoAtNet(3, 64).to(D).eval()
    randomize(net.s3, seed=1)
    randomize(net.s4, seed=2)
    for stage, tokens in ((net.s3, 64), (net.s4, 32)):
        ours = from_fightingcv(stage)
        assert type(ours) is attnzoo.MultiHeadAttention
        y = x_of(2, tokens, stage.d_model)
        torch.testing.assert_close(ours(y, y, y), stage(y, y, y), **TOL)
    # The whole network: attnzoo.replace converts every ScaledDotProductAttention in place.
    x = x_of(2, 3, 64, 64)
    expected = net(x)
    assert attnzoo.replace(net, sa_mod.ScaledDotProductAttention) == ["s3", "s4"]
    # (the subclass that takes fightingcv's call: attnzoo.convert.fightingcv_calls)
    assert isinstance(net.s3, attnzoo.MultiHeadAttention) and isinstance(net.s4, attnzoo.MultiHeadAttention)
    torch.testing.assert_close(net(x), expected, **TOL)
