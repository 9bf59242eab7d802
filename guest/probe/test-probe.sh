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
# A required line that starts with `~` is an extended regular expression for a whole line.
check() {
    local name=$1 want=$2
    shift 2
    local need=()
    while [ "$1" != "--" ]; do need+=("$1"); shift; done
    shift
    timeout 120 bash -c '"$@"' bash "$@" >"$out" 2>/dev/null </dev/null
    local rc=$? ok=1 l
    [ "$rc" = "$want" ] || ok=0
    for l in "${need[@]}"; do
        if [ "${l:0:1}" = "~" ]; then
            grep -qxE -- "${l:1}" <(tr -d '\r' <"$out") || ok=0
        else
            grep -qxF -- "$l" <(tr -d '\r' <"$out") || ok=0
        fi
    done
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

# PCI and virtio devices (README.md, "Devices"): the same probe binary under q35 (firmware-placed
# BARs, ECAM from the MCFG), microvm with PCIe (BARs placed by the probe, ECAM given on the command
# line: QEMU 7.2's microvm has no MCFG) and pc (configuration ports).
img="$(mktemp -d /var/tmp/probe-dev.XXXXXX)"
trap 'rm -f "$out"; rm -rf "$img"' EXIT
truncate -s 64M "$img/d0.img"
truncate -s 16M "$img/d1.img"
truncate -s 8M "$img/ro.img"
v1="disable-legacy=on"
export img here v1

disk() { echo "-drive if=none,id=$1,file=$img/$2,format=raw,cache=none${4:+,$4} -device virtio-blk-pci,drive=$1,$v1,serial=$3"; }
rng=(-device "virtio-rng-pci,$v1")
rngline='~rng_bytes=4096 rng_nonzero=4[0-9]{3} rng_irqs=[1-9][0-9]*'
# shellcheck disable=SC2046
check "qemu q35 pci rng+blk write" 0 "pci_config=ecam:0xb0000000" "~pci=00:0[0-9].0 1af4:1044 class=0x00ff00" "$rngline" \
    "blk_devices=2" "blk_capacity=131072 blk_ro=0 blk_serial=SER0" "blk_write=ok" "blk_flush=ok" "blk_verify=ok" \
    "~blk_irqs=[1-9][0-9]*" "probe=done" \
    -- qemu q35 256 2 "rng=4096 blk=write blk_sectors=1000 blk_seed=42" "${rng[@]}" $(disk d0 d0.img SER0) $(disk d1 d1.img SER1)
# shellcheck disable=SC2046
check "qemu q35 blk verify after restart" 0 "blk_verify=ok" -- \
    qemu q35 256 1 "blk=verify blk_sectors=1000 blk_seed=42" $(disk d0 d0.img SER0)
# shellcheck disable=SC2046
check "qemu q35 blk verify wrong seed" 0 "blk_verify=fail:0" -- \
    qemu q35 256 1 "blk=verify blk_sectors=1000 blk_seed=43" $(disk d0 d0.img SER0)
# shellcheck disable=SC2046
check "qemu q35 blk second disk" 0 "blk_devices=2" "blk_capacity=32768 blk_ro=0 blk_serial=SER1" "blk_write=ok" "blk_verify=ok" \
    -- qemu q35 256 1 "blk=write blk_dev=1 blk_sectors=300" $(disk d0 d0.img SER0) $(disk d1 d1.img SER1)
# shellcheck disable=SC2046
check "qemu q35 blk read-only" 0 "blk_capacity=16384 blk_ro=1 blk_serial=RO" "blk_write=ioerr" "probe=done" \
    -- qemu q35 256 1 "blk=write blk_sectors=64" $(disk d0 ro.img RO readonly=on)
check "qemu q35 no device" 0 "rng=none" "blk_devices=0" "blk=none" "probe=done" -- qemu q35 256 1 "rng=16 blk=read"
# shellcheck disable=SC2046
check "qemu microvm pcie rng+blk" 0 "pci_config=ecam:0xe0000000" "~pci_assign=00:01.0 bar4=0xc[0-9a-f]{7} size=0x4000" \
    "$rngline" "blk_write=ok" "blk_verify=ok" \
    -- qemu "$microvm,pcie=on" 256 1 "pci_ecam=0xe0000000 rng=4096 blk=write blk_sectors=200" "${rng[@]}" $(disk d0 d0.img M0)
check "qemu pc pci ports" 0 "pci_config=port" "$rngline" -- qemu pc 256 1 "rng=4096" "${rng[@]}"
if [ "$quick" != "--quick" ]; then
    # shellcheck disable=SC2046
    check "qemu q35 blk bench" 0 "~blk_seq_write_mbps=[1-9][0-9]* blk_seq_read_mbps=[1-9][0-9]* blk_rand_read_iops=[1-9][0-9]*" \
        "blk_flush=ok" -- qemu q35 256 1 "blk=bench blk_mib=16 blk_rand=1000" $(disk d0 d0.img B0)
    # Balloon: the monitor sets the target (384 of 512 MiB: 32768 pages), then gives it back.
    # Each command waits for the guest's report of the previous step.
    balloon_run() {
        local sock="$img/mon.sock" log="$img/balloon.log"
        qemu q35 512 1 "balloon=on balloon_secs=60 balloon_changes=2" -device "virtio-balloon-pci,$v1,guest-stats-polling-interval=1" \
            -monitor "unix:$sock,server,nowait" >"$log" &
        for _ in $(seq 600); do grep -q "balloon_target=0" "$log" && break; sleep 0.1; done
        python3 "$here/hmp.py" "$sock" "balloon 384"
        for _ in $(seq 600); do grep -q "balloon_actual=32768" "$log" && break; sleep 0.1; done
        python3 "$here/hmp.py" "$sock" "balloon 512"
        wait
        cat "$log"
    }
    export -f balloon_run
    check "qemu q35 balloon" 0 "balloon_target=32768" "balloon_actual=32768" "balloon_actual=0" \
        "~balloon_inflated=32768 balloon_deflated=32768 balloon_stats=[1-9][0-9]* balloon_irqs=[0-9]+" -- balloon_run
fi

# virtio-vsock through QEMU's vhost-user-vsock-pci and vsock-peer.py as the backend (the host has
# no /dev/vhost-vsock); guest memory must be a shared memfd for the backend to map it.
vsock_run() {
    local mode=$1 port=$2 cmdline=$3 sock="$img/vsock.sock"
    rm -f "$sock"
    python3 "$here/vsock-peer.py" "$sock" "$mode" "$port" hello-vsock >"$img/vsock-peer.log" &
    for _ in $(seq 50); do [ -S "$sock" ] && break; sleep 0.1; done
    qemu q35,memory-backend=mem 512 1 "$cmdline" -object memory-backend-memfd,id=mem,size=512M,share=on \
        -chardev "socket,id=vs,path=$sock" -device "vhost-user-vsock-pci,chardev=vs,$v1"
    wait
    cat "$img/vsock-peer.log"
}
export -f vsock_run
check "qemu q35 vsock echo" 0 "vsock_cid=3" "vsock_listen=1234" "vsock_accept=2:5000" \
    "vsock=ok vsock_rx_bytes=11 vsock_tx_bytes=11" "~vsock_irqs=[1-9][0-9]*" "peer_vsock=echo_ok" \
    -- vsock_run echo 1234 "vsock=echo vsock_port=1234"
check "qemu q35 vsock connect" 0 "vsock_reply=re:ping" "vsock=ok vsock_rx_bytes=7 vsock_tx_bytes=4" "peer_vsock=served" \
    -- vsock_run serve 4321 "vsock=connect vsock_port=4321 vsock_msg=ping"

# virtio-net on a tap inside a network namespace of its own (link-local addresses only).
if [ "$(id -u)" = 0 ] && command -v ip >/dev/null && command -v ping >/dev/null; then
    ns="probe$$"
    if ip netns add "$ns" 2>/dev/null; then
        trap 'rm -f "$out"; rm -rf "$img"; ip netns del "$ns" 2>/dev/null' EXIT
        ip netns exec "$ns" ip tuntap add dev ptap0 mode tap
        ip netns exec "$ns" ip link set ptap0 up
        ip netns exec "$ns" ip addr add 169.254.77.1/24 dev ptap0
        export ns
        net_ping() {
            local log="$img/net.log"
            ip netns exec "$ns" bash -c 'qemu "$@"' bash q35 256 1 "net=on net_ip=169.254.77.2 net_secs=20 net_frames=4" \
                -netdev tap,id=n0,ifname=ptap0,script=no,downscript=no -device virtio-net-pci,netdev=n0,$v1 >"$log" &
            for _ in $(seq 600); do grep -q net_ready "$log" && break; sleep 0.1; done
            ip netns exec "$ns" ping -c 3 -i 0.3 -W 2 169.254.77.2 >/dev/null && echo "host_ping=ok"
            wait
            cat "$log"
        }
        net_bench() {
            local log="$img/net.log"
            ip netns exec "$ns" python3 "$here/net-peer.py" count ptap0 60 >"$img/peer.log" &
            ip netns exec "$ns" bash -c 'qemu "$@"' bash q35 256 1 "net=bench net_secs=3 net_tx_frames=20000 net_frame_len=1000" \
                -netdev tap,id=n0,ifname=ptap0,script=no,downscript=no -device virtio-net-pci,netdev=n0,$v1 >"$log" &
            for _ in $(seq 600); do grep -q net_rx=listening "$log" && break; sleep 0.1; done
            ip netns exec "$ns" python3 "$here/net-peer.py" blast ptap0 2000 1000 >/dev/null
            wait
            cat "$log" "$img/peer.log"
        }
        export -f net_ping net_bench
        ns_ok=1
        check "qemu q35 net ping" 0 "net_ready=52:54:00:12:34:56" "host_ping=ok" \
            "~net_mac=52:54:00:12:34:56 net_rx=[0-9]+ net_tx=4 net_arp=1 net_icmp=3" "~net_irqs=[1-9][0-9]*" -- net_ping
        check "qemu q35 net bench" 0 "~net_tx_frames=20000 net_tx_fps=[1-9][0-9]* net_tx_mbps=[0-9]+" \
            "~net_rx_frames=[1-9][0-9]* net_rx_bytes=[0-9]+ net_rx_fps=[0-9]+ net_rx_mbps=[0-9]+" \
            "~peer_rx_frames=[1-9][0-9]* peer_rx_bytes=[0-9]+ peer_rx_fps=[0-9]+" -- net_bench
    else
        echo "skip net (ip netns add failed)"
    fi
else
    echo "skip net (needs root, ip and ping)"
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

    # Devices. One the VMM does not offer yet (it refuses the option, or the probe prints
    # `<dev>=none`) is a skip, not a failure.
    fvd() { "$vmm" --kernel "$probe" --serial stdio "$@" 2>"$img/fv.err"; }
    export -f fvd
    check_dev() {
        local dev=$1 f0=$fail
        shift
        check "$@" >"$img/check.log"
        if [ "$fail" != "$f0" ] && { grep -qx "$dev=none" <(tr -d '\r' <"$out") ||
            grep -q "not available in this build" "$img/fv.err" 2>/dev/null; }; then
            fail=$f0
            echo "skip $1 (ferro-vmm does not offer $dev yet)"
        else
            cat "$img/check.log"
        fi
    }
    check_dev rng "ferro-vmm rng" 0 "~pci_config=ecam:0x[0-9a-f]+" "~pci=00:[0-9a-f]{2}.0 1af4:1044 class=0x[0-9a-f]{6}" \
        "$rngline" "probe=done" -- fvd --cpus 2 --memory 256 --rng --cmdline "rng=4096"
    check_dev blk "ferro-vmm blk write 2 disks" 0 "blk_devices=2" "blk_capacity=131072 blk_ro=0 blk_serial=FV0" \
        "blk_write=ok" "blk_flush=ok" "blk_verify=ok" "~blk_irqs=[1-9][0-9]*" \
        -- fvd --cpus 2 --memory 256 --disk "path=$img/d0.img,serial=FV0" --disk "path=$img/d1.img,serial=FV1" \
        --cmdline "blk=write blk_sectors=1000 blk_seed=77"
    check_dev blk "ferro-vmm blk verify after restart" 0 "blk_verify=ok" \
        -- fvd --cpus 1 --memory 256 --disk "path=$img/d0.img,serial=FV0" --cmdline "blk=verify blk_sectors=1000 blk_seed=77"
    check_dev blk "ferro-vmm blk second disk" 0 "blk_capacity=32768 blk_ro=0 blk_serial=FV1" "blk_write=ok" "blk_verify=ok" \
        -- fvd --cpus 1 --memory 256 --disk "path=$img/d0.img,serial=FV0" --disk "path=$img/d1.img,serial=FV1" \
        --cmdline "blk=write blk_dev=1 blk_sectors=300"
    check_dev blk "ferro-vmm blk read-only" 0 "blk_capacity=16384 blk_ro=1 blk_serial=RO" "blk_write=ioerr" "probe=done" \
        -- fvd --cpus 1 --memory 256 --disk "path=$img/ro.img,readonly=on,serial=RO" --cmdline "blk=write blk_sectors=64"
    check_dev balloon "ferro-vmm balloon" 0 "balloon_target=0" "~balloon_inflated=0 balloon_deflated=0 balloon_stats=[0-9]+ balloon_irqs=[0-9]+" \
        -- fvd --cpus 1 --memory 256 --balloon --cmdline "balloon=on balloon_secs=1"
    # vsock with a Firecracker-style unix socket: the host connects and says `CONNECT <port>`.
    fv_vsock() {
        local sock="$img/fv-vsock.sock" log="$img/fv-vsock.log"
        rm -f "$sock"
        fvd --cpus 1 --memory 256 --vsock "cid=3,uds=$sock" --cmdline "vsock=echo vsock_port=1234" >"$log" &
        for _ in $(seq 600); do grep -q "vsock_listen=\|vsock=none" "$log" && break; sleep 0.1; done
        python3 - "$sock" <<'PY' || true
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
s.connect(sys.argv[1])
s.sendall(b"CONNECT 1234\n")
ok = s.recv(64)
s.sendall(b"hello-vsock")
got = b""
while len(got) < 11:
    got += s.recv(64)
s.close()
print("peer_vsock=echo_ok" if ok.startswith(b"OK") and got == b"hello-vsock" else f"peer_vsock=fail:{ok!r}:{got!r}")
PY
        wait
        cat "$log"
    }
    export -f fv_vsock
    check_dev vsock "ferro-vmm vsock echo" 0 "vsock_listen=1234" "peer_vsock=echo_ok" "~vsock=ok vsock_rx_bytes=11 vsock_tx_bytes=11" \
        -- fv_vsock
    if [ -n "${ns_ok:-}" ]; then
        fv_net() {
            local log="$img/fv-net.log"
            ip netns exec "$ns" bash -c 'fvd "$@"' bash --cpus 1 --memory 256 --net tap=ptap0 \
                --cmdline "net=on net_ip=169.254.77.2 net_secs=20 net_frames=4" >"$log" &
            for _ in $(seq 600); do grep -q "net_ready\|net=none" "$log" && break; sleep 0.1; done
            ip netns exec "$ns" ping -c 3 -i 0.3 -W 2 169.254.77.2 >/dev/null && echo "host_ping=ok"
            wait
            cat "$log"
        }
        export -f fv_net
        check_dev net "ferro-vmm net ping" 0 "host_ping=ok" "~net_mac=[0-9a-f:]{17} net_rx=[0-9]+ net_tx=4 net_arp=1 net_icmp=3" \
            -- fv_net
    fi
else
    echo "skip ferro-vmm (no $vmm or no /dev/kvm)"
fi

echo "passed $pass, failed $fail"
[ $fail = 0 ]
