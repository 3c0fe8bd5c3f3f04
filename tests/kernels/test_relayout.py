"""A linear layer on a re-laid-out copy of its input (ViP's width branch) against plain float64 autograd."""

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
from torch import nn
from torch.autograd import gradcheck

from attnzoo.kernels.relayout import relaid_linear

D = torch.float64
B, H, W, G, S = 2, 3, 4, 2, 3  # a (B, H, W, G * S) map, segments of S channels


def by_width(t):  # (B, H, W, C) -> (B, H, G, W S)
    return t.reshape(B, H, W, G, S).transpose(2, 3).reshape(B, H, G, W * S)


def from_width(t):  # (B, H, G, W S) -> (B, H, W, C)
    return t.view(B, H, G, W, S).transpose(2, 3).reshape(B, H, W, G * S)


def _linear(bias=True, dtype=D):
    torch.manual_seed(0)
    return nn.Linear(W * S, W * S, bias=bias, dtype=dtype)


def _x(dtype=D):
    return torch.randn(B, W, H, G * S, dtype=dtype).transpose(1, 2).requires_grad_()  # strided input


@pytest.mark.parametrize("bias", [True, False])
def test_matches_the_layer_on_the_copy_with_gradients(bias):
    linear, x = _linear(bias), _x()
    out = relaid_linear(x, by_width, from_width, linear)
    assert type(out.grad_fn).__name__ == "_RelaidLinearFnBackward"  # the kernel ran
    ref = linear(by_width(x))
    grad = torch.randn_like(out)
    params = tuple(linear.parameters())
    got = torch.autograd.grad(out, (x, *params), grad)
    want = torch.autograd.grad(ref, (x, *params), grad)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_gradcheck_double_backward_and_torch_tools():
    linear = _linear()

    def kernel(t, w, b):
        return relaid_linear(t, by_width, from_width, _Fixed(w, b))

    def plain(t, w, b):
        return nn.functional.linear(by_width(t), w, b)

    tensors = (_x(), linear.weight.detach(), linear.bias.detach())
    assert gradcheck(kernel, [t.detach().requires_grad_() for t in tensors])
    assert_matches(kernel, plain, tensors)
    assert_gradgradcheck(kernel, tensors)
    assert_flop_counter(kernel, tensors)  # the products are counted, forward and backward
    assert_torch_func(Holder(kernel, tensors))
    assert_autocast_bf16(kernel, [t.float() for t in tensors], plain)


class _Fixed(nn.Linear):
    """An ``nn.Linear`` built around given tensors (the checks pass them as arguments)."""

    def __init__(self, weight, bias):
        nn.Module.__init__(self)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight, self.bias = weight, bias


def test_partial_gradients():
    linear, x = _linear(), _x()
    linear.weight.requires_grad_(False)
    out = relaid_linear(x, by_width, from_width, linear)
    gx, gb = torch.autograd.grad(out.square().sum(), (x, linear.bias))
    rx, rb = torch.autograd.grad(linear(by_width(x)).square().sum(), (x, linear.bias))
    torch.testing.assert_close(gx, rx, atol=1e-12, rtol=0)
    torch.testing.assert_close(gb, rb, atol=1e-12, rtol=0)


def test_hooks_subclasses_and_no_grad_call_the_layer():
    linear, x = _linear(), _x()
    seen = []
    handle = linear.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    out = relaid_linear(x, by_width, from_width, linear)
    handle.remove()
    assert seen == [out.shape] and type(out.grad_fn).__name__ != "_RelaidLinearFnBackward"
    handle = linear.register_full_backward_hook(lambda m, gi, go: seen.append("backward"))
    relaid_linear(x, by_width, from_width, linear).sum().backward()
    handle.remove()
    assert seen[-1] == "backward"

    class Scaled(nn.Linear):  # a wrapper (LoRA, quantised) must see the call
        def forward(self, t):
            return 2 * super().forward(t)

    scaled = Scaled(W * S, W * S, dtype=D)
    torch.testing.assert_close(relaid_linear(x, by_width, from_width, scaled), scaled(by_width(x)))
    with torch.no_grad():
        out = relaid_linear(x, by_width, from_width, linear)
    assert out.grad_fn is None
    torch.testing.assert_close(out, linear(by_width(x)).detach())


def test_no_rows_gives_empty_and_zero_gradients():
    linear = nn.Linear(3, 5, dtype=D)
    x = torch.randn(0, 3, 4, dtype=D, requires_grad=True)
    out = relaid_linear(x, lambda t: t.transpose(1, 2), lambda t: t.transpose(1, 2), linear)
    assert out.shape == (0, 4, 5)
    out.sum().backward()
    assert x.grad.shape == x.shape
    torch.testing.assert_close(linear.weight.grad, torch.zeros_like(linear.weight))
