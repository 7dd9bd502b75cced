"""Properties of the repository itself: nothing names a path that exists only on one machine."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("tests", "jaxdistil", "benchmarks", "tools")
SUFFIXES = {".py", ".yaml", ".yml", ".json", ".toml", ".cfg", ".sh", ".txt"}

# Absolute paths of a particular machine: home and work directories, virtual environments and
# installed packages. Built from pieces so that this file does not match itself.
_SEP = "/"
_ROOTS = ("work", "root", "home", "Users", "opt", "mnt", "srv", "usr" + _SEP + "local", "tmp" + _SEP + "[A-Za-z]")
MACHINE_PATH = re.compile(
    r"""(?:["'`(=\s]|^)(?:""" + _SEP + "(?:" + "|".join(_ROOTS) + ")" + _SEP + r"""|~""" + _SEP + r""")"""
    r"""|""" + _SEP + r"""\.?venv""" + _SEP + r"""|lib""" + _SEP + r"""python3\.\d+""" + _SEP + r"""site-packages"""
)


def scanned_files() -> list[Path]:
    out = []
    for top in SCANNED:
        for path in sorted((REPO / top).rglob("*")):
            if path.is_file() and path.suffix in SUFFIXES and "__pycache__" not in path.parts:
                out.append(path)
    return out


def test_the_pattern_finds_machine_paths():
    bad = ['MINILM = Path("' + _SEP + 'work' + _SEP + 'venv/lib/x")', "cache = '~" + _SEP + ".cache'",
           "p = " + _SEP + "home" + _SEP + "me/data", "x = 'lib" + _SEP + "python3.11" + _SEP + "site-packages/y'"]
    good = ['Path(__file__).parent / "configs"', "tmp_path / 'data'", "runs/default", "data/pydocs-64",
            '"site-packages"', "shared/runs"]
    assert all(MACHINE_PATH.search(line) for line in bad)
    assert not any(MACHINE_PATH.search(line) for line in good)


def test_no_file_names_a_path_of_this_machine():
    files = scanned_files()
    assert len(files) > 40  # the scan sees the tree
    hits = []
    for path in files:
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
            if MACHINE_PATH.search(line):
                hits.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not hits, "paths of one machine (use importlib / tmp_path instead):\n" + "\n".join(hits)
