"""The blocked global-attention kernel (SAGAN) against attend's float64 math path, and under torch's tools."""

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
from attnzoo.kernels.blocked import blocked_attention, global_attention


def blocked(q, k, v):
    return blocked_attention(q, k, v, scale=0.7, block=4)


def reference(q, k, v):
    with attnzoo.fused_attn(False):
        return attend(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), scale=0.7).squeeze(1)  # one head


def tensors(dtype=torch.float64, length_q=9, length_k=7, d=3, e=5):
    gen = torch.Generator().manual_seed(0)
    sizes = ((length_q, d), (length_k, d), (length_k, e))
    return [torch.randn(2, n, w, generator=gen, dtype=dtype) for n, w in sizes]


@pytest.mark.parametrize("sizes", [(9, 7, 3, 5), (4, 4, 6, 2), (1, 5, 2, 16)])
def test_values_and_gradients_match_attend_math(sizes):
    assert_matches(blocked, reference, tensors(torch.float64, *sizes))


def test_second_derivatives():
    assert_gradgradcheck(blocked, tensors(length_q=5, length_k=6, d=2, e=3))


def test_gradient_penalty_equals_attend_math():
    results = []
    for run in (blocked, reference):
        ts = [t.requires_grad_() for t in tensors()]
        grads = torch.autograd.grad(run(*ts).square().sum(), ts, create_graph=True)
        sum(g.square().sum() for g in grads).backward()
        results.append([t.grad for t in ts])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_flop_counter_with_backward():
    assert_flop_counter(blocked, tensors(torch.float32))


def test_flop_counter_sees_the_kernel_itself():
    # No nested autograd in its backward: the kernel runs under the mode and its GEMMs are counted.
    from torch.utils.flop_counter import FlopCounterMode

    q, k, v = (t.requires_grad_() for t in tensors(torch.float32))
    with FlopCounterMode(display=False) as counter:
        out = blocked(q, k, v)
        out.sum().backward()
    assert "_BlockedAttentionBackward" in type(out.grad_fn.next_functions[0][0]).__name__  # under a reshape
    assert counter.get_total_flops() > 0


def _global(q, k, v):
    return global_attention(q, k, v, scale=0.7)


@pytest.mark.parametrize("run", [blocked, _global], ids=["blocked", "global"])
def test_torch_func_grad_over_functional_call(run):
    assert_torch_func(Holder(run, tensors(torch.float32)))


def test_autocast_bf16_forward_and_backward():
    # The kernel computes in the dtype its inputs arrive in (float32 here), autocast or not.
    assert_autocast_bf16(blocked, tensors(torch.float32), tol=1e-5)


def test_large_inputs_take_the_static_kernel_without_measuring(monkeypatch):
    """Above `_CALIBRATE_MAX_PAIRS` query-key pairs the first call does not run both kernels to
    measure them (that would cost minutes at N = 64k): the static rule decides, the blocked kernel for
    queries narrower than the values (SAGAN), padded SDPA for wider ones."""
    import attnzoo.kernels.blocked as blocked
    from attnzoo.kernels import choose

    monkeypatch.setenv("ATTNZOO_KERNEL_CALIBRATE", "1")
    monkeypatch.setattr(blocked, "_CALIBRATE_MAX_PAIRS", 100)
    measured = []
    monkeypatch.setattr(choose, "choose", lambda *a, **k: measured.append(k["static"]) or "sdpa")
    q, k, v = torch.randn(1, 20, 3), torch.randn(1, 20, 3), torch.randn(1, 20, 7)
    assert blocked._choice(q, k, v, 1.0) == "blocked" and not measured
    assert blocked._choice(v, v, q, 1.0) == "sdpa" and not measured  # (d, e) = (7, 3)
    monkeypatch.setattr(blocked, "_CALIBRATE_MAX_PAIRS", 1000)
    assert blocked._choice(q, k, v, 1.0) == "sdpa" and measured == ["blocked"]  # measured below it
    assert blocked._choice(v, v, q, 1.0) == "sdpa" and measured == ["blocked", "sdpa"]
    with blocked.global_kernel("blocked"):  # an explicit choice still wins at any size
        monkeypatch.setattr(blocked, "_CALIBRATE_MAX_PAIRS", 100)
        assert blocked._choice(q, k, v, 1.0) == "blocked"


def test_large_logits_give_the_plain_gradients():
    """Queries and keys of size 100 (logits ~1e4): exp(logit - lse) with the saved lse lost accuracy (5%
    of the value gradient at size 1e3); those rows are recomputed with their own softmax."""
    q, k, v = (t * s for t, s in zip(tensors(torch.float32), (100, 100, 1), strict=True))
    grad = torch.randn(2, 9, 5, generator=torch.Generator().manual_seed(1))
    results = []
    for run, dtype in ((blocked, torch.float32), (reference, torch.float64)):
        ts = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        results.append(torch.autograd.grad(run(*ts), ts, grad.to(dtype)))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)  # gradients of size ~1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shifted_logits_match_attend_math(dtype):
    """Logits of a few hundred: the kernel shifts by the row maxima (and clamps at the exponent floor)
    in forward and backward, still with the saved log-sum-exp, all in base 2."""
    q, k, v = (t * s for t, s in zip(tensors(torch.float64, 33, 40, 4, 6), (9.0, 9.0, 1.0), strict=True))
    grad = torch.randn(2, 33, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    run = lambda a, b, c: blocked_attention(a, b, c, scale=0.7, block=8)  # noqa: E731
    ts = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    out = run(*ts)
    grads = torch.autograd.grad(out, ts, grad.to(dtype))
    ref_ts = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = reference(*ref_ts)
    ref_grads = torch.autograd.grad(ref, ref_ts, grad)
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g.double(), r, atol=tol * 10, rtol=tol)


def test_a_nan_sample_leaves_the_others_unchanged():
    """A NaN in one sample made the batch-wide logit bound NaN, which skipped the row-max shift: the other
    samples' logits of a few hundred then overflowed exp2 and came out NaN. They must equal the float64
    math path on the clean samples alone, values and gradients."""
    q, k, v = (t * s for t, s in zip(tensors(torch.float32, 33, 40, 4, 6), (30.0, 30.0, 1.0), strict=True))
    q[0, 3] = float("nan")
    grad = torch.randn(2, 33, 6, generator=torch.Generator().manual_seed(2))
    ts = [t.clone().requires_grad_() for t in (q, k, v)]
    grads = torch.autograd.grad(out := blocked(*ts), ts, grad)
    ref_ts = [t[1:].double().requires_grad_() for t in (q, k, v)]
    ref_grads = torch.autograd.grad(ref := reference(*ref_ts), ref_ts, grad[1:].double())
    torch.testing.assert_close(out[1:].double(), ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g[1:].double(), r, atol=1e-4, rtol=1e-4)


def test_compiles_in_one_graph_in_training():
    """The fused path chose its query split by reading the thread count, a graph break: torch.compile with
    fullgraph=True failed for SAGAN-like attention (d < e) on inputs that require grad."""
    torch._dynamo.reset()
    run = torch.compile(lambda q, k, v: global_attention(q, k, v, scale=0.7), backend="eager", fullgraph=True)
    assert_matches(run, reference, tensors(torch.float64))
