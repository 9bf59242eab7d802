#!/usr/bin/env bash
# Install the Debian packages that builds and tests need, only those that are missing.
# Idempotent: a second run only queries dpkg and is instant. Prints one line per action.
set -euo pipefail

# Packages checked one by one (python3: the build helpers are Python; minimal images lack it). qemu-system-x86 is handled separately below because it
# needs the qemu-utils downgrade (see PLATFORM-NOTES: the image ships qemu-utils 10 from
# backports, and Debian's qemu-system-x86 7.2 conflicts with it).
PKGS=(busybox-static cpio lz4 xz-utils zstd iproute2 kmod gzip python3 debootstrap e2fsprogs iputils-ping fio)

SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi

# installed PKG -> true if dpkg says "install ok installed".
installed() {
    [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" == "install ok installed" ]]
}

updated=0
# apt_update: run `apt-get update` at most once per invocation, and only when we must install.
apt_update() {
    if [[ $updated -eq 0 ]]; then
        echo "deps: apt-get update"
        $SUDO apt-get update -qq >/dev/null
        updated=1
    fi
}

export DEBIAN_FRONTEND=noninteractive

missing=()
for p in "${PKGS[@]}"; do
    if installed "$p"; then
        echo "deps: $p already installed"
    else
        missing+=("$p")
    fi
done
if [[ ${#missing[@]} -gt 0 ]]; then
    apt_update
    echo "deps: installing ${missing[*]}"
    $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if installed qemu-system-x86; then
    echo "deps: qemu-system-x86 already installed ($(dpkg-query -W -f='${Version}' qemu-system-x86))"
else
    apt_update
    # Exactly this command: it downgrades the preinstalled qemu-utils 10 (backports) to
    # bookworm's 7.2 so that qemu-system-x86 7.2 can be installed next to it.
    echo "deps: installing qemu-system-x86 (downgrading qemu-utils to bookworm's)"
    $SUDO apt-get install -y -qq --allow-downgrades qemu-system-x86 qemu-utils/bookworm qemu-block-extra/bookworm >/dev/null
fi
