"""The weighted branch sum (ViP's reweighting, ``sum_i x_i * w_i``) against plain float64 autograd."""

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

from attnzoo.kernels import mix
from attnzoo.kernels.mix import weighted_sum

D = torch.float64


def _inputs(b=3, h=4, w=5, c=6, count=3, dtype=D):
    torch.manual_seed(0)
    base = torch.randn(b, w, h, c, dtype=dtype)
    parts = [base.transpose(1, 2).requires_grad_()]  # a strided view, as ViP's branches
    parts += [torch.randn(b, h, w, c, dtype=dtype, requires_grad=True) for _ in range(count - 1)]
    weights = [torch.rand(b, 1, 1, c, dtype=dtype, requires_grad=True) for _ in range(count)]
    return parts, weights


def _reference(parts, weights):
    return sum(p * w for p, w in zip(parts, weights, strict=True))


def _split(count):
    return (lambda *t: weighted_sum(t[:count], t[count:])), (lambda *t: _reference(t[:count], t[count:]))


@pytest.mark.parametrize("count", [1, 2, 3])
def test_matches_plain_autograd_with_gradients(count):
    parts, weights = _inputs(count=count)
    out = weighted_sum(parts, weights)
    assert type(out.grad_fn).__name__ == "_AddcmulFnBackward"  # the kernel ran
    assert out.is_contiguous() == (parts[0] * weights[0]).is_contiguous()
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (*parts, *weights), grad)
    want = torch.autograd.grad(_reference(parts, weights), (*parts, *weights), grad)
    torch.testing.assert_close(out, _reference(parts, weights), atol=1e-12, rtol=0)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_reduces_a_few_samples_at_a_time(monkeypatch):
    """Blocks of one sample (a tiny chunk) give the same weight gradients as one block."""
    parts, weights = _inputs(b=5)
    monkeypatch.setattr(mix, "sample_blocks", lambda t: [slice(i, i + 1) for i in range(t.shape[0])])
    grads = torch.autograd.grad(weighted_sum(parts, weights).square().sum(), weights)
    want = torch.autograd.grad(_reference(parts, weights).square().sum(), weights)
    for a, b in zip(grads, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_gradcheck_double_backward_and_torch_tools():
    parts, weights = _inputs(2, 2, 3, 2, count=2)
    kernel, plain = _split(2)
    tensors = (*parts, *weights)
    assert gradcheck(kernel, tensors)
    assert_matches(kernel, plain, tensors)
    assert_gradgradcheck(kernel, tensors)
    assert_flop_counter(kernel, tensors, counted=False)  # pointwise ops and sums only
    assert_torch_func(Holder(kernel, tensors))
    assert_autocast_bf16(kernel, [t.float() for t in tensors], plain)


def test_partial_grads_and_full_size_weights():
    parts, weights = _inputs()
    frozen = [parts[0].detach(), parts[1], parts[2].detach()]
    out = weighted_sum(frozen, [weights[0], weights[1].detach(), weights[2]])
    got = torch.autograd.grad(out.sum(), (parts[1], weights[0], weights[2]))
    ref = _reference(frozen, [weights[0], weights[1].detach(), weights[2]])
    want = torch.autograd.grad(ref.sum(), (parts[1], weights[0], weights[2]))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    full = [torch.rand_like(p, requires_grad=True) for p in parts]  # nothing to reduce
    got = torch.autograd.grad(weighted_sum(parts, full).sum(), full)
    want = torch.autograd.grad(_reference(parts, full).sum(), full)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_other_shapes_dtypes_and_no_grad_take_the_plain_ops():
    parts, weights = _inputs()
    shared = [torch.rand(1, 1, 1, 6, dtype=D, requires_grad=True)] * 3  # no batch axis
    assert type(weighted_sum(parts, shared).grad_fn).__name__ == "AddBackward0"
    mixed = [w.float() for w in weights]  # dtypes differ (autocast)
    assert type(weighted_sum(parts, mixed).grad_fn).__name__ == "AddBackward0"
    with torch.no_grad():
        out = weighted_sum(parts, weights)
    assert out.grad_fn is None
    torch.testing.assert_close(out, _reference(parts, weights).detach())


def test_refuses_unpaired_arguments():
    parts, weights = _inputs()
    with pytest.raises(ValueError, match="one weight per part, got 3 and 2"):
        weighted_sum(parts, weights[:2])


def test_an_empty_batch_gives_empty_gradients():
    parts = [torch.randn(0, 2, 3, dtype=D, requires_grad=True) for _ in range(2)]
    weights = [torch.randn(0, 1, 3, dtype=D, requires_grad=True) for _ in range(2)]
    weighted_sum(parts, weights).sum().backward()
    assert all(t.grad is not None and t.grad.shape == t.shape for t in (*parts, *weights))
