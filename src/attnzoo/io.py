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
        ValueError: The file is empty, truncated, damaged or of another format, or holds no
            state_dict of tensors; the message names the file and the problem.
        FileNotFoundError: There is no such file.
    """
    path = os.fspath(path)
    _check_file(path)
    loaded: Any = _read_safetensors(path) if path.endswith(".safetensors") else _read_torch(path)
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


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ValueError(f"{path} is a directory, not a checkpoint file")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path} is empty (0 bytes): not a checkpoint; was the download or save cut short?")


def _read_safetensors(path: str) -> dict[str, Tensor]:
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError as err:
        raise ImportError(
            "loading .safetensors files needs the safetensors package: pip install safetensors"
        ) from err
    try:
        return dict(load_file(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(
            f"{path} is not a valid .safetensors file (it may be truncated, or another format under "
            f"that name): {err}"
        ) from None


def _read_torch(path: str) -> Any:
    with open(path, "rb") as f:
        head = f.read(4)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"{path} holds pickled objects other than tensors and containers; refusing to load it "
            f"(it could run code). Details: {str(err).splitlines()[0]}"
        ) from err
    except Exception as err:  # noqa: BLE001 (any failure to parse: damaged or foreign bytes)
        zipped = head.startswith(b"PK")
        what = "a truncated or damaged torch.save archive" if zipped else "not a torch.save checkpoint"
        raise ValueError(f"{path} could not be read: {what} ({type(err).__name__}: {err})") from None


def load_weights(
    module: nn.Module, path: str | os.PathLike[str], *, strict: bool = True, key: str | None = None
) -> nn.Module:
    """Load a checkpoint into `module` safely (see `load_state_dict`); returns the module."""
    module.load_state_dict(load_state_dict(path, key=key), strict=strict)
    return module
