#!/usr/bin/env bash
# Installs rknn-toolkit2 (the RKNN backend's compiler and x86_64 simulator) into a Python environment that
# already has rkedge: its requirements from rkedge's `rknn` extra, then the wheel itself with --no-deps.
#
# Why --no-deps: rknn-toolkit2 2.5.0 declares torch<=2.4.0, yet works with the torch 2.13.0 CPU build rkedge
# uses; installing it normally would replace torch (recurrentgemma-rknn-feasibility.md). It also needs
# setuptools<81 (it imports pkg_resources) and numpy<=1.26.4, which the extra pins.
#
# Usage: scripts/install-rknn-toolkit2.sh [PYTHON]     (default: python3; RKNN_TOOLKIT2_VERSION=2.5.0)
# Exits 0 without installing where rknn-toolkit2 has no wheel (not x86_64, or CPython outside 3.6-3.12): the
# RKNN tests then skip, saying why.
set -euo pipefail
PYTHON=${1:-python3}
VERSION=${RKNN_TOOLKIT2_VERSION:-2.5.0}

if [ "$(uname -m)" != x86_64 ]; then
    echo "rknn-toolkit2: no wheel for $(uname -m) (x86_64 only); on the board use rknn-toolkit-lite2. Skipped."
    exit 0
fi
pyver=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
case "$pyver" in
    3.6|3.7|3.8|3.9|3.10|3.11|3.12) ;;
    *) echo "rknn-toolkit2 $VERSION: no wheel for Python $pyver (3.6-3.12). Skipped."; exit 0 ;;
esac

if "$PYTHON" - "$VERSION" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
assert version("rknn-toolkit2") == sys.argv[1]
import rknn.api  # noqa: F401
PY
then
    echo "rknn-toolkit2 $VERSION: already installed."
    exit 0
fi

# rkedge's `rknn` extra lists the requirements (one source of truth), read from the installed rkedge.
requirements=$("$PYTHON" - <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, requires
try:
    listed = requires("rkedge") or []
except PackageNotFoundError:
    sys.exit("rkedge is not installed in this Python: pip install 'rkedge[convert,rknn]' (or make venv) first")
from packaging.requirements import Requirement  # a base dependency of rkedge

# The requirements the extra adds: true with extra == "rknn", false without it (build backends spell the markers
# differently, so evaluate them instead of matching text).
for text in listed:
    requirement = Requirement(text)
    marker = requirement.marker
    if marker is not None and marker.evaluate({"extra": "rknn"}) and not marker.evaluate({"extra": ""}):
        print(f"{requirement.name}{requirement.specifier}")
PY
)
# shellcheck disable=SC2086  # one argument per requirement
"$PYTHON" -m pip install -q $requirements
"$PYTHON" -m pip install -q --no-deps "rknn-toolkit2==$VERSION"
"$PYTHON" -c 'import rknn.api; print("rknn-toolkit2: installed", end=" ")' && "$PYTHON" -c \
    'from importlib.metadata import version; print(version("rknn-toolkit2"))'
