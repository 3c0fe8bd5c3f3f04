"""Generated documentation pieces: the README's tables come from the registry and attnzoo._compat.

``python -m attnzoo._docs`` rewrites the tables in README.md and docs/; a test fails when they are
stale.
"""

from __future__ import annotations

import sys
from pathlib import Path

from attnzoo._compat import compat_table
from attnzoo._registry import list_modules

START, END = "<!-- mechanisms:start -->", "<!-- mechanisms:end -->"
COMPAT_START, COMPAT_END = "<!-- compat:start -->", "<!-- compat:end -->"


def mechanism_table() -> str:
    """The Markdown table of every registered mechanism."""
    rows = ["| name | class | seed name | family | paper | layout |", "|---|---|---|---|---|---|"]
    for s in list_modules():
        seed = f"`compat.{s.seed_name}`" if s.seed_name else ""
        rows.append(f"| `{s.name}` | `{s.cls.__name__}` | {seed} | {s.family} | {s.paper} ({s.year}) | {s.layout} |")
    return "\n".join(rows)


def replace_between(text: str, start: str, end: str, body: str) -> str:
    """``text`` with the part between the two marker lines replaced by ``body``."""
    head, sep, rest = text.partition(start)
    if not sep or end not in rest:
        raise ValueError(f"markers {start!r} ... {end!r} not found")
    tail = rest.split(end, 1)[1]
    return f"{head}{start}\n{body}\n{end}{tail}"


def generated_files(root: Path) -> dict[Path, str]:
    """Every file with generated parts, and what it should contain now."""
    out = {}
    for path in (root / "README.md", root / "docs" / "index.md", root / "docs" / "compatibility.md"):
        if not path.exists():
            continue
        text = path.read_text()
        if START in text:
            text = replace_between(text, START, END, mechanism_table())
        if COMPAT_START in text:
            text = replace_between(text, COMPAT_START, COMPAT_END, compat_table())
        out[path] = text
    results = root / "benchmarks" / "RESULTS.md"
    if results.exists() and (root / "docs").exists():
        body = results.read_text()
        out[root / "docs" / "benchmarks.md"] = (
            "<!-- generated from benchmarks/RESULTS.md by python -m attnzoo._docs -->\n" + body
        )
    return out


def main(root: str = ".") -> int:
    for path, text in generated_files(Path(root)).items():
        path.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:]))
