"""The converter table: foreign class -> function that turns one of its instances into an attnzoo module.

A converter takes the foreign module and returns an attnzoo module holding the same weights, on the same
device and dtype, in the same training mode, whose output equals the foreign module's; it raises
``TypeError`` naming the class and the reason when it cannot represent a module. Keys are classes, or
dotted names (``"timm.layers.attention.Attention"``) for classes of optional packages, so registering
imports nothing. A module is looked up along its class's MRO, so a subclass reaches its base's
converter, which then decides whether it can represent it.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

__all__ = [
    "Converter", "register", "converter_for", "known", "convert", "register_in_place",
    "in_place_converter_for", "refuse_converted_inside", "unknown_class_hint",
]

Converter = Callable[[nn.Module], nn.Module]

_TABLE: dict[type | str, Converter] = {}
# Foreign classes whose converted module is called differently (other arguments, another layout,
# another return value): `attnzoo.replace` swaps in what these converters give (called as the foreign
# class is) instead.
_IN_PLACE: dict[type | str, Converter] = {}


def _dotted(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register(foreign: type | str, converter: Converter) -> None:
    """Make ``converter`` the converter of ``foreign`` (a class or its dotted name); a later call wins."""
    if not isinstance(foreign, (type, str)):
        raise TypeError(
            f"register expects foreign to be a class or a dotted name, got {type(foreign).__name__}"
        )
    if not callable(converter):
        raise TypeError(f"register expects converter to be callable, got {type(converter).__name__}")
    _TABLE[foreign] = converter


def converter_for(foreign: type | nn.Module) -> Converter | None:
    """The converter for a class or an instance (looked up along the MRO), or None."""
    cls = foreign if isinstance(foreign, type) else type(foreign)
    for base in cls.__mro__:
        for key in (base, _dotted(base)):
            if key in _TABLE:
                return _TABLE[key]
    return None


def register_in_place(foreign: type | str, converter: Converter) -> None:
    """Make ``converter`` what ``attnzoo.replace(model, foreign)`` swaps in for ``foreign``: the module
    converter's result called as ``foreign`` is (its forward's arguments and return value)."""
    if not isinstance(foreign, (type, str)) or not callable(converter):
        raise TypeError(f"register_in_place expects a class or dotted name and a callable converter, "
                        f"got {type(foreign).__name__}, {type(converter).__name__}")
    _IN_PLACE[foreign] = converter


def in_place_converter_for(foreign: type | nn.Module) -> Converter | None:
    """The converter `replace` uses for a class or instance (along the MRO): its in-place converter
    where one is registered, else its module converter, else None."""
    cls = foreign if isinstance(foreign, type) else type(foreign)
    for base in cls.__mro__:  # the most specific class with either converter wins
        for key in (base, _dotted(base)):
            if key in _IN_PLACE:
                return _IN_PLACE[key]
            if key in _TABLE:
                return _TABLE[key]
    return None


def known() -> list[str]:
    """Dotted names of the classes with a converter, sorted."""
    return sorted(key if isinstance(key, str) else _dotted(key) for key in _TABLE)


def convert(module: nn.Module) -> nn.Module:
    """Convert one foreign module with its registered converter.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``, its class has no converter, or the converter
            cannot represent it.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"convert expects an nn.Module, got {type(module).__name__}")
    converter = converter_for(module)
    if converter is None:
        raise TypeError(f"convert: no converter for {_dotted(type(module))}; "
                        f"{unknown_class_hint([('', module)], 'module')}")
    refuse_converted_inside(module)
    return converter(module)


def refuse_converted_inside(module: nn.Module) -> None:
    """Refuse a foreign module that already holds an attnzoo module (an earlier `replace` converted an
    inner class first): its converter reads the foreign children it expects, so the outer class has to
    be converted first."""
    for path, child in module.named_modules():
        if path and type(child).__module__.startswith("attnzoo."):
            raise TypeError(
                f"cannot convert {type(module).__qualname__}: its submodule {path} is already attnzoo's "
                f"{type(child).__qualname__} (an inner class was converted, or attention inserted, inside "
                f"it first); convert {type(module).__qualname__} before changing what is inside it, or "
                f"start from the original model"
            )


def unknown_class_hint(places: list[tuple[str, nn.Module]], model_name: str) -> str:
    """What to say of a class with no converter: the convertible classes found inside its instances
    ``places`` (name, module) of ``model_name`` and the `attnzoo.replace` call that swaps them (torch's
    ``nn.TransformerEncoderLayer`` keeps its class; its ``nn.MultiheadAttention`` is converted), else
    where the list of convertible classes is."""
    inside: dict[str, list[str]] = {}
    for place, module in places:
        for path, child in module.named_modules():
            if path and converter_for(child) is not None:
                full = f"{place}.{path}" if place else path
                inside.setdefault(_dotted(type(child)), []).append(full)
    listing = f"attnzoo.convert.known() lists the {len(_TABLE)} classes attnzoo.convert knows"
    if not inside:
        return listing
    calls = "; ".join(
        f"attnzoo.replace({model_name}, {cls}) swaps {', '.join(names[:3])}{', ...' * (len(names) > 3)}"
        for cls, names in sorted(inside.items())
    )
    return f"the attention inside it is converted instead: {calls} ({listing})"
