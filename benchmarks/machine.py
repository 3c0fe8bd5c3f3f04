"""The machine's own limits, to quote achieved rates against: float32 GEMM rate and copy bandwidth.

Run: python benchmarks/machine.py
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from attnzoo.cli.harness import alternate, ensure_malloc_env


def isa() -> str:
    """The widest x86 vector ISA the CPU reports ("AVX-512", "AVX2", or what torch's CPU capability says)."""
    try:
        flags = next(
            line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
        ).split()
    except (OSError, StopIteration):
        return torch.backends.cpu.get_cpu_capability()
    if "avx512f" in flags:
        return "AVX-512"
    return "AVX2" if "avx2" in flags else "no AVX2"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine() -> str:
    """One line naming the machine kind, the heading of its RESULTS.md tables."""
    return (
        f"{cpu_model()}, {isa()} (torch uses {torch.backends.cpu.get_cpu_capability()}), "
        f"{torch.get_num_threads()} threads"
    )


def gemm_gflops(n: int = 2048) -> float:
    """Median float32 GEMM rate (GFLOP/s) of an n x n x n product."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    timing = alternate({"mm": lambda: a @ b}, rounds=9, warmup=2)
    return 2 * n**3 / timing.median("mm") / 1e9


def copy_gbps(numel: int = 64 * 2**20) -> float:
    """Median memory-copy bandwidth (GB/s, bytes read + written) of a float32 clone."""
    src, dst = torch.randn(numel), torch.empty(numel)
    timing = alternate({"copy": lambda: dst.copy_(src)}, rounds=9, warmup=2)
    return 2 * 4 * numel / timing.median("copy") / 1e9


if __name__ == "__main__":
    ensure_malloc_env()
    print(f"machine: {describe_machine()}, torch {torch.__version__}")
    print(f"float32 GEMM 2048^3: {gemm_gflops():.0f} GFLOP/s")
    print(f"copy bandwidth: {copy_gbps():.1f} GB/s")
