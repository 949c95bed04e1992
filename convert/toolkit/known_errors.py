"""What the rkllm-toolkit prints when it fails, as findings: the texts are in :mod:`rkedge.failures`
(``where="toolkit"``); this module turns the matches into the planner's :class:`Finding`.
"""

from __future__ import annotations

from collections.abc import Iterable

from rkedge import failures as _catalogue
from rkedge.convert.findings import Finding

__all__ = ["findings_from_log"]


def findings_from_log(lines: Iterable[str]) -> list[Finding]:
    """The findings for the known toolkit texts in ``lines`` (one per distinct id and message, in log order)."""
    return [Finding(m.id, m.severity, m.message, m.fix,
                    m.failure.source if m.failure.simulated else f"{m.failure.source}; toolkit said: {m.line[:300]}")
            for m in _catalogue.scan(lines, "toolkit")]
