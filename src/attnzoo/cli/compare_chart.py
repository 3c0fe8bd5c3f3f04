"""The `attnzoo compare --plot` picture: held-out accuracy against forward latency, one labelled point
per mechanism, the baseline marked. Drawn in the shared style of `attnzoo.cli.plots`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

from attnzoo.cli.plots import STYLE, pyplot

__all__ = ["compare_chart"]

# The seed families keep one colour each (colour-blind safe, from the Okabe-Ito palette); the other
# families take matplotlib's tab20 colours in turn, with a second marker once those run out, so no
# two families look alike.
FAMILY_COLORS = {
    "gating": "#0072B2",
    "global": "#D55E00",
    "transformer": "#009E73",
    "biformer": "#CC79A7",
    "hybrid": "#E69F00",
    "seq2seq": "#56B4E9",
    "blocks": "#7a5c00",
}


def _family_styles(families: Sequence[str]) -> dict[str, tuple[Any, str]]:
    """(colour, marker) per family, in the order given."""
    from matplotlib import colormaps

    # tab20 without its blue, orange and green (too near the Okabe-Ito ones above), dark shades first
    order = (6, 8, 10, 12, 14, 16, 18, 7, 9, 11, 13, 15, 17, 19, 1, 3, 5)
    spare = [colormaps["tab20"](i) for i in order]
    styles: dict[str, tuple[Any, str]] = {}
    k = 0
    for family in families:
        if family in FAMILY_COLORS:
            styles[family] = (FAMILY_COLORS[family], "o")
            continue
        styles[family] = (spare[k % len(spare)], "os^D"[(k // len(spare)) % 4])
        k += 1
    return styles


def _offsets() -> list[tuple[float, float]]:
    """Label offsets (points) to try, nearest first: beside the point, then rings further out."""
    near = [(6, 3), (6, -11), (-6, 3), (-6, -11), (0, 8), (0, -16)]
    rings = [
        (radius * math.cos(angle), radius * math.sin(angle))
        for radius in (18, 28, 40, 54, 70, 90)
        for angle in (2 * math.pi * k / 16 for k in (0, 8, 2, 14, 6, 10, 1, 15, 7, 9, 3, 13, 5, 11, 4, 12))
    ]
    return near + rings


def _place_labels(
    ax: Any, points: Sequence[tuple[float, float, str]], fontsize: float, avoid: Sequence[Any] = (),
    big: Sequence[tuple[float, float]] = (),
) -> None:
    """Label each point at the first offset whose text clears every point (the `big` ones, the
    baseline star, by more), the labels placed so far and the axes' edges; labels set further out
    get a thin leader line to their point."""
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    dots = [ax.transData.transform((x, y)) for x, y, _ in points]
    placed: list[Any] = [Bbox.from_bounds(px - 4, py - 4, 8, 8) for px, py in dots]
    placed += [Bbox.from_bounds(px - 10, py - 10, 20, 20) for px, py in map(ax.transData.transform, big)]
    legend = ax.get_legend()
    # `avoid`: artists, or display-space boxes (an outlined region)
    placed += [a if isinstance(a, Bbox) else a.get_window_extent(renderer) for a in [*avoid, legend]
               if a is not None]
    for x, y, name in sorted(points, key=lambda p: (-p[1], p[0])):
        best = None
        for dx, dy in _offsets():
            far = math.hypot(dx, dy) > 12
            text = ax.annotate(
                name,
                (x, y),
                xytext=(dx, dy),
                textcoords="offset points",
                fontsize=fontsize,
                ha="left" if dx > 0 else "right" if dx < 0 else "center",
                va="center" if far else "bottom",
                arrowprops={"arrowstyle": "-", "color": "#444444", "lw": 0.8, "shrinkA": 1} if far else None,
                zorder=5,
            )
            text.update_positions(renderer)
            box = Text.get_window_extent(text, renderer).padded(2)  # the text alone, not its leader line
            inside = frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1)
            if inside and not any(box.overlaps(other) for other in placed):
                best = text
                break
            text.remove()
        if best is None:  # nowhere free: the nearest place, overlapping
            best = ax.annotate(name, (x, y), xytext=(6, 3), textcoords="offset points", fontsize=fontsize)
            best.update_positions(renderer)
        placed.append(Text.get_window_extent(best, renderer))


def _crowded_box(ax: Any, points: Sequence[tuple[float, float, str]]) -> tuple[float, ...] | None:
    """`(x0, x1, y0, y1)` in data units around the points too close together to label in place (each
    with at least `_CROWD` others within `_CROWD_PX` pixels), grown until it holds every point it
    touches with a margin; None when fewer than `_MIN_ZOOMED` points crowd. Measured on the drawn axes."""
    dots = [tuple(ax.transData.transform((x, y))) for x, y, _ in points]
    near = [sum(math.hypot(px - qx, py - qy) < _CROWD_PX for qx, qy in dots) - 1 for px, py in dots]
    chosen = [d for d, n in zip(dots, near, strict=True) if n >= _CROWD]
    if len(chosen) < _MIN_ZOOMED:
        return None
    while True:  # the box around the chosen dots, padded; then every dot inside it is chosen
        xs, ys = [d[0] for d in chosen], [d[1] for d in chosen]
        pad_x, pad_y = 0.06 * (max(xs) - min(xs)) + 6, 0.06 * (max(ys) - min(ys)) + 6  # pixels
        x0, x1, y0, y1 = min(xs) - pad_x, max(xs) + pad_x, min(ys) - pad_y, max(ys) + pad_y
        inside = [d for d in dots if x0 <= d[0] <= x1 and y0 <= d[1] <= y1]
        if len(inside) == len(chosen):
            break
        chosen = inside
    (dx0, dy0), (dx1, dy1) = ax.transData.inverted().transform([(x0, y0), (x1, y1)])
    return (dx0, dx1, dy0, dy1)


def _inside(box: tuple[float, ...], x: float, y: float) -> bool:
    return box[0] <= x <= box[1] and box[2] <= y <= box[3]


_CROWD_PX, _CROWD, _MIN_ZOOMED = 36.0, 3, 8


def _plain_log_ticks(axis: Any, subs: Sequence[float] = (1.0, 2.0, 5.0)) -> None:
    """Ticks at `subs` x 10^k on a log axis, written as plain numbers (0.5, 1, 2, 5, 10, ...)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=subs))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _draw_points(ax: Any, done: Sequence[dict[str, Any]], base: dict[str, Any] | None,
                 styles: dict[str, tuple[Any, str]], *, legend: bool) -> None:
    """One dot per measured mechanism in its family's style, the baseline as a star with guides."""
    families: set[str] = set()
    for r in done:
        if r is base:
            continue
        color, marker = styles[r["family"]]
        label = r["family"] if legend and r["family"] not in families else None
        families.add(r["family"])
        ax.scatter(r["latency_ms"], 100 * r["accuracy"], s=55, color=color, marker=marker, label=label,
                   zorder=3)
    if base is not None:
        bx, by = base["latency_ms"], 100 * base["accuracy"]
        label = "no attention (baseline)" if legend else None
        ax.scatter(bx, by, s=220, marker="*", color="black", label=label, zorder=4)
        ax.axhline(by, color="black", lw=0.8, ls="--", alpha=0.5, zorder=1)
        ax.axvline(bx, color="black", lw=0.8, ls="--", alpha=0.5, zorder=1)
    ax.axhline(100 / 3, color="#999999", lw=0.8, ls=":", zorder=1)
    ax.grid(alpha=0.3)


