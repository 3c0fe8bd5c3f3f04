"""attend's fused path (SDPA; on CPU the flash kernel through attnzoo.kernels.flash) against its
float64 math path, under torch's tools, with double backward; fully masked rows on every path."""

from __future__ import annotations

import pytest
import torch
from tests.kernels.kernel_checks import (
    Holder,
    assert_autocast_bf16,
    assert_flop_counter,
    assert_gradgradcheck,
    assert_matches,
    assert_torch_func,
)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import attnzoo
from attnzoo.functional import attend
from attnzoo.kernels.flash import sdpa

FLASH_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default
L, S = 5, 6


def _mask(kind: str | None, dtype=torch.float64):
    gen = torch.Generator().manual_seed(3)
    if kind == "bool":
        keep = torch.rand(L, S, generator=gen) > 0.4
        keep[:, 0] = True
        return keep
    if kind == "float":
        return torch.randn(1, 2, L, S, generator=gen, dtype=dtype)
    return None


MASKS = [None, "bool", "float", "causal"]


def fused(kind):
    mask = None if kind in (None, "causal") else _mask(kind)

    def go(q, k, v):
        m = mask.to(q.dtype) if mask is not None and mask.is_floating_point() else mask
        return attend(q, k, v, mask=m, causal=kind == "causal")

    return go


def math(kind):
    run = fused(kind)

    def go(q, k, v):
        with attnzoo.fused_attn(False):
            return run(q, k, v)

    return go


def tensors(dtype=torch.float64, d=4, e=4):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(2, 2, n, w, generator=gen, dtype=dtype) for n, w in ((L, d), (S, d), (S, e))]


@pytest.mark.parametrize("kind", MASKS, ids=str)
def test_fused_matches_math(kind):
    assert_matches(fused(kind), math(kind), tensors())


@pytest.mark.parametrize("kind", MASKS, ids=str)
def test_second_derivatives_through_the_fused_path(kind):
    assert_gradgradcheck(fused(kind), tensors())


def test_learnable_bias_second_derivatives():
    # A bias that requires grad takes SDPA's math path, which has its own double backward.
    q, k, v = tensors()
    bias = torch.randn(2, L, S, dtype=torch.float64)
    assert_gradgradcheck(lambda q_, b: attend(q_, k, v, bias=b), [q, bias])


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: set = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func)
        return func(*args, **(kwargs or {}))


def test_first_order_keeps_the_fused_backward_and_create_graph_recomputes():
    q, k, v = (t.float().requires_grad_() for t in tensors())
    out = attend(q, k, v)
    assert type(out.grad_fn).__name__ == "_FlashCPUBackward"
    with _Ops() as first:
        torch.autograd.grad(out.sum(), (q, k, v), retain_graph=True)
    assert FLASH_BWD in first.ops
    with _Ops() as second:
        torch.autograd.grad(out.sum(), (q, k, v), create_graph=True)
    assert FLASH_BWD not in second.ops


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_sdpa_equals_torch_sdpa_bitwise(kind):
    q, k, v = tensors(torch.float32)
    mask = _mask(kind, torch.float32)
    ours = [t.clone().requires_grad_() for t in (q, k, v)]
    theirs = [t.clone().requires_grad_() for t in (q, k, v)]
    a = sdpa(*ours, attn_mask=mask)
    b = torch.nn.functional.scaled_dot_product_attention(*theirs, attn_mask=mask)
    a.square().sum().backward()
    b.square().sum().backward()
    assert torch.equal(a, b)
    for x, y in zip(ours, theirs, strict=True):
        assert torch.equal(x.grad, y.grad)


@pytest.mark.parametrize("kind", MASKS, ids=str)
def test_flop_counter_with_backward(kind):
    assert_flop_counter(fused(kind), tensors(torch.float32), counted=True)


def _flops(fn, backward: bool) -> int:
    q, k, v = (t.float().requires_grad_(backward) for t in tensors())
    with FlopCounterMode(display=False) as counter:
        out = fn(q, k, v)
        if backward:
            out.sum().backward()
    return counter.get_total_flops()


def test_flop_counter_counts_the_cpu_flash_kernel_as_the_math_path():
    """torch 2.14 registers no formula for the CPU flash ops: attention on the fused path counted 0 FLOPs
    while the math path counted its products. Forward: the same two products; backward: the math path's
    four and the logits the kernel recomputes."""
    logits = 2 * 2 * 2 * L * S * 4  # (b, h, d) = (2, 2, 4); the value width e is d as well
    assert _flops(fused(None), backward=False) == _flops(math(None), backward=False) == 2 * logits
    assert _flops(fused(None), backward=True) == _flops(math(None), backward=True) + logits


