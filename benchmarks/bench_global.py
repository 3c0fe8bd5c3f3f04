"""Global self-attention (SAGAN spatial, non-local) against the seed's algorithm: time, memory, GFLOP/s.

Run from the repository root: ``PYTHONPATH=src python benchmarks/bench_global.py [--quick]``.
Prints a Markdown section for ``benchmarks/RESULTS.md``. Forward + backward of ``out.sum()``,
float32, the machine's default thread count; medians of alternating rounds, ratios ours / reference.

The references follow the seed document step by step (full ``N x N`` softmax); timm's
``NonLocalAttn(use_scale=False)`` computes the same non-local block and joins that comparison.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import gemm_gflops  # noqa: E402

from attnzoo import NonLocalBlock, SpatialSelfAttention  # noqa: E402
from attnzoo.cli.harness import (  # noqa: E402
    alternate,
    count_flops,
    ensure_malloc_env,
    markdown_table,
    peak_memory,
    train_step,
)
from attnzoo.kernels.blocked import global_kernel  # noqa: E402


class SeedSpatial(nn.Module):
    """The seed's ``Self_Attn_Spatial`` algorithm: bmm, softmax, bmm with the transposed map."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.query_conv = nn.Conv2d(in_dim, out_dim, 1)
        self.key_conv = nn.Conv2d(in_dim, out_dim, 1)
        self.value_conv = nn.Conv2d(in_dim, in_dim, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        b, c, w, h = x.size()
        query = self.query_conv(x).view(b, -1, w * h).permute(0, 2, 1)  # (B, N, d)
        key = self.key_conv(x).view(b, -1, w * h)  # (B, d, N)
        attention = torch.softmax(torch.bmm(query, key), dim=-1)  # (B, N, N)
        value = self.value_conv(x).view(b, -1, w * h)  # (B, C, N)
        out = torch.bmm(value, attention.permute(0, 2, 1)).view(b, c, w, h)  # (B, C, W, H)
        return self.gamma * out + x, attention


class SeedNonLocal(nn.Module):
    """The seed's ``NonLocalBlockND`` algorithm (2-D, no subsampling, BatchNorm on W)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.inter_channels = c1 = in_channels // 2
        self.g = nn.Conv2d(in_channels, c1, 1)
        self.theta = nn.Conv2d(in_channels, c1, 1)
        self.phi = nn.Conv2d(in_channels, c1, 1)
        self.W = nn.Sequential(nn.Conv2d(c1, in_channels, 1), nn.BatchNorm2d(in_channels))

    def forward(self, x: Tensor) -> Tensor:
        b = x.size(0)
        g_x = self.g(x).view(b, self.inter_channels, -1).permute(0, 2, 1)  # (B, N, C1)
        theta_x = self.theta(x).view(b, self.inter_channels, -1).permute(0, 2, 1)  # (B, N, C1)
        phi_x = self.phi(x).view(b, self.inter_channels, -1)  # (B, C1, N)
        f_div_c = F.softmax(torch.matmul(theta_x, phi_x), dim=-1)  # (B, N, N)
        y = torch.matmul(f_div_c, g_x).permute(0, 2, 1).contiguous()  # (B, C1, N)
        y = y.view(b, self.inter_channels, *x.size()[2:])  # (B, C1, H, W)
        return self.W(y) + x


def build(kind: str, shape: tuple[int, ...]) -> nn.Module:
    """One candidate, every one holding the same weights as the seed module of its family.

    The seed modules keep PyTorch's default initialisation, with ``gamma`` and the BatchNorm weight
    set to 0.5 so every parameter gets a gradient; the others load those weights (timm's under its
    own names). Equal weights give equal logits: with large logits, softmax produces subnormal
    probabilities and every GEMM on them slows down about 10x (timm's kaiming initialisation does
    that on its own), which would compare number formats rather than algorithms.
    """
    torch.manual_seed(0)
    c = shape[1]
    seed: nn.Module = SeedSpatial(c, c // 8) if "sagan" in kind else SeedNonLocal(c)
    with torch.no_grad():
        for name, p in seed.named_parameters():
            if name in ("gamma", "W.1.weight"):
                p.fill_(0.5)
    state = seed.state_dict()
    if kind in ("seed_sagan", "seed_nonlocal"):
        return seed
    if kind == "sagan":
        m: nn.Module = SpatialSelfAttention(c, rd_channels=c // 8)
    elif kind == "nonlocal":
        m = NonLocalBlock(c, pool_keys=False)
    elif kind == "timm_nonlocal":
        from timm.layers import NonLocalAttn

        m = NonLocalAttn(c, use_scale=False, rd_channels=c // 2)
        names = {"theta": "t", "phi": "p", "g": "g", "W.0": "z", "W.1": "norm"}
        state = {names[k.rsplit(".", 1)[0]] + "." + k.rsplit(".", 1)[1]: v for k, v in state.items()}
    else:
        raise ValueError(f"unknown candidate {kind!r}")
    m.load_state_dict(state, strict=True)
    return m


def make_step(kind: str, shape: list[int]) -> Callable[[], object]:
    """Factory for :func:`peak_memory`: a training step of one candidate.

    ``sagan`` runs the kernel `attnzoo.kernels.choose` picks for this machine (the default);
    ``sagan_sdpa`` and ``sagan_blocked`` force :func:`global_kernel` to ``"sdpa"`` (q and k
    zero-padded to the value width, SDPA's flash kernel) or to the blocked kernel.
    """
    torch.manual_seed(1)
    base, _, forced = kind.partition("_")
    forced = forced if base == "sagan" else ""
    step = train_step(build(base if forced else kind, tuple(shape)), [torch.randn(*shape)])
    if not forced:
        return step

    def forced_step() -> object:
        with global_kernel(forced):
            return step()

    return forced_step


def have_timm() -> bool:
    try:
        from timm.layers import NonLocalAttn  # noqa: F401
    except ImportError:
        return False
    return True


LABELS = {
    "seed_sagan": "seed Self_Attn_Spatial algorithm",
    "sagan": "SpatialSelfAttention(64, 8), kernel chosen by calibration (default)",
    "sagan_blocked": "SpatialSelfAttention(64, 8), blocked kernel",
    "sagan_sdpa": "SpatialSelfAttention(64, 8), padded SDPA flash",
    "seed_nonlocal": "seed NonLocalBlockND algorithm",
    "nonlocal": "NonLocalBlock(64, pool_keys=False), SDPA flash",
    "timm_nonlocal": "timm NonLocalAttn(use_scale=False)",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer rounds, skip N = 16384")
    parser.add_argument(
        "--n", type=int, nargs="*", default=None, help="only these N = H*W (1024, 4096, 16384)"
    )
    args = parser.parse_args()
    ensure_malloc_env()
    here = str(Path(__file__).resolve().parent)  # peak_memory's subprocess imports this file as bench_global
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)
    gemm = gemm_gflops()
    shapes = [(2, 64, 32, 32), (2, 64, 64, 64)] + ([] if args.quick else [(1, 64, 128, 128)])
    if args.n:
        shapes = [s for s in shapes if s[2] * s[3] in args.n]
    families = [
        ["seed_sagan", "sagan", "sagan_blocked", "sagan_sdpa"],
        ["seed_nonlocal", "nonlocal"] + (["timm_nonlocal"] if have_timm() else []),
    ]
    rows, flops_rows = [], []
    for shape in shapes:
        n = shape[2] * shape[3]
        rounds = 3 if args.quick else (11 if n <= 4096 else 5)
        for kinds in families:
            ref = kinds[0]
            steps = {k: make_step(k, list(shape)) for k in kinds}
            timing = alternate(steps, rounds=rounds, warmup=1 if n > 4096 else 2)
            flops = count_flops(steps[ref])
            memory = {
                k: peak_memory("bench_global:make_step", {"kind": k, "shape": list(shape)}) for k in kinds
            }
            for k in kinds:
                median = timing.median(k)
                ratio = timing.ratio(k, ref)
                mib, mem_ratio = memory[k] / 2**20, memory[k] / max(memory[ref], 1)
                rows.append(
                    [
                        LABELS[k],
                        f"`{shape}`",
                        n,
                        f"{median * 1e3:.1f}",
                        f"{ratio:.2f}",
                        f"{mib:.1f}",
                        f"{mem_ratio:.3f}",
                    ]
                )
                rate = flops / median / 1e9
                flops_rows.append(
                    [LABELS[k], f"`{shape}`", f"{flops / 1e9:.2f}", f"{rate:.0f}", f"{rate / gemm:.0%}"]
                )
    print("## Global self-attention: SAGAN spatial, non-local (issue 4)\n")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32 GEMM {gemm:.0f} GFLOP/s "
        "(benchmarks/machine.py). Forward + backward of `out.sum()`, float32; time and memory ratios "
        "relative to the seed's algorithm on the same shape (every candidate holds the same weights).\n"
    )
    header = ["candidate", "(B, C, H, W)", "N", "median ms", "time ratio", "peak MiB", "memory ratio"]
    print(markdown_table(header, rows))
    print(
        "\nAchieved rate: the seed algorithm's GEMM FLOPs (QK^T, PV and their gradients, convolutions; "
        "softmax, recomputation and padding not counted) divided by each candidate's median time.\n"
    )
    print(
        markdown_table(["candidate", "(B, C, H, W)", "GFLOP per step", "GFLOP/s", "of GEMM rate"], flops_rows)
    )


if __name__ == "__main__":
    main()
