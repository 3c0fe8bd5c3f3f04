"""Network surgery: put attention into an existing model, swap modules for attention, find attention.

``insert`` and ``replace`` infer the channel count and the layout at each selected place, from one
traced forward of an ``example_input`` or, when obvious, from the module's attributes
(``out_channels``, ``num_features``, ``out_features``, ``normalized_shape``). Every place gets its
own new module. The model's existing parameters keep their values and their state_dict keys:

- a place inside an ``nn.Sequential`` gets the attention as a named sibling right after (or
  before) it, so ``layer1.0`` stays ``layer1.0`` and the new module is ``layer1.0_attn``
  (indexing such a Sequential by position now counts the new module too);
- any other place keeps its module and runs the attention in a forward hook; the attention is
  registered beside it on the parent as ``<name>_attn``, so it is in ``parameters()``,
  ``state_dict()`` and ``print(model)``.

With ``example_input`` the model is run once after surgery; an inserted module that would change
a shape raises ``ValueError`` naming the place, the expected and the produced shape.
"""

from __future__ import annotations

import copy
import difflib
import functools
import inspect
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from attnzoo._build import channel_kwargs as _channel_kwargs
from attnzoo._checks import format_shape
from attnzoo._registry import Spec, get_spec, list_modules

__all__ = ["insert", "replace", "find", "LayoutAdapter", "FoundAttention", "select"]

Where = str | type | Callable[[str, nn.Module], bool] | Iterable[str]
AttentionArg = str | Callable[[int], nn.Module] | nn.Module

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


# ---------------------------------------------------------------------------------------------
# Selecting places


def _glob_match(pattern: str, name: str) -> bool:
    """Match a qualified name segment by segment: ``*`` stays inside one segment, ``**`` spans any."""
    import fnmatch

    def match(pat: list[str], parts: list[str]) -> bool:
        if not pat:
            return not parts
        if pat[0] == "**":
            return any(match(pat[1:], parts[i:]) for i in range(len(parts) + 1))
        return bool(parts) and fnmatch.fnmatchcase(parts[0], pat[0]) and match(pat[1:], parts[1:])

    return match(pattern.split("."), name.split("."))


def select(model: nn.Module, where: Where) -> list[str]:
    """Qualified names of the sub-modules ``where`` selects (the root itself is never selected).

    ``where`` is a glob over qualified names (``"layer4.*.conv2"``, ``"layer*"``; ``*`` matches
    within one dotted segment, ``**`` any number of segments), a list of exact names, a module type,
    or a predicate ``(name, module) -> bool``. Raises ``ValueError`` listing similar names when
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


def _trace(model: nn.Module, sites: list[_Site], example_input: Any) -> None:
    """One forward of ``example_input`` recording each site's input and output shapes and calls."""
    handles = []
    for site in sites:

        def hook(module: nn.Module, args: tuple[Any, ...], output: Any, site: _Site = site) -> None:
            site.calls += 1
            first = args[0] if args else None
            site.shape_in = tuple(first.shape) if isinstance(first, Tensor) else None
            site.shape_out = tuple(output.shape) if isinstance(output, Tensor) else None

        handles.append(site.module.register_forward_hook(hook))
    try:
        _dry_run(model, example_input)
    finally:
        for handle in handles:
            handle.remove()


def _dry_run(model: nn.Module, example_input: Any) -> None:
    """One forward in eval mode without gradients; the model's training flag is restored."""
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            _call(model, example_input)
    finally:
        model.train(was_training)


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


def _layout_of(shape: tuple[int, ...]) -> str:
    # A CNN's 4-D maps are NCHW, 5-D NCTHW; a 3-D tensor is taken as a token sequence (B, L, C).
    return {4: "NCHW", 5: "NCTHW", 3: "NLC"}.get(len(shape), "")


def _channels(shape: tuple[int, ...], layout: str) -> int:
    return shape[-1] if layout == "NLC" else shape[1]


# ---------------------------------------------------------------------------------------------
# Building one attention module for one place


class LayoutAdapter(nn.Module):
    """Runs a module that wants another layout on this network's layout, and back.

    ``NCHW -> NHWC`` permutes; ``NCHW -> NLC`` flattens the map into ``(B, H*W, C)`` tokens.

    Shape:
        - Input: ``(B, C, H, W)``; output: the wrapped module's output in ``(B, C, H, W)``.
    """

    def __init__(self, module: nn.Module, outer: str, inner: str) -> None:
        super().__init__()
        if (outer, inner) not in (("NCHW", "NHWC"), ("NCHW", "NLC")):
            raise ValueError(f"LayoutAdapter supports NCHW -> NHWC or NLC, got {outer} -> {inner}")
        self.module = module
        self.outer, self.inner = outer, inner

    def forward(self, x: Tensor) -> Tensor:
        """Move channels last for the wrapped module and back: ``(B, C, H, W) -> (B, C, H, W)``."""
        b, c, h, w = x.shape
        y = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        if self.inner == "NLC":
            y = self.module(y.reshape(b, h * w, c)).reshape(b, h, w, -1)  # (B, H*W, C) -> (B, H, W, C)
        else:
            y = self.module(y)
        return y.permute(0, 3, 1, 2)  # (B, C, H, W)

    def extra_repr(self) -> str:
        return f"{self.outer} -> {self.inner}"


