"""The machine's own limits, to quote achieved rates against: float32 GEMM rate and copy bandwidth.

Run: python benchmarks/machine.py
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
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


# An AVX-512 CPU run with every library held to AVX2 code: torch's own kernels, MKL's GEMMs and
# oneDNN's convolutions. It stands in for the AVX2 machine kind when only an AVX-512 one is at hand
# (same cores and memory; the instruction set the kernels may use is the AVX2 kind's).
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "DNNL_MAX_CPU_ISA": "AVX2"}


def reexec_with_isa(isa_name: str) -> None:
    """Re-execute this process with the libraries held to `isa_name` ("avx2"), once."""
    if isa_name == "native" or all(os.environ.get(k) == v for k, v in AVX2_ENV.items()):
        return
    if isa_name != "avx2":
        raise ValueError(f"--isa expects 'native' or 'avx2', got {isa_name!r}")
    os.environ.update(AVX2_ENV)
    os.execv(sys.executable, [sys.executable, *sys.argv])


def describe_machine() -> str:
    """One line naming the machine kind, the heading of its RESULTS.md tables."""
    used = torch.backends.cpu.get_cpu_capability()
    capped = " held to AVX2 code (" + ", ".join(f"{k}={v}" for k, v in AVX2_ENV.items()) + ")"
    held = capped if isa() == "AVX-512" and used == "AVX2" else ""
    return f"{cpu_model()}, {isa()}{held} (torch kernels: {used}), {torch.get_num_threads()} threads"


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
    argparse.ArgumentParser(description=__doc__).parse_args()  # no options: --help, or refuse others
    ensure_malloc_env()
    print(f"machine: {describe_machine()}, torch {torch.__version__}")
    print(f"float32 GEMM 2048^3: {gemm_gflops():.0f} GFLOP/s")
    print(f"copy bandwidth: {copy_gbps():.1f} GB/s")
