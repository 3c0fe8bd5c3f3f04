"""Undo a surgery that fails half-way: `insert` and `replace` promise that an error leaves the model as it
was, but attaching several places, or the check forward after them, can fail after the first change."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from attnzoo.convert._source_keys import FORWARD_HOOKS  # where `_attach` registers its guards

__all__ = ["undo_on_error"]


@contextlib.contextmanager
def undo_on_error(model: nn.Module, fn: str) -> Iterator[None]:
    """Snapshot every module's children and forward hooks; on an error inside the block restore them and
    re-raise. A raw error (the check forward failing inside some layer: anything but the `ValueError` and
    `TypeError` attnzoo's checks raise) becomes a `ValueError` that says the change was undone.

    Args:
        model: The model the block changes.
        fn: The caller (`"insert"`, `"replace"`), for the message.
    """
    saved = [(m, dict(m._modules), {name: dict(getattr(m, name)) for name in FORWARD_HOOKS
                                    if hasattr(m, name)}) for m in model.modules()]
    try:
        yield
    except BaseException as err:
        for module, children, hooks in saved:
            module._modules = children  # a Sequential rebuilt by `_attach` holds a new dict: put the old back
            for name, entries in hooks.items():
                current = getattr(module, name)
                current.clear()
                current.update(entries)
        if isinstance(err, Exception) and not isinstance(err, (ValueError, TypeError)):  # raw, from inside
            raise ValueError(f"{fn}: the model fails on example_input after the change, which was undone: "
                             f"{type(err).__name__}: {err}") from err
        raise
