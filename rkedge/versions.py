"""Version ordering shared by host and board: toolkit, runtime and rknpu driver versions.

Parsed with :mod:`packaging.version` (a base dependency). Rockchip's versions are plain ``X.Y.Z``, sometimes with
a beta suffix (``1.2.1b1``) or a leading ``v``; a pre-release is compared with its release, because the
toolkit/runtime rules are stated per release (a 1.2.1 beta follows the 1.2.1 rules).
"""

from __future__ import annotations

import re

from packaging.version import InvalidVersion, Version

VersionKey = tuple[int, int, int]

#: The first dotted number in a free-form string ("RKNPU driver: v0.9.8" -> "0.9.8").
_DOTTED = re.compile(r"\d+(?:\.\d+)*")


def version_key(version: str) -> VersionKey:
    """``"1.2.1b1"`` -> (1, 2, 1); pre-release suffixes sort with their release; no number at all -> (0, 0, 0)."""
    try:
        release = Version(version.strip()).release
    except InvalidVersion:
        # Text around the number (sysfs, log lines) is not PEP 440: read the first dotted number instead.
        found = _DOTTED.search(version)
        release = Version(found.group(0)).release if found else ()
    parts = (tuple(release) + (0, 0, 0))[:3]
    return parts[0], parts[1], parts[2]


def version_between(version: str, first: str | None, last: str | None) -> bool:
    """``first <= version <= last`` by :func:`version_key`; ``None`` leaves that side open."""
    key = version_key(version)
    return (first is None or version_key(first) <= key) and (last is None or key <= version_key(last))


def older_than(version: str, other: str) -> bool:
    return version_key(version) < version_key(other)
