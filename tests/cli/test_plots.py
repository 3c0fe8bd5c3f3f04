"""The bench chart as a reader sees it."""

from __future__ import annotations

import importlib.util

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None, reason="matplotlib (attnzoo[plots]) is not installed"
)


def _bars_scale(latencies, tmp_path, monkeypatch):
    """The x scale of the latency bars of `bench_chart`, as saved."""
    from matplotlib.figure import Figure

    from attnzoo.cli.plots import bench_chart

    saved = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: saved.append(fig))
    rows = [{"name": f"m{i}", "latency_ms": t, "params": 10 * (i + 1)} for i, t in enumerate(latencies)]
    bench_chart(rows, tmp_path / "b.png", title="t")
    return saved[0].axes[0].get_xscale(), saved[0].axes[0].get_xlabel()


def test_latency_bars_use_a_log_axis_when_they_span_more_than_100x(tmp_path, monkeypatch):
    # The whole registry spans 0.4 to 1900 ms: on a linear axis half the bars were invisible slivers.
    assert _bars_scale([0.4, 2.0, 30.0, 1900.0], tmp_path, monkeypatch) == (
        "log", "median latency (ms, log scale)"
    )
    assert _bars_scale([0.2, 0.35, 0.5], tmp_path, monkeypatch) == ("linear", "median latency (ms)")


def test_routing_panels_show_the_regions_of_the_chosen_query_points():
    # `attnzoo maps bra --queries "0,0;1,1"` drew the routing of the default points (centre and quadrants):
    # the plot asked for the query regions after the capture had closed.
    import torch

    import attnzoo
    from attnzoo.cli.plots import panels

    bra = attnzoo.create("bra", dim=8, num_heads=2, n_win=4, topk=2).eval()
    with torch.no_grad(), attnzoo.capture_maps(bra, queries=[(0.0, 0.0), (1.0, 1.0)]) as maps:
        bra(torch.randn(1, 8, 8, 8))
    routing = next(m for m in maps["BiLevelRoutingAttention"] if m.kind == "routing")
    marks = [p.marks for p in panels("bra", routing, None)]
    assert marks == [((0.125, 0.125),), ((0.875, 0.875),)]  # the corner regions of the 4 x 4 grid


def test_query_marks_on_the_map_edge_are_drawn_whole():
    # A query in a corner had three quarters of its "+" clipped by the axes: a barely visible speck.
    import torch

    from attnzoo.cli.plots import Panel, _draw, pyplot

    plt = pyplot("test")
    fig, ax = plt.subplots()
    panel = Panel("query (0.01, 0.01)", heat=torch.rand(8, 8), marks=((0.0625, 0.0625),))
    _draw(ax, torch.rand(3, 16, 16), panel)
    marks = [line for line in ax.lines if line.get_marker() == "+"]
    assert len(marks) == 2 and not any(line.get_clip_on() for line in marks)
    plt.close(fig)
