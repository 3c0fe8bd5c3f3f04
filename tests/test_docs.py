"""The docs site: a page and a nav entry per registered mechanism, and a strict MkDocs build."""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


# --- Docstring examples -------------------------------------------------------------------------
# Examples sit in ```python fences (Markdown, rendered by mkdocstrings); the `>>>` lines inside run
# here as doctests. The fence lines are dropped before parsing, so a closing fence is not read as
# expected output.

_FENCE = re.compile(r"^[ \t]*```[\w-]*[ \t]*$", re.M)


class _FencedDocTestParser(doctest.DocTestParser):
    def parse(self, string: str, name: str = "<string>") -> list:
        return super().parse(_FENCE.sub("", string), name)


def _modules() -> list[str]:
    names = ["attnzoo"]
    for info in pkgutil.walk_packages(attnzoo.__path__, "attnzoo."):
        if not info.name.endswith(".__main__"):  # importing it would run the command
            names.append(info.name)
    return sorted(names)


def _examples() -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder(parser=_FencedDocTestParser(), exclude_empty=True)
    tests = []
    for name in _modules():
        module = importlib.import_module(name)
        tests += [t for t in finder.find(module, name) if t.examples and t.name.startswith(name)]
    return sorted(tests, key=lambda t: t.name)


EXAMPLES = _examples()


def test_docstring_examples_are_found() -> None:
    assert any(t.name == "attnzoo._registry.create" for t in EXAMPLES), [t.name for t in EXAMPLES]


@pytest.mark.parametrize("example", EXAMPLES, ids=[t.name for t in EXAMPLES])
def test_docstring_example_runs(example: doctest.DocTest) -> None:
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    out: list[str] = []
    torch.manual_seed(0)
    result = runner.run(example, out=out.append, clear_globs=True)
    assert result.failed == 0, "".join(out)


# --- Math typeset at build time (tools/mkdocs_math.py) -------------------------------------------


def test_math_hook_turns_arithmatex_into_mathml() -> None:
    pytest.importorskip("latex2mathml")
    from tools.mkdocs_math import typeset

    page = ('<p>a <span class="arithmatex">\\(x &lt; \\frac{1}{2}\\)</span> b</p>'
            '<div class="arithmatex">\\[\\sum_i w_i = 1\\]</div>')
    out = typeset(page)
    assert 'data-tex="\\sum_i w_i = 1"' in out  # the display formula's TeX, for messages
    out = re.sub(r' data-tex="[^"]*"', "", out)
    assert "arithmatex" not in out and "\\frac" not in out and "\\sum" not in out
    assert out.count("<math") == 2 and 'display="block"' in out and "<mfrac>" in out
    assert "&#x0003C;" in out  # the escaped "<" reached the typesetter as "<"


def test_math_hook_refuses_tex_it_cannot_typeset() -> None:
    pytest.importorskip("latex2mathml")
    from tools.mkdocs_math import typeset

    with pytest.raises(ValueError, match=r"unknown TeX command.*\\\\softmaxx"):
        typeset('<span class="arithmatex">\\(\\softmaxx(x)\\)</span>')


def test_site_loads_nothing_from_the_network() -> None:
    config = (ROOT / "mkdocs.yml").read_text()
    assert "font: false" in config, "mkdocs-material loads Google Fonts unless theme.font is false"
    assert not re.search(r"^\s*-\s*https?://", config, re.M), "extra_javascript/extra_css from a URL"


def test_math_hook_cuts_a_display_formula_at_its_top_level_separators() -> None:
    pytest.importorskip("latex2mathml")
    from tools.mkdocs_math import split_top_level, typeset

    # \qquad before \quad; a "," stays with its part; nothing inside braces, brackets or \left...\right.
    tex = r"a = \text{x \qquad y},\qquad b = f(c \qquad d)\quad e,\qquad \left( g \qquad h \right)"
    assert split_top_level(tex) == (r"\qquad", [r"a = \text{x \qquad y},", r"b = f(c \qquad d)\quad e,",
                                                r"\left( g \qquad h \right)"])
    assert split_top_level(r"b = f(c \qquad d)\quad e,") == (r"\quad", [r"b = f(c \qquad d)", "e,"])
    assert split_top_level(r"a \\ b \qquad c") == ("\\\\", ["a", r"b \qquad c"])
    assert split_top_level(r"\qquad a = 1,\quad") == (None, ["a = 1,"])
    # "=" chains: cut before each "=" but the first; not a list of equations joined by "," or ";".
    assert split_top_level(r"y = f(a, b) = \frac{1}{2}") == ("=", ["y = f(a, b)", r"= \frac{1}{2}"])
    assert split_top_level(r"k = W x,\; v = U x") == (None, [r"k = W x,\; v = U x"])
    assert split_top_level(r"\sum_{j=1}^{n} x_j = y") == (None, [r"\sum_{j=1}^{n} x_j = y"])

    out = typeset(r'<div class="arithmatex">\[a = 1,\qquad b = \frac{1}{2}\quad c \\ d\]</div>')
    assert out.count("<math") == 4 and out.count('class="math-row"') == 3
    assert 'style="column-gap: 2em"' in out and 'style="column-gap: 1em"' in out
    assert out.count('class="math-break"') == 1 and 'data-tex="a = 1,\\qquad b' in out
    one = typeset(r'<div class="arithmatex">\[a = b\]</div>')
    assert one.count("<math") == 1 and "math-row" not in one
