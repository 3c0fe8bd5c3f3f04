"""`attnzoo compare`: every registered mechanism on the same backbone and the same task, side by side.

Each mechanism goes into the demo's CNN (`attnzoo.cli.demo.OddShapeNet`, after its second stage:
32 channels on 16 x 16 maps, built by `attnzoo.surgery.build.build_nchw`), next to a baseline with
no attention ("none"). For each one the command reports parameters (attention module and whole
model), FLOPs per image, forward latency (median of alternating rounds, `attnzoo.cli.harness`),
peak memory of one training step (measured in a fresh subprocess) and held-out accuracy on the
demo's odd-shape task after the same training budget (same epochs, same data, same seed).
Mechanisms that cannot run on such maps are listed with the reason, never dropped.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._registry import get_spec, list_modules
from attnzoo.cli.console import (
    CLIError,
    Progress,
    emit,
    num,
    plural,
    reason,
    render,
    resolve,
    si,
    table,
    write_text,
)
from attnzoo.cli.demo import KINDS, OddShapeNet, evaluate, make_shapes, train
from attnzoo.surgery.build import Unsupported, build_nchw

__all__ = ["BASELINE", "COLUMNS", "DEFAULTS", "QUICK", "settings", "machine", "memory_step", "run"]

BASELINE = "none"
DEFAULTS = {"epochs": 2, "train_size": 1024, "test_size": 512, "batch": 32, "rounds": 5}
QUICK = {"epochs": 1, "train_size": 32, "test_size": 32, "batch": 8, "rounds": 1}
# Measured with the defaults on a 2-core machine shared with other jobs (494 s with
# OMP_NUM_THREADS=1, everything included): see docs/compare.md.
DEFAULT_MINUTES = "about 8 minutes for every mechanism on a busy 2-core machine with OMP_NUM_THREADS=1"

COLUMNS = {
    "name": "registry name; 'none' is the baseline without attention",
    "family": "registry family",
    "status": "ok, unsupported (cannot run on the backbone's maps) or failed",
    "reason": "why a mechanism is unsupported or failed",
    "attn_params": "parameters of the attention module (count)",
    "model_params": "parameters of the whole model, backbone included (count)",
    "flops_per_image": "forward FLOPs of the whole model per image (multiply-add = 2; attention matmuls in)",
    "attn_flops_per_image": "forward FLOPs of the attention module per image",
    "latency_ms": "forward latency of the whole model for one batch (ms, median of alternating rounds)",
    "latency_ratio": "latency relative to the baseline (median of per-round ratios)",
    "peak_train_mb": "peak memory one training step adds (MiB, forward + backward + AdamW step)",
    "accuracy": "held-out accuracy on the odd-shape task (fraction; chance 1/3)",
    "train_s": "training time (s, wall clock; noisy on shared machines)",
}


def settings(args: argparse.Namespace) -> dict[str, int]:
    """The run's sizes: a given flag, else the `--quick` preset, else the default; each checked."""
    preset = QUICK if args.quick else DEFAULTS
    cfg = {key: getattr(args, key) if getattr(args, key) is not None else preset[key] for key in DEFAULTS}
    for key, value in cfg.items():
        if value < 1:
            raise CLIError(f"--{key.replace('_', '-')} expects a positive count, got {value}")
    cfg["seed"] = args.seed
    return cfg


def machine() -> dict[str, Any]:
    """Where the numbers come from: CPU model, vector extensions, threads, versions and the date."""
    model, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "unknown":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        model = platform.processor() or "unknown"
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "avx2": "avx2" in flags,
        "avx512": "avx512f" in flags,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _model(name: str, seed: int) -> OddShapeNet:
    """The backbone with `name`'s mechanism (none for the baseline); the same seed for every backbone."""
    attention = None
    if name != BASELINE:
        attention = build_nchw(get_spec(name), OddShapeNet.channels, OddShapeNet.grid, seed=seed)
    torch.manual_seed(seed)
    return OddShapeNet(attention)


