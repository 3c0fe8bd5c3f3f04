"""The chunked N-D neighbourhood kernel (NAT / DiNAT) against a dense float64 softmax over the whole
map (keys outside each query's window masked), its composite twin, and under torch's tools."""

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
from torch.utils.flop_counter import FlopCounterMode

import attnzoo
import attnzoo.kernels.neighbourhood_nd as nd
from attnzoo.kernels.neighbourhood_nd import neighbourhood_attend, neighbourhood_index

# (spatial sizes, kernel, dilation, causal)
CASES = [
    ((9,), (3,), (2,), (False,)),
    ((5, 6), (3, 3), (1, 1), (False,)),
    ((6, 5), (3, 2), (1, 2), (True, False)),
]


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Blocks of 3 queries (the 2-D maps above end on a ragged block), so the chunking is exercised."""
    monkeypatch.setattr(nd, "_CHUNK_BYTES", 3 * 2 * 2 * 9 * 4 * 8)


def index(case):
    sizes, kernel, dilation, causal = case
    causal = causal * len(sizes) if len(causal) != len(sizes) else causal
    return neighbourhood_index(sizes, kernel, dilation, causal)


def tensors(case, bias_shape="hNK", dtype=torch.float64, b=2, h=2, d=3, dv=4):
    keys, _, _ = index(case)
    n, kk = keys.shape
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(b, h, n, d, generator=gen, dtype=dtype) for _ in range(2))
    v = torch.randn(b, h, n, dv, generator=gen, dtype=dtype)
    shapes = {"hNK": (h, n, kk), "BhNK": (b, h, n, kk), "1h1K": (1, h, 1, kk), "NK": (n, kk)}
    bias = [] if bias_shape is None else [torch.randn(shapes[bias_shape], generator=gen, dtype=dtype)]
    return [q, k, v, *bias]


def kernel_fn(case, dropout_p=0.0):
    """The kernel's output and weights as one tensor, so checks cover the weights' gradients too."""
    keys, _, valid = index(case)

    def run(q, k, v, bias=None):
        out, weights = neighbourhood_attend(q, k, v, keys, bias=bias, valid=valid, dropout_p=dropout_p)
        return torch.cat([out.flatten(), weights.flatten()])

    return run


def dense_reference(case):
    """softmax over all N keys with -inf outside the window (the window's bias scattered in)."""
    keys, _, valid = index(case)
    n, kk = keys.shape
    keep = torch.ones(n, kk, dtype=torch.bool) if valid is None else valid

    def run(q, k, v, bias=None):
        b, h = q.shape[:2]
        window = torch.zeros(b, h, n, kk, dtype=q.dtype) if bias is None else bias.expand(b, h, n, kk)
        dense = torch.full((b, h, n, n), float("-inf"), dtype=q.dtype)
        rows = torch.arange(n)[:, None].expand(n, kk)
        dense[:, :, rows[keep], keys[keep]] = window[..., keep]  # (B, h, N, N)
        p = (q @ k.transpose(-2, -1) + dense).softmax(-1)  # (B, h, N, N)
        weights = p.gather(-1, keys.expand(b, h, n, kk)) * keep  # (B, h, N, K), 0 off the window
        return torch.cat([(p @ v).flatten(), weights.flatten()])

    return run


@pytest.mark.parametrize("bias_shape", ["hNK", "BhNK", "1h1K", "NK", None])
@pytest.mark.parametrize("case", CASES, ids=["1d-dil", "2d", "2d-causal-dil"])
def test_values_weights_and_gradients_match_dense_float64(case, bias_shape):
    assert_matches(kernel_fn(case), dense_reference(case), tensors(case, bias_shape))


def test_the_kernel_runs_in_eager_and_the_twin_with_fused_attn_off():
    case = CASES[1]
    keys, _, _ = index(case)
    q, k, v, bias = (t.requires_grad_() for t in tensors(case))
    out, _ = neighbourhood_attend(q, k, v, keys, bias=bias)
    assert "ChunkedNeighbourhood" in type(out.grad_fn).__name__
    with attnzoo.fused_attn(False):
        plain, _ = neighbourhood_attend(q, k, v, keys, bias=bias)
    assert "ChunkedNeighbourhood" not in type(plain.grad_fn).__name__
    torch.testing.assert_close(out, plain, atol=1e-12, rtol=1e-12)


def test_outputs_are_tensors_of_their_own_that_take_in_place_edits():
    # (views returned by an autograd Function refuse in-place edits; the kernel's outputs are not views)
    case = CASES[1]
    keys, _, _ = index(case)
    q, k, v, bias = (t.requires_grad_() for t in tensors(case))
    out, weights = neighbourhood_attend(q, k, v, keys, bias=bias)
    with attnzoo.fused_attn(False):
        plain_out, plain_weights = neighbourhood_attend(q, k, v, keys, bias=bias)
    assert out._base is None and weights._base is None
    torch.testing.assert_close(out, plain_out, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(weights, plain_weights, atol=1e-12, rtol=1e-12)
    out.mul_(2)  # autograd-tracked in-place edits (the weights are saved for backward, as softmax's are)
    out.sum().backward()
    torch.testing.assert_close(q.grad, torch.autograd.grad(plain_out.sum() * 2, q)[0], atol=1e-12, rtol=1e-12)
    weights.clamp_(min=1e-3)


def test_saved_tensors_hold_no_gathered_neighbourhood():
    """Only q, k, v, the index tables, the bias and the (B, h, N, K) weights are kept: nothing K x d."""
    case = ((12, 12), (5, 5), (1, 1), (False,))
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    q, k, v, bias = (t.requires_grad_() for t in tensors(case, dtype=torch.float32, d=16, dv=16))
    keys, _, _ = index(case)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _ = neighbourhood_attend(q, k, v, keys, bias=bias)
    gathered = out.numel() * keys.shape[1]  # one (B, h, N, K, d) gather
    assert max(saved) < gathered / 10 and sum(saved) < gathered / 2


def test_dropout_draws_the_mask_of_f_dropout():
    case, p = CASES[2], 0.3
    results = []
    for fused in (True, False):
        xs = [t.requires_grad_() for t in tensors(case)]
        torch.manual_seed(5)
        with attnzoo.fused_attn(fused):
            out = kernel_fn(case, dropout_p=p)(*xs)
            grads = torch.autograd.grad(out.square().sum(), xs, create_graph=True)
            penalty = torch.autograd.grad(sum(g.square().sum() for g in grads), xs)
        results.append((out, grads, penalty))
    (out, grads, penalty), (out_r, grads_r, penalty_r) = results
    torch.testing.assert_close(out, out_r, atol=1e-12, rtol=1e-10)
    for a, b in zip(grads + penalty, grads_r + penalty_r, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("case", [CASES[0], CASES[2]], ids=["1d-dil", "2d-causal-dil"])
def test_second_derivatives(case):
    assert_gradgradcheck(kernel_fn(case), tensors(case, b=1, h=1, d=2, dv=2))


def test_flop_counter_with_backward():
    # The kernel's small batched products are counted; the gradients are those outside the mode.
    assert_flop_counter(kernel_fn(CASES[1]), tensors(CASES[1], dtype=torch.float32), counted=True)


@pytest.mark.parametrize("fused", [False, True], ids=["composite", "kernel"])
def test_every_product_is_counted(fused: bool):
    # `attnzoo.flops.count_flops` (the GFLOP of `attnzoo bench`) counts with attnzoo.fused_attn(False), which
    # takes the composite twin: its q.k and weights.v products (2 forward, 4 backward) counted nothing.
    # The kernel's backward wrote its key and value gradients as elementwise outer products (2 of 4).
    case = CASES[1]
    keys, _, valid = index(case)
    q, k, v = (t.float().requires_grad_() for t in tensors(case, bias_shape=None, d=4, dv=4))
    with attnzoo.fused_attn(fused), FlopCounterMode(display=False) as counter:
        out, _ = neighbourhood_attend(q, k, v, keys, valid=valid)
        out.sum().backward()
    (b, h, n, d), kk = q.shape, keys.shape[1]
    assert counter.get_total_flops() == 6 * 2 * b * h * n * kk * d


def test_torch_func_grad_over_functional_call():
    case = CASES[2]
    assert_torch_func(Holder(kernel_fn(case), tensors(case, dtype=torch.float32)))


def test_autocast_bf16_forward_and_backward():
    case = CASES[1]
    assert_autocast_bf16(kernel_fn(case), tensors(case, dtype=torch.float32))
