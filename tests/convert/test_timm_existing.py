"""from_timm for the existing mechanisms: timm's SEModule, CbamModule, SelectiveKernel, Swin
WindowAttention and NonLocalAttn -> the canonical classes, float64 outputs within 1e-10 of timm's."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

import attnzoo
from attnzoo import CBAM, NonLocalBlock, SKConv, SqueezeExcite, WindowAttention
from attnzoo.convert import convert, converter_for, from_timm

timm = pytest.importorskip("timm", reason="timm is not installed")
layers = pytest.importorskip("timm.layers", reason="timm is not installed")
swin = pytest.importorskip("timm.models.swin_transformer", reason="timm is not installed")
effnet_blocks = pytest.importorskip("timm.models._efficientnet_blocks", reason="timm is not installed")
from _parity import TOL, D, check_same, randomize, x_of  # noqa: E402
from timm.layers.cbam import CbamModule  # noqa: E402
from timm.layers.non_local_attn import NonLocalAttn  # noqa: E402


def convert_checked(theirs: nn.Module, cls: type[nn.Module]) -> nn.Module:
    ours = from_timm(theirs)
    assert type(ours) is cls
    assert converter_for(theirs) is converter_for(type(theirs)) is not None
    assert type(convert(theirs)) is cls
    assert next(ours.parameters()).dtype == D
    return ours


# ---------------------------------------------------------------------------------------------
# SEModule and the EfficientNet family's SqueezeExcite -> SqueezeExcite

SE_CONFIGS: list[tuple[Callable[[], nn.Module], int]] = [
    (lambda: layers.create_attn("se", 32), 32),
    (lambda: layers.SEModule(24, rd_ratio=0.25, rd_divisor=4, add_maxpool=True, bias=False,
                             norm_layer=nn.BatchNorm2d), 24),
    (lambda: layers.SEModule(17, rd_channels=5, act_layer=nn.SiLU, gate_layer="hard_sigmoid"), 17),
    (lambda: layers.SEModule(40, rd_ratio=1 / 8, rd_divisor=1, act_layer=nn.GELU, norm_layer=nn.BatchNorm2d,
                             gate_layer=nn.Tanh), 40),
]


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("config", range(len(SE_CONFIGS)))
def test_se_module(config: int, train: bool) -> None:
    make, c = SE_CONFIGS[config]
    theirs = randomize(make())
    ours = convert_checked(theirs, SqueezeExcite)
    ours.load_state_dict(theirs.state_dict(), strict=True)  # the keys are timm's
    hard = type(theirs.gate) is nn.Hardsigmoid  # becomes HardSigmoid, exact where torch's 1/6 is float32
    assert type(ours.gate).__name__ == ("HardSigmoid" if hard else type(theirs.gate).__name__)
    check_same(theirs, ours, (3, c, 7, 5), train, grad_tol={"atol": 1e-7, "rtol": 1e-6} if hard else None)


EFFICIENTNET_SE_CONFIGS: list[tuple[Callable[[], nn.Module], int]] = [
    (lambda: effnet_blocks.SqueezeExcite(32, rd_ratio=0.25, act_layer=nn.SiLU), 32),  # EfficientNet's
    (lambda: effnet_blocks.SqueezeExcite(24, rd_channels=8, gate_layer="hard_sigmoid"), 24),  # MobileNetV3's
    (lambda: effnet_blocks.SqueezeExcite(17, rd_ratio=1 / 3, act_layer=nn.GELU, gate_layer=nn.Tanh), 17),
]


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("config", range(len(EFFICIENTNET_SE_CONFIGS)))
def test_efficientnet_squeeze_excite(config: int, train: bool) -> None:
    make, c = EFFICIENTNET_SE_CONFIGS[config]
    theirs = randomize(make())
    ours = convert_checked(theirs, SqueezeExcite)
    ours.load_state_dict(theirs.state_dict(), strict=True)  # timm's keys load through the pre-hook
    ours.load_state_dict(ours.state_dict(), strict=True)  # and attnzoo's own
    # torch's hardsigmoid backward multiplies by a float32 1/6 (docs/interop.md); attnzoo's is exact
    hard = type(theirs.gate) is nn.Hardsigmoid
    assert type(ours.gate).__name__ == ("HardSigmoid" if hard else type(theirs.gate).__name__)
    check_same(theirs, ours, (3, c, 7, 5), train, grad_tol={"atol": 1e-7, "rtol": 1e-6} if hard else None)


@pytest.mark.parametrize("name", ["efficientnet_b0", "mobilenetv3_small_050"])
def test_whole_efficientnet_replaced_keeps_logits_and_loads_its_checkpoint(name: str) -> None:
    model = timm.create_model(name, pretrained=False, num_classes=5).double().eval()
    checkpoint = copy.deepcopy(model.state_dict())
    x = x_of(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
    attnzoo.replace(model, effnet_blocks.SqueezeExcite)
    assert not any(type(m) is effnet_blocks.SqueezeExcite for m in model.modules())
    assert any(type(m) is SqueezeExcite for m in model.modules())
    model.load_state_dict(checkpoint, strict=True)  # a timm checkpoint still loads after the swap
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, **TOL)
    model.train()
    model(x).square().mean().backward()  # one training step's gradients are finite
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_efficientnet_squeeze_excite_refuses_other_convolutions() -> None:
    theirs = effnet_blocks.SqueezeExcite(16, rd_channels=4)
    theirs.conv_reduce = nn.Conv2d(16, 4, 3, padding=1)
    with pytest.raises(TypeError, match="conv_reduce is not a 1x1 nn.Conv2d with bias"):
        from_timm(theirs)


# ---------------------------------------------------------------------------------------------
# CbamModule -> CBAM

CBAM_CONFIGS: list[tuple[Callable[[], nn.Module], int]] = [
    (lambda: layers.create_attn("cbam", 32), 32),
    (lambda: CbamModule(24, rd_ratio=0.25, spatial_kernel_size=3, mlp_bias=True), 24),
    (lambda: CbamModule(20, rd_channels=3, spatial_kernel_size=5, act_layer=nn.SiLU,
                        gate_layer="hard_sigmoid"), 20),
    (lambda: CbamModule(9, rd_ratio=0.5, rd_divisor=2, spatial_kernel_size=9), 9),
    (lambda: CbamModule(16, rd_channels=4, spatial_kernel_size=3, gate_layer="prelu"), 16),  # weighted gates
]


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("config", range(len(CBAM_CONFIGS)))
def test_cbam_module(config: int, train: bool) -> None:
    make, c = CBAM_CONFIGS[config]
    theirs = randomize(make())
    ours = convert_checked(theirs, CBAM)
    hard = type(theirs.channel.gate) is nn.Hardsigmoid  # becomes HardSigmoid (see test_se_module)
    assert type(ours.ca.gate).__name__ == type(ours.sa.gate).__name__ == (
        "HardSigmoid" if hard else type(theirs.channel.gate).__name__)
    check_same(theirs, ours, (2, c, 9, 6), train, grad_tol={"atol": 1e-7, "rtol": 1e-6} if hard else None)


@pytest.mark.parametrize("make", [SE_CONFIGS[2][0], EFFICIENTNET_SE_CONFIGS[1][0], CBAM_CONFIGS[2][0]])
def test_hard_sigmoid_gates_have_a_double_backward(make: Callable[[], nn.Module]) -> None:
    """timm's hard-sigmoid gates (`nn.Hardsigmoid`, whose backward torch cannot differentiate) convert to
    attnzoo's HardSigmoid, so a gradient penalty works on the converted module."""
    ours = from_timm(randomize(make())).eval()
    c = next(m for m in ours.modules() if isinstance(m, nn.Conv2d)).in_channels
    x = x_of(2, c, 4, 5).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda t: ours(t), (x,), fast_mode=True)


