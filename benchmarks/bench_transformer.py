"""Transformer family: multi-head, Swin window and temporal attention against their references.

Forward + backward, float32, alternating rounds (medians and median per-round ratios). References:
- ``torch.nn.MultiheadAttention(batch_first=True)`` with ``need_weights=False``, and a plain module
  following the seed's ``MultiHeadAttention`` step by step (three projections, matmul, softmax);
- timm's ``WindowAttention`` (its default, non-SDPA path, and its experimental SDPA path);
- a plain module following the STG-CMA temporal ``Attention`` step by step.

Run from the repository root: ``PYTHONPATH=src python benchmarks/bench_transformer.py``
(``--quick`` for fewer rounds). Prints a Markdown section for ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

import attnzoo
import attnzoo.compat
from attnzoo.cli.harness import (
    alternate,
    count_flops,
    ensure_malloc_env,
    markdown_table,
    peak_memory,
    train_step,
)

HERE = os.path.dirname(os.path.abspath(__file__))

MHA_SHAPE, MHA_HEADS = (8, 1024, 256), 8
WIN_SHAPE, WIN_DIM, WIN_SIZE, WIN_HEADS = (512, 49, 96), 96, (7, 7), 3
TEMP_SHAPE, TEMP_HEADS = (3136, 8, 96), 8


class SeedStyleMHA(nn.Module):
    """The seed's MultiHeadAttention algorithm, written plainly (returns the output only)."""

    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__()
        self.h, self.d = num_heads, d_model // num_heads
        self.Wq, self.Wk, self.Wv, self.fc = (nn.Linear(d_model, d_model) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        q, k, v = (w(x).view(b, -1, self.h, self.d).permute(0, 2, 1, 3) for w in (self.Wq, self.Wk, self.Wv))
        scores = q @ k.transpose(-1, -2) / torch.sqrt(torch.tensor(self.d, dtype=torch.float32))
        out = (torch.softmax(scores, dim=-1) @ v).permute(0, 2, 1, 3).reshape(b, -1, self.h * self.d)
        return self.fc(out)


class SelfAttention(nn.Module):
    """Calls a (query, key, value) module as self-attention and keeps its first output."""

    def __init__(self, module: nn.Module, torch_style: bool = False) -> None:
        super().__init__()
        self.module, self.torch_style = module, torch_style

    def forward(self, x: Tensor) -> Tensor:
        if self.torch_style:
            return self.module(x, x, x, need_weights=False)[0]
        return self.module(x, x, x)


class PlainTemporal(nn.Module):
    """The STG-CMA temporal ``Attention`` forward, written plainly."""

    def __init__(self, dim: int, frames: int, heads: int) -> None:
        super().__init__()
        self.h, self.t, self.scale = heads, frames, (dim // heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.randn(2 * frames - 1, heads) * 0.02)
        coords = torch.arange(frames)
        self.register_buffer("relative_coords", (coords[:, None] - coords[None, :] + frames - 1).view(-1))

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.h, c // self.h).permute(2, 0, 3, 1, 4)
        bias = (
            self.relative_position_bias_table[self.relative_coords].view(self.t, self.t, -1).permute(2, 0, 1)
        )
        attn = ((q @ k.transpose(-2, -1)) * self.scale + bias.unsqueeze(0)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


def build(name: str) -> tuple[nn.Module, list[Tensor]]:
    """A module and its input for one benchmark candidate."""
    torch.manual_seed(0)
    if name.startswith("mha"):
        e = MHA_SHAPE[-1]
        module = {
            "mha_attnzoo": lambda: SelfAttention(attnzoo.MultiHeadAttention(e, MHA_HEADS)),
            "mha_torch": lambda: SelfAttention(
                nn.MultiheadAttention(e, MHA_HEADS, batch_first=True), torch_style=True
            ),
            "mha_seed": lambda: SeedStyleMHA(e, MHA_HEADS),
        }[name]()
        return module, [torch.randn(*MHA_SHAPE)]
    if name.startswith("win"):
        if name == "win_attnzoo":
            module: nn.Module = attnzoo.WindowAttention(WIN_DIM, WIN_SIZE, WIN_HEADS)
        else:
            from timm.layers import set_fused_attn
            from timm.models.swin_transformer import WindowAttention as TimmWindowAttention

            set_fused_attn(name == "win_timm_sdpa", experimental=name == "win_timm_sdpa")
            module = TimmWindowAttention(WIN_DIM, WIN_HEADS, window_size=WIN_SIZE)
            set_fused_attn(True)
        return module, [torch.randn(*WIN_SHAPE)]
    dim, frames = TEMP_SHAPE[-1], TEMP_SHAPE[1]
    if name == "temporal_attnzoo":
        return attnzoo.TemporalAttention(dim, frames, TEMP_HEADS), [torch.randn(*TEMP_SHAPE)]
    return PlainTemporal(dim, frames, TEMP_HEADS), [torch.randn(*TEMP_SHAPE)]


def make_step(name: str) -> Callable[[], object]:
    """Factory for :func:`attnzoo.cli.harness.peak_memory` (runs in a fresh process)."""
    module, inputs = build(name)
    return train_step(module, inputs)


def compare(names: list[str], baseline: str, rounds: int, gemm: float) -> tuple[list[list[str]], int]:
    """One table: time, ratio, achieved GFLOP/s and peak memory of each candidate.

    Every candidate does the same arithmetic, so the FLOPs are counted once, on attnzoo's module with
    the fused path off (the CPU flash kernels report 0 FLOPs to the counter).
    """
    steps = {}
    for name in names:
        module, inputs = build(name)
        steps[name] = train_step(module, inputs)
    timing = alternate(steps, rounds=rounds, warmup=2)
    flops = count_flops(steps[next(n for n in names if n.endswith("attnzoo"))])
    rows = []
    for name in names:
        memory = peak_memory("bench_transformer:make_step", {"name": name})
        seconds = timing.median(name)
        rows.append(
            [
                f"`{name}`",
                f"{seconds * 1e3:.1f}",
                f"{timing.ratio(name, baseline):.3f}",
                f"{flops / seconds / 1e9:.1f}",
                f"{100 * flops / seconds / 1e9 / gemm:.0f}%",
                f"{memory / 2**20:.0f}",
            ]
        )
    return rows, flops


def gemm_rate() -> float:
    sys.path.insert(0, HERE)
    from machine import gemm_gflops

    return gemm_gflops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="5 rounds instead of 11")
    args = parser.parse_args()
    ensure_malloc_env()
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, os.environ.get("PYTHONPATH", "")) if p)
    rounds = 5 if args.quick else 11
    started = time.time()
    header = ["candidate", "median ms", "ratio", "GFLOP/s", "of GEMM rate", "peak MB"]
    gemm = gemm_rate()
    print("## Transformer family (mha, window, temporal)\n")
    print(
        f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {torch.get_num_threads()} threads, float32 "
        f"forward + backward; machine GEMM rate {gemm:.0f} GFLOP/s (2048^3). Ratio = median of per-round "
        f"ratios against the first row. FLOPs counted once per workload on the math path; "
        f"peak MB = memory one step adds.\n"
    )
    sections = [
        (
            f"MultiHeadAttention, self-attention on {MHA_SHAPE}, {MHA_HEADS} heads",
            ["mha_torch", "mha_attnzoo", "mha_seed"],
        ),
        (f"WindowAttention(96, (7, 7), 3) on {WIN_SHAPE}", ["win_timm", "win_attnzoo", "win_timm_sdpa"]),
        (f"TemporalAttention(96, 8, 8) on {TEMP_SHAPE}", ["temporal_plain", "temporal_attnzoo"]),
    ]
    for title, names in sections:
        rows, flops = compare(names, names[0], rounds, gemm)
        print(f"### {title}: {flops / 1e9:.2f} GFLOP per step\n")
        print(markdown_table(header, rows))
        print()
    print(f"(total {time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
