"""The biased window-attention kernel (Swin, temporal) against attend's float64 math path, and under
torch's tools; fully masked rows give zeros and finite gradients."""

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

import attnzoo
from attnzoo.functional import attend
from attnzoo.kernels.biased import biased_attention

SCALE = 0.4


def biased(qkv, bias):
    return biased_attention(qkv, bias, scale=SCALE)


def reference(qkv, bias):
    b, n, _, h, d = qkv.shape
    if bias.ndim == 4:  # (G, h, N, N): batch element i uses group i % G
        bias = bias.expand(b // bias.shape[0], *bias.shape).reshape(b, h, n, n)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, h, N, d)
    with attnzoo.fused_attn(False):
        out = attend(q, k, v, bias=bias, scale=SCALE)
    return out.transpose(1, 2).reshape(b, n, h * d)  # (B, N, h*d)


def tensors(groups: int | None, dtype=torch.float64, b=4, n=5, h=2, d=3):
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(b, n, 3, h, d, generator=gen, dtype=dtype)
    shape = (h, n, n) if groups is None else (groups, h, n, n)
    return [qkv, torch.randn(*shape, generator=gen, dtype=dtype)]


@pytest.mark.parametrize("groups", [None, 1, 2, 4])
def test_values_and_gradients_match_attend_math(groups):
    assert_matches(biased, reference, tensors(groups))


@pytest.mark.parametrize("groups", [None, 2])
def test_second_derivatives(groups):
    assert_gradgradcheck(biased, tensors(groups, b=2, n=3, h=1, d=2))


def test_gradient_penalty_equals_attend_math():
    results = []
    for run in (biased, reference):
        qkv, bias = (t.requires_grad_() for t in tensors(2))
        (g,) = torch.autograd.grad(run(qkv, bias).square().sum(), qkv, create_graph=True)
        g.square().sum().backward()
        results.append([qkv.grad, bias.grad])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_double_backward_keeps_the_dropout_mask():
    # The recompute reuses the forward's dropout mask, so first-order gradients from the create_graph
    # path equal the fast path's.
    qkv, bias = (t.requires_grad_() for t in tensors(2))
    torch.manual_seed(3)
    out = biased_attention(qkv, bias, scale=SCALE, dropout_p=0.5)
    fast = torch.autograd.grad(out.square().sum(), (qkv, bias), retain_graph=True)
    slow = torch.autograd.grad(out.square().sum(), (qkv, bias), create_graph=True)
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b.detach(), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("groups", [None, 2])
def test_backward_in_blocks_of_windows_matches_attend_math(groups, monkeypatch):
    """Backward a block of windows at a time (one bias group per block here), dropout included."""
    import attnzoo.kernels.biased as biased_module

    monkeypatch.setattr(biased_module, "_BLOCK_BYTES", 1)  # every block one group of windows
    assert biased_module._block(4, 5, groups or 1, 8) == (groups or 1)
    assert_matches(biased, reference, tensors(groups))
    qkv, bias = (t.requires_grad_() for t in tensors(groups))
    torch.manual_seed(3)
    out = biased_attention(qkv, bias, scale=SCALE, dropout_p=0.5)
    assert "BiasedAttention" in type(out.grad_fn).__name__
    fast = torch.autograd.grad(out.square().sum(), (qkv, bias), retain_graph=True)
    slow = torch.autograd.grad(out.square().sum(), (qkv, bias), create_graph=True)  # plain ops
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b.detach(), atol=1e-12, rtol=1e-12)


def test_flop_counter_with_backward():
    assert_flop_counter(biased, tensors(2, torch.float32))


def test_torch_func_grad_over_functional_call():
    assert_torch_func(Holder(biased, tensors(2, torch.float32)))


def test_autocast_bf16_forward_and_backward():
    # float32 packed qkv: the kernel computes in float32 inside autocast.
    assert_autocast_bf16(biased, tensors(2, torch.float32), tol=1e-5)


def _masked_bias(groups: int | None):
    qkv, bias = tensors(groups)
    bias[..., 1, :] = float("-inf")  # query 1 of every group masked entirely
    bias[..., 3, ::2] = float("-inf")  # query 3 partly
    return qkv, bias


@pytest.mark.parametrize("fused", [True, False], ids=["kernel", "attend"])
@pytest.mark.parametrize("groups", [None, 2])
def test_fully_masked_rows_give_zeros_and_finite_gradients(groups, fused):
    qkv, bias = (t.requires_grad_() for t in _masked_bias(groups))
    with attnzoo.fused_attn(fused):
        out = biased(qkv, bias)
        out.square().sum().backward()
    assert torch.equal(out[:, 1], torch.zeros_like(out[:, 1]))
    assert torch.isfinite(out).all() and torch.isfinite(qkv.grad).all() and torch.isfinite(bias.grad).all()
    assert torch.equal(bias.grad[..., 1, :], torch.zeros_like(bias.grad[..., 1, :]))


def test_fully_masked_rows_match_attend_math():
    qkv, bias = _masked_bias(2)
    assert_matches(biased, reference, [qkv, bias])
    assert_gradgradcheck(lambda t: biased(t, bias), [qkv])  # the -inf bias itself stays constant


def test_window_attention_with_a_fully_masking_float_mask():
    # The registry's example window attention with an additive mask of -inf over whole rows.
    spec = attnzoo.get_spec("window")
    module = spec.cls(**spec.example.kwargs).eval()
    shape = spec.example.inputs[0]  # (windows, N, C)
    x = torch.randn(*shape, requires_grad=True)
    mask = torch.zeros(2, shape[1], shape[1])
    mask[0, 1] = float("-inf")
    mask[1, 0, 2] = float("-inf")
    outs = []
    for fused in (True, False):
        with attnzoo.fused_attn(fused):
            out = module(x, mask)
            (g,) = torch.autograd.grad(out.square().sum(), x)
        assert torch.isfinite(out).all() and torch.isfinite(g).all()
        outs.append((out, g))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
