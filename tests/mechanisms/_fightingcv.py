"""Shared helpers of the fightingcv parity tests: random float64 weights, random BatchNorm statistics,
and one float64 comparison in eval and in train mode."""

from __future__ import annotations

import copy

import torch
from torch import nn

from attnzoo.convert import convert, from_fightingcv

D = torch.float64


def randomised(module: nn.Module, seed: int = 0) -> nn.Module:
    """``module`` in float64 with every parameter from N(0, 1) and BatchNorm statistics randomised
    (fightingcv's inits give trivial gates)."""
    gen = torch.Generator().manual_seed(seed)
    module = module.to(D)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=D))
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen, dtype=D))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen, dtype=D) + 0.5)
    return module


def check_parity(
    theirs: nn.Module, shape: tuple[int, ...], expected: type, *, train: bool = False
) -> nn.Module:
    """Convert ``theirs`` (randomised) and compare outputs in float64 within 1e-10; in train mode the
    running statistics must also agree after the step."""
    theirs = randomised(theirs).train(train)
    ours = from_fightingcv(copy.deepcopy(theirs))
    assert type(ours) is expected
    assert ours.training == train
    assert type(convert(theirs)) is expected  # reached through the converter table too
    x = torch.randn(*shape, dtype=D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-10, rtol=0)
    for (name, a), b in zip(theirs.state_dict().items(), ours.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=0, msg=name)
    return ours
