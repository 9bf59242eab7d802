#!/usr/bin/env bash
# Runs Ferrovisor's whole test suite on this machine: unit tests, the probe guest on /dev/kvm,
# and the Linux guest inside the KVM lab. Installs what it needs first (cached after one run).
#
#   scripts/test.sh            everything
#   scripts/test.sh --fast     skip the KVM-lab tests (Linux guests under emulated AMD-V)
set -euo pipefail
cd "$(dirname "$0")/.."

fast=0
[ "${1:-}" = "--fast" ] && fast=1

bash scripts/deps.sh
if ! command -v cargo >/dev/null; then
    echo "test.sh: cargo is not installed (https://rustup.rs)" >&2
    exit 1
fi

echo "== building (release) =="
cargo build --release -p ferro-vmm -p ferro-cli
bash guest/probe/build-probe.sh >/dev/null
if [ "$fast" = 0 ]; then
    echo "== building the Linux test guest =="
    bash guest/linux/build.sh
    echo "== building the Debian template guest =="
    bash guest/debian/build.sh
else
    export FERRO_SKIP_LAB=1
fi

echo "== lint =="
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -q -- -D warnings

echo "== fuzz smoke: virtio descriptor chains =="
# libFuzzer needs a nightly toolchain and cargo-fuzz; where they are missing, the same fuzz
# bodies run below as seeded tests in cargo test (ferro-virtio fuzzing).
if cargo +nightly --version >/dev/null 2>&1 && cargo fuzz --version >/dev/null 2>&1; then
    cargo +nightly fuzz run descriptor_chain -- -max_total_time=20
else
    echo "SKIPPED: cargo-fuzz smoke run (needs cargo-fuzz and a nightly toolchain)"
fi

echo "== cargo test =="
# The e2e tests boot many VMs; two at a time suits a 2-core machine. --no-fail-fast: one
# failing test binary must not hide the results of the others.
cargo test --workspace --no-fail-fast -- --test-threads=2
