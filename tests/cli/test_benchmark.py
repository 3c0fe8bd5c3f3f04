"""The benchmark harness: FLOP counts against hand counts, alternating rounds, subprocess memory."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

import attnzoo
from attnzoo.cli.harness import alternate, count_flops, markdown_table, peak_memory, train_step
from attnzoo.functional import attend


def test_count_flops_matmul_and_attention_on_math_path():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    assert count_flops(lambda: a @ b) == 2 * 8 * 16 * 4
    q = k = v = torch.randn(2, 3, 10, 4)
    # QK^T and (weights)V: 2 * (B*h*L*S*d) each, even though SDPA's CPU kernel reports 0.
    assert count_flops(lambda: attend(q, k, v)) == 2 * 2 * (2 * 3 * 10 * 10 * 4)


def test_count_flops_depthwise_conv_backward_is_corrected():
    conv = nn.Conv2d(32, 32, 3, padding=1, groups=32)
    x = torch.randn(2, 32, 8, 8, requires_grad=True)
    forward = 2 * 2 * 32 * 9 * 64  # batch * C_out * (C_in/groups) * k*k * H*W, times 2
    assert count_flops(lambda: conv(x).sum().backward()) == 3 * forward


def test_alternate_collects_rounds_and_ratios():
    calls: list[str] = []
    timing = alternate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=4, warmup=1)
    assert len(timing.rounds["a"]) == len(timing.rounds["b"]) == 4
    assert calls[2:6] == ["a", "b", "b", "a"]  # after warm-up, the order alternates
    assert timing.ratio("a", "a") == 1.0
    assert timing.median("a") >= 0


def make_big_step(n: int = 2048):
    """Factory for the subprocess memory test: a step that holds an (n, n) float32 matrix."""
    x = torch.randn(n, 16)

    def step():
        return (x @ x.T).sum()

    return step


def test_peak_memory_in_subprocess_sees_large_temporary(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent) + ":" + ":".join(sys.path))
    peak = peak_memory("test_benchmark:make_big_step", {"n": 2048})
    assert 2048 * 2048 * 4 * 0.9 < peak < 2048 * 2048 * 4 * 4


def test_train_step_runs_backward():
    lin = nn.Linear(4, 3)
    step = train_step(lin, [torch.randn(2, 4)])
    step()
    assert lin.weight.grad is not None


def test_markdown_table():
    assert markdown_table(["a", "b"], [[1, 2]]) == "| a | b |\n|---|---|\n| 1 | 2 |"
    assert attnzoo.cli.harness is not None
