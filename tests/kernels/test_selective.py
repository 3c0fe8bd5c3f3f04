"""SK's branch-selection kernel against plain ops, and under torch's tools."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tests.kernels.kernel_checks import (
    Holder,
    assert_autocast_bf16,
    assert_flop_counter,
    assert_gradgradcheck,
    assert_matches,
    assert_torch_func,
)
from torch import Tensor

from attnzoo.kernels.selective import select_branches

C = 3


def _attention(w: Tensor, b: Tensor, branches: int):
    return lambda s: F.linear(s, w, b).view(s.shape[0], branches, C).softmax(1)  # (B, M, C)


def select(*t: Tensor) -> Tensor:
    *branches, w, b = t
    return select_branches(branches, _attention(w, b, len(branches)), (w, b))


def reference(*t: Tensor) -> Tensor:
    *branches, w, b = t
    pooled = sum(u.mean((2, 3)) for u in branches)  # (B, C)
    a = _attention(w, b, len(branches))(pooled)
    return sum(u * a[:, i, :, None, None] for i, u in enumerate(branches))


def tensors(branches: int, dtype: torch.dtype = torch.float64, hw=(3, 4)) -> list[Tensor]:
    gen = torch.Generator().manual_seed(0)
    us = [torch.randn(2, C, *hw, generator=gen, dtype=dtype) for _ in range(branches)]
    w = torch.randn(branches * C, C, generator=gen, dtype=dtype)
    return [*us, w, torch.randn(branches * C, generator=gen, dtype=dtype)]


@pytest.mark.parametrize("branches", [1, 2, 3])
def test_values_and_gradients_match_plain_ops(branches):
    assert_matches(select, reference, tensors(branches))


@pytest.mark.parametrize("branches", [2, 3])
def test_second_derivatives(branches):
    assert_gradgradcheck(select, tensors(branches, hw=(2, 2)))


def test_gradient_penalty_equals_plain_ops():
    results = []
    for run in (select, reference):
        ts = [t.requires_grad_() for t in tensors(2)]
        grads = torch.autograd.grad(run(*ts).square().sum(), ts[:2], create_graph=True)
        sum(g.square().sum() for g in grads).backward()
        results.append([t.grad for t in ts])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_flop_counter_with_backward():
    assert_flop_counter(select, tensors(2, torch.float32))


def test_torch_func_grad_over_functional_call():
    assert_torch_func(Holder(select, tensors(2, torch.float32)))


def test_autocast_bf16_forward_and_backward():
    assert_autocast_bf16(select, tensors(2, torch.float32), reference)
