"""Sequence attention (issue 8): attnzoo's scoring rules against the textbook way of writing them.

The references below build what the rules' descriptions say literally: rules 1 and 2 concatenate
every (query, key) pair into a ``(B, Lq, Lk, dq + dk)`` tensor before the linear layer; rule 3 and
Luong's general score form the ``(B, Lq, Lk)`` score matrix and keep it for backward. attnzoo splits
the concatenation's linear layer (``W [q; k] = W_q q + W_k k``) and sends dot products through the
fused ``attend``. Forward + backward, float32; medians of alternating rounds; peak memory per step
in a fresh process.

    PYTHONPATH=src python benchmarks/bench_seq2seq.py      # from the repository root
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import Tensor, nn

import attnzoo
from attnzoo.benchmark import (
    alternate,
    count_flops,
    ensure_malloc_env,
    markdown_table,
    peak_memory,
    train_step,
)

B, LQ, LK, D, DV, HIDDEN = 16, 64, 128, 256, 256, 256  # an NMT-sized batch: 64 target x 128 source tokens
TARGET = "benchmarks.bench_seq2seq:make_step"  # run from the repository root


class NaiveConcat(nn.Module):
    """Rules 1 and 2 as written: concatenate each pair, linear, (tanh, v), softmax, weighted sum."""

    def __init__(self, ours: nn.Module) -> None:
        super().__init__()
        self.attn = ours.attn
        self.v = getattr(ours, "v", None)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        pairs = torch.cat([q[:, :, None].expand(-1, -1, k.shape[1], -1),
                           k[:, None].expand(-1, q.shape[1], -1, -1)], dim=-1)  # (B, Lq, Lk, dq + dk)
        scores = self.attn(pairs)
        if self.v is not None:
            scores = self.v(torch.tanh(scores))
        return scores.squeeze(-1).softmax(-1) @ v  # (B, Lq, dv)


class NaiveDot(nn.Module):
    """Rule 3 / Luong general, scores kept: ``softmax(q' k^T s) v``."""

    def __init__(self, ours: nn.Module) -> None:
        super().__init__()
        self.attn = getattr(ours, "attn", None)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if self.attn is None:
            q = q / q.shape[-1] ** 0.5
        else:
            q = self.attn(q)
        return (q @ k.transpose(1, 2)).softmax(-1) @ v


RULES: dict[str, tuple[Callable[[], nn.Module], type[nn.Module]]] = {
    "concat": (lambda: attnzoo.ConcatAttention(D, D), NaiveConcat),
    "additive": (lambda: attnzoo.AdditiveAttention(D, D, hidden_dim=HIDDEN), NaiveConcat),
    "dot": (lambda: attnzoo.DotProductAttention(), NaiveDot),
    "general": (lambda: attnzoo.GeneralAttention(D, D), NaiveDot),
}


def make_step(rule: str, which: str) -> Callable[[], object]:
    """Factory for :func:`peak_memory` and the timings: one forward + backward step."""
    torch.manual_seed(0)
    ours = RULES[rule][0]()
    module = ours if which == "attnzoo" else RULES[rule][1](ours)
    inputs = [torch.randn(B, LQ, D), torch.randn(B, LK, D), torch.randn(B, LK, DV)]
    return train_step(module, inputs)


def main() -> int:
    ensure_malloc_env()
    torch.set_num_threads(2)
    rows = []
    for rule in RULES:
        steps = {"attnzoo": make_step(rule, "attnzoo"), "naive": make_step(rule, "naive")}
        timing = alternate(steps, rounds=11, warmup=2)
        flops = count_flops(steps["naive"])
        mem = {w: peak_memory(TARGET, {"rule": rule, "which": w}) for w in steps}
        rows.append([
            f"`{rule}`",
            f"{timing.median('attnzoo') * 1e3:.1f}",
            f"{timing.median('naive') * 1e3:.1f}",
            f"{timing.ratio('attnzoo', 'naive'):.2f}",
            f"{mem['attnzoo'] / 2**20:.0f}",
            f"{mem['naive'] / 2**20:.0f}",
            f"{flops / timing.median('attnzoo') / 1e9:.1f}",
        ])
    print(f"## seq2seq scoring rules (issue 8) (measured while other jobs shared the machine)\n\n"
          f"Forward + backward, float32, torch {torch.__version__}, 2 threads, query (B, Lq, d) = "
          f"({B}, {LQ}, {D}), keys/values ({B}, {LK}, {D}), additive hidden {HIDDEN}. "
          f"`naive` writes the rule "
          f"literally (rules 1-2: concatenate every pair; rule 3 / general: keep the score matrix). "
          f"Ratio = attnzoo / naive (median of per-round ratios, below 1 = attnzoo faster); memory = peak "
          f"resident set one step adds; GFLOP/s = the naive step's FLOPs / attnzoo's time.\n")
    header = ["rule", "attnzoo ms", "naive ms", "ratio", "attnzoo MB", "naive MB", "GFLOP/s"]
    print(markdown_table(header, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
