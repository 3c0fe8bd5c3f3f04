"""The `attnzoo` command: `list`, `info`, `bench`, `maps`, `demo` and `compare`.

Names are registry names, aliases or seed class names (`attnzoo bench se cbam`). Errors are one
line on stderr and exit code 2 (a traceback only with `--debug`). Pictures need the optional
extra `attnzoo[plots]` (matplotlib), imported only when a picture is asked for.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

import attnzoo
from attnzoo._registry import get_spec, list_modules
from attnzoo.cli import bench as _bench
from attnzoo.cli import compare as _compare
from attnzoo.cli import demo, maps_command
from attnzoo.cli.bench import BENCH_INPUT, BENCH_ROUNDS, DTYPES, count_step_flops, param_count
from attnzoo.cli.console import CLIError, check_outputs, emit, reason, si, table
from attnzoo.cli.maps_command import MAPS_TRAIN_STEPS, sample_image
from attnzoo.surgery.build import Unsupported, build, parse_shape

__all__ = ["main", "build_parser", "CLIError", "sample_image"]

LIST_INPUT = "1x64x32x32"


# ---------------------------------------------------------------------------------------------
# Output helpers


# ---------------------------------------------------------------------------------------------
# attnzoo list / info


def _cmd_list(args: argparse.Namespace) -> int:
    or_example = args.input is None  # the default input: a mechanism that cannot take it runs its example
    args.input = args.input or LIST_INPUT
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
            built = build(spec, shape, or_example=or_example)
            row["input"] = built.input_note
            row["params"] = param_count(built.module)
            row["flops"] = count_step_flops(spec, shape, "fwd", or_example)
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
    # The input's own reading (a 3-D input is tokens, not B x C x H x W as the line always said).
    axes = {3: "B x L x C", 4: "B x C x H x W", 5: "B x C x T x H x W"}[len(shape)]
    text = (
        f"{len(rows)} mechanisms; params and forward FLOPs at input {args.input} ({axes}, converted "
        f"to each layout; SEQ2SEQ: one query against the tokens)\n" + table(header, table_rows)
    )
    if notes:
        text += "\n\n" + "\n".join(notes)
    emit(rows, args.format, args.output, text, {"input": args.input})
    return 0


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _cmd_info(args: argparse.Namespace) -> int:
    spec = get_spec(args.name)
    or_example = args.input is None  # the default input: a mechanism that cannot take it runs its example
    args.input = args.input or LIST_INPUT
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
        built = build(spec, shape, or_example=or_example)
    except Unsupported as err:
        raise CLIError(f"{spec.name} cannot take input {args.input}: {err}") from None
    with torch.no_grad():
        out = built.module.eval()(*built.inputs)
    out_shape = tuple((out[0] if isinstance(out, tuple) else out).shape)
    args_text = ", ".join(f"{k}={v!r}" for k, v in built.kwargs.items())
    where = "its registry example" if built.from_example else f"input {args.input}"
    print(f"at {where}: {spec.cls.__name__}({args_text})")
    print(f"  input  {' + '.join(str(tuple(x.shape)) for x in built.inputs)}")
    print(f"  output {out_shape}")
    print(f"  parameters {param_count(built.module):,}")
    fwd = count_step_flops(spec, shape, "fwd", or_example)
    train = count_step_flops(spec, shape, "train", or_example)
    print(f"  FLOPs forward {si(fwd)} ({fwd:,}), forward+backward {si(train)} ({train:,})")
    return 0


# ---------------------------------------------------------------------------------------------
# attnzoo bench




# ---------------------------------------------------------------------------------------------
# The parser


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"attnzoo: error: {message} (see '{self.prog} --help')\n")


# torch.manual_seed takes [-2**63, 2**64); demo and compare derive a few more seeds by adding to it.
_SEEDS = (-(2**63), 2**64 - 2**20)


def _seed(text: str) -> int:
    """argparse type of ``--seed``: an int torch can seed with (a one-line error otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects an integer, got {text!r}") from None
    if not _SEEDS[0] <= value < _SEEDS[1]:
        raise argparse.ArgumentTypeError(f"expects an integer in [-2**63, 2**64 - 2**20), got {text}")
    return value


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
        p.add_argument("-o", "--output", default=None,
                       help="write the --format output to this file (csv, json: the table still prints)")

    p = add("list", "table of every registered mechanism, with parameters and FLOPs", _cmd_list)
    p.add_argument("--family", default=None, help="only this family")
    p.add_argument(
        "--input", default=None, help=f"input for parameters and FLOPs (default {LIST_INPUT})"
    )
    formats(p)

    p = add("info", "docstring, arguments, shapes, parameters and FLOPs of one mechanism", _cmd_info)
    p.add_argument("name", help="registry name, alias or seed class name")
    p.add_argument("--input", default=None, help=f"BxCxHxW, BxLxC or BxCxTxHxW (default {LIST_INPUT})")

    p = add("bench", "time mechanisms on one input: parameters, FLOPs, latency, memory, GFLOP/s", _bench.run)
    p.add_argument("names", nargs="*", help="mechanisms (default: all that accept the input)")
    p.add_argument(
        "--input",
        default=None,
        help=f"BxCxHxW, BxLxC or BxCxTxHxW (default {BENCH_INPUT}; a mechanism that cannot take the "
        f"default runs its registry example)",
    )
    p.add_argument(
        "--mode", choices=("fwd", "train"), default="fwd", help="forward only, or forward+backward"
    )
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="(default float32)")
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

    p = add("maps", "a mechanism's attention maps over an image, as a PNG grid of overlays", maps_command.run)
    p.add_argument("name", help="registry name, alias or seed class name")
    p.add_argument(
        "--image", default=None, help="image file (default: the sample image shipped with attnzoo)"
    )
    p.add_argument("-o", "--out", "--output", dest="out", default="maps.png",
                   help="PNG to write (default maps.png)")
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
    p.add_argument("--seed", type=_seed, default=0,
                   help="seed of the features, weights, training (default 0)")

    p = add("demo", "train a small CNN with and without attention on a generated odd-shape task", demo.run)
    p.add_argument(
        "--attention",
        nargs="+",
        default=None,
        metavar="NAME",
        help=f"mechanisms to compare with no attention (default: {', '.join(demo.DEFAULT_ATTENTION)})",
    )
    p.add_argument("--epochs", type=int, default=3, help="training epochs (default 3)")
    p.add_argument("--train-size", type=int, default=1500, help="training images (default 1500)")
    p.add_argument("--test-size", type=int, default=500, help="held-out images (default 500)")
    p.add_argument("--batch-size", "--batch", dest="batch_size", type=int, default=32,
                   help="images per training step (default 32)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the data, weights, training (default 0)")
    p.add_argument(
        "-o", "--out", "--output", dest="out", default="demo_maps.png",
        help="PNG of the maps (default demo_maps.png; '' for none)",
    )
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
        "--batch-size", "--batch", dest="batch", type=int, default=None,
        help=f"images per step: training, latency and memory (default {d['batch']})",
    )
    p.add_argument(
        "--rounds", type=int, default=None, help=f"alternating latency rounds (default {d['rounds']})"
    )
    p.add_argument("--seed", type=_seed, default=0, help="seed of the data, weights, training (default 0)")
    p.add_argument("--csv", default=None, metavar="PATH", help="also write the results as CSV here")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON here")
    p.add_argument(
        "--plot", default=None, metavar="PNG", help="accuracy against latency chart (needs attnzoo[plots])"
    )
    formats(p)
    return parser


