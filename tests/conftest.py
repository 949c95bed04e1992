"""Shared fixtures. Nothing heavy is imported here: the runtime tests also run under aarch64 emulation
with only the standard library, pytest and rkedge."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from rkedge.runtime import abi as abi_registry

#: Every supported ABI with the toolkit version of a model it loads: the ABI's newest release, the one its
#: simulated NPU reports (same generation). Derived from the registry's release table, never copied.
ABIS: dict[str, str] = {abi: abi_registry.newest_release(abi) for abi in abi_registry.SUPPORTED_ABIS}


@pytest.fixture(params=list(ABIS), ids=lambda abi: f"abi{abi}")
def abi(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _clean_mock_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RKEDGE_MOCK_PACE", "RKEDGE_MOCK_FAULT", "RKEDGE_MOCK_DRIVER_VERSION", "RKEDGE_MOCK_PLATFORM",
                 "RKEDGE_MOCK_CALL_LOG", "RKEDGE_RKLLM_ABI", "RKEDGE_RKLLM_LIB"):
        monkeypatch.delenv(name, raising=False)


class CallLog:
    """What the simulated NPU received, read from its JSON-lines call log."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def entries(self, fn: str | None = None) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        rows = [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [row for row in rows if fn is None or row["fn"] == fn]

    def last(self, fn: str) -> dict[str, Any]:
        rows = self.entries(fn)
        assert rows, f"no {fn} call was logged"
        return rows[-1]

    def runs(self) -> list[dict[str, Any]]:
        return [row for row in self.entries() if row["fn"] in ("rkllm_run", "rkllm_run_async")]


@pytest.fixture
def call_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CallLog:
    path = tmp_path / "calls.jsonl"
    monkeypatch.setenv("RKEDGE_MOCK_CALL_LOG", str(path))
    return CallLog(path)


@pytest.fixture
def make_model(tmp_path: Path) -> Callable[..., Path]:
    """Writes a simulated model; ``abi=`` picks a toolkit version that ABI's runtime loads."""
    from rkedge.runtime.simmodel import simulated_manifest, write_simulated_model

    counter = iter(range(1000))

    def make(abi: str = "1.3.0", **fields: Any) -> Path:
        fields.setdefault("toolkit_version", ABIS[abi])
        path = tmp_path / f"model-{next(counter)}.rkllm"
        write_simulated_model(path, simulated_manifest(**fields))
        return path

    return make


def pytest_report_header(config: pytest.Config) -> str:
    import platform

    return f"rkedge tests on {platform.machine()} (python {platform.python_version()}, pid {os.getpid()})"


def pytest_sessionstart(session: pytest.Session) -> None:
    """Under emulation the runner says which machine the suite must be on; a wrong one is an error, not a pass."""
    import platform

    expected = os.environ.get("RKEDGE_EXPECT_MACHINE")
    if expected and platform.machine() != expected:
        raise pytest.UsageError(f"this run must be on {expected}, but it is on {platform.machine()}")
