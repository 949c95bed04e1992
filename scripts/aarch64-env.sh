#!/usr/bin/env bash
# Sets up what the aarch64 test run needs, under .tools/aarch64 (nothing system-wide but Debian packages):
#   - host tools: qemu-aarch64-static (qemu-user-static) and aarch64-linux-gnu-gcc (gcc-aarch64-linux-gnu),
#     installed with apt when missing and possible (root or passwordless sudo);
#   - an arm64 CPython from Debian's packages, fetched with a private apt configuration (no dpkg
#     --add-architecture, no chroot, no binfmt) and unpacked with dpkg -x into .tools/aarch64/root.
# Prints "aarch64: ready" on success; otherwise one line saying what is missing, and exits 3.
set -u
here=$(cd "$(dirname "$0")/.." && pwd)
tools="$here/.tools/aarch64"
root="$tools/root"
mkdir -p "$tools"

need=()
command -v qemu-aarch64-static >/dev/null 2>&1 || command -v qemu-aarch64 >/dev/null 2>&1 || need+=(qemu-user-static)
command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || need+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
if [ ${#need[@]} -gt 0 ]; then
  bash "$here/scripts/ci-system-deps.sh" "${need[@]}" >/dev/null 2>&1
fi
command -v qemu-aarch64-static >/dev/null 2>&1 || command -v qemu-aarch64 >/dev/null 2>&1 \
  || { echo "aarch64: qemu-user is not installed and could not be (apt install qemu-user-static)"; exit 3; }
command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 \
  || { echo "aarch64: the cross compiler is not installed and could not be (apt install gcc-aarch64-linux-gnu)"; exit 3; }

# Debian bookworm's arm64 CPython and the shared libraries it and ctypes load.
packages=(libc6 libgcc-s1 libpython3.11-minimal python3.11-minimal libpython3.11-stdlib libffi8 zlib1g libexpat1
          libbz2-1.0 liblzma5 libncursesw6 libtinfo6 libreadline8 libssl3 libsqlite3-0 libuuid1 libcrypt1
          media-types)
stamp="$root/.complete"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "${packages[*]}" ]; then
  apt_dir="$tools/apt"
  mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial" "$apt_dir/debs" "$apt_dir/etc/preferences.d"
  cat > "$apt_dir/sources.list" <<SOURCES
deb [arch=arm64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
deb [arch=arm64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-updates main
deb [arch=arm64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bookworm-security main
SOURCES
  opts=(-o "APT::Architecture=arm64" -o "APT::Architectures=arm64" -o "Dir::Etc::SourceList=$apt_dir/sources.list"
        -o "Dir::Etc::SourceParts=-" -o "Dir::Etc::Preferences=-" -o "Dir::Etc::PreferencesParts=$apt_dir/etc/preferences.d"
        -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache::Archives=$apt_dir/archives"
        -o "Dir::State::status=/dev/null" -o "Debug::NoLocking=1")
  if ! apt-get "${opts[@]}" update >"$tools/apt.log" 2>&1; then
    echo "aarch64: could not read Debian's arm64 package lists (network?); see $tools/apt.log"; exit 3
  fi
  rm -rf "$root" && mkdir -p "$root"
  ( cd "$apt_dir/debs" && rm -f ./*.deb && apt-get "${opts[@]}" download "${packages[@]/%/:arm64}" >>"$tools/apt.log" 2>&1 ) \
    || { echo "aarch64: could not download the arm64 Python packages; see $tools/apt.log"; exit 3; }
  for deb in "$apt_dir"/debs/*.deb; do dpkg -x "$deb" "$root"; done
  # Debian's python3.11 finds its stdlib under /usr/lib/python3.11; the interpreter is run with this root as
  # qemu's -L prefix and PYTHONHOME.
  echo "${packages[*]}" > "$stamp"
fi
echo "aarch64: ready"
