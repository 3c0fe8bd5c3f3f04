"""`attnzoo compare`: every registered mechanism on the demo's CNN, side by side (a `--quick` run)."""

from __future__ import annotations

import csv
import importlib.util
import json

import pytest
import torch
from test_cli import _png_size, attnzoo_cmd

import attnzoo
from attnzoo.cli import command as cli
from attnzoo.cli import compare
from attnzoo.cli.demo import OddShapeNet
from attnzoo.surgery.build import Unsupported, build_nchw

NAMES = [s.name for s in attnzoo.list_modules()]
HAS_MPL = importlib.util.find_spec("matplotlib") is not None


def _why_unsupported(name: str) -> str | None:
    try:
        build_nchw(attnzoo.get_spec(name), OddShapeNet.channels, OddShapeNet.grid)
    except Unsupported as err:
        return str(err).splitlines()[0]
    return None


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One `--quick` run over every registered mechanism, writing the table, CSV, JSON and the plot."""
    tmp = tmp_path_factory.mktemp("compare")
    paths = {"csv": tmp / "c.csv", "json": tmp / "c.json", "plot": tmp / "c.png"}
    args = ["compare", "--quick", "--csv", str(paths["csv"]), "--json", str(paths["json"])]
    proc = attnzoo_cmd(*args, *(["--plot", str(paths["plot"])] if HAS_MPL else []))
    assert proc.returncode == 0, proc.stderr
    return proc, paths


def test_json_holds_every_mechanism_and_the_baseline_with_positive_numbers(quick):
    _, paths = quick
    report = json.loads(paths["json"].read_text())
    rows = {r["name"]: r for r in report["results"]}
    assert list(rows) == ["none", *NAMES]
    assert report["config"] == {**compare.QUICK, "seed": 0}
    assert report["machine"]["threads"] >= 1 and report["machine"]["cpu"]
    assert set(report["columns"]) == set(report["results"][0])
    base = rows["none"]
    assert base["status"] == "ok" and base["attn_params"] == 0 and base["attn_flops_per_image"] == 0
    assert base["latency_ratio"] == 1.0
    for name, row in rows.items():
        why = None if name == "none" else _why_unsupported(name)
        if why is not None:  # reported with build_nchw's reason, not dropped
            assert row["status"] == "unsupported" and row["reason"] == why, row
            assert row["accuracy"] is None and row["latency_ms"] is None
            continue
        assert row["status"] == "ok", row
        assert row["model_params"] == base["model_params"] + row["attn_params"], name
        assert row["flops_per_image"] >= base["flops_per_image"] + row["attn_flops_per_image"] * 0.99, name
        for key in (
            "model_params",
            "flops_per_image",
            "latency_ms",
            "latency_ratio",
            "peak_train_mb",
            "train_s",
        ):
            assert row[key] > 0, (name, key, row[key])
        assert 0 <= row["accuracy"] <= 1
        # Accuracy is a share of the held-out images.
        n = compare.QUICK["test_size"]
        assert round(row["accuracy"] * n) / n == pytest.approx(row["accuracy"], abs=1e-12)


def test_csv_and_table_hold_the_same_rows(quick):
    proc, paths = quick
    report = json.loads(paths["json"].read_text())
    rows = list(csv.DictReader(paths["csv"].open()))
    assert [r["name"] for r in rows] == ["none", *NAMES]
    assert list(rows[0]) == list(compare.COLUMNS)
    for got, want in zip(rows, report["results"], strict=True):
        assert got["status"] == want["status"] and got["reason"] == want["reason"]
        if want["accuracy"] is not None:
            assert float(got["accuracy"]) == pytest.approx(want["accuracy"])
    lines = proc.stdout.splitlines()
    assert "latency ms" in lines[1] and "accuracy" in lines[1]
    first_cells = [ln.split()[0] for ln in lines[3:] if ln.strip()]
    for row in report["results"]:
        if row["status"] == "ok":
            assert row["name"] in first_cells
        else:
            assert f"  {row['name']}: {row['status']}: {row['reason']}" in proc.stdout
    assert "not measured:" in proc.stdout or all(r["status"] == "ok" for r in report["results"])
    assert "compare [" in proc.stderr  # the progress bar


@pytest.mark.skipif(not HAS_MPL, reason="matplotlib (attnzoo[plots]) is not installed")
def test_plot_is_written(quick):
    proc, paths = quick
    width, height = _png_size(paths["plot"])
    assert width >= 800 and height >= 500
    assert f"wrote {paths['plot']}" in proc.stdout


def test_every_backbone_starts_from_the_same_weights():
    names = [n for n in NAMES if _why_unsupported(n) is None][:3]
    base = compare._model("none", 5).state_dict()
    for name in names:
        model = compare._model(name, 5).state_dict()
        for key, value in base.items():  # the stem and the head; the attention is extra
            torch.testing.assert_close(model[key], value, rtol=0, atol=0, msg=f"{name}: {key}")


def test_flags_given_explicitly_win_over_quick():
    args = cli.build_parser().parse_args(["compare", "--quick", "--epochs", "3"])
    cfg = compare.settings(args)
    assert cfg == {**compare.QUICK, "epochs": 3, "seed": 0}
    assert compare.settings(cli.build_parser().parse_args(["compare"])) == {**compare.DEFAULTS, "seed": 0}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["compare", "--epochs", "0"], "--epochs expects a positive count, got 0"),
        (["compare", "--batch", "-2"], "--batch expects a positive count, got -2"),
        (["compare", "--train-size", "0"], "--train-size expects a positive count"),
        (["compare", "--rounds", "0"], "--rounds expects a positive count"),
        (["compare", "no_such_attention"], "unknown attention 'no_such_attention'"),
    ],
)
def test_bad_arguments_are_one_line_exit_2(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("attnzoo: error: ") and message in err[0], err


def test_bad_option_exits_2_with_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["compare", "--format", "xml"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--format" in err[0]


def test_peak_memories_measures_each_job_and_isolates_failures():
    from attnzoo.cli.harness import peak_memories

    seen = []
    jobs = [{"name": name, "batch": 4, "seed": 0} for name in ("none", "no_such_attention", "none")]
    sizes = peak_memories("attnzoo.cli.compare:memory_step", jobs, on_result=lambda i, b: seen.append(i))
    assert sizes[1] is None and seen == [0, 1, 2]
    assert sizes[0] > 0 and sizes[2] > 0
