"""Build any registered mechanism for a given input, from its registry `Spec` alone.

The `attnzoo` command (`list`, `info`, `bench`, `maps`, `demo`) takes one input shape and builds
every mechanism for it. An input is a batch of feature maps `B x C x H x W`, a batch of token
sequences `B x L x C` or of clips `B x C x T x H x W`; each mechanism gets it as its `Spec` says:

- by `spec.layout`: NCHW as is; NHWC permuted to `(B, H, W, C)`; NLC flattened to `(B, H*W, C)`
  tokens; NCL to `(B, C, H*W)`; a token input `B x L x C` with a square L becomes a map;
- SEQ2SEQ scoring rules get **one query** `(B, 1, C)` against the `H*W` tokens as keys and values
  `(B, H*W, C)` (a decoder step attending to the encoder's feature map);
- or by `spec.input_rule` (`"self"`, `"windows"`, `"frames"`, `"nd"`, see `attnzoo._registry`);
- inputs a mechanism cannot take raise `Unsupported` with the reason.

Constructor arguments: the width (`spec.width`) and the shared vocabulary's rules below (heads
that divide C, windows that fit the map, the other widths equal to C), then `spec.for_input(geo)`
for whatever is specific to the mechanism.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from attnzoo._geometry import Geometry, Unsupported, divisor_window, fit_window, grid2d, heads_for
from attnzoo._registry import Spec
from attnzoo.surgery.adapters import build_for_place, channel_kwargs
from attnzoo.surgery.map_adapters import Clip, Tiles

# Frames of the clip made from a map for mechanisms on clips or along time (see `Clip`).
CLIP_FRAMES = 3

__all__ = [
    "Geometry",
    "Built",
    "Unsupported",
    "parse_shape",
    "geometry",
    "input_shapes",
    "constructor_kwargs",
    "build",
    "build_example",
    "build_nchw",
]


# ---------------------------------------------------------------------------------------------
# Input shapes


_MAX_ELEMENTS = 2**31  # an input shape of the CLI: larger ones only exhaust memory


def parse_shape(text: str, what: str = "--input") -> tuple[int, ...]:
    """`"8x256x56x56"` -> `(8, 256, 56, 56)`; `ValueError` naming the problem otherwise."""
    parts = str(text).lower().replace("*", "x").split("x")
    try:
        sizes = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"{what} expects sizes joined by 'x' such as 8x256x56x56, got {text!r}") from None
    if any(s < 1 for s in sizes):
        raise ValueError(f"{what} expects positive sizes, got {text!r}")
    if len(sizes) not in (3, 4, 5):
        raise ValueError(
            f"{what} expects BxCxHxW (maps), BxLxC (tokens) or BxCxTxHxW (clips), "
            f"got {len(sizes)} sizes in {text!r}"
        )
    if math.prod(sizes) > _MAX_ELEMENTS:
        raise ValueError(f"{what} expects at most 2**31 elements (8 GiB of float32), got {text!r}: "
                         f"{math.prod(sizes):,} elements")
    return sizes


def geometry(shape: tuple[int, ...]) -> Geometry:
    """Read a `B x C x H x W`, `B x L x C` or `B x C x T x H x W` shape."""
    if len(shape) == 3:
        return Geometry(shape[0], shape[2], (shape[1],))
    if len(shape) in (4, 5):
        return Geometry(shape[0], shape[1], tuple(shape[2:]))
    raise ValueError(f"expects an input of rank 3, 4 or 5, got shape {shape}")


def _layout_shape(layout: str, geo: Geometry) -> tuple[int, ...]:
    b, c = geo.batch, geo.channels
    if layout == "NCHW":
        return (b, c, *grid2d(geo))
    if layout == "NHWC":
        return (b, *grid2d(geo), c)
    if layout == "NLC":
        return (b, geo.tokens, c)
    if layout == "NCL":
        return (b, c, geo.tokens)
    if layout == "NCTHW":
        if len(geo.spatial) != 3:
            raise Unsupported("takes (B, C, T, H, W) clips; give --input BxCxTxHxW")
        return (b, c, *geo.spatial)
    if layout == "NTHWC":
        if len(geo.spatial) != 3:
            raise Unsupported("takes (B, T, H, W, C) clips; give --input BxCxTxHxW")
        return (b, *geo.spatial, c)
    raise Unsupported(f"layout {layout} has no conversion")


def _rule_shapes(spec: Spec, geo: Geometry) -> tuple[tuple[int, ...], ...] | None:
    """The inputs `spec.input_rule` prescribes, or None to go by the layout."""
    rule = spec.input_rule
    if rule == "self":
        return tuple((geo.batch, geo.tokens, geo.channels) for _ in spec.example.inputs)
    if rule == "nd":
        return ((geo.batch, geo.channels, *geo.spatial),)
    if rule == "frames":
        if len(geo.spatial) == 3:  # clips: every position attends along time
            t, h, w = geo.spatial
            return ((geo.batch * h * w, t, geo.channels),)
        return ((geo.batch, geo.tokens, geo.channels),)  # a sequence, or a map's H*W tokens as one
    if rule == "windows":
        h, w = grid2d(geo)
        size = divisor_window(h, w)
        return ((geo.batch * (h // size) * (w // size), size * size, geo.channels),)
    return None


def input_shapes(spec: Spec, geo: Geometry) -> tuple[tuple[int, ...], ...]:
    """The shapes of the positional inputs `spec`'s module takes for this input."""
    shapes = _rule_shapes(spec, geo)
    if shapes is not None:
        return shapes
    example = spec.example.inputs
    if spec.layout == "SEQ2SEQ":
        # Example (B, Lq, dq), (B, Lk, dk), ...: sequences as long as the example's first become one
        # query; the others become the H*W tokens; every feature size becomes C.
        length_q = example[0][1]
        return tuple((geo.batch, 1 if s[1] == length_q else geo.tokens, geo.channels) for s in example)
    if any(tuple(s) != tuple(example[0]) for s in example):
        raise Unsupported(f"takes inputs of different shapes {example}; no conversion from one input")
    return tuple(_layout_shape(spec.layout, geo) for _ in example)


