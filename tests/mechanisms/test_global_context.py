"""Global context (gc, gca): parity with timm's GlobalContext in float64, formula, errors, weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnzoo
from attnzoo import GlobalContext, GlobalContextAdd
from attnzoo.convert import convert, from_timm

timm_layers = pytest.importorskip("timm.layers", reason="timm is needed for the parity tests")
from timm.layers.global_context import GlobalContext as TimmGlobalContext  # noqa: E402

D = torch.float64


def randomised(module: nn.Module, seed: int = 0) -> nn.Module:
    """float64, every parameter from N(0, 0.5^2) (timm zeroes the add transform's last layer)."""
    gen = torch.Generator().manual_seed(seed)
    module = module.to(D)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=D) * 0.5)
    return module


CASES = [
    # (timm module, channels, (H, W), attnzoo class)
    (lambda: timm_layers.create_attn("gc", 64), 64, (5, 7), GlobalContext),
    (lambda: timm_layers.create_attn("gca", 64), 64, (5, 7), GlobalContextAdd),
    (lambda: TimmGlobalContext(24, fuse_add=True, fuse_scale=True), 24, (9, 3), GlobalContext),
    (lambda: TimmGlobalContext(20, use_attn=False, rd_ratio=1 / 4), 20, (3, 5), GlobalContext),
    (
        lambda: TimmGlobalContext(33, fuse_add=True, fuse_scale=False, use_attn=False),
        33, (1, 1), GlobalContextAdd,
    ),
    (
        lambda: TimmGlobalContext(48, rd_channels=5, act_layer=nn.GELU, gate_layer="hard_sigmoid"),
        48, (7, 1), GlobalContext,
    ),
    (lambda: TimmGlobalContext(40, rd_ratio=1 / 16, rd_divisor=4, fuse_add=True), 40, (11, 6), GlobalContext),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_from_timm_matches_timm_in_float64(case):
    build, channels, size, expected = CASES[case]
    theirs = randomised(build()).eval()
    ours = from_timm(theirs)
    assert type(ours) is expected
    x = torch.randn(3, channels, *size, dtype=D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-10, rtol=0)


@pytest.mark.parametrize(("name", "channels"), [("gc", 64), ("gca", 64), ("gc", 30), ("gca", 100)])
def test_create_builds_timms_configuration(name, channels):
    theirs = randomised(timm_layers.create_attn(name, channels)).eval()
    ours = attnzoo.create(name, channels, dtype=D).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, channels, 5, 3, dtype=D)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-10, rtol=0)


def test_initialisation_follows_timm():
    m = GlobalContextAdd(16)
    assert torch.count_nonzero(m.mlp_add.fc2.weight) == 0
    x = torch.randn(2, 16, 3, 3)
    torch.testing.assert_close(m(x), x + m.mlp_add.fc2.bias[:, None, None])


def test_formula_and_weights():
    m = randomised(GlobalContext(6, rd_channels=3, fuse_add=True))
    x = torch.randn(2, 6, 4, 5, dtype=D)
    logits = (x * m.conv_attn.weight.view(1, 6, 1, 1)).sum(1) + m.conv_attn.bias  # (B, H, W)
    attn = logits.flatten(1).softmax(-1).view(2, 4, 5)
    context = (x * attn[:, None]).sum((2, 3))  # (B, C)

    def transform(mlp):
        h = context @ mlp.fc1.weight[:, :, 0, 0].T + mlp.fc1.bias
        h = F.relu(F.layer_norm(h, (3,), mlp.norm.weight, mlp.norm.bias, eps=1e-6))
        return h @ mlp.fc2.weight[:, :, 0, 0].T + mlp.fc2.bias

    gate, shift = torch.sigmoid(transform(m.mlp_scale)), transform(m.mlp_add)
    expected = x * gate[:, :, None, None] + shift[:, :, None, None]
    out, weights = m(x, need_weights=True)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(weights, attn)


def test_mean_pooling_weights_are_uniform():
    out, weights = GlobalContext(8, use_attn=False)(torch.randn(2, 8, 3, 4), need_weights=True)
    torch.testing.assert_close(weights, torch.full((2, 3, 4), 1 / 12))


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="fuse_add and fuse_scale"):
        GlobalContext(8, fuse_scale=False)
    with pytest.raises(ValueError, match="rd_channels"):
        GlobalContext(8, rd_channels=0)
    with pytest.raises(ValueError, match=r"expects x of shape \(B, 8, H, W\)"):
        GlobalContextAdd(8)(torch.randn(2, 7, 3, 3))
    with pytest.raises(TypeError, match="from_timm cannot convert GlobalContext"):
        from_timm(TimmGlobalContext(8, fuse_scale=False))


def test_convert_dispatch():
    assert type(convert(timm_layers.create_attn("gca", 16))) is GlobalContextAdd



def _official_context_block(m: GlobalContext, x: torch.Tensor) -> torch.Tensor:
    """xvjiarui/GCNet ``ContextBlock.forward`` (pooling 'att'), written out in float64: its transforms are
    conv -> ``LayerNorm([r, 1, 1])`` (torch's default eps 1e-5) -> ReLU -> conv."""
    b, c, h, w = x.shape
    mask = F.conv2d(x, m.conv_attn.weight, m.conv_attn.bias).view(b, 1, h * w).softmax(-1)  # (B, 1, HW)
    context = (x.view(b, c, h * w) @ mask.transpose(1, 2)).view(b, c, 1, 1)

    def transform(mlp: nn.Module) -> torch.Tensor:
        hidden = F.conv2d(context, mlp.fc1.weight, mlp.fc1.bias)
        hidden = F.layer_norm(hidden, hidden.shape[1:], mlp.norm.weight.view(-1, 1, 1),
                              mlp.norm.bias.view(-1, 1, 1), eps=1e-5)
        return F.conv2d(hidden.relu(), mlp.fc2.weight, mlp.fc2.bias)

    out = x
    if m.mlp_scale is not None:
        out = out * transform(m.mlp_scale).sigmoid()
    if m.mlp_add is not None:
        out = out + transform(m.mlp_add)
    return out


@pytest.mark.parametrize("fuse_add,fuse_scale", [(True, False), (False, True), (True, True)])
def test_official_gcnet_numbers_with_its_layernorm_eps(fuse_add, fuse_scale):
    # The official ContextBlock's LayerNorm eps is 1e-5 (timm's 1e-6); the documented recipe matches it.
    m = randomised(GlobalContext(13, rd_channels=3, fuse_add=fuse_add, fuse_scale=fuse_scale))
    x = torch.randn(2, 13, 5, 3, dtype=D)
    assert (m(x) - _official_context_block(m, x)).abs().max() > 1e-7  # eps 1e-6 by default (timm's)
    for mlp in (m.mlp_add, m.mlp_scale):
        if mlp is not None:
            mlp.norm.eps = 1e-5
    torch.testing.assert_close(m(x), _official_context_block(m, x), atol=1e-12, rtol=1e-12)
    assert "eps 1e-5" in (attnzoo.mechanisms.global_context.__doc__ or "")
