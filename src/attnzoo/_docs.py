"""Generated documentation pieces: the README's table of mechanisms comes from the registry.

``python -m attnzoo._docs`` rewrites the table in README.md; a test fails when it is stale.
"""

from __future__ import annotations

import sys
from pathlib import Path

from attnzoo._registry import list_modules

START, END = "<!-- mechanisms:start -->", "<!-- mechanisms:end -->"


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


def main(path: str = "README.md") -> int:
    readme = Path(path)
    readme.write_text(replace_between(readme.read_text(), START, END, mechanism_table()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:]))
