"""The README's promises: its table matches the registry, CI runs its test command, its code runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from tools.gen_docs import END, START, generated_files, mechanism_table

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _between(start: str, end: str) -> str:
    return README.split(start, 1)[1].split(end, 1)[0]


def test_mechanism_table_is_current():
    expected = mechanism_table("docs/mechanisms/").strip()
    assert _between(START, END).strip() == expected, "run: python -m tools.gen_docs"


def test_generated_docs_are_current():
    for path, text in generated_files(ROOT).items():
        assert path.read_text() == text, f"{path.name} is stale: run python -m tools.gen_docs"


def test_setup_has_exactly_two_commands_and_ci_runs_the_test_command():
    main = _between("<!-- main-command:start -->", "<!-- main-command:end -->")
    test = _between("<!-- test-command:start -->", "<!-- test-command:end -->")
    main_lines = [ln for ln in main.splitlines() if ln.strip() and not ln.startswith("```")]
    test_lines = [ln for ln in test.splitlines() if ln.strip() and not ln.startswith("```")]
    assert len(main_lines) == 1 and len(test_lines) == 1
    assert "pytest" in test_lines[0] and "attnzoo" in main_lines[0]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "test-command:start" in ci  # CI reads the command from the README itself


def test_quickstart_code_runs():
    block = re.search(r"## Quickstart\s+```python\n(.*?)```", README, re.S)
    assert block is not None
    exec(compile(block.group(1), "README quickstart", "exec"), {})


# Import names the suite skips without -> the distribution that provides each.
_INTEGRATIONS = {
    **{name: name for name in ("timm", "torchvision", "keras", "matplotlib", "onnx", "onnxruntime",
                               "onnxscript", "mkdocs", "mkdocstrings", "ruff", "mypy", "hypothesis",
                               "numpy", "latex2mathml", "safetensors", "setuptools")},
    "fightingcv_attention": "fightingcv-attention",
}


def _extra(name: str, seen: frozenset[str] = frozenset()) -> set[str]:
    """The distributions an extra of pyproject.toml names, self-references (attnzoo[x]) expanded."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found = {re.split(r"[<>=!\[ ;]", req, maxsplit=1)[0].lower() for req in project["dependencies"]}
    for req in project["optional-dependencies"][name]:
        inner = re.fullmatch(r"attnzoo\[([\w,-]+)\]", req)
        if inner:
            for sub in inner.group(1).split(","):
                if sub not in seen:
                    found |= _extra(sub, seen | {name})
        else:
            found.add(re.split(r"[<>=!\[ ;]", req, maxsplit=1)[0].lower())
    return found


def test_the_test_extra_installs_every_package_the_suite_uses():
    test_command = _between("<!-- test-command:start -->", "<!-- test-command:end -->")
    assert '".[test]"' in test_command
    used = set()
    for path in (ROOT / "tests").rglob("*.py"):
        text = path.read_text()
        used |= set(re.findall(r"importorskip\(\s*\"([\w]+)", text))
        used |= set(re.findall(r"find_spec\(\s*\"([\w]+)\"", text))
    # tensorflow: tests/blocks check what happens WITHOUT it (Keras's keras.json naming it), so the
    # test extra must not install it
    unknown = used - set(_INTEGRATIONS) - {"tomllib", "tensorflow"}
    assert not unknown, f"add these import names to _INTEGRATIONS in this test: {sorted(unknown)}"
    extra = _extra("test")
    missing = sorted({_INTEGRATIONS[name] for name in used & set(_INTEGRATIONS)} - extra)
    assert not missing, f"pyproject.toml's `test` extra lacks {missing}, so those tests would skip"
    assert {"torch", "numpy", "pytest", "latex2mathml", "torchvision"} <= extra
