"""A converted module that loads its source's checkpoints: a key map found by tracing marked values.

The converters copy the source's weights into the canonical class, often renamed, reshaped, split,
concatenated or transposed (fightingcv's ``v_pj`` -> ``v``, MobileViT v2's ``fc_i``/``fc_k``/``fc_v``
-> ``qkv``). The timm converters whose keys differ register a hand-written `TimmKeys` pre-hook;
`attach_source_keys` derives one for any other converter: it converts a float64 copy of the source
whose floating state entry j holds ``j * 2**24 + position``, reads back where every value of the
converted state came from, and registers a ``load_state_dict`` pre-hook (`SourceKeys`) that
rebuilds the converted entries from a source checkpoint by that gather. So after
``attnzoo.replace(model, ForeignClass)`` the source's checkpoint still loads with ``strict=True``.

A converter that computes values (a folded scale, an average of weights) leaves marks that do not
decode; then no hook is attached and the module loads attnzoo's keys only, as before.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["SourceKeys", "attach_source_keys"]

_STRIDE = 1 << 24  # positions per entry: exact in float64 for up to 2**29 entries
_Recipe = dict[str, tuple[tuple[str, ...], Tensor, torch.Size]]


class SourceKeys:
    """A ``load_state_dict`` pre-hook: a state_dict in the source's layout (exactly the source's keys
    under the module's prefix) is rewritten into the converted module's, each converted entry
    gathered from the flattened source entries it was built from; entries of the converted module
    with no source (integer buffers it adds) keep their current values. Other state_dicts pass
    unchanged. A plain object holding tensors, so the model still pickles."""

    def __init__(self, source_keys: tuple[str, ...], recipe: _Recipe, own: dict[str, Tensor]) -> None:
        self.source_keys = frozenset(source_keys)
        self.recipe = recipe
        self.own = own  # converted entries with no source: their values at conversion

    def __call__(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
        local = {key[len(prefix):]: key for key in state_dict if key.startswith(prefix)}
        if set(local) != self.source_keys:
            return
        values = {name: state_dict.pop(key) for name, key in local.items()}
        for name, (sources, index, shape) in self.recipe.items():
            flat = torch.cat([values[s].reshape(-1) for s in sources])
            state_dict[prefix + name] = flat[index.to(flat.device)].view(shape)
        for name, value in self.own.items():
            state_dict[prefix + name] = value.clone()


def attach_source_keys(module: nn.Module, new: nn.Module, convert: Callable[[nn.Module], nn.Module]) -> None:
    """Register `SourceKeys` on ``new`` (``convert(module)``) when its state_dict layout differs from
    the module's and ``new`` has no key hook of its own; nothing when the values do not trace."""
    theirs, ours = module.state_dict(), new.state_dict()
    same = theirs.keys() == ours.keys() and all(theirs[k].shape == ours[k].shape for k in theirs)
    if same or new._load_state_dict_pre_hooks or not theirs:
        return
    with torch.random.fork_rng(devices=[]):  # building the probes draws initial weights
        recipe = _trace(module, convert, ours)
    if recipe is not None:
        own = {k: v.detach().clone() for k, v in ours.items() if k not in recipe}
        new.register_load_state_dict_pre_hook(SourceKeys(tuple(theirs), recipe, own))


def _trace(
    module: nn.Module, convert: Callable[[nn.Module], nn.Module], ours: dict[str, Tensor]
) -> _Recipe | None:
    """Where each floating entry of the converted state comes from, or None when it does not trace."""
    probe = copy.deepcopy(module).to(torch.float64)
    state = probe.state_dict()
    order = list(state)  # entry j + 1 is order[j]
    if any(v.numel() >= _STRIDE for v in state.values()) or len(order) >= 1 << 28:
        return None
    with torch.no_grad():
        for j, value in enumerate(state.values(), start=1):
            if value.is_floating_point():
                value.copy_(j * _STRIDE + torch.arange(value.numel(), dtype=torch.float64).view(value.shape))
    try:
        marked = convert(probe).state_dict()
    except (TypeError, ValueError, RuntimeError):
        return None
    recipe: _Recipe = {}
    for key, value in marked.items():
        if not value.is_floating_point():
            continue
        if key not in ours or ours[key].shape != value.shape:
            return None
        traced = _decode(value.detach().double().reshape(-1), order, state)
        if traced is None:
            return None
        recipe[key] = (*traced, value.shape)
    return recipe if _replays(module, convert, recipe) else None


def _replays(module: nn.Module, convert: Callable[[nn.Module], nn.Module], recipe: _Recipe) -> bool:
    """Whether the recipe rebuilds the conversion of other (random) values exactly: a converter that
    averages or adds marks can leave whole numbers that decode to the wrong source."""
    probe = copy.deepcopy(module).to(torch.float64)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for value in probe.state_dict().values():
            if value.is_floating_point():
                value.copy_(torch.rand(value.shape, generator=gen, dtype=torch.float64) + 0.5)
    source = probe.state_dict()
    try:
        converted = convert(probe).state_dict()
    except (TypeError, ValueError, RuntimeError):
        return False
    for key, (sources, index, shape) in recipe.items():
        flat = torch.cat([source[s].reshape(-1) for s in sources])
        if not torch.equal(flat[index].view(shape), converted[key].double()):
            return False
    return True


def _decode(
    marks: Tensor, order: list[str], state: dict[str, Tensor]
) -> tuple[tuple[str, ...], Tensor] | None:
    """The source entries a converted entry's marks name, and each value's index into their
    concatenation (flattened, in that order); None for values that are not marks."""
    entry, pos = torch.div(marks, _STRIDE, rounding_mode="floor"), torch.remainder(marks, _STRIDE)
    whole = bool((marks == marks.round()).all())
    if not whole or bool((entry < 1).any()) or bool((entry > len(order)).any()):
        return None
    ids = [int(e) for e in entry.unique().tolist()]
    if not all(state[order[i - 1]].is_floating_point() for i in ids):
        return None
    sizes = torch.zeros(len(order) + 1, dtype=torch.long)
    offsets = torch.zeros(len(order) + 1, dtype=torch.long)
    total = 0
    for i in ids:
        sizes[i], offsets[i] = state[order[i - 1]].numel(), total
        total += state[order[i - 1]].numel()
    entry_l, pos_l = entry.long(), pos.long()
    if bool((pos_l >= sizes[entry_l]).any()):
        return None
    return tuple(order[i - 1] for i in ids), offsets[entry_l] + pos_l
