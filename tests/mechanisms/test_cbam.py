"""CBAM: the seed's classes (golden outputs), the canonical ChannelAttention, SpatialAttention, CBAM and
ResidualCBAM against plain references and timm's CbamModule, errors, and the classes as timm's attn_layer."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from _gating import (
    TOL,
    D,
    check_layouts,
    check_need_weights,
    check_no_grad_path,
    check_resnet_forward,
    check_resnet_like_timm,
    compare,
    example_module,
    golden_params,
    randomize,
    run_golden,
    x_of,
)
from conftest import golden_files
from torch import nn

import attnzoo
from attnzoo import CBAM, ChannelAttention, ResidualCBAM, SpatialAttention, compat


class RefCA(nn.Module):
    def __init__(self, c: int, hidden: int, bias: bool = False, act=nn.ReLU) -> None:
        super().__init__()
        self.sharedMLP = nn.Sequential(
            nn.Conv2d(c, hidden, 1, bias=bias), act(), nn.Conv2d(hidden, c, 1, bias=bias)
        )

    def forward(self, x):
        return x * torch.sigmoid(
            self.sharedMLP(F.adaptive_avg_pool2d(x, 1)) + self.sharedMLP(F.adaptive_max_pool2d(x, 1))
        )


class RefSA(nn.Module):
    def __init__(self, k: int, norm: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, k, padding=k // 2, bias=False)
        self.bn = nn.BatchNorm2d(1) if norm else nn.Identity()

    def forward(self, x):
        pooled = torch.cat([x.mean(1, keepdim=True), x.max(1, keepdim=True)[0]], 1)  # (B, 2, H, W)
        return x * torch.sigmoid(self.bn(self.conv(pooled)))


class RefCBAM(nn.Module):
    def __init__(self, c: int, hidden: int, k: int, norm: bool = False, bias: bool = False) -> None:
        super().__init__()
        self.ca, self.sa = RefCA(c, hidden, bias), RefSA(k, norm)

    def forward(self, x):
        return self.sa(self.ca(x))


class RefCBAtten_Res(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int, hidden: int) -> None:
        super().__init__()
        self.max_pool = nn.MaxPool2d(3, stride=stride, padding=1)
        self.conv_res = nn.Conv2d(cin, cout, 1)
        self.conv1 = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2)
        self.bn1 = nn.BatchNorm2d(cout)
        self.ca, self.sa = RefCA(cout, hidden), RefSA(k)

    def forward(self, x):
        out = self.sa(self.ca(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.conv_res(self.max_pool(x)))


SEEDS = {
    "ChannelAttention": compat.ChannelAttention,
    "SpatialAttention": compat.SpatialAttention,
    "CBAtten_Res": compat.CBAtten_Res,
}
GOLDEN = [f for name in SEEDS for f in golden_files(f"seed/{name}__*.pt")]


@pytest.mark.parametrize("path", golden_params(GOLDEN))
@pytest.mark.parametrize("grad", [False, True])
def test_golden_seed_outputs(path, grad):
    run_golden(SEEDS[path.stem.split("__")[0]], path, grad=grad)


# ----------------------------------------------------------------------------------------------
# Fused kernels against the plain references


@pytest.mark.parametrize(("c", "r", "hidden"), [(8, 4, 2), (6, 2, 3), (4, 4, 1), (12, 8, 2)])
def test_channel_attention_matches_reference(c, r, hidden):
    compare(ChannelAttention(c, r), RefCA(c, hidden), x_of(2, c, 5, 3), train=True)
    m = ChannelAttention(c, r, bias=True, act_layer=nn.SiLU, batch_first=False)
    compare(m, RefCA(c, hidden, True, nn.SiLU), x_of(2, c, 4, 4), train=False, perm=True)


def test_seed_channel_attention_keeps_the_seed_width():
    """The seed's hidden width is C // r (floor), the canonical one C / r rounded: 6 // 4 = 1, 6 / 4 -> 2."""
    compare(compat.ChannelAttention(6, 4), RefCA(6, 1), x_of(2, 6, 5, 3), train=True)
    assert ChannelAttention(6, 4).rd_channels == 2
    compare(
        compat.ChannelAttention(8, batch_first=False), RefCA(8, 2), x_of(2, 8, 4, 4), train=True, perm=True
    )


