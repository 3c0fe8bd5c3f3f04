"""A mechanism joins every check by `@register` alone: a toy registered here goes through the
conformance suite, `attnzoo info`, `attnzoo bench`, `attnzoo.insert` and `attnzoo.create`."""

from __future__ import annotations

import inspect
import itertools
import json

import pytest
import test_conformance as conformance
import torch
from torch import Tensor, nn

import attnzoo
from attnzoo import _registry
from attnzoo._checks import check_shape
from attnzoo._registry import Example, register
from attnzoo.cli import command


class ToyGate(nn.Module):
    """A per-channel gate on the mean over H and W: `x * sigmoid(w * mean_hw(x) + b)`.

    Shape:
        - Input: (B, C, H, W)
        - Output: (B, C, H, W)
    """

    def __init__(self, channels: int, scale: float = 1.0, *, device=None, dtype=None) -> None:
        super().__init__()
        self.channels = channels
        self.weight = nn.Parameter(torch.full((channels,), scale, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(channels, device=device, dtype=dtype))

    def extra_repr(self) -> str:  # the conformance suite asks the repr to name the kept options
        return f"channels={self.channels}"

    def forward(self, x: Tensor) -> Tensor:
        check_shape(x, "ToyGate", "B C H W", C=self.channels)
        gate = torch.sigmoid(x.mean((2, 3)) * self.weight + self.bias)  # (B, C)
        return x * gate[:, :, None, None]  # (B, C) -> (B, C, 1, 1)


@pytest.fixture
def toy(monkeypatch):
    """Register ToyGate in a copy of the registry, so nothing leaks into other tests."""
    monkeypatch.setattr(_registry, "_REGISTRY", dict(_registry._REGISTRY))
    monkeypatch.setattr(_registry, "_ALIASES", dict(_registry._ALIASES))
    register(
        "toy_gate", family="toy", paper="A toy gate", year=2026, layout="NCHW",
        example=Example(kwargs={"channels": 4}, inputs=((2, 4, 5, 6),), output=(2, 4, 5, 6)),
    )(ToyGate)
    return attnzoo.get_spec("toy_gate")


def _grid(fn) -> list[dict]:
    """The parameter grid a conformance test runs over besides `spec`, read from its own marks."""
    options: dict[str, list] = {}
    for mark in getattr(fn, "pytestmark", []):
        if mark.name == "parametrize" and mark.args[0] != "spec":
            options[mark.args[0]] = list(mark.args[1])
    names = sorted(options)
    grid = itertools.product(*(options[n] for n in names))
    return [dict(zip(names, values, strict=True)) for values in grid]


def test_toy_goes_through_every_conformance_check(toy):
    checks = [f for n, f in inspect.getmembers(conformance, inspect.isfunction) if n.startswith("test_")]
    assert len(checks) >= 10
    for check in checks:
        for extra in _grid(check):
            check(spec=toy, **extra)


def test_toy_is_listed_and_built_by_name(toy):
    assert "toy_gate" in [s.name for s in attnzoo.list_modules()]
    assert isinstance(attnzoo.create("toy_gate", 8), ToyGate)
    assert isinstance(attnzoo.create("ToyGate", channels=8), ToyGate)


def test_attnzoo_info_describes_the_toy(toy, capsys):
    assert command.main(["info", "toy_gate", "--input", "1x8x6x6"]) == 0
    out = capsys.readouterr().out
    assert "ToyGate" in out and "A toy gate" in out and "channels" in out


def test_attnzoo_bench_times_the_toy(toy, capsys):
    argv = ["bench", "toy_gate", "--input", "1x8x6x6", "--rounds", "1", "--memory", "off", "--format", "json"]
    assert command.main(argv) == 0
    (row,) = json.loads(capsys.readouterr().out)["results"]
    assert row["name"] == "toy_gate" and row["status"] == "ok", row
    assert row["params"] == 16 and row["latency_ms"] > 0


def test_attnzoo_insert_places_the_toy(toy):
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    names = attnzoo.insert(net, "toy_gate", where=["0", "2"], example_input=torch.randn(1, 3, 6, 6))
    assert len(names) == 2
    gates = [m for m in net.modules() if isinstance(m, ToyGate)]
    assert [g.channels for g in gates] == [8, 8]
    assert net(torch.randn(2, 3, 6, 6)).shape == (2, 8, 6, 6)
