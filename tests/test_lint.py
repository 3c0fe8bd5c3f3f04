"""Static checks run in CI: ``ruff check`` (src, tests, benchmarks, examples) and ``mypy src`` are clean."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=900
    )


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None, reason="ruff not installed (pip install ruff)")
def test_ruff_clean() -> None:
    proc = _run("ruff", "check", "src", "tests", "benchmarks", "examples", "tools")
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy not installed (pip install mypy)")
def test_mypy_clean() -> None:
    proc = _run("mypy", "src")
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
