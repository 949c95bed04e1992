"""rkedge._fs: atomic files and folders (what a crash leaves, what a failure keeps)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rkedge._fs import atomic_dir


def test_atomic_dir_replaces_the_folder_only_when_the_block_succeeds(tmp_path: Path) -> None:
    target = tmp_path / "bundle"
    with atomic_dir(target) as partial:
        assert partial.is_dir() and not any(partial.iterdir()) and not target.exists()
        (partial / "a.txt").write_text("first")
    assert (target / "a.txt").read_text() == "first"

    with pytest.raises(RuntimeError), atomic_dir(target) as partial:
        (partial / "a.txt").write_text("second")
        raise RuntimeError("the build failed")
    assert (target / "a.txt").read_text() == "first", "a failed rewrite keeps the earlier folder whole"

    with atomic_dir(target) as partial:
        (partial / "b.txt").write_text("third")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"], "no partial or previous folder is left"


def test_atomic_dir_removes_what_dead_writers_left_and_keeps_a_live_ones(tmp_path: Path) -> None:
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    stale, alive = tmp_path / f"out.partial-{dead}", tmp_path / f"out.partial-{os.getppid()}"
    stale.mkdir()
    alive.mkdir()
    with atomic_dir(tmp_path / "out"):
        pass
    assert not stale.exists() and alive.exists()
