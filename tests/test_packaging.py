"""The sdist and the wheel a user installs: what they carry, and that the build has no deprecated config."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import attnzoo

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "attnzoo"
Built = tuple[list[str], list[str], str, str]  # sdist files, wheel files, METADATA, build stderr
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """Both built from a copy of what the build reads, so that no egg-info is written into the tree."""
    pytest.importorskip("setuptools")
    tree = tmp_path_factory.mktemp("tree")
    for name in ("pyproject.toml", "README.md", "MANIFEST.in", "LICENSE"):
        shutil.copy(ROOT / name, tree / name)
    shutil.copytree(ROOT / "src", tree / "src", ignore=_IGNORE)
    # tests/ as a clone has it, so that the sdist is built as from a clone
    shutil.copytree(ROOT / "tests", tree / "tests", ignore=shutil.ignore_patterns("__pycache__", "artifacts"))
    code = (
        "import warnings; warnings.simplefilter('always')\n"
        "from setuptools import build_meta as b\n"
        "print('BUILT', b.build_sdist('dist'), b.build_wheel('dist'))\n"  # the build logs to stdout too
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sdist_name, wheel_name = proc.stdout.rsplit("BUILT ", 1)[1].split()
    with tarfile.open(tree / "dist" / sdist_name) as tar:
        sdist = [m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile()]
    with zipfile.ZipFile(tree / "dist" / wheel_name) as whl:
        wheel = whl.namelist()
        metadata = whl.read(next(n for n in wheel if n.endswith(".dist-info/METADATA"))).decode()
    return sdist, wheel, metadata, proc.stderr


def test_wheel_carries_every_module_and_data_file_and_nothing_else(built: Built):
    sdist, wheel, _, _ = built
    expected = {p.relative_to(PACKAGE.parent).as_posix() for p in PACKAGE.rglob("*")
                if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}
    assert "attnzoo/cli/data/shapes.png" in expected and "attnzoo/py.typed" in expected
    package_files = {n for n in wheel if n.startswith("attnzoo/")}
    assert package_files == expected
    assert {n for n in sdist if n.startswith("src/attnzoo/")} == {f"src/{n}" for n in expected}


def test_sdist_has_no_partial_test_suite(built: Built):
    sdist, _, _, _ = built
    # setuptools adds tests/test*.py by default, without conftest.py or the sub-packages: not runnable
    assert not [n for n in sdist if n.startswith("tests/")]


def test_metadata_and_no_deprecated_build_config(built: Built):
    _, _, metadata, stderr = built
    assert "Requires-Python: >=3.10" in metadata
    assert f"\nVersion: {attnzoo.__version__}\n" in metadata  # written twice: pyproject, __init__
    assert "License-Expression: MIT" in metadata
    assert "License-File: LICENSE" in metadata  # the text ships with both packages
    assert "Deprecat" not in stderr, stderr[-3000:]


def test_license_text_ships(built: Built):
    sdist, wheel, _, _ = built
    assert "LICENSE" in sdist and any(n.endswith(".dist-info/licenses/LICENSE") for n in wheel)