# ---------------------------------------------------------------------------------------------
# Constructor arguments: the shared vocabulary's rules, then the mechanism's own `for_input`

_SAME_AS_INPUT = ("query_dim", "key_dim", "value_dim", "out_channels")


def _vocabulary_kwargs(spec: Spec, geo: Geometry, params: dict[str, inspect.Parameter]) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(channel_kwargs(spec.cls, geo.channels))
    for name, param in params.items():
        if name in kwargs:
            continue
        if name in _SAME_AS_INPUT:
            kwargs[name] = geo.channels
        elif name == "num_heads":
            kwargs[name] = heads_for(geo.channels, param.default)
        elif name == "window_size" and spec.input_rule == "windows":
            kwargs[name] = divisor_window(*grid2d(geo))
        elif name == "window_size":
            kwargs[name] = fit_window(geo)
        elif name == "stride":
            kwargs[name] = 1  # attention keeps the map's size
    return kwargs


def constructor_kwargs(spec: Spec, geo: Geometry) -> dict[str, Any]:
    """Constructor arguments of `spec`'s canonical class for an input of this geometry."""
    params = {n: p for n, p in inspect.signature(spec.cls.__init__).parameters.items() if n != "self"}
    kwargs = _vocabulary_kwargs(spec, geo, params)
    if spec.for_input is not None:
        kwargs.update(spec.for_input(geo))
    missing = [
        n
        for n, p in params.items()
        if p.default is inspect.Parameter.empty
        and n not in kwargs
        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]
    if missing:
        raise Unsupported(f"no default for constructor argument(s) {', '.join(missing)}")
    return kwargs


# ---------------------------------------------------------------------------------------------
# Building


@dataclass
class Built:
    """A mechanism built for an input: the module, its inputs and how they were made."""

    spec: Spec
    module: nn.Module
    inputs: tuple[Tensor, ...]
    kwargs: dict[str, Any]
    from_example: bool = False  # built from the registry example: the input did not fit

    @property
    def input_note(self) -> str:
        note = " + ".join("x".join(str(s) for s in x.shape) for x in self.inputs)
        return f"{note} (registry example)" if self.from_example else note


