"""`attnzoo maps --train STEPS`: the mechanism is trained inside the demo network first, so its gates
show what it learnt instead of the flat values of an untrained gate."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.cli import command, demo
from attnzoo.maps import capture_maps


def _channel_gate(net: torch.nn.Module, image: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), capture_maps(net.attn) as maps:
        net.attn(net.stem(image))
    (channel,) = [m for records in maps.values() for m in records if m.kind == "channel"]
    return channel.data


def test_trained_gates_move_away_from_their_start():
    image = torch.rand(1, 3, 32, 32)
    untrained = demo.trained_net(attnzoo.get_spec("cbam"), 32, 0, seed=0)
    trained = demo.trained_net(attnzoo.get_spec("cbam"), 32, 20, seed=0)
    before = _channel_gate(untrained, image)
    after = _channel_gate(trained, image)
    assert before.shape == after.shape == (1, 32)
    assert (after - before).abs().max() > 1e-2, "twenty steps left the channel gate where it started"


def test_maps_title_says_how_the_mechanism_was_trained(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "m.png"
    assert command.main(["maps", "se", "--train", "3", "--size", "32", "--out", str(out)]) == 0
    assert out.stat().st_size > 1000
    assert command.main(["maps", "se", "--train", "-1", "--out", str(out)]) == 2
    assert "--train expects" in capsys.readouterr().err
    assert command.main(["maps", "se", "--train", "2", "--channels", "16", "--out", str(out)]) == 2
    assert "--channels applies with --train 0 only" in capsys.readouterr().err
