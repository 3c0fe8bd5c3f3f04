"""Constructor option checks shared by every registered and compat class (applied by
`attnzoo._checks.checked`): options against their annotations, finite floats, module-building options,
sizes within torch's 32-bit arguments, and `device=`/`dtype=`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import torch

__all__ = ["MAX_SIZE", "check_options"]

# The largest size (width, kernel, stride, count) an option or a derived width may take: torch's
# convolution and pooling arguments are 32-bit, and a larger one only overflows or exhausts memory.
MAX_SIZE = 2**31 - 1

_SIMPLE = {"bool": bool, "int": int, "float": float, "str": str, "None": type(None)}


def _annotation_types(annotation: object) -> tuple[type, ...] | None:
    """`"int | None"` -> (int, NoneType); None when the annotation holds anything but simple types."""
    if not isinstance(annotation, str):
        return None
    parts = [p.strip() for p in annotation.split("|")]
    if any(p not in _SIMPLE for p in parts):
        return None
    return tuple(_SIMPLE[p] for p in parts)


def _accepts(value: object, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool):  # bool is an int to Python, never to a user of an option
        return bool in types
    if isinstance(value, int) and float in types:
        return True
    return isinstance(value, tuple(t for t in types if t is not bool))


_ARTICLE = {bool: "a bool", int: "an int", float: "a number", str: "a str", type(None): "None"}


def _type_names(types: tuple[type, ...]) -> str:
    return " or ".join(_ARTICLE[t] for t in types)


# Annotations of options that build a module (`norm_layer=nn.BatchNorm2d`): a class or a factory.
_LAYER = {"type[nn.Module]", "Callable[..., nn.Module]", "Layer"}


def _check_layer_option(who: str, name: str, annotation: object, value: object) -> None:
    """`value` must be callable (or None where the annotation allows it) for a module-building option."""
    if not isinstance(annotation, str):
        return
    parts = [p.strip() for p in annotation.split("|")]
    if not parts or any(p not in _LAYER and p != "None" for p in parts) or all(p == "None" for p in parts):
        return
    if value is None and "None" in parts:
        return
    if not callable(value) or isinstance(value, (str, bool, int, float)):
        none = " (or None)" if "None" in parts else ""
        raise TypeError(f"{who}: {name} must be an nn.Module class or factory such as nn.BatchNorm2d{none}, "
                        f"got {type(value).__name__} {value!r}")


def check_options(
    who: str, signature: inspect.Signature, args: tuple, kwargs: dict, infinite: Sequence[str] = ()
) -> None:
    """Every argument whose annotation is a simple type (`bool`, `int | None`, ...) has that type,
    every float option is finite, and every module-building option (`norm_layer`) is callable.

    A string `"False"` given to a boolean option, or `None` where a value is required, raises
    `TypeError` naming the class, the argument, the expected and the given type; `inf` or `nan`
    given to a float option raises `ValueError`, except `inf` for the options named in `infinite`
    (a class's `infinite_options`: `ResidualAttention(temperature=math.inf)` takes the maximum).
    """
    try:
        bound = signature.bind(None, *args, **kwargs)
    except TypeError as err:
        raise TypeError(f"{who}: {_unknown_keywords(who, signature, kwargs) or err}") from None
    for name, value in list(bound.arguments.items())[1:]:
        annotation = signature.parameters[name].annotation
        types = _annotation_types(annotation)
        if types is not None and not _accepts(value, types):
            raise TypeError(
                f"{who}: {name} must be {_type_names(types)}, got {type(value).__name__} {value!r}"
            )
        if types is not None and float in types and isinstance(value, float) and not math.isfinite(value):
            if not (math.isinf(value) and name in infinite):
                raise ValueError(f"{who}: {name} must be a finite number, got {value}")
        _check_layer_option(who, name, annotation, value)
        sizes = value if isinstance(value, (tuple, list)) else (value,)
        if any(isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_SIZE for v in sizes):
            raise ValueError(f"{who}: {name} must be at most {MAX_SIZE} (2**31 - 1) in size, got {value}")
        if name in ("device", "dtype") and value is not None:
            _check_factory_option(who, name, value)


def _check_factory_option(who: str, name: str, value: object) -> None:
    """`device=` names a device torch knows; `dtype=` is a real floating dtype (parameters need one)."""
    if name == "dtype":
        if not isinstance(value, torch.dtype) or not value.is_floating_point:
            raise TypeError(f"{who}: dtype must be a floating-point torch.dtype such as torch.float32, "
                            f"got {type(value).__name__} {value!r}")
        return
    if isinstance(value, bool) or not isinstance(value, (torch.device, str, int)):
        raise TypeError(f"{who}: device must be a torch.device, a str or an int, got {type(value).__name__} "
                        f"{value!r}")
    try:
        torch.device(value)
    except RuntimeError as err:
        raise ValueError(f"{who}: device={value!r} names no device torch knows ({err})") from None


def _unknown_keywords(who: str, signature: inspect.Signature, kwargs: dict) -> str | None:
    """Keywords the class does not take, with the names it does: Python names a missing argument
    first, so `create("MultiHeadAttention", d_model=64)` said only "missing 'dim'". Where the seed's or
    a foreign class of the same name in `attnzoo.compat` takes them, it is named too."""
    params = signature.parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    unknown = [name for name in kwargs if name not in params]
    if not unknown:
        return None
    takes = ", ".join(name for name in list(params)[1:])
    named = f"an unexpected keyword argument {unknown[0]!r}" if len(unknown) == 1 else (
        f"unexpected keyword arguments {', '.join(map(repr, unknown))}")
    text = f"got {named}; it takes {takes}"
    import attnzoo.compat  # noqa: PLC0415  # imports every mechanism: only on this error path

    other = getattr(attnzoo.compat, who, None)
    if isinstance(other, type) and all(name in inspect.signature(other).parameters for name in unknown):
        text += f" (attnzoo.compat.{who}, the seed's or source's class of this name, takes them)"
    return text