def memory_step(name: str, batch: int, seed: int) -> Callable[[], object]:
    """Factory for `attnzoo.cli.harness.peak_memories`: one training step of `name`'s model."""
    model = _model(name, seed).train()
    images, labels, _ = make_shapes(batch, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> object:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        opt.step()
        return None

    return step


def _forward(model: nn.Module, x: Tensor) -> Callable[[], object]:
    def step() -> object:
        with torch.no_grad():
            return model(x)

    return step


def _empty_row(name: str, family: str) -> dict[str, Any]:
    return {key: None for key in COLUMNS} | {"name": name, "family": family, "status": "ok", "reason": ""}


def _measure_costs(row: dict[str, Any], model: OddShapeNet, batch_x: Tensor) -> None:
    """Parameters, FLOPs per image, and one forward pass at the run's batch (it must run)."""
    from attnzoo.cli.harness import count_flops

    model.eval()
    row["attn_params"] = sum(p.numel() for p in model.attn.parameters())
    row["model_params"] = sum(p.numel() for p in model.parameters())
    row["flops_per_image"] = count_flops(_forward(model, batch_x[:1]))
    maps = torch.rand(1, OddShapeNet.channels, *OddShapeNet.grid)
    row["attn_flops_per_image"] = count_flops(_forward(model.attn, maps))
    _forward(model, batch_x)()


def run(args: argparse.Namespace) -> int:
    """Run `attnzoo compare` with parsed arguments (see `attnzoo.cli.command.build_parser`)."""
    from attnzoo.cli.bench import _keep_freed_memory
    from attnzoo.cli.harness import alternate, peak_memories

    cfg = settings(args)
    specs = resolve(args.names) if args.names else list_modules()
    if args.plot:
        from attnzoo.cli.plots import pyplot

        pyplot("--plot")  # fail now, not after the measurements
    kept = _keep_freed_memory()
    started, cpu_started = time.perf_counter(), time.process_time()
    rows = {BASELINE: _empty_row(BASELINE, "-")} | {s.name: _empty_row(s.name, s.family) for s in specs}
    batches = -(-cfg["train_size"] // cfg["batch"])
    progress = Progress(len(rows) * (2 + cfg["epochs"] * batches) + cfg["rounds"], "compare")
    gen = torch.Generator().manual_seed(cfg["seed"])
    batch_x = torch.rand(cfg["batch"], 3, 64, 64, generator=gen)
    models: dict[str, OddShapeNet] = {}
    for name, row in rows.items():
        try:
            models[name] = _model(name, cfg["seed"])
            _measure_costs(row, models[name], batch_x)
        except Unsupported as err:
            row["status"], row["reason"] = "unsupported", reason(err)
            models.pop(name, None)
        except (ValueError, TypeError, RuntimeError, NotImplementedError) as err:
            row["status"], row["reason"] = "failed", reason(err)
            models.pop(name, None)
        progress.advance(note=name)
    skipped = len(rows) - len(models)
    progress.advance(skipped * (1 + cfg["epochs"] * batches))
    timing = alternate(
        {name: _forward(model, batch_x) for name, model in models.items()},
        rounds=cfg["rounds"],
        warmup=1,
        progress=lambda r, n: progress.advance(note="latency"),
    )
    for name in models:
        rows[name]["latency_ms"] = timing.median(name) * 1e3
        rows[name]["latency_ratio"] = timing.ratio(name, BASELINE)
    train_x, train_y, _ = make_shapes(cfg["train_size"], seed=cfg["seed"])
    test_x, test_y, _ = make_shapes(cfg["test_size"], seed=cfg["seed"] + 10_000)
    for name in list(models):
        row, model, start = rows[name], models.pop(name), time.perf_counter()
        step = functools.partial(progress.advance, note=f"training {name}")
        try:
            epochs, size, seed = cfg["epochs"], cfg["batch"], cfg["seed"]
            train(model, train_x, train_y, epochs=epochs, batch_size=size, seed=seed, step=step)
        except (ValueError, TypeError, RuntimeError, NotImplementedError) as err:
            row["status"], row["reason"] = "failed", f"training: {reason(err)}"
            continue
        row["train_s"] = time.perf_counter() - start
        row["accuracy"] = evaluate(model, test_x, test_y)
    gc.collect()
    names = [name for name, row in rows.items() if row["status"] == "ok"]

    def measured(index: int, size: int | None) -> None:
        rows[names[index]]["peak_train_mb"] = None if size is None else size / 2**20
        progress.advance(note=f"memory {names[index]}")

    jobs = [{"name": n, "batch": cfg["batch"], "seed": cfg["seed"]} for n in names]
    peak_memories("attnzoo.cli.compare:memory_step", jobs, on_result=measured)
    progress.close()
    results = list(rows.values())
    extra = {
        "config": cfg,
        "machine": machine(),
        "seconds": round(time.perf_counter() - started, 1),
        "cpu_seconds": round(time.process_time() - cpu_started, 1),  # this process, all its threads
        "columns": COLUMNS,
    }
    text = report(results, extra, kept)
    emit(results, args.format, args.output, text, extra)
    for path, fmt in ((args.csv, "csv"), (args.json, "json")):
        if path:
            write_text(path, render(results, fmt, text, extra))
            print(f"wrote {path}")
    if args.plot:
        from attnzoo.cli.compare_chart import compare_chart

        compare_chart(results, args.plot, title=title(extra))
        print(f"wrote {args.plot}")
    return 0


def title(extra: dict[str, Any]) -> str:
    """One line that says what was run: task sizes, budget, batch and threads."""
    cfg = extra["config"]
    return (
        f"odd-shape task, {cfg['train_size']} training / {cfg['test_size']} held-out images, "
        f"{plural(cfg['epochs'], 'epoch')}, batch {cfg['batch']}, seed {cfg['seed']}, "
        f"{plural(extra['machine']['threads'], 'thread')}"
    )


def ordered(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The measured rows (baseline first, then by accuracy, best first) and the others."""
    done = [r for r in rows if r["status"] == "ok"]
    done.sort(key=lambda r: (r["name"] != BASELINE, -(r["accuracy"] or 0.0), r["latency_ms"] or 0.0))
    return done, [r for r in rows if r["status"] != "ok"]


HEADER = (
    "name",
    "attn params",
    "model params",
    "FLOPs/img",
    "attn FLOPs/img",
    "latency ms",
    "x none",
    "train peak MiB",
    "accuracy",
)


def cells(r: dict[str, Any]) -> tuple[str, ...]:
    """One row of the table, formatted (shared with the docs generator)."""
    ratio = r["latency_ratio"]
    return (
        r["name"],
        f"{r['attn_params']:,}",
        f"{r['model_params']:,}",
        si(r["flops_per_image"]),
        si(r["attn_flops_per_image"]) if r["attn_flops_per_image"] else "0",
        num(r["latency_ms"]),
        "-" if ratio is None else f"{ratio:.2f}",
        num(r["peak_train_mb"]),
        "-" if r["accuracy"] is None else f"{r['accuracy']:.1%}",
    )


def report(rows: list[dict[str, Any]], extra: dict[str, Any], kept: bool = True) -> str:
    """The text table with its units, then the mechanisms that were not measured and why."""
    done, others = ordered(rows)
    cfg = extra["config"]
    lines = [
        f"attnzoo compare: {title(extra)}; chance {1 / len(KINDS):.1%}",
        table(HEADER, [cells(r) for r in done]),
        "",
        "params: counts; FLOPs/img: forward, per image, multiply-add = 2, matmuls and convolutions only "
        "(attention on the math path);",
        f"latency: forward of the whole model on a batch of {cfg['batch']}, median of "
        f"{plural(cfg['rounds'], 'alternating round')}; x none: median per-round ratio to the baseline;",
        "train peak MiB: memory one training step adds (fresh subprocess); accuracy: held-out, "
        f"after {plural(cfg['epochs'], 'epoch')}, the same data and seed for every model.",
    ]
    if not kept:
        lines.append("note: could not keep freed memory (not glibc); timings may show outliers.")
    if others:
        lines.append("not measured:")
        lines += [f"  {r['name']}: {r['status']}: {r['reason']}" for r in others]
    return "\n".join(lines)
