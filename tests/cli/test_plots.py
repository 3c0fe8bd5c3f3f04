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
