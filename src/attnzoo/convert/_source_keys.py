"""A converted module that loads its source's checkpoints: a key map found by tracing marked values.

The converters copy the source's weights into the canonical class, often renamed, reshaped, split,
concatenated or transposed (fightingcv's ``v_pj`` -> ``v``, MobileViT v2's ``fc_i``/``fc_k``/``fc_v``
-> ``qkv``). The timm converters whose keys differ register a hand-written `TimmKeys` pre-hook;
`attach_source_keys` derives one for any other converter: it converts a float64 CPU copy of the
source whose state entry j (floating, or int64 such as ``num_batches_tracked``) holds
``j * 2**24 + position``, reads back where every value of the converted state came from, checks
that map on random values, and registers a ``load_state_dict`` pre-hook (`SourceKeys`) that
rebuilds the converted entries from a source checkpoint by that gather. So after
``attnzoo.replace(model, ForeignClass)`` the source's checkpoint still loads with ``strict=True``.

No map (the module then loads attnzoo's keys only, as before) when a converter computes values (a
folded scale, an average of weights), for meta tensors, for entries of 2**24 or more elements, or
when anything in the tracing fails.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["FORWARD_HOOKS", "SourceKeys", "attach_source_keys", "cpu_probe", "share_hooks"]

_STRIDE = 1 << 24  # positions per entry: exact in float64 for up to 2**29 entries
# The hook tables of a module's forward, which a converted module takes over (`convert_keeping`);
# the probes leave these and the backward ones behind.
FORWARD_HOOKS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                 "_forward_hooks_with_kwargs", "_forward_hooks_always_called")
_HOOK_TABLES = (*FORWARD_HOOKS, "_backward_hooks", "_backward_pre_hooks")
# Every hook table of a module; `share_hooks` hands them all to a converted module with the same keys.
_ALL_HOOK_TABLES = (*_HOOK_TABLES, "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                    "_load_state_dict_post_hooks")
# converted key -> (its source keys, the gather into their flattened concatenation or None for a
# plain reshape of one source entry, its shape)
_Recipe = dict[str, tuple[tuple[str, ...], Tensor | None, torch.Size]]


class SourceKeys:
    """A ``load_state_dict`` pre-hook: a state_dict in the source's layout (exactly the source's keys
    and shapes under the module's prefix) is rewritten into the converted module's; entries with no
    source keep their current values. Any other state_dict passes unchanged (a wrong shape then
    fails as usual). A plain object holding tensors, so the model still pickles."""

    def __init__(self, shapes: dict[str, torch.Size], recipe: _Recipe, own: dict[str, Tensor]) -> None:
        self.shapes = shapes  # the source's entries and shapes
        self.recipe = recipe
        self.own = own  # converted entries with no source: their values at conversion

    def __call__(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
        local = {key[len(prefix):]: key for key in state_dict if key.startswith(prefix)}
        if set(local) != set(self.shapes):
            return
        if any(not isinstance(state_dict[key], Tensor) or state_dict[key].shape != self.shapes[name]
               for name, key in local.items()):
            return
        values = {name: state_dict.pop(key) for name, key in local.items()}
        for name, (sources, index, shape) in self.recipe.items():
            if index is None:
                state_dict[prefix + name] = values[sources[0]].reshape(shape)
                continue
            flat = torch.cat([values[s].reshape(-1) for s in sources])
            state_dict[prefix + name] = flat[index.to(flat.device, torch.long)].view(shape)
        for name, value in self.own.items():
            state_dict[prefix + name] = value.clone()


def attach_source_keys(module: nn.Module, new: nn.Module, convert: Callable[[nn.Module], nn.Module]) -> None:
    """Register `SourceKeys` on ``new`` (``convert(module)``) when its state_dict layout differs from
    the module's and ``new`` has no key hook of its own; nothing when the values do not trace."""
    theirs, ours = module.state_dict(), new.state_dict()
    same = theirs.keys() == ours.keys() and all(theirs[k].shape == ours[k].shape for k in theirs)
    if same or new._load_state_dict_pre_hooks or not theirs:
        return
    if any(t.is_meta or not isinstance(t, Tensor) for t in (*theirs.values(), *ours.values())):
        return
    recipe = None
    for ints in (True, False):  # integer buffers marked too, unless the converter reads their values
        try:
            with torch.random.fork_rng(devices=[]):  # the probes (on the CPU) draw initial weights
                recipe = _trace(module, convert, ours, ints)
        except Exception:  # noqa: BLE001 -- a map is a convenience: the conversion stands without one
            recipe = None
        if recipe:
            break
    if recipe:
        own = {k: v.detach().clone() for k, v in ours.items() if k not in recipe}
        shapes = {k: v.shape for k, v in theirs.items()}
        new.register_load_state_dict_pre_hook(SourceKeys(shapes, recipe, own))


