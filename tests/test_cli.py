"""The attnzoo command, driven as a user would (a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def attnzoo(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", "attnzoo", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_help():
    proc = attnzoo("--help")
    assert proc.returncode == 0
    assert "list" in proc.stdout


def test_list_prints_every_registered_name():
    import attnzoo as az

    proc = attnzoo("list")
    assert proc.returncode == 0, proc.stderr
    for spec in az.list_modules():
        assert spec.name in proc.stdout
