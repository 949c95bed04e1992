"""The rkllm C ABI, one module per version.

``for_version("1.2.2")`` returns the namespace (module) of the ABI that runtime release uses: its ctypes
structures under their C names, enums, callback types, ``FUNCTIONS`` (the table :func:`bind` applies to a
loaded library) and ``FEATURES`` (behavioural differences). Nothing outside this package imports ctypes.

| ABI   | runtime releases      | module  |
|-------|-----------------------|---------|
| 1.1   | 1.1.0 - 1.1.4         | v1_1    |
| 1.2.0 | 1.2.0                 | v1_2_0  |
| 1.2.1 | 1.2.1, 1.2.2          | v1_2_1  |
| 1.2.3 | 1.2.3                 | v1_2_3  |
| 1.3.0 | 1.3.0                 | v1_3_0  |
| 1.3.1 | 1.3.1                 | v1_3_1  |

:data:`ABI_RELEASES` is the one release <-> ABI table: the version modules, the simulated NPU builds, library
detection and the tests all read it.
"""

from __future__ import annotations

import importlib
import re
from types import ModuleType

from rkedge.errors import AbiSelectionError

#: ABI name -> module name, oldest first.
ABI_MODULES: dict[str, str] = {
    "1.1": "v1_1",
    "1.2.0": "v1_2_0",
    "1.2.1": "v1_2_1",
    "1.2.3": "v1_2_3",
    "1.3.0": "v1_3_0",
    "1.3.1": "v1_3_1",
}
SUPPORTED_ABIS: tuple[str, ...] = tuple(ABI_MODULES)

#: ABI name -> the runtime releases that use it, oldest first (runtime-anchors section 3: header identities by
#: md5 across releases; 1.3.1: shared/rkllm-abi/ABI.md, section "ABI 1.3.1").
ABI_RELEASES: dict[str, tuple[str, ...]] = {
    "1.1": ("1.1.0", "1.1.1", "1.1.2", "1.1.3", "1.1.4"),
    "1.2.0": ("1.2.0",),
    "1.2.1": ("1.2.1", "1.2.2"),
    "1.2.3": ("1.2.3",),
    "1.3.0": ("1.3.0",),
    "1.3.1": ("1.3.1",),
}

#: Runtime release -> ABI, derived from :data:`ABI_RELEASES`.
RELEASE_TO_ABI: dict[str, str] = {release: abi for abi, releases in ABI_RELEASES.items() for release in releases}


def newest_release(abi: str) -> str:
    """The newest runtime release of an ABI name (the release a simulated NPU of that ABI reports)."""
    return ABI_RELEASES[abi][-1]


#: Releases whose ABI is known but not supported, with the reason (runtime-anchors section 3).
UNSUPPORTED_RELEASES: dict[str, str] = {
    "1.2.1b1": "1.2.1b1 is a beta with an ABI of its own (RKLLMInput 56 bytes, void callback); upgrade to 1.2.1",
}


def abi_of(version: str) -> str | None:
    """The ABI name of an ABI name or a runtime release ("1.1.4", "v1.2.2", "1.3.1"); None when rkedge does not
    know the version (a release newer than this table, or not a version at all).

    Raises:
        AbiSelectionError: for releases whose ABI is known and not supported (1.0.x, 1.2.1b1).
    """
    text = version.strip().lower().lstrip("v")
    if text in ABI_MODULES:
        return text
    if text in RELEASE_TO_ABI:
        return RELEASE_TO_ABI[text]
    if text in UNSUPPORTED_RELEASES:
        raise AbiSelectionError(f"librkllmrt {text} is not supported: {UNSUPPORTED_RELEASES[text]}.")
    if re.fullmatch(r"1\.1(\.\d+)?", text):
        return "1.1"
    if re.fullmatch(r"1\.0(\.\d+\w*)?", text):
        raise AbiSelectionError(
            f"librkllmrt {text} (1.0.x) has a different API (rkllm_run takes a bare prompt) and is not supported.",
            fix="install runtime 1.1.4 or newer together with a model converted by the same toolkit version",
        )
    return None


def normalize(version: str) -> str:
    """Maps an ABI name or a runtime release ("1.1.4", "v1.2.2", "1.3.1") to an ABI name.

    Raises:
        AbiSelectionError: for versions that are unknown or whose ABI rkedge does not support.
    """
    abi = abi_of(version)
    if abi is None:
        raise AbiSelectionError(
            f"unknown rkllm ABI or runtime version {version!r}.",
            fix=f"pass one of: {', '.join(SUPPORTED_ABIS)} (or a runtime release such as 1.2.2)",
        )
    return abi


def for_version(version: str) -> ModuleType:
    """Returns the ABI namespace (module) for an ABI name or runtime release."""
    abi = normalize(version)
    return importlib.import_module(f"{__name__}.{ABI_MODULES[abi]}")


__all__ = ["ABI_MODULES", "ABI_RELEASES", "SUPPORTED_ABIS", "RELEASE_TO_ABI", "UNSUPPORTED_RELEASES", "abi_of",
           "normalize", "for_version", "newest_release"]
