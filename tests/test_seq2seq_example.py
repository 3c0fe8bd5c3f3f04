"""examples/seq2seq_reverse.py: a shortened, fixed-seed run learns to reverse; its pieces work."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

PATH = Path(__file__).resolve().parents[1] / "examples" / "seq2seq_reverse.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("seq2seq_reverse", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def short(example, rule):
    """About a second of CPU per rule (64 steps on short sequences): far above chance (10%), not converged."""
    return example.Config(attention=rule, epochs=2, seed=0, train_size=1024, test_size=200, min_len=4,
                          max_len=6, test_len=5, batch_size=32, embed_dim=16, hidden=32, lr=1e-2)


@pytest.mark.parametrize("rule", ["concat", "additive", "dot", "general", "location"])
def test_short_run_learns_to_reverse(example, rule):
    # With this seed: concat 70%, additive 74%, dot 79%, general 82%, location 91%.
    result = example.run(short(example, rule))
    assert result.accuracy > 0.5, f"{rule}: token accuracy {result.accuracy:.2%} (chance is 10%)"
    assert result.weights.shape == (5, 5) and result.prediction.shape == (5,)
    torch.testing.assert_close(result.weights.sum(-1), torch.ones(5))


def test_data_targets_and_padding(example):
    cfg = example.Config(train_size=300, test_size=50, min_len=3, max_len=5, test_len=4)
    train, test = example.make_data(cfg, torch.Generator().manual_seed(0))
    assert len(train) == 300 and {len(s) for s in train} == {3, 4, 5}
    assert test.shape == (50, 4)
    seen = {tuple(s.tolist()) for s in train}
    assert not any(tuple(s.tolist()) in seen for s in test)  # held out
    src, mask = example.pad([torch.tensor([1, 2, 3]), torch.tensor([4, 5])])
    assert src.tolist() == [[1, 2, 3], [4, 5, example.PAD]]
    assert mask.tolist() == [[True, True, True], [True, True, False]]
    assert example.target_of(src, mask).tolist() == [[3, 2, 1], [5, 4, example.PAD]]


def test_padding_does_not_change_a_sequences_logits(example):
    torch.manual_seed(0)
    model = example.Seq2Seq(example.Config(attention="additive", embed_dim=8, hidden=8)).eval()
    src, mask = example.pad([torch.tensor([1, 2, 3, 4]), torch.tensor([5, 6])])
    target = example.target_of(src, mask)
    with torch.no_grad():
        both = model(src, mask, target)
        alone = model(src[1:, :2], mask[1:, :2], target[1:, :2])
    torch.testing.assert_close(both[1:, :2], alone, atol=1e-5, rtol=1e-5)


def test_unknown_rule_is_rejected(example):
    with pytest.raises(ValueError, match=r"attention must be one of .*got 'bilinear'"):
        example.Seq2Seq(example.Config(attention="bilinear"))
    with pytest.raises(SystemExit):
        example.main(["--attention", "bilinear"])


def fake_result(example):
    return example.Result(accuracy=1.0, anti_diagonal=1.0, seconds=0.0, cpu_seconds=0.0,
                          example=torch.arange(4), prediction=torch.arange(4).flip(0),
                          weights=torch.eye(4).flip(1))


def test_heatmap_png(example, tmp_path):
    pytest.importorskip("matplotlib")
    result = fake_result(example)
    out = tmp_path / "map.png"
    example.save_heatmap(result, str(out), "test")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_matplotlib_gives_a_clear_error(example, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    result = fake_result(example)
    with pytest.raises(ImportError, match=r"pip install \"attnzoo\[plots\]\""):
        example.save_heatmap(result, str(tmp_path / "map.png"), "test")
    with pytest.raises(SystemExit):
        example.main(["--epochs", "1", "--out", str(tmp_path / "map.png")])
