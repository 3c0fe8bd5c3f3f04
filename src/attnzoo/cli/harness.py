"""The benchmark harness: alternating timing rounds, FLOPs, and peak memory in a fresh process.

Shared by `benchmarks/*.py` (the comparisons recorded in `benchmarks/RESULTS.md`) and by the
`attnzoo bench` command. These machines are shared and noisy, so:

- candidates run in alternating rounds (A B, B A, ...) after a warm-up, and we report **medians** of
  the rounds and the median of per-round ratios, never single times;
- peak memory is measured in a fresh subprocess, so one candidate's cached allocations never count
  against another;
- FLOPs come from `torch.utils.flop_counter` with the fused attention path switched off (one count
  whichever kernel would run: the CPU flash backward also recomputes the logits) and grouped-convolution
  backward corrected (torch's formula counts one half of it as if `groups` were 1).
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from attnzoo.flops import count_flops

__all__ = [
    "MALLOC_ENV",
    "MEASURE_ENV",
    "Timing",
    "alternate",
    "count_flops",
    "peak_memory",
    "peak_memories",
    "step_peak_here",
    "train_step",
    "forward_step",
    "ensure_malloc_env",
    "markdown_table",
]

# Keep freed large buffers instead of returning them to the OS and page-faulting them back each step
# (that removed 2-3x outliers on the 2-core machines; see shared/MEASURED.md).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 34), "MALLOC_TRIM_THRESHOLD_": str(1 << 34)}


def ensure_malloc_env() -> None:
    """Re-execute the current script with `MALLOC_ENV` set, unless it already is."""
    if all(os.environ.get(k) == v for k, v in MALLOC_ENV.items()):
        return
    env = {**os.environ, **MALLOC_ENV}
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


@dataclass
class Timing:
    """Seconds per call of each candidate, one entry per round."""

    rounds: dict[str, list[float]]

    def median(self, name: str) -> float:
        """Median time of `name` over the recorded rounds, in seconds."""
        return statistics.median(self.rounds[name])

    def ratio(self, name: str, baseline: str) -> float:
        """Median over rounds of `time(name) / time(baseline)` (paired, so drift cancels)."""
        pairs = [a / b for a, b in zip(self.rounds[name], self.rounds[baseline], strict=False)]
        return statistics.median(pairs)


def alternate(
    candidates: Mapping[str, Callable[[], object]],
    *,
    rounds: int = 11,
    warmup: int = 2,
    min_time: float = 0.0,
    progress: Callable[[int, int], None] | None = None,
) -> Timing:
    """Time each candidate in alternating rounds after `warmup` calls each.

    Each round runs every candidate once, in an order that reverses every round, so slow drifts of
    the machine hit all candidates alike. With `min_time`, a candidate is repeated within a round
    until that many seconds pass and the mean is recorded (for very short calls).
    """
    names = list(candidates)
    for name in names:
        for _ in range(warmup):
            candidates[name]()
    result: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            fn = candidates[name]
            calls, start = 0, time.perf_counter()
            while True:
                fn()
                calls += 1
                elapsed = time.perf_counter() - start
                if elapsed >= min_time:
                    break
            result[name].append(elapsed / calls)
        if progress is not None:
            progress(r + 1, rounds)
    return Timing(result)


def forward_step(module: torch.nn.Module, inputs: Sequence[torch.Tensor]) -> Callable[[], object]:
    """A no-grad forward pass as a zero-argument callable."""

    def step() -> object:
        with torch.no_grad():
            return module(*inputs)

    return step


def train_step(module: torch.nn.Module, inputs: Sequence[torch.Tensor]) -> Callable[[], object]:
    """Forward + backward of `out.sum()` (float inputs get gradients too), as a callable."""
    leaves = [x.detach().requires_grad_(x.is_floating_point()) for x in inputs]

    def step() -> object:
        module.zero_grad(set_to_none=True)
        out = module(*leaves)
        out = out[0] if isinstance(out, tuple) else out
        out.float().sum().backward()
        return None

    return step


def _proc_status(key: str) -> int:
    """A memory figure of this process from `/proc/self/status`, in bytes (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def step_peak_here(step: Callable[[], object]) -> int:
    """Peak resident memory (bytes) one call of `step` adds, measured in this process.

    Meant for a fresh process started with `MEASURE_ENV` (see `peak_memory`): the step
    runs once so lazy initialisation settles and its buffers go back to the OS; then the peak
    resident set (VmHWM) is reset through `/proc/self/clear_refs` (Linux >= 4.0), so imports and
    the first call do not count, and the second call's peak minus the resident set just before it
    (the inputs and weights) is returned.
    """
    step()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _proc_status("VmRSS")
    step()
    return max(_proc_status("VmHWM") - base, 0)


_CHILD = r"""
import importlib, json, sys
from attnzoo.cli.harness import step_peak_here
spec = json.loads(sys.argv[1])
module_name, fn_name = spec["target"].split(":")
make = getattr(importlib.import_module(module_name), fn_name)
print(json.dumps({"bytes": step_peak_here(make(**spec["kwargs"]))}))
"""

# For measuring, the opposite of MALLOC_ENV: a fixed, small mmap threshold sends every large buffer
# straight back to the OS when freed, so the resident set just before the measured step holds only
# live data, and the process's peak resident set minus it is what the step adds.
MEASURE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


def peak_memory(target: str, kwargs: Mapping[str, Any] | None = None, *, timeout: float = 600) -> int:
    """Peak resident memory (bytes) one step adds, measured in a fresh Python process.

    `target` is `"package.module:factory"`; `factory(**kwargs)` must build the inputs and the
    module and return a zero-argument step. The step runs once to settle; then the process's peak resident
    set is reset (`/proc/self/clear_refs`) and the step runs again; the result is that step's peak
    minus the resident set just before it (the inputs and weights). On CUDA use
    `torch.cuda.max_memory_allocated` instead.
    """
    payload = json.dumps({"target": target, "kwargs": dict(kwargs or {})})
    env = {**os.environ, **MEASURE_ENV}
    src_dir = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # holds attnzoo/
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src_dir, os.getcwd(), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, payload], capture_output=True, text=True, env=env, timeout=timeout
    )
    if proc.returncode != 0:
        raise RuntimeError(f"peak_memory({target!r}) failed in its subprocess:\n{proc.stderr[-2000:]}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return int(report["bytes"])


_SERIES_CHILD = r"""
import gc, importlib, json, sys
from attnzoo.cli.harness import step_peak_here
job = json.loads(sys.argv[1])
module_name, fn_name = job["target"].split(":")
make = getattr(importlib.import_module(module_name), fn_name)
for kwargs in job["jobs"]:
    step = None
    try:
        step = make(**kwargs)
        report = {"bytes": step_peak_here(step)}
    except Exception as err:
        report = {"error": str(err).splitlines()[0] if str(err) else type(err).__name__}
    step = None
    gc.collect()
    print(json.dumps(report), flush=True)
"""


def peak_memories(
    target: str,
    jobs: Sequence[Mapping[str, Any]],
    *,
    on_result: Callable[[int, int | None], None] | None = None,
    timeout: float = 1800,
) -> list[int | None]:
    """Peak memory (bytes) of several steps, measured one after another in one fresh Python process.

    Like `peak_memory`, but one subprocess serves every job: `target(**job)` builds each step,
    measured by `step_peak_here` once the previous one is freed. A job that fails gives None (and so
    do the remaining ones when the subprocess dies). `on_result(index, bytes)` is called as each
    result arrives (progress).
    """
    payload = json.dumps({"target": target, "jobs": [dict(j) for j in jobs]})
    env = {**os.environ, **MEASURE_ENV}
    src_dir = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # holds attnzoo/
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src_dir, os.getcwd(), env.get("PYTHONPATH", "")) if p)
    results: list[int | None] = [None] * len(jobs)
    with subprocess.Popen(
        [sys.executable, "-c", _SERIES_CHILD, payload],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    ) as proc:
        if proc.stdout is None:
            raise RuntimeError("the memory subprocess has no stdout")
        start = time.perf_counter()
        for index, line in enumerate(proc.stdout):
            if index >= len(jobs) or time.perf_counter() - start > timeout:
                proc.kill()
                break
            report = json.loads(line)
            results[index] = report.get("bytes")
            if on_result is not None:
                on_result(index, results[index])
        proc.wait()
    return results


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
