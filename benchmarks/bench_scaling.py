"""Time and peak memory against the number of positions N = H * W, from 1k to 64k, for the global
mechanisms and the O(N) token mixers, next to the anchors that run out of memory.

    PYTHONPATH=src python benchmarks/bench_scaling.py [--n 1024 4096 16384 65536] [--only sagan halo]
        [--json docs/data/scaling.json] [--png docs/images/scaling.png]

One image (B = 1, C = 64, H = W = sqrt(N)), forward + backward of `out.sum()` in float32. Each
candidate's peak memory is measured first, in a fresh process whose address space is capped
(`--cap-gb`, default 16, of which torch's own mappings take about 3.5): an anchor that needs more
fails there with an allocation error and is reported as out of memory instead of being timed. The
candidates that fit are then timed in alternating rounds. Where an anchor exists (the seed's
algorithm, timm or fightingcv), attnzoo's module is converted from it and holds the same weights;
linear and neighbourhood attention have no counterpart in either collection, so their GFLOP/s
(FLOPs counted by torch's FlopCounterMode)
against the machine's GEMM rate stands in.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_global  # noqa: E402
from machine import describe_machine, gemm_gflops  # noqa: E402

import attnzoo  # noqa: E402
from attnzoo.cli.harness import (  # noqa: E402
    alternate,
    count_flops,
    ensure_malloc_env,
    markdown_table,
    peak_memory,
    train_step,
)
from attnzoo.convert import convert  # noqa: E402

C = 64


def _fcv(path: str, cls: str, *args: object, **kwargs: object) -> nn.Module:
    import importlib

    module = importlib.import_module(f"fightingcv_attention.attention.{path}")
    return getattr(module, cls)(*args, **kwargs)


def _timm_halo() -> nn.Module:
    from timm.layers.halo_attn import HaloAttn

    return HaloAttn(C, num_heads=4, block_size=8, halo_size=3)


# mechanism -> (layout, {anchor name: factory}, attnzoo factory or None to convert the first anchor)
MECHANISMS: dict[str, tuple[str, dict[str, Callable[[], nn.Module]], Callable[[], nn.Module] | None]] = {
    "sagan": ("nchw", {"seed": lambda: bench_global.build("seed_sagan", (1, C, 8, 8))}, None),
    "nonlocal": ("nchw", {"seed": lambda: bench_global.build("seed_nonlocal", (1, C, 8, 8))}, None),
    "criss_cross": (
        "nchw",
        {"fightingcv": lambda: _fcv("CrissCrossAttention", "CrissCrossAttention", C)},
        None,
    ),
    "axial": ("nhwc", {"fightingcv": lambda: _fcv("Axial_attention", "AxialAttention", C, heads=4)}, None),
    "outlook": (
        "nhwc",
        {"fightingcv": lambda: _fcv("OutlookAttention", "OutlookAttention", C, num_heads=4)},
        None,
    ),
    "halo": ("nchw", {"timm": _timm_halo}, None),
    "neighborhood_2d": ("nhwc", {}, lambda: attnzoo.NeighborhoodAttention2d(C, num_heads=4, kernel_size=7)),
    "linear": ("nlc", {}, lambda: attnzoo.LinearAttention(C, num_heads=4)),
}


def _ours_from(anchor: nn.Module, mechanism: str) -> nn.Module:
    if mechanism == "sagan":
        m: nn.Module = attnzoo.SpatialSelfAttention(C, rd_channels=C // 8)
        m.load_state_dict(anchor.state_dict())
        return m
    if mechanism == "nonlocal":
        m = attnzoo.NonLocalBlock(C, pool_keys=False)
        m.load_state_dict(anchor.state_dict())
        return m
    return convert(anchor)


def build(mechanism: str, candidate: str) -> nn.Module:
    torch.manual_seed(0)
    _, anchors, ours = MECHANISMS[mechanism]
    if candidate != "attnzoo":
        return anchors[candidate]()
    if ours is not None:
        return ours()
    first = next(iter(anchors))
    return _ours_from(anchors[first](), mechanism)


def make_input(mechanism: str, n: int) -> torch.Tensor:
    side = int(round(n**0.5))
    layout = MECHANISMS[mechanism][0]
    shape = {"nchw": (1, C, side, side), "nhwc": (1, side, side, C), "nlc": (1, n, C)}[layout]
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


def make_step(mechanism: str, candidate: str, n: int, cap_gb: float = 0.0) -> Callable[[], object]:
    """Factory for `peak_memory`; with `cap_gb` the process's address space is capped first, so an
    anchor that needs more fails with an allocation error instead of swapping the machine."""
    step = train_step(build(mechanism, candidate), [make_input(mechanism, n)])
    if cap_gb:  # after the imports and the module are built: only the step's own allocations count
        cap = int(cap_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    return step


def measure(mechanism: str, n: int, rounds: int, cap_gb: float) -> dict[str, dict[str, float | str]]:
    candidates = [*MECHANISMS[mechanism][1], "attnzoo"]
    result: dict[str, dict[str, float | str]] = {}
    fits = []
    for c in candidates:
        kwargs = {"mechanism": mechanism, "candidate": c, "n": n, "cap_gb": cap_gb}
        try:
            peak = peak_memory("bench_scaling:make_step", kwargs, timeout=1800)
        except RuntimeError as exc:
            if not any(
                s in str(exc) for s in ("can't allocate", "MemoryError", "bad_alloc", "out of memory")
            ):
                raise
            result[c] = {"status": f"out of memory (> {cap_gb:.0f} GB address space)"}
            continue
        result[c] = {"peak_mib": peak / 2**20}
        fits.append(c)
    steps = {c: make_step(mechanism, c, n) for c in fits}
    timing = alternate(steps, rounds=rounds, warmup=1 if n <= 16384 else 0)
    for c in fits:
        result[c]["ms"] = timing.median(c) * 1e3
    if "attnzoo" in fits and not MECHANISMS[mechanism][1]:
        result["attnzoo"]["gflops"] = count_flops(steps["attnzoo"]) / timing.median("attnzoo") / 1e9
    return result


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(data["results"])
    fig, axes = plt.subplots(2, 2, figsize=(12, 9), constrained_layout=True)
    groups = [
        ("Global attention (N x N map)", [m for m in names if m in ("sagan", "nonlocal")]),
        ("O(N) token mixers", [m for m in names if m not in ("sagan", "nonlocal")]),
    ]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, (title, mechs) in enumerate(groups):
        for col, (key, label) in enumerate([("ms", "time per step (ms)"), ("peak_mib", "peak memory (MiB)")]):
            ax = axes[row][col]
            for i, mech in enumerate(mechs):
                per_n = data["results"][mech]
                cands = sorted({c for cell in per_n.values() for c in cell})
                for cand in cands:
                    xs = [int(n) for n in per_n if key in per_n[n].get(cand, {})]
                    ys = [per_n[str(n)][cand][key] for n in xs]
                    style = "-o" if cand == "attnzoo" else "--s"
                    ax.plot(xs, ys, style, color=colors[i % len(colors)], label=f"{mech}: {cand}")
                    oom = [int(n) for n in per_n if "status" in per_n[n].get(cand, {})]
                    if oom and ys:  # drawn at the last value it reached: the N where it ran out
                        ax.plot(oom, [ys[-1]] * len(oom), "x", color=colors[i % len(colors)], markersize=12,
                                label=f"{mech}: {cand} out of memory")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N = H x W")
            ax.set_ylabel(label)
            ax.set_title(f"{title}: {label}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"Forward + backward, B = 1, C = {C}, float32 ({data['machine']})\n"
                 "solid: attnzoo, dashed: the anchor; x: the anchor ran out of memory at that N "
                 "(drawn at the last value it reached)")
    fig.savefig(path, dpi=90)


def table(data: dict) -> str:
    """One row per mechanism and candidate, one column per N: "ms / MiB" (or why it did not run)."""
    sizes = sorted({int(n) for per_n in data["results"].values() for n in per_n})
    rows = []
    for mech, per_n in data["results"].items():
        cands = list(dict.fromkeys(c for cell in per_n.values() for c in cell))
        for cand in cands:
            cells, rate = [], ""
            for n in sizes:
                cell = per_n.get(str(n), {}).get(cand, {})
                if "ms" in cell:
                    cells.append(f"{cell['ms']:.1f} ms / {cell['peak_mib']:.1f} MiB")
                else:
                    cells.append(cell.get("status", "-"))
                if "gflops" in cell:
                    rate = f"{cell['gflops']:.0f} ({cell['gflops'] / data['gemm_gflops']:.0%})"
            rows.append([mech, cand, *cells, rate])
    header = ["mechanism", "candidate", *(f"N = {n}" for n in sizes), "GFLOP/s at the largest N (of GEMM)"]
    return markdown_table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, nargs="*", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--only", nargs="*", default=list(MECHANISMS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cap-gb", type=float, default=16.0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--merge", action="store_true", help="keep the other mechanisms already in --json")
    parser.add_argument("--png", type=Path, default=None)
    args = parser.parse_args()
    ensure_malloc_env()
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p)
    started = time.time()
    data: dict = {"machine": describe_machine(), "gemm_gflops": gemm_gflops(), "results": {}}
    if args.merge and args.json and args.json.exists():
        data["results"] = json.loads(args.json.read_text())["results"]
    for mech in args.only:
        data["results"][mech] = {}
        for n in args.n:
            rounds = args.rounds if n <= 16384 else 1
            data["results"][mech][str(n)] = measure(mech, n, rounds, args.cap_gb)
            print(
                f"{mech} N={n}: {data['results'][mech][str(n)]} ({time.time() - started:.0f} s)",
                file=sys.stderr,
            )
    if args.json:
        args.json.write_text(json.dumps(data, indent=1) + "\n")
    if args.png:
        plot(data, args.png)
    print(f"### Scaling with N on {data['machine']}\n")
    print(
        f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__}, GEMM {data['gemm_gflops']:.0f} GFLOP/s; "
        f"B = 1, C = {C}, forward + backward, float32 (bench_scaling.py); each cell: median time / peak "
        "memory one step adds.\n"
    )
    print(table(data))
    print(f"\n(total {time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
