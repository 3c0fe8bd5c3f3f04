"""Building one attention module for one place: layout adapters and the guards that check shapes."""

from __future__ import annotations

import copy
import inspect
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from attnzoo._fx import fx_leaf
from attnzoo._registry import WIDTH_NAMES, get_spec
from attnzoo.surgery.places import CHANNELS_LAST

__all__ = ["AttentionArg", "LayoutAdapter", "build_for_place", "channel_kwargs"]

AttentionArg = str | Callable[[int], nn.Module] | nn.Module

# ---------------------------------------------------------------------------------------------
# Building one attention module for one place


@fx_leaf  # one call_module node in FX traces (attnzoo._fx)
class LayoutAdapter(nn.Module):
    """Runs a module that wants another layout on this network's layout, and back.

    The network's maps are `NCHW` (a CNN) or `NHWC` (Swin's stages); the module takes `NCHW`, `NHWC`
    or `NLC` (the map flattened into `(B, H*W, C)` tokens).

    Shape:
        - Input: a map in the `outer` layout; output: the wrapped module's output in the same layout.
    """

    _OUTER = ("NCHW", "NHWC")
    _INNER = ("NCHW", "NHWC", "NLC")

    def __init__(self, module: nn.Module, outer: str, inner: str) -> None:
        super().__init__()
        if outer not in self._OUTER or inner not in self._INNER or outer == inner:
            raise ValueError(f"LayoutAdapter supports NCHW or NHWC -> another of NCHW, NHWC, NLC, "
                             f"got {outer} -> {inner}")
        self.module = module
        self.outer, self.inner = outer, inner

    def forward(self, x: Tensor) -> Tensor:
        """Move the map into the module's layout and back (through channels-last `(B, H, W, C)`)."""
        y = x.permute(0, 2, 3, 1) if self.outer == "NCHW" else x  # (B, H, W, C)
        b, h, w, c = y.shape
        if self.inner == "NLC":
            y = self.module(y.reshape(b, h * w, c)).reshape(b, h, w, -1)  # (B, H*W, C) -> (B, H, W, C)
        elif self.inner == "NCHW":
            y = self.module(y.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        else:
            y = self.module(y)
        return y.permute(0, 3, 1, 2) if self.outer == "NCHW" else y

    def extra_repr(self) -> str:
        return f"{self.outer} -> {self.inner}"


def _fitting_kwargs(spec: Any, channels: int, shape: tuple[int, ...] | None, outer: str) -> dict[str, Any]:
    """Constructor arguments that fit a map of `shape` (`outer` layout, `channels` wide), or none where it
    has no such reading (the module's own check then says why it cannot take the place)."""
    from attnzoo._geometry import Geometry, Unsupported
    from attnzoo.surgery.build import constructor_kwargs  # lazy: build imports this module

    if shape is None:
        return {}
    spatial = shape[1:-1] if outer in CHANNELS_LAST else shape[2:]  # between batch and channels, or after
    try:
        return constructor_kwargs(spec, Geometry(shape[0], channels, tuple(spatial)))
    except Unsupported:
        return {}


def channel_kwargs(cls: type[nn.Module], channels: int) -> dict[str, int]:
    """Constructor arguments that fix the channel count: the width (first argument, named by the
    vocabulary: `channels`, `dim` or `query_dim`) and `out_channels` where the class has it."""
    params = [p for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"]
    if not params or params[0].name not in WIDTH_NAMES:
        return {}
    kwargs = {params[0].name: channels}
    if any(p.name == "out_channels" for p in params):
        kwargs["out_channels"] = channels
    return kwargs


def build_for_place(
    attention: AttentionArg, channels: int, outer: str, kwargs: dict[str, Any], place: str,
    like: tuple[nn.Module, ...] = (), shape: tuple[int, ...] | None = None,
) -> nn.Module:
    """The attention for one place; one built from a registry name takes the device and dtype of the
    first of `like` that has floating tensors (the selected module, then the model). With the place's
    measured `shape` (in the `outer` layout), a registry name also gets the arguments that fit that
    map (windows, regions, tables, token counts: `attnzoo.surgery.build.constructor_kwargs`), below
    the caller's own `kwargs`."""
    if isinstance(attention, nn.Module):
        if kwargs:
            raise ValueError(
                f"keyword arguments {sorted(kwargs)} need a registry name or a factory, not a module"
            )
        return copy.deepcopy(attention)
    if callable(attention) and not isinstance(attention, str):
        module = attention(channels, **kwargs)
        if not isinstance(module, nn.Module):
            raise TypeError(f"the attention factory returned {type(module).__name__}, not an nn.Module")
        return module
    spec = get_spec(attention)
    if spec.layout == "SEQ2SEQ":
        raise ValueError(
            f"{spec.name!r} scores a query against keys; it has no place inside a feed-forward network"
        )
    args = {**channel_kwargs(spec.cls, channels), **_fitting_kwargs(spec, channels, shape, outer), **kwargs}
    inner = spec.layout
    layout_param = inspect.signature(spec.cls.__init__).parameters.get("layout")
    if inner == "NHWC" and outer == "NCHW" and layout_param is not None:
        # Spell it as the class does: BiFormer takes "nchw", ShiftedWindowAttention "NCHW".
        default = layout_param.default if isinstance(layout_param.default, str) else "nhwc"
        args.setdefault("layout", "NCHW" if default.isupper() else "nchw")
        inner = "NCHW" if str(args["layout"]).upper() == "NCHW" else "NHWC"
    try:
        module = spec.cls(**args)
    except TypeError as err:
        raise TypeError(
            f"cannot build {spec.name!r} for {place} ({channels} channels) with {args}: {err}"
        ) from err
    from attnzoo.convert._timm_common import factory  # lazy: attnzoo.convert imports the families

    # a float64 or CUDA model gets its attention there too
    placement = next((found for found in map(factory, like) if found), None)
    if placement is not None:
        module = module.to(**placement)
    if inner == outer:
        return module
    if outer in LayoutAdapter._OUTER and inner in LayoutAdapter._INNER:
        return LayoutAdapter(module, outer, inner)
    raise ValueError(f"{spec.name!r} takes {inner} input but {place} carries {outer} tensors")


class _ShapeGuard:
    """Forward hook that runs the attention on a place's output and checks it kept the shape."""

    def __init__(self, attention: nn.Module, place: str, what: str) -> None:
        self.attention = attention
        self.place = place
        self.what = what

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Tensor:
        return _guarded(self.attention, output, self.place, self.what)


class _ShapeGuardBefore(_ShapeGuard):
    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:  # type: ignore[override]
        return (_guarded(self.attention, args[0], self.place, self.what), *args[1:])


def _guarded(attention: nn.Module, x: Tensor, place: str, what: str) -> Tensor:
    return _kept(x, attention(x), place, what)


def _kept(x: Tensor, y: Any, place: str, what: str) -> Tensor:
    """`y` (the first of a tuple) when it has `x`'s shape; a `ValueError` naming the place otherwise."""
    if isinstance(y, tuple):
        y = y[0]
    if not isinstance(y, Tensor) or y.shape != x.shape:
        got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"the {what} at {place} expects to keep the shape {tuple(x.shape)}, produced {got}")
    return y


def _attach(model: nn.Module, name: str, attention: nn.Module, position: str, what: str) -> str:
    """Wire `attention` after/before the sub-module `name`; return the new module's name."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    new_child = f"{child}_attn"
    if isinstance(parent, nn.Sequential):
        entries = list(parent._modules.items())
        if new_child in parent._modules:
            where = f"{parent_name}.{new_child}" if parent_name else new_child
            raise ValueError(f"{name} already has an inserted module {where} (selected twice?)")
        wrapped = _SequentialGuard(attention, name, what)
        rebuilt: OrderedDict[str, nn.Module | None] = OrderedDict()
        for key, mod in entries:
            if key == child and position == "before":
                rebuilt[new_child] = wrapped
            rebuilt[key] = mod
            if key == child and position == "after":
                rebuilt[new_child] = wrapped
        parent._modules = rebuilt  # type: ignore[assignment]
        return f"{parent_name}.{new_child}" if parent_name else new_child
    if isinstance(parent, (nn.ModuleList, nn.ModuleDict)):
        raise ValueError(
            f"{name} sits in a {type(parent).__name__}, whose owner iterates it; select the owner's "
            f"module instead, or the list's elements' sub-modules"
        )
    if hasattr(parent, new_child):
        raise ValueError(f"{name} already has an attribute {new_child!r}")
    parent.add_module(new_child, attention)
    target = parent.get_submodule(child)
    if position == "after":
        target.register_forward_hook(_ShapeGuard(attention, name, what))
    else:
        target.register_forward_pre_hook(_ShapeGuardBefore(attention, name, what))
    return f"{parent_name}.{new_child}" if parent_name else new_child


@fx_leaf  # one call_module node in FX traces (attnzoo._fx)
class _SequentialGuard(nn.Module):
    """The attention placed in a Sequential, checking that it keeps the shape it is given.

    Its only child is `attention`, so the state_dict keys are `<name>_attn.attention.*`.
    """

    def __init__(self, attention: nn.Module, place: str, what: str) -> None:
        super().__init__()
        self.attention = attention
        self.place, self.what = place, what

    def forward(self, x: Tensor) -> Tensor:
        """Run the inserted attention, naming its place in the model when the input does not fit."""
        return _guarded(self.attention, x, self.place, self.what)


def _describe(attention: AttentionArg) -> str:
    if isinstance(attention, str):
        return f"attention {attention!r}"
    return f"attention {getattr(attention, '__name__', type(attention).__name__)}"

