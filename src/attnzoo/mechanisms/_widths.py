"""Hidden widths and kernel sizes of the timm-style gates: timm's rounding rule, written once.

timm sizes a gate's bottleneck as `make_divisible(channels * rd_ratio, rd_divisor, round_limit)`
unless `rd_channels` is given; attnzoo spells `rd_ratio` as `1 / reduction` and keeps
`rd_channels` and `rd_divisor`. ECA picks its kernel size from the channel count.
"""

from __future__ import annotations

import math

from attnzoo._checks import MAX_SIZE, check_float, check_int

__all__ = [
    "round_width", "make_divisible", "hidden_channels", "adaptive_kernel_size", "check_layer", "check_width",
]


def check_width(width: float, name: str, value: object, who: str, what: str = "width") -> None:
    """A width derived from a float option (`channels / reduction`, `out * qk_ratio`) must be a size
    torch can allocate: at most `MAX_SIZE`. The message names the option and its value."""
    if not width <= MAX_SIZE:  # also nan
        raise ValueError(f"{who}: {name}={value!r} gives a {what} of {width:g}, more than the largest size "
                         f"{MAX_SIZE} (2**31 - 1)")


def round_width(value: float, divisor: int, minimum: int | None = None, round_limit: float = 0.0) -> int:
    """``value`` rounded to the nearest multiple of ``divisor`` (at least ``minimum``, default
    ``divisor``), bumped up one ``divisor`` when rounding lost more than ``1 - round_limit`` of it.

    The same numbers as timm's ``make_divisible``; ``round_limit=0`` never bumps.

    Example:
        >>> round_width(64 / 24, 8), round_width(64 * 2 / 4, 8, minimum=32, round_limit=0.9)
        (8, 32)
    """
    floor = divisor if minimum is None else minimum
    width = max(floor, int(value + divisor / 2) // divisor * divisor)
    if width < round_limit * value:
        width += divisor
    return width


def make_divisible(value: float, divisor: int, round_limit: float = 0.9) -> int:
    """timm's `make_divisible`: `round_width` with timm's default `round_limit` of 0.9."""
    return round_width(value, divisor, None, round_limit)


def hidden_channels(
    channels: int,
    reduction: int,
    rd_channels: int | None,
    rd_divisor: int,
    who: str,
    *,
    round_limit: float = 0.0,
) -> int:
    """A gate's hidden width: ``rd_channels`` when given, else ``channels / reduction`` rounded by
    `make_divisible`; every argument checked, the messages naming it."""
    check_int(channels, "channels", who)
    check_int(reduction, "reduction", who)
    check_int(rd_divisor, "rd_divisor", who)
    if rd_channels is not None:
        return check_int(rd_channels, "rd_channels", who)
    return make_divisible(channels / reduction, rd_divisor, round_limit)


def adaptive_kernel_size(channels: int, gamma: float, beta: float, who: str) -> int:
    """ECA's kernel size for ``channels``: ``t = int(|log2(C) + beta| / gamma)``, made odd, at least 3.

    (The official ECA code has no floor of 3; timm's, followed here, has.)
    """
    check_int(channels, "channels", who)
    check_float(gamma, "gamma", who)
    check_float(beta, "beta", who)
    for name, value in (("gamma", gamma), ("beta", beta)):
        if not math.isfinite(value):
            raise ValueError(f"{who}: {name} must be finite, got {value}")
    if gamma <= 0:
        raise ValueError(f"{who}: gamma must be > 0, got {gamma}")
    check_width(abs(math.log2(channels) + beta) / gamma, "(gamma, beta)", (gamma, beta), who, "kernel size")
    t = int(abs(math.log2(channels) + beta) / gamma)
    return max(t if t % 2 else t + 1, 3)


def check_layer(layer: object, name: str, who: str) -> None:
    """``act_layer`` / ``gate_layer`` must be a class (or factory) building an ``nn.Module``."""
    if not callable(layer) or isinstance(layer, (str, bool, int, float)):
        raise TypeError(
            f"{who}: {name} must be an nn.Module class such as nn.Sigmoid, "
            f"got {type(layer).__name__} {layer!r}"
        )
