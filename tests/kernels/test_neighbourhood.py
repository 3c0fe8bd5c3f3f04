"""ACmix's neighbourhood kernel against attend's float64 math path (a mask keeping each query's
neighbours), and under torch's tools."""

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
from attnzoo.kernels.neighbourhood import neighbourhood_attention

CASES = [(3, 1, 1), (3, 2, 1), (2, 1, 2), (3, 1, 2)]  # (kernel, dilation, stride)


def padded_size(out: int, kernel: int, dilation: int, stride: int) -> int:
    return stride * (out - 1) + dilation * (kernel - 1) + 1


def reference(q, k_pad, v_pad, kernel, dilation, stride):
    """Every padded position is a key; the mask keeps query (y, x)'s kernel x kernel neighbours."""
    n, d, out_h, out_w = q.shape
    hp, wp = k_pad.shape[-2:]
    keep = torch.zeros(out_h, out_w, hp, wp, dtype=torch.bool)
    for y in range(out_h):
        for x in range(out_w):
            for i in range(kernel):
                for j in range(kernel):
                    keep[y, x, stride * y + dilation * i, stride * x + dilation * j] = True
    tokens = [t.flatten(2).transpose(1, 2).unsqueeze(1) for t in (q, k_pad, v_pad)]  # (N, 1, L or S, d)
    with attnzoo.fused_attn(False):
        out = attend(*tokens, mask=keep.view(out_h * out_w, hp * wp), scale=1.0)  # (N, 1, L, d)
    return out.squeeze(1).transpose(1, 2).reshape(n, d, out_h, out_w)


def tensors(kernel, dilation, stride, dtype=torch.float64, out=(3, 4), d=2):
    gen = torch.Generator().manual_seed(0)
    hp, wp = (padded_size(o, kernel, dilation, stride) for o in out)
    q = torch.randn(2, d, *out, generator=gen, dtype=dtype)
    k_pad = torch.randn(2, d, hp, wp, generator=gen, dtype=dtype)
    return [q, k_pad, torch.randn(2, d, hp, wp, generator=gen, dtype=dtype)]


@pytest.mark.parametrize("case", CASES, ids=[f"k{k}d{d}s{s}" for k, d, s in CASES])
def test_values_and_gradients_match_attend_math(case):
    kernel = lambda *t: neighbourhood_attention(*t, *case).contiguous()  # noqa: E731
    assert_matches(kernel, lambda *t: reference(*t, *case), tensors(*case))


def test_second_derivatives():
    case = (2, 1, 1)
    assert_gradgradcheck(lambda *t: neighbourhood_attention(*t, *case), tensors(*case, out=(2, 2)))


def test_flop_counter_with_backward():
    case = CASES[0]
    # Only elementwise products and sums: FlopCounterMode counts none of them.
    kernel = lambda *t: neighbourhood_attention(*t, *case)  # noqa: E731
    assert_flop_counter(kernel, tensors(*case, torch.float32), counted=False)


def test_torch_func_grad_over_functional_call():
    case = CASES[-1]
    assert_torch_func(Holder(lambda *t: neighbourhood_attention(*t, *case), tensors(*case, torch.float32)))


def test_autocast_bf16_forward_and_backward():
    case = CASES[0]
    assert_autocast_bf16(lambda *t: neighbourhood_attention(*t, *case), tensors(*case, torch.float32))


def test_one_query_with_a_stride_past_the_map():
    """A single output ignores the stride: ACmix(stride=1001) on a 5 x 6 map ran 1001**2 phases (47 s,
    2 GB); the result is the stride-1 one, against the reference."""
    case = (3, 1, 1)
    ts = tensors(*case, out=(1, 1))
    assert_matches(lambda *t: neighbourhood_attention(*t, 3, 1, 1001).contiguous(),
                   lambda *t: reference(*t, *case), ts)
