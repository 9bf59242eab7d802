#!/usr/bin/env bash
# The quickstart: build everything, fetch the Debian kernel, build the Debian template disk,
# start `ferro daemon` with its defaults (/var/lib/ferro, bridge ferrobr0 10.77.0.1/24), import
# the disk as an image, make it a template, create a VM from it as a linked clone with a NIC on
# the bridge, boot it, and print how to reach its console and its address.
#
# On hardware KVM (VT-x / AMD-V) all of that runs on this host, and the daemon and the VM keep
# running afterwards. Where /dev/kvm is PVM (a software KVM that cannot run a stock Linux
# kernel) or absent, it says so in one line and runs the same demo inside the KVM lab
# (lab/lab.sh: QEMU with an emulated AMD-V CPU and a nested, real kvm_amd), which ends when the
# demo does. Every step is cached, so a second run reuses the image, template and VM.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
export FERRO_BUILD=${FERRO_BUILD:-$REPO/build}
GUEST=$FERRO_BUILD/guest
cd "$REPO"

step() { echo "==> $*"; }

step "system packages (scripts/deps.sh)"
"$REPO/scripts/deps.sh"

step "ferro-vmm and ferro (cargo build --release -p ferro-vmm -p ferro-cli)"
if ! command -v cargo >/dev/null; then
    [[ -x $HOME/.cargo/bin/cargo ]] && export PATH=$HOME/.cargo/bin:$PATH
fi
command -v cargo >/dev/null || { echo "demo: cargo not found: install Rust (https://rustup.rs) and re-run" >&2; exit 1; }
cargo build --release -p ferro-vmm -p ferro-cli
VMM=$REPO/target/release/ferro-vmm
FERRO=$REPO/target/release/ferro

step "Debian kernel and template disk (guest/debian/build.sh)"
"$REPO/guest/debian/build.sh"
DEBIAN=$FERRO_BUILD/debian

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

case "$kind" in
    pvm|none|unknown|"")
        if [[ $kind == pvm ]]; then
            echo "this host's /dev/kvm is PVM (no hardware virtualization): running the demo inside the KVM lab instead"
        else
            echo "this host has no usable hardware KVM ($kind): running the demo inside the KVM lab instead"
        fi
        exec "$REPO/lab/lab.sh" run --timeout 1500 --mem 3072 \
            --add "$VMM:/bin/ferro-vmm" --add "$FERRO:/bin/ferro" \
            --add "$(command -v ip):/usr/local/bin/ip" --add "$(command -v qemu-img):/usr/local/bin/qemu-img" \
            --add "$DEBIAN/debian.qcow2:/lab/debian.qcow2" \
            --add "$DEBIAN/debian-initrd.cpio.gz:/lab/debian-initrd.cpio.gz" \
            "$REPO/tests/lab/daemon_debian.sh"
        ;;
esac

step "ferro daemon (defaults: /var/lib/ferro, bridge ferrobr0)"
if ! "$FERRO" vm list >/dev/null 2>&1; then
    mkdir -p /var/lib/ferro
    nohup "$FERRO" daemon --vmm "$VMM" >> /var/lib/ferro/daemon.log 2>&1 &
    for _ in $(seq 100); do "$FERRO" vm list >/dev/null 2>&1 && break; sleep 0.1; done
fi
"$FERRO" vm list >/dev/null || { echo "demo: the daemon did not start (see /var/lib/ferro/daemon.log)" >&2; exit 1; }

step "image and template 'debian'"
"$FERRO" image list --json | grep -q '"name": *"debian"' || "$FERRO" image import "$DEBIAN/debian.qcow2" --name debian
"$FERRO" template list --json | grep -q '"name": *"debian"' || "$FERRO" template create debian --from-image debian

step "VM 'demo': a linked clone of the template"
if ! "$FERRO" vm show demo >/dev/null 2>&1; then
    "$FERRO" vm create demo --template debian --kernel "$FERRO_BUILD/guest/bzImage" \
        --initrd "$DEBIAN/debian-initrd.cpio.gz" --cmdline "console=ttyS0 root=/dev/vda quiet" \
        --cpus 2 --memory 512 --net auto --restart on-failure
fi
"$FERRO" vm show demo --json | grep -q '"state": *"running"' || "$FERRO" vm start demo
for _ in $(seq 240); do "$FERRO" vm log demo 2>/dev/null | grep -q 'ferro-guest: ready' && break; sleep 0.5; done
"$FERRO" vm log demo | tail -n 5
"$FERRO" vm show demo
addr=$("$FERRO" vm show demo --json | grep -o '"address": *"[0-9./]*"' | head -n 1 | cut -d'"' -f4)
echo
echo "VM 'demo' runs at ${addr:-?} (HTTP on port 80, TCP echo on 7)."
echo "  console:  $FERRO console demo      (Ctrl-] detaches)"
echo "  log:      $FERRO vm log demo"
echo "  stop:     $FERRO vm stop demo"
