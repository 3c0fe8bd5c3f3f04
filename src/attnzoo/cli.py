"""The ``attnzoo`` command.

Errors are one clear line on stderr and exit code 2 (a traceback only with ``--debug``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

import attnzoo
from attnzoo._registry import Spec


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


def _param_count(spec: Spec) -> int:
    module = spec.cls(**spec.example.kwargs)
    return sum(p.numel() for p in module.parameters())


def _cmd_list(args: argparse.Namespace) -> int:
    specs = attnzoo.list_modules(args.family)
    if args.family is not None and not specs:
        families = sorted({s.family for s in attnzoo.list_modules()})
        raise CLIError(f"no mechanism in family {args.family!r}; families: {', '.join(families)}")
    header = ("name", "seed name", "family", "paper", "year", "layout", "params (example)")
    rows = [
        (s.name, s.seed_name or "-", s.family, s.paper, str(s.year), s.layout, f"{_param_count(s):,}")
        for s in specs
    ]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=False)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``attnzoo`` command-line parser with its sub-commands."""
    parser = argparse.ArgumentParser(
        prog="attnzoo", description="Attention mechanisms for PyTorch: list, inspect and benchmark them."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"attnzoo {attnzoo.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p_list = sub.add_parser("list", help="table of every registered mechanism")
    p_list.add_argument("--family", default=None, help="only this family")
    p_list.set_defaults(func=_cmd_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``attnzoo`` command with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    try:
        return int(args.func(args))
    except (CLIError, ValueError, TypeError, OSError) as err:
        if args.debug:
            raise
        print(f"attnzoo: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
