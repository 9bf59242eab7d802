#!/bin/sh
# Builds the probe kernel and prints the path of the ELF (guest/probe/target/release/probe).
set -eu
cd "$(dirname "$0")"
cargo build --release --quiet 2>&1 | grep -v -e 'target feature `sse2` must be enabled' -e '116344' -e 'previously accepted' \
    -e '^ *|$' -e '^ *= note' -e '^warning: 1 warning emitted' -e '^$' >&2 || true
bin="$(pwd)/target/release/probe"
test -f "$bin"
# Guard: no SSE/AVX instruction may appear (CPL0 emulation on PVM hosts cannot run them).
if command -v objdump >/dev/null 2>&1 && objdump -d "$bin" | grep -q -E '%[xy]mm[0-9]'; then
    echo "build-probe.sh: SSE instructions found in $bin" >&2
    exit 1
fi
echo "$bin"
