"""Input and argument checks shared by every module.

Each helper raises `ValueError` (or `TypeError` for a wrong type/dtype) with a message that names
the module, the argument, what was expected and what was given, *before* any heavy work runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "check_tensor",
    "check_shape",
    "check_same",
    "check_int",
    "check_float",
    "check_choice",
    "check_divisible",
    "check_mask",
    "format_shape",
]


def format_shape(dims: Sequence[object]) -> str:
    """`(B, 256, H, W)` from `["B", 256, "H", "W"]`; a one-element shape keeps its comma."""
    inner = ", ".join(str(d) for d in dims)
    return f"({inner},)" if len(dims) == 1 else f"({inner})"


def check_tensor(x: object, who: str, name: str = "x", *, floating: bool = True) -> Tensor:
    """Raise `TypeError` unless `x` is a tensor (of a real floating dtype when `floating`)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{who} expects {name} to be a torch.Tensor, got {type(x).__name__}")
    if floating and not (x.is_floating_point() and not x.is_complex()):
        raise TypeError(f"{who} expects {name} to have a floating-point dtype, got {x.dtype}")
    return x


def check_shape(
    x: object,
    who: str,
    spec: str,
    name: str = "x",
    *,
    floating: bool = True,
    allow_empty: bool = False,
    **sizes: int,
) -> dict[str, int]:
    """Check `x` against a shape spec such as `"B C H W"` with some letters fixed (`C=256`).

    Returns the actual size of every letter, so callers can unpack `H, W` without a second read.
    Letters repeated in `spec` must agree. A zero-sized dimension is rejected unless
    `allow_empty`: attention over nothing has no meaning, and an empty batch is almost always a
    data-loading bug.

    Example:
        ```python
        >>> dims = check_shape(torch.zeros(2, 8, 5, 5), "SqueezeExcite", "B C H W", C=8)
        >>> dims["H"]
        5
        ```
    """
    tensor = check_tensor(x, who, name, floating=floating)
    letters = spec.split()
    expected = format_shape([sizes.get(letter, letter) for letter in letters])
    got = tuple(tensor.shape)
    if tensor.ndim != len(letters):
        raise ValueError(
            f"{who} expects {name} of shape {expected} ({len(letters)}-D), got {got} ({tensor.ndim}-D)"
        )
    found: dict[str, int] = {}
    for letter, size in zip(letters, got, strict=False):
        want = sizes.get(letter, found.get(letter))
        if want is not None and size != want:
            raise ValueError(f"{who} expects {name} of shape {expected} with {letter}={want}, got {got}")
        found[letter] = size
    if not allow_empty and tensor.numel() == 0:
        raise ValueError(f"{who} expects a non-empty {name} of shape {expected}, got {got}")
    return found


def check_same(value: object, expected: object, who: str, what: str) -> None:
    """Raise `ValueError` unless `value == expected` (for sizes that must agree between inputs)."""
    if value != expected:
        raise ValueError(f"{who} expects {what} to be {expected}, got {value}")


def check_int(
    value: object, name: str, who: str, *, minimum: int | None = 1, maximum: int | None = None
) -> int:
    """A constructor argument that must be an `int` within `[minimum, maximum]`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{who}: {name} must be an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{who}: {name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{who}: {name} must be <= {maximum}, got {value}")
    return value


def check_float(
    value: object, name: str, who: str, *, minimum: float | None = None, maximum: float | None = None
) -> float:
    """A constructor argument that must be a real number within `[minimum, maximum]`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{who}: {name} must be a number, got {type(value).__name__} {value!r}")
    if value != value:  # NaN passes every comparison below
        raise ValueError(f"{who}: {name} must be a number, got nan")
    if minimum is not None and value < minimum:
        raise ValueError(f"{who}: {name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{who}: {name} must be <= {maximum}, got {value}")
    return float(value)


def check_choice(value: Any, choices: Iterable[Any], name: str, who: str) -> Any:
    """A constructor argument that must be one of `choices`."""
    options = tuple(choices)
    if value not in options:
        raise ValueError(f"{who}: {name} must be one of {options}, got {value!r}")
    return value


def check_divisible(value: int, divisor: int, name: str, divisor_name: str, who: str) -> None:
    """Raise `ValueError` unless `divisor` divides `value` (`dim % num_heads` and friends)."""
    if divisor == 0 or value % divisor != 0:
        raise ValueError(f"{who}: {name}={value} must be divisible by {divisor_name}={divisor}")


def check_mask(mask: object, target: Sequence[int], who: str, name: str = "mask") -> Tensor:
    """A mask or bias that must broadcast to `target` (for example `(B, h, L, S)`).

    Accepts bool (True = may attend) or floating (additive) tensors. Broadcasting is checked here,
    dimension by dimension from the right, so a wrong mask never broadcasts silently into a
    different meaning.
    """
    if not isinstance(mask, Tensor):
        raise TypeError(f"{who} expects {name} to be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(
            f"{who} expects {name} to be bool (True = may attend) or floating (additive), got {mask.dtype}"
        )
    shape = tuple(mask.shape)
    fits = len(shape) <= len(target) and all(
        m in (1, t) for m, t in zip(reversed(shape), reversed(tuple(target)), strict=False)
    )
    if not fits:
        raise ValueError(f"{who} expects {name} broadcastable to {tuple(target)}, got {shape}")
    return mask
