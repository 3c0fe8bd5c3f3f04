"""The package's layout by role: what `import attnzoo` loads, who may import whom, file sizes."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "attnzoo"
MAX_LINES = 400

# Roles that the core (mechanisms, kernels, functional) must never import.
HEAVY = ("attnzoo.cli", "matplotlib", "PIL", "tools")
CORE = ("mechanisms", "kernels", "functional.py")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, at any depth (lazy imports inside functions included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_import_attnzoo_loads_no_cli_plotting_benchmark_or_docs_code():
    code = (
        "import sys, attnzoo, attnzoo.compat\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('attnzoo.cli', 'matplotlib', 'tools')))\n"
        "print(','.join(bad))\n"
        "assert attnzoo.compat.SELayer is not None\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "", f"import attnzoo loaded {proc.stdout.strip()}"


def test_compat_is_reachable_after_a_plain_import():
    code = "import attnzoo; print(attnzoo.compat.SELayer.__name__)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0 and proc.stdout.strip() == "SELayer", proc.stderr[-2000:]


@pytest.mark.parametrize("path", [p for p in SOURCES if p.relative_to(PACKAGE).parts[0] in CORE],
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_core_never_imports_cli_or_plotting(path):
    bad = sorted(m for m in imports_of(path) if m.startswith(HEAVY))
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}; the core must not depend on cli/ or plotting"


# `python -m attnzoo` (__main__) is the command's other entry point.
OUTSIDE_CLI = [p for p in SOURCES if p.relative_to(PACKAGE).parts[0] not in ("cli", "__main__.py")]


@pytest.mark.parametrize("path", OUTSIDE_CLI, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_nothing_outside_cli_imports_it(path):
    bad = sorted(m for m in imports_of(path) if m.startswith("attnzoo.cli"))
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}; only attnzoo.cli may"


def test_no_import_cycles_at_module_level():
    graph: dict[str, set[str]] = {}
    names = {module_name(p): p for p in SOURCES}
    for name, path in names.items():
        top_level = set()
        for node in ast.parse(path.read_text()).body:  # module level only: lazy imports break cycles
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                top_level.add(node.module)
                top_level.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                top_level.update(a.name for a in node.names)
        # A package imports its own submodules from __init__: that is not a cycle back to the package.
        graph[name] = {m for m in top_level if m in names and m != name and not name.startswith(m + ".")}

    def visit(node: str, stack: list[str], done: set[str]) -> list[str] | None:
        if node in stack:
            return stack[stack.index(node):] + [node]
        if node in done:
            return None
        for nxt in sorted(graph.get(node, ())):
            cycle = visit(nxt, stack + [node], done)
            if cycle:
                return cycle
        done.add(node)
        return None

    done: set[str] = set()
    for name in sorted(graph):
        cycle = visit(name, [], done)
        assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_files_are_at_most_400_lines(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines (at most {MAX_LINES}: split it)"


def test_no_torchscript_guards():
    """TorchScript is not supported (the support matrix says so), so no code guards for it."""
    guarded = [str(p.relative_to(ROOT)) for p in SOURCES if "jit.is_scripting" in p.read_text()]
    assert not guarded, f"remove the torch.jit.is_scripting() guards in {guarded}"


def test_every_canonical_class_is_exported_under_its_own_name():
    import attnzoo

    assert len(attnzoo.__all__) == len(set(attnzoo.__all__)), "a name is exported twice"
    for spec in attnzoo.list_modules():
        assert getattr(attnzoo, spec.cls.__name__, None) is spec.cls, (
            f"attnzoo.{spec.cls.__name__} is not the registered class of {spec.name!r} (shadowed or missing)"
        )
