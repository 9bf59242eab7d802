#!/bin/bash
# Boots the probe under QEMU (microvm and q35, KVM) and, if it is built, ferro-vmm, and checks
# the report and the exit status of each run. Usage: guest/probe/test-probe.sh [--quick]
set -u
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
probe="$("$here/build-probe.sh")" || exit 1
quick=${1:-}
accel="-accel kvm -cpu host,-arch-capabilities"
[ -e /dev/kvm ] || accel="-accel tcg -cpu max"
out="$(mktemp)"
trap 'rm -f "$out"' EXIT
pass=0
fail=0

# check NAME EXPECTED_RC REQUIRED_LINE... -- COMMAND...
check() {
    local name=$1 want=$2
    shift 2
    local need=()
    while [ "$1" != "--" ]; do need+=("$1"); shift; done
    shift
    timeout 120 bash -c '"$@"' bash "$@" >"$out" 2>/dev/null </dev/null
    local rc=$? ok=1 l
    [ "$rc" = "$want" ] || ok=0
    for l in "${need[@]}"; do grep -qxF -- "$l" <(tr -d '\r' <"$out") || ok=0; done
    if [ $ok = 1 ]; then
        pass=$((pass + 1))
        echo "ok   $name"
    else
        fail=$((fail + 1))
        echo "FAIL $name (rc=$rc, want $want; needed: ${need[*]})"
        sed 's/^/     | /' "$out" | tail -n 40
    fi
}

qemu() {
    local machine=$1 mem=$2 cpus=$3 cmdline=$4
    shift 4
    qemu-system-x86_64 $accel -M "$machine" -m "$mem" -smp "$cpus" -nodefaults -no-user-config \
        -nographic -serial stdio -no-reboot -kernel "$probe" -append "$cmdline" "$@"
}

export accel probe
export -f qemu
microvm="microvm,x-option-roms=off,rtc=on"
for n in 1 4 32; do
    check "qemu microvm smp=$n" 0 "cpus_online=$n" "acpi_cpus=$n" "user=ok" "memtest=ok" "probe=done" \
        -- qemu "$microvm" 256 "$n" "exit=poweroff pio=2000 work=5 memtest=16"
done
check "qemu microvm smp=off" 0 "cpus_online=1" "probe=exit:poweroff" -- qemu "$microvm" 256 4 "smp=off"
check "qemu microvm triplefault" 0 "probe=exit:triplefault" -- qemu "$microvm" 256 2 "exit=triplefault"
check "qemu microvm panic" 1 "probe=exit:panic" \
    -- qemu "$microvm" 256 2 "exit=panic" -device pvpanic -action panic=exit-failure
check "qemu microvm memtest too big" 0 "memtest=fail:0x10000000" -- qemu "$microvm" 256 1 "smp=off memtest=1000"
if [ "$quick" != "--quick" ]; then
    check "qemu q35 smp=32 16G" 0 "cpus_online=32" "acpi_pm=pm1a:0x604,s5:0" "memtest=ok" "user=ok" \
        -- qemu q35 16G 32 "exit=poweroff memtest=5000 work=3"
    check "qemu q35 reboot" 0 "probe=exit:reboot" -- qemu q35 256 2 "exit=reboot"
    check "qemu q35 triplefault" 0 "probe=exit:triplefault" -- qemu q35 256 2 "exit=triplefault"
    check "qemu q35 panic" 1 "probe=exit:panic" \
        -- qemu q35 256 2 "exit=panic" -device pvpanic -action panic=exit-failure
fi

vmm="$repo/target/release/ferro-vmm"
if [ -x "$vmm" ] && [ -e /dev/kvm ]; then
    fv() { "$vmm" --kernel "$probe" --serial stdio "$@"; }
    export vmm
    export -f fv
    for n in 1 4 32; do
        check "ferro-vmm cpus=$n" 0 "cpus_online=$n" "user=ok" "memtest=ok" "probe=done" \
            -- fv --cpus "$n" --memory 512 --cmdline "exit=poweroff pio=2000 work=5 memtest=16"
    done
    check "ferro-vmm reboot" 0 "probe=exit:reboot" -- fv --cpus 2 --memory 256 --cmdline "exit=reboot"
    check "ferro-vmm triplefault" 2 "probe=exit:triplefault" -- fv --cpus 2 --memory 256 --cmdline "exit=triplefault"
    check "ferro-vmm panic" 3 "probe=exit:panic" -- fv --cpus 2 --memory 256 --cmdline "exit=panic"
else
    echo "skip ferro-vmm (no $vmm or no /dev/kvm)"
fi

echo "passed $pass, failed $fail"
[ $fail = 0 ]