def _zoom(ax: Any, zoom: Any, box: tuple[float, ...], log: bool) -> None:
    """Set `zoom` to `box` and outline the box on `ax` (the zoom's title names the outline: a caption
    inside the box would sit on its points)."""
    from matplotlib.patches import Rectangle

    x0, x1, y0, y1 = box
    if log:
        zoom.set_xscale("log")
        _plain_log_ticks(zoom.xaxis, subs=range(1, 10))  # a decade or less: every digit
    zoom.set_xlim(x0, x1)
    zoom.set_ylim(y0, y1)
    zoom.set_xlabel("forward latency (ms)")
    zoom.set_ylabel("held-out accuracy (%)")
    zoom.set_title("the crowded corner, enlarged (the dashed box above)", fontsize=11)
    outline = Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ls="--", lw=1.0, color="#555555", zorder=2)
    ax.add_patch(outline)


def compare_chart(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str], *, title: str) -> None:
    """Save a PNG: held-out accuracy (%) against forward latency (ms) of every measured mechanism.

    Where many points crowd one corner (see `_crowded_box`), a second panel below enlarges it and
    labels its points; the chart above outlines that corner and labels the points outside it.

    Args:
        rows: `attnzoo compare` results (JSON `results`); rows without a latency or an accuracy
            (unsupported mechanisms) are left out of the picture, and the baseline `"none"` is
            drawn as a black star with dashed guide lines.
        path: PNG to write.
        title: The figure's title (what was run).
    """
    plt = pyplot("--plot")
    done = [r for r in rows if r.get("latency_ms") is not None and r.get("accuracy") is not None]
    base = next((r for r in done if r["name"] == "none"), None)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(12.5, 7.5), layout="constrained")
        styles = _family_styles(sorted({r["family"] for r in done if r is not base}))
        _draw_points(ax, done, base, styles, legend=True)
        latencies = [r["latency_ms"] for r in done] or [1.0]
        lo, hi = min(latencies), max(latencies)
        log = hi / lo > 4
        if log:
            ax.set_xscale("log")  # before the secondary axis, which takes the scale when made
            ax.set_xlim(lo / 1.3, hi * 1.5)
            _plain_log_ticks(ax.xaxis)
        else:
            ax.set_xlim(lo - 0.08 * (hi - lo) - 0.05 * lo, hi + 0.25 * (hi - lo) + 0.05 * hi)
        if base is not None:
            bx = base["latency_ms"]
            top = ax.secondary_xaxis("top", functions=(lambda ms: ms / bx, lambda ratio: ratio * bx))
            top.set_xlabel("latency relative to the baseline (× none)")
            if log:
                _plain_log_ticks(top.xaxis)
        chance = ax.annotate(
            "chance (33.3%)",
            (1, 100 / 3),
            xycoords=("axes fraction", "data"),
            xytext=(-4, -12),
            textcoords="offset points",
            ha="right",
            fontsize=9,
            color="#666666",
        )
        accuracies = [100 * r["accuracy"] for r in done] + [100 / 3]
        ax.set_ylim(min(accuracies) - 3, min(max(accuracies) + 4, 101))
        ax.set_xlabel("forward latency of the whole model, one batch (ms; lower is faster)")
        ax.set_ylabel("held-out accuracy (%; higher is better)")
        # Beside the axes, not over them: with two dozen families a legend inside hides points.
        ax.legend(
            loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, title="family", title_fontsize=10,
            framealpha=0.9, ncols=1 if len(styles) <= 20 else 2,
        )
        fig.suptitle(title)
        fig.canvas.draw()
        named = [(r["latency_ms"], 100 * r["accuracy"], r["name"]) for r in done]
        box = _crowded_box(ax, named)  # measured on the one-panel chart
        inner: list[tuple[float, float, str]] = []
        if box is not None:  # a second panel below, as tall as the first, enlarges the crowded corner
            fig.set_size_inches(12.5, 14)
            rows_of_two = fig.add_gridspec(2, 1)
            ax.set_subplotspec(rows_of_two[0])
            zoom = fig.add_subplot(rows_of_two[1])
            _draw_points(zoom, done, base, styles, legend=False)
            _zoom(ax, zoom, box, log)
            inner = [p for p in named if _inside(box, p[0], p[1])]
        fig.canvas.draw()
        star = [] if base is None else [(base["latency_ms"], 100 * base["accuracy"])]
        outside = [p for p in named if p not in inner]
        # the outlined corner is kept free of the outer points' labels
        region = [] if box is None else [_region(ax, box)]
        _place_labels(ax, outside, fontsize=10, avoid=[chance, *region], big=star)
        if inner:
            _place_labels(zoom, inner, fontsize=10, big=star)
        fig.savefig(path)
        plt.close(fig)


def _region(ax: Any, box: tuple[float, ...]) -> Any:
    """The display-space box (a `Bbox`) of the data-space `box` `(x0, x1, y0, y1)` on `ax`."""
    from matplotlib.transforms import Bbox

    (x0, y0), (x1, y1) = ax.transData.transform([(box[0], box[2]), (box[1], box[3])])
    return Bbox.from_extents(x0, y0, x1, y1)
