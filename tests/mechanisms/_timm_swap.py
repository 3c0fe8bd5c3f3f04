"""The whole-model check of the `attnzoo.compat` classes that stand in for timm's attention: a timm
model with random weights, its attention swapped by `attnzoo.replace`, keeps its logits (float64,
1e-10; in training too, with the same dropout draws and BatchNorm statistics), its parameters' names,
shapes and order (an optimizer state saved before the swap indexes by that order), loads timm's
checkpoint with `strict=True`, records one map per swapped module, and takes a training step with
finite gradients."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from tests.convert._parity import randomize
from torch import nn

import attnzoo


def check_swap(
    model: nn.Module, classes: Sequence[type], x: torch.Tensor, swapped: int | Sequence[str], *,
    seed: int = 3, randomise: bool = True,
) -> nn.Module:
    """Swap every module of `classes` in `model` (built by timm, float64) and check what the module
    docstring says. `swapped` is the number of swapped modules or their names, in order. Returns the
    swapped model."""
    if randomise:
        randomize(model, seed=seed)
    model.eval()
    theirs = copy.deepcopy(model)
    checkpoint = copy.deepcopy(model.state_dict())
    listing = [(name, p.shape) for name, p in model.named_parameters()]
    names = [name for cls in classes for name in attnzoo.replace(model, cls)]
    # an optimizer state saved before the swap still fits: same names, shapes and order
    assert [(name, p.shape) for name, p in model.named_parameters()] == listing
    assert names == list(swapped) if not isinstance(swapped, int) else len(names) == swapped, names
    assert all(type(model.get_submodule(n)).__module__.startswith("attnzoo.") for n in names)
    model.load_state_dict(checkpoint, strict=True)  # timm's keys, unchanged
    with torch.no_grad():
        torch.testing.assert_close(model(x), theirs(x), atol=1e-10, rtol=1e-10)
        with attnzoo.capture_maps(model) as maps:
            model(x)
        assert sorted(maps) == sorted(names)
    model.train(), theirs.train()
    torch.manual_seed(seed)
    want = theirs(x)
    torch.manual_seed(seed)  # every dropout draws timm's mask, block after block (with grad: the kernels run)
    got = model(x)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    for key, value in theirs.state_dict().items():  # BatchNorm's running statistics moved alike
        torch.testing.assert_close(model.state_dict()[key], value, atol=1e-10, rtol=1e-10)
    got.square().mean().backward()  # one training step's gradients are finite
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    return model
