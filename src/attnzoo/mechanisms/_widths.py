"""Hidden widths of gates: timm's rounding rule, written once for the families that follow timm."""

from __future__ import annotations

__all__ = ["round_width"]


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
