"""The README's first Quick start command (`make demo` runs scripts/demo.py) keeps working end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[1] / "scripts" / "demo.py"


@pytest.mark.slow
def test_the_demo_runs_end_to_end(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(DEMO)], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    # Each stage of the story left its output: the refusal, the converted model with its manifest and card.
    assert "F-1" in done.stdout + done.stderr
    models = sorted((tmp_path / "demo-out" / "rkllm").glob("*.rkllm"))
    assert len(models) == 1
    assert (models[0].parent / f"{models[0].name}.json").is_file()
    assert (models[0].parent / "README.md").is_file()
