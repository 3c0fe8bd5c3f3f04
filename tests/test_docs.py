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
from typing import Any

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


# --- Code on the hand-written pages ---------------------------------------------------------------
# Each page's ```python blocks run in order in one namespace, as a reader pastes them. A block that
# is an excerpt (it uses a model the prose only describes) gets what it needs from _SETUP, keyed by
# page and the block's first line; a new excerpt fails here until it is listed. Where a block prints
# and a ```text block follows it, the printout must be that text.

_MODELS = "import torch, torchvision\nfrom torch import nn\nimport attnzoo\n"
_SEED_NET = (_MODELS + "import sys\nsys.path.insert(0, 'examples')\n"
             "from surgery_seed_question import SeedNetwork\n")
_NO_DOWNLOAD = {'weights="DEFAULT"': "weights=None"}  # the same models, without fetching weights
_SETUP: dict[tuple[str, str], dict[str, Any] | str] = {
    ("README.md", "import attnzoo"): {"setup": _SEED_NET + "net = SeedNetwork()\n"
                                      "image = torch.randn(1, 3, 64, 64)\n"
                                      "resnet50 = torchvision.models.resnet18()"},
    ("docs/blocks.md", "import os"): {"setup": "import importlib.util, pytest\n"
                                      "if importlib.util.find_spec('keras') is None:\n"
                                      "    pytest.skip('keras is not installed')"},
    ("docs/cli.md", "import attnzoo"): {"setup": _MODELS + "model = attnzoo.create('cbam', 16)\n"
                                        "x = torch.randn(1, 16, 8, 8)"},
    ("docs/cli.md", "if not torch.jit.is_scripting():"): "a line of a module's forward",
    ("docs/compatibility.md", "model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)"):
        "needs CUDA and a process group",
    ("docs/interop.md", "from attnzoo.convert import from_torch"): {
        "setup": "torch_mha = nn.MultiheadAttention(16, 2)"},
    ("docs/interop.md", "import torch"): {"replace": _NO_DOWNLOAD},
    ("docs/interop.md", "from attnzoo.convert import from_torchvision"): {
        "setup": "tv_attention = ShiftedWindowAttention(16, [4, 4], [2, 2], 2)"},
    ("docs/interop.md", "from torchvision.ops.misc import SqueezeExcitation"): {"replace": _NO_DOWNLOAD},
    ("docs/surgery.md", 'attnzoo.replace(net, "space_attention", "bra", n_win=7, topk=4, example_input=x)'): {
        "setup": _SEED_NET + "net = SeedNetwork(64)\nx = torch.randn(1, 3, 112, 112)"},
    ("docs/surgery.md",
     "attnzoo.replace(encoder, torch.nn.MultiheadAttention)   # ['layers.0.self_attn', ...]"): {
        "setup": "encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2), num_layers=2)"},
    ("docs/surgery.md", "from attnzoo import BiLevelRoutingAttention"): {"setup": "self = nn.Module()"},
    ("docs/surgery.md", "for found in attnzoo.find(model, example_input=x):"): {
        "setup": "x = torch.randn(1, 3, 224, 224)"},
    ("docs/transformer.md", "# torch: key_padding_mask True = padding, attn_mask True = blocked"): {
        "setup": _MODELS + "torch_mha = nn.MultiheadAttention(16, 2, batch_first=True)\n"
        "mha = attnzoo.MultiHeadAttention(16, 2)\nq = k = v = torch.randn(2, 5, 16)\n"
        "pad = torch.zeros(2, 5, dtype=torch.bool)\npad[0, 3:] = True\n"
        "blocked = torch.ones(5, 5, dtype=torch.bool).triu(1)"},
    ("docs/transformer.md", "from attnzoo import WindowAttention, window_partition, window_reverse, "
                            "shifted_window_mask"): {
        "setup": _MODELS + "H = W = 14\nC = 16\nx = torch.randn(2, H, W, C)\n"
        "attn = attnzoo.WindowAttention(C, 7, 2)"},
}
_BLOCK = re.compile(r"^```(\w*)[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)


def _code_blocks(text: str) -> list[tuple[str, str, str | None]]:
    """Every ```python block of a page, with the ```text block right after it (or None)."""
    found = list(_BLOCK.finditer(text))
    out = []
    for i, m in enumerate(found):
        if m.group(1) != "python":
            continue
        after = found[i + 1] if i + 1 < len(found) else None
        follows = after is not None and after.group(1) == "text" and not text[m.end():after.start()].strip()
        out.append((m.group(2), m.group(2).strip().splitlines()[0], after.group(2) if follows else None))
    return out


_PAGES = ["README.md"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md")
                                if p.name != "benchmarks.md" and _code_blocks(p.read_text()))


def test_every_excerpt_setup_is_used() -> None:
    firsts = {(page, first) for page in _PAGES for _, first, _ in _code_blocks((ROOT / page).read_text())}
    assert not set(_SETUP) - firsts, f"stale _SETUP entries: {sorted(set(_SETUP) - firsts)}"


@pytest.mark.parametrize("page", _PAGES)
def test_page_code_runs(page: str, monkeypatch: pytest.MonkeyPatch,
                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT / "src"))
    torch.manual_seed(0)
    namespace: dict[str, Any] = {}
    for code, first, shown in _code_blocks((ROOT / page).read_text()):
        entry = _SETUP.get((page, first), {})
        if isinstance(entry, str):
            continue  # an excerpt that cannot run on its own; the reason is in _SETUP
        for old, new in entry.get("replace", {}).items():
            code = code.replace(old, new)
        exec(entry.get("setup", ""), namespace)
        capsys.readouterr()
        if first.startswith(">>>"):
            test = doctest.DocTestParser().get_doctest(code, namespace, f"{page}: {first}", page, 0)
            runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
            report: list[str] = []
            assert runner.run(test, out=report.append, clear_globs=False).failed == 0, "".join(report)
            continue
        try:
            exec(compile(code, f"{page}: {first}", "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"{page}: the block starting {first!r} fails: {exc!r}") from exc
        printed = capsys.readouterr().out
        if shown is not None and printed.strip():
            assert printed.strip() == shown.strip(), f"{page}: the block starting {first!r} prints\n{printed}"


# --- Lists and mappings on the pages that the registry decides -------------------------------------


def test_batchnorm_list_of_the_compatibility_page_is_the_registry_s() -> None:
    text = (ROOT / "docs" / "compatibility.md").read_text()
    part = text.split("<!-- batchnorm:start -->")[1].split("<!-- batchnorm:end -->")[0]
    listed = set(re.findall(r"`(\w+)`", part))
    with_bn = {s.name for s in attnzoo.list_modules()
               if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                      for m in attnzoo.create(s.name, **s.example.kwargs).modules())}
    assert listed == with_bn, f"the page lists {sorted(listed)}; BatchNorm is in {sorted(with_bn)}"


def test_interop_names_the_registered_class_of_each_timm_attn_name() -> None:
    # `BottleneckAttn` (`"bottleneck"`) -> `BottleneckAttention`; table rows `... (`"se"`) | `SqueezeExcite``
    text = (ROOT / "docs" / "interop.md").read_text()
    pairs = re.findall(r'`[\w.]+`\s+\(`"(\w+)"`\)\s*(?:->|\|)\s*`([\w.]+)`', text)
    registered = {s.name for s in attnzoo.list_modules()}
    checked = [(name, cls) for name, cls in pairs if name in registered]
    assert len(checked) >= 6, pairs
    for name, cls in checked:
        actual = attnzoo.get_spec(name).cls.__name__
        assert cls == actual, f"interop.md: timm's {name!r} converts to {actual}, not {cls}"


def test_files_the_pages_cite_exist() -> None:
    missing = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        cited = r"(?<![\w/])((?:tests|benchmarks|examples|tools|src/attnzoo)/[\w/]+\.py)"
        for path in re.findall(cited, page.read_text()):
            if not (ROOT / path).exists():
                missing.append(f"{page.relative_to(ROOT)}: {path}")
    assert not missing, missing
