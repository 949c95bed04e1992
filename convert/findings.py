"""Findings: what a check found, why it matters, what to do, and where the fact comes from.

Every check of the planner, the adapter validation and the toolkit-error translation reports findings of
this one shape; ``--json`` prints them as they are. An ``error`` stops a conversion before any heavy work.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, Literal

from rkedge.errors import CheckFailed

Severity = Literal["error", "warning", "info"]


@dataclass(frozen=True)
class Finding:
    id: str  # stable identifier, e.g. "F-2" or "lora.target-missing"
    severity: Severity
    message: str  # what is wrong, in one or two sentences
    fix: str | None  # what to do about it
    source: str  # where the rule comes from (document section, issue number)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def render(self) -> str:
        mark = {"error": "[x]", "warning": "[!]", "info": "[i]"}[self.severity]
        text = f"{mark} {self.id}: {self.message}"
        if self.fix:
            text += f"\n      fix: {self.fix}"
        return text


def errors(findings: Iterable[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity == "error"]


def raise_on_errors(findings: Iterable[Finding], what: str = "the request", *,
                    fix: str = "fix the findings above, or see --dry-run --json for every check") -> None:
    """Raises :class:`CheckFailed` listing every error finding (all of them, not just the first)."""
    found = errors(findings)
    if found:
        details = "\n".join(f.render() for f in found)
        raise CheckFailed(f"{what} would fail ({len(found)} error finding{'s' if len(found) > 1 else ''}):\n{details}",
                          fix=fix)
