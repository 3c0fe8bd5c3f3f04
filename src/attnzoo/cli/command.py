"""The `attnzoo` command: `list`, `info`, `bench`, `maps`, `demo` and `compare`.

Names are registry names, aliases or seed class names (`attnzoo bench se cbam`). Errors are one
line on stderr and exit code 2 (a traceback only with `--debug`). Pictures need the optional
extra `attnzoo[plots]` (matplotlib), imported only when a picture is asked for.
"""

from __future__ import annotations

import argparse
import importlib.resources
import inspect
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

import attnzoo
from attnzoo._registry import get_spec, list_modules
from attnzoo.cli import bench as _bench
from attnzoo.cli import compare as _compare
from attnzoo.cli import demo
from attnzoo.cli.bench import BENCH_INPUT, BENCH_ROUNDS, DTYPES, count_step_flops, param_count
from attnzoo.cli.console import CLIError, emit, reason, si, table
from attnzoo.surgery.build import Unsupported, build, build_nchw, parse_shape

__all__ = ["main", "build_parser", "CLIError", "sample_image"]

LIST_INPUT = "1x64x32x32"


# A few steps of the demo task: enough for gates to move away from their flat start.
MAPS_TRAIN_STEPS = 40


def sample_image() -> str:
    """Path of the sample image shipped with attnzoo (a few shapes, 112 x 112)."""
    return str(importlib.resources.files("attnzoo.cli") / "data" / "shapes.png")


# ---------------------------------------------------------------------------------------------
# Output helpers


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
            row["params"] = param_count(built.module)
            row["flops"] = count_step_flops(spec, shape, "fwd")
        except (ValueError, TypeError, RuntimeError) as err:
            row["note"] = reason(err)
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
            si(r["params"]),
            si(r["flops"]),
        )
        for r in rows
    ]
    notes = [f"  {r['name']}: cannot take {args.input}: {r['note']}" for r in rows if r["note"]]
    text = (
        f"{len(rows)} mechanisms; params and forward FLOPs at input {args.input} (B x C x H x W, converted "
        f"to each layout; SEQ2SEQ: one query against the H*W tokens)\n" + table(header, table_rows)
    )
    if notes:
        text += "\n\n" + "\n".join(notes)
    emit(rows, args.format, args.output, text, {"input": args.input})
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
    print(f"  parameters {param_count(built.module):,}")
    fwd, train = count_step_flops(spec, shape, "fwd"), count_step_flops(spec, shape, "train")
    print(f"  FLOPs forward {si(fwd)} ({fwd:,}), forward+backward {si(train)} ({train:,})")
    return 0


