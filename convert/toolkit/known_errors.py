"""What the rkllm-toolkit prints when it fails, as findings: the texts are in :mod:`rkedge.failures`
(``where="toolkit"``); this module turns the matches into the planner's :class:`Finding`.
"""

# shim: callers move to rkedge.failures

from __future__ import annotations

from collections.abc import Iterable

from rkedge import failures as _catalogue
from rkedge.convert.findings import Finding
from rkedge.failures import CATALOGUE, SIMULATED_TOOLKIT_PREFIX, W8A8_FIX, KnownFailure, simulated_toolkit_text

__all__ = ["CATALOGUE", "KNOWN_ERRORS", "SIMULATED_FIXES", "SIMULATED_PREFIX", "W8A8_FIX", "KnownToolkitError",
           "findings_from_log", "simulated_text"]

KnownToolkitError = KnownFailure
#: The vendor texts (the simulated toolkit's own texts are the ``simulated`` entries).
KNOWN_ERRORS: tuple[KnownFailure, ...] = tuple(e for e in _catalogue.entries("toolkit") if not e.simulated)
#: Fixes for the ids the simulated toolkit uses in its own texts.
SIMULATED_FIXES: dict[str, str] = {e.id: e.fix for e in _catalogue.entries("toolkit")
                                   if e.simulated and e.fix is not None}
#: The prefix of every text the simulated toolkit invents (no vendor text is known for that failure).
SIMULATED_PREFIX = SIMULATED_TOOLKIT_PREFIX
simulated_text = simulated_toolkit_text


def findings_from_log(lines: Iterable[str]) -> list[Finding]:
    """The findings for the known toolkit texts in ``lines`` (one per distinct id and message, in log order)."""
    return [Finding(m.id, m.severity, m.message, m.fix,
                    m.failure.source if m.failure.simulated else f"{m.failure.source}; toolkit said: {m.line[:300]}")
            for m in _catalogue.scan(lines, "toolkit")]
