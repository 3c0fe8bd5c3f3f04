"""SimAM's energy-gate kernel against the plain float64 ops, and under torch's tools."""

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
from torch.autograd import gradcheck

from attnzoo.kernels.simam import simam_gate, simam_plain


def _map(b=2, c=3, h=5, w=4, dtype=torch.float64):
    return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(0), dtype=dtype).requires_grad_()


@pytest.mark.parametrize("hw", [(5, 4), (1, 7), (1, 1), (3, 3)])
@pytest.mark.parametrize("e_lambda", [1e-4, 0.5])
def test_matches_plain_ops_with_gradients(hw, e_lambda):
    x = _map(h=hw[0], w=hw[1])
    out = simam_gate(x, e_lambda)
    assert type(out.grad_fn).__name__ == "_SimAMFnBackward"  # the kernel ran
    assert_matches(lambda t: simam_gate(t, e_lambda), lambda t: simam_plain(t, e_lambda)[0], [x])


def test_gradcheck_double_backward_and_torch_tools():
    x = _map(1, 2, 3, 4)

    def kernel(t):
        return simam_gate(t, 1e-4)

    def plain(t):
        return simam_plain(t, 1e-4)[0]

    assert gradcheck(kernel, (x,))
    assert_gradgradcheck(kernel, (x,))
    assert_flop_counter(kernel, (x,), counted=None)
    assert_torch_func(Holder(kernel, (x,)))
    assert_autocast_bf16(kernel, [x.float()], plain)


def test_no_grad_and_frozen_input_take_the_plain_ops():
    x = _map()
    with torch.no_grad():
        out = simam_gate(x, 1e-4)
    assert out.grad_fn is None
    torch.testing.assert_close(out, simam_plain(x.detach(), 1e-4)[0])


def test_several_blocks_of_samples(monkeypatch):
    """The kernel works a few samples at a time; with one sample per block the result is the same."""
    import attnzoo.kernels.simam as kernel

    whole = kernel.sample_blocks
    monkeypatch.setattr(kernel, "sample_blocks", lambda x: whole(x, chunk=x[0].numel()))
    assert len(kernel.sample_blocks(_map(b=3))) == 3
    assert_matches(lambda t: simam_gate(t, 1e-4), lambda t: simam_plain(t, 1e-4)[0], [_map(b=3)])
