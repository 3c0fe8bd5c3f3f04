"""Helpers shared by the timm converters (`attnzoo.convert.timm_*`)."""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["dotted", "refuse", "factory", "same_forward"]


def dotted(cls: type) -> str:
    """`module.QualName` of a class: the key of the converter tables (timm is never imported)."""
    return f"{cls.__module__}.{cls.__qualname__}"


def refuse(module: Any, reason: str) -> TypeError:
    return TypeError(f"from_timm cannot convert {type(module).__qualname__}: {reason}")


def factory(module: nn.Module) -> dict[str, Any]:
    """The device and dtype of a module's first floating parameter or buffer."""
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.is_floating_point():
            return {"device": tensor.device, "dtype": tensor.dtype}
    return {}


def same_forward(module: Any, cls: type) -> None:
    """Refuse a subclass of a known timm class that overrides its forward."""
    for base in type(module).__mro__:
        if "forward" in vars(base):
            if base is not cls:
                raise refuse(module, f"it overrides forward ({base.__qualname__}.forward)")
            return
