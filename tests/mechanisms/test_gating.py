"""Gating family (SE, CBAM, SK, dual gated): golden seed outputs, float64 references, errors, timm.

The references below follow the seed code step by step with plain autograd (float64); the fused
kernels must give the same outputs, input gradients, parameter gradients and BatchNorm statistics.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import golden_files
from torch import nn

import attnzoo
from attnzoo import (
    CBAM,
    CBAtten_Res,
    ChannelAttention,
    DualGatedAttention,
    SKConv,
    SpatialAttention,
    SqueezeExcite,
    compat,
)

D = torch.float64


# ----------------------------------------------------------------------------------------------
# Plain references (seed algorithms, plain autograd, same parameter names)


class RefSE(nn.Module):
    def __init__(self, c: int, r: int, bias: bool = False) -> None:
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(c, c // r, bias=bias), nn.ReLU(), nn.Linear(c // r, c, bias=bias), nn.Sigmoid()
        )

    def forward(self, x):
        b, c = x.shape[:2]
        return x * self.fc(F.adaptive_avg_pool2d(x, 1).view(b, c)).view(b, c, 1, 1)


class RefCA(nn.Module):
    def __init__(self, c: int, r: int) -> None:
        super().__init__()
        self.sharedMLP = nn.Sequential(
            nn.Conv2d(c, c // r, 1, bias=False), nn.ReLU(), nn.Conv2d(c // r, c, 1, bias=False)
        )

    def forward(self, x):
        w = torch.sigmoid(
            self.sharedMLP(F.adaptive_avg_pool2d(x, 1)) + self.sharedMLP(F.adaptive_max_pool2d(x, 1))
        )
        return x * w


class RefSA(nn.Module):
    def __init__(self, k: int, norm: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, k, padding=k // 2, bias=False)
        self.bn = nn.BatchNorm2d(1) if norm else nn.Identity()

    def forward(self, x):
        pooled = torch.cat([x.mean(1, keepdim=True), x.max(1, keepdim=True)[0]], 1)
        return x * torch.sigmoid(self.bn(self.conv(pooled)))


class RefCBAM(nn.Module):
    def __init__(self, c: int, r: int, k: int, norm: bool = False) -> None:
        super().__init__()
        self.ca, self.sa = RefCA(c, r), RefSA(k, norm)

    def forward(self, x):
        return self.sa(self.ca(x))


class RefCBAtten_Res(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int, r: int) -> None:
        super().__init__()
        self.max_pool = nn.MaxPool2d(3, stride=stride, padding=1)
        self.conv_res = nn.Conv2d(cin, cout, 1)
        self.conv1 = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2)
        self.bn1 = nn.BatchNorm2d(cout)
        self.ca, self.sa = RefCA(cout, r), RefSA(k)

    def forward(self, x):
        out = self.sa(self.ca(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.conv_res(self.max_pool(x)))


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
        return (feas * att[..., None, None]).sum(1)


class RefDual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()

        def cbr():
            return nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())

        self.space_attention, self.channel_attention = cbr(), cbr()

    def forward(self, x):
        x = x + self.channel_attention(x * torch.sigmoid(F.adaptive_max_pool2d(x, 1)))
        return x + self.space_attention(x * torch.sigmoid(torch.max(x, 1)[0].unsqueeze(1)))


# ----------------------------------------------------------------------------------------------
# Helpers


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random parameters and BatchNorm statistics, so every parameter and buffer matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if not t.is_floating_point():
                continue
            if "running_var" in name:
                t.copy_(torch.rand(t.shape, generator=gen, dtype=t.dtype) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=gen, dtype=t.dtype) * 0.5)
    return module


def compare(ours: nn.Module, ref: nn.Module, x: torch.Tensor, *, train: bool, perm: bool = False) -> None:
    """Same outputs, input/parameter gradients and BatchNorm statistics as the reference (float64).

    ``perm``: ``ours`` takes (C, B, H, W) (``batch_first=False``); the reference takes (B, C, H, W).
    """
    ours = randomize(ours.to(D)).train(train)
    ref = ref.to(D).train(train)
    ref.load_state_dict(ours.state_dict(), strict=True)
    xa = x.to(D).requires_grad_()
    xb = x.to(D).requires_grad_()
    out_a = ours(xa.permute(1, 0, 2, 3) if perm else xa)
    out_a = out_a.permute(1, 0, 2, 3) if perm else out_a
    out_b = ref(xb)
    torch.testing.assert_close(out_a, out_b, atol=1e-10, rtol=1e-10)
    grad = torch.randn_like(out_b)
    out_a.backward(grad)
    out_b.backward(grad)
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-10, rtol=1e-10)
    params_b = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, params_b[name].grad, atol=1e-10, rtol=1e-10, msg=name)
    torch.testing.assert_close(ours.state_dict(), ref.state_dict(), atol=1e-12, rtol=1e-12)  # BN statistics


def x_of(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


# ----------------------------------------------------------------------------------------------
# Golden seed recordings (every recorded configuration of every gating seed class)

SEED_CLASSES = {
    "SELayer": compat.SELayer,
    "ChannelAttention": compat.ChannelAttention,
    "SpatialAttention": compat.SpatialAttention,
    "CBAtten_Res": compat.CBAtten_Res,
    "SKEConv": compat.SKEConv,
    "SeedDualAttention": compat.SeedDualAttention,
}
# Canonical classes that must load the same recordings (same keys, same arguments).
CANONICAL = {"SKEConv": SKConv, "SeedDualAttention": DualGatedAttention}


def _golden_params():
    files = [f for name in SEED_CLASSES for f in golden_files(f"seed/{name}__*.pt")]
    if not files:
        return [
            pytest.param(
                None, marks=pytest.mark.skip(reason="no golden seed recordings (shared/golden/seed)")
            )
        ]
    return [pytest.param(f, id=f.stem) for f in files]


def _run_golden(cls: type[nn.Module], path: Path) -> None:
    g = torch.load(path, weights_only=True)
    m = cls(**g["kwargs"]).double().eval()
    m.load_state_dict(g["state_dict"], strict=True)
    with torch.no_grad():
        out = m(*[g["inputs"][k] for k in g["args_order"]])
    assert out.shape == g["output"].shape
    assert (out - g["output"]).abs().max().item() <= 1e-10


@pytest.mark.parametrize("path", _golden_params())
def test_golden_seed_outputs(path):
    name = path.stem.split("__")[0]
    _run_golden(SEED_CLASSES[name], path)
    if name in CANONICAL:
        _run_golden(CANONICAL[name], path)


@pytest.mark.parametrize("path", _golden_params())
def test_golden_seed_outputs_with_grad_enabled(path):
    """The training (fused autograd) path gives the same numbers as the no-grad path."""
    g = torch.load(path, weights_only=True)
    m = SEED_CLASSES[path.stem.split("__")[0]](**g["kwargs"]).double().eval()
    m.load_state_dict(g["state_dict"], strict=True)
    xs = [g["inputs"][k].clone().requires_grad_() for k in g["args_order"]]
    out = m(*xs)
    assert (out.detach() - g["output"]).abs().max().item() <= 1e-10
    out.sum().backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in xs)


# ----------------------------------------------------------------------------------------------
# Fused kernels against the plain references (outputs, gradients, BatchNorm statistics)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize(("c", "r", "bias"), [(8, 2, False), (6, 3, True), (5, 5, False)])
def test_se_matches_reference(c, r, bias, train):
    compare(SqueezeExcite(c, r, bias=bias), RefSE(c, r, bias), x_of(3, c, 4, 5), train=train)


def test_se_seed_class_and_batch_first_false():
    compare(compat.SELayer(8, batch_first=False), RefSE(8, 2), x_of(2, 8, 3, 4), train=True, perm=True)


@pytest.mark.parametrize(("c", "r"), [(8, 4), (6, 2), (4, 4)])
def test_channel_attention_matches_reference(c, r):
    compare(ChannelAttention(c, r), RefCA(c, r), x_of(2, c, 5, 3), train=True)
    compare(ChannelAttention(c, r, batch_first=False), RefCA(c, r), x_of(2, c, 4, 4), train=False, perm=True)


@pytest.mark.parametrize("k", [3, 5, 7])
@pytest.mark.parametrize("norm", [False, True])
def test_spatial_attention_matches_reference(k, norm):
    compare(SpatialAttention(k, norm=norm), RefSA(k, norm), x_of(2, 5, 6, 7), train=True)
    compare(SpatialAttention(k, False, norm=norm), RefSA(k, norm), x_of(2, 5, 6, 7), train=False, perm=True)


@pytest.mark.parametrize(("c", "r", "k", "norm"), [(8, 2, 3, False), (12, 3, 7, True), (4, 4, 5, False)])
@pytest.mark.parametrize("train", [False, True])
def test_cbam_matches_reference(c, r, k, norm, train):
    compare(CBAM(c, r, k, spatial_norm=norm), RefCBAM(c, r, k, norm), x_of(2, c, 7, 6), train=train)


def test_cbam_batch_first_false():
    compare(CBAM(8, 2, 3, batch_first=False), RefCBAM(8, 2, 3), x_of(3, 8, 4, 5), train=True, perm=True)


@pytest.mark.parametrize(
    ("cin", "cout", "k", "stride", "r"), [(4, 8, 3, 2, 2), (6, 4, 5, 1, 4), (3, 8, 7, 2, 4), (4, 6, 3, 3, 2)]
)
@pytest.mark.parametrize("train", [False, True])
def test_cbatten_res_matches_reference(cin, cout, k, stride, r, train):
    compare(
        CBAtten_Res(cin, cout, k, stride, r),
        RefCBAtten_Res(cin, cout, k, stride, r),
        x_of(2, cin, 9, 8),
        train=train,
    )


def test_cbatten_res_batch_first_false_is_fixed():
    """The seed permuted twice with batch_first=False; here (C, B, H, W) gives the permuted result."""
    compare(
        CBAtten_Res(4, 8, 3, 2, 2, batch_first=False),
        RefCBAtten_Res(4, 8, 3, 2, 2),
        x_of(3, 4, 6, 6),
        train=True,
        perm=True,
    )


@pytest.mark.parametrize("k", [5, 7])
def test_cbatten_res_large_kernels_keep_the_shortcut_shape(k):
    """The seed's MaxPool2d(3, padding=k // 2) fails for k = 5, 7; the output size follows conv1."""
    m = CBAtten_Res(4, 8, kernel_size=k, stride=2, reduction=2)
    for h, w in [(9, 8), (7, 7), (10, 5)]:
        assert m(torch.randn(2, 4, h, w)).shape == (2, 8, (h - 1) // 2 + 1, (w - 1) // 2 + 1)


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
    ours = SKConv(c, M, G, s, L, r, dilated=dil, fuse_norm_act=fuse)
    compare(ours, RefSK(c, M, G, s, L, r, dil, fuse), x_of(3, c, 7, 6), train=train)


def test_ske_conv_seed_bugs_are_fixed():
    m = compat.SKEConv(8, M=3, G=2, L=4, batch_first=False)
    assert m.M == 3 and len(m.convs) == 3  # the seed kept self.M = 2
    compare(m, RefSK(8, 3, 2, 1, 4, 2), x_of(2, 8, 5, 5), train=True, perm=True)  # permute + backward work


@pytest.mark.parametrize("train", [False, True])
def test_dual_gated_matches_reference(train):
    compare(DualGatedAttention(6), RefDual(6), x_of(2, 6, 5, 7), train=train)


# ----------------------------------------------------------------------------------------------
# The fused gate with unusual layouts and gradients


def _reversed(t: torch.Tensor) -> torch.Tensor:
    """The same values with reversed strides: no (B, C, H*W) view exists."""
    return t.permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0)


