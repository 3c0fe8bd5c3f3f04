"""Generated documentation pieces: the README's tables come from the registry and attnzoo.cli.matrix.

``python -m tools.gen_docs`` rewrites the tables in README.md and docs/; a test fails when they are
stale.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from attnzoo._registry import get_spec, list_modules
from attnzoo.cli.matrix import compat_table

START, END = "<!-- mechanisms:start -->", "<!-- mechanisms:end -->"
COMPAT_START, COMPAT_END = "<!-- compat:start -->", "<!-- compat:end -->"
API_START, API_END = "<!-- api:start -->", "<!-- api:end -->"
MAP_START, MAP_END = "<!-- map:start -->", "<!-- map:end -->"


def mechanism_table(pages: str = "mechanisms/") -> str:
    """The Markdown table of every registered mechanism, each name linking to its page under `pages`
    (relative to the file the table goes into). The seed or official name sits under the class and
    the layout beside the family, so the table fits the docs' text column."""
    rows = ["| name | class (seed or official name) | family, layout | paper |", "|---|---|---|---|"]
    for s in list_modules():
        seed = f"<br>`compat.{s.seed_name}`" if s.seed_name else ""
        rows.append(
            f"| [`{s.name}`]({pages}{s.name}.md) | `{s.cls.__name__}`{seed} | {s.family}, {s.layout} | "
            f"{s.paper} ({s.year}) |"
        )
    return "\n".join(rows)


def _qualified(obj: object) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"  # type: ignore[attr-defined]


def mechanism_api(name: str) -> str:
    """The generated part of ``docs/mechanisms/<name>.md``: mkdocstrings blocks and the example.

    A mechanism that is not registered (its family is not merged yet) gets a note instead of
    ``:::`` blocks, which would make ``mkdocs build --strict`` fail.
    """
    specs = {s.name: s for s in list_modules()}
    spec = specs.get(name)
    if spec is None:
        return (
            '!!! note "Not available in this build"\n'
            f"    `{name}` is not registered yet; its API reference appears here once its family\n"
            "    is merged (run `python -m tools.gen_docs`)."
        )
    ex = spec.example
    lines = [
        f"Registered as `{spec.name}` (family `{spec.family}`, layout `{spec.layout}`). "
        f"Smallest tested configuration: `{spec.cls.__name__}(**{ex.kwargs!r})` on inputs "
        f"{', '.join(str(tuple(i)) for i in ex.inputs)} gives {tuple(ex.output)}.",
        "",
        f"::: {_qualified(spec.cls)}",
    ]
    if spec.seed_cls is not None and spec.seed_cls is not spec.cls:
        lines += ["", f"::: {_qualified(spec.seed_cls)}"]
    return "\n".join(lines)


# Input rules (`Spec.input_rule`) that take no image-shaped input, so `attnzoo maps` has no picture.
_NO_IMAGE_MAP = {
    "windows": (
        "`attnzoo maps` draws over an image; this module takes windows already cut from a map. The "
        "[shifted-window page](shifted_window.md) shows the same attention over a whole image."
    ),
    "frames": (
        "`attnzoo maps` draws over an image; this module attends along time in `(B, T, C)` frames. "
        "Capture its rows with `attnzoo.capture_maps(model)` on a clip."
    ),
}


def mechanism_map(root: Path, name: str) -> str:
    """The picture part of a mechanism page: the image when ``docs/images/<name>.png`` exists."""
    if (root / "docs" / "images" / f"{name}.png").exists():
        return f"![attention map of {name}](../images/{name}.png)"
    rule = get_spec(name).input_rule
    if rule in _NO_IMAGE_MAP:
        return _NO_IMAGE_MAP[rule]
    return (
        f"No picture yet: `attnzoo maps {name} --out docs/images/{name}.png`, then\n"
        "`python -m tools.gen_docs`, adds it here."
    )


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
            pages = "docs/mechanisms/" if path.name == "README.md" else "mechanisms/"
            text = replace_between(text, START, END, mechanism_table(pages))
        if COMPAT_START in text:
            text = replace_between(text, COMPAT_START, COMPAT_END, compat_table())
        out[path] = text
    for path in sorted((root / "docs" / "mechanisms").glob("*.md")):
        text = path.read_text()
        if API_START in text:
            text = replace_between(text, API_START, API_END, mechanism_api(path.stem))
        if MAP_START in text:
            text = replace_between(text, MAP_START, MAP_END, mechanism_map(root, path.stem))
        out[path] = text
    results = root / "benchmarks" / "RESULTS.md"
    if results.exists() and (root / "docs").exists():
        # Relative links in RESULTS.md point into benchmarks/, which the site does not hold.
        # Pictures live in docs/images and are linked from RESULTS.md as ../docs/images/...
        body = re.sub(r"(!\[[^\]]*\])\(\.\./docs/([^)]*)\)", r"\1(\2)", results.read_text())
        body = re.sub(r"(?<!!)\[([^\]]*)\]\((?!https?:|#)([^)]*)\)", r"\1 (`benchmarks/\2`)", body)
        out[root / "docs" / "benchmarks.md"] = (
            "<!-- generated from benchmarks/RESULTS.md by python -m tools.gen_docs -->\n" + body
        )
    return out


def main(root: str = ".") -> int:
    """Rewrite every generated file under ``root``; returns the exit status."""
    for path, text in generated_files(Path(root)).items():
        path.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:]))
