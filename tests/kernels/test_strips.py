"""The strip-gate kernel (coordinate attention's ``x * g_h * g_w``) against plain float64 autograd."""

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
from torch.autograd import gradcheck

from attnzoo.kernels.strips import strip_gate, strip_means, sum_gate

D = torch.float64


def _inputs(b=2, c=3, h=5, w=4, dtype=D):
    torch.manual_seed(0)
    x = torch.randn(b, c, h, w, dtype=dtype, requires_grad=True)
    g_h = torch.rand(b, c, h, 1, dtype=dtype, requires_grad=True)
    g_w = torch.rand(b, c, w, 1, dtype=dtype).transpose(2, 3).requires_grad_()  # (B, C, 1, W), strided
    return x, g_h, g_w


def _reference(x, gates, has_skip):
    out = x
    for g in gates:
        out = out * g
    return out + x if has_skip else out


@pytest.mark.parametrize("has_skip", [False, True])
@pytest.mark.parametrize("order", ["hw", "wh"])
def test_matches_plain_autograd_with_gradients(has_skip, order):
    x, g_h, g_w = _inputs()
    gates = (g_h, g_w) if order == "hw" else (g_w, g_h)
    out = strip_gate(x, gates, has_skip)
    assert type(out.grad_fn).__name__ == "_StripGateFnBackward"  # the kernel ran
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, g_h, g_w), grad)
    ref_out = _reference(x, gates, has_skip)
    want = torch.autograd.grad(ref_out, (x, g_h, g_w), grad)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=0)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_gradcheck_double_backward_and_torch_tools():
    x, g_h, g_w = _inputs(1, 2, 3, 4)

    def kernel(*t):
        return strip_gate(t[0], t[1:], True)

    def plain(*t):
        return _reference(t[0], t[1:], True)

    assert gradcheck(kernel, (x, g_h, g_w))
    assert_matches(kernel, plain, (x, g_h, g_w))
    assert_gradgradcheck(kernel, (x, g_h, g_w))
    assert_flop_counter(kernel, (x, g_h, g_w))  # the backward's matrix-vector products are counted
    assert_torch_func(Holder(kernel, (x, g_h, g_w)))
    assert_autocast_bf16(kernel, [t.float() for t in (x, g_h, g_w)], plain)


def test_only_some_inputs_need_grad():
    x, g_h, g_w = _inputs()
    frozen = g_w.detach()
    out = strip_gate(x, (g_h, frozen))
    gx, gh = torch.autograd.grad(out.sum(), (x, g_h))
    rx, rh = torch.autograd.grad(_reference(x, (g_h, frozen), False).sum(), (x, g_h))
    torch.testing.assert_close(gx, rx, atol=1e-12, rtol=0)
    torch.testing.assert_close(gh, rh, atol=1e-12, rtol=0)


def test_other_shapes_and_no_grad_take_the_plain_ops():
    x, g_h, _ = _inputs()
    full = torch.rand_like(x, requires_grad=True)
    out = strip_gate(x, (full,), True)
    assert type(out.grad_fn).__name__ == "AddBackward0"
    torch.testing.assert_close(out, x * full + x)
    row = g_h.transpose(2, 3)[..., :4]  # (B, C, 1, W)
    with torch.no_grad():
        out = strip_gate(x, (g_h, row))
    assert out.grad_fn is None
    torch.testing.assert_close(out, x.detach() * g_h.detach() * row.detach())


def _logits(b=2, c=3, h=5, w=4, dtype=D):
    torch.manual_seed(1)
    a_h = torch.randn(b, c, h, 1, dtype=dtype, requires_grad=True)
    a_w = torch.randn(b, c, w, 1, dtype=dtype).transpose(2, 3).requires_grad_()  # (B, C, 1, W), strided
    return a_h, a_w


def _reference_sum(x, a_h, a_w, has_skip):
    out = x * torch.sigmoid(a_h + a_w)
    return out + x if has_skip else out


@pytest.mark.parametrize("has_skip", [False, True])
def test_sum_gate_matches_plain_autograd_with_gradients(has_skip):
    x, _, _ = _inputs()
    a_h, a_w = _logits()
    out = sum_gate(x, a_h, a_w, has_skip)
    assert type(out.grad_fn).__name__ == "_SumGateFnBackward"  # the kernel ran
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, a_h, a_w), grad)
    ref_out = _reference_sum(x, a_h, a_w, has_skip)
    want = torch.autograd.grad(ref_out, (x, a_h, a_w), grad)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=0)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_sum_gate_double_backward_and_torch_tools():
    x, _, _ = _inputs(1, 2, 3, 4)
    a_h, a_w = _logits(1, 2, 3, 4)

    def kernel(t, p, q):
        return sum_gate(t, p, q, True)

    def plain(t, p, q):
        return _reference_sum(t, p, q, True)

    assert gradcheck(kernel, (x, a_h, a_w))
    assert_matches(kernel, plain, (x, a_h, a_w))
    assert_gradgradcheck(kernel, (x, a_h, a_w))
    assert_flop_counter(kernel, (x, a_h, a_w), counted=False)  # pointwise ops and sums only
    assert_torch_func(Holder(kernel, (x, a_h, a_w)))
    assert_autocast_bf16(kernel, [t.float() for t in (x, a_h, a_w)], plain)


def test_sum_gate_partial_grads_and_other_shapes():
    x, _, _ = _inputs()
    a_h, a_w = _logits()
    out = sum_gate(x.detach(), a_h, a_w.detach())  # only a_h wants a gradient
    (gh,) = torch.autograd.grad(out.sum(), (a_h,))
    (rh,) = torch.autograd.grad(_reference_sum(x.detach(), a_h, a_w.detach(), False).sum(), (a_h,))
    torch.testing.assert_close(gh, rh, atol=1e-12, rtol=0)
    full = torch.randn_like(x, requires_grad=True)  # not a strip: the plain ops
    out = sum_gate(x, a_h, full)
    assert type(out.grad_fn).__name__ == "MulBackward0"
    torch.testing.assert_close(out, _reference_sum(x, a_h, full, False))


def test_strip_means_match_mean_with_one_gradient_write():
    x, _, _ = _inputs()
    m_h, m_w = strip_means(x)
    assert type(m_h.grad_fn).__name__ == "_StripMeansFnBackward"
    torch.testing.assert_close(m_h, x.mean(3, keepdim=True), atol=1e-12, rtol=0)
    torch.testing.assert_close(m_w, x.mean(2, keepdim=True), atol=1e-12, rtol=0)
    g_h, g_w = torch.randn_like(m_h), torch.randn_like(m_w)
    (got,) = torch.autograd.grad((m_h, m_w), (x,), (g_h, g_w))
    (want,) = torch.autograd.grad((x.mean(3, keepdim=True), x.mean(2, keepdim=True)), (x,), (g_h, g_w))
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    (only_w,) = torch.autograd.grad(m_w, (x,), g_w)  # the other mean unused
    torch.testing.assert_close(only_w, torch.autograd.grad(x.mean(2, keepdim=True), (x,), g_w)[0])
    assert gradcheck(lambda t: strip_means(t), (x,))
    assert_gradgradcheck(lambda t: sum(m.square().sum() for m in strip_means(t)), (x,))