def test_cbam_gates_with_weights_keep_them_under_timms_keys() -> None:
    """PReLU gates: their weights become `ca.gate` / `sa.gate`, and timm's keys still load after replace."""
    model = randomize(nn.Sequential(CbamModule(16, rd_channels=4, spatial_kernel_size=3, gate_layer="prelu")))
    model.eval()
    state, x = copy.deepcopy(model.state_dict()), x_of(2, 16, 5, 7)
    with torch.no_grad():
        before = model(x)
    assert attnzoo.replace(model, CbamModule) == ["0"] and type(model[0]) is CBAM
    assert model[0].ca.gate.weight.shape == model[0].sa.gate.weight.shape == (1,)
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, **TOL)


# ---------------------------------------------------------------------------------------------
# SelectiveKernel -> SKConv

SK_CONFIGS: list[tuple[Callable[[], nn.Module], tuple[int, ...]]] = [
    (lambda: layers.create_attn("sk", 32), (2, 32, 7, 5)),
    (lambda: layers.SelectiveKernel(18, 24, kernel_size=[3, 5, 7], stride=2, groups=2, rd_channels=6,
                                    keep_3x3=False, split_input=False, dilation=2), (2, 18, 9, 8)),
    (lambda: layers.SelectiveKernel(18, 12, kernel_size=[3, 5, 7], groups=3, rd_ratio=0.5, rd_divisor=4,
                                    stride=2), (3, 18, 7, 11)),
    (lambda: layers.SelectiveKernel(16, kernel_size=5, keep_3x3=True, dilation=2, split_input=False),
     (2, 16, 11, 9)),
    (lambda: layers.SelectiveKernel(20, 8, kernel_size=[3, 5], keep_3x3=False, rd_channels=4), (2, 20, 6, 7)),
]


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("config", range(len(SK_CONFIGS)))
def test_selective_kernel(config: int, train: bool) -> None:
    make, shape = SK_CONFIGS[config]
    theirs = randomize(make())
    ours = convert_checked(theirs, SKConv)
    check_same(theirs, ours, shape, train)
    assert ours.split_input == theirs.split_input
    ours.eval()
    theirs.eval()
    out, weights = ours(x_of(*shape), need_weights=True)  # the plain-autograd path
    torch.testing.assert_close(out, theirs(x_of(*shape)), **TOL)
    assert weights.shape == (shape[0], len(theirs.paths), theirs.out_channels)
    torch.testing.assert_close(weights.sum(1), torch.ones_like(weights[:, 0]), **TOL)