def _build(
    attention: AttentionArg, channels: int, outer: str, kwargs: dict[str, Any], place: str
) -> nn.Module:
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
    args = {**_channel_kwargs(spec.cls, channels), **kwargs}
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
    if inner == outer:
        return module
    if outer == "NCHW" and inner in ("NHWC", "NLC"):
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
    y = attention(x)
    if isinstance(y, tuple):
        y = y[0]
    if not isinstance(y, Tensor) or y.shape != x.shape:
        got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"the {what} at {place} expects to keep the shape {tuple(x.shape)}, produced {got}")
    return y


def _attach(model: nn.Module, name: str, attention: nn.Module, position: str, what: str) -> str:
    """Wire ``attention`` after/before the sub-module ``name``; return the new module's name."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    new_child = f"{child}_attn"
    if isinstance(parent, nn.Sequential):
        entries = list(parent._modules.items())
        if new_child in parent._modules:
            raise ValueError(f"{name} already has an inserted module {parent_name}.{new_child}")
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


class _SequentialGuard(nn.Module):
    """The attention placed in a Sequential, checking that it keeps the shape it is given.

    Its only child is ``attention``, so the state_dict keys are ``<name>_attn.attention.*``.
    """

    def __init__(self, attention: nn.Module, place: str, what: str) -> None:
        super().__init__()
        self.attention = attention
        self.place, self.what = place, what

    def forward(self, x: Tensor) -> Tensor:
        """Run the inserted attention, naming its place in the model when the input does not fit."""
        return _guarded(self.attention, x, self.place, self.what)


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


def _describe(attention: AttentionArg) -> str:
    if isinstance(attention, str):
        return f"attention {attention!r}"
    return f"attention {getattr(attention, '__name__', type(attention).__name__)}"


def _site_shape(site: _Site, use_input: bool) -> tuple[int, str]:
    shape = site.shape_in if use_input else site.shape_out
    if shape is not None:
        layout = _layout_of(shape)
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
    """Run the edited model once on ``example_input`` (when given), so a shape mismatch shows now."""
    if example_input is not None:
        _dry_run(model, example_input)


def insert(
    model: nn.Module,
    attention: AttentionArg,
    where: Where,
    *,
    position: str = "after",
    example_input: Any = None,
    **kwargs: Any,
) -> list[str]:
    """Put a new attention module after (or before) every sub-module ``where`` selects.

    Args:
        model: The network, changed in place.
        attention: A registry name (``"cbam"``, ``"bra"``, a seed name), a factory called as
            ``factory(channels, **kwargs)``, or a module (deep-copied for every place).
        where: What to select: a glob over qualified names (``"layer*.*"``), a list of names, a
            module type, or a predicate ``(name, module) -> bool``.
        position: ``"after"`` (default) or ``"before"`` the selected module.
        example_input: An input for ``model`` (a tensor, a tuple of positional inputs, or a dict of
            keyword inputs). With it, channels and layout are measured by one forward and the
            model is checked after surgery; without it they come from obvious attributes.
        **kwargs: More constructor arguments for the attention (``reduction=8``, ``n_win=7``).

    Returns:
        The qualified names of the new modules.

    Example:
        >>> x = torch.randn(1, 3, 224, 224)
        >>> names = attnzoo.insert(resnet, "cbam", where="layer*.*", example_input=x)
    """
    if position not in ("after", "before"):
        raise ValueError(f"insert: position must be 'after' or 'before', got {position!r}")
    sites = _sites(model, where, example_input)
    what = f"{_describe(attention)} inserted {position}"
    built = []
    for site in sites:
        channels, layout = _site_shape(site, use_input=position == "before")
        built.append((site, _build(attention, channels, layout, dict(kwargs), site.name)))
    # Attach only once every place built, so a bad argument leaves the model untouched.
    names = [_attach(model, site.name, module, position, what) for site, module in built]
    _verify(model, example_input)
    return names


def replace(
    model: nn.Module,
    where: Where,
    attention: AttentionArg,
    *,
    example_input: Any = None,
    **kwargs: Any,
) -> list[str]:
    """Swap every sub-module ``where`` selects for a new attention module, inferring its channels.

    The replaced modules must keep the shape of what flows through them (attention modules do).
    A module that wants NHWC (BiLevelRoutingAttention) on an NCHW network gets ``layout="nchw"`` or a
    :class:`LayoutAdapter`.

    Args:
        model: The network, changed in place.
        where: As for :func:`insert`.
        attention: As for :func:`insert`.
        example_input: As for :func:`insert`; without it the channels come from the replaced
            module's attributes (``channels``, ``num_features``, ``dim`` ...).
        **kwargs: More constructor arguments for the attention.

    Returns:
        The qualified names of the replaced places.

    Example:
        >>> attnzoo.replace(model, "space_attention", "bra", n_win=7, topk=4, example_input=x)
    """
    sites = _sites(model, where, example_input)
    built = []
    for site in sites:
        if site.shape_in is not None and site.shape_out is not None and site.shape_in != site.shape_out:
            raise ValueError(
                f"{site.name} maps {format_shape(site.shape_in)} to {format_shape(site.shape_out)}; replace "
                f"swaps shape-keeping modules only (use insert to add attention beside it)"
            )
        if site.shape_in is None:
            guess = _replaced_channels(site.module)
            if guess is None:
                raise ValueError(f"cannot infer the channels of {site.name} ({type(site.module).__name__}); "
                                 f"pass example_input=")
            site.shape_in = guess
        channels, layout = _site_shape(site, use_input=True)
        built.append((site, _build(attention, channels, layout, dict(kwargs), site.name)))
    for site, module in built:
        parent_name, _, child = site.name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module)
    _verify(model, example_input)
    return [site.name for site, _ in built]


def _replaced_channels(module: nn.Module) -> tuple[int, ...] | None:
    for attr in ("channels", "in_channels", "num_features", "dim", "channel", "in_planes"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return (1, value, 1, 1)
    first = next((m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear))), None)
    if isinstance(first, nn.Conv2d):
        return (1, first.in_channels, 1, 1)
    if isinstance(first, nn.BatchNorm2d):
        return (1, first.num_features, 1, 1)
    return None


# ---------------------------------------------------------------------------------------------
# Finding attention in a model

# Third-party attention classes recognised by name (timm, torchvision, torch).
_THIRD_PARTY = {
    "SEModule": "channel gate (timm)",
    "EffectiveSEModule": "channel gate (timm)",
    "SqueezeExcite": "channel gate (timm)",
    "SqueezeExcitation": "channel gate (torchvision)",
    "EcaModule": "channel gate (timm)",
    "CbamModule": "channel + spatial gate (timm)",
    "LightCbamModule": "channel + spatial gate (timm)",
    "SelectiveKernel": "selective kernel (timm)",
    "NonLocalAttn": "non-local (timm)",
    "GlobalContext": "global context (timm)",
    "MultiheadAttention": "multi-head attention (torch)",
    "Attention": "multi-head self-attention (timm)",
    "WindowAttention": "window attention (timm)",
}


@dataclass
class FoundAttention:
    """One attention module found in a model."""

    name: str
    kind: str
    cls: str
    params: int
    flops: int | None


def _attnzoo_kinds() -> dict[object, Spec]:
    kinds: dict[object, Spec] = {}
    for spec in list_modules():
        kinds[spec.cls] = spec
        if spec.seed_cls is not None:
            kinds[spec.seed_cls] = spec
    return kinds


def find(model: nn.Module, example_input: Any = None) -> list[FoundAttention]:
    """List the attention modules in ``model``: attnzoo's and recognisable third-party ones.

    Nested attention (a CBAM's channel gate inside the CBAM) is reported once, at the outermost
    module. With ``example_input``, each module's FLOPs are counted on the inputs it receives in one
    forward (attention on the math path, so fused kernels are counted); otherwise ``flops`` is None.
    """
    kinds = _attnzoo_kinds()
    found: list[tuple[str, nn.Module, str]] = []
    covered: list[str] = []
    for name, module in model.named_modules():
        if any(name == c or name.startswith(c + ".") for c in covered):
            continue
        spec = kinds.get(type(module))
        if spec is not None:
            kind = f"{spec.name} ({spec.family})"
        elif type(module).__name__ in _THIRD_PARTY and module is not model:
            kind = _THIRD_PARTY[type(module).__name__]
        else:
            continue
        found.append((name, module, kind))
        covered.append(name)
    modules = [m for _, m, _ in found]
    flops = _flops_per_module(model, modules, example_input) if example_input is not None else {}
    return [
        FoundAttention(name, kind, type(m).__name__, sum(p.numel() for p in m.parameters()), flops.get(id(m)))
        for name, m, kind in found
    ]


def _flops_per_module(model: nn.Module, modules: list[nn.Module], example_input: Any) -> dict[int, int]:
    from attnzoo.benchmark import count_flops

    captured: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = {}
    handles = [
        m.register_forward_pre_hook(
            lambda mod, args, kw: captured.setdefault(id(mod), (args, kw)) and None, with_kwargs=True
        )
        for m in modules
    ]
    try:
        _verify(model, example_input)
    finally:
        for h in handles:
            h.remove()
    result = {}
    for m in modules:
        if id(m) in captured:
            args, kw = captured[id(m)]
            with torch.no_grad():
                result[id(m)] = count_flops(functools.partial(m, *args, **kw))
    return result
