"""Network surgery: put attention into an existing model, swap modules for attention, find attention.

`insert` and `replace` infer the channel count and the layout at each selected place, from one
traced forward of an `example_input` or, when obvious, from the module's attributes
(`out_channels`, `num_features`, `out_features`, `normalized_shape`). Every place gets its
own new module. The model's existing parameters keep their values and their state_dict keys:

- a place inside an `nn.Sequential` gets the attention as a named sibling right after (or
  before) it, so `layer1.0` stays `layer1.0` and the new module is `layer1.0_attn`
  (indexing such a Sequential by position now counts the new module too);
- any other place keeps its module and runs the attention in a forward hook; the attention is
  registered beside it on the parent as `<name>_attn`, so it is in `parameters()`,
  `state_dict()` and `print(model)`.

With `example_input` the model is run once after surgery; an inserted module that would change
a shape raises `ValueError` naming the place, the expected and the produced shape.
"""


import importlib
from typing import Any

import torch
from torch import nn

from attnzoo._checks import format_shape
from attnzoo.surgery.adapters import AttentionArg, _attach, _describe, _kept, build_for_place
from attnzoo.surgery.places import Where, _Site, _site_shape, _sites, _verify, check_model
from attnzoo.surgery.rollback import undo_on_error

__all__ = ["insert", "replace"]


def insert(
    model: nn.Module,
    attention: AttentionArg,
    where: Where,
    *,
    position: str = "after",
    example_input: Any = None,
    **kwargs: Any,
) -> list[str]:
    """Put a new attention module after (or before) every sub-module `where` selects.

    Args:
        model: The network, changed in place.
        attention: A registry name (`"cbam"`, `"bra"`, a seed name), a factory called as
            `factory(channels, **kwargs)`, or a module (deep-copied for every place).
        where: What to select: a glob over qualified names (`"layer*.*"`), a list of names, a
            module type, or a predicate `(name, module) -> bool`.
        position: `"after"` (default) or `"before"` the selected module.
        example_input: An input for `model` (a tensor, a tuple of positional inputs, or a dict of
            keyword inputs). With it, channels and layout are measured by one forward and the
            model is checked after surgery; without it they come from obvious attributes.
        **kwargs: More constructor arguments for the attention (`reduction=8`, `n_win=7`).

    Returns:
        The qualified names of the new modules.

    Example:
        ```python
        >>> import torch, attnzoo
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3))
        >>> x = torch.randn(1, 3, 32, 32)
        >>> attnzoo.insert(net, "cbam", where="0", example_input=x)  # CBAM after the first conv
        ['0_attn']
        >>> net(x).shape
        torch.Size([1, 32, 30, 30])

        On a torchvision ResNet, `where="layer*.*"` puts one after every residual block.
        ```
    """
    check_model(model, "insert")
    if position not in ("after", "before"):
        raise ValueError(f"insert: position must be 'after' or 'before', got {position!r}")
    sites = _sites(model, where, example_input)
    what = f"{_describe(attention)} inserted {position} the module"
    built = []
    for site in sites:
        channels, layout = _site_shape(site, use_input=position == "before")
        shape = site.shape_in if position == "before" else site.shape_out
        module = build_for_place(attention, channels, layout, dict(kwargs), site.name,
                                 like=(site.module, model), shape=shape)
        _fits_place(site, module, shape, "insert", what)
        built.append((site, module))
    # Attach only once every place built; a place that fails to attach, or a failing check forward,
    # undoes every change, so an error leaves the model as it was.
    with undo_on_error(model, "insert"):
        names = [_attach(model, site.name, module, position, what) for site, module in built]
        _verify(model, example_input)
    return names


def replace(
    model: nn.Module,
    where: Where,
    attention: AttentionArg | None = None,
    *,
    example_input: Any = None,
    **kwargs: Any,
) -> list[str]:
    """Swap every sub-module `where` selects for a new attention module, inferring its channels.

    The replaced modules must keep the shape of what flows through them (attention modules do).
    A module that wants NHWC (BiLevelRoutingAttention) on an NCHW network gets `layout="nchw"` or a
    `LayoutAdapter`.

    Without ``attention``, ``where`` must be a foreign class that `attnzoo.convert` knows
    (``torch.nn.MultiheadAttention``, ...): every instance is converted with its weights and swapped in
    place, so the model's output is unchanged and ``attnzoo.capture_maps`` now sees its attention. A
    model with no instance left is returned as it is, with ``[]`` (so a second call changes nothing),
    where a pattern that selects nothing is an error.

    Args:
        model: The network, changed in place.
        where: As for `insert`; or, without ``attention``, a class `attnzoo.convert` knows (or its
            dotted name, as `attnzoo.convert.known()` lists it).
        attention: As for `insert`. Default: None (convert the instances of ``where``).
        example_input: As for `insert`; without it the channels come from the replaced
            module's attributes (``channels``, ``num_features``, ``dim`` ...).
        **kwargs: More constructor arguments for the attention.

    Returns:
        The qualified names of the replaced places.

    Example:
        ```python
        >>> import torch, attnzoo
        >>> from torch import nn
        >>> model = nn.Sequential()
        >>> model.add_module("conv", nn.Conv2d(3, 64, 3, padding=1))
        >>> model.add_module("space_attention", nn.Identity())  # a placeholder to swap
        >>> x = torch.randn(1, 3, 28, 28)
        >>> attnzoo.replace(model, "space_attention", "bra", n_win=7, topk=4, example_input=x)
        ['space_attention']
        >>> layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, batch_first=True)
        >>> encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
        >>> tokens = torch.randn(2, 5, 16)
        >>> before = encoder(tokens)
        >>> attnzoo.replace(encoder, torch.nn.MultiheadAttention)  # same weights, same output
        ['layers.0.self_attn', 'layers.1.self_attn']
        >>> torch.allclose(encoder(tokens), before, atol=1e-6)
        True

        ```
    """
    check_model(model, "replace")
    if attention is None:
        return _convert_instances(model, where, example_input, kwargs)
    sites = _sites(model, where, example_input)
    built = []
    for site in sites:
        if site.shape_in is not None and site.shape_out is not None and site.shape_in != site.shape_out:
            raise ValueError(
                f"{site.name} maps {format_shape(site.shape_in)} to {format_shape(site.shape_out)}; replace "
                f"swaps shape-keeping modules only (use insert to add attention beside it)"
            )
        measured = site.shape_in  # None without example_input: then the guess below is no map to fit
        if site.shape_in is None:
            guess = _replaced_channels(site.module)
            if guess is None:
                raise ValueError(f"cannot infer the channels of {site.name} ({type(site.module).__name__}); "
                                 f"pass example_input=")
            site.shape_in = guess
        channels, layout = _site_shape(site, use_input=True)
        module = build_for_place(attention, channels, layout, dict(kwargs), site.name,
                                 like=(site.module, model), shape=measured)
        _fits_place(site, module, measured if site.shape_out is not None else None, "replace",
                    f"{_describe(attention)} replacing it")
        built.append((site, module))
    with undo_on_error(model, "replace"):
        for site, module in built:
            parent_name, _, child = site.name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module)
        _verify(model, example_input)
    return [site.name for site, _ in built]