def test_selective_kernel_refusals() -> None:
    aa = layers.SelectiveKernel(16, stride=2, aa_layer=nn.AvgPool2d)
    assert all(p.aa is not None for p in aa.paths)
    with pytest.raises(TypeError, match="SelectiveKernel: a path has anti-aliasing"):
        from_timm(aa)
    odd = layers.SelectiveKernel(16, act_layer=nn.SiLU)
    with pytest.raises(TypeError, match="SelectiveKernel: its norm layer's activation is a SiLU, not ReLU"):
        from_timm(odd)


# ---------------------------------------------------------------------------------------------
# Swin WindowAttention -> WindowAttention


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(
    "dim,heads,window,bias", [(24, 3, (3, 4), True), (16, 2, 7, False), (12, 4, (5, 2), True)]
)
def test_swin_window_attention(dim: int, heads: int, window: object, bias: bool, masked: bool) -> None:
    theirs = randomize(swin.WindowAttention(dim, heads, window_size=window, qkv_bias=bias))
    ours = convert_checked(theirs, WindowAttention)
    WindowAttention(dim, window, heads, qkv_bias=bias).load_state_dict(theirs.state_dict(), strict=True)
    n = theirs.window_size[0] * theirs.window_size[1]
    x = x_of(6, n, dim)
    mask = None
    if masked:
        gen = torch.Generator().manual_seed(3)
        mask = (torch.rand(3, n, n, generator=gen) < 0.3).to(D) * -100.0
    torch.testing.assert_close(ours(x, mask=mask), theirs(x, mask=mask), **TOL)


