"""The attnzoo command, driven as a user would (a subprocess), and the input builder behind it."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attnzoo
from attnzoo.cli import command as cli
from attnzoo.surgery.build import (
    Geometry,
    Unsupported,
    build,
    build_nchw,
    geometry,
    input_shapes,
    parse_shape,
)

SRC = Path(__file__).resolve().parents[2] / "src"
SPECS = attnzoo.list_modules()
NAMES = [s.name for s in SPECS]


def attnzoo_cmd(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run(
        [sys.executable, "-m", "attnzoo", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=cwd,
    )


def _needs(names: list[str]) -> None:
    if not names:
        pytest.skip("no registered mechanism of the kind this test needs (families not merged yet)")


def _recording_nchw() -> list[str]:
    """Registered mechanisms that run on feature maps and record maps, cheapest families first."""
    from attnzoo.maps import capture_maps

    found = []
    for spec in SPECS:
        try:
            module = build_nchw(spec, 8, (8, 8)).eval()
        except Unsupported:
            continue
        with torch.no_grad(), capture_maps(module) as maps:
            module(torch.rand(1, 8, 8, 8))
        if maps:
            found.append(spec.name)
    return found


def _png_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        return img.size


def _one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr  # one line, no traceback
    assert lines[0].startswith("attnzoo: error: ")
    return lines[0]


# ---------------------------------------------------------------------------------------------
# Subprocess: what a user runs


def test_help_names_every_command():
    proc = attnzoo_cmd("--help")
    assert proc.returncode == 0
    for command in ("list", "info", "bench", "maps", "demo", "compare"):
        assert command in proc.stdout


def test_list_csv_holds_every_mechanism(tmp_path):
    out = tmp_path / "list.csv"
    proc = attnzoo_cmd("list", "--input", "1x16x8x8", "--format", "csv", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(out.open()))
    assert [r["name"] for r in rows] == NAMES
    for row, spec in zip(rows, SPECS, strict=False):
        assert row["family"] == spec.family and row["paper"] == spec.paper and int(row["year"]) == spec.year
        assert row["note"] or int(row["params"]) >= 0 and int(row["flops"]) >= 0
    # The table goes to stdout as well, with the stated input.
    assert "1x16x8x8" in proc.stdout
    for name in NAMES:
        assert name in proc.stdout


def test_info_shows_docstring_arguments_shapes_and_costs():
    names = [s.name for s in SPECS if s.layout == "NCHW"]
    _needs(names)
    spec = attnzoo.get_spec(names[0])
    proc = attnzoo_cmd("info", spec.cls.__name__, "--input", "2x16x6x6")  # the class name is an alias
    assert proc.returncode == 0, proc.stderr
    first_doc_line = (spec.cls.__doc__ or "").strip().splitlines()[0]
    assert first_doc_line in proc.stdout
    assert "constructor arguments:" in proc.stdout
    assert "input  (2, 16, 6, 6)" in proc.stdout
    assert "output (2, 16, 6, 6)" in proc.stdout
    assert "FLOPs forward" in proc.stdout and "parameters" in proc.stdout


def test_bench_every_mechanism_csv_and_plot(tmp_path):
    out, plot = tmp_path / "bench.csv", tmp_path / "bench.png"
    proc = attnzoo_cmd(
        "bench",
        "--input",
        "1x8x8x8",
        "--rounds",
        "1",
        "--memory",
        "off",
        "--format",
        "csv",
        "-o",
        str(out),
        "--plot",
        str(plot),
    )
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in csv.DictReader(out.open())}
    assert sorted(rows) == sorted(NAMES)
    for name, row in rows.items():
        if row["status"] == "ok":
            assert float(row["latency_ms"]) > 0 and int(row["params"]) >= 0 and int(row["flops"]) >= 0, name
        else:
            assert row["status"] == "skipped" and row["reason"], name
            assert f"{name}: {row['reason']}" in proc.stdout  # listed with the reason
    assert "bench 1x8x8x8" in proc.stderr  # the progress bar
    if NAMES:
        assert _png_size(plot)[0] > 100


def test_bench_named_json_with_memory_train_mode(tmp_path):
    names = [s.name for s in SPECS if s.layout == "NCHW"][:2]
    _needs(names)
    out = tmp_path / "bench.json"
    aliases = [attnzoo.get_spec(n).all_names[-1] for n in names]  # by alias or seed name
    proc = attnzoo_cmd(
        "bench",
        *aliases,
        "--input",
        "2x8x6x6",
        "--mode",
        "train",
        "--rounds",
        "2",
        "--format",
        "json",
        "-o",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["mode"] == "train" and report["input"] == "2x8x6x6" and report["memory"] == "shared"
    assert [r["name"] for r in report["results"]] == names
    for row in report["results"]:
        assert row["status"] == "ok", row
        assert row["peak_mb"] is not None and row["peak_mb"] >= 0
        assert row["gflops_per_s"] > 0


def test_maps_png_on_sample_and_on_a_given_image(tmp_path):
    names = _recording_nchw()
    _needs(names)
    out = tmp_path / "maps.png"
    # The same 8-channel 8 x 8 maps the mechanisms were picked on (untrained, on image features).
    same = ("--train", "0", "--channels", "8", "--size", "16")
    proc = attnzoo_cmd("maps", names[0], "--out", str(out), *same)
    assert proc.returncode == 0, proc.stderr
    assert _png_size(out)[0] > 200
    from attnzoo.cli.plots import save_image

    image = tmp_path / "in.png"
    save_image(torch.rand(3, 20, 30), image)
    out2 = tmp_path / "maps2.png"
    proc = attnzoo_cmd(
        "maps",
        names[-1],
        "--image",
        str(image),
        "--out",
        str(out2),
        *same,
        "--queries",
        "0.5,0.5;0.1,0.9",
    )
    assert proc.returncode == 0, proc.stderr
    assert _png_size(out2)[0] > 200


@pytest.mark.parametrize(
    "args, expected",
    [
        (("bench", "sq_excite_typo", "--input", "1x8x8x8"), "unknown attention 'sq_excite_typo'"),
        (("bench", "--input", "8x256xfoo"), "--input expects sizes joined by 'x'"),
        (("maps", "ANY", "--image", "/nonexistent/x.png"), "cannot read image"),
    ],
)
def test_errors_are_one_line_exit_2(args, expected):
    if args[1] == "ANY":
        _needs(NAMES)
        args = (args[0], NAMES[0], *args[2:])
    line = _one_error_line(attnzoo_cmd(*args))
    assert expected in line


def test_unknown_name_suggests_close_names():
    names = [n for n in NAMES if len(n) >= 3]
    _needs(names)
    typo = names[0] + "zq"
    line = _one_error_line(attnzoo_cmd("info", typo))
    assert f"did you mean {names[0]!r}" in line or repr(names[0]) in line


def test_debug_shows_the_traceback():
    proc = attnzoo_cmd("--debug", "bench", "--input", "0x1x2x2")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


# ---------------------------------------------------------------------------------------------
# In process: the parser and the input builder


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--input", "1x2"], "BxCxHxW"),
        (["bench", "--input", "1x0x4x4"], "positive"),
        (["bench", "--rounds", "0", "--input", "1x4x4x4"], "--rounds expects a positive"),
        (["maps", "x", "--queries", "a,b"], "--queries expects"),
        (["maps", "x", "--queries", "2,3"], "--queries expects fractions in [0, 1]"),
        # a folder that is not there is refused before the work, not after it
        (["bench", "--input", "1x4x4x4", "--plot", "/nonexistent/d/x.png"], "folder '/nonexistent/d' does"),
        (["maps", "x", "--out", "/nonexistent/x.png"], "--out '/nonexistent/x.png': the folder"),
        (["bench", "--input", "1x4x4x4", "-o", "."], "is a folder; expected a file name"),
        (["compare", "--memory", "off"], "unrecognized arguments: --memory (see 'attnzoo compare --help')"),
        (["--bogus", "list"], "unrecognized arguments: --bogus (see 'attnzoo --help')"),
        (["compare", "--json", "/nonexistent/r.json"], "--json '/nonexistent/r.json': the folder"),
        (["compare", "--csv", "/nonexistent/r.csv"], "--csv '/nonexistent/r.csv': the folder"),
        (["demo", "--epochs", "0"], "--epochs expects a positive"),
        (["list", "--family", "no_such_family"], "no mechanism in family"),
        (["maps", "se", "--train", "0", "--channels", "0"], "--channels expects a positive count, got 0"),
        (["maps", "se", "--train", "0", "--channels", "-3"], "--channels expects a positive count, got -3"),
        (["info", "se", "--input", "99999999999x8x4x4"], "--input expects at most 2**31 elements"),
        # a value starting with a dash was read by argparse as an option: "expected one argument"
        (["info", "se", "--input", "-1x8x4x4"], "--input expects positive sizes, got '-1x8x4x4'"),
        (["maps", "x", "--queries", "-0.2,0.5"], "--queries expects fractions in [0, 1]"),
        # the format is refused before any training (it failed in matplotlib after it)
        (["maps", "se", "--out", "maps.txt"], "--out expects a picture file (avif, eps"),
        (["demo", "--attention", "se", "--out", "demo.txt"], "--out expects a picture file"),
        # a chart format matplotlib lacks is refused before the measurements (it failed after them)
        (["bench", "se", "--input", "1x4x4x4", "--memory", "off", "--plot", "b.txt"],
         "--plot expects a picture file (avif"),
        # an empty file name or input was ignored (the default used) or failed only after the work
        (["bench", "se", "--input", "1x4x4x4", "--memory", "off", "-o", ""], "-o/--output expects a file"),
        (["bench", "se", "--input", "1x4x4x4", "--memory", "off", "--plot", ""], "--plot expects a file"),
        (["demo", "--attention", "se", "--epochs", "1", "--train-size", "4", "--test-size", "4", "--out", "",
          "--json", ""], "--json expects a file name, got ''"),
        (["bench", "se", "--memory", "off", "--rounds", "1", "--input", ""], "--input expects a value"),
        (["info", "se", "--input", ""], "--input expects a value, got ''"),
        (["list", "--family", "gating", "--input", ""], "--input expects a value, got ''"),
        # an empty name ran nothing (bench) or only the baseline (demo)
        (["bench", "", "--input", "1x4x4x4", "--memory", "off"], "a mechanism name is expected"),
        (["demo", "--attention", "", "--epochs", "1", "--train-size", "4", "--test-size", "4", "--out", ""],
         "a mechanism name is expected (such as se or se,cbam), got ''"),
        # 0 raised ZeroDivisionError; a negative size trained nothing and reported untrained accuracy
        (["demo", "--batch-size", "0", "--attention", "se", "--out", ""], "--batch-size expects a positive"),
        (["demo", "--batch-size", "-4", "--attention", "se", "--epochs", "1", "--train-size", "4",
          "--test-size", "4", "--out", ""], "--batch-size expects a positive count, got -4"),
    ],
)
def test_user_errors_in_process(argv, message, capsys):
    if argv[0] == "maps":
        _needs(NAMES)
        argv[1] = NAMES[0]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


@pytest.mark.parametrize("option", [("--image", ""), ("--queries", "0.5"), ("--queries", "0.5,0.2,0.9")])
def test_maps_refuses_an_empty_image_and_points_that_are_not_y_x(option, tmp_path, capsys):
    """`--image ''` drew the sample image; a point of one or three values was drawn at another point."""
    out = tmp_path / "m.png"
    assert cli.main(["maps", "se", "--train", "0", "--out", str(out), *option]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and option[0] + " expects" in err[0] and not out.exists()


def test_list_names_the_axes_of_the_input_it_was_given(capsys):
    assert cli.main(["list", "--family", "gating", "--input", "1x64x16"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "at input 1x64x16 (B x L x C," in first  # it said B x C x H x W for every input


@pytest.mark.parametrize(
    ("argv", "attr", "value"),
    [
        (["maps", "se", "-o", "m.png"], "out", "m.png"),
        (["maps", "se", "--output", "m.png"], "out", "m.png"),
        (["demo", "-o", "d.png"], "out", "d.png"),
        (["demo", "--batch", "8"], "batch_size", 8),
        (["compare", "--batch-size", "8"], "batch", 8),
        (["compare", "--batch", "8"], "batch", 8),
    ],
)
def test_an_option_is_spelt_the_same_in_every_subcommand(argv, attr, value):
    # demo said --batch-size and compare --batch; list/bench wrote -o/--output and maps/demo --out
    assert getattr(cli.build_parser().parse_args(argv), attr) == value


def test_dash_values_are_glued_to_their_option_but_not_past_the_end_of_options():
    # `--input -1x8x4x4` reaches its check; after `--` words are positional as typed (it became "--=-1",
    # which argparse read as an ambiguous option)
    assert cli._glue_dashed_values(["info", "se", "--input", "-1x8"]) == ["info", "se", "--input=-1x8"]
    assert cli._glue_dashed_values(["maps", "se", "--seed", "-5"]) == ["maps", "se", "--seed=-5"]
    assert cli._glue_dashed_values(["info", "--", "-1x8", "--x", "-2"]) == ["info", "--", "-1x8", "--x", "-2"]
    assert cli.build_parser().parse_args(cli._glue_dashed_values(["info", "--", "-1"])).name == "-1"


def test_bad_option_is_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--mode", "sideways"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--mode" in err[0]


def test_geometry_and_layout_conversion():
    assert parse_shape("8x256x56") == (8, 256, 56)  # a token input
    assert geometry((2, 3, 4, 5)) == Geometry(2, 3, (4, 5))
    assert geometry((2, 9, 3)) == Geometry(2, 3, (9,))
    assert geometry((2, 3, 4, 5, 6)) == Geometry(2, 3, (4, 5, 6))
    for spec in SPECS:
        try:
            shapes = input_shapes(spec, Geometry(2, 16, (6, 8)))
        except Unsupported as err:
            assert str(err)
            continue
        first = shapes[0]
        expected = {
            "NCHW": (2, 16, 6, 8),
            "NHWC": (2, 6, 8, 16),
            "NLC": (2, 48, 16),
            "NCL": (2, 16, 48),
        }.get(spec.layout)
        if expected is not None and spec.input_rule == "layout":
            assert first == expected, spec.name
        if spec.layout == "SEQ2SEQ" and spec.input_rule == "layout":
            assert first == (2, 1, 16), spec.name
        if spec.input_rule == "self":  # the map's tokens attend to themselves
            assert all(s == (2, 48, 16) for s in shapes), spec.name


def test_every_mechanism_builds_and_runs_on_a_map_or_says_why():
    for spec in SPECS:
        try:
            built = build(spec, (2, 16, 14, 14))
        except Unsupported as err:
            assert str(err), spec.name
            continue
        with torch.no_grad():
            out = built.module.eval()(*built.inputs)
        out = out[0] if isinstance(out, tuple) else out
        assert torch.isfinite(out).all(), spec.name


@pytest.mark.parametrize("shape", [(2, 64, 16), (1, 49, 24)])
def test_every_mechanism_builds_on_a_square_token_input_or_says_why(shape):
    """A square token sequence is a map: no mechanism may fail in its constructor on it (bottleneck was
    given feat_size=(64,), the sequence's length)."""
    for spec in SPECS:
        try:
            built = build(spec, shape)
        except Unsupported as err:
            assert "cannot be built with" not in str(err), f"{spec.name}: {err}"
            continue
        with torch.no_grad():
            out = built.module.eval()(*built.inputs)
        assert torch.isfinite(out[0] if isinstance(out, tuple) else out).all(), spec.name


def test_build_nchw_keeps_the_map_shape():
    x = torch.randn(2, 16, 14, 14)
    for spec in SPECS:
        try:
            module = build_nchw(spec, 16, (14, 14)).eval()
        except Unsupported:
            continue
        with torch.no_grad():
            assert module(x).shape == x.shape, spec.name


def test_sample_image_ships_with_the_package():
    from attnzoo.cli.plots import load_image

    image = load_image(cli.sample_image())
    assert image.shape == (3, 112, 112) and 0 <= image.min() and image.max() <= 1


def test_pictures_without_matplotlib_say_which_extra_to_install(tmp_path):
    names = [s.name for s in SPECS if s.layout == "NCHW"]
    _needs(names)
    fake = tmp_path / "fake" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake.parent), str(SRC)])}
    proc = subprocess.run(
        [sys.executable, "-m", "attnzoo", "maps", names[0], "--train", "0", "--out", str(tmp_path / "m.png")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    line = _one_error_line(proc)
    assert "needs matplotlib" in line and "attnzoo[plots]" in line


def test_a_reader_that_closes_the_pipe_stops_it_quietly():
    """`attnzoo info window | head -1`: no 'Broken pipe' error, the shell's SIGPIPE status (141).
    The read end is closed before the command writes, so every write meets the closed pipe."""
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "attnzoo", "info", "window"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # as `head` does once it has its lines
    err = proc.stderr.read().decode()
    assert (proc.wait(timeout=600), err) == (141, "")
