"""The demo's task generator, its CNN, and that it learns (short fixed-seed runs)."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli import _png_size, attnzoo_cmd

import attnzoo
from attnzoo.cli import demo
from attnzoo.surgery.build import Unsupported, build_nchw


def test_make_shapes_is_deterministic_and_well_formed():
    x, y, boxes = demo.make_shapes(40, seed=3)
    x2, y2, boxes2 = demo.make_shapes(40, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(boxes, boxes2)
    assert not torch.equal(x, demo.make_shapes(40, seed=4)[0])
    assert x.shape == (40, 3, 64, 64) and x.min() >= 0 and x.max() <= 1
    assert y.dtype == torch.long and set(y.tolist()) <= {0, 1, 2} and len(set(y.tolist())) == 3
    y0, x0, y1, x1 = boxes.unbind(1)
    assert (y0 >= 0).all() and (x0 >= 0).all() and (y1 <= 64).all() and (x1 <= 64).all()
    assert ((y1 - y0) >= 10).all() and ((x1 - x0) >= 10).all()


def test_the_box_holds_the_odd_shape_of_the_labelled_kind():
    # Read the kind back from the pixels in the odd shape's box: the bright pixels fill their own
    # bounding box fully (square), about pi/4 of it (circle) or about half (triangle).
    x, y, boxes = demo.make_shapes(60, seed=5, distractors=(1, 1))
    for image, label, box in zip(x, y.tolist(), boxes, strict=True):
        y0, x0, y1, x1 = box.tolist()
        bright = image[:, y0:y1, x0:x1].amax(0) > 0.45  # shapes are >= 0.5, the background <= 0.4
        rows, cols = bright.nonzero().unbind(1)
        fill = bright.sum().item() / ((rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)).item()
        kind = 1 if fill > 0.9 else 0 if fill > 0.6 else 2
        assert kind == label, (fill, label)


def test_peak_on_odd_shape():
    heat = torch.zeros(16, 16)
    heat[10, 3] = 1.0  # image pixels 40..43, 12..15
    hit, area = demo.peak_on_odd_shape(heat, torch.tensor([36, 8, 48, 20]))
    assert hit and abs(area - 144 / 4096) < 1e-9
    assert not demo.peak_on_odd_shape(heat, torch.tensor([0, 0, 16, 16]))[0]


def test_distractor_range_is_checked():
    with pytest.raises(ValueError, match="distractors"):
        demo.make_shapes(2, seed=0, distractors=(0, 9))


def test_the_cnn_learns_above_chance_with_a_short_fixed_seed_run():
    torch.manual_seed(0)
    train_x, train_y, _ = demo.make_shapes(640, seed=0)
    test_x, test_y, _ = demo.make_shapes(300, seed=1)
    model = demo.OddShapeNet()
    losses = demo.train(model, train_x, train_y, epochs=3, seed=0)
    assert losses[-1] < losses[0]
    accuracy = demo.evaluate(model, test_x, test_y)
    assert accuracy > 0.5, accuracy  # chance is 1/3


def test_an_attention_module_fits_the_cnn():
    names = [s.name for s in attnzoo.list_modules() if s.layout in ("NCHW", "NHWC")]
    if not names:
        pytest.skip("no map attention registered yet")
    for name in names:
        try:
            attention = build_nchw(attnzoo.get_spec(name), demo.OddShapeNet.channels, demo.OddShapeNet.grid)
        except Unsupported:
            continue
        model = demo.OddShapeNet(attention)
        out = model(torch.rand(2, 3, 64, 64))
        assert out.shape == (2, 3), name


def test_demo_command_writes_results_and_picture(tmp_path):
    names = [s.name for s in attnzoo.list_modules() if s.layout == "NCHW"]
    if not names:
        pytest.skip("no map attention registered yet")
    out, report = tmp_path / "demo.png", tmp_path / "demo.json"
    proc = attnzoo_cmd(
        "demo",
        "--attention",
        names[0],
        "--epochs",
        "1",
        "--train-size",
        "64",
        "--test-size",
        "32",
        "--out",
        str(out),
        "--json",
        str(report),
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads(report.read_text())
    assert [r["name"] for r in results] == ["none", names[0]]
    assert all(0 <= r["accuracy"] <= 1 and r["seconds"] > 0 for r in results)
    assert "test accuracy" in proc.stdout and "demo training" in proc.stderr
    if out.exists():  # only mechanisms with spatial maps draw a picture
        assert _png_size(out)[0] > 100


def test_the_baseline_training_time_does_not_carry_torchs_set_up(tmp_path, monkeypatch):
    # The first model trained (the baseline) paid torch's one-time set-up: 1.0 s against SE's 0.04 s,
    # so "none" read 25x slower than a model with attention. A throwaway step now runs before any timed
    # training (checked by the order of the calls, not by a clock).
    from attnzoo.cli import command as cli

    calls: list[int] = []
    real = demo.train

    def recording(model, x, *args, **kwargs):
        calls.append(len(x))  # the images each call trains on
        return real(model, x, *args, **kwargs)

    monkeypatch.setattr(demo, "train", recording)
    argv = ["--attention", "se", "--epochs", "1", "--train-size", "64", "--test-size", "8", "--out", ""]
    assert cli.main(["demo", *argv, "--json", str(tmp_path / "r.json")]) == 0
    assert calls == [2, 64, 64]  # the warm-up, then the baseline and se

