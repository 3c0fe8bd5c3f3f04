"""The registry: every mechanism by name, with the metadata tests, the CLI and surgery need.

A family file registers its canonical class with `register` and, where the seed documents
name the class differently (`SELayer` for `SqueezeExcite`), attaches the seed-compatible class
with `register_seed`. `create` accepts the canonical name, any alias, or the seed name
(which builds the seed-compatible class, with the seed's constructor arguments).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from torch import nn

__all__ = ["Example", "Spec", "register", "register_seed", "create", "get_spec", "list_modules"]

LAYOUTS = ("NCHW", "NHWC", "NLC", "NCL", "NCTHW", "SEQ2SEQ")

ModuleT = TypeVar("ModuleT", bound=type[nn.Module])


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
    """

    kwargs: dict[str, Any]
    inputs: tuple[tuple[int, ...], ...]
    output: tuple[int, ...]
    channel_dim: int = 1
    bf16_rtol: float = 0.05


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
) -> Callable[[ModuleT], ModuleT]:
    """Class decorator that registers a canonical attention module under `name`."""
    if layout not in LAYOUTS:
        raise ValueError(f"register({name!r}): layout must be one of {LAYOUTS}, got {layout!r}")

    def decorate(cls: ModuleT) -> ModuleT:
        if name in _REGISTRY:
            raise ValueError(f"attention {name!r} is already registered")
        spec = Spec(name, cls, family, paper, year, layout, example, tuple(aliases), seed_name, uses_attend)
        for alias in spec.all_names:
            key = alias.lower()
            if _ALIASES.get(key, name) != name:
                raise ValueError(f"alias {alias!r} of {name!r} already names {_ALIASES[key]!r}")
            _ALIASES[key] = name
        _REGISTRY[name] = spec
        return cls

    return decorate


SeedT = TypeVar("SeedT", bound=Callable[..., nn.Module])


def register_seed(name: str) -> Callable[[SeedT], SeedT]:
    """Decorator that attaches the seed-compatible class (or builder) to the registered entry `name`.

    `create(seed_name, ...)` then calls it with the seed's constructor arguments.
    """

    def decorate(cls: SeedT) -> SeedT:
        spec = get_spec(name)
        if spec.seed_name is None:
            raise ValueError(f"attention {name!r} was registered without a seed_name")
        _REGISTRY[name] = Spec(**{**spec.__dict__, "seed_cls": cls})
        return cls

    return decorate


def _resolve(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"attention name must be a str, got {type(name).__name__}")
    key = _ALIASES.get(name.lower())
    if key is None:
        choices = sorted(set(_REGISTRY) | {a for s in _REGISTRY.values() for a in s.all_names})
        close = difflib.get_close_matches(name, choices, n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown attention {name!r}{hint} Available: {', '.join(sorted(_REGISTRY))}")
    return key


def get_spec(name: str) -> Spec:
    """The `Spec` registered under `name` (canonical name, alias or seed name)."""
    _load_families()
    return _REGISTRY[_resolve(name)]


def create(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered mechanism by name.

    The seed's class name (for example `"SELayer"`) builds the seed-compatible class and takes the
    seed's constructor arguments; every other name builds the canonical class.

    Example:
        ```python
        >>> import attnzoo
        >>> type(attnzoo.create("se", channels=64)).__name__
        'SqueezeExcite'
        >>> type(attnzoo.create("SELayer", channel=64)).__name__  # the seed's name and arguments
        'SELayer'
        ```
    """
    spec = get_spec(name)
    use_seed = (
        spec.seed_cls is not None and spec.seed_name is not None and name.lower() == spec.seed_name.lower()
    )
    cls = spec.seed_cls if use_seed and spec.seed_cls is not None else spec.cls
    return cls(**kwargs)


def list_modules(family: str | None = None) -> list[Spec]:
    """Every registered mechanism (optionally of one family), sorted by name."""
    _load_families()
    specs = sorted(_REGISTRY.values(), key=lambda s: s.name)
    return [s for s in specs if family is None or s.family == family]


def _load_families() -> None:
    # Registration happens when a family module is imported; importing the package imports them all.
    import attnzoo  # noqa: F401