def _glue_dashed_values(words: list[str]) -> list[str]:
    """`--input -1x3x8x8` as `--input=-1x3x8x8`: argparse reads a value that starts with a dash and is
    not a plain number as an option, and says "expected one argument" instead of what is wrong."""
    out: list[str] = []
    for i, word in enumerate(words):
        if word == "--":  # the end of the options: what follows is positional, as typed (not "--=-1")
            return out + words[i:]
        if out and out[-1].startswith("--") and "=" not in out[-1] and re.match(r"-\d", word):
            out[-1] = f"{out[-1]}={word}"
        else:
            out.append(word)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit code (2 for user errors)."""
    parser = build_parser()
    words = _glue_dashed_values(list(sys.argv[1:] if argv is None else argv))
    args, unknown = parser.parse_known_args(words)
    if unknown:  # named by the subcommand whose options the user meant, when they follow it
        after = args.command in words and words.index(unknown[0]) > words.index(args.command)
        where = f"attnzoo {args.command}" if args.command and after else "attnzoo"
        print(f"attnzoo: error: unrecognized arguments: {' '.join(unknown)} (see '{where} --help')",
              file=sys.stderr)
        return 2
    if args.command is None:
        parser.print_help()
        return 0
    debug = getattr(args, "debug", False)
    try:
        check_outputs(args)
        code = int(args.func(args))
        sys.stdout.flush()  # here, so a closed pipe is met by the handler below, not at exit
        return code
    except BrokenPipeError:
        # The reader went away (`attnzoo list | head`): stop quietly as Unix tools do, with the
        # shell's SIGPIPE status; stdout goes to devnull so the interpreter's last flush is silent.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
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
