"""The kernels' backward with ``create_graph=True`` recomputes their composite twin and differentiates
it (`attnzoo.kernels.route.recompute_grads`). Where one input is another (``attend(x, x, x)``) or is
computed from it (``sum_gate(x, mean(x), ...)``), each must still get its own partial derivative:
the first-order gradients with ``create_graph=True`` equal those without it, and those of the plain ops.
(gradgradcheck alone cannot see this: it differentiates the same, consistently wrong, gradient.)"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import attnzoo
from attnzoo.functional import attend
from attnzoo.kernels.blocked import blocked_attention
from attnzoo.kernels.mix import weighted_sum
from attnzoo.kernels.neighbourhood import neighbourhood_attention
from attnzoo.kernels.neighbourhood_nd import neighbourhood_attend
from attnzoo.kernels.strips import strip_means, sum_gate

D = torch.float64


def _neighbourhood_nd(x: torch.Tensor) -> torch.Tensor:
    keys = torch.tensor([[0, 1, 2], [0, 1, 2], [1, 2, 3], [2, 3, 4], [2, 3, 4]])  # 1-D window of 3
    return neighbourhood_attend(x, x, x, keys)[0]


CASES: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], tuple[int, ...]]] = {
    "attend(x, x, x)": (lambda x: attend(x, x, x), (2, 2, 40, 8)),
    "blocked(x, x, x)": (lambda x: blocked_attention(x, x, x, scale=0.3, block=16), (2, 40, 8)),
    "neighbourhood(a slice of x, x, x)": (
        lambda x: neighbourhood_attention(x[..., :3, :3], x, x, 3), (2, 4, 5, 5)
    ),
    "neighbourhood_nd(x, x, x)": (_neighbourhood_nd, (2, 2, 5, 4)),
    "sum_gate(x, means of x)": (lambda x: sum_gate(x, *strip_means(x)), (2, 3, 4, 5)),
    "weighted_sum(x and its square, weights from x)": (
        lambda x: weighted_sum([x, x.square()], [x.mean((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)]),
        (2, 3, 4, 5),
    ),
}


def _grad(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, create_graph: bool) -> torch.Tensor:
    x = x.detach().requires_grad_()
    out = fn(x)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=D)
    (grad,) = torch.autograd.grad(out, x, weight, create_graph=create_graph)
    return grad


@pytest.mark.parametrize("name", list(CASES))
def test_create_graph_gives_each_aliased_input_its_partial_derivative(name):
    fn, shape = CASES[name]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=D)
    first_order = _grad(fn, x, create_graph=False)
    recomputed = _grad(fn, x, create_graph=True)
    with attnzoo.fused_attn(False):  # the composite ops throughout
        plain = _grad(fn, x, create_graph=False)
    torch.testing.assert_close(first_order, plain, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(recomputed, plain, atol=1e-10, rtol=1e-10)
    assert recomputed.requires_grad  # and it is differentiable further
