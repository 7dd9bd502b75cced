"""What is committed: no file names a directory of the machine that wrote it."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# An absolute path under a home, a temporary or a root directory (home, tmp, root, Users, work at the
# file system's root), not a part of a URL or of a longer path.
MACHINE_PATH = re.compile(r"(?<![\w.~/:-])/(?:home|tmp|root|Users|work)/[\w.-]")


def committed_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    files = []
    for name in out.decode().split("\0"):
        path = ROOT / name
        if name and path.is_file():
            head = path.read_bytes()[:8192]
            if b"\0" not in head:  # text, not a PNG / safetensors / ArrayRecord file
                files.append(path)
    return files


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout")
def test_committed_files_name_no_machine_paths():
    found = []
    for path in committed_text_files():
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if MACHINE_PATH.search(line):
                found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:120]}")
    assert not found, "absolute paths of a machine in committed files:\n" + "\n".join(found)


def test_the_pattern_finds_machine_paths_and_nothing_else():
    root = "/"  # the examples are built, so that this file names no path itself
    for text in (f"run_dir: {root}home/me/runs", f"data: {root}tmp/tmpab12/data", f"at {root}root/x",
                 f'"{root}work/fresh/demo-out"'):
        assert MACHINE_PATH.search(text), text
    for text in ("https://example.com/home/page", "docs/tmp/x", "~/tmp/cache", "runs/distilled-s56", "a /tmp"):
        assert not MACHINE_PATH.search(text), text
