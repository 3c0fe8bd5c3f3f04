"""Selecting places in a model and measuring what flows through them, for insert/replace/find."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from attnzoo._checks import format_shape

__all__ = ["Where", "select"]

Where = str | type | Callable[[str, nn.Module], bool] | Iterable[str]

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)

# ---------------------------------------------------------------------------------------------
# Selecting places


def _glob_match(pattern: str, name: str) -> bool:
    """Match a qualified name segment by segment: `*` stays inside one segment, `**` spans any."""
    import fnmatch

    def match(pat: list[str], parts: list[str]) -> bool:
        if not pat:
            return not parts
        if pat[0] == "**":
            return any(match(pat[1:], parts[i:]) for i in range(len(parts) + 1))
        return bool(parts) and fnmatch.fnmatchcase(parts[0], pat[0]) and match(pat[1:], parts[1:])

    return match(pattern.split("."), name.split("."))


def check_model(model: object, who: str) -> None:
    """`TypeError` unless `model` is an `nn.Module` (before anything walks it)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{who} expects model to be a torch.nn.Module, got {type(model).__name__}")


def select(model: nn.Module, where: Where) -> list[str]:
    """Qualified names of the sub-modules `where` selects (the root itself is never selected).

    `where` is a glob over qualified names (`"layer4.*.conv2"`, `"layer*"`; `*` matches
    within one dotted segment, `**` any number of segments), a list of exact names, a module type,
    or a predicate `(name, module) -> bool`. Raises `ValueError` listing similar names when
    nothing is selected.
    """
    named = [(n, m) for n, m in model.named_modules() if n]
    if isinstance(where, str):
        chosen = [n for n, _ in named if _glob_match(where, n)]
    elif isinstance(where, type):
        chosen = [n for n, m in named if isinstance(m, where)]
    elif callable(where):
        chosen = [n for n, m in named if where(n, m)]
    elif isinstance(where, Iterable):
        wanted = list(where)
        if not all(isinstance(w, str) for w in wanted):
            raise TypeError(f"where: a list must hold qualified names (str), got {wanted!r}")
        names = {n for n, _ in named}
        chosen = [w for w in wanted if w in names]
        missing = [w for w in wanted if w not in names]
        if missing:
            raise ValueError(f"where: no sub-module named {missing[0]!r}{_similar(missing[0], names)}")
    else:
        raise TypeError(f"where must be a glob, a list of names, a module type or a predicate, got {where!r}")
    if not chosen:
        raise ValueError(f"where={where!r} selects no sub-module of {type(model).__name__}"
                         f"{_similar(str(where), [n for n, _ in named])}")
    return chosen


def _similar(name: str, names: Iterable[str]) -> str:
    pool = sorted(set(names))
    close = difflib.get_close_matches(name, pool, n=6, cutoff=0.4)
    if not close:
        close = pool[:6]
    return f"; similar names: {', '.join(close)}" if close else ""


# ---------------------------------------------------------------------------------------------
# What flows through each place


@dataclass
class _Site:
    name: str
    module: nn.Module
    shape_in: tuple[int, ...] | None = None
    shape_out: tuple[int, ...] | None = None
    calls: int = 0
    # The last layout-telling module that ran before its input and before its output (anywhere in the
    # model), by the size of the axis it acts on: ("C", n) for a conv or batch norm (the channels on axis
    # 1), ("last", n) for a linear or layer norm.
    leaf_in: tuple[str, int] | None = None
    leaf_out: tuple[str, int] | None = None


