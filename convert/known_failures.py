"""Conversions known to produce a model that fails on the board: the ``board-failure`` plan rules of
:mod:`rkedge.failures`.

Each is a combination the toolkit accepts but the board rejects. The planner refuses a match by default with the
reason and the fix; ``--allow-known-failure`` turns the refusal into a warning (and the simulated toolkit then
writes the entry's ``board_fault`` into the simulated model, so the simulated board reproduces it).
"""

# shim: callers move to rkedge.failures

from __future__ import annotations

from typing import Any

from rkedge import failures as _catalogue
from rkedge.failures import KnownFailure

__all__ = ["KNOWN_FAILURES", "KnownConversionFailure", "matching"]

KnownConversionFailure = KnownFailure
KNOWN_FAILURES: tuple[KnownFailure, ...] = tuple(e for e in _catalogue.PLAN if e.kind == "board-failure")


def matching(**request: Any) -> list[KnownFailure]:
    """The board failures for ``architecture``, ``platform``, ``toolkit_version``, ``dtype``, ``hybrid_rate``."""
    return _catalogue.plan_rules("board-failure", **request)
