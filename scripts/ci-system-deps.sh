#!/usr/bin/env bash
# System packages some tests need (Debian): Chromium for the web-page test, tmux for the terminal chat test,
# curl for the SSE test. Installs only what is missing, and only when it can (root or passwordless sudo);
# otherwise it prints one line and the tests that need the package report themselves as skipped.
set -u
want=()
command -v chromium >/dev/null 2>&1 || want+=(chromium)
command -v tmux >/dev/null 2>&1 || want+=(tmux)
command -v curl >/dev/null 2>&1 || want+=(curl)
for extra in "$@"; do want+=("$extra"); done
[ ${#want[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
  echo "ci-system-deps: no apt-get here; tests needing ${want[*]} will be skipped"; exit 0
fi
if [ "$(id -u)" -eq 0 ]; then sudo=""; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; else
  echo "ci-system-deps: not root and no passwordless sudo; tests needing ${want[*]} will be skipped"; exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if ! $sudo apt-get install -y -q --no-install-recommends "${want[@]}" >/tmp/rkedge-apt.log 2>&1; then
  $sudo apt-get update -q >>/tmp/rkedge-apt.log 2>&1 || true
  $sudo apt-get install -y -q --no-install-recommends "${want[@]}" >>/tmp/rkedge-apt.log 2>&1 \
    || echo "ci-system-deps: could not install ${want[*]} (see /tmp/rkedge-apt.log); those tests will be skipped"
fi
exit 0
