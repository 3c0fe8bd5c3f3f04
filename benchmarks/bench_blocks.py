"""Seed 001's blocks: attnzoo's PyTorch SelfAttentionBlock against the same block elsewhere.

Candidates, all with the same sizes (B=8, L=512, D=256, 8 heads of 32) and float32:

- ``attnzoo``: :class:`attnzoo.SelfAttentionBlock` (Keras kernel layout, ``attend`` -> SDPA);
- ``torch_mha``: ``nn.MultiheadAttention(need_weights=False)`` + residual + ``nn.LayerNorm``, the
  plain PyTorch way to write the same block;
- ``keras``: the tutorial's Keras model (``attnzoo.blocks.keras.self_attention``) on Keras's torch
  backend, with the same weights (skipped when Keras is not installed).

Forward + backward, without and with the causal mask; median times, ratios (attnzoo / other),
GFLOP/s and peak memory. Run: ``PYTHONPATH=src python benchmarks/bench_blocks.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
from collections.abc import Callable

os.environ.setdefault("KERAS_BACKEND", "torch")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from attnzoo.blocks.transformer import self_attention  # noqa: E402
from attnzoo.cli.harness import (  # noqa: E402
    alternate,
    count_flops,
    ensure_malloc_env,
    markdown_table,
    peak_memory,
    train_step,
)

B, L, D, HEADS = 8, 512, 256, 8
HAVE_KERAS = importlib.util.find_spec("keras") is not None


class TorchBlock(nn.Module):
    """``LayerNorm(x + MHA(x))`` with PyTorch's own modules."""

    def __init__(self, causal: bool) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(D, HEADS, batch_first=True)
        self.norm = nn.LayerNorm(D, eps=1e-3)
        self.causal = causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1]) if self.causal else None
        out, _ = self.mha(x, x, x, need_weights=False, attn_mask=mask, is_causal=self.causal)
        return self.norm(x + out)


def build(name: str, causal: bool) -> nn.Module:
    torch.manual_seed(0)
    if name == "attnzoo":
        return self_attention((L, D), mask=causal, num_heads=HEADS, key_dim=D // HEADS)
    if name == "torch_mha":
        return TorchBlock(causal)
    from attnzoo.blocks import keras as akeras

    return akeras.self_attention((L, D), mask=causal, num_heads=HEADS, key_dim=D // HEADS)


def make_step(name: str, causal: bool) -> Callable[[], object]:
    """Factory for :func:`peak_memory`: a forward+backward step of one candidate."""
    torch.set_num_threads(2)
    x = torch.randn(B, L, D)
    return train_step(build(name, causal), [x])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=9, help="alternating timing rounds per mask")
    args = parser.parse_args()
    ensure_malloc_env()
    torch.set_num_threads(2)
    names = ["attnzoo", "torch_mha"] + (["keras"] if HAVE_KERAS else [])
    rows = []
    x = torch.randn(B, L, D)
    for causal in (False, True):
        modules = {n: build(n, causal) for n in names}
        steps = {n: train_step(m, [x]) for n, m in modules.items()}
        flops = count_flops(steps["attnzoo"])
        timing = alternate(steps, rounds=args.rounds, warmup=2)
        for n in names:
            mem = peak_memory("benchmarks.bench_blocks:make_step", {"name": n, "causal": causal})
            ratio = "1.00" if n == "attnzoo" else f"{timing.ratio('attnzoo', n):.2f}"
            rows.append(
                [
                    "causal" if causal else "full",
                    n,
                    f"{timing.median(n) * 1e3:.1f}",
                    ratio,
                    f"{flops / timing.median(n) / 1e9:.0f}",
                    f"{mem / 2**20:.0f}",
                ]
            )
            print(rows[-1], file=sys.stderr, flush=True)
    print(f"## blocks: SelfAttentionBlock (B={B}, L={L}, D={D}, {HEADS} heads of {D // HEADS})\n")
    print(
        f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads, float32, "
        "forward + backward. ratio = attnzoo time / that candidate's time (median of paired rounds); "
        "GFLOP/s = the attnzoo step's FLOPs (math path count) / that candidate's time.\n"
    )
    print(markdown_table(["mask", "candidate", "ms", "ratio attnzoo/this", "GFLOP/s", "peak MB"], rows))


if __name__ == "__main__":
    main()
