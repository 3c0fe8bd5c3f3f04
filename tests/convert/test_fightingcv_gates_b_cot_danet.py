"""from_fightingcv, group b (CoT and DANet): fightingcv-attention's CoTAttention and DANet modules ->
the Fightingcv* classes, float64 within 1e-10 of the real modules (eval and train mode), and the
canonical ContextualTransformer / DANet classes against the official code's formulas."""

from __future__ import annotations

import pytest
import torch
from _parity import BN, TOL, D, check_same, randomize, x_of
from torch import nn

import attnzoo
from attnzoo.convert import from_fightingcv

WHY = "fightingcv_attention is not installed"


# ---------------------------------------------------------------------------------------------
# CoT

cot_mod = pytest.importorskip("fightingcv_attention.attention.CoTAttention", reason=WHY)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize(
    ("dim", "kernel_size", "shape"), [(16, 3, (2, 7, 7)), (8, 5, (3, 5, 3)), (12, 1, (2, 4, 1))]
)
def test_cot_matches_fightingcv(dim, kernel_size, shape, train):
    theirs = randomize(cot_mod.CoTAttention(dim=dim, kernel_size=kernel_size))
    ours = from_fightingcv(theirs)
    assert type(ours) is attnzoo.FightingcvCoTAttention
    b, h, w = shape
    check_same(theirs, ours, (b, dim, h, w), train)


@pytest.mark.parametrize("kernel_size", [2, 4])
def test_cot_even_kernel_is_refused_where_fightingcv_fails_every_call(kernel_size):
    theirs = cot_mod.CoTAttention(dim=8, kernel_size=kernel_size)
    with pytest.raises(RuntimeError):  # fightingcv's key convolution makes H + 1 rows; its torch.cat fails
        theirs(torch.randn(2, 8, 5, 5))
    refused = f"cannot convert CoTAttention: .*kernel_size must be odd, got {kernel_size}"
    with pytest.raises(TypeError, match=refused):
        from_fightingcv(theirs)
    with pytest.raises(ValueError, match=f"kernel_size must be odd, got {kernel_size}"):
        attnzoo.FightingcvCoTAttention(8, kernel_size)


