"""`attnzoo bench`: parameters, FLOPs, latency over alternating rounds, peak memory, GFLOP/s.

Built on `attnzoo.cli.harness` (`alternate`, `count_flops`, `peak_memory`) and on
`attnzoo.surgery.build`, which builds every mechanism for one input.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from attnzoo._registry import Spec, get_spec, list_modules
from attnzoo.cli.console import CLIError, Progress, emit, num, plural, reason, resolve, si, table
from attnzoo.surgery.build import Built, build, parse_shape

__all__ = [
    "DTYPES",
    "BENCH_INPUT",
    "BENCH_ROUNDS",
    "run",
    "memory_step",
    "param_count",
    "make_step",
    "count_step_flops",
]

BENCH_INPUT = "2x64x56x56"
BENCH_ROUNDS = 5
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def make_step(built: Built, mode: str) -> Callable[[], object]:
    from attnzoo.cli.harness import forward_step, train_step

    if mode == "train":
        built.module.train()
        return train_step(built.module, built.inputs)
    built.module.eval()
    return forward_step(built.module, built.inputs)


def count_step_flops(spec: Spec, shape: tuple[int, ...], mode: str, or_example: bool = False) -> int:
    """FLOPs of one step: counted on two samples (math attention path; one would fail in a
    training-mode BatchNorm over pooled vectors, as BAM's), scaled to the batch."""
    from attnzoo.cli.harness import count_flops

    built = build(spec, shape, batch=2, or_example=or_example)
    batch = built.spec.example.inputs[0][0] if built.from_example else shape[0]
    return count_flops(make_step(built, mode)) * batch // 2


def _keep_freed_memory() -> bool:
    """Keep freed large buffers in the process (glibc `mallopt`), as `benchmark.MALLOC_ENV` does
    for scripts: otherwise each step page-faults them back and timings get 2-3x outliers."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 2**31 - 1)) and bool(
            libc.mallopt(m_trim_threshold, 2**31 - 1)
        )
    except (OSError, AttributeError):
        return False


def memory_step(
    name: str, shape: list[int], mode: str, dtype: str, or_example: bool = False
) -> Callable[[], object]:
    """Factory for `attnzoo.cli.harness.peak_memory`: one bench step of `name`."""
    built = build(get_spec(name), tuple(shape), dtype=DTYPES[dtype], or_example=or_example)
    return make_step(built, mode)


_MEMORY_CHILD = r"""
import gc, json, sys
from attnzoo.cli.bench import memory_step
from attnzoo.cli.harness import step_peak_here

job = json.loads(sys.argv[1])
for name in job["names"]:
    step = None
    try:
        step = memory_step(name, job["shape"], job["mode"], job["dtype"], job["or_example"])
        report = {"name": name, "bytes": step_peak_here(step)}
    except Exception as err:
        report = {"name": name, "error": str(err).splitlines()[0] if str(err) else type(err).__name__}
    step = None
    gc.collect()
    print(json.dumps(report), flush=True)
"""


def _memory_shared(
    names: list[str], shape: tuple[int, ...], mode: str, dtype: str, progress: Progress, or_example: bool
) -> dict[str, int | None]:
    """Peak memory of each step, all measured one after another in one fresh subprocess."""
    from attnzoo.cli.harness import MEASURE_ENV

    env = {**os.environ, **MEASURE_ENV}
    src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # holds attnzoo/
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    job = json.dumps(
        {"names": names, "shape": list(shape), "mode": mode, "dtype": dtype, "or_example": or_example}
    )
    result: dict[str, int | None] = {n: None for n in names}
    with (
        tempfile.TemporaryFile("w+") as errors,
        subprocess.Popen(
            [sys.executable, "-c", _MEMORY_CHILD, job],
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
            env=env,
        ) as proc,
    ):
        if proc.stdout is None:
            raise RuntimeError("the memory subprocess has no stdout")
        for line in proc.stdout:
            report = json.loads(line)
            result[report["name"]] = report.get("bytes")
            progress.advance(note=f"memory {report['name']}")
        if proc.wait() != 0:
            errors.seek(0)
            tail = [ln for ln in errors.read().splitlines() if ln.strip()][-1:] or ["no message"]
            print(
                f"attnzoo: peak memory not measured: the measuring subprocess failed: {tail[0]}",
                file=sys.stderr,
            )
    return result


def _memory_fresh(
    names: list[str], shape: tuple[int, ...], mode: str, dtype: str, progress: Progress, or_example: bool
) -> dict[str, int | None]:
    """Peak memory of each step, each in its own fresh subprocess (attnzoo.cli.harness.peak_memory)."""
    from attnzoo.cli.harness import peak_memory

    result: dict[str, int | None] = {}
    for name in names:
        try:
            result[name] = peak_memory(
                "attnzoo.cli.bench:memory_step",
                {"name": name, "shape": list(shape), "mode": mode, "dtype": dtype, "or_example": or_example},
            )
        except RuntimeError:
            result[name] = None
        progress.advance(note=f"memory {name}")
    return result


def run(args: argparse.Namespace) -> int:
    """Run `attnzoo bench` with parsed arguments (see `attnzoo.cli.command.build_parser`)."""
    from attnzoo.cli.harness import alternate

    # The default input: a mechanism that cannot take it runs its registry example instead.
    or_example = args.input is None
    args.input = args.input or BENCH_INPUT
    shape = parse_shape(args.input)
    dtype = DTYPES[args.dtype]
    if args.rounds < 1:
        raise CLIError(f"--rounds expects a positive count, got {args.rounds}")
    specs = resolve(args.names) if args.names else list_modules()
    if args.plot:
        from attnzoo.cli.plots import pyplot

        pyplot("--plot")  # fail now, not after the measurements
    kept = _keep_freed_memory()
    memory_steps = len(specs) if args.memory != "off" else 0
    progress = Progress(len(specs) + args.rounds + memory_steps, f"bench {args.input} {args.mode}")
    rows: dict[str, dict[str, Any]] = {}
    steps: dict[str, Callable[[], object]] = {}
    for spec in specs:
        row: dict[str, Any] = {
            "name": spec.name,
            "family": spec.family,
            "layout": spec.layout,
            "input": "",
            "params": None,
            "flops": None,
            "latency_ms": None,
            "gflops_per_s": None,
            "peak_mb": None,
            "status": "ok",
            "reason": "",
        }
        rows[spec.name] = row
        try:
            built = build(spec, shape, dtype=dtype, or_example=or_example)
            row["input"], row["params"] = built.input_note, param_count(built.module)
            row["flops"] = count_step_flops(spec, shape, args.mode, or_example)
            step = make_step(built, args.mode)
            step()  # the first call also tells whether the full input runs
            steps[spec.name] = step
        except (ValueError, TypeError, RuntimeError, NotImplementedError) as err:
            row["status"], row["reason"] = "skipped", reason(err)
        progress.advance(note=spec.name)
    if steps:
        timing = alternate(
            steps, rounds=args.rounds, warmup=1, progress=lambda r, n: progress.advance(note="timing")
        )
        for name in steps:
            row = rows[name]
            seconds = timing.median(name)
            row["latency_ms"] = seconds * 1e3
            row["gflops_per_s"] = row["flops"] / seconds / 1e9 if row["flops"] else None
    else:
        progress.advance(args.rounds)
    names = list(steps)
    del steps
    gc.collect()
    if args.memory != "off":
        measure = _memory_shared if args.memory == "shared" else _memory_fresh
        skipped = len(specs) - len(names)
        progress.advance(skipped)
        for name, size in measure(names, shape, args.mode, args.dtype, progress, or_example).items():
            rows[name]["peak_mb"] = None if size is None else size / 2**20
    progress.close()
    results = list(rows.values())
    memory_note = {
        "shared": "peak memory: each step measured in one fresh subprocess, one after another",
        "fresh": "peak memory: each step in its own fresh subprocess",
        "off": "peak memory: not measured",
    }[args.memory]
    title = (
        f"attnzoo bench: input {args.input}, {args.mode}, {args.dtype}, "
        f"{plural(torch.get_num_threads(), 'thread')}, median of {args.rounds} alternating rounds"
    )
    text = _bench_table(title, results, memory_note, kept)
    extra = {
        "input": args.input,
        "mode": args.mode,
        "dtype": args.dtype,
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "memory": args.memory,
    }
    emit(results, args.format, args.output, text, extra)
    if args.plot:
        from attnzoo.cli.plots import bench_chart

        bench_chart(results, args.plot, title=title)
        print(f"wrote {args.plot}")
    return 0


def _bench_table(title: str, rows: list[dict[str, Any]], memory_note: str, kept: bool) -> str:
    done = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: r["latency_ms"])
    header = ("name", "input", "params", "FLOPs", "latency ms", "GFLOP/s", "peak MB")
    body = [
        (
            r["name"],
            r["input"],
            si(r["params"]),
            si(r["flops"]),
            num(r["latency_ms"]),
            num(r["gflops_per_s"]),
            num(r["peak_mb"]),
        )
        for r in done
    ]
    lines = [
        title,
        table(header, body),
        "",
        "FLOPs: one sample counted on the math attention path, times the batch; " + memory_note + ".",
    ]
    if not kept:
        lines.append(
            "note: could not keep freed memory in the process (not glibc); timings may show outliers."
        )
    skipped = [r for r in rows if r["status"] != "ok"]
    if skipped:
        lines.append("cannot take this input:")
        lines += [f"  {r['name']}: {r['reason']}" for r in skipped]
    return "\n".join(lines)
