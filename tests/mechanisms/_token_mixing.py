"""Helpers of the timm token-mixing parity tests (lambda, bottleneck, halo)."""

from __future__ import annotations

import copy

import torch
from torch import nn

D = torch.float64


def randomised(module: nn.Module, seed: int = 0) -> nn.Module:
    """float64, every parameter from N(0, 0.5^2), BatchNorm statistics away from (0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    module = module.to(D)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=D) * 0.5)
        for name, b in module.named_buffers():
            if "running_var" in name:
                b.copy_(torch.rand(b.shape, generator=gen, dtype=D) + 0.5)
            elif "running_mean" in name:
                b.copy_(torch.randn(b.shape, generator=gen, dtype=D) * 0.1)
    return module


def check_parity(theirs: nn.Module, ours: nn.Module, shape: tuple[int, ...], training: bool) -> None:
    """Same output, input gradient and parameter gradients within 1e-10 in float64; in training mode
    also the same BatchNorm statistics afterwards."""
    theirs, ours = copy.deepcopy(theirs).train(training), copy.deepcopy(ours).train(training)
    x = torch.randn(*shape, dtype=D, generator=torch.Generator().manual_seed(1))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = theirs(xa), ours(xb)
    torch.testing.assert_close(yb, ya, atol=1e-10, rtol=0)
    g = torch.randn(ya.shape, dtype=D, generator=torch.Generator().manual_seed(2))
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xb.grad, xa.grad, atol=1e-10, rtol=0)
    mine = dict(ours.named_parameters())
    for name, p in theirs.named_parameters():
        torch.testing.assert_close(mine[name].grad.reshape(p.shape), p.grad, atol=1e-10, rtol=0)
    buffers = dict(ours.named_buffers())
    for name, b in theirs.named_buffers():
        if name in buffers:
            torch.testing.assert_close(buffers[name], b, atol=1e-12, rtol=0)
