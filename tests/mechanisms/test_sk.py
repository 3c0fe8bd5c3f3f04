"""Selective Kernel: the seed's SKEConv (golden outputs, fixed bugs), SKConv against a plain
reference and timm's SelectiveKernel, branch weights, errors, and SKConv as timm's attn_layer."""

from __future__ import annotations

import pytest
import torch
from _gating import (
    D,
    check_layouts,
    check_need_weights,
    check_no_grad_path,
    check_resnet_forward,
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
from attnzoo import SKConv, compat


class RefSK(nn.Module):
    def __init__(self, c, M=2, G=2, stride=1, L=32, r=2, dilated=False, fuse=False) -> None:
        super().__init__()
        d = max(int(c / r), L)
        self.convs = nn.ModuleList()
        for i in range(M):
            k, dil = (3, 1 + i) if dilated else (3 + 2 * i, 1)
            conv = nn.Conv2d(c, c, k, stride=stride, padding=1 + i, dilation=dil, groups=G)
            self.convs.append(nn.Sequential(conv, nn.BatchNorm2d(c), nn.ReLU()))
        self.fc = nn.Linear(c, d)
        self.fuse = nn.Sequential(nn.BatchNorm1d(d), nn.ReLU()) if fuse else nn.Identity()
        self.fcs = nn.ModuleList([nn.Linear(d, c) for _ in range(M)])

    def forward(self, x):
        feas = torch.stack([conv(x) for conv in self.convs], 1)  # (B, M, C, H, W)
        z = self.fuse(self.fc(feas.sum(1).mean(-1).mean(-1)))
        att = torch.softmax(torch.stack([fc(z) for fc in self.fcs], 1), 1)  # (B, M, C)
        return (feas * att[..., None, None]).sum(1)  # (B, M, C) -> (B, M, C, 1, 1)


GOLDEN = golden_files("seed/SKEConv__*.pt")


@pytest.mark.parametrize("path", golden_params(GOLDEN))
@pytest.mark.parametrize("grad", [False, True])
def test_golden_seed_outputs(path, grad):
    run_golden(compat.SKEConv, path, grad=grad)


@pytest.mark.parametrize("path", golden_params(GOLDEN))
def test_golden_recordings_load_into_the_canonical_class(path):
    """The same keys: a recording loads into SKConv built from the seed's arguments renamed."""
    rename = {"in_channels": "channels", "M": "num_branches", "G": "groups", "L": "min_rd_channels"}
    run_golden(lambda **kw: SKConv(**{rename.get(k, k): v for k, v in kw.items()}), path)


SK_CASES = [
    dict(c=8, M=2, G=2, stride=1, L=4, r=2),
    dict(c=8, M=3, G=4, stride=2, L=4, r=2),
    dict(c=6, M=1, G=3, stride=1, L=3, r=3),
    dict(c=8, M=2, G=1, stride=1, L=2, r=2, dilated=True),
    dict(c=8, M=3, G=2, stride=2, L=6, r=4, dilated=True, fuse=True),
]


@pytest.mark.parametrize("case", SK_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("train", [False, True])
def test_sk_matches_reference(case, train):
    c, M, G, s, L, r = (case[k] for k in ("c", "M", "G", "stride", "L", "r"))
    dil, fuse = case.get("dilated", False), case.get("fuse", False)
    ours = SKConv(
        c,
        num_branches=M,
        groups=G,
        stride=s,
        min_rd_channels=L,
        reduction=r,
        keep_3x3=dil,
        fuse_norm_act=fuse,
    )
    compare(ours, RefSK(c, M, G, s, L, r, dil, fuse), x_of(3, c, 7, 6), train=train)


def test_rd_channels_overrides_reduction():
    m = SKConv(8, min_rd_channels=32, rd_channels=5)
    assert m.d == 5 and m.fc.out_features == 5


def test_ske_conv_seed_bugs_are_fixed():
    m = compat.SKEConv(8, M=3, G=2, L=4, batch_first=False)
    assert m.M == 3 and len(m.convs) == 3  # the seed kept self.M = 2
    compare(m, RefSK(8, 3, 2, 1, 4, 2), x_of(2, 8, 5, 5), train=True, perm=True)  # permute + backward work


def test_need_weights_are_the_branch_weights():
    m = SKConv(8, num_branches=3, min_rd_channels=4)
    weights = check_need_weights(m, x_of(2, 8, 5, 6))
    assert weights.shape == (2, 3, 8)
    torch.testing.assert_close(weights.sum(1), torch.ones(2, 8, dtype=D))
    flipped = SKConv(8, min_rd_channels=4, batch_first=False).to(D).eval()
    out, weights = flipped(x_of(8, 2, 5, 6), need_weights=True)
    assert out.shape == (8, 2, 5, 6) and weights.shape == (2, 2, 8)


def test_layouts_and_no_grad_path():
    check_layouts("sk")
    check_no_grad_path("sk")


def test_second_derivative_is_exact():
    m, x = example_module("sk")
    assert torch.autograd.gradgradcheck(m.eval(), (x.requires_grad_(),), fast_mode=True)


@pytest.mark.parametrize(
    ("factory", "error", "match"),
    [
        (lambda: SKConv(8, num_branches=0), ValueError, r"num_branches must be >= 1, got 0"),
        (lambda: SKConv(9), ValueError, r"channels=9 must be divisible by groups=2"),
        (lambda: compat.SKEConv(9, G=2), ValueError, r"in_channels=9 must be divisible by G=2"),
        (lambda: compat.SKEConv(8, M=0), ValueError, r"SKEConv: M must be >= 1, got 0"),
        (
            lambda: SKConv(8, min_rd_channels=0, reduction=16),
            ValueError,
            r"leave zero hidden features for channels=8",
        ),
        (
            lambda: compat.SKEConv(8, L=0, reduction=16),
            ValueError,
            r"L=0 leave zero hidden features for in_channels=8",
        ),
        (lambda: SKConv(8, reduction=0), ValueError, r"reduction must be > 0, got 0"),
        (lambda: SKConv(8, stride=0), ValueError, r"stride must be >= 1, got 0"),
        (lambda: SKConv(8, num_branches=2.5), TypeError, r"num_branches must be an int"),
        (lambda: compat.SKEConv(8, M=2.5), TypeError, r"SKEConv: M must be an int"),
    ],
)
def test_bad_constructor_arguments(factory, error, match):
    with pytest.raises(error, match=match):
        factory()


def test_bad_inputs():
    with pytest.raises(
        ValueError, match=r"SKConv expects x of shape \(B, 8, H, W\) with C=8, got \(2, 4, 6, 6\)"
    ):
        SKConv(8, min_rd_channels=4)(torch.randn(2, 4, 6, 6))


def test_seed_name_builds_the_seed_class():
    assert type(attnzoo.create("SKEConv", in_channels=8)) is compat.SKEConv
    assert type(attnzoo.create("sk", 8)) is SKConv


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize(
    ("paths", "keep_3x3", "groups", "stride"), [(2, False, 2, 1), (3, True, 4, 2), (2, True, 1, 1)]
)
def test_timm_selective_kernel(paths, keep_3x3, groups, stride, train):
    timm_sk = pytest.importorskip("timm.layers.selective_kernel", reason="timm is not installed")
    c, d = 8, 6
    kernels = [3 + 2 * i for i in range(paths)]
    theirs = timm_sk.SelectiveKernel(
        c,
        c,
        kernel_size=kernels,
        stride=stride,
        groups=groups,
        rd_channels=d,
        keep_3x3=keep_3x3,
        split_input=False,
    )
    theirs = randomize(theirs.to(D))
    ours = SKConv(c, paths, groups, stride, rd_channels=d, keep_3x3=keep_3x3, fuse_norm_act=True).to(D)
    sd = theirs.state_dict()
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    mapping = {"fc.weight": sd["attn.fc_reduce.weight"].flatten(1)}  # (d, C, 1, 1) -> (d, C)
    mapping.update({f"fuse.0.{n}": sd[f"attn.bn.{n}"] for n in bn})
    select = sd["attn.fc_select.weight"].flatten(1)  # (M * C, d): rows of branch i are i*C .. (i+1)*C
    for i in range(paths):
        mapping[f"convs.{i}.0.weight"] = sd[f"paths.{i}.conv.weight"]
        mapping.update({f"convs.{i}.1.{n}": sd[f"paths.{i}.bn.{n}"] for n in bn})
        mapping[f"fcs.{i}.weight"] = select[i * c : (i + 1) * c]
    state = ours.state_dict()
    mapping.update({k: torch.zeros_like(v) for k, v in state.items() if k not in mapping})  # our biases
    ours.load_state_dict(mapping, strict=True)
    ours.train(train)
    theirs.train(train)
    xa, xb = x_of(3, c, 7, 8).requires_grad_(), x_of(3, c, 7, 8).requires_grad_()
    out_a, out_b = ours(xa), theirs(xb)
    torch.testing.assert_close(out_a, out_b, atol=1e-10, rtol=1e-10)
    g = torch.randn_like(out_b)
    out_a.backward(g)
    out_b.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-10, rtol=1e-10)


def test_timm_resnet_takes_sk_conv():
    check_resnet_forward(SKConv)
