"""The registry: every mechanism by name, with everything needed to build it, run it and describe it.

A family file registers its canonical class with `register` and, where the seed documents name the
class differently (`SELayer` for `SqueezeExcite`), attaches the seed-compatible class with
`register_seed`. `create` accepts the canonical name, any alias, or the seed name (which builds the
seed-compatible class, with the seed's constructor arguments). Every class exported by `attnzoo.compat`
has an example here too: `register_seed(name, example=...)` for a seed class, `register_compat(example=...)`
for an official, torch or torchvision class that is no registered seed; `compat_examples` lists them, so
the registry-wide suites (adversarial inputs, fuzzing) sweep a compat class by its example alone.

The `Spec` is the only table: the CLI (`list`, `info`, `bench`, `maps`, `demo`), surgery
(`attnzoo.insert`/`replace`), the docs generator and the registry-wide test suites read a
mechanism's width argument, layout, example, input rule and per-input arguments from it, so a new
mechanism joins all of them by `@register` alone.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from torch import nn

from attnzoo._checks import checked

__all__ = [
    "Example",
    "FreeSize",
    "Spec",
    "register",
    "register_seed",
    "register_compat",
    "compat_examples",
    "create",
    "get_spec",
    "list_modules",
]

LAYOUTS = ("NCHW", "NHWC", "NLC", "NCL", "NCTHW", "NTHWC", "SEQ2SEQ")

# How one input geometry becomes a module's positional inputs (see `Spec.input_rule`):
INPUT_RULES = (
    "layout",  # every example input becomes the map in `layout` (the default)
    "self",  # query = key = value = the map's H*W tokens (self-attention over a sequence)
    "windows",  # the map cut into windows, (B * windows, Wh*Ww, C), as Swin calls its window attention
    "frames",  # along time: clips (B, C, T, H, W) give (B*H*W, T, C); else the (B, L, C) tokens
    "nd",  # (B, C, *spatial) for 1-, 2- and 3-D inputs alike
)

# The width argument, always the first constructor argument of a canonical class.
WIDTH_NAMES = ("channels", "dim", "query_dim")

ModuleT = TypeVar("ModuleT", bound=type[nn.Module])


@dataclass(frozen=True)
class FreeSize:
    """Input dimensions that may change together (to any size >= `low`, a multiple of `step`).

    Args:
        members: `(input index, dim)` pairs that change together.
        out: The output dim that equals the new size, or None.
        step: Sizes are multiples of this.
        low: The smallest size.
        derived: The output dim `out` follows the size in another way (a stride): not compared.
    """

    members: tuple[tuple[int, int], ...]
    out: int | None = None
    step: int = 1
    low: int = 1
    derived: bool = False


@dataclass(frozen=True)
class Example:
    """A small configuration every registered module must run: the conformance suite uses it.

    Args:
        kwargs: Constructor arguments.
        inputs: Shapes of the positional float inputs, in order.
        output: Shape of the output tensor (the module returns a single tensor).
        channel_dim: Which dimension of the first input carries the channels/features the
            constructor fixed (1 for NCHW, -1 for NHWC/NLC); the suite changes it to check errors.
        bf16_rtol: Allowed relative L2 distance between a bfloat16 and a float32 forward.
        free_sizes: Which input sizes may change (the fuzz suite varies them), or None to let the
            suite probe the layout's spatial/sequence dimensions.
    """

    kwargs: dict[str, Any]
    inputs: tuple[tuple[int, ...], ...]
    output: tuple[int, ...]
    channel_dim: int = 1
    bf16_rtol: float = 0.05
    free_sizes: tuple[FreeSize, ...] | None = None


@dataclass(frozen=True)
class Spec:
    """Metadata of one registered mechanism."""

    name: str
    cls: type[nn.Module]
    family: str
    paper: str
    year: int
    layout: str
    example: Example
    aliases: tuple[str, ...] = ()
    seed_name: str | None = None
    uses_attend: bool = False
    seed_cls: Callable[..., nn.Module] | None = field(default=None, compare=False)
    input_rule: str = "layout"
    for_input: Callable[[Any], dict[str, Any]] | None = field(default=None, compare=False)
    limitations: Mapping[str, str] = field(default_factory=dict, compare=False)
    seed_example: Example | None = None

    @property
    def width(self) -> str:
        """The width argument's name (the first constructor argument): `channels`, `dim` or `query_dim`."""
        params = [p for p in inspect.signature(self.cls.__init__).parameters.values() if p.name != "self"]
        return params[0].name if params else ""

    def __repr__(self) -> str:
        seed = f", seed_name={self.seed_name!r}" if self.seed_name else ""
        return (
            f"Spec({self.name!r}, {self.cls.__name__}, family={self.family!r}, layout={self.layout!r}{seed})"
        )

    @property
    def all_names(self) -> tuple[str, ...]:
        names = (self.name, self.cls.__name__, *self.aliases)
        if self.seed_name:
            names += (self.seed_name,)
        return tuple(dict.fromkeys(names))