@pytest.mark.parametrize("kind", MASKS, ids=str)
def test_torch_func_grad_over_functional_call(kind):
    assert_torch_func(Holder(fused(kind), tensors(torch.float32)))


@pytest.mark.parametrize("kind", MASKS, ids=str)
def test_forward_mode_ad_and_nested_torch_func_grad_equal_the_math_path(kind):
    """Under forward-mode AD and a torch.func grad transform attention runs SDPA's math op, which
    takes a bool mask as 0 / 1 added to the logits: the mask is made additive first (it once was not,
    and a bool mask gave other outputs there)."""
    q, k, v = tensors()
    tangent = torch.randn(q.shape, generator=torch.Generator().manual_seed(4), dtype=q.dtype)
    out, tan = torch.func.jvp(lambda x: fused(kind)(x, k, v), (q,), (tangent,))
    want, want_tan = torch.func.jvp(lambda x: math(kind)(x, k, v), (q,), (tangent,))
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(tan, want_tan, atol=1e-10, rtol=1e-10)
    loss = lambda x: fused(kind)(x, k, v).square().sum()  # noqa: E731
    hvp = torch.func.grad(lambda x: (torch.func.grad(loss)(x) * tangent).sum())(q)
    x0 = q.clone().requires_grad_()
    with attnzoo.fused_attn(False):
        (g,) = torch.autograd.grad(loss(x0), x0, create_graph=True)
    (want_hvp,) = torch.autograd.grad((g * tangent).sum(), x0)
    torch.testing.assert_close(hvp, want_hvp, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("kind", MASKS, ids=str)
def test_autocast_bf16_forward_and_backward(kind):
    assert_autocast_bf16(fused(kind), tensors(torch.float32), math(kind))


def _dead(kind: str):
    """A mask whose query 1 may attend to nothing (and query 3 to some keys)."""
    if kind == "bool":
        keep = torch.ones(L, S, dtype=torch.bool)
        keep[1] = False
        keep[3, ::2] = False
        return keep
    mask = torch.zeros(L, S, dtype=torch.float64)
    mask[1] = float("-inf")
    mask[3, ::2] = float("-inf")
    return mask


@pytest.mark.parametrize("path", ["fused", "math"])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_fully_masked_rows_give_zeros_and_finite_gradients(kind, path):
    q, k, v = (t.requires_grad_() for t in tensors())
    with attnzoo.fused_attn(path == "fused"):
        out = attend(q, k, v, mask=_dead(kind))
        out.square().sum().backward()
    assert torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1]))
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert torch.equal(q.grad[:, :, 1], torch.zeros_like(q.grad[:, :, 1]))


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_fully_masked_rows_agree_across_paths_with_second_derivatives(kind):
    mask = _dead(kind)
    run = lambda q, k, v: attend(q, k, v, mask=mask)  # noqa: E731
    assert_matches(run, lambda *t: _math_masked(mask, *t), tensors())
    assert_gradgradcheck(run, tensors())


def _math_masked(mask, q, k, v):
    with attnzoo.fused_attn(False):
        return attend(q, k, v, mask=mask)


def test_fully_masked_bias_rows_with_a_learnable_bias():
    # A float -inf bias that requires grad (SDPA's math path inside the fused branch).
    q, k, v = tensors()
    bias = torch.randn(2, L, S, dtype=torch.float64)
    bias[:, 1] = float("-inf")
    bias.requires_grad_()
    out = attend(q, k, v, bias=bias)
    out.square().sum().backward()
    assert torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1]))
    assert torch.isfinite(bias.grad).all()


@pytest.mark.parametrize("kind", [*MASKS, "dead"], ids=str)
def test_large_logits_give_the_math_paths_gradients(kind):
    """Queries and keys of size 300 (logits ~1e5): the flash backward's exp(logit - lse) from the saved
    lse was off by up to 1e28 (float32, inputs of size 1e3 in `mha`); rows are recomputed with their own
    softmax there, as the math path computes them."""
    mask = _dead("float").float() if kind == "dead" else None
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, n, 4, generator=gen) * s for n, s in ((L, 300), (S, 300), (S, 1)))
    grad = torch.randn(2, 2, L, 4, generator=gen)
    run = (lambda *t: attend(*t, mask=mask)) if kind == "dead" else fused(kind)
    results = []
    for path, dtype in (("fused", torch.float32), ("math", torch.float64)):
        ts = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        with attnzoo.fused_attn(path == "fused"), _Ops() as ops:
            out = run(*ts)
            results.append(torch.autograd.grad(out, ts, grad.to(dtype)))
        assert path == "math" or FLASH_BWD not in ops.ops, "the fused backward ran on logits of ~1e5"
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4)  # gradients of size ~1
