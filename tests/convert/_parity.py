"""Shared helpers of the converter parity tests: float64, random weights and statistics, and the
check that a converted module agrees with the original in outputs, input gradients and BatchNorm
statistics."""

from __future__ import annotations

import torch
from torch import nn

D = torch.float64
TOL = {"atol": 1e-10, "rtol": 1e-10}


def randomize(module: nn.Module, seed: int = 0, extra: tuple[nn.Module, ...] = ()) -> nn.Module:
    """float64, random parameters and BatchNorm statistics, also of the layers in `extra` (fightingcv
    keeps some layers in Python lists, out of `state_dict`)."""
    gen = torch.Generator().manual_seed(seed)
    for m in (module, *extra):
        m.to(D)
        with torch.no_grad():
            for name, t in m.state_dict().items():
                if not t.is_floating_point():
                    continue
                if "running_var" in name:
                    t.copy_(torch.rand(t.shape, generator=gen, dtype=D) + 0.5)
                else:
                    t.copy_(torch.randn(t.shape, generator=gen, dtype=D) * 0.5)
    return module


def x_of(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


def check_same(
    theirs: nn.Module, ours: nn.Module, shape: tuple[int, ...], train: bool, grad_tol: dict | None = None
) -> None:
    """Outputs, input gradients (within `grad_tol`, default `TOL`) and (in training) BatchNorm
    statistics of both modules agree."""
    theirs.train(train)
    ours.train(train)
    xa, xb = x_of(*shape).requires_grad_(), x_of(*shape).requires_grad_()
    out_a, out_b = ours(xa), theirs(xb)
    torch.testing.assert_close(out_a, out_b, **TOL)
    g = torch.randn_like(out_b)
    out_a.backward(g)
    out_b.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, **(grad_tol or TOL))
    ours_bn = [m for m in ours.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    theirs_bn = [m for m in theirs.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(ours_bn) == len(theirs_bn)
    for a, b in zip(ours_bn, theirs_bn, strict=True):
        torch.testing.assert_close(a.running_mean, b.running_mean, **TOL)
        torch.testing.assert_close(a.running_var, b.running_var, **TOL)


BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
