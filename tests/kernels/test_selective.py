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

from attnzoo.kernels.choose import prefer
from attnzoo.kernels.selective import select_branches, select_splits, select_with_weights

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


def select_stacked(u: Tensor, w: Tensor, b: Tensor, branches: int = 2) -> Tensor:
    return select_splits(u, branches, _attention(w, b, branches), (w, b))


def reference_stacked(u: Tensor, w: Tensor, b: Tensor, branches: int = 2) -> Tensor:
    return reference(*u.unflatten(1, (branches, -1)).unbind(1), w, b)


def stacked(branches: int, dtype: torch.dtype = torch.float64, hw=(3, 4)) -> list[Tensor]:
    *us, w, b = tensors(branches, dtype, hw)
    return [torch.cat(us, dim=1), w, b]  # (B, M*C, H, W)


@pytest.mark.parametrize("kernel", ["fused", "plain"])
@pytest.mark.parametrize("branches", [1, 2, 3])
def test_splits_of_one_map_match_plain_ops(kernel, branches):
    ts = stacked(branches)
    u = ts[0].requires_grad_()
    with prefer("select", kernel):
        out = select_stacked(*ts, branches=branches)
        assert (type(out.grad_fn).__name__ == "_SelectSplitsFnBackward") == (kernel == "fused")
        assert_matches(lambda *t: select_stacked(*t, branches=branches),
                       lambda *t: reference_stacked(*t, branches=branches), ts)
    (grad,) = torch.autograd.grad(out.sum(), (u,))
    assert grad.shape == u.shape and grad.is_contiguous()


def test_splits_second_derivatives_and_torch_tools():
    with prefer("select", "fused"):
        assert_gradgradcheck(select_stacked, stacked(2, hw=(2, 2)))
        assert_flop_counter(select_stacked, stacked(2, torch.float32))
        assert_torch_func(Holder(select_stacked, stacked(2, torch.float32)))
        assert_autocast_bf16(select_stacked, stacked(2, torch.float32), reference_stacked)


def test_splits_with_relu_in_place_match_relu_then_plain_ops():
    ts = [t.requires_grad_() for t in stacked(2)]
    weight = torch.randn(ts[0].shape, generator=torch.Generator().manual_seed(3), dtype=ts[0].dtype)
    for kernel in ("fused", "plain"):
        with prefer("select", kernel):
            out = select_splits(ts[0], 2, _attention(ts[1], ts[2], 2), ts[1:], relu=True)
        assert (type(out.grad_fn).__name__ == "_SelectSplitsFnBackward") == (kernel == "fused")
        got = torch.autograd.grad((out * weight[:, :C]).sum(), ts)
        ref = reference_stacked(torch.relu(ts[0]), ts[1], ts[2])
        want = torch.autograd.grad((ref * weight[:, :C]).sum(), ts)
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0)

    with torch.no_grad():  # inference: the same chunked forward
        out = select_splits(ts[0], 2, _attention(ts[1], ts[2], 2), ts[1:], relu=True)
    torch.testing.assert_close(out, reference_stacked(torch.relu(ts[0]), ts[1], ts[2]), atol=1e-12, rtol=0)

    def relu_kernel(u, w, b):
        with prefer("select", "fused"):
            return select_splits(u, 2, _attention(w, b, 2), (w, b), relu=True)

    # second derivatives by finite differences (no input near the ReLU's kink)
    ts = stacked(2, hw=(2, 2))
    ts[0] = ts[0] + 0.5 * ts[0].sign()
    assert_gradgradcheck(relu_kernel, ts)


def test_dropout_in_the_weights_is_replayed_by_double_backward():
    """A recompute (create_graph=True) draws the forward's dropout mask, so a gradient penalty
    equals the plain ops' under the same seed (no stale-closure error)."""

    def attention(w: Tensor, b: Tensor):
        return lambda s: F.dropout(F.linear(s, w, b), 0.5, training=True).view(s.shape[0], 2, C).softmax(1)

    def run(kernel: str) -> list[Tensor]:
        ts = [t.requires_grad_() for t in tensors(2)]
        torch.manual_seed(5)
        with prefer("select", kernel):
            out = select_branches(ts[:2], attention(*ts[2:]), ts[2:])
        grads = torch.autograd.grad(out.square().sum(), ts, create_graph=True)
        sum(g.square().sum() for g in grads).backward()
        return [out.detach(), *(t.grad for t in ts)]

    for got, want in zip(run("fused"), run("plain"), strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_select_with_weights_returns_the_reference_and_its_weights():
    *branches, w, b = (t.requires_grad_() for t in tensors(3))
    out, weights = select_with_weights(branches, _attention(w, b, 3))
    pooled = sum(u.mean((2, 3)) for u in branches)
    torch.testing.assert_close(weights, _attention(w, b, 3)(pooled), atol=1e-12, rtol=0)
    torch.testing.assert_close(out, reference(*branches, w, b), atol=1e-12, rtol=0)
    assert weights.grad_fn is not None and out.grad_fn is not None  # differentiable, both
