"""Registration order of a compat class's parameters, as its original's.

`nn.Module.parameters()` lists a module's own parameters first, in the order they were registered, then
its children's, in their order. An optimizer's state (`optimizer.state_dict()`) is indexed by that order,
so a stand-in that registers the same parameters in another order makes an optimizer state saved with
the original land on the wrong tensors after `attnzoo.replace` (it fails at the first step, or worse,
where the shapes happen to agree).
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from typing import Any

from torch import nn

__all__ = ["follow_order"]


def follow_order(module: nn.Module, parameters: Sequence[str] = (), children: Sequence[str] = ()) -> None:
    """Put `module`'s own parameters and children named here first, in this order (the rest after them,
    in their order). Names the module does not have are skipped."""
    _names_first(module._parameters, parameters)
    _names_first(module._modules, children)


def _names_first(table: MutableMapping[str, Any], names: Sequence[str]) -> None:
    first = {name: table[name] for name in names if name in table}
    rest = {name: value for name, value in table.items() if name not in first}
    table.clear()
    table.update(first)
    table.update(rest)
