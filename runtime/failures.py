"""Known runtime failure texts and the init-log scanner: now in :mod:`rkedge.failures` (``where="runtime"``).

Used by :class:`rkedge.runtime.LLM` at init and by ``rkedge doctor --trial-init``.
"""

# shim: callers move to rkedge.failures

from __future__ import annotations

from rkedge import failures as _catalogue
from rkedge.failures import FailureMatch, KnownFailure

__all__ = ["KNOWN_FAILURES", "FailureMatch", "KnownFailure", "first_error", "fix_for", "scan"]

KNOWN_FAILURES: tuple[KnownFailure, ...] = _catalogue.entries("runtime")


def scan(log: str) -> list[FailureMatch]:
    """Every known runtime failure text in ``log``, in the order they appear."""
    return _catalogue.scan(log, "runtime")


def first_error(log: str) -> FailureMatch | None:
    return _catalogue.first_error(log, "runtime")


def fix_for(match: FailureMatch) -> str:
    return match.fix or ""
