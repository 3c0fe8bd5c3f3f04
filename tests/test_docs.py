"""The docs site: a page and a nav entry per registered mechanism, and a strict MkDocs build."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import attnzoo

ROOT = Path(__file__).resolve().parents[1]
PAGES = ROOT / "docs" / "mechanisms"
SECTIONS = ("## Idea", "## Formula", "## Arguments", "## Shapes", "## Complexity",
            "## Differences from the seed / official code", "## Attention map")


@pytest.mark.parametrize("name", [s.name for s in attnzoo.list_modules()])
def test_every_mechanism_has_a_page(name: str) -> None:
    page = PAGES / f"{name}.md"
    assert page.exists(), f"docs/mechanisms/{name}.md is missing"
    text = page.read_text()
    for section in SECTIONS:
        assert section in text, f"{page.name} lacks the section {section!r}"
    assert "**Paper:**" in text and "$$" in text
    spec = attnzoo.get_spec(name)
    assert f"::: {spec.cls.__module__}.{spec.cls.__qualname__}" in text, (
        f"{page.name} has no API block for {spec.cls.__name__}: run python -m tools.gen_docs"
    )


def test_every_page_is_in_the_nav() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in sorted(PAGES.glob("*.md")):
        assert f"mechanisms/{page.name}" in nav, f"mkdocs.yml nav lacks mechanisms/{page.name}"
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f" {page.name}" in nav, f"mkdocs.yml nav lacks {page.name}"


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None,
    reason="mkdocs / mkdocstrings not installed (pip install mkdocs mkdocs-material 'mkdocstrings[python]')",
)
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
