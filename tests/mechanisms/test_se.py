"""Squeeze-and-Excitation: the seed's SELayer (golden outputs), SqueezeExcite against plain references
and timm's SEModule, the vocabulary's options, errors, and SqueezeExcite as timm's attn_layer."""

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
    golden_params,
    randomize,
    run_golden,
    x_of,
)
from conftest import golden_files
from torch import nn

import attnzoo
from attnzoo import SqueezeExcite, compat


class RefSELayer(nn.Module):
    """The seed's SELayer: linear layers without bias, hidden width C // r."""

    def __init__(self, c: int, r: int) -> None:
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(c, c // r, bias=False), nn.ReLU(), nn.Linear(c // r, c, bias=False), nn.Sigmoid()
        )

    def forward(self, x):
        b, c = x.shape[:2]
        return x * self.fc(F.adaptive_avg_pool2d(x, 1).view(b, c)).view(b, c, 1, 1)


class RefSE(nn.Module):
    """timm's SEModule step by step (1x1 convolutions `fc1`, `fc2`, optional `bn`)."""

    def __init__(
        self, c: int, hidden: int, bias: bool, maxpool: bool = False, norm: bool = False, act=nn.ReLU
    ):
        super().__init__()
        self.maxpool = maxpool
        self.fc1 = nn.Conv2d(c, hidden, 1, bias=bias)
        self.bn = nn.BatchNorm2d(hidden) if norm else nn.Identity()
        self.act = act()
        self.fc2 = nn.Conv2d(hidden, c, 1, bias=bias)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        if self.maxpool:
            s = 0.5 * s + 0.5 * x.amax((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(self.act(self.bn(self.fc1(s)))))


@pytest.mark.parametrize("path", golden_params(golden_files("seed/SELayer__*.pt")))
@pytest.mark.parametrize("grad", [False, True])
def test_golden_seed_outputs(path, grad):
    run_golden(compat.SELayer, path, grad=grad)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize(
    ("c", "kwargs", "hidden"),
    [
        (8, dict(reduction=2), 4),
        (6, dict(reduction=3, bias=True), 2),
        (24, dict(reduction=16), 2),  # 1.5 rounds to 2, as timm's make_divisible
        (64, dict(reduction=16, rd_divisor=8, bias=True), 8),  # timm's SE in resnet18's first stage
        (12, dict(rd_channels=5, add_maxpool=True), 5),
        (8, dict(reduction=2, norm_layer=nn.BatchNorm2d, act_layer=nn.GELU), 4),
    ],
)
def test_se_matches_reference(c, kwargs, hidden, train):
    ours = SqueezeExcite(c, **kwargs)
    assert ours.rd_channels == hidden and ours.fc1.out_channels == hidden
    ref = RefSE(
        c,
        hidden,
        kwargs.get("bias", False),
        kwargs.get("add_maxpool", False),
        kwargs.get("norm_layer") is not None,
        kwargs.get("act_layer", nn.ReLU),
    )
    compare(ours, ref, x_of(3, c, 4, 5), train=train)


def test_batch_first_false():
    compare(
        SqueezeExcite(8, 2, batch_first=False), RefSE(8, 4, False), x_of(2, 8, 3, 4), train=True, perm=True
    )
    compare(compat.SELayer(8, batch_first=False), RefSELayer(8, 2), x_of(2, 8, 3, 4), train=True, perm=True)


@pytest.mark.parametrize("c", [8, 5])
def test_seed_class_matches_reference(c):
    compare(
        compat.SELayer(c, c if c == 5 else 2), RefSELayer(c, c if c == 5 else 2), x_of(3, c, 4, 5), train=True
    )


def test_gate_layer_and_need_weights():
    m = SqueezeExcite(8, 2, gate_layer=nn.Hardsigmoid)
    x = x_of(2, 8, 5, 5)
    gate = check_need_weights(m, x)
    assert gate.shape == (2, 8, 1, 1)
    with torch.no_grad():
        expected = F.hardsigmoid(m.fc2(F.relu(m.fc1(x.mean((2, 3), keepdim=True)))))
        torch.testing.assert_close(gate, expected, **TOL)
        torch.testing.assert_close(m(x), x * gate, **TOL)
    flipped = SqueezeExcite(8, 2, batch_first=False).to(D)
    out, gate = flipped(x.permute(1, 0, 2, 3), need_weights=True)  # (B, C, H, W) -> (C, B, H, W)
    assert gate.shape == (8, 2, 1, 1)
    torch.testing.assert_close(out, x.permute(1, 0, 2, 3) * gate, **TOL)


def test_layouts_and_no_grad_path():
    check_layouts("se")
    check_no_grad_path("se")


def test_device_and_dtype():
    assert all(p.is_meta for p in SqueezeExcite(16, norm_layer=nn.BatchNorm2d, device="meta").parameters())
    m = SqueezeExcite(16, norm_layer=nn.BatchNorm2d, dtype=D)
    assert all(t.dtype == D for t in (*m.parameters(), *m.buffers()) if t.is_floating_point())


@pytest.mark.parametrize(
    ("factory", "error", "match"),
    [
        (
            lambda: compat.SELayer(3, 4),
            ValueError,
            r"SELayer: reduction=4 leaves zero hidden channels for channel=3",
        ),
        (lambda: compat.SELayer(8.0), TypeError, r"SELayer: channel must be an int"),
        (lambda: SqueezeExcite(8.0), TypeError, r"SqueezeExcite: channels must be an int"),  # type: ignore[arg-type]
        (lambda: SqueezeExcite(8, 0), ValueError, r"reduction must be > 0, got 0"),
        (lambda: SqueezeExcite(8, rd_channels=0), ValueError, r"rd_channels must be >= 1, got 0"),
        (lambda: SqueezeExcite(8, rd_divisor=0), ValueError, r"rd_divisor must be >= 1, got 0"),
    ],
)
def test_bad_constructor_arguments(factory, error, match):
    with pytest.raises(error, match=match):
        factory()


@pytest.mark.parametrize(
    ("module", "x", "match"),
    [
        (
            SqueezeExcite(8, 2),
            torch.randn(2, 9, 4, 4),
            r"SqueezeExcite expects x of shape \(B, 8, H, W\) with C=8, got \(2, 9, 4, 4\)",
        ),
        (
            compat.SELayer(8, batch_first=False),
            torch.randn(2, 8, 4, 4),
            r"expects x of shape \(8, B, H, W\) with C=8, got \(2, 8, 4, 4\)",
        ),
    ],
)
def test_bad_inputs(module, x, match):
    with pytest.raises(ValueError, match=match):
        module(x)


def test_seed_name_builds_the_seed_class():
    assert type(attnzoo.create("SELayer", channel=8)) is compat.SELayer
    assert type(attnzoo.create("se", 8)) is SqueezeExcite
    assert set(compat.SELayer(8).state_dict()) == {"fc.0.weight", "fc.2.weight"}


# ----------------------------------------------------------------------------------------------
# timm


@pytest.mark.parametrize("train", [False, True])
def test_timm_se_module(train):
    """timm's SEModule and SqueezeExcite configured alike have the same keys and outputs."""
    timm_se = pytest.importorskip("timm.layers.squeeze_excite", reason="timm is not installed")
    for kwargs in (dict(), dict(rd_channels=3), dict(add_maxpool=True, norm_layer=nn.BatchNorm2d)):
        theirs = randomize(timm_se.SEModule(24, **kwargs).to(D)).train(train)
        ours = SqueezeExcite(24, rd_divisor=8, bias=True, **kwargs).to(D).train(train)
        ours.load_state_dict(theirs.state_dict(), strict=True)
        xa, xb = x_of(2, 24, 5, 6).requires_grad_(), x_of(2, 24, 5, 6).requires_grad_()
        out_a, out_b = ours(xa), theirs(xb)
        torch.testing.assert_close(out_a, out_b, **TOL)
        out_a.sum().backward()
        out_b.sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, **TOL)


def test_timm_resnet_takes_squeeze_excite():
    check_resnet_forward(SqueezeExcite)
    alike = functools.partial(SqueezeExcite, rd_divisor=8, bias=True)  # timm's SE defaults
    check_resnet_like_timm(alike, "se", key_map=lambda k: k)