LAYOUTS = {
    "contiguous": lambda t: t.clone(),
    "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
    "reversed": _reversed,
}


def _run_with_grad(m: nn.Module, x: torch.Tensor, g: torch.Tensor):
    m.zero_grad()
    x = x.detach().requires_grad_()
    out = m(x)
    out.backward(g)
    return out.detach(), x.grad, [p.grad.clone() for p in m.parameters()]


@pytest.mark.parametrize(
    "name", ["se", "cbam", "cbam_channel", "cbam_spatial", "cbam_res", "sk", "dual_gated"]
)
def test_memory_layouts_and_strided_gradients(name):
    """Inputs and upstream gradients in any layout (including ones with no flat view, and a
    stride-0 broadcast gradient) give the same outputs and gradients."""
    spec = attnzoo.get_spec(name)
    m = randomize(attnzoo.create(name, **spec.example.kwargs).to(D)).eval()
    x = x_of(*spec.example.inputs[0])
    g = torch.linspace(-1, 1, torch.Size(spec.example.output).numel(), dtype=D).view(spec.example.output)
    expected = _run_with_grad(m, x, g)
    for x_layout, make_x in LAYOUTS.items():
        for g_layout, make_g in LAYOUTS.items():
            got = _run_with_grad(m, make_x(x), make_g(g))
            torch.testing.assert_close(
                got, expected, atol=1e-12, rtol=1e-12, msg=f"x {x_layout}, g {g_layout}"
            )
    dense = torch.full(spec.example.output, 0.5, dtype=D)
    broadcast = torch.full((1, 1, 1, 1), 0.5, dtype=D).expand(spec.example.output)
    torch.testing.assert_close(
        _run_with_grad(m, x, broadcast), _run_with_grad(m, x, dense), atol=1e-12, rtol=1e-12
    )


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