def share_hooks(module: nn.Module, new: nn.Module, keys_kept: bool = True) -> None:
    """Give ``new`` (a fresh module holding ``module``'s tensors) the module's hook tables themselves:
    forward and backward hooks, and with ``keys_kept`` (the same state_dict keys) the state_dict ones,
    keep firing, and a handle returned before the conversion still removes its hook (copied entries
    would outlive ``handle.remove()``). The two modules share the tables from then on, as they share
    parameters; a table ``new`` already fills itself takes copies of the entries instead."""
    for name in _ALL_HOOK_TABLES if keys_kept else _HOOK_TABLES:
        if not hasattr(module, name):
            continue
        if getattr(new, name, None):
            getattr(new, name).update(getattr(module, name))
        else:
            setattr(new, name, getattr(module, name))
    if getattr(module, "_backward_hooks", None):
        new._is_full_backward_hook = getattr(module, "_is_full_backward_hook", None)


def cpu_probe(module: nn.Module) -> nn.Module:
    """A float64 CPU copy of the module without its hooks (a hook's owner is not copied along)."""
    memo: dict[int, Any] = {}
    for sub in module.modules():
        for table in _HOOK_TABLES:
            if hasattr(sub, table):
                memo[id(getattr(sub, table))] = type(getattr(sub, table))()
    return copy.deepcopy(module, memo).to("cpu", torch.float64)


def _markable(value: Tensor, ints: bool) -> bool:
    return value.is_floating_point() or (ints and value.dtype == torch.int64)


def _trace(
    module: nn.Module, convert: Callable[[nn.Module], nn.Module], ours: dict[str, Tensor], ints: bool
) -> _Recipe | None:
    """Where each markable entry of the converted state comes from, or None when it does not trace."""
    probe = cpu_probe(module)
    state = probe.state_dict()
    order = list(state)  # entry j + 1 is order[j]
    if any(v.numel() >= _STRIDE for v in state.values()) or len(order) >= 1 << 28:
        return None
    with torch.no_grad():
        for j, value in enumerate(state.values(), start=1):
            if _markable(value, ints):
                marks = j * _STRIDE + torch.arange(value.numel(), dtype=torch.int64)
                value.copy_(marks.view(value.shape).to(value.dtype))
    marked = convert(probe).state_dict()
    recipe: _Recipe = {}
    for key, value in marked.items():
        if not _markable(value, ints):
            continue
        if key not in ours or ours[key].shape != value.shape:
            return None
        traced = _decode(value.detach().double().reshape(-1), order, state, ints)
        if traced is None:
            return None
        recipe[key] = (*traced, value.shape)
    return recipe if _replays(module, convert, recipe, ints) else None


def _decode(
    marks: Tensor, order: list[str], state: dict[str, Tensor], ints: bool
) -> tuple[tuple[str, ...], Tensor | None] | None:
    """The source entries a converted entry's marks name, and each value's index into their
    concatenation (flattened, in that order; None for a whole entry in order); None for values that
    are not marks."""
    entry, pos = torch.div(marks, _STRIDE, rounding_mode="floor"), torch.remainder(marks, _STRIDE)
    whole = bool((marks == marks.round()).all())
    if not whole or bool((entry < 1).any()) or bool((entry > len(order)).any()):
        return None
    ids = [int(e) for e in entry.unique().tolist()]
    if not all(_markable(state[order[i - 1]], ints) for i in ids):
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
    index = offsets[entry_l] + pos_l
    if len(ids) == 1 and index.numel() == total and torch.equal(index, torch.arange(total)):
        return (order[ids[0] - 1],), None  # the whole entry in order: a reshape
    return tuple(order[i - 1] for i in ids), index.to(torch.int32 if total < 1 << 31 else torch.long)


def _replays(
    module: nn.Module, convert: Callable[[nn.Module], nn.Module], recipe: _Recipe, ints: bool
) -> bool:
    """Whether the recipe rebuilds the conversion of other (random) values exactly: a converter that
    adds or subtracts marks can leave whole numbers that decode to the wrong source."""
    probe = cpu_probe(module)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for value in probe.state_dict().values():
            if _markable(value, ints):
                random = torch.randint(1, 1 << 20, value.shape, generator=gen, dtype=torch.int64)
                value.copy_(random.to(value.dtype) / (1 if value.dtype == torch.int64 else 7.0))
    source = probe.state_dict()
    converted = convert(probe).state_dict()
    for key, (sources, index, shape) in recipe.items():
        flat = torch.cat([source[s].reshape(-1) for s in sources])
        rebuilt = flat.view(shape) if index is None else flat[index.long()].view(shape)
        if not torch.equal(rebuilt.double(), converted[key].double()):
            return False
    return True