def _fits_place(site: _Site, module: nn.Module, shape: tuple[int, ...] | None, who: str, what: str) -> None:
    """With a measured place, run the new module alone on a tensor of the shape it will get there (eval, no
    gradients), so one that refuses that tensor or changes its shape is refused by place before the model
    changes (its own error, raised later in the check forward, would not say which place it was at)."""
    if shape is None:
        return
    like = next((t for t in module.parameters() if t.is_floating_point()), None)
    dtype = like.dtype if like is not None else torch.get_default_dtype()
    device = like.device if like is not None else torch.device("cpu")
    own = torch.Generator(device=device).manual_seed(0)  # the user's random stream stays where it was
    x = torch.randn(shape, dtype=dtype, device=device, generator=own)
    flags = [(m, m.training) for m in module.modules()]  # each as it was (a frozen BatchNorm stays frozen)
    try:
        with torch.no_grad():
            y = module.eval()(x)
    except Exception as err:  # the module's own check or a raw error deep inside: say where it was going
        kind = TypeError if isinstance(err, TypeError) else ValueError
        raise kind(f"{who}: the {what} at {site.name} fails on its input {format_shape(shape)}: "
                   f"{err}") from err
    finally:
        for m, training in flags:
            m.training = training
    _kept(x, y, site.name, what)


def _convert_instances(
    model: nn.Module, where: Where, example_input: Any, kwargs: dict[str, Any]
) -> list[str]:
    """``replace(model, ForeignClass)``: every instance converted by `attnzoo.convert`, in place."""
    from attnzoo.convert import in_place_converter_for  # lazy: convert imports the families
    from attnzoo.convert.registry import refuse_converted_inside, unknown_class_hint

    if isinstance(where, str):  # a dotted name from attnzoo.convert.known() (the hints print those)
        where = _known_class(where)
    converter = in_place_converter_for(where) if isinstance(where, type) else None
    if converter is None or not isinstance(where, type):
        found = [(name, module) for name, module in model.named_modules()
                 if issubclass(type(module), where)] if isinstance(where, type) else []
        hint = unknown_class_hint(found, "model")
        raise TypeError(
            f"replace expects attention (a registry name, a factory or a module), or where= a class that "
            f"attnzoo.convert knows; got where={where!r} and no attention: {hint}"
        )
    if kwargs:
        raise TypeError(f"replace: converting {where.__qualname__} takes no constructor arguments, "
                        f"got {sorted(kwargs)}")
    if isinstance(model, where):
        raise ValueError(f"replace: model itself is a {where.__qualname__}; convert it with "
                         f"attnzoo.convert.convert(model)")
    places: list[str] = []
    new: dict[int, nn.Module] = {}  # id(foreign) -> converted, so a shared module stays shared
    for name, module in model.named_modules(remove_duplicate=False):
        selected = isinstance(module, where)  # (not narrowing `module`: it stays an nn.Module for mypy)
        if not selected or any(name.startswith(p + ".") for p in places):
            continue
        if id(module) not in new:
            try:
                refuse_converted_inside(module)
                new[id(module)] = converter(module)
            except (TypeError, ValueError) as err:  # say which place, keep the kind of error
                raise type(err)(f"replace: {name}: {err}") from err
        places.append(name)
    # Swap only once every place converted, so a refusal leaves the model untouched.
    with undo_on_error(model, "replace"):
        for name in places:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, new[id(parent.get_submodule(child))])
        _verify(model, example_input)
    return places


def _known_class(name: str) -> type | str:
    """The class a dotted name of `attnzoo.convert.known()` stands for, imported (its package is installed
    where an instance is in the model); any other string, or one whose package cannot be imported, is
    returned as given for the caller's error."""
    from attnzoo.convert import known  # lazy: convert imports the families

    if name not in known():
        return name
    module_name, _, qualname = name.rpartition(".")
    while module_name:  # a nested class: the module is a shorter prefix
        try:
            found: Any = importlib.import_module(module_name)
        except ImportError:
            module_name, _, outer = module_name.rpartition(".")
            qualname = f"{outer}.{qualname}"
            continue
        for part in qualname.split("."):
            found = getattr(found, part, None)
        return found if isinstance(found, type) else name
    return name


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