def test_swin_window_attention_refuses_other_head_dim() -> None:
    theirs = swin.WindowAttention(24, 3, head_dim=12, window_size=4)
    with pytest.raises(TypeError, match=r"WindowAttention: its head_dim \* num_heads \(36\) differs"):
        from_timm(theirs)


def test_whole_swin_replaced_keeps_logits_and_loads_its_state_dict() -> None:
    model = swin.SwinTransformer(
        img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4), num_classes=7
    )
    model = randomize(model).eval()
    state = copy.deepcopy(model.state_dict())
    x = x_of(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    places = attnzoo.replace(model, swin.WindowAttention)
    assert len(places) == 4 and all(type(model.get_submodule(p)) is WindowAttention for p in places)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, **TOL)
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, **TOL)


# ---------------------------------------------------------------------------------------------
# NonLocalAttn -> NonLocalBlock

NL_CONFIGS: list[tuple[Callable[[], nn.Module], int]] = [
    (lambda: layers.create_attn("nl", 32), 32),
    (lambda: NonLocalAttn(20, use_scale=False, rd_channels=6), 20),
    (lambda: NonLocalAttn(24, rd_ratio=0.25, rd_divisor=4), 24),
]


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("config", range(len(NL_CONFIGS)))
def test_non_local_attn(config: int, train: bool, fused: bool) -> None:
    make, c = NL_CONFIGS[config]
    theirs = randomize(make())
    ours = convert_checked(theirs, NonLocalBlock)
    assert not ours.pool_keys and ours.qk_scale == theirs.scale
    with attnzoo.fused_attn(fused):
        check_same(theirs, ours, (2, c, 5, 7), train)


def test_non_local_defaults_are_the_seeds() -> None:
    assert NonLocalBlock(8).qk_scale == 1.0
    with pytest.raises(ValueError, match="qk_scale applies to the softmax pairwise functions"):
        NonLocalBlock(8, pairwise="dot_product", qk_scale=0.5)


# ---------------------------------------------------------------------------------------------
# Dispatch


def test_from_timm_refuses_unknown_classes() -> None:
    with pytest.raises(TypeError, match=r"from_timm cannot convert torch\.nn\.modules\.linear\.Linear:"):
        from_timm(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="from_timm expects an nn.Module, got int"):
        from_timm(3)  # type: ignore[arg-type]


def test_replace_swaps_timm_gates_in_a_model() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), layers.SEModule(16, rd_channels=4), CbamModule(16, rd_channels=4),
        layers.SelectiveKernel(16, rd_channels=8),
    )
    model = randomize(model).eval()
    x = x_of(2, 3, 7, 9)
    with torch.no_grad():
        before = model(x)
    for cls in (layers.SEModule, CbamModule, layers.SelectiveKernel):
        attnzoo.replace(model, cls)
    assert [type(m) for m in model][1:] == [SqueezeExcite, CBAM, SKConv]
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, **TOL)


@pytest.mark.parametrize("build", [lambda: layers.SEModule(16), lambda: CbamModule(16)])
def test_replace_keeps_forward_and_backward_hooks_and_their_handles(build: Callable[[], nn.Module]) -> None:
    """The timm/fightingcv converters copied forward-hook entries: a handle taken before `replace` no
    longer removed its hook, and backward hooks were dropped."""
    model = nn.Sequential(nn.Conv2d(3, 16, 1), build()).double()
    seen: list[str] = []
    handles = [
        model[1].register_forward_hook(lambda m, args, out: seen.append("forward")),
        model[1].register_forward_pre_hook(lambda m, args: seen.append("pre")),
        model[1].register_full_backward_hook(lambda m, grad_in, grad_out: seen.append("backward")),
    ]
    assert attnzoo.replace(model, type(model[1])) == ["1"]
    x = torch.randn(2, 3, 5, 5, dtype=D, requires_grad=True)
    model(x).sum().backward()
    assert sorted(seen) == ["backward", "forward", "pre"]
    for handle in handles:
        handle.remove()
    seen.clear()
    model(x).sum().backward()
    assert seen == []
