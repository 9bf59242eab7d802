#!/usr/bin/env bash
# The quickstart: build everything and boot the Debian cloud kernel + a busybox initramfs
# under ferro-vmm, showing the guest's console.
#
# On hardware KVM (VT-x / AMD-V) the VM runs directly on this host. Where /dev/kvm is PVM (a
# software KVM that cannot run a stock Linux kernel) or absent, the same VM runs inside the
# KVM lab (lab/lab.sh: QEMU with an emulated AMD-V CPU and a nested, real kvm_amd).
# Every step is cached, so a second run only boots.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
export FERRO_BUILD=${FERRO_BUILD:-$REPO/build}
GUEST=$FERRO_BUILD/guest
cd "$REPO"

step() { echo "==> $*"; }

step "system packages (scripts/deps.sh)"
"$REPO/scripts/deps.sh"

step "ferro-vmm (cargo build --release -p ferro-vmm)"
if ! command -v cargo >/dev/null; then
    [[ -x $HOME/.cargo/bin/cargo ]] && export PATH=$HOME/.cargo/bin:$PATH
fi
command -v cargo >/dev/null || { echo "demo: cargo not found: install Rust (https://rustup.rs) and re-run" >&2; exit 1; }
cargo build --release -p ferro-vmm
VMM=$REPO/target/release/ferro-vmm

step "Linux test guest (guest/linux/build.sh)"
"$REPO/guest/linux/build.sh"

# Which KVM is this? ferro-vmm knows ("kind: hardware|nested|pvm"); the /sys/module check is
# the fallback for a binary without --host-info.
kind=$("$VMM" --host-info 2>/dev/null | awk '$1 == "kind:" {print $2; exit}' || true)
if [[ -z $kind ]]; then
    if [[ ! -c /dev/kvm ]]; then kind=none
    elif [[ -d /sys/module/kvm_pvm ]]; then kind=pvm
    elif [[ -d /sys/module/kvm_intel || -d /sys/module/kvm_amd ]]; then kind=hardware
    else kind=unknown
    fi
fi

CMDLINE="console=ttyS0 panic=-1 probe.exit=poweroff"
VMM_ARGS=(--kernel "$GUEST/bzImage" --initrd "$GUEST/initramfs.cpio.gz" --cmdline "$CMDLINE" --cpus 1 --memory 256)

case "$kind" in
    pvm|none|unknown|"")
        if [[ $kind == pvm ]]; then
            echo "this host's /dev/kvm is PVM (no hardware virtualization): booting the VM inside the KVM lab instead"
        else
            echo "this host has no usable hardware KVM ($kind): booting the VM inside the KVM lab instead"
        fi
        mkdir -p "$FERRO_BUILD/demo"
        # The lab packs ferro-vmm (and its libraries) next to /guest/{bzImage,initramfs.cpio.gz}.
        cat > "$FERRO_BUILD/demo/lab-script.sh" <<EOF
ferro-vmm --kernel /guest/bzImage --initrd /guest/initramfs.cpio.gz --cmdline "$CMDLINE" --cpus 1 --memory 256
EOF
        exec "$REPO/lab/lab.sh" run --timeout 600 --add "$VMM:/bin/ferro-vmm" "$FERRO_BUILD/demo/lab-script.sh"
        ;;
    *)
        step "booting under ferro-vmm on this host's KVM ($kind)"
        exec "$VMM" "${VMM_ARGS[@]}"
        ;;
esac
