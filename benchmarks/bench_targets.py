"""The speed targets of issue 21, against each workload's own lower bound, for training, inference
and compiled inference.

    PYTHONPATH=src python benchmarks/bench_targets.py [--part train infer compile] [--only sagan mha]

Workloads (the anchors' algorithms are the ones the family scripts use):

| workload | attnzoo | anchors | target |
|---|---|---|---|
| `sagan` | `SpatialSelfAttention(64, rd_channels=8)`, (2, 64, 64, 64) | the seed's algorithm | <= 0.60 |
| `nonlocal` | `NonLocalBlock(64, pool_keys=False)`, same input | the seed's algorithm, timm | <= 0.75 |
| `mha` | `MultiHeadAttention(256, 8)`, (8, 1024, 256) | `torch.nn.MultiheadAttention` | <= 0.90 |
| `window` | `WindowAttention(96, 7, 3)`, (512, 49, 96) | timm's `WindowAttention` | <= 0.85, peak <= |
| `sk` | `SKConv(64)`, (8, 64, 56, 56) | the seed's SKEConv, timm's SelectiveKernel | <= 0.90 |
| `bra` | `BiLevelRoutingAttention`, seed's arguments, (8, 28, 28, 512) | the official algorithm | <= 0.50 |

Every figure is a median of alternating rounds; ratios are medians of per-round ratios against the
workload's first anchor. The bound (`bound.py`) is the first anchor's GEMMs (for `mha` those of the
seed's plain algorithm, since torch's module hides its attention products inside SDPA), each replayed alone at
the rate this machine reaches for its shape, plus the bytes no algorithm avoids at the measured copy
bandwidth; "x bound" is each candidate's time divided by it. Inference runs `eval()` under
`torch.inference_mode()` at batch 1 and at the serving batch (the training batch); the compile part
runs the same serving-batch inference through `torch.compile` (default mode) for every candidate.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_biformer  # noqa: E402
import bench_gating  # noqa: E402
import bench_global  # noqa: E402
import bench_transformer  # noqa: E402
from bound import lower_bound, min_bytes  # noqa: E402
from machine import copy_gbps, describe_machine, reexec_with_isa  # noqa: E402

from attnzoo.cli.harness import alternate, ensure_malloc_env, markdown_table, peak_memory, train_step  # noqa: E402


@dataclass(frozen=True)
class Workload:
    title: str
    shape: tuple[int, ...]  # the serving / training input; batch 1 slices its first dimension
    batch1: int  # first-dimension size of the batch-1 input (windows per image for `window`)
    candidates: tuple[str, ...]  # anchors first (the first is the ratio and bound reference), then ours
    target: float
    # The plain algorithm the bound is traced from, when the first anchor hides its products inside
    # a fused kernel (torch's MultiheadAttention calls SDPA, whose attention GEMMs the trace cannot see).
    bound_reference: str = ""


WORKLOADS = {
    "sagan": Workload("SAGAN spatial, N = 4096", (2, 64, 64, 64), 1, ("seed", "attnzoo"), 0.60),
    "nonlocal": Workload("Non-local, N = 4096", (2, 64, 64, 64), 1, ("seed", "timm", "attnzoo"), 0.75),
    "mha": Workload(
        "Multi-head self-attention, 8 heads", (8, 1024, 256), 1, ("torch", "attnzoo"), 0.90, "seed"
    ),
    "window": Workload("Swin window attention 7x7, 3 heads", (512, 49, 96), 64, ("timm", "attnzoo"), 0.85),
    "sk": Workload("Selective kernel, M = 2", (8, 64, 56, 56), 1, ("seed", "timm", "attnzoo"), 0.90),
    "bra": Workload(
        "BiLevelRoutingAttention, seed's arguments", (8, 28, 28, 512), 1, ("official", "attnzoo"), 0.50
    ),
}


def build(workload: str, candidate: str) -> nn.Module:
    """The module of one candidate (anchors and ours hold the same weights where the family script
    arranges it: SAGAN, non-local and BRA)."""
    torch.manual_seed(0)
    if workload in ("sagan", "nonlocal"):
        family = "sagan" if workload == "sagan" else "nonlocal"
        kind = {"seed": f"seed_{family}", "timm": "timm_nonlocal", "attnzoo": family}[candidate]
        return bench_global.build(kind, WORKLOADS[workload].shape)
    if workload == "mha":
        module, _ = bench_transformer.build(f"mha_{candidate}")
        return module
    if workload == "window":
        module, _ = bench_transformer.build(f"win_{candidate}")
        return module
    if workload == "sk":
        factories = bench_gating.workloads()["sk"][1]
        return factories["attnzoo+bn" if candidate == "attnzoo" else candidate]()
    if workload == "bra":
        module, _ = bench_biformer.build("bra_seed", "ours" if candidate == "attnzoo" else "ref")
        return module
    raise ValueError(f"unknown workload {workload!r}")


def make_input(workload: str, batch: int | None = None) -> Tensor:
    shape = list(WORKLOADS[workload].shape)
    if batch is not None:
        shape[0] = batch
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


def infer_step(module: nn.Module, x: Tensor) -> Callable[[], object]:
    module.eval()

    def step() -> object:
        with torch.inference_mode():
            return module(x)

    return step


def make_step(workload: str, candidate: str, mode: str, batch: int | None = None) -> Callable[[], object]:
    """Factory for `peak_memory` (runs in a fresh process): one training or inference step."""
    module, x = build(workload, candidate), make_input(workload, batch)
    return train_step(module.train(), [x]) if mode == "train" else infer_step(module, x)


def _out_numel(module: nn.Module, x: Tensor) -> int:
    with torch.no_grad():
        out = module.eval()(x)
    return (out[0] if isinstance(out, tuple) else out).numel()


def bound_of(workload: str, mode: str, batch: int | None, bandwidth: float) -> float:
    spec = WORKLOADS[workload]
    reference, x = build(workload, spec.bound_reference or spec.candidates[0]), make_input(workload, batch)
    nbytes = min_bytes(reference, [x], _out_numel(reference, x), training=mode == "train")
    step = train_step(reference.train(), [x]) if mode == "train" else infer_step(reference, x)
    return lower_bound(step, nbytes, bandwidth).seconds


def measure(
    workload: str, mode: str, batch: int | None, rounds: int, bandwidth: float, memory: bool
) -> list[list[str]]:
    spec = WORKLOADS[workload]
    steps = {c: make_step(workload, c, mode, batch) for c in spec.candidates}
    if mode == "compile":
        steps = {}
        for c in spec.candidates:
            module = torch.compile(build(workload, c).eval())
            steps[c] = infer_step(module, make_input(workload, batch))
    min_time = 0.2 if batch == spec.batch1 and mode != "train" else 0.0
    timing = alternate(steps, rounds=rounds, warmup=2, min_time=min_time)
    bound = bound_of(workload, "train" if mode == "train" else "infer", batch, bandwidth)
    base = spec.candidates[0]
    peaks: dict[str, str] = {}
    for c in spec.candidates:
        if memory and mode != "compile":
            kwargs = {"workload": workload, "candidate": c, "mode": mode, "batch": batch}
            peaks[c] = f"{peak_memory('bench_targets:make_step', kwargs) / 2**20:.0f}"
        else:
            peaks[c] = "-"
    rows = []
    for c in spec.candidates:
        ratios = ", ".join(
            f"{timing.ratio(c, a):.2f} vs {a}" for a in spec.candidates if a != c and c == "attnzoo"
        )
        rows.append(
            [
                workload,
                mode if batch is None else f"{mode}, batch {batch}",
                c,
                f"{timing.median(c) * 1e3:.2f}",
                ratios or "-",
                f"{timing.median(c) / bound:.2f}",
                peaks[c],
            ]
        )
    rows[0][5] += f" (bound {bound * 1e3:.2f} ms)"
    del base
    return rows


def profile(workload: str, mode: str, batch: int | None, top: int = 8) -> str:
    """Where attnzoo's step spends its time: the top aten ops by self CPU time (torch.profiler)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step = make_step(workload, "attnzoo", mode, batch)
    step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    rows = [
        [
            f"`{e.key}`",
            e.count // 3,
            f"{e.self_cpu_time_total / 3 / 1e3:.2f}",
            f"{e.self_cpu_time_total / total:.0%}",
        ]
        for e in events[:top]
    ]
    return markdown_table(["op", "calls per step", "self ms per step", "share"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", nargs="*", default=["train", "infer", "compile"])
    parser.add_argument("--only", nargs="*", default=list(WORKLOADS))
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--profile", type=float, default=1.5, help="profile attnzoo above this x bound")
    parser.add_argument("--isa", default="native", help="'avx2': hold MKL, oneDNN and torch to AVX2 code")
    args = parser.parse_args()
    reexec_with_isa(args.isa)
    ensure_malloc_env()
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p)
    bandwidth = copy_gbps()
    started = time.time()
    print(f"## Targets of issue 21 on {describe_machine()}\n")
    print(
        f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__}, float32, "
        f"copy bandwidth {bandwidth:.1f} GB/s. Ratios: median of per-round ratios; x bound: median time / "
        "the workload's lower bound (bench_targets.py, bound.py).\n"
    )
    header = ["workload", "mode", "candidate", "median ms", "ratio", "x bound", "peak MiB"]
    profiles = []
    for part in args.part:
        rows: list[list[str]] = []
        for name in args.only:
            spec = WORKLOADS[name]
            batches: list[int | None] = [None] if part == "train" else [spec.batch1, spec.shape[0]]
            if part == "compile":
                batches = [spec.shape[0]]
            for batch in batches:
                new = measure(name, part, batch, args.rounds, bandwidth, not args.no_memory)
                rows += new
                ours = float(new[-1][5])
                if part != "compile" and ours > args.profile:
                    mode = "train" if part == "train" else "infer"
                    profiles.append(
                        (
                            f"{name}, {part}, batch {batch or spec.shape[0]}: {ours:.2f} x bound",
                            profile(name, mode, batch),
                        )
                    )
                print(f"{name} {part} {batch}: done ({time.time() - started:.0f} s)", file=sys.stderr)
        print(f"### {part}\n")
        print(markdown_table(header, rows))
        print()
    for title, table in profiles:
        print(f"#### Where the time goes: {title}\n")
        print(table)
        print()
    print(f"(total {time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
