"""The ``attnzoo`` command: ``list``, ``info``, ``bench``, ``maps`` and ``demo``.

Names are registry names, aliases or seed class names (``attnzoo bench se cbam``). Errors are one
line on stderr and exit code 2 (a traceback only with ``--debug``). Pictures need the optional
extra ``attnzoo[plots]`` (matplotlib), imported only when a picture is asked for.
"""

from __future__ import annotations

import argparse
import csv
import functools
import gc
import importlib.resources
import inspect
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

import attnzoo
from attnzoo._build import Built, Unsupported, build, build_nchw, parse_shape
from attnzoo._registry import Spec, get_spec, list_modules

__all__ = ["main", "build_parser", "CLIError", "sample_image"]

LIST_INPUT = "1x64x32x32"
BENCH_INPUT = "2x64x56x56"
BENCH_ROUNDS = 5
DEMO_ATTENTION = ("cbam", "sagan", "bra")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


def sample_image() -> str:
    """Path of the sample image shipped with attnzoo (a few shapes, 112 x 112)."""
    return str(importlib.resources.files("attnzoo") / "data" / "shapes.png")


# ---------------------------------------------------------------------------------------------
# Output helpers


class Progress:
    """A progress bar on stderr: redrawn in place on a terminal, a line every few seconds otherwise."""

    def __init__(self, total: int, label: str, stream: Any = None) -> None:
        self.total, self.label, self.done = max(total, 1), label, 0
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = self.last = time.perf_counter()
        self._draw("")

    def advance(self, steps: int = 1, note: str = "") -> None:
        if steps <= 0 or self.done == self.total:
            return
        self.done = min(self.done + steps, self.total)
        now = time.perf_counter()
        if self.tty or now - self.last >= 5 or self.done == self.total:
            self.last = now
            self._draw(note)

    def _draw(self, note: str) -> None:
        width = 24
        filled = int(width * self.done / self.total)
        bar = "#" * filled + "." * (width - filled)
        text = (
            f"{self.label} [{bar}] {self.done}/{self.total} {time.perf_counter() - self.start:5.0f}s {note}"
        )
        if self.tty:
            self.stream.write("\r" + text[:110].ljust(110))
        else:
            self.stream.write(text.rstrip() + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _si(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.{digits}g}{suffix}"
    return f"{value:.{digits}g}"


def _num(value: float | None) -> str:
    """A measurement with about 3 significant digits, never in exponent form."""
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if value >= 0.01 else "<0.01"


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]
    lines = [
        "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=False)).rstrip(),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip() for row in cells]
    return "\n".join(lines)


def _emit(
    rows: list[dict[str, Any]], fmt: str, output: str | None, table: str, extra: dict[str, Any]
) -> None:
    """Print ``table`` (or CSV/JSON of ``rows``); with ``output``, write the chosen format there."""
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["name"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        text = buf.getvalue()
    elif fmt == "json":
        text = json.dumps({**extra, "results": rows}, indent=2) + "\n"
    else:
        text = table + "\n"
    if output is None:
        sys.stdout.write(text)
        return
    try:
        with open(output, "w") as f:
            f.write(text)
    except OSError as err:
        raise OSError(f"cannot write {output!r}: {err.strerror or err}") from None
    if fmt != "table":
        sys.stdout.write(table + "\n")
    print(f"wrote {output}")


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _resolve(names: Sequence[str]) -> list[Spec]:
    specs: list[Spec] = []
    for raw in names:
        for name in (n for n in raw.split(",") if n):
            spec = get_spec(name)
            if spec not in specs:
                specs.append(spec)
    return specs


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _step(built: Built, mode: str) -> Callable[[], object]:
    from attnzoo.benchmark import forward_step, train_step

    if mode == "train":
        built.module.train()
        return train_step(built.module, built.inputs)
    built.module.eval()
    return forward_step(built.module, built.inputs)


def _flops(spec: Spec, shape: tuple[int, ...], mode: str) -> int:
    """FLOPs of one step: counted on one sample (math attention path), times the batch."""
    from attnzoo.benchmark import count_flops

    one = build(spec, shape, batch=1)
    return count_flops(_step(one, mode)) * shape[0]


# ---------------------------------------------------------------------------------------------
# attnzoo list / info


def _cmd_list(args: argparse.Namespace) -> int:
    shape = parse_shape(args.input)
    specs = list_modules(args.family)
    if args.family is not None and not specs:
        families = sorted({s.family for s in list_modules()})
        raise CLIError(f"no mechanism in family {args.family!r}; families: {', '.join(families)}")
    rows = []
    for spec in specs:
        row: dict[str, Any] = {
            "name": spec.name,
            "seed_name": spec.seed_name or "",
            "family": spec.family,
            "paper": spec.paper,
            "year": spec.year,
            "layout": spec.layout,
            "input": "",
            "params": None,
            "flops": None,
            "note": "",
        }
        try:
            built = build(spec, shape)
            row["input"] = built.input_note
            row["params"] = _params(built.module)
            row["flops"] = _flops(spec, shape, "fwd")
        except (ValueError, TypeError, RuntimeError) as err:
            row["note"] = _reason(err)
        rows.append(row)
    header = ("name", "seed name", "family", "paper", "year", "input", "params", "FLOPs")
    table_rows = [
        (
            r["name"],
            r["seed_name"] or "-",
            r["family"],
            _short(r["paper"], 44),
            r["year"],
            r["input"] or "-",
            _si(r["params"]),
            _si(r["flops"]),
        )
        for r in rows
    ]
    notes = [f"  {r['name']}: cannot take {args.input}: {r['note']}" for r in rows if r["note"]]
    text = (
        f"{len(rows)} mechanisms; params and forward FLOPs at input {args.input} (B x C x H x W, converted "
        f"to each layout; SEQ2SEQ: one query against the H*W tokens)\n" + _table(header, table_rows)
    )
    if notes:
        text += "\n\n" + "\n".join(notes)
    _emit(rows, args.format, args.output, text, {"input": args.input})
    return 0


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _cmd_info(args: argparse.Namespace) -> int:
    spec = get_spec(args.name)
    shape = parse_shape(args.input)
    names = ", ".join(n for n in spec.all_names if n != spec.name)
    print(
        f"{spec.name}: {spec.cls.__module__}.{spec.cls.__name__}   family {spec.family}, layout {spec.layout}"
    )
    print(f"paper: {spec.paper} ({spec.year})")
    if names:
        print(
            f"also: {names}" + (f"   (seed class: attnzoo.compat.{spec.seed_name})" if spec.seed_name else "")
        )
    print(f"uses attnzoo.functional.attend: {'yes' if spec.uses_attend else 'no'}")
    print()
    print(inspect.getdoc(spec.cls) or "(no docstring)")
    print()
    print("constructor arguments:")
    for name, p in inspect.signature(spec.cls.__init__).parameters.items():
        if name == "self":
            continue
        default = "required" if p.default is inspect.Parameter.empty else f"default {p.default!r}"
        print(f"  {name}: {default}")
    print()
    try:
        built = build(spec, shape)
    except Unsupported as err:
        raise CLIError(f"{spec.name} cannot take input {args.input}: {err}") from None
    with torch.no_grad():
        out = built.module.eval()(*built.inputs)
    out_shape = tuple((out[0] if isinstance(out, tuple) else out).shape)
    args_text = ", ".join(f"{k}={v!r}" for k, v in built.kwargs.items())
    print(f"at input {args.input}: {spec.cls.__name__}({args_text})")
    print(f"  input  {' + '.join(str(tuple(x.shape)) for x in built.inputs)}")
    print(f"  output {out_shape}")
    print(f"  parameters {_params(built.module):,}")
    fwd, train = _flops(spec, shape, "fwd"), _flops(spec, shape, "train")
    print(f"  FLOPs forward {_si(fwd)} ({fwd:,}), forward+backward {_si(train)} ({train:,})")
    return 0


# ---------------------------------------------------------------------------------------------
# attnzoo bench


def _keep_freed_memory() -> bool:
    """Keep freed large buffers in the process (glibc ``mallopt``), as ``benchmark.MALLOC_ENV`` does
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


def memory_step(name: str, shape: list[int], mode: str, dtype: str) -> Callable[[], object]:
    """Factory for :func:`attnzoo.benchmark.peak_memory`: one bench step of ``name``."""
    return _step(build(get_spec(name), tuple(shape), dtype=DTYPES[dtype]), mode)


_MEMORY_CHILD = r"""
import gc, json, sys
from attnzoo.cli import memory_step

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(key + " not in /proc/self/status")

job = json.loads(sys.argv[1])
for name in job["names"]:
    try:
        step = memory_step(name, job["shape"], job["mode"], job["dtype"])
        step()
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = status("VmRSS")
        step()
        report = {"name": name, "bytes": max(status("VmHWM") - base, 0)}
    except Exception as err:
        report = {"name": name, "error": str(err).splitlines()[0] if str(err) else type(err).__name__}
    step = None
    gc.collect()
    print(json.dumps(report), flush=True)
"""


def _memory_shared(
    names: list[str], shape: tuple[int, ...], mode: str, dtype: str, progress: Progress
) -> dict[str, int | None]:
    """Peak memory of each step, all measured one after another in one fresh subprocess."""
    from attnzoo.benchmark import MEASURE_ENV

    env = {**os.environ, **MEASURE_ENV}
    src = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    job = json.dumps({"names": names, "shape": list(shape), "mode": mode, "dtype": dtype})
    result: dict[str, int | None] = {n: None for n in names}
    with subprocess.Popen(
        [sys.executable, "-c", _MEMORY_CHILD, job],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            report = json.loads(line)
            result[report["name"]] = report.get("bytes")
            progress.advance(note=f"memory {report['name']}")
        proc.wait()
    return result


def _memory_fresh(
    names: list[str], shape: tuple[int, ...], mode: str, dtype: str, progress: Progress
) -> dict[str, int | None]:
    """Peak memory of each step, each in its own fresh subprocess (attnzoo.benchmark.peak_memory)."""
    from attnzoo.benchmark import peak_memory

    result: dict[str, int | None] = {}
    for name in names:
        try:
            result[name] = peak_memory(
                "attnzoo.cli:memory_step", {"name": name, "shape": list(shape), "mode": mode, "dtype": dtype}
            )
        except RuntimeError:
            result[name] = None
        progress.advance(note=f"memory {name}")
    return result


def _cmd_bench(args: argparse.Namespace) -> int:
    from attnzoo.benchmark import alternate

    shape = parse_shape(args.input)
    dtype = DTYPES[args.dtype]
    if args.rounds < 1:
        raise CLIError(f"--rounds expects a positive count, got {args.rounds}")
    specs = _resolve(args.names) if args.names else list_modules()
    if args.plot:
        from attnzoo._plots import pyplot

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
            built = build(spec, shape, dtype=dtype)
            row["input"], row["params"] = built.input_note, _params(built.module)
            row["flops"] = _flops(spec, shape, args.mode)
            step = _step(built, args.mode)
            step()  # the first call also tells whether the full input runs
            steps[spec.name] = step
        except (ValueError, TypeError, RuntimeError, NotImplementedError) as err:
            row["status"], row["reason"] = "skipped", _reason(err)
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
        for name, size in measure(names, shape, args.mode, args.dtype, progress).items():
            rows[name]["peak_mb"] = None if size is None else size / 2**20
    progress.close()
    results = list(rows.values())
    memory_note = {
        "shared": "peak memory: each step measured in one fresh subprocess, one after another",
        "fresh": "peak memory: each step in its own fresh subprocess",
        "off": "peak memory: not measured",
    }[args.memory]
    title = (
        f"attnzoo bench: input {args.input}, {args.mode}, {args.dtype}, {torch.get_num_threads()} threads, "
        f"median of {args.rounds} alternating rounds"
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
    _emit(results, args.format, args.output, text, extra)
    if args.plot:
        from attnzoo._plots import bench_chart

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
            _si(r["params"]),
            _si(r["flops"]),
            _num(r["latency_ms"]),
            _num(r["gflops_per_s"]),
            _num(r["peak_mb"]),
        )
        for r in done
    ]
    lines = [
        title,
        _table(header, body),
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


# ---------------------------------------------------------------------------------------------
# attnzoo maps


def _parse_queries(text: str | None) -> list[tuple[float, ...]] | None:
    if text is None:
        return None
    points = []
    for part in text.split(";"):
        try:
            points.append(tuple(float(v) for v in part.split(",")))
        except ValueError:
            raise ValueError(
                f"--queries expects fractions 'y,x;y,x' such as 0.5,0.5;0.2,0.8, got {text!r}"
            ) from None
    return points


def image_features(image: Tensor, channels: int, seed: int = 0) -> Tensor:
    """Fixed features of a ``(3, H, W)`` image at half resolution, ``(1, channels, H/2, W/2)``.

    Colour, brightness and edge responses (Sobel, two scales) mixed by a seeded random 1x1
    projection and a ReLU: an untrained but image-dependent stand-in for a CNN's early features,
    so that the maps of an untrained attention module follow what is in the picture.
    """
    x = image[None]  # (1, 3, H, W)
    gray = x.mean(1, keepdim=True)  # (1, 1, H, W)
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    kernels = torch.stack([sobel, sobel.t()])[:, None]  # (2, 1, 3, 3)
    edges = torch.nn.functional.conv2d(gray, kernels, padding=1)  # (1, 2, H, W)
    blurred = torch.nn.functional.avg_pool2d(gray, 5, 1, 2)
    coarse = torch.nn.functional.conv2d(blurred, kernels, padding=1)  # (1, 2, H, W)
    base = torch.cat([x, gray, edges, edges.norm(dim=1, keepdim=True), coarse], 1)  # (1, 9, H, W)
    base = (base - base.mean((2, 3), keepdim=True)) / base.std((2, 3), keepdim=True).clamp_min(1e-6)
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(channels, base.shape[1], generator=gen) / base.shape[1] ** 0.5
    feats = torch.relu(torch.einsum("oc,bchw->bohw", weight, base))  # (1, C, H, W)
    return torch.nn.functional.avg_pool2d(feats, 2)


def _cmd_maps(args: argparse.Namespace) -> int:
    from attnzoo._plots import load_image, plot_maps
    from attnzoo.maps import capture_maps

    spec = get_spec(args.name)
    queries = _parse_queries(args.queries)
    if args.size < 8:
        raise CLIError(f"--size expects at least 8 pixels, got {args.size}")
    image = load_image(args.image or sample_image(), size=args.size)
    feats = image_features(image, args.channels, args.seed)
    grid = (feats.shape[2], feats.shape[3])
    try:
        module = build_nchw(spec, args.channels, grid, seed=args.seed).eval()
    except Unsupported as err:
        raise CLIError(f"{spec.name} cannot run on a {args.channels}-channel feature map: {err}") from None
    mechanism = next((m for m in module.modules() if isinstance(m, spec.cls)), module)
    with torch.no_grad(), capture_maps(mechanism, queries=queries, token_grid=grid) as maps:
        module(feats)
    if not maps:
        raise CLIError(f"{spec.name} recorded no attention maps (its module does not record any yet)")
    # Name the records from the mechanism: its own as its registry name, its parts' below it.
    root = type(mechanism).__name__
    maps = {spec.name if name == root else f"{spec.name}.{name}": records for name, records in maps.items()}
    source = os.path.basename(args.image or sample_image())
    title = f"{spec.name} ({spec.cls.__name__}, untrained, seed {args.seed}) on {source}"
    count = plot_maps(image, maps, args.out, title=title, token_grid=grid)
    kinds = ", ".join(f"{name}: {'/'.join(m.kind for m in records)}" for name, records in maps.items())
    print(f"wrote {args.out} ({count} panels; {kinds})")
    return 0


# ---------------------------------------------------------------------------------------------
# attnzoo demo


def _default_demo_names() -> list[str]:
    registered = {s.name for s in list_modules()}
    names = [n for n in DEMO_ATTENTION if n in registered]
    return names or [s.name for s in list_modules() if s.layout == "NCHW"][:2]


def _cmd_demo(args: argparse.Namespace) -> int:
    from attnzoo import demo
    from attnzoo.maps import capture_maps

    specs = _resolve(args.attention) if args.attention else [get_spec(n) for n in _default_demo_names()]
    for value, flag in (
        (args.epochs, "--epochs"),
        (args.train_size, "--train-size"),
        (args.test_size, "--test-size"),
    ):
        if value < 1:
            raise CLIError(f"{flag} expects a positive count, got {value}")
    attentions: list[tuple[str, nn.Module | None]] = [("none", None)]
    for spec in specs:
        try:
            attentions.append(
                (
                    spec.name,
                    build_nchw(spec, demo.OddShapeNet.channels, demo.OddShapeNet.grid, seed=args.seed),
                )
            )
        except Unsupported as err:
            raise CLIError(f"{spec.name} cannot run inside the demo's CNN: {err}") from None
    train_x, train_y, _ = demo.make_shapes(args.train_size, seed=args.seed)
    test_x, test_y, test_boxes = demo.make_shapes(args.test_size, seed=args.seed + 10_000)
    batches = (args.train_size + args.batch_size - 1) // args.batch_size
    progress = Progress(len(attentions) * args.epochs * batches, "demo training")
    results, models = [], {}
    for label, attention in attentions:
        torch.manual_seed(args.seed)
        model = demo.OddShapeNet(attention)
        start = time.perf_counter()
        losses = demo.train(
            model,
            train_x,
            train_y,
            epochs=args.epochs,
            batch_size=args.batch_size,
            seed=args.seed,
            step=functools.partial(progress.advance, note=label),
        )
        seconds = time.perf_counter() - start
        accuracy = demo.evaluate(model, test_x, test_y)
        params = 0 if attention is None else _params(attention)
        results.append(demo.Result(label, accuracy, seconds, params, losses))
        models[label] = model
    progress.close()
    # Where the attention looks: the maps of the trained models over the test images.
    queries = [((i + 0.5) / 4, (j + 0.5) / 4) for i in range(4) for j in range(4)]
    count = min(args.test_size, 64)
    heats: dict[str, list[Tensor | None]] = {}
    for label, model in models.items():
        if label == "none":
            continue
        model.eval()
        with torch.no_grad(), capture_maps(model, queries=queries, token_grid=demo.OddShapeNet.grid) as maps:
            model(test_x[:count])
        heats[label] = _first_heatmaps(maps, count)
    header = ("attention", "params", "test accuracy", "train s", "map peak on the odd shape")
    rows = []
    for r in results:
        peak = "-"
        if any(h is not None for h in heats.get(r.name, [])):
            maps_and_boxes = zip(heats[r.name], test_boxes[: len(heats[r.name])], strict=True)
            pairs = [demo.peak_on_odd_shape(h, b) for h, b in maps_and_boxes if h is not None]
            hits = sum(p[0] for p in pairs)
            chance = sum(p[1] for p in pairs) / len(pairs)
            peak = f"{hits}/{len(pairs)} test images (by chance ~{chance:.0%})"
        rows.append((r.name, f"{r.attention_params:,}", f"{r.accuracy:.1%}", f"{r.seconds:.1f}", peak))
    print(
        f"odd-shape task: {args.train_size} training / {args.test_size} held-out images, "
        f"{args.epochs} epochs, seed {args.seed}; chance {1 / len(demo.KINDS):.1%}"
    )
    print(_table(header, rows))
    shown = [(label, h[:8]) for label, h in heats.items() if any(x is not None for x in h)]
    if shown and args.out:
        try:
            from attnzoo._plots import grid_figure

            grid_figure(
                list(test_x[:8]),
                shown,
                args.out,
                title="attention of the trained models (odd shape = circle, square or triangle)",
            )
            print(f"wrote {args.out}")
        except ImportError as err:
            print(f"no picture: {err}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.__dict__ for r in results], f, indent=2)
        print(f"wrote {args.json}")
    return 0


def _first_heatmaps(maps: dict[str, list[Any]], count: int) -> list[Tensor | None]:
    """Per image, a summary heat map (see ``_plots.heatmap``): of the first spatial gate recorded,
    else of the first attention rows (the attention each position receives), else of the routing."""
    from attnzoo._plots import heatmap
    from attnzoo.demo import OddShapeNet

    for kind in ("spatial", "rows", "routing"):
        for records in maps.values():
            for m in records:
                if m.kind == kind and heatmap(m, OddShapeNet.grid) is not None:
                    return [heatmap(m, OddShapeNet.grid, sample=i) for i in range(count)]
    return [None] * count


# ---------------------------------------------------------------------------------------------
# The parser


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"attnzoo: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``attnzoo`` command."""
    common = _Parser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error"
    )
    parser = _Parser(
        prog="attnzoo",
        parents=[common],
        description="Attention mechanisms for PyTorch: list, inspect, benchmark and look at them.",
    )
    parser.add_argument("--version", action="version", version=f"attnzoo {attnzoo.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def add(name: str, help_text: str, func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(
            name, help=help_text, description=help_text, parents=[common]
        )
        p.set_defaults(func=func)
        return p

    def formats(p: argparse.ArgumentParser) -> None:
        p.add_argument("--format", choices=("table", "csv", "json"), default="table", help="output format")
        p.add_argument("-o", "--output", default=None, help="write the output to this file instead of stdout")

    p = add("list", "table of every registered mechanism, with parameters and FLOPs", _cmd_list)
    p.add_argument("--family", default=None, help="only this family")
    p.add_argument(
        "--input", default=LIST_INPUT, help=f"input for parameters and FLOPs (default {LIST_INPUT})"
    )
    formats(p)

    p = add("info", "docstring, arguments, shapes, parameters and FLOPs of one mechanism", _cmd_info)
    p.add_argument("name", help="registry name, alias or seed class name")
    p.add_argument("--input", default=LIST_INPUT, help=f"BxCxHxW, BxLxC or BxCxTxHxW (default {LIST_INPUT})")

    p = add("bench", "time mechanisms on one input: parameters, FLOPs, latency, memory, GFLOP/s", _cmd_bench)
    p.add_argument("names", nargs="*", help="mechanisms (default: all that accept the input)")
    p.add_argument(
        "--input", default=BENCH_INPUT, help=f"BxCxHxW, BxLxC or BxCxTxHxW (default {BENCH_INPUT})"
    )
    p.add_argument(
        "--mode", choices=("fwd", "train"), default="fwd", help="forward only, or forward+backward"
    )
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    p.add_argument(
        "--rounds", type=int, default=BENCH_ROUNDS, help=f"alternating timing rounds (default {BENCH_ROUNDS})"
    )
    p.add_argument(
        "--memory",
        choices=("shared", "fresh", "off"),
        default="shared",
        help="peak memory: all in one fresh subprocess (default), one subprocess each, or not at all",
    )
    p.add_argument("--plot", default=None, metavar="PNG", help="save a chart (needs attnzoo[plots])")
    formats(p)

    p = add("maps", "a mechanism's attention maps over an image, as a PNG grid of overlays", _cmd_maps)
    p.add_argument("name", help="registry name, alias or seed class name")
    p.add_argument(
        "--image", default=None, help="image file (default: the sample image shipped with attnzoo)"
    )
    p.add_argument("--out", default="maps.png", help="PNG to write (default maps.png)")
    p.add_argument("--size", type=int, default=112, help="resize the image to SIZE x SIZE (default 112)")
    p.add_argument(
        "--channels", type=int, default=32, help="feature channels the mechanism sees (default 32)"
    )
    p.add_argument(
        "--queries", default=None, help="query points as fractions 'y,x;y,x' (default: centre and quadrants)"
    )
    p.add_argument("--seed", type=int, default=0)

    p = add("demo", "train a small CNN with and without attention on a generated odd-shape task", _cmd_demo)
    p.add_argument(
        "--attention",
        nargs="+",
        default=None,
        metavar="NAME",
        help=f"mechanisms to compare with no attention (default: {', '.join(DEMO_ATTENTION)})",
    )
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train-size", type=int, default=1500)
    p.add_argument("--test-size", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="demo_maps.png", help="PNG of the attention maps ('' for none)")
    p.add_argument("--json", default=None, help="also write the results as JSON here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit code (2 for user errors)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    debug = getattr(args, "debug", False)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("attnzoo: interrupted", file=sys.stderr)
        return 130
    except (CLIError, ValueError, TypeError, OSError, ImportError, RuntimeError) as err:
        if debug:
            raise
        print(f"attnzoo: error: {_reason(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
