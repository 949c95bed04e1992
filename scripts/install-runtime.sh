#!/bin/sh
# install-runtime.sh - install a librkllmrt.so you downloaded (Rockchip's RKLLM runtime) for rkedge.
#
#   install-runtime.sh --sha256 HEX [--prefix DIR] [--abi VERSION] PATH/TO/librkllmrt.so
#   install-runtime.sh --no-verify  [--prefix DIR] [--abi VERSION] PATH/TO/librkllmrt.so
#
# Steps, each fatal on failure:
#   1. verify the file's SHA-256 against --sha256 (required unless --no-verify is given explicitly);
#   2. check it is an ELF64 little-endian aarch64 shared object (header bytes read with od);
#   3. if rkedge is importable, report what the file says about its ABI (python3 -m rkedge.runtime.library);
#      with --abi, refuse a library whose ABI contradicts it (a wrong struct set corrupts memory);
#   4. install it as DIR/librkllmrt.so atomically: copy to a temporary name in DIR, then rename.
#
# DIR defaults to /usr/lib, the first place rkedge looks. Set RKEDGE_PYTHON to the interpreter that has
# rkedge installed (for example /opt/rkedge/venv/bin/python) when it is not the system python3.

set -eu

PROG=$(basename "$0")
PY=${RKEDGE_PYTHON:-python3}
sha256=""
no_verify=0
prefix=/usr/lib
abi=""
src=""
tmp=""

die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }
note() { printf '%s: %s\n' "$PROG" "$*"; }

usage() {
    cat <<EOF
usage: $PROG (--sha256 HEX | --no-verify) [--prefix DIR] [--abi VERSION] PATH/TO/librkllmrt.so

  --sha256 HEX     expected SHA-256 of the file (64 hex digits); required unless --no-verify
  --no-verify      skip the checksum (not recommended)
  --prefix DIR     install directory (default /usr/lib); the file is installed as DIR/librkllmrt.so
  --abi VERSION    the runtime release you downloaded (e.g. 1.2.3); checked against the file when
                   rkedge is importable, and needed later when the file alone cannot tell
EOF
}

cleanup() { [ -z "$tmp" ] || rm -f "$tmp"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- arguments ------------------------------------------------------------------------------------------
while [ $# -gt 0 ]; do
    case $1 in
        --sha256) [ $# -ge 2 ] || die "--sha256 needs a value"; sha256=$2; shift 2 ;;
        --sha256=*) sha256=${1#*=}; shift ;;
        --no-verify) no_verify=1; shift ;;
        --prefix) [ $# -ge 2 ] || die "--prefix needs a value"; prefix=$2; shift 2 ;;
        --prefix=*) prefix=${1#*=}; shift ;;
        --abi) [ $# -ge 2 ] || die "--abi needs a value"; abi=$2; shift 2 ;;
        --abi=*) abi=${1#*=}; shift ;;
        -h | --help) usage; exit 0 ;;
        --) shift; break ;;
        -*) usage >&2; die "unknown option: $1" ;;
        *) [ -z "$src" ] || die "only one library path may be given (got '$src' and '$1')"; src=$1; shift ;;
    esac
done
if [ $# -gt 0 ]; then
    if [ -n "$src" ] || [ $# -ne 1 ]; then die "only one library path may be given"; fi
    src=$1
fi
[ -n "$src" ] || { usage >&2; die "missing the path to librkllmrt.so"; }
[ -f "$src" ] || die "$src: no such file"
[ -r "$src" ] || die "$src: not readable"
[ -n "$prefix" ] || die "--prefix must not be empty"

if [ "$no_verify" -eq 1 ]; then
    [ -z "$sha256" ] || die "--sha256 and --no-verify contradict each other; pass one"
else
    [ -n "$sha256" ] || die "pass --sha256 HEX (the checksum published with the runtime you downloaded), or --no-verify"
    sha256=$(printf '%s' "$sha256" | tr 'A-F' 'a-f')
    printf '%s' "$sha256" | grep -Eq '^[0-9a-f]{64}$' || die "--sha256 must be 64 hex digits, got '$sha256'"
fi

# --- 1. checksum -----------------------------------------------------------------------------------------
file_sha256() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d' ' -f1
    elif command -v shasum >/dev/null 2>&1; then
        shasum -a 256 "$1" | cut -d' ' -f1
    elif command -v openssl >/dev/null 2>&1; then
        openssl dgst -sha256 -r "$1" | cut -d' ' -f1
    else
        return 1
    fi
}

if [ "$no_verify" -eq 0 ]; then
    actual=$(file_sha256 "$src") || die "no sha256sum, shasum or openssl found to verify the checksum"
    [ "$actual" = "$sha256" ] || die "checksum mismatch for $src: expected $sha256, got $actual (wrong or corrupted download)"
    note "sha256 ok ($actual)"
else
    note "checksum NOT verified (--no-verify)"
fi

# --- 2. ELF header ----------------------------------------------------------------------------------------
# Bytes 0-3 magic 7f 45 4c 46, byte 4 EI_CLASS (02 = 64-bit), byte 5 EI_DATA (01 = little-endian),
# bytes 16-17 e_type (03 00 = ET_DYN, shared object), bytes 18-19 e_machine (b7 00 = 183 = EM_AARCH64).
command -v od >/dev/null 2>&1 || die "od is needed to read the ELF header"
header=$(od -An -tx1 -N20 "$src" | tr -d ' \n')
case $header in
    7f454c46*) ;;
    *) die "$src is not an ELF file (is it an HTML page or an archive instead of the .so?)" ;;