def unfold_aggregate(v: torch.Tensor, w: torch.Tensor, k: int) -> torch.Tensor:
    """The official kernel's reference (its test): unfold, then sum weights x patches."""
    b, c, h, wd = v.shape
    g = w.shape[1]
    patches = torch.nn.functional.unfold(v, k, padding=k // 2).view(b, c // g, g, k * k, h, wd)
    return (w.unsqueeze(1) * patches).sum(-3).view(b, c, h, wd)


@pytest.mark.parametrize(("c", "g", "k", "size"), [(8, 4, 3, (5, 6)), (16, 2, 5, (4, 3)), (6, 6, 1, (2, 2))])
def test_local_aggregate_matches_the_official_kernel_reference(c, g, k, size):
    v = x_of(2, c, *size)
    w = x_of(2, g, k * k, *size, seed=2)
    got = attnzoo.mechanisms.cot.local_aggregate(v, w, k)
    torch.testing.assert_close(got, unfold_aggregate(v, w, k), **TOL)


def test_cot_canonical_is_the_official_cotlayer():
    ours = randomize(attnzoo.ContextualTransformer(32, dtype=D)).eval()
    assert sorted(ours.state_dict()) == sorted([
        "key_embed.0.weight", *(f"key_embed.1.{n}" for n in BN),
        "embed.0.weight", *(f"embed.1.{n}" for n in BN), "embed.3.weight", "embed.3.bias",
        "embed.4.weight", "embed.4.bias",
        "conv1x1.0.weight", *(f"conv1x1.1.{n}" for n in BN), *(f"bn.{n}" for n in BN),
        "se.0.weight", "se.0.bias", *(f"se.1.{n}" for n in BN), "se.3.weight", "se.3.bias",
    ])
    assert ours.embed[3].out_channels == 9 * 32 // 8 and ours.se[0].out_channels == 32
    x = x_of(2, 32, 5, 4)
    k = ours.key_embed(x)
    w = ours.embed(torch.cat([x, k], 1)).view(2, 4, 9, 5, 4)
    k2 = torch.nn.functional.silu(ours.bn(unfold_aggregate(ours.conv1x1(x), w, 3)))
    a = ours.se((k2 + k).mean((2, 3), keepdim=True)).view(2, 32, 2).softmax(2)
    expected = k2 * a[:, :, 0, None, None] + k * a[:, :, 1, None, None]
    out, weights = ours(x, need_weights=True)
    torch.testing.assert_close(out, expected, **TOL)
    torch.testing.assert_close(weights, w, **TOL)



# ---------------------------------------------------------------------------------------------
# DANet

danet_mod = pytest.importorskip("fightingcv_attention.attention.DANet", reason=WHY)


def check_eval_and_train(theirs: nn.Module, ours: nn.Module, shape: tuple[int, ...]) -> None:
    """Eval mode as built; train mode with the attention dropout off (its random draws differ)."""
    check_same(theirs, ours, shape, train=False)
    for m in (*theirs.modules(), *ours.modules()):
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    check_same(theirs, ours, shape, train=True)


@pytest.mark.parametrize(("d", "k", "shape"), [(16, 3, (2, 7, 7)), (8, 5, (3, 5, 3)), (12, 2, (2, 4, 5))])
def test_danet_position_matches_fightingcv(d, k, shape):
    theirs = randomize(danet_mod.PositionAttentionModule(d_model=d, kernel_size=k))
    ours = from_fightingcv(theirs)
    assert type(ours) is attnzoo.FightingcvPositionAttentionModule and ours.pa.dropout.p == 0.1
    b, h, w = shape
    check_eval_and_train(theirs, ours, (b, d, h, w))


@pytest.mark.parametrize(("d", "k", "h", "w"), [(16, 3, 7, 7), (8, 5, 5, 3), (6, 1, 1, 4)])
def test_danet_channel_matches_fightingcv(d, k, h, w):
    theirs = randomize(danet_mod.ChannelAttentionModule(d_model=d, kernel_size=k, H=h, W=w))
    ours = from_fightingcv(theirs)
    assert type(ours) is attnzoo.FightingcvChannelAttentionModule
    check_eval_and_train(theirs, ours, (2, d, h, w))
    with pytest.raises(ValueError, match=f"expects its convolution to give {h * w} positions"):
        ours(x_of(2, d, h + 1, w))


def test_damodule_matches_fightingcv_which_runs_only_at_512_by_7x7():
    theirs = randomize(danet_mod.DAModule(d_model=64, kernel_size=5, H=3, W=3))  # arguments ignored
    with torch.no_grad():  # moderate logits at C = 512 (saturated softmaxes make gradients ill-conditioned)
        for p in theirs.parameters():
            p.mul_(0.1)
    ours = from_fightingcv(theirs)
    assert type(ours) is attnzoo.FightingcvDAModule
    assert ours.position_attention_module.d_model == 512 and ours.channel_attention_module.positions == 49
    check_eval_and_train(theirs, ours, (2, 512, 7, 7))
    small = attnzoo.FightingcvDAModule(d_model=8, kernel_size=3, H=3, W=5)  # uses its arguments
    assert small(torch.randn(2, 8, 3, 5)).shape == (2, 8, 3, 5)


def pam_reference(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The official PAM_Module's forward."""
    b, c, h, w = x.shape
    q = m.query_conv(x).view(b, -1, h * w).permute(0, 2, 1)
    k = m.key_conv(x).view(b, -1, h * w)
    attention = torch.bmm(q, k).softmax(-1)
    out = torch.bmm(m.value_conv(x).view(b, -1, h * w), attention.permute(0, 2, 1)).view(b, c, h, w)
    return m.gamma * out + x


def cam_reference(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The official CAM_Module's forward."""
    b, c, h, w = x.shape
    q = x.view(b, c, -1)
    energy = torch.bmm(q, q.permute(0, 2, 1))
    energy_new = torch.max(energy, -1, keepdim=True)[0].expand_as(energy) - energy
    out = torch.bmm(energy_new.softmax(-1), q).view(b, c, h, w)
    return m.gamma * out + x


@pytest.mark.parametrize(("c", "size"), [(16, (5, 6)), (24, (3, 1)), (9, (4, 7))])
def test_danet_canonical_modules_are_the_official_ones(c, size):
    pam = randomize(attnzoo.DANetPositionAttention(c, dtype=D))
    cam = randomize(attnzoo.DANetChannelAttention(c, dtype=D))
    assert sorted(pam.state_dict()) == sorted(
        ["gamma", *(f"{n}_conv.{p}" for n in ("query", "key", "value") for p in ("weight", "bias"))]
    )
    x = x_of(2, c, *size) * 0.3
    torch.testing.assert_close(pam(x), pam_reference(pam, x), **TOL)
    torch.testing.assert_close(cam(x), cam_reference(cam, x), **TOL)
    head = randomize(attnzoo.DualAttention(4 * c, dtype=D)).eval()
    x4 = x_of(2, 4 * c, *size) * 0.3
    feat = head.conv51(pam_reference(head.sa, head.conv5a(x4)))
    feat = feat + head.conv52(cam_reference(head.sc, head.conv5c(x4)))
    torch.testing.assert_close(head(x4), head.conv8(feat), **TOL)


@pytest.mark.parametrize("outer", ["DAModule", "PositionAttentionModule"])
def test_an_outer_danet_class_after_its_inner_attention_was_replaced_is_refused_by_name(outer):
    sdpa = pytest.importorskip("fightingcv_attention.attention.SelfAttention", reason=WHY)
    danet = pytest.importorskip("fightingcv_attention.attention.DANet", reason=WHY)
    model = nn.Sequential(nn.Conv2d(3, 512, 1), danet.DAModule(d_model=512, kernel_size=3, H=7, W=7))
    assert attnzoo.replace(model, sdpa.ScaledDotProductAttention) == ["1.position_attention_module.pa"]
    before = {name: type(m) for name, m in model.named_modules()}
    with pytest.raises(TypeError, match=r"submodule .*pa is already attnzoo's .* before changing what"):
        attnzoo.replace(model, getattr(danet, outer))
    assert {name: type(m) for name, m in model.named_modules()} == before  # left untouched
    with pytest.raises(TypeError, match="already attnzoo's"):
        from_fightingcv(model[1])