_REGISTRY: dict[str, Spec] = {}
_ALIASES: dict[str, str] = {}  # lower-cased alias -> canonical name


def register(
    name: str,
    *,
    family: str,
    paper: str,
    year: int,
    layout: str,
    example: Example,
    aliases: Sequence[str] = (),
    seed_name: str | None = None,
    uses_attend: bool = False,
    input_rule: str = "layout",
    for_input: Callable[[Any], dict[str, Any]] | None = None,
    limitations: Mapping[str, str] | None = None,
) -> Callable[[ModuleT], ModuleT]:
    """Class decorator that registers a canonical attention module under `name`.

    Args:
        name: The registry name (lower-case snake case).
        family, paper, year: What the docs and `attnzoo list` show.
        layout: The layout of the module's first input, one of `LAYOUTS`.
        example: A small configuration the registry-wide suites run.
        aliases: More names `create` accepts.
        seed_name: The seed's or official code's class name, when it differs.
        uses_attend: The module runs `attnzoo.functional.attend` (fused == math path is checked).
        input_rule: How an input geometry becomes the module's inputs, one of `INPUT_RULES`.
        for_input: `geometry -> constructor arguments` beyond the shared vocabulary's rules, for
            building the module for any input (`attnzoo.surgery.build`); the argument is a
            `attnzoo.surgery.build.Geometry` (batch, channels, spatial).
        limitations: Support-matrix features (`attnzoo.cli.matrix.FEATURES`) the mechanism does not
            support, with the reason; the tests check that each still fails.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"register({name!r}): layout must be one of {LAYOUTS}, got {layout!r}")
    if input_rule not in INPUT_RULES:
        raise ValueError(f"register({name!r}): input_rule must be one of {INPUT_RULES}, got {input_rule!r}")

    def decorate(cls: ModuleT) -> ModuleT:
        if name in _REGISTRY:
            raise ValueError(f"attention {name!r} is already registered")
        spec = Spec(
            name, cls, family, paper, year, layout, example, tuple(aliases), seed_name, uses_attend,
            input_rule=input_rule, for_input=for_input, limitations=dict(limitations or {}),
        )
        for alias in spec.all_names:
            key = alias.lower()
            if _ALIASES.get(key, name) != name:
                raise ValueError(f"alias {alias!r} of {name!r} already names {_ALIASES[key]!r}")
            _ALIASES[key] = name
        _REGISTRY[name] = spec
        return checked(cls)

    return decorate


SeedT = TypeVar("SeedT", bound=Callable[..., nn.Module])


def register_seed(name: str, *, example: Example | None = None) -> Callable[[SeedT], SeedT]:
    """Decorator that attaches the seed-compatible class (or builder) to the registered entry `name`.

    `create(seed_name, ...)` then calls it with the seed's constructor arguments.

    Args:
        name: The registered (canonical) entry the seed class belongs to.
        example: A small configuration of the seed class, in the seed's own constructor arguments
            (`Example.output` is the shape of the first output where the class returns a tuple); the
            registry-wide suites sweep every compat class with it (`compat_examples`).
    """

    def decorate(cls: SeedT) -> SeedT:
        spec = get_spec(name)
        if spec.seed_name is None:
            raise ValueError(f"attention {name!r} was registered without a seed_name")
        _REGISTRY[name] = Spec(**{**spec.__dict__, "seed_cls": cls, "seed_example": example})
        if isinstance(cls, type):
            checked(cls, flags=False)
        return cls

    return decorate


# Examples of the compat classes that are no registered seed (official and torch/torchvision classes).
_COMPAT_EXAMPLES: dict[Callable[..., nn.Module], Example] = {}


def register_compat(*, example: Example) -> Callable[[SeedT], SeedT]:
    """Decorator that gives a compat class that is no registered seed (an official, torch or
    torchvision class in `attnzoo.compat`) its example, so the registry-wide suites sweep it.

    Args:
        example: A small configuration in the class's own constructor arguments (`Example.output` is
            the shape of the first output where the class returns a tuple).
    """

    def decorate(cls: SeedT) -> SeedT:
        if cls in _COMPAT_EXAMPLES:
            raise ValueError(f"compat class {getattr(cls, '__name__', cls)!r} already has an example")
        _COMPAT_EXAMPLES[cls] = example
        if isinstance(cls, type):
            checked(cls, flags=False)
        return cls

    return decorate


def compat_examples() -> list[tuple[str, Callable[..., nn.Module], Example]]:
    """`(exported name, class, example)` for every class (or builder) exported by `attnzoo.compat`
    that has an example: a registered seed's `seed_example` or a `register_compat` example.

    Exported names without an example are left out (a test lists the few builders allowed to lack one).
    """
    _load_families()
    from attnzoo import compat

    seeds = {id(s.seed_cls): s.seed_example for s in _REGISTRY.values() if s.seed_cls is not None}
    found = []
    for exported in compat.__all__:
        obj = getattr(compat, exported)
        example = _COMPAT_EXAMPLES.get(obj) or seeds.get(id(obj))
        if example is not None:
            found.append((exported, obj, example))
    return found


def _resolve(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"attention name must be a str, got {type(name).__name__}")
    key = _ALIASES.get(name.lower())
    if key is None:
        choices = sorted(set(_REGISTRY) | {a for s in _REGISTRY.values() for a in s.all_names})
        close = difflib.get_close_matches(name, choices, n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else "."
        raise ValueError(f"unknown attention {name!r}{hint} Available: {', '.join(sorted(_REGISTRY))}")
    return key


def get_spec(name: str) -> Spec:
    """The `Spec` registered under `name` (canonical name, alias or seed name)."""
    _load_families()
    return _REGISTRY[_resolve(name)]


def create(name: str, *args: Any, **kwargs: Any) -> nn.Module:
    """Build a registered mechanism by name.

    Every canonical class takes its width first (`channels` for feature maps, `dim` for tokens,
    `query_dim` for the sequence scorers) and has defaults for everything else, so
    `create(name, 64)` builds any of them. The width may also be given by keyword, as `channels=`
    or `dim=` whichever the class calls it. The seed's class name (for example `"SELayer"`) builds the
    seed-compatible class and takes the seed's own constructor arguments.

    Example:
        ```python
        >>> import attnzoo
        >>> se = attnzoo.create("se", 64)
        >>> mha = attnzoo.create("mha", channels=64)  # MultiHeadAttention(dim=64)
        ```
    """
    spec = get_spec(name)
    # The registry name always builds the canonical class, even where it is the seed name in lower case
    # ("acmix" and the official "ACmix").
    use_seed = (
        spec.seed_cls is not None
        and spec.seed_name is not None
        and name != spec.name
        and name.lower() == spec.seed_name.lower()
    )
    if use_seed and spec.seed_cls is not None:
        return spec.seed_cls(*args, **kwargs)
    return spec.cls(*args, **_width_alias(spec, args, kwargs))


def _width_alias(spec: Spec, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Accept `channels=` for a `dim` class and `dim=` for a `channels` class: both name the width."""
    width = spec.width
    if args or width in kwargs or width not in WIDTH_NAMES:
        return kwargs
    params = inspect.signature(spec.cls.__init__).parameters
    for other in ("channels", "dim"):
        if other != width and other in kwargs and other not in params:
            kwargs = dict(kwargs)
            kwargs[width] = kwargs.pop(other)
            break
    return kwargs


def list_modules(family: str | None = None) -> list[Spec]:
    """Every registered mechanism (optionally of one family), sorted by name."""
    _load_families()
    specs = sorted(_REGISTRY.values(), key=lambda s: s.name)
    return [s for s in specs if family is None or s.family == family]


def _load_families() -> None:
    # Registration happens when a family module is imported; importing the package imports them all.
    import attnzoo  # noqa: F401