@pytest.mark.parametrize("k", [3, 5, 7])
@pytest.mark.parametrize("norm", [False, True])
def test_spatial_attention_matches_reference(k, norm):
    norm_layer = nn.BatchNorm2d if norm else None
    compare(SpatialAttention(5, k, norm_layer=norm_layer), RefSA(k, norm), x_of(2, 5, 6, 7), train=True)
    compare(
        SpatialAttention(kernel_size=k, norm_layer=norm_layer, batch_first=False),
        RefSA(k, norm),
        x_of(2, 5, 6, 7),
        train=False,
        perm=True,
    )
    if not norm:
        compare(compat.SpatialAttention(k), RefSA(k), x_of(2, 5, 6, 7), train=True)


@pytest.mark.parametrize(("c", "r", "k", "norm"), [(8, 2, 3, False), (12, 3, 7, True), (4, 4, 5, False)])
@pytest.mark.parametrize("train", [False, True])
def test_cbam_matches_reference(c, r, k, norm, train):
    ours = CBAM(c, r, k, norm_layer=nn.BatchNorm2d if norm else None, bias=norm)
    compare(ours, RefCBAM(c, c // r, k, norm, bias=norm), x_of(2, c, 7, 6), train=train)


def test_cbam_batch_first_false():
    compare(CBAM(8, 2, 3, batch_first=False), RefCBAM(8, 4, 3), x_of(3, 8, 4, 5), train=True, perm=True)


@pytest.mark.parametrize(
    ("cin", "cout", "k", "stride", "r"), [(4, 8, 3, 2, 2), (6, 4, 5, 1, 4), (3, 8, 7, 2, 4), (4, 6, 3, 3, 2)]
)
@pytest.mark.parametrize("train", [False, True])
def test_residual_cbam_matches_reference(cin, cout, k, stride, r, train):
    ref = RefCBAtten_Res(cin, cout, k, stride, cout // r)
    compare(compat.CBAtten_Res(cin, cout, k, stride, r), ref, x_of(2, cin, 9, 8), train=train)
    ref = RefCBAtten_Res(cin, cout, k, stride, cout // r)
    compare(
        ResidualCBAM(cin, cout, k, stride, r, rd_channels=cout // r), ref, x_of(2, cin, 9, 8), train=train
    )


def test_residual_cbam_defaults_keep_the_shape():
    m = ResidualCBAM(16)
    assert m(torch.randn(2, 16, 5, 7)).shape == (2, 16, 5, 7)
    assert m.ca.rd_channels == 1


def test_cbatten_res_batch_first_false_is_fixed():
    """The seed permuted twice with batch_first=False; here (C, B, H, W) gives the permuted result."""
    m = compat.CBAtten_Res(4, 8, 3, 2, 2, batch_first=False)
    compare(m, RefCBAtten_Res(4, 8, 3, 2, 4), x_of(3, 4, 6, 6), train=True, perm=True)


@pytest.mark.parametrize("k", [5, 7])
def test_cbatten_res_large_kernels_keep_the_shortcut_shape(k):
    """The seed's MaxPool2d(3, padding=k // 2) fails for k = 5, 7; the output size follows conv1."""
    m = compat.CBAtten_Res(4, 8, kernel_size=k, stride=2, reduction=2)
    for h, w in [(9, 8), (7, 7), (10, 5)]:
        assert m(torch.randn(2, 4, h, w)).shape == (2, 8, (h - 1) // 2 + 1, (w - 1) // 2 + 1)


# ----------------------------------------------------------------------------------------------
# Weights, layouts, gradients


def test_need_weights_are_the_gates():
    x = x_of(2, 8, 5, 6)
    for m, shape in [
        (ChannelAttention(8, 2), (2, 8, 1, 1)),
        (SpatialAttention(8, 3), (2, 1, 5, 6)),
        (CBAM(8, 2, 3, norm_layer=nn.BatchNorm2d), (2, 8, 5, 6)),
    ]:
        assert check_need_weights(m, x).shape == shape
        with torch.no_grad():
            out, gate = m.eval()(x, need_weights=True)
            torch.testing.assert_close(out, x * gate, **TOL)
            torch.testing.assert_close(out, m(x), **TOL)
    res = ResidualCBAM(4, 8, stride=2, reduction=2)
    assert check_need_weights(res, x_of(2, 4, 6, 6)).shape == (2, 8, 3, 3)


@pytest.mark.parametrize("name", ["cbam", "cbam_channel", "cbam_spatial", "cbam_res"])
def test_layouts_and_no_grad_path(name):
    check_layouts(name)
    check_no_grad_path(name)


def test_input_is_not_modified_and_gradients_accumulate():
    m = randomize(CBAM(8, 2, 3).to(D))
    x = x_of(2, 8, 5, 5).requires_grad_()
    before = x.detach().clone()
    m(x).sum().backward()
    first = [p.grad.clone() for p in m.parameters()]
    m(x).sum().backward()
    assert torch.equal(x.detach(), before)
    for p, g in zip(m.parameters(), first, strict=True):
        torch.testing.assert_close(p.grad, 2 * g)


def test_second_derivative_is_exact():
    m, x = example_module("cbam")
    assert torch.autograd.gradgradcheck(m.eval(), (x.requires_grad_(),), fast_mode=True)


def test_gradients_reach_parameters_when_input_is_constant():
    m = randomize(CBAM(8, 2, 3).to(D))
    m(x_of(2, 8, 5, 5)).square().sum().backward()  # x does not require grad
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


# ----------------------------------------------------------------------------------------------
# Errors name what was expected and what was given, with the caller's argument names


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: compat.ChannelAttention(2), r"reduction=4 leaves zero hidden channels for in_channels=2"),
        (lambda: compat.CBAtten_Res(4, 2), r"reduction=4 leaves zero hidden channels for out_channels=2"),
        (lambda: compat.SpatialAttention(4), r"kernel_size must be one of \(3, 5, 7\), got 4"),
        (lambda: SpatialAttention(8, 4), r"kernel_size must be odd, got 4"),
        (lambda: CBAM(16, 4, kernel_size=8), r"kernel_size must be odd, got 8"),
        (lambda: ResidualCBAM(4, 8, kernel_size=1), r"kernel_size must be one of \(3, 5, 7\), got 1"),
        (lambda: compat.CBAtten_Res(4, 8, kernel_size=1), r"kernel_size must be one of \(3, 5, 7\), got 1"),
        (lambda: CBAM(8, 0), r"reduction must be > 0, got 0"),
        (lambda: ResidualCBAM(4, 0), r"ResidualCBAM: out_channels must be >= 1, got 0"),
        (lambda: compat.CBAtten_Res(0, 8), r"CBAtten_Res: in_channels must be >= 1, got 0"),
    ],
)
def test_bad_constructor_arguments(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


@pytest.mark.parametrize(
    ("module", "x", "match"),
    [
        (
            ChannelAttention(8),
            torch.randn(2, 8, 16),
            r"ChannelAttention expects x of shape \(B, 8, H, W\) \(4-D\), got \(2, 8, 16\) \(3-D\)",
        ),
        (SpatialAttention(4, 3), torch.randn(1, 5, 3, 3), r"with C=4, got \(1, 5, 3, 3\)"),
        (CBAM(8, 2), torch.randn(1, 1, 8, 4, 4), r"CBAM expects x of shape \(B, 8, H, W\) \(4-D\)"),
        (
            compat.CBAtten_Res(4, 8),
            torch.randn(2, 8, 6, 6),
            r"CBAtten_Res expects x of shape \(B, 4, H, W\) with C=4",
        ),
        (
            ResidualCBAM(4, 8),
            torch.randn(2, 8, 6, 6),
            r"ResidualCBAM expects x of shape \(B, 4, H, W\) with C=4",
        ),
    ],
)
def test_bad_inputs(module, x, match):
    with pytest.raises(ValueError, match=match):
        module(x)


def test_spatial_attention_accepts_any_channel_count_without_channels():
    for m in (SpatialAttention(kernel_size=5), compat.SpatialAttention(5)):
        for c in (1, 3, 17):
            assert m(torch.randn(2, c, 6, 6)).shape == (2, c, 6, 6)


def test_seed_names_build_seed_classes():
    assert type(attnzoo.create("ChannelAttention", in_channels=8)) is compat.ChannelAttention
    assert type(attnzoo.create("SpatialAttention", kernel_size=5)) is compat.SpatialAttention
    assert type(attnzoo.create("CBAtten_Res", in_channels=4, out_channels=8)) is compat.CBAtten_Res
    assert attnzoo.CBAtten_Res is compat.CBAtten_Res
    assert type(attnzoo.create("cbam_channel", 8)) is ChannelAttention
    assert type(attnzoo.create("cbam_res", 8)) is ResidualCBAM


# ----------------------------------------------------------------------------------------------
# timm


def _timm_cbam_keys(key: str) -> str:
    """timm's CbamModule keys -> ours (`channel.fc1` -> `ca.sharedMLP.0`, ...)."""
    for theirs, ours in [
        ("channel.fc1.", "ca.sharedMLP.0."),
        ("channel.fc2.", "ca.sharedMLP.2."),
        ("spatial.conv.conv.", "sa.conv."),
        ("spatial.conv.bn.", "sa.bn."),
    ]:
        key = key.replace(theirs, ours)
    return key


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("k", [3, 7])
def test_timm_cbam_module(k, train):
    timm_cbam = pytest.importorskip("timm.layers.cbam", reason="timm is not installed")
    theirs = randomize(timm_cbam.CbamModule(16, rd_channels=4, spatial_kernel_size=k, mlp_bias=True).to(D))
    ours = CBAM(16, kernel_size=k, rd_channels=4, bias=True, norm_layer=nn.BatchNorm2d).to(D)
    ours.load_state_dict({_timm_cbam_keys(k): v for k, v in theirs.state_dict().items()}, strict=True)
    ours.train(train)
    theirs.train(train)
    xa, xb = x_of(3, 16, 7, 6).requires_grad_(), x_of(3, 16, 7, 6).requires_grad_()
    out_a, out_b = ours(xa), theirs(xb)
    torch.testing.assert_close(out_a, out_b, **TOL)
    g = torch.randn_like(out_b)
    out_a.backward(g)
    out_b.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, **TOL)
    torch.testing.assert_close(ours.sa.bn.running_mean, theirs.spatial.conv.bn.running_mean)


def test_timm_resnet_takes_cbam():
    check_resnet_forward(CBAM)
    alike = functools.partial(CBAM, norm_layer=nn.BatchNorm2d)  # timm's CbamModule has the BatchNorm
    check_resnet_like_timm(alike, "cbam", key_map=_timm_cbam_keys)


@pytest.mark.parametrize("cls", [ChannelAttention, SpatialAttention, ResidualCBAM])
def test_timm_resnet_takes_the_other_cbam_classes(cls):
    check_resnet_forward(cls)


class _OfficialCBAM(nn.Module):
    """Jongchan/attention-module's CBAM (ChannelGate with avg and max, SpatialGate), written from its code:
    a Linear MLP with biases on `C // r` hidden units, max-then-mean channel pool, conv + BatchNorm
    (momentum 0.01) with no ReLU."""

    def __init__(self, c: int, r: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(c, c // r), nn.ReLU(), nn.Linear(c // r, c))
        self.conv = nn.Conv2d(2, 1, 7, padding=3, bias=False)
        self.bn = nn.BatchNorm2d(1, eps=1e-5, momentum=0.01)

    def forward(self, x):
        pooled = (F.avg_pool2d(x, x.shape[2:]).flatten(1), F.max_pool2d(x, x.shape[2:]).flatten(1))
        x = x * torch.sigmoid(sum(self.mlp(p) for p in pooled))[:, :, None, None]
        compress = torch.cat([x.max(1, keepdim=True)[0], x.mean(1, keepdim=True)], 1)
        return x * torch.sigmoid(self.bn(self.conv(compress)))


@pytest.mark.parametrize(("c", "r"), [(40, 16), (64, 16), (13, 4)])
@pytest.mark.parametrize("train", [False, True])
def test_the_docstrings_recipe_gives_the_official_cbam(c, r, train):
    """The module docstring's settings reproduce the official code (its floor of C / r included)."""
    ours = randomize(CBAM(c, rd_channels=c // r, bias=True, pool_order="max_mean", norm_layer=nn.BatchNorm2d))
    official = _OfficialCBAM(c, r)
    with torch.no_grad():  # by position: the MLP's 1x1 convolutions are the Linear layers
        flat = [*ours.parameters(), *ours.buffers()]
        for mine, theirs in zip(flat, [*official.parameters(), *official.buffers()], strict=True):
            theirs.copy_(mine.reshape(theirs.shape))
    ours, official = ours.to(D).train(train), official.to(D).train(train)
    x = torch.randn(2, c, 7, 5, dtype=D)
    torch.testing.assert_close(ours(x), official(x), **TOL)
    assert CBAM(40, 16).ca.rd_channels == 3  # the default rounds 2.5 up where the official floors it