# ---------------------------------------------------------------------------------------------
# attnzoo bench


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
    """Fixed features of a `(3, H, W)` image at half resolution, `(1, channels, H/2, W/2)`.

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
    from attnzoo.cli.plots import load_image, plot_maps
    from attnzoo.maps.capture import capture_maps

    spec = get_spec(args.name)
    queries = _parse_queries(args.queries)
    if args.size < 8:
        raise CLIError(f"--size expects at least 8 pixels, got {args.size}")
    if args.train < 0:
        raise CLIError(f"--train expects a number of steps >= 0, got {args.train}")
    image = load_image(args.image or sample_image(), size=args.size)
    try:
        if args.train:  # the mechanism inside the demo network, trained a little on the demo task
            if args.channels != demo.OddShapeNet.channels:
                raise CLIError(f"--channels applies with --train 0 only (the demo network has "
                               f"{demo.OddShapeNet.channels} channels), got {args.channels}")
            net = demo.trained_net(spec, args.size, args.train, args.seed)
            with torch.no_grad():
                feats = net.stem(image[None])  # (1, 32, H/4, W/4)
            module, state = net.attn, f"trained {args.train} steps on the demo task"
        else:  # untrained, on fixed image features
            feats = image_features(image, args.channels, args.seed)
            module = build_nchw(spec, args.channels, (feats.shape[2], feats.shape[3]), seed=args.seed).eval()
            state = "untrained"
    except Unsupported as err:
        raise CLIError(f"{spec.name} cannot run on a {args.channels}-channel feature map: {err}") from None
    grid = (feats.shape[2], feats.shape[3])
    mechanism = next((m for m in module.modules() if isinstance(m, spec.cls)), module)
    with torch.no_grad(), capture_maps(mechanism, queries=queries, token_grid=grid) as maps:
        module(feats)
    if not maps:
        raise CLIError(f"{spec.name} recorded no attention maps (its module does not record any yet)")
    # Name the records from the mechanism: its own as its registry name, its parts' below it.
    root = type(mechanism).__name__
    maps = {spec.name if name == root else f"{spec.name}.{name}": records for name, records in maps.items()}
    source = os.path.basename(args.image or sample_image())
    title = f"{spec.name} ({spec.cls.__name__}, {state}, seed {args.seed}) on {source}"
    count = plot_maps(image, maps, args.out, title=title, token_grid=grid)
    kinds = ", ".join(f"{name}: {'/'.join(m.kind for m in records)}" for name, records in maps.items())
    print(f"wrote {args.out} ({count} panels; {kinds})")
    return 0


# ---------------------------------------------------------------------------------------------
# attnzoo demo


# ---------------------------------------------------------------------------------------------
# The parser


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"attnzoo: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `attnzoo` command."""
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

    p = add("bench", "time mechanisms on one input: parameters, FLOPs, latency, memory, GFLOP/s", _bench.run)
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
    p.add_argument(
        "--train",
        type=int,
        default=MAPS_TRAIN_STEPS,
        metavar="STEPS",
        help=f"train the mechanism inside the demo network for STEPS steps first, so the maps show what it "
        f"learnt (default {MAPS_TRAIN_STEPS}; 0: untrained, on fixed image features)",
    )
    p.add_argument("--seed", type=int, default=0)

    p = add("demo", "train a small CNN with and without attention on a generated odd-shape task", demo.run)
    p.add_argument(
        "--attention",
        nargs="+",
        default=None,
        metavar="NAME",
        help=f"mechanisms to compare with no attention (default: {', '.join(demo.DEFAULT_ATTENTION)})",
    )
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train-size", type=int, default=1500)
    p.add_argument("--test-size", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="demo_maps.png", help="PNG of the attention maps ('' for none)")
    p.add_argument("--json", default=None, help="also write the results as JSON here")

    p = add(
        "compare",
        "every mechanism on the demo's CNN and task: params, FLOPs, latency, memory, accuracy "
        f"(the defaults take {_compare.DEFAULT_MINUTES})",
        _compare.run,
    )
    p.add_argument("names", nargs="*", help="mechanisms (default: every registered one)")
    d, q = _compare.DEFAULTS, _compare.QUICK
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"tiny sizes for a smoke test: {q['train_size']} images, {q['epochs']} epoch, "
        f"batch {q['batch']}, {q['rounds']} round (flags given explicitly still win)",
    )
    p.add_argument("--epochs", type=int, default=None, help=f"training epochs (default {d['epochs']})")
    p.add_argument(
        "--train-size", type=int, default=None, help=f"training images (default {d['train_size']})"
    )
    p.add_argument(
        "--test-size", type=int, default=None, help=f"held-out images (default {d['test_size']})"
    )
    p.add_argument(
        "--batch", type=int, default=None,
        help=f"images per step: training, latency and memory (default {d['batch']})",
    )
    p.add_argument(
        "--rounds", type=int, default=None, help=f"alternating latency rounds (default {d['rounds']})"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--csv", default=None, metavar="PATH", help="also write the results as CSV here")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON here")
    p.add_argument(
        "--plot", default=None, metavar="PNG", help="accuracy against latency chart (needs attnzoo[plots])"
    )
    formats(p)
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
        print(f"attnzoo: error: {reason(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