def _construct(spec: Spec, kwargs: dict[str, Any]) -> nn.Module:
    try:
        return spec.cls(**kwargs)
    except (ValueError, TypeError) as err:
        raise Unsupported(f"cannot be built with {kwargs}: {err}") from None


def build(
    spec: Spec,
    shape: tuple[int, ...],
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    batch: int | None = None,
    or_example: bool = False,
) -> Built:
    """Build `spec`'s canonical module and random inputs (seeded) for an input of `shape`.

    Args:
        spec: The registry entry.
        shape: `B x C x H x W`, `B x L x C` or `B x C x T x H x W`.
        dtype: Of the parameters and the inputs. Default: float32.
        seed: Seeds the weights and the inputs. Default: 0.
        batch: Overrides B (FLOPs are counted on one sample). Default: None.
        or_example: When the mechanism cannot take `shape`, build its registry example instead
            (the CLI's default inputs do this, so every mechanism runs). Default: False.

    Raises:
        Unsupported: When the mechanism cannot take the input (and `or_example` is False).
    """
    geo = geometry(shape)
    if batch is not None:
        geo = Geometry(batch, geo.channels, geo.spatial)
    try:
        shapes = input_shapes(spec, geo)
        kwargs = constructor_kwargs(spec, geo)
        _construct(spec, kwargs)  # raises Unsupported now, before any seeded work
    except Unsupported:
        if not or_example:
            raise
        return build_example(spec, dtype=dtype, seed=seed, batch=batch)
    torch.manual_seed(seed)
    module = _construct(spec, kwargs).to(dtype)
    inputs = tuple(torch.randn(s, dtype=dtype) for s in shapes)
    return Built(spec, module, inputs, kwargs)


def build_example(
    spec: Spec, *, dtype: torch.dtype = torch.float32, seed: int = 0, batch: int | None = None
) -> Built:
    """`spec`'s module and random inputs (seeded) from its registry example (`spec.example`)."""
    torch.manual_seed(seed)
    module = spec.cls(**spec.example.kwargs).to(dtype)
    shapes = [((batch,) + tuple(s[1:])) if batch is not None else tuple(s) for s in spec.example.inputs]
    inputs = tuple(torch.randn(s, dtype=dtype) for s in shapes)
    return Built(spec, module, inputs, dict(spec.example.kwargs), from_example=True)


class _QueryProbe(nn.Module):
    """Runs a SEQ2SEQ scorer on a `(B, C, H, W)` map: the mean token queries the H*W tokens."""

    def __init__(self, module: nn.Module, one_token: tuple[bool, ...]) -> None:
        super().__init__()
        self.module = module
        self.one_token = one_token  # per input: the query token (True) or all the map's tokens
        self.weights = "need_weights" in inspect.signature(module.forward).parameters

    def forward(self, x: Tensor) -> Tensor:
        from attnzoo.maps.capture import capturing, record

        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (B, H*W, C)
        query = tokens.mean(1, keepdim=True)  # (B, 1, C)
        args = [query if one else tokens for one in self.one_token]
        if capturing() and self.weights:  # a scorer that returns its weights (one that records does not)
            out = self.module(*args, need_weights=True)
            if isinstance(out, tuple) and isinstance(out[1], Tensor) and out[1].shape[-1] == h * w:
                record(
                    self.module,
                    "rows",
                    out[1].reshape(b, -1, h * w).mean(1).reshape(b, 1, 1, h * w),  # heads averaged
                    grid=(h, w),
                    query_grid=(1,),
                    queries=torch.zeros(1, dtype=torch.long),
                    query="mean token",
                )
            out = out[0] if isinstance(out, tuple) else out
        else:
            out = self.module(*args)
        return x + out.reshape(b, c, 1, 1)  # (B, 1, C) -> (B, C, 1, 1)


