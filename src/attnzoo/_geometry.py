"""An input described independently of layout, and the sizes that fit it.

`attnzoo.surgery.build` turns a `Geometry` into each mechanism's inputs and constructor arguments;
a family's `for_input` (given to `register`) reads it to pick what fits the input, for example a
window that divides the map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from attnzoo._checks import check_int

__all__ = [
    "Geometry", "Unsupported", "check_conv_fits", "divisor_window", "fit_window", "grid2d", "heads_for",
    "int_pair", "num_windows",
]


class Unsupported(ValueError):
    """The mechanism cannot take this input (the message says why)."""


@dataclass(frozen=True)
class Geometry:
    """Batch, channels and the spatial grid of one input.

    `spatial` is `(H, W)` for maps, `(L,)` for sequences, `(T, H, W)` for clips.
    """

    batch: int
    channels: int
    spatial: tuple[int, ...]

    @property
    def tokens(self) -> int:
        return math.prod(self.spatial)

    def shape(self) -> tuple[int, ...]:
        if len(self.spatial) == 1:
            return (self.batch, self.spatial[0], self.channels)
        return (self.batch, self.channels, *self.spatial)


def grid2d(geo: Geometry) -> tuple[int, int]:
    """`(H, W)` of a map, or of a square token sequence; `Unsupported` otherwise."""
    if len(geo.spatial) == 2:
        return geo.spatial[0], geo.spatial[1]
    if len(geo.spatial) == 1:
        side = math.isqrt(geo.tokens)
        if side * side == geo.tokens:
            return side, side
    raise Unsupported(f"takes feature maps; the input has no 2-D grid ({geo.spatial})")


def divisor_window(h: int, w: int, largest: int = 7) -> int:
    """The largest window side up to `largest` that divides both H and W."""
    return next(n for n in range(min(largest, h, w), 0, -1) if h % n == 0 and w % n == 0)


def fit_window(geo: Geometry, largest: int = 7) -> int:
    """A window side no larger than the map (Swin's 7 where the map allows)."""
    return min(largest, *geo.spatial[-2:]) if len(geo.spatial) >= 2 else min(largest, geo.tokens)


def num_windows(geo: Geometry, can_pad: bool = True) -> int:
    """Regions per side for routing attention: one that divides the map, or 7 when padding is allowed."""
    h, w = geo.spatial[-2:] if len(geo.spatial) >= 2 else (geo.tokens, geo.tokens)
    n = divisor_window(h, w)
    return 7 if n == 1 and can_pad and min(h, w) >= 7 else n


def heads_for(channels: int, preferred: object = 8) -> int:
    """`preferred` heads when they divide the channels, else the largest of 8, 4, 2, 1 that does."""
    if isinstance(preferred, int) and not isinstance(preferred, bool) and preferred > 0:
        if channels % preferred == 0:
            return preferred
    return next(h for h in (8, 4, 2, 1) if channels % h == 0)


def check_conv_fits(sizes: tuple[int, ...], kernel: tuple[int, ...], padding: tuple[int, ...],
                    dilation: tuple[int, ...], who: str) -> None:
    """Refuse, before any work, a map too small for a convolution: its dilated kernel must fit in
    the padded size along each axis (torch would fail deep inside the convolution).

    Args:
        sizes: The map's spatial sizes, `(H, W)`.
        kernel, padding, dilation: The convolution's, one per axis.
        who: The caller, for the message.
    """
    for axis, size, k, p, d in zip("HWD", sizes, kernel, padding, dilation, strict=False):
        reach = d * (k - 1) + 1
        if size + 2 * p < reach:
            raise ValueError(
                f"{who}: the {k}-wide convolution with dilation {d} spans {reach} positions but "
                f"x.{axis}={size} padded by {p} on each side gives {size + 2 * p}; expected "
                f"x.{axis} >= {reach - 2 * p}"
            )


def int_pair(value: object, name: str, who: str, minimum: int = 1) -> tuple[int, int]:
    """An int (for both axes) or a pair of ints, each at least `minimum`, as a pair `(H, W)`.

    Raises:
        TypeError: `value` is neither an int nor a tuple or list (or holds a non-int).
        ValueError: A tuple or list whose length is not 2, or a value below `minimum`.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        values: tuple[object, ...] = (value, value)
    elif isinstance(value, (tuple, list)):
        values = tuple(value)
    else:
        kind = type(value).__name__
        raise TypeError(f"{who}: {name} must be an int or a pair of ints, got {kind} {value!r}")
    if len(values) != 2:
        raise ValueError(f"{who}: {name} must be an int or a pair of ints, got {value!r}")
    return check_int(values[0], name, who, minimum=minimum), check_int(values[1], name, who, minimum=minimum)
