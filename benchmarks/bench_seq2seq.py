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

import argparse
import sys
from collections.abc import Callable

import torch
from torch import Tensor, nn

import attnzoo
from attnzoo import get_spec
from attnzoo.cli.harness import (
    alternate,
    count_flops,
    ensure_malloc_env,
    markdown_table,
    peak_memory,
    train_step,
)
from attnzoo.functional import fused_attn

B, LQ, LK, D, HIDDEN = 16, 64, 128, 256, 256  # an NMT-sized batch: 64 target x 128 source tokens
LONG = (4, 2048, 2048, 64)  # long sequences, where a kept score matrix costs memory
TARGET = "benchmarks.bench_seq2seq:make_step"  # run from the repository root


class NaiveConcat(nn.Module):
    """Rules 1 and 2 as written: concatenate each pair, linear, (tanh, v), softmax, weighted sum."""

    def __init__(self, ours: nn.Module) -> None:
        super().__init__()
        self.attn: nn.Module = ours.attn  # type: ignore[assignment]
        self.v: nn.Module | None = getattr(ours, "v", None)

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


RULES: dict[str, tuple[Callable[[int], nn.Module], type[nn.Module]]] = {
    "concat": (lambda d: attnzoo.ConcatAttention(d, d), NaiveConcat),
    "additive": (lambda d: attnzoo.AdditiveAttention(d, d, hidden_dim=HIDDEN), NaiveConcat),
    "dot": (lambda d: attnzoo.DotProductAttention(d), NaiveDot),
    "general": (lambda d: attnzoo.GeneralAttention(d, d), NaiveDot),
}

# (label, rule, (B, Lq, Lk, d)): the decoder-sized workload for every rule, and long sequences for the
# rules that run on `attend` (where the fused kernel's not keeping the score matrix matters).
CASES = [(rule, rule, (B, LQ, LK, D)) for rule in RULES] + [
    ("dot, long", "dot", LONG),
    ("general, long", "general", LONG),
]


def make_step(rule: str, which: str, shape: tuple[int, int, int, int]) -> Callable[[], object]:
    """Factory for :func:`peak_memory` and the timings: one forward + backward step.

    ``which``: ``attnzoo``, ``attnzoo_math`` (``attend`` on its math path) or ``naive``.
    """
    torch.manual_seed(0)
    b, lq, lk, d = shape
    ours = RULES[rule][0](d)
    module = RULES[rule][1](ours) if which == "naive" else ours
    step = train_step(module, [torch.randn(b, lq, d), torch.randn(b, lk, d), torch.randn(b, lk, d)])
    if which != "attnzoo_math":
        return step

    def math_step() -> object:
        with fused_attn(False):
            return step()

    return math_step


def main() -> int:
    parser = argparse.ArgumentParser(description="attnzoo seq2seq scoring rules vs. the literal forms")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (default: 2)")
    parser.add_argument("--rounds", type=int, default=11, help="alternating timing rounds (default: 11)")
    args = parser.parse_args()
    ensure_malloc_env()
    torch.set_num_threads(args.threads)
    rows = []
    for label, rule, shape in CASES:
        names = ["attnzoo", "naive"] + (["attnzoo_math"] if get_spec(rule).uses_attend else [])
        steps = {w: make_step(rule, w, shape) for w in names}
        timing = alternate(steps, rounds=args.rounds, warmup=2)
        mem = {w: peak_memory(TARGET, {"rule": rule, "which": w, "shape": shape}) / 2**20 for w in names}
        ours_flops = count_flops(steps["attnzoo"])
        math = (f"{timing.median('attnzoo_math') * 1e3:.1f} ({timing.ratio('attnzoo_math', 'naive'):.2f}), "
                f"{mem['attnzoo_math']:.0f} MB" if "attnzoo_math" in steps else "")
        rows.append([
            f"{label}", "x".join(map(str, shape)),
            f"{timing.median('attnzoo') * 1e3:.1f}", f"{timing.median('naive') * 1e3:.1f}",
            f"{timing.ratio('attnzoo', 'naive'):.2f}",
            f"{mem['attnzoo']:.0f}", f"{mem['naive']:.0f}",
            f"{ours_flops / 1e9:.2f} / {count_flops(steps['naive']) / 1e9:.2f}",
            f"{ours_flops / timing.median('attnzoo') / 1e9:.1f}", math,
        ])
    print(f"## seq2seq scoring rules (issue 8)\n\n"
          f"Forward + backward of `out.sum()`, float32, torch {torch.__version__}, {args.threads} thread(s); "
          f"shape = B x Lq x Lk x d (query (B, Lq, d), keys and values (B, Lk, d)); additive hidden "
          f"{HIDDEN}. `naive` writes each rule literally: rules 1-2 concatenate every (query, key) pair "
          f"into a (B, Lq, Lk, 2d) tensor; rule 3 and Luong's general score keep the score matrix. "
          f"Ratio = attnzoo / naive, median of per-round ratios (below 1 = attnzoo faster); MB = peak "
          f"resident memory one step adds (fresh process); GFLOP = matmul FLOPs counted by "
          f"torch.utils.flop_counter (attnzoo / naive; elementwise tanh not counted); GFLOP/s = attnzoo's "
          f"FLOPs / its time; last column = attnzoo with `attend` on its math path: ms (ratio to naive), "
          f"MB.\n")
    header = ["rule", "shape", "attnzoo ms", "naive ms", "ratio", "attnzoo MB", "naive MB", "GFLOP",
              "GFLOP/s", "math path"]
    print(markdown_table(header, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
