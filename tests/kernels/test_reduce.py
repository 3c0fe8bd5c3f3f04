"""`lean_mean`: the mean as a scaled sum, whose backward writes no full-size quotient."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from attnzoo.kernels.reduce import lean_mean

D = torch.float64


class _Outputs(TorchDispatchMode):
    """Records the shape of every op's tensor output."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            self.shapes.append((str(func), tuple(out.shape)))
        return out


@pytest.mark.parametrize(("dims", "keepdim"), [((2, 3), True), ((2, 3), False), (-1, False), ((1,), True)])
def test_equals_mean_with_gradients(dims, keepdim):
    x = torch.randn(2, 3, 5, 4, dtype=D, requires_grad=True)
    got, want = lean_mean(x, dims, keepdim), x.mean(dims, keepdim=keepdim)
    torch.testing.assert_close(got, want, atol=1e-15, rtol=0)
    grad = torch.randn_like(want)
    torch.testing.assert_close(torch.autograd.grad(got, x, grad)[0], torch.autograd.grad(want, x, grad)[0],
                               atol=1e-15, rtol=0)
    assert torch.autograd.gradgradcheck(lambda t: lean_mean(t, dims, keepdim), (x,))


def test_backward_writes_no_full_size_tensor_until_accumulation():
    x = torch.randn(2, 3, 5, 4, requires_grad=True)
    out = lean_mean(x, (2, 3))
    with _Outputs() as ops:
        (grad,) = torch.autograd.grad(out.sum(), x)
    full = [name for name, shape in ops.shapes if shape == tuple(x.shape) and "expand" not in name]
    assert full == [], full  # a mean's backward would divide the broadcast: one full-size quotient
    torch.testing.assert_close(grad, torch.full_like(x, 1 / 20))
    with _Outputs() as ops:
        torch.autograd.grad(x.mean((2, 3)).sum(), x)
    assert any(shape == tuple(x.shape) and "div" in name for name, shape in ops.shapes)  # what it avoids


def test_half_precision_and_empty_axes_take_mean():
    big = torch.full((4, 70000), 60000.0, dtype=torch.float16)
    torch.testing.assert_close(lean_mean(big, -1), big.mean(-1))  # its sum would overflow float16
    empty = torch.randn(2, 0, 3)
    assert torch.isnan(lean_mean(empty, 1)).all()  # NaN, as the mean of nothing
    x = torch.randn(2, 3)
    torch.testing.assert_close(lean_mean(x, ()), x.mean(()))
