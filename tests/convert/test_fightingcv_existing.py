"""from_fightingcv for the existing mechanisms: fightingcv-attention's SEAttention, CBAMBlock,
SKAttention and ACmix -> the canonical classes, float64 outputs within 1e-10 of the real modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import attnzoo
from attnzoo import CBAM, ACmix, SKConv, SqueezeExcite
from attnzoo.convert import convert, from_fightingcv
from attnzoo.convert.fightingcv_existing import rename

WHY = "fightingcv_attention is not installed"
se_mod = pytest.importorskip("fightingcv_attention.attention.SEAttention", reason=WHY)
cbam_mod = pytest.importorskip("fightingcv_attention.attention.CBAM", reason=WHY)
sk_mod = pytest.importorskip("fightingcv_attention.attention.SKAttention", reason=WHY)
acmix_mod = pytest.importorskip("fightingcv_attention.attention.ACmixAttention", reason=WHY)
from _parity import TOL, D, check_same, randomize, x_of  # noqa: E402


def converted(theirs: nn.Module, cls: type[nn.Module]) -> nn.Module:
    ours = from_fightingcv(theirs)
    assert type(ours) is cls and type(convert(theirs)) is cls
    assert next(ours.parameters()).dtype == D
    return ours


@pytest.mark.parametrize("channel,reduction", [(32, 16), (24, 8), (17, 4)])
def test_se_attention(channel: int, reduction: int) -> None:
    theirs = randomize(se_mod.SEAttention(channel=channel, reduction=reduction))
    ours = converted(theirs, SqueezeExcite)
    assert ours.rd_channels == channel // reduction
    check_same(theirs, ours, (3, channel, 7, 5), False)


@pytest.mark.parametrize("channel,reduction,kernel", [(32, 16, 49), (24, 4, 7), (16, 8, 3), (12, 3, 5)])
def test_cbam_block(channel: int, reduction: int, kernel: int) -> None:
    theirs = randomize(cbam_mod.CBAMBlock(channel=channel, reduction=reduction, kernel_size=kernel))
    ours = converted(theirs, CBAM)
    assert ours.residual and ours.sa.stats == ("max", "mean") and ours.sa.conv.bias is not None
    check_same(theirs, ours, (2, channel, 9, 7), False)
    # Strict loading of fightingcv's state_dict once `ca.se.` is renamed (the only key difference).
    fresh = CBAM(channel, kernel_size=kernel, rd_channels=channel // reduction, spatial_bias=True,
                 pool_order="max_mean", residual=True, dtype=D)
    fresh.load_state_dict(rename(theirs.state_dict(), {"ca.se.": "ca.sharedMLP."}), strict=True)
    torch.testing.assert_close(fresh(x_of(2, channel, 5, 6)), theirs(x_of(2, channel, 5, 6)), **TOL)


def test_cbam_block_weights_and_refusal() -> None:
    theirs = randomize(cbam_mod.CBAMBlock(channel=16, reduction=4, kernel_size=7))
    ours = from_fightingcv(theirs)
    x = x_of(2, 16, 6, 5)
    out, gate = ours(x, need_weights=True)
    torch.testing.assert_close(out, x * gate + x, **TOL)
    torch.testing.assert_close(out, theirs(x), **TOL)
    with pytest.raises(TypeError, match=r"CBAMBlock: its spatial kernel \(6, 6\) is not odd"):
        from_fightingcv(cbam_mod.CBAMBlock(channel=16, reduction=4, kernel_size=6))


SK_CONFIGS = [
    ({"channel": 32, "reduction": 16}, (2, 32, 7, 5)),  # the defaults: kernels [1, 3, 5, 7], L=32
    ({"channel": 24, "kernels": [3, 5], "reduction": 4, "group": 2, "L": 4}, (3, 24, 6, 9)),
    ({"channel": 18, "kernels": [1, 3], "reduction": 2, "group": 3, "L": 8}, (2, 18, 5, 5)),
    ({"channel": 16, "kernels": [5, 1, 3], "reduction": 8, "L": 3}, (2, 16, 8, 7)),
]


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("config", range(len(SK_CONFIGS)))
def test_sk_attention(config: int, train: bool) -> None:
    kwargs, shape = SK_CONFIGS[config]
    theirs = randomize(sk_mod.SKAttention(**kwargs))
    ours = converted(theirs, SKConv)
    assert ours.kernel_sizes == tuple(kwargs.get("kernels", [1, 3, 5, 7]))
    check_same(theirs, ours, shape, train)
    pairs = (("conv", 0), ("bn", 1))
    names = {f"convs.{i}.{a}.": f"convs.{i}.{b}." for i in range(len(ours.convs)) for a, b in pairs}
    SKConv(shape[1], kernel_sizes=ours.kernel_sizes, groups=kwargs.get("group", 1), rd_channels=theirs.d,
           dtype=D).load_state_dict(rename(theirs.state_dict(), names), strict=True)


def test_sk_kernel_sizes_defaults_keep_the_seed() -> None:
    assert SKConv(8).kernel_sizes == (3, 5) and SKConv(8, 3).kernel_sizes == (3, 5, 7)
    with pytest.raises(ValueError, match=r"num_branches=2 does not match kernel_sizes=\(1, 3, 5\)"):
        SKConv(8, 2, kernel_sizes=(1, 3, 5))
    with pytest.raises(ValueError, match=r"kernel_sizes must hold odd ints >= 1, got \(3, 4\)"):
        SKConv(8, kernel_sizes=(3, 4))
    with pytest.raises(ValueError, match=r"kernel_sizes must hold odd ints >= 3, got \(1, 3\)"):
        SKConv(8, kernel_sizes=(1, 3), keep_3x3=True)


ACMIX_CONFIGS = [
    {"in_planes": 16, "out_planes": 16},
    {"in_planes": 8, "out_planes": 12, "kernel_att": 5, "head": 3},
    {"in_planes": 12, "out_planes": 8, "kernel_att": 3, "head": 2, "stride": 2},
]


@pytest.mark.parametrize("config", range(len(ACMIX_CONFIGS)))
def test_acmix(config: int) -> None:
    kwargs = ACMIX_CONFIGS[config]
    default = torch.get_default_dtype()
    torch.set_default_dtype(D)  # fightingcv builds its position grid in the default dtype
    try:
        theirs = randomize(acmix_mod.ACmix(**kwargs))
        ours = converted(theirs, ACmix)
        ACmix(kwargs["in_planes"], kwargs["out_planes"], dtype=D, **{
            k: v for k, v in kwargs.items() if k in ("kernel_att", "stride")
        }, num_heads=kwargs.get("head", 4)).load_state_dict(theirs.state_dict(), strict=True)
        check_same(theirs, ours, (2, kwargs["in_planes"], 8, 10), False)
    finally:
        torch.set_default_dtype(default)


def test_replace_swaps_fightingcv_modules_in_a_model() -> None:
    model = randomize(nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), se_mod.SEAttention(16, 4), cbam_mod.CBAMBlock(16, 4, 7),
        sk_mod.SKAttention(16, [1, 3], 4, 2, 4),
    )).eval()
    x = x_of(2, 3, 7, 6)
    with torch.no_grad():
        before = model(x)
    for cls in (se_mod.SEAttention, cbam_mod.CBAMBlock, sk_mod.SKAttention):
        attnzoo.replace(model, cls)
    assert [type(m) for m in model][1:] == [SqueezeExcite, CBAM, SKConv]
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, **TOL)


def test_from_fightingcv_refuses_unknown_classes() -> None:
    with pytest.raises(TypeError, match=r"from_fightingcv cannot convert torch\.nn\.modules\.linear\.Linear"):
        from_fightingcv(nn.Linear(2, 2))