@pytest.mark.parametrize("name", ["cbam", "sk"])
def test_second_derivative_is_exact(name):
    spec = attnzoo.get_spec(name)
    m = randomize(attnzoo.create(name, **spec.example.kwargs).to(D)).eval()
    x = x_of(*spec.example.inputs[0]).requires_grad_()
    assert torch.autograd.gradgradcheck(m, (x,), fast_mode=True)


def test_gradients_reach_parameters_when_input_is_constant():
    m = randomize(CBAM(8, 2, 3).to(D))
    m(x_of(2, 8, 5, 5)).square().sum().backward()  # x does not require grad
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_no_grad_path_matches_autograd_path():
    for name in ["se", "cbam", "cbam_res", "sk", "dual_gated"]:
        spec = attnzoo.get_spec(name)
        m = randomize(attnzoo.create(name, **spec.example.kwargs).to(D)).eval()
        x = x_of(*spec.example.inputs[0])
        with torch.no_grad():
            plain = m(x)
        torch.testing.assert_close(m(x.requires_grad_()).detach(), plain, atol=1e-13, rtol=1e-13)


# ----------------------------------------------------------------------------------------------
# Errors: bad constructor arguments and bad inputs name what was expected and what was given


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: SqueezeExcite(8, 16), r"reduction=16 leaves zero hidden channels for channels=8"),
        (lambda: compat.SELayer(3, 4), r"reduction=4 leaves zero hidden"),
        (lambda: ChannelAttention(2), r"reduction=4 leaves zero hidden channels for in_channels=2"),
        (lambda: CBAM(8), r"reduction=16 leaves zero hidden"),
        (lambda: CBAtten_Res(4, 2), r"reduction=4 leaves zero hidden channels for out_channels=2"),
        (lambda: SpatialAttention(4), r"kernel_size must be one of \(3, 5, 7\), got 4"),
        (lambda: CBAM(16, 4, kernel_size=9), r"kernel_size must be one of \(3, 5, 7\), got 9"),
        (lambda: CBAtten_Res(4, 8, kernel_size=1), r"kernel_size must be one of \(3, 5, 7\), got 1"),
        (lambda: SKConv(8, M=0), r"M must be >= 1, got 0"),
        (lambda: compat.SKEConv(9, G=2), r"in_channels=9 must be divisible by G=2"),
        (lambda: SKConv(8, L=0, reduction=16), r"leave zero hidden features for in_channels=8"),
        (lambda: SKConv(8, reduction=0), r"reduction must be > 0, got 0"),
        (lambda: SKConv(8, stride=0), r"stride must be >= 1, got 0"),
        (lambda: DualGatedAttention(0), r"channels must be >= 1, got 0"),
    ],
)
def test_bad_constructor_arguments(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


def test_non_int_arguments_raise_type_error():
    with pytest.raises(TypeError, match="channels must be an int"):
        SqueezeExcite(8.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="M must be an int"):
        SKConv(8, M=2.5)  # type: ignore[arg-type]


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
        (
            ChannelAttention(8),
            torch.randn(2, 8, 16),
            r"ChannelAttention expects x of shape \(B, 8, H, W\) \(4-D\), got \(2, 8, 16\) \(3-D\)",
        ),
        (SpatialAttention(3, channels=4), torch.randn(1, 5, 3, 3), r"with C=4, got \(1, 5, 3, 3\)"),
        (CBAM(8, 2), torch.randn(1, 1, 8, 4, 4), r"CBAM expects x of shape \(B, 8, H, W\) \(4-D\)"),
        (
            CBAtten_Res(4, 8),
            torch.randn(2, 8, 6, 6),
            r"CBAtten_Res expects x of shape \(B, 4, H, W\) with C=4",
        ),
        (
            SKConv(8, L=4),
            torch.randn(2, 4, 6, 6),
            r"SKConv expects x of shape \(B, 8, H, W\) with C=8, got \(2, 4, 6, 6\)",
        ),
        (
            DualGatedAttention(4),
            torch.randn(4, 4, 4),
            r"DualGatedAttention expects x of shape \(B, 4, H, W\) \(4-D\)",
        ),
    ],
)
def test_bad_inputs(module, x, match):
    with pytest.raises(ValueError, match=match):
        module(x)