class _SelfTokens(nn.Module):
    """Runs a (query, key, value) module on a `(B, C, H, W)` map: the H*W tokens attend to themselves."""

    def __init__(self, module: nn.Module, inputs: int) -> None:
        super().__init__()
        self.module = module
        self.inputs = inputs

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (B, H*W, C)
        out = self.module(*([tokens] * self.inputs))
        out = out[0] if isinstance(out, tuple) else out
        return out.transpose(1, 2).reshape(b, c, h, w)  # (B, H*W, C) -> (B, C, H, W)


def _tiled(spec: Spec, geo: Geometry) -> nn.Module | None:
    """A channels-last mechanism that cannot take the whole map, on the largest square tiles it takes."""
    h, w = grid2d(geo)
    for side in range(min(h, w) - 1, 1, -1):
        if h % side or w % side:
            continue
        try:
            kwargs = constructor_kwargs(spec, Geometry(1, geo.channels, (side, side)))
            return Tiles(_construct(spec, kwargs), side)
        except Unsupported:
            continue
    return None


def build_nchw(spec: Spec, channels: int, size: tuple[int, int], *, seed: int = 0) -> nn.Module:
    """A module for `(B, channels, H, W)` maps that keeps their shape: `spec`'s mechanism built
    for that input and wrapped to the map's layout when it takes another (NHWC, NLC tokens, or a
    SEQ2SEQ scorer queried by the mean token).

    Raises:
        Unsupported: When the mechanism cannot run on such maps.
    """
    geo = Geometry(1, channels, tuple(size))
    torch.manual_seed(seed)
    rule = spec.input_rule
    if rule == "windows":  # cut the map into windows and put them back (shifted_window, unshifted)
        return Tiles(_construct(spec, constructor_kwargs(spec, geo)), divisor_window(*size), tokens=True)
    if rule == "frames" or spec.layout == "NTHWC":  # a 3-frame pan made of the map
        clip = Geometry(1, channels, (CLIP_FRAMES, *size))
        kwargs = constructor_kwargs(spec, clip)
        if "kernel_size" in kwargs:  # the whole clip in time, a larger neighbourhood in space
            kwargs["kernel_size"] = (CLIP_FRAMES, *(min(7, s) for s in size))
        return Clip(_construct(spec, kwargs), CLIP_FRAMES, along_time=rule == "frames")
    if rule == "self":
        return _SelfTokens(_construct(spec, constructor_kwargs(spec, geo)), len(spec.example.inputs))
    if spec.layout == "SEQ2SEQ":
        kwargs = constructor_kwargs(spec, geo)
        shapes = input_shapes(spec, geo)
        if any(s[1] not in (1, geo.tokens) for s in shapes) or len(shapes) > 3:
            raise Unsupported("has no conversion from a feature map")
        return _QueryProbe(_construct(spec, kwargs), tuple(s[1] == 1 for s in shapes))
    if len(spec.example.inputs) != 1:
        raise Unsupported(f"takes {len(spec.example.inputs)} inputs; no place inside a CNN")
    if len(spec.example.output) != len(spec.example.inputs[0]):
        raise Unsupported(
            f"turns the map into {len(spec.example.output)}-D outputs (a head, e.g. class logits); "
            "it does not keep the map's shape"
        )
    input_shapes(spec, geo)  # raises when the layout cannot take a map
    try:
        kwargs = constructor_kwargs(spec, geo)
    except Unsupported:
        tiled = _tiled(spec, geo) if spec.layout == "NHWC" else None
        if tiled is None:
            raise
        return tiled
    layout = inspect.signature(spec.cls.__init__).parameters.get("layout")
    if spec.layout == "NHWC" and layout is not None and isinstance(layout.default, str):
        # A channels-last class with a layout switch runs on the map itself (in the switch's spelling).
        kwargs["layout"] = "nchw" if layout.default.islower() else "NCHW"
        return _construct(spec, kwargs)
    try:
        return build_for_place(spec.name, channels, "NCHW", kwargs, "the feature map")
    except (ValueError, TypeError) as err:
        raise Unsupported(str(err)) from None
