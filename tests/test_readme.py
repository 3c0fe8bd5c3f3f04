"""The README's promises: its table matches the registry, CI runs its test command, its code runs."""

from __future__ import annotations

import re
from pathlib import Path

from tools.gen_docs import END, START, generated_files, mechanism_table

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _between(start: str, end: str) -> str:
    return README.split(start, 1)[1].split(end, 1)[0]


def test_mechanism_table_is_current():
    assert _between(START, END).strip() == mechanism_table().strip(), "run: python -m tools.gen_docs"


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
