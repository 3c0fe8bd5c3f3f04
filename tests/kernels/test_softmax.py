"""The short-axis softmax (`attnzoo.kernels.softmax`) against torch's softmax in float64, under
torch's tools, and the cases that take torch's softmax."""

from __future__ import annotations

import pytest
import torch
from tests.kernels.kernel_checks import Holder, assert_flop_counter, assert_gradgradcheck, assert_torch_func

from attnzoo.kernels import softmax
from attnzoo.kernels.softmax import MAX_WIDTH, short_softmax


@pytest.mark.parametrize("shape", [(3, 4, 9), (2, 1), (5, 15), (2, 3, 7), (0, 9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_values_and_gradients_equal_torch_softmax(shape, dtype):
    gen = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 5).to(dtype).requires_grad_()
    grad = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    ref_x = x.detach().double().requires_grad_()
    out, ref = short_softmax(x), ref_x.softmax(-1)
    tol = {"atol": 1e-12, "rtol": 1e-12} if dtype == torch.float64 else {"atol": 2e-6, "rtol": 2e-6}
    torch.testing.assert_close(out.double(), ref, **tol)
    (g,) = torch.autograd.grad(out, x, grad)
    (r,) = torch.autograd.grad(ref, ref_x, grad.double())
    torch.testing.assert_close(g.double(), r, **tol)


def test_large_logits_and_masked_entries():
    x = torch.tensor([[1e4, 1e4 - 1.0, -1e4], [0.0, float("-inf"), 2.0]], dtype=torch.float64)
    torch.testing.assert_close(short_softmax(x), x.softmax(-1), atol=1e-15, rtol=1e-12)


def test_double_backward_flop_counter_and_torch_func():
    x = torch.randn(4, 9, dtype=torch.float64)
    assert_gradgradcheck(short_softmax, [x])
    assert_flop_counter(short_softmax, [x], counted=None)
    assert_torch_func(Holder(short_softmax, [x]))


def test_wide_rows_half_precision_and_autocast_take_torch_softmax(monkeypatch):
    calls = []
    monkeypatch.setattr(softmax._ShortSoftmax, "apply", lambda x: calls.append(x.shape) or x.softmax(-1))
    short_softmax(torch.randn(3, MAX_WIDTH + 1))
    short_softmax(torch.randn(3, 9, dtype=torch.bfloat16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        short_softmax(torch.randn(3, 9))
    assert calls == []
    short_softmax(torch.randn(3, MAX_WIDTH))
    assert calls == [torch.Size([3, MAX_WIDTH])]


def test_output_is_contiguous_like_torchs_so_dropout_draws_alike():
    x = torch.randn(4, 9, 6, dtype=torch.float64).transpose(1, 2)  # (4, 6, 9), strided
    out = short_softmax(x)
    assert out.is_contiguous()
    torch.manual_seed(0)
    ours = torch.nn.functional.dropout(out, 0.5)
    torch.manual_seed(0)
    theirs = torch.nn.functional.dropout(x.softmax(-1), 0.5)
    torch.testing.assert_close(ours, theirs, atol=1e-15, rtol=1e-12)
