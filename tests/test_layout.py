"""The package's shape: ``training/`` knows neither distillation nor fine-tuning, ``finetune/`` does not
use the distiller, no library module imports a command; every library module has a test file that
imports it (tests mirror the package)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "jaxdistil"
LIBRARY = sorted(p for p in PACKAGE.rglob("*.py") if "commands" not in p.parts and p.name != "cli.py")


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


def imported(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def loaded_modules(*modules: str) -> set[str]:
    """The jaxdistil modules a fresh interpreter has loaded after importing ``modules``."""
    code = (f"import sys\nfor m in {list(modules)!r}: __import__(m)\n"
            "print('\\n'.join(sorted(m for m in sys.modules if m.startswith('jaxdistil'))))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert res.returncode == 0, res.stderr
    return set(res.stdout.split())


def test_no_library_module_imports_a_command():
    for path in LIBRARY:
        bad = {m for m in imported(path) if m.startswith(("jaxdistil.commands", "jaxdistil.cli"))}
        assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"


@pytest.mark.slow
@pytest.mark.parametrize("package,forbidden", [("training", ("jaxdistil.distill", "jaxdistil.finetune")),
                                               ("finetune", ("jaxdistil.distill",))])
def test_layers_of_the_package(package, forbidden):
    mods = [module_name(p) for p in sorted((PACKAGE / package).glob("*.py"))]
    for path in (PACKAGE / package).glob("*.py"):  # directly
        bad = {m for m in imported(path) if m.startswith(forbidden)}
        assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"
    bad = {m for m in loaded_modules(*mods) if m.startswith(forbidden)}  # nor through another module
    assert not bad, f"importing jaxdistil.{package} loads {sorted(bad)}"


def has_quick_test(path: Path) -> bool:
    """The file has a test that ``pytest -m "not slow"`` runs (a ``test_*`` function not marked slow)."""
    tree = ast.parse(path.read_text())
    if any(isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in n.targets)
           and "slow" in ast.unparse(n.value) for n in tree.body):
        return False
    return any(isinstance(n, ast.FunctionDef) and n.name.startswith("test_")
               and not any("slow" in ast.unparse(d) for d in n.decorator_list) for n in tree.body)


@pytest.mark.parametrize("tier", ["all", "quick"])
def test_every_library_module_has_a_test_that_imports_it(tier):
    """Tests mirror the package: every library module is imported by a test file, and by one with a
    quick test (so ``pytest -m "not slow"`` covers every module)."""
    tests = [p for p in (REPO / "tests").rglob("test_*.py") if tier == "all" or has_quick_test(p)]
    used = set().union(*(imported(p) for p in tests))
    names = {module_name(p) for p in LIBRARY if p.name != "__init__.py"}
    missing = sorted(m for m in names if not any(u == m or u.startswith(m + ".") for u in used))
    assert not missing, f"library modules no {'quick ' if tier == 'quick' else ''}test imports: {missing}"