def test_spatial_attention_accepts_any_channel_count_without_channels():
    m = SpatialAttention(5)
    for c in (1, 3, 17):
        assert m(torch.randn(2, c, 6, 6)).shape == (2, c, 6, 6)


def test_seed_names_build_seed_classes():
    assert type(attnzoo.create("SELayer", channel=8)) is compat.SELayer
    assert type(attnzoo.create("SKEConv", in_channels=8)) is compat.SKEConv
    assert type(attnzoo.create("SeedDualAttention", channels=4)) is compat.SeedDualAttention
    assert type(attnzoo.create("ChannelAttention", in_channels=8)) is ChannelAttention
    assert type(attnzoo.create("CBAtten_Res", in_channels=4, out_channels=8)) is CBAtten_Res


# ----------------------------------------------------------------------------------------------
# timm integration: map timm's weights into ours, same outputs and gradients (skip without timm)


def _load_mapped(ours: nn.Module, theirs: nn.Module, mapping: dict[str, torch.Tensor]) -> None:
    state = ours.state_dict()
    for k in state:
        if k not in mapping:
            mapping[k] = torch.zeros_like(state[k])  # our extra biases (timm has none)
    ours.load_state_dict(mapping, strict=True)


def _compare_modules(ours: nn.Module, theirs: nn.Module, x: torch.Tensor, *, train: bool) -> None:
    ours.train(train)
    theirs.train(train)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_a, out_b = ours(xa), theirs(xb)
    torch.testing.assert_close(out_a, out_b, atol=1e-10, rtol=1e-10)
    g = torch.randn_like(out_b)
    out_a.backward(g)
    out_b.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("train", [False, True])
