"""Loading weights safely: tensors only, never arbitrary pickled objects.

Checkpoints from the seed code and the papers' official repositories are plain state_dicts; they
load with `torch.load(weights_only=True)`, which refuses pickles that would run code. A
`.safetensors` file loads through the safetensors package when it is installed.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["load_state_dict", "load_weights", "UnsafeCheckpointError"]


class UnsafeCheckpointError(ValueError):
    """The file holds more than tensors and plain containers, so it was not loaded."""


def load_state_dict(path: str | os.PathLike[str], *, key: str | None = None) -> dict[str, Tensor]:
    """Read a state_dict from `path` without executing anything stored in it.

    Args:
        path: A `.pt`/`.pth`/`.bin` file written by `torch.save` or a `.safetensors` file.
        key: Take the state_dict from this entry of a checkpoint dict (`"model"`,
            `"state_dict"`). Default: the whole file, or its `"state_dict"`/`"model"` entry
            when the file holds nothing but such a wrapper.

    Raises:
        UnsafeCheckpointError: The pickle refers to code (a class, a function): it is refused.
        ValueError: No state_dict of tensors was found.
    """
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as err:
            raise ImportError(
                "loading .safetensors files needs the safetensors package: pip install safetensors"
            ) from err
        return dict(load_file(path))
    try:
        loaded: Any = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"{path} holds pickled objects other than tensors and containers; refusing to load it "
            f"(it could run code). Details: {str(err).splitlines()[0]}"
        ) from err
    if key is not None:
        if not isinstance(loaded, Mapping) or key not in loaded:
            raise ValueError(f"{path} has no entry {key!r}")
        loaded = loaded[key]
    elif isinstance(loaded, Mapping) and not any(isinstance(v, Tensor) for v in loaded.values()):
        for wrapper in ("state_dict", "model"):
            if isinstance(loaded.get(wrapper), Mapping):
                loaded = loaded[wrapper]
                break
    if not isinstance(loaded, Mapping) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise ValueError(f"{path} does not hold a state_dict of tensors (pass key= to pick an entry)")
    return dict(loaded)


def load_weights(
    module: nn.Module, path: str | os.PathLike[str], *, strict: bool = True, key: str | None = None
) -> nn.Module:
    """Load a checkpoint into `module` safely (see `load_state_dict`); returns the module."""
    module.load_state_dict(load_state_dict(path, key=key), strict=strict)
    return module
