"""Console output of the `attnzoo` command: a progress bar, tables, CSV/JSON, one-line errors."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from attnzoo._registry import Spec, get_spec

__all__ = ["CLIError", "check_picture_path", "Progress", "si", "num", "table", "render", "write_text", "emit",
           "reason", "resolve"]


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


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


def si(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.{digits}g}{suffix}"
    return f"{value:.{digits}g}"


def num(value: float | None) -> str:
    """A measurement with about 3 significant digits, never in exponent form."""
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if value >= 0.01 else "<0.01"


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]
    lines = [
        "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=False)).rstrip(),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip() for row in cells]
    return "\n".join(lines)


def render(rows: list[dict[str, Any]], fmt: str, text_table: str, extra: dict[str, Any]) -> str:
    """`rows` as CSV (one line per row), JSON (`extra` plus `"results": rows`) or `text_table`."""
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["name"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue()
    if fmt == "json":
        return json.dumps({**extra, "results": rows}, indent=2) + "\n"
    return text_table + "\n"


def plural(count: int, noun: str) -> str:
    """`1 thread`, `2 threads`."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


# The options that name a file the command writes at its end, by argparse's attribute name.
OUTPUT_OPTIONS = {"output": "-o/--output", "plot": "--plot", "out": "--out", "csv": "--csv", "json": "--json"}


def check_outputs(args: object) -> None:
    """Refuse, before any work, an output file whose folder is missing or not writable, an empty file
    name, a chart in a format matplotlib lacks, or an empty `--input`/`--image`: otherwise a benchmark
    runs for minutes and then fails on `open`."""
    for attr, option in OUTPUT_OPTIONS.items():
        path = getattr(args, attr, None)
        if path == "" and attr != "out":  # `demo --out ''` means no picture; maps refuses '' itself
            raise CLIError(f"{option} expects a file name, got ''")
        if not path:
            continue
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise CLIError(f"{option} {path!r}: the folder {folder!r} does not exist")
        if not os.access(folder, os.W_OK):
            raise CLIError(f"{option} {path!r}: the folder {folder!r} is not writable")
        if os.path.isdir(path):
            raise CLIError(f"{option} {path!r} is a folder; expected a file name")
        if attr == "plot":  # the chart is drawn last: a format matplotlib lacks failed after the work
            check_picture_path(path, option)
    for attr in ("input", "image"):  # '' silently fell back to the default input or sample image
        if getattr(args, attr, None) == "":
            raise CLIError(f"--{attr} expects a value, got ''; leave the option out for the default")


def write_text(path: str, text: str) -> None:
    """Write `text` to `path`; an `OSError` naming the file when that fails."""
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as err:
        raise OSError(f"cannot write {path!r}: {err.strerror or err}") from None


def emit(
    rows: list[dict[str, Any]], fmt: str, output: str | None, text_table: str, extra: dict[str, Any]
) -> None:
    """Print `text_table` (or CSV/JSON of `rows`); with `output`, write the chosen format there."""
    text = render(rows, fmt, text_table, extra)
    if output is None:
        sys.stdout.write(text)
        return
    write_text(output, text)
    if fmt != "table":
        sys.stdout.write(text_table + "\n")
    print(f"wrote {output}")


def reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def resolve(names: Sequence[str]) -> list[Spec]:
    specs: list[Spec] = []
    for raw in names:
        if not raw.strip(", "):  # `bench ''` ran nothing, `demo --attention ''` only the baseline
            raise CLIError(f"a mechanism name is expected (such as se or se,cbam), got {raw!r}")
        for name in (n for n in raw.split(",") if n):
            spec = get_spec(name)
            if spec not in specs:
                specs.append(spec)
    return specs


def check_picture_path(path: str, flag: str = "--out") -> None:
    """Refuse, before any work (training included), a picture path in a format matplotlib does not know
    (`maps.txt`) or an empty one. No suffix writes a PNG. (A missing folder is refused with every output
    path.)"""
    if not path:
        raise CLIError(f"{flag} expects a picture file name such as maps.png, got ''")
    suffix = os.path.splitext(path)[1].lower().lstrip(".")
    if suffix:
        try:
            from matplotlib.figure import Figure
        except ImportError:  # the picture step says what to install
            return
        known = Figure().canvas.get_supported_filetypes()
        if suffix not in known:
            raise CLIError(f"{flag} expects a picture file ({', '.join(sorted(known))}), got {path!r}")
