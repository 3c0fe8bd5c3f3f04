"""Pictures for the `attnzoo` command: benchmark charts and attention maps over images.

matplotlib (and Pillow, which it brings) is the optional extra `attnzoo[plots]`; it is imported
only here, only when a picture is asked for.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from attnzoo.maps.capture import AttentionMap

__all__ = [
    "MissingExtra",
    "pyplot",
    "load_image",
    "save_image",
    "heatmap",
    "plot_maps",
    "bench_chart",
    "grid_figure",
]


class MissingExtra(ImportError):
    """An optional dependency is not installed (the message says which extra to install)."""


def pyplot(what: str) -> Any:
    """`matplotlib.pyplot` on the Agg backend, or `MissingExtra` naming `what` needs it."""
    try:
        import matplotlib
    except ImportError:
        raise MissingExtra(f"{what} needs matplotlib: pip install 'attnzoo[plots]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def load_image(path: str | os.PathLike[str], size: int | None = None) -> Tensor:
    """An RGB image as a `(3, H, W)` float tensor in [0, 1], resized to `size x size` if given."""
    pyplot("reading an image")  # Pillow comes with matplotlib
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            pic = img.convert("F") if img.mode[0] in "IF" else None  # 16/32-bit grey, which RGB clips at 255,
            low, high = pic.getextrema() if pic is not None else (0.0, 1.0)  # is stretched to 0..255
            pic = img if pic is None else pic.point(lambda v: (v - low) * (255 / max(high - low, 1e-12)))
            rgb = pic.convert("RGB").resize((size, size) if size else pic.size, Image.Resampling.BILINEAR)
            data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    except FileNotFoundError:
        raise OSError(f"cannot read image {os.fspath(path)!r}: no such file") from None
    except (UnidentifiedImageError, OSError) as err:
        raise OSError(f"cannot read image {os.fspath(path)!r}: {err}") from None
    return data.reshape(rgb.height, rgb.width, 3).permute(2, 0, 1).float() / 255  # (3, H, W)


def save_image(image: Tensor, path: str | os.PathLike[str]) -> None:
    """Write a `(3, H, W)` tensor in [0, 1] as a PNG."""
    pyplot("writing an image")
    from PIL import Image

    pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()  # (H, W, 3)
    Image.fromarray(pixels.numpy()).save(path)


# ---------------------------------------------------------------------------------------------
# From a recorded map to 2-D heat maps


def _as_grid(grid: tuple[int, ...] | None, token_grid: tuple[int, int] | None) -> tuple[int, ...] | None:
    if grid is not None and len(grid) == 1 and token_grid is not None and math.prod(token_grid) == grid[0]:
        return token_grid
    return grid


def _plane(values: Tensor, grid: tuple[int, ...]) -> Tensor:
    """Values over `grid` as a 2-D map (the middle frame of a 3-D grid; a 1-D grid as one row)."""
    data = values.reshape(grid).float()
    if data.ndim == 3:
        data = data[data.shape[0] // 2]
    return data.reshape(1, -1) if data.ndim == 1 else data


def _query_yx(index: int, grid: tuple[int, ...]) -> tuple[float, float]:
    """Fractional (y, x) of a flat query index (centre of its cell)."""
    coords = []
    for size in reversed(grid):
        coords.append(index % size)
        index //= size
    coords = coords[::-1][-2:] if len(grid) >= 2 else [0, coords[0]]
    sizes = grid[-2:] if len(grid) >= 2 else (1, grid[0])
    return (coords[0] + 0.5) / sizes[0], (coords[1] + 0.5) / sizes[1]


@dataclass
class Panel:
    """One picture: a heat map over the image (with optional query marks) or a bar chart."""

    title: str
    heat: Tensor | None = None
    bars: Tensor | None = None
    marks: tuple[tuple[float, float], ...] = ()
    blocky: bool = False  # regions: upsample without smoothing
    xlabel: str = ""  # bar charts: what the bars run over


def panels(
    name: str, m: AttentionMap, token_grid: tuple[int, int] | None, sample: int = 0, max_queries: int = 5
) -> list[Panel]:
    """The panels that show one record for batch element `sample`."""
    data = m.data[sample].float()
    grid = _as_grid(m.grid, token_grid)
    if m.kind == "channel":
        return [Panel(f"{name}: channel weights", bars=data.flatten(), xlabel="channel")]
    if m.kind == "branch":
        per_branch = data.reshape(data.shape[0], -1).mean(-1)
        return [Panel(f"{name}: branch weights (mean over channels)", bars=per_branch, xlabel="branch")]
    if grid is None:
        return []
    if m.kind == "spatial":
        return [Panel(f"{name}: spatial map", heat=_plane(data, grid))]
    if m.kind == "rows":
        qgrid = _as_grid(m.query_grid, token_grid) or grid
        rows = data.mean(0)  # (Q, S): mean over heads
        queries = m.queries.tolist() if m.queries is not None else list(range(rows.shape[0]))
        out = []
        if isinstance(m.meta.get("query"), str):  # a query that is no position (the mean token)
            return [Panel(f"{name}: {m.meta['query']} query", heat=_plane(rows[0], grid))]
        labels = m.meta.get("labels")
        if isinstance(labels, (list, tuple)) and len(grid) > 1:  # queries that are no positions: named
            return [
                Panel(f"{name}: {label}", heat=_plane(row, grid))
                for label, row in list(zip(labels, rows, strict=False))[:max_queries]
            ]
        if len(grid) == 1:  # keys that are not positions on the map (channels, frames): bar charts
            unit = f" {m.meta['unit']}" if isinstance(m.meta.get("unit"), str) else ""
            return [
                Panel(f"{name}: query{unit} {q} of {grid[0]}", bars=row, xlabel=f"key{unit}")
                for q, row in list(zip(queries, rows, strict=False))[:max_queries]
            ]
        for q, row in list(zip(queries, rows, strict=False))[:max_queries]:
            mark = _query_yx(int(q), qgrid)
            out.append(
                Panel(
                    f"{name}: query {tuple(round(v, 2) for v in mark)}", heat=_plane(row, grid),
                    marks=(mark,),
                )
            )
        return out
    if m.kind == "routing":
        regions = math.prod(grid)
        chosen = data.long().reshape(regions, -1)  # (R, k)
        out = []
        from attnzoo.maps.capture import query_indices

        # The regions of the capture's query points (a record without them: those of the default points).
        for r in (m.queries if m.queries is not None else query_indices(grid))[:max_queries].tolist():
            hits = torch.zeros(regions)
            hits[chosen[r]] = 1.0
            hits[r] = max(hits[r].item(), 0.5)
            mark = _query_yx(r, grid)
            out.append(
                Panel(
                    f"{name}: regions routed from {tuple(round(v, 2) for v in mark)}",
                    heat=_plane(hits, grid),
                    marks=(mark,),
                    blocky=True,
                )
            )
        return out
    return []


def heatmap(m: AttentionMap, token_grid: tuple[int, int] | None, sample: int = 0) -> Tensor | None:
    """One 2-D summary of a record for batch element `sample`: the spatial map, the attention each
    position receives from the recorded queries (rows), or how often each region is routed to;
    None for channel and branch weights."""
    grid = _as_grid(m.grid, token_grid)
    if grid is None or m.kind in ("channel", "branch"):
        return None
    data = m.data[sample].float()
    if m.kind == "spatial":
        return _plane(data, grid)
    if m.kind == "rows":
        return _plane(data.mean(dim=(0, 1)), grid) if len(grid) > 1 else None
    counts = torch.bincount(data.long().flatten(), minlength=math.prod(grid)).float()
    return _plane(counts, grid)


def _upsample(heat: Tensor, size: tuple[int, int], blocky: bool = False) -> Tensor:
    low, high = heat.min(), heat.max()  # a flat map (one routed region, a 1 x 1 map): 1 where it is not 0
    heat = (heat != 0).to(heat.dtype) if high - low <= 1e-6 * high.abs() else (heat - low) / (high - low)
    if blocky:
        return F.interpolate(heat[None, None], size=size, mode="nearest")[0, 0]
    return F.interpolate(heat[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]


# ---------------------------------------------------------------------------------------------
# One style for every picture (maps, demo, bench charts): sized so that the text stays legible when
# the docs show a picture at about 700 pixels wide.

STYLE: dict[str, Any] = {
    "font.size": 12,
    "axes.titlesize": 12,
    "axes.labelsize": 11,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "figure.titlesize": 14,
    "figure.dpi": 100,
    "savefig.dpi": 100,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": False,
}
HEAT_CMAP = "inferno"  # perceptually uniform, legible in grey too
BAR_COLOR = "#3b6ea8"
ACCENT_COLOR = "#d9822b"
HEAT_ALPHA = 0.6
HEAT_LABEL = "relative attention\n(0 = panel min, 1 = max)"
PANEL_INCHES = 3.4


def _heat_image(ax: Any, image: Tensor | None, heat: Tensor, blocky: bool = False) -> Any:
    """Draw the image and the heat map over it (scaled to [0, 1]); returns the heat layer."""
    height, width = (image.shape[1], image.shape[2]) if image is not None else tuple(heat.shape)
    if image is not None:
        ax.imshow(image.permute(1, 2, 0).numpy())
    layer = ax.imshow(
        _upsample(heat, (height, width), blocky).numpy(),
        cmap=HEAT_CMAP,
        alpha=HEAT_ALPHA if image is not None else 1.0,
        vmin=0,
        vmax=1,
    )
    ax.set_xticks([])
    ax.set_yticks([])
    return layer


def _colorbar(fig: Any, axes: Any, layer: Any) -> None:
    """One labelled scale for every heat map of the figure, on its right."""
    bar = fig.colorbar(layer, ax=axes, fraction=0.025, pad=0.02, shrink=0.9)
    bar.solids.set_alpha(1.0)
    bar.set_label(HEAT_LABEL)
    bar.set_ticks([0, 0.5, 1])


def _draw(ax: Any, image: Tensor | None, panel: Panel) -> Any:
    """Draw one panel; returns its heat layer (None for a bar chart)."""
    ax.set_title(textwrap.fill(panel.title.replace(", ", ",\u00a0"), 36))  # 36 a panel; (y, x) stays whole
    if panel.bars is not None:
        values = panel.bars.numpy()
        ax.bar(range(len(values)), values, width=0.9, color=BAR_COLOR)
        ax.set_xlim(-0.5, len(values) - 0.5)
        ax.xaxis.get_major_locator().set_params(integer=True)  # bars are indexed: no 0.25 ticks
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel("weight")
        return None
    if panel.heat is None:
        ax.axis("off")
        return None
    layer = _heat_image(ax, image, panel.heat, panel.blocky)
    height, width = (image.shape[1], image.shape[2]) if image is not None else tuple(panel.heat.shape)
    for y, x in panel.marks:  # not clipped: a query on the map's edge keeps its whole mark
        ax.plot([x * width - 0.5], [y * height - 0.5], "+", color="white", ms=14, mew=3, clip_on=False)
        ax.plot([x * width - 0.5], [y * height - 0.5], "+", color="black", ms=10, mew=1.2, clip_on=False)
    return layer


def plot_maps(
    image: Tensor,
    maps: dict[str, list[AttentionMap]],
    path: str | os.PathLike[str],
    *,
    title: str,
    token_grid: tuple[int, int] | None = None,
    columns: int = 3,
    max_panels: int = 24,
) -> int:
    """Save a PNG grid: the image, then each module's maps over it (the first call's record of each
    kind), with one labelled colour scale. Returns the number of panels."""
    plt = pyplot("saving attention maps")
    items = [Panel("input image")]
    for name, records in maps.items():
        first_of_kind = {m.kind: m for m in reversed(records)}  # a module called twice: its first call
        for m in sorted(first_of_kind.values(), key=records.index):
            found = panels(name or "module", m, token_grid)
            if len(maps) == 1:  # one module: its name is in the figure title already
                for panel in found:
                    panel.title = panel.title.removeprefix(f"{name or 'module'}: ")
            items += found
    items = items[:max_panels]
    notes = [m.meta["note"] for rs in maps.values() for m in rs if isinstance(m.meta.get("note"), str)]
    title = "\n".join([title, *dict.fromkeys(notes)])  # what the weights are, where not plain softmax rows
    columns = min(columns, len(items))
    rows = math.ceil(len(items) / columns)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(
            rows, columns, figsize=(max(PANEL_INCHES * columns + 1.2, 0.12 * len(title.split("\n")[0])),
                                    PANEL_INCHES * rows + 0.6),
            squeeze=False, layout="constrained",
        )
        layer = None
        for ax in axes.flat:
            ax.axis("off")
        for ax, panel in zip(axes.flat, items, strict=False):
            ax.axis("on")
            if panel.heat is None and panel.bars is None:
                ax.imshow(image.permute(1, 2, 0).numpy())
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title(panel.title)
            else:
                layer = _draw(ax, image, panel) or layer
        if layer is not None:
            _colorbar(fig, axes, layer)
        fig.suptitle(title)
        fig.savefig(path)
        plt.close(fig)
    return len(items)


def grid_figure(
    images: Sequence[Tensor],
    rows: Sequence[tuple[str, Sequence[Tensor | None]]],
    path: str | os.PathLike[str],
    *,
    title: str,
) -> None:
    """Save a PNG: one column per image, the images on top, then one row of heat maps per label."""
    plt = pyplot("saving attention maps")
    n = len(images)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(
            len(rows) + 1, n, figsize=(2.2 * n + 1.6, 2.3 * (len(rows) + 1) + 0.5),
            squeeze=False, layout="constrained",
        )
        for j, image in enumerate(images):
            axes[0, j].imshow(image.permute(1, 2, 0).numpy())
            axes[0, j].set_xticks([])
            axes[0, j].set_yticks([])
        axes[0, 0].set_ylabel("test image")
        layer = None
        for i, (label, heats) in enumerate(rows, 1):
            for j, heat in enumerate(heats):
                ax = axes[i, j]
                ax.set_xticks([])
                ax.set_yticks([])
                if heat is None:
                    ax.axis("off")
                    continue
                layer = _heat_image(ax, images[j], heat)
            axes[i, 0].axis("on")
            axes[i, 0].set_ylabel(label, wrap=True)
        if layer is not None:
            _colorbar(fig, axes, layer)
        fig.suptitle(title)
        fig.savefig(path)
        plt.close(fig)


def bench_chart(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str], *, title: str) -> None:
    """Save a PNG: median latency per mechanism (bars), and latency against parameters (scatter)."""
    plt = pyplot("--plot")
    done = sorted((r for r in rows if r.get("latency_ms") is not None), key=lambda r: r["latency_ms"])
    with plt.rc_context(STYLE):
        fig, (left, right) = plt.subplots(
            1, 2, figsize=(13, max(4.0, 0.32 * len(done) + 1.8)), layout="constrained"
        )
        names = [r["name"] for r in done]
        left.barh(names, [r["latency_ms"] for r in done], color=BAR_COLOR)
        # Over the whole registry (0.4 to 1900 ms) a linear axis left most bars invisible.
        wide = len(done) > 1 and done[-1]["latency_ms"] > 100 * done[0]["latency_ms"]
        left.set(xscale="log" if wide else "linear", ylabel="mechanism", title="latency per mechanism",
                 xlabel="median latency (ms, log scale)" if wide else "median latency (ms)")
        left.invert_yaxis()
        left.grid(axis="x", alpha=0.3)
        for r in done:
            right.scatter(max(r["params"], 1), r["latency_ms"], color=ACCENT_COLOR)
            right.annotate(r["name"], (max(r["params"], 1), r["latency_ms"]), fontsize=9,
                           xytext=(3, 3), textcoords="offset points")
        right.set(xscale="log", yscale="log", xlabel="parameters (log scale)",
                  ylabel="median latency (ms, log scale)", title="latency against size")
        right.grid(alpha=0.3)
        fig.suptitle(title)
        fig.savefig(path)
        plt.close(fig)