def _trace(model: nn.Module, sites: list[_Site], example_input: Any) -> None:
    """One forward of `example_input` recording each site's input and output shapes and calls."""
    latest: list[tuple[str, int] | None] = [None]  # the last layout-telling module's axis so far

    def leaf(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        latest[0] = _leaf_axis(module)

    # Registered before the sites' hooks, so a site that is such a module itself counts as its own producer.
    handles = [m.register_forward_hook(leaf) for m in model.modules() if _leaf_axis(m) is not None]
    for site in sites:

        def pre(module: nn.Module, args: tuple[Any, ...], site: _Site = site) -> None:
            site.leaf_in = latest[0]

        def hook(module: nn.Module, args: tuple[Any, ...], output: Any, site: _Site = site) -> None:
            site.calls += 1
            first = args[0] if args else None
            site.shape_in = tuple(first.shape) if isinstance(first, Tensor) else None
            site.shape_out = tuple(output.shape) if isinstance(output, Tensor) else None
            site.leaf_out = latest[0]

        handles += [site.module.register_forward_pre_hook(pre), site.module.register_forward_hook(hook)]
    try:
        _dry_run(model, example_input)
    except (RuntimeError, TypeError, ValueError, IndexError) as err:  # the user's model, untouched yet
        raise ValueError(
            f"example_input: the model's own forward fails on it, before any change "
            f"({type(err).__name__}: {err}); give an input the model takes"
        ) from err
    finally:
        for handle in handles:
            handle.remove()


def _leaf_axis(module: nn.Module) -> tuple[str, int] | None:
    """The axis whose size a module's output shows: the channels of a conv or a batch norm (axis 1), the
    features of a linear or a layer norm (the last axis)."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        return "C", module.out_channels
    if isinstance(module, nn.BatchNorm2d):
        return "C", module.num_features
    if isinstance(module, nn.Linear):
        return "last", module.out_features
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        return "last", module.normalized_shape[0]
    return None


def _dry_run(model: nn.Module, example_input: Any) -> None:
    """One forward in eval mode without gradients; every module's training flag is restored as it was (a
    frozen BatchNorm in a training model stays frozen, which `model.train(was_training)` would undo)."""
    flags = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            _call(model, example_input)
    finally:
        for module, training in flags:
            module.training = training


def _call(model: nn.Module, example_input: Any) -> Any:
    if isinstance(example_input, (tuple, list)):
        return model(*example_input)
    if isinstance(example_input, dict):
        return model(**example_input)
    return model(example_input)


def _shape_from_attributes(module: nn.Module) -> tuple[int, str] | None:
    """(channels, layout) of a module's output when its attributes make it obvious."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        return module.out_channels, "NCHW"
    if isinstance(module, nn.BatchNorm2d):
        return module.num_features, "NCHW"
    if isinstance(module, (nn.Conv1d, nn.BatchNorm1d)) and not isinstance(module, nn.BatchNorm2d):
        size = module.out_channels if isinstance(module, nn.Conv1d) else module.num_features
        return size, "NCL"
    if isinstance(module, nn.Conv3d):
        return module.out_channels, "NCTHW"
    if isinstance(module, nn.Linear):
        return module.out_features, "NLC"
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        return module.normalized_shape[0], "NLC"
    return None


def _layout_of(shape: tuple[int, ...], leaf: tuple[str, int] | None = None) -> str:
    # A CNN's 4-D maps are NCHW, 5-D NCTHW; a 3-D tensor is taken as a token sequence (B, L, C). A 4-D map
    # made last by a linear or a layer norm whose features are its last axis (and not axis 1) is
    # channels-last, as in Swin's stages: taken as NCHW, its height would pass for the channels.
    if len(shape) == 4 and leaf is not None and leaf[0] == "last" and shape[-1] == leaf[1] != shape[1]:
        return "NHWC"
    return {4: "NCHW", 5: "NCTHW", 3: "NLC"}.get(len(shape), "")


CHANNELS_LAST = ("NLC", "NHWC")  # the layouts a place's tensor can have with its channels last


def _channels(shape: tuple[int, ...], layout: str) -> int:
    return shape[-1] if layout in CHANNELS_LAST else shape[1]


def _sites(model: nn.Module, where: Where, example_input: Any) -> list[_Site]:
    sites = [_Site(n, model.get_submodule(n)) for n in select(model, where)]
    if example_input is not None:
        _trace(model, sites, example_input)
        never = [s.name for s in sites if s.calls == 0]
        if never:
            raise ValueError(f"{never[0]} is selected but does not run in the example forward")
        repeated = [s for s in sites if s.calls > 1]
        if repeated:
            s = repeated[0]
            raise ValueError(
                f"{s.name} runs {s.calls} times per forward (a shared module); one inserted module would "
                f"serve every call: select a module that runs once"
            )
    return sites


def _site_shape(site: _Site, use_input: bool) -> tuple[int, str]:
    shape = site.shape_in if use_input else site.shape_out
    if shape is not None:
        layout = _layout_of(shape, site.leaf_in if use_input else site.leaf_out)
        if isinstance(site.module, (nn.Conv1d, nn.BatchNorm1d)) and len(shape) == 3:
            layout = "NCL"
        if not layout:
            raise ValueError(f"{site.name} carries a tensor of shape {format_shape(shape)}; attnzoo inserts "
                             f"attention on (B, C, H, W), (B, C, T, H, W), (B, C, L) or (B, L, C) tensors")
        return _channels(shape, layout), layout
    guess = _shape_from_attributes(site.module)
    if guess is None:
        raise ValueError(
            f"cannot infer the channels at {site.name} ({type(site.module).__name__}) from its attributes; "
            f"pass example_input= so one forward can measure them"
        )
    return guess


def _verify(model: nn.Module, example_input: Any) -> None:
    """Run the edited model once on `example_input` (when given), so a shape mismatch shows now."""
    if example_input is not None:
        _dry_run(model, example_input)