esac
class=$(printf '%s' "$header" | cut -c9-10)
data=$(printf '%s' "$header" | cut -c11-12)
etype=$(printf '%s' "$header" | cut -c33-36)
machine=$(printf '%s' "$header" | cut -c37-40)
if [ "$class" != 02 ] || [ "$data" != 01 ]; then
    die "$src is not a 64-bit little-endian ELF file (class $class, data $data)"
fi
[ "$machine" = b700 ] || die "$src is not built for aarch64 (e_machine bytes $machine); download the aarch64 (arm64) librkllmrt.so"
[ "$etype" = 0300 ] || die "$src is not a shared library (e_type bytes $etype)"
if command -v file >/dev/null 2>&1; then
    note "file: $(file -b "$src")"
fi
note "ELF ok: aarch64 shared object"

# --- 3. ABI report (optional: needs rkedge) ---------------------------------------------------------------
if "$PY" -c 'import rkedge.runtime.library' >/dev/null 2>&1; then
    note "ABI detection ($PY -m rkedge.runtime.library):"
    if ! "$PY" -m rkedge.runtime.library "$src"; then
        note "ABI detection failed (see above); rkedge will need --abi or RKEDGE_RKLLM_ABI to use this library"
    fi
    if [ -n "$abi" ]; then
        # resolve_library raises when the explicit ABI contradicts the file: install nothing in that case.
        if ! checked=$("$PY" -c 'import sys
from rkedge.errors import RkedgeError
from rkedge.runtime.library import resolve_library
try:
    print(resolve_library(sys.argv[1], sys.argv[2]).abi)
except RkedgeError as exc:
    print(exc, file=sys.stderr)
    sys.exit(1)' "$src" "$abi"); then
            die "--abi $abi does not fit $src (see above); nothing was installed"
        fi
        note "--abi $abi is consistent with the file (ABI $checked)"
    fi
else
    note "rkedge is not importable by $PY: ABI not reported (set RKEDGE_PYTHON to rkedge's python to get it)"
fi

# --- 4. atomic install -----------------------------------------------------------------------------------
if [ ! -d "$prefix" ]; then
    mkdir -p "$prefix" || die "cannot create $prefix (run as root, or choose --prefix)"
fi
[ -w "$prefix" ] || die "$prefix is not writable (run with sudo, or choose --prefix)"
target="$prefix/librkllmrt.so"
tmp="$prefix/.librkllmrt.so.tmp.$$"
cp "$src" "$tmp" || die "copy to $tmp failed"
chmod 0644 "$tmp" || die "chmod on $tmp failed"
if [ "$no_verify" -eq 0 ]; then
    copied=$(file_sha256 "$tmp") || die "cannot checksum $tmp"
    [ "$copied" = "$sha256" ] || die "the copy in $prefix has a different checksum ($copied); disk full or failing?"
fi
mv -f "$tmp" "$target" || die "rename $tmp -> $target failed"
tmp=""
note "installed $target"
if [ "$(id -u)" -eq 0 ] && command -v ldconfig >/dev/null 2>&1; then
    ldconfig 2>/dev/null || note "ldconfig failed (harmless: rkedge loads the library by path)"
fi

if [ -n "$abi" ]; then
    note "to make rkedge use ABI $abi without --abi, add RKEDGE_RKLLM_ABI=$abi to /etc/default/rkedge (service) or your shell"
fi
case $target in
    # rkedge.runtime.library.DEFAULT_SEARCH: found without any option.
    /usr/lib/librkllmrt.so | /usr/local/lib/librkllmrt.so | /usr/lib/aarch64-linux-gnu/librkllmrt.so | /lib/librkllmrt.so) ;;
    *) note "rkedge finds the library at $target with --lib $target or RKEDGE_RKLLM_LIB=$target" ;;
esac
