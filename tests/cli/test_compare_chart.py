"""The compare chart as a reader sees it: every mechanism labelled once, no label over another or over a
dot, and the crowded corner enlarged in a second panel only where points crowd."""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None, reason="matplotlib (attnzoo[plots]) is not installed"
)

DOCS_DATA = Path(__file__).resolve().parents[2] / "docs" / "data" / "compare.json"


def _draw(rows, tmp_path, monkeypatch):
    """Draw the chart; returns `(labels, dots)` of each panel that has points, as saved."""
    from matplotlib.figure import Figure

    from attnzoo.cli.compare_chart import compare_chart

    saved = {}
    original = Figure.savefig

    def save(fig, *args, **kwargs):
        fig.canvas.draw()
        saved["panels"] = [_labels_and_dots(ax) for ax in fig.axes if ax.collections]  # not the top axis
        return original(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", save)
    compare_chart(rows, tmp_path / "c.png", title="t")
    return saved["panels"]


def _labels_and_dots(ax):
    from matplotlib.text import Annotation, Text

    renderer = ax.figure.canvas.get_renderer()
    labels = {
        t.get_text(): Text.get_window_extent(t, renderer)
        for t in ax.texts
        if isinstance(t, Annotation) and "chance" not in t.get_text()
    }
    dots = [ax.transData.transform(tuple(o)) for c in ax.collections for o in c.get_offsets()]
    return labels, dots


def test_docs_chart_labels_every_point_once_without_overlaps(tmp_path, monkeypatch):
    rows = json.loads(DOCS_DATA.read_text())["results"]
    panels = _draw(rows, tmp_path, monkeypatch)
    assert len(panels) == 2, "the docs' crowded corner gets its enlarged panel"
    seen: list[str] = []
    for labels, dots in panels:
        seen += labels
        boxes = list(labels.items())
        for i, (name, box) in enumerate(boxes):
            for other, second in boxes[i + 1:]:
                assert not box.overlaps(second), f"labels {name!r} and {other!r} overlap"
            assert not any(box.contains(x, y) for x, y in dots), f"label {name!r} covers a dot"
    measured = [r["name"] for r in rows if r.get("latency_ms") is not None and r.get("accuracy") is not None]
    assert sorted(seen) == sorted(measured)


def test_a_few_spread_points_get_one_panel(tmp_path, monkeypatch):
    rows = [
        {"name": n, "family": "gating", "latency_ms": ms, "accuracy": acc}
        for n, ms, acc in [("none", 1.0, 0.5), ("se", 2.0, 0.6), ("cbam", 5.0, 0.7), ("sk", 20.0, 0.4)]
    ]
    panels = _draw(rows, tmp_path, monkeypatch)
    assert len(panels) == 1 and sorted(panels[0][0]) == ["cbam", "none", "se", "sk"]
    width, height = struct.unpack(">II", (tmp_path / "c.png").read_bytes()[16:24])  # PNG header
    assert height / width < 0.7, "one panel: no blank room left for a second"