def test_timm_se_module(train):
    timm_se = pytest.importorskip("timm.layers.squeeze_excite")
    theirs = randomize(timm_se.SEModule(12, rd_channels=3).to(D))
    ours = SqueezeExcite(12, reduction=4, bias=True).to(D)
    sd = theirs.state_dict()
    _load_mapped(
        ours,
        theirs,
        {
            "fc.0.weight": sd["fc1.weight"].flatten(1),
            "fc.0.bias": sd["fc1.bias"],
            "fc.2.weight": sd["fc2.weight"].flatten(1),
            "fc.2.bias": sd["fc2.bias"],
        },
    )
    _compare_modules(ours, theirs, x_of(2, 12, 5, 6), train=train)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("k", [3, 7])
def test_timm_cbam_module(k, train):
    timm_cbam = pytest.importorskip("timm.layers.cbam")
    theirs = randomize(timm_cbam.CbamModule(16, rd_channels=4, spatial_kernel_size=k).to(D))
    ours = CBAM(16, reduction=4, kernel_size=k, spatial_norm=True).to(D)
    sd = theirs.state_dict()
    mapping = {
        "ca.sharedMLP.0.weight": sd["channel.fc1.weight"],
        "ca.sharedMLP.2.weight": sd["channel.fc2.weight"],
        "sa.conv.weight": sd["spatial.conv.conv.weight"],
    }
    mapping.update(
        {
            f"sa.bn.{n}": sd[f"spatial.conv.bn.{n}"]
            for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
        }
    )
    _load_mapped(ours, theirs, mapping)
    _compare_modules(ours, theirs, x_of(3, 16, 7, 6), train=train)
    torch.testing.assert_close(ours.sa.bn.running_mean, theirs.spatial.conv.bn.running_mean)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize(
    ("paths", "keep_3x3", "groups", "stride"), [(2, False, 2, 1), (3, True, 4, 2), (2, True, 1, 1)]
)
def test_timm_selective_kernel(paths, keep_3x3, groups, stride, train):
    timm_sk = pytest.importorskip("timm.layers.selective_kernel")
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
    ours = SKConv(
        c, M=paths, G=groups, stride=stride, L=d, reduction=c, dilated=keep_3x3, fuse_norm_act=True
    ).to(D)
    sd = theirs.state_dict()
    mapping = {"fc.weight": sd["attn.fc_reduce.weight"].flatten(1)}
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    mapping.update({f"fuse.0.{n}": sd[f"attn.bn.{n}"] for n in bn})
    select = sd["attn.fc_select.weight"].flatten(1)  # (M * C, d): rows of branch i are i*C .. (i+1)*C
    for i in range(paths):
        mapping[f"convs.{i}.0.weight"] = sd[f"paths.{i}.conv.weight"]
        mapping.update({f"convs.{i}.1.{n}": sd[f"paths.{i}.bn.{n}"] for n in bn})
        mapping[f"fcs.{i}.weight"] = select[i * c : (i + 1) * c]
    _load_mapped(ours, theirs, mapping)
    _compare_modules(ours, theirs, x_of(3, c, 7, 8), train=train)
