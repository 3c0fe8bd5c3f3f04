"""`attnzoo info NAME` for every registered and seed name, and `attnzoo bench --mode train` over the
whole registry: every mechanism is measured, none is skipped or silently dropped."""

from __future__ import annotations

import json

import pytest
import torch

import attnzoo
from attnzoo.cli import bench, command

NAMES = sorted({n for s in attnzoo.list_modules() for n in (s.name, s.seed_name) if n})


@pytest.mark.parametrize("name", NAMES)
def test_info_succeeds_for_every_name(name, capsys):
    assert command.main(["info", name]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    spec = attnzoo.get_spec(name)
    assert spec.cls.__name__ in out and "cannot" not in out.lower()


@pytest.mark.parametrize("mode", ["fwd", "train"])
def test_bench_measures_every_mechanism(mode, capsys, monkeypatch):
    # The default input, made small: a mechanism that cannot take it runs its registry example.
    monkeypatch.setattr(bench, "BENCH_INPUT", "2x16x8x8")
    argv = ["bench", "--mode", mode, "--rounds", "1", "--memory", "off", "--format", "json"]
    assert command.main(argv) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert sorted(r["name"] for r in results) == sorted(s.name for s in attnzoo.list_modules())
    skipped = {r["name"]: r["reason"] for r in results if r["status"] != "ok"}
    assert not skipped, f"bench --mode {mode} skipped {skipped}"
    assert all(r["latency_ms"] > 0 and r["flops"] >= 0 for r in results)
    # The counter counts matrix products and convolutions (attnzoo.flops), so only mechanisms that
    # are elementwise throughout (simam, shuffle) count 0; every one with a layer counts some.
    layered = {s.name for s in attnzoo.list_modules() if _has_layer(s.cls(**s.example.kwargs))}
    assert all(r["flops"] > 0 for r in results if r["name"] in layered)


def _has_layer(module: torch.nn.Module) -> bool:
    layers = (torch.nn.Linear, torch.nn.modules.conv._ConvNd, torch.nn.MultiheadAttention)
    return any(isinstance(m, layers) for m in module.modules())


def test_an_explicit_input_a_mechanism_cannot_take_is_reported_with_the_reason(capsys):
    argv = ["bench", "neighborhood_3d", "se", "--input", "2x16x8x8", "--rounds", "1", "--memory", "off"]
    assert command.main([*argv, "--format", "json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["results"]}
    assert rows["se"]["status"] == "ok"
    assert rows["neighborhood_3d"]["status"] == "skipped" and "clips" in rows["neighborhood_3d"]["reason"]
