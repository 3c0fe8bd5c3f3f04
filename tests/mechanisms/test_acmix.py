"""ACmix: recorded official outputs, a plain float64 reference of the official algorithm, the kernel."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import golden_files, load_golden
from torch import Tensor, nn

import attnzoo
from attnzoo import compat
from attnzoo.mechanisms.acmix import ACmix, OfficialACmix, neighbourhood_attention, position_grid, reflect_pad

GOLDEN = golden_files("acmix_*.pt")
GOLDEN_TOL = {torch.float64: 1e-8, torch.float32: 1e-4}


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


# ---------------------------------------------------------------------------------------------
# Plain reference: the official forward step by step (unfold of every neighbourhood), generalised
# only where the official crashes: ceil output sizes, padding kernel_conv // 2, dilated unfold,
# repeated reflection for small maps (written as a loop, independently of the module's formula).


def reflect_index_loop(size: int, pad: int) -> list[int]:
    out = []
    for i in range(-pad, size + pad):
        while size > 1 and not 0 <= i < size:
            i = -i if i < 0 else 2 * (size - 1) - i
        out.append(0 if size == 1 else i)
    return out


def ref_pad(t: Tensor, pad: int) -> Tensor:
    rows = torch.tensor(reflect_index_loop(t.shape[-2], pad))
    cols = torch.tensor(reflect_index_loop(t.shape[-1], pad))
    return t[..., rows, :][..., cols]


def reference(
    m: ACmix, x: Tensor, need_weights: bool = False, conv_padding: int | None = None
) -> Tensor | tuple[Tensor, Tensor]:
    q, k, v = m.conv1(x), m.conv2(x), m.conv3(x)
    b, c, h, w = q.shape
    s, ka, dil, head, hd = m.stride, m.kernel_att, m.dilation, m.num_heads, m.head_dim
    ho, wo = -(-h // s), -(-w // s)
    loc_w = torch.linspace(-1.0, 1.0, w, dtype=x.dtype).unsqueeze(0).repeat(h, 1)
    loc_h = torch.linspace(-1.0, 1.0, h, dtype=x.dtype).unsqueeze(1).repeat(1, w)
    pe = m.conv_p(torch.cat([loc_w.unsqueeze(0), loc_h.unsqueeze(0)], 0).unsqueeze(0))
    q_att = q.view(b * head, hd, h, w) * hd**-0.5
    k_att, v_att = k.view(b * head, hd, h, w), v.view(b * head, hd, h, w)
    q_att, q_pe = q_att[:, :, ::s, ::s], pe[:, :, ::s, ::s]
    pad = (dil * (ka - 1) + 1) // 2

    def unfold(t: Tensor) -> Tensor:
        return F.unfold(ref_pad(t, pad), ka, dilation=dil, stride=s).view(t.shape[0], hd, ka * ka, ho, wo)

    att = (q_att.unsqueeze(2) * (unfold(k_att) + q_pe.unsqueeze(2) - unfold(pe))).sum(1).softmax(1)
    out_att = (att.unsqueeze(1) * unfold(v_att)).sum(2).view(b, c, ho, wo)
    f_all = m.fc(torch.cat([t.view(b, head, hd, h * w) for t in (q, k, v)], 1))
    f_conv = f_all.permute(0, 2, 1, 3).reshape(b, -1, h, w)
    pad_conv = m.kernel_conv // 2 if conv_padding is None else conv_padding  # official: 1 hard-coded
    out_conv = F.conv2d(f_conv, m.dep_conv.weight, None, s, pad_conv, 1, hd)
    out = m.rate1 * out_att + m.rate2 * out_conv
    if need_weights:  # (B*h, K2, Ho, Wo) -> (B, h, Ho, Wo, K2)
        return out, att.view(b, head, ka * ka, ho, wo).permute(0, 1, 3, 4, 2)
    return out


def randomised(m: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return m


# ---------------------------------------------------------------------------------------------
# Recorded official outputs


@pytest.mark.parametrize("path", GOLDEN, ids=[p.name for p in GOLDEN])
def test_golden_official_outputs(path):
    rec = load_golden(f"{path.name}")
    dtype = getattr(torch, rec["dtype"])
    with default_dtype(getattr(torch, rec["default_dtype"])):
        m = compat.ACmix(**rec["kwargs"]).to(dtype)
        m.load_state_dict(rec["state_dict"], strict=True)
        m.eval()
        with torch.no_grad():
            out = m(*[rec["inputs"][a] for a in rec["forward_args"]])
    assert list(m.state_dict()) == list(rec["state_dict"])
    assert out.shape == rec["output"].shape and out.dtype == rec["output"].dtype
    assert (out - rec["output"]).abs().max().item() <= GOLDEN_TOL[dtype]


@pytest.mark.parametrize("path", GOLDEN, ids=[p.name for p in GOLDEN])
def test_golden_under_float32_default_dtype(path):
    """The official needs the default dtype set for float64; ours builds the grid in x.dtype."""
    rec = load_golden(f"{path.name}")
    dtype = getattr(torch, rec["dtype"])
    with default_dtype(torch.float32):
        m = compat.ACmix(**rec["kwargs"]).to(dtype).eval()
        m.load_state_dict(rec["state_dict"], strict=True)
        with torch.no_grad():
            out = m(rec["inputs"]["x"])
    assert (out - rec["output"]).abs().max().item() <= GOLDEN_TOL[dtype]


@pytest.mark.parametrize("path", GOLDEN, ids=[p.name for p in GOLDEN])
def test_golden_canonical_class(path):
    """The canonical ACmix with the official arguments renamed: same state_dict, same numbers."""
    rec = load_golden(f"{path.name}")
    dtype = getattr(torch, rec["dtype"])
    kw = dict(rec["kwargs"])
    m = ACmix(kw.pop("in_planes"), kw.pop("out_planes"), num_heads=kw.pop("head"), **kw, dtype=dtype).eval()
    m.load_state_dict(rec["state_dict"], strict=True)
    with torch.no_grad():
        out, weights = m(rec["inputs"]["x"], need_weights=True)
    assert (out - rec["output"]).abs().max().item() <= GOLDEN_TOL[dtype]
    b, _, ho, wo = out.shape
    assert weights.shape == (b, m.num_heads, ho, wo, m.kernel_att**2)
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1], dtype=dtype))
    assert _plain_signature(compat.ACmix.__init__) == rec["init_signature"]
    assert _plain_signature(compat.ACmix.forward) == rec["forward_signature"]


def _plain_signature(fn) -> str:
    """`(self, in_planes, out_planes, kernel_att=7, ...)`: names and defaults, no annotations."""
    params = inspect.signature(fn).parameters.values()
    names = [p.name if p.default is p.empty else f"{p.name}={p.default!r}" for p in params]
    return "(" + ", ".join(names) + ")"


def test_golden_files_present_or_skipped():
    if not GOLDEN:
        pytest.skip("no acmix golden files (set ATTNZOO_GOLDEN)")
    assert {p.name for p in GOLDEN} >= {"acmix_01.pt", "acmix_02.pt", "acmix_05.pt"}


# ---------------------------------------------------------------------------------------------
# The module against the plain reference, float64, values and every gradient

CONFIGS = [
    # (kwargs, input shape)
    (dict(channels=8, out_channels=8, kernel_att=7, num_heads=4), (2, 8, 9, 10)),
    (dict(channels=6, out_channels=8, kernel_att=5, num_heads=2, stride=2), (2, 6, 9, 7)),  # H, W % 2
    (dict(channels=6, out_channels=8, kernel_att=5, num_heads=2, stride=2), (1, 6, 8, 8)),
    (dict(channels=4, out_channels=12, kernel_att=3, num_heads=3, stride=3), (2, 4, 7, 8)),
    (dict(channels=4, out_channels=8, kernel_att=3, num_heads=2, kernel_conv=5), (2, 4, 6, 7)),
    (dict(channels=4, out_channels=8, kernel_att=1, num_heads=4, kernel_conv=1), (2, 4, 5, 5)),
    (dict(channels=4, out_channels=8, kernel_att=3, num_heads=2, dilation=2), (2, 4, 7, 6)),
    (dict(channels=4, out_channels=8, kernel_att=3, num_heads=1, dilation=2, stride=2), (2, 4, 7, 9)),
    (dict(channels=4, out_channels=8, kernel_att=7, num_heads=2), (2, 4, 3, 5)),  # pad 3 >= H: reflect again
    (dict(channels=4, out_channels=4, kernel_att=5, num_heads=2, stride=2), (2, 4, 1, 4)),  # a 1-pixel side
]


@pytest.mark.parametrize("kwargs,shape", CONFIGS, ids=[str(i) for i in range(len(CONFIGS))])
def test_matches_plain_reference_values_and_gradients(kwargs, shape):
    m = randomised(ACmix(**kwargs).double())
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    out, ref = m(x), reference(m, x)
    s = kwargs.get("stride", 1)
    assert out.shape == (shape[0], kwargs["out_channels"], -(-shape[2] // s), -(-shape[3] // s))
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    with torch.no_grad():
        out_w, weights = m(x, need_weights=True)
        _, ref_weights = reference(m, x, need_weights=True)
    torch.testing.assert_close(out_w, out, atol=0, rtol=0)
    torch.testing.assert_close(weights, ref_weights, atol=1e-12, rtol=1e-10)
    grad = torch.randn_like(out)
    params = [x, *m.parameters()]
    got = torch.autograd.grad(out, params, grad)
    want = torch.autograd.grad(ref, params, grad, allow_unused=True)
    names = ["x", *(n for n, _ in m.named_parameters())]
    for name, g, r in zip(names, got, want, strict=True):
        r = torch.zeros_like(g) if r is None else r
        torch.testing.assert_close(g, r, atol=1e-9, rtol=1e-9, msg=f"gradient of {name}")


@pytest.mark.parametrize("kernel_conv,stride,size", [(5, 3, (9, 6)), (7, 5, (10, 5)), (5, 4, (8, 12))])
def test_compat_keeps_official_conv_padding_where_the_official_runs(kernel_conv, stride, size):
    # The official dep_conv pads 1 whatever kernel_conv is; for 3 <= kernel_conv <= stride + 2 its sizes
    # still fit (H divisible by stride), so official checkpoints exist there and their numbers must hold.
    m = randomised(OfficialACmix(4, 6, 3, 2, kernel_conv, stride=stride).double())
    x = torch.randn(2, 4, *size, dtype=torch.float64, requires_grad=True)
    out, ref = m(x), reference(m, x, conv_padding=1)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    grad = torch.randn_like(out)
    got, want = torch.autograd.grad(out, x, grad)[0], torch.autograd.grad(ref, x, grad)[0]
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    # A size the official cannot run (H not divisible by the stride) still gives ceil(H / stride).
    odd = m(torch.randn(1, 4, size[0] + 1, size[1] - 1, dtype=torch.float64))
    assert odd.shape[-2:] == (-(-(size[0] + 1) // stride), -(-(size[1] - 1) // stride))
    # The canonical class keeps the centred kernel_conv // 2.
    canonical = ACmix(4, 6, 3, 2, kernel_conv, stride=stride).double()
    canonical.load_state_dict(m.state_dict())
    torch.testing.assert_close(canonical(x), reference(canonical, x), atol=1e-10, rtol=1e-10)


def test_float32_close_to_float64_reference():
    m = randomised(ACmix(8, 8, kernel_att=5, num_heads=2, stride=2))
    x = torch.randn(2, 8, 11, 10)
    with torch.no_grad():
        out = m(x)
        ref = reference(m.double(), x.double())
    assert (out.double() - ref).abs().max().item() < 1e-4


def test_conv_p_bias_has_no_effect():
    m = randomised(ACmix(4, 8, kernel_att=3, num_heads=2).double()).eval()
    x = torch.randn(1, 4, 5, 6, dtype=torch.float64)
    before = m(x)
    with torch.no_grad():
        m.conv_p.bias.add_(3.0)
    torch.testing.assert_close(m(x), before, atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------------------------
# The kernel and the padding on their own


def plain_local_attention(q, k_pad, v_pad, kernel, dilation, stride):
    n, d, ho, wo = q.shape
    k_u, v_u = (
        F.unfold(t, kernel, dilation=dilation, stride=stride).view(n, d, kernel * kernel, -1)
        for t in (k_pad, v_pad)
    )
    logits = (q.reshape(n, d, 1, ho * wo) * k_u).sum(1).softmax(1)  # (n, K2, L)
    return (logits.unsqueeze(1) * v_u).sum(2).view(n, d, ho, wo)


@pytest.mark.parametrize(
    "kernel,dilation,stride,h,w",
    [
        (3, 1, 1, 6, 7),
        (5, 1, 2, 7, 6),
        (3, 2, 2, 9, 8),
        (5, 3, 2, 8, 8),
        (3, 1, 3, 10, 11),
        (1, 1, 2, 5, 4),
    ],
)
def test_neighbourhood_attention_matches_unfold(kernel, dilation, stride, h, w):
    pad = dilation * (kernel - 1) // 2
    ho, wo = -(-h // stride), -(-w // stride)
    q = torch.randn(3, 4, ho, wo, dtype=torch.float64, requires_grad=True)
    k = torch.randn(3, 4, h + 2 * pad, w + 2 * pad, dtype=torch.float64, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    if (h + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1 != ho:
        pytest.skip("unfold gives a different size")
    out = neighbourhood_attention(q, k, v, kernel, dilation, stride)
    ref = plain_local_attention(q, k, v, kernel, dilation, stride)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    grad = torch.randn_like(out)
    for g, r in zip(
        torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad), strict=True
    ):
        torch.testing.assert_close(g, r, atol=1e-12, rtol=1e-12)
    assert torch.autograd.gradcheck(
        lambda *a: neighbourhood_attention(*a, kernel, dilation, stride), (q, k, v), fast_mode=True
    )


def test_neighbourhood_attention_rejects_short_keys():
    q = torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match="expects k_pad and v_pad"):
        neighbourhood_attention(q, torch.randn(1, 2, 5, 6), torch.randn(1, 2, 5, 6), 3)


@pytest.mark.parametrize("stride", [1, 2])
def test_double_backward(stride):
    q = torch.randn(1, 2, -(-3 // stride), -(-4 // stride), dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(
        lambda *a: neighbourhood_attention(*a, 3, 1, stride), (q, k, v), fast_mode=True
    )
    m = randomised(ACmix(4, 4, kernel_att=3, num_heads=2, stride=stride).double())
    x = torch.randn(1, 4, 4, 5, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(m(x).square().sum(), x, create_graph=True)
    (gx_ref,) = torch.autograd.grad(reference(m, x).square().sum(), x, create_graph=True)
    second = torch.autograd.grad(gx.square().sum(), [x, *m.parameters()], allow_unused=True)
    second_ref = torch.autograd.grad(gx_ref.square().sum(), [x, *m.parameters()], allow_unused=True)
    for g, r in zip(second, second_ref, strict=True):
        if r is not None:
            torch.testing.assert_close(g, r, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize(
    "h,w,pad", [(5, 6, 2), (3, 4, 3), (2, 5, 4), (1, 4, 2), (4, 1, 3), (1, 1, 2), (6, 6, 0)]
)
def test_reflect_pad_matches_numpy(h, w, pad):
    x = torch.randn(2, 3, h, w, dtype=torch.float64)
    want = np.pad(x.numpy(), ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="reflect")
    np.testing.assert_array_equal(reflect_pad(x, pad).numpy(), want)


def test_position_grid_follows_dtype_and_layout():
    grid = position_grid(3, 5, torch.float64, torch.device("cpu"))
    assert grid.shape == (1, 2, 3, 5) and grid.dtype == torch.float64
    torch.testing.assert_close(grid[0, 0, 1], torch.linspace(-1, 1, 5, dtype=torch.float64))
    torch.testing.assert_close(grid[0, 1, :, 2], torch.linspace(-1, 1, 3, dtype=torch.float64))
    assert position_grid(2, 2, torch.bfloat16, torch.device("cpu")).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# Construction, parameters, initialisation, errors


def test_state_dict_layout_matches_official():
    m = ACmix(16, 64, kernel_att=5, num_heads=4)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "rate1": (1,),
        "rate2": (1,),
        "conv1.weight": (64, 16, 1, 1),
        "conv1.bias": (64,),
        "conv2.weight": (64, 16, 1, 1),
        "conv2.bias": (64,),
        "conv3.weight": (64, 16, 1, 1),
        "conv3.bias": (64,),
        "conv_p.weight": (16, 2, 1, 1),
        "conv_p.bias": (16,),
        "fc.weight": (9, 12, 1, 1),
        "dep_conv.weight": (64, 9, 3, 3),
    }
    assert list(shapes)[:2] == ["rate1", "rate2"] and m.dep_conv.bias is None


def test_initialisation_as_official():
    torch.manual_seed(7)
    m = ACmix(8, 12, num_heads=3, kernel_conv=3)
    assert m.rate1.item() == 0.5 and m.rate2.item() == 0.5
    for o in range(12):
        for j in range(9):
            expected = torch.zeros(3, 3)
            expected[j // 3, j % 3] = 1.0
            assert torch.equal(m.dep_conv.weight[o, j], expected)
    # The 1x1 convolutions keep PyTorch's default init, drawn in the official order.
    torch.manual_seed(7)
    official = [
        nn.Conv2d(8, 12, 1),
        nn.Conv2d(8, 12, 1),
        nn.Conv2d(8, 12, 1),
        nn.Conv2d(2, 4, 1),
        nn.Conv2d(9, 9, 1, bias=False),
    ]
    for mine, theirs in zip((m.conv1, m.conv2, m.conv3, m.conv_p), official[:4], strict=True):
        assert torch.equal(mine.weight, theirs.weight) and torch.equal(mine.bias, theirs.bias)
    assert torch.equal(m.fc.weight, official[4].weight)


def test_identity_shift_conv_branch_at_init():
    """With the shift init, dep_conv tap j reads channel j of fc's output at offset j."""
    m = ACmix(4, 8, kernel_att=3, num_heads=2).double()
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        m.rate1.zero_()
        out = m(x)
    torch.testing.assert_close(out, reference(m, x), atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "cls,kwargs,match",
    [
        (ACmix, dict(kernel_att=4), "ACmix: kernel_att must be odd"),
        (ACmix, dict(kernel_conv=2), "kernel_conv must be odd"),
        (ACmix, dict(num_heads=3), "ACmix: out_channels=8 must be divisible by num_heads=3"),
        (ACmix, dict(stride=0), "stride must be >= 1"),
        (ACmix, dict(dilation=0), "dilation must be >= 1"),
        (ACmix, dict(num_heads=0), "ACmix: num_heads must be >= 1"),
        (OfficialACmix, dict(kernel_att=4), "kernel_att must be odd"),
        (OfficialACmix, dict(head=3), "ACmix: out_planes=8 must be divisible by head=3"),
        (OfficialACmix, dict(head=0), "ACmix: head must be >= 1"),
    ],
)
def test_bad_arguments_rejected_at_construction(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(4, 8, **kwargs)
    with pytest.raises(ValueError, match="ACmix: channels must be >= 1"):
        ACmix(0)
    with pytest.raises(ValueError, match="ACmix: out_channels must be >= 1"):
        ACmix(4, 0)
    with pytest.raises(ValueError, match="ACmix: in_planes must be >= 1"):
        OfficialACmix(0, 8)


def test_non_int_argument_is_type_error():
    with pytest.raises(TypeError, match="kernel_att must be an int"):
        ACmix(4, 8, kernel_att=3.0)


def test_input_errors_name_expected_and_given():
    m = ACmix(4, 8, kernel_att=3, num_heads=2)
    with pytest.raises(
        ValueError, match=r"ACmix expects x of shape \(B, 4, H, W\) with C=4, got \(1, 5, 6, 6\)"
    ):
        m(torch.randn(1, 5, 6, 6))
    with pytest.raises(ValueError, match="4-D"):
        m(torch.randn(4, 6, 6))
    with pytest.raises(TypeError, match=r"x of dtype torch.float32 \(the dtype of its parameters\), "
                                        r"got torch.float64"):
        m(torch.randn(1, 4, 6, 6, dtype=torch.float64))


def test_registry_and_compat():
    assert compat.ACmix is OfficialACmix and issubclass(OfficialACmix, attnzoo.ACmix)
    assert attnzoo.ACmix is ACmix
    m = attnzoo.create("acmix", 4, num_heads=2)
    assert type(m) is ACmix and (m.channels, m.out_channels, m.num_heads) == (4, 4, 2)
    seed = attnzoo.create("ACmix", in_planes=4, out_planes=8, head=2)
    assert type(seed) is OfficialACmix and (seed.in_planes, seed.out_planes, seed.head) == (4, 8, 2)
    assert list(seed.state_dict()) == list(ACmix(4, 8, num_heads=2).state_dict())
    assert "need_weights" not in inspect.signature(OfficialACmix.forward).parameters
    spec = attnzoo.get_spec("acmix")
    assert spec.layout == "NCHW" and not spec.uses_attend
