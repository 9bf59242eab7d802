# Runs inside the KVM lab (busybox sh + iproute2's ip): live migration of a running Debian
# kernel guest between two "hosts" with an open TCP connection through it.
#
#   lab (client, 10.99.0.1 on bridge brc)
#    ├─ veth ─ netns a: bridge br0 (10.99.0.11) ─ tap of the source ferro-vmm
#    └─ veth ─ netns b: bridge br0 (10.99.0.12) ─ tap of the destination ferro-vmm
#
# The guest (10.99.0.2, an echo service on port 7) boots under ferro-vmm in netns a; the lab
# opens one TCP connection to it and gets an echo; ferro-vmm --incoming waits in netns b; the
# source is told to migrate over TCP from a to b; the same connection then echoes again, now
# served by the guest on b (the destination announces the guest's MAC, so brc learns where it
# went). Lines start with `G-` (guest) or `L-` (lab) for tests/tests/lab_migrate.rs.
set -u
trap '' PIPE
# iproute2's ip (for netns), packed by the caller into /usr/local/bin. Called by its path: busybox's
# sh runs its own applets before looking at PATH.
IP=/usr/local/bin/ip
RD="--initrd /guest/initramfs.cpio.gz"
CL="console=ttyS0 quiet panic=-1 probe.exit=shell"
GUEST=10.99.0.2
MAC=52:54:fe:99:00:02

waitfor() {
    n=0
    while ! tr -d '\r' < "$1" 2>/dev/null | grep -q "$2"; do
        sleep 1
        n=$((n + 1))
        [ "$n" -ge "$3" ] && return 1
    done
    return 0
}

$IP link add brc type bridge
$IP addr add 10.99.0.1/24 dev brc
$IP link set brc up
n=11
for h in a b; do
    $IP netns add $h
    $IP link add "v$h" type veth peer name "p$h"
    $IP link set "v$h" master brc
    $IP link set "v$h" up
    $IP link set "p$h" netns $h
    $IP netns exec $h $IP link set lo up
    $IP netns exec $h $IP link add br0 type bridge
    $IP netns exec $h $IP link set "p$h" master br0
    $IP netns exec $h $IP link set "p$h" up
    $IP netns exec $h $IP addr add "10.99.0.$n/24" dev br0
    $IP netns exec $h $IP link set br0 up
    n=$((n + 1))
done
echo "L-NETNS $($IP netns list | tr '\n' ' ')"

rm -f /tmp/ina /tmp/inb
mkfifo /tmp/ina /tmp/inb
# shellcheck disable=SC2086  # word splitting of $RD is wanted
$IP netns exec a ferro-vmm --kernel /guest/bzImage $RD --cmdline "$CL" --cpus 2 --memory 256 \
    --net "tap=fvmig0,mac=$MAC,bridge=br0" --control /tmp/a.sock \
    < /tmp/ina > /tmp/ca.txt 2> /tmp/ea.txt &
apid=$!
exec 3> /tmp/ina
$IP netns exec b ferro-vmm --incoming tcp:10.99.0.12:4444 --control /tmp/b.sock \
    < /tmp/inb > /tmp/cb.txt 2> /tmp/eb.txt &
bpid=$!
exec 4> /tmp/inb

if waitfor /tmp/ca.txt 'linux-probe:' 120; then
    sleep 2
    cat >&3 <<EOF
ip link set eth0 up
ip addr add $GUEST/24 dev eth0
nc -l -p 7 -e cat &
sleep 1
echo G-READY
EOF
else
    echo "L-NO-LINUX"
    lab-threads "$apid"
fi

if waitfor /tmp/ca.txt '^G-READY' 60 && ping -c 2 -W 3 "$GUEST" > /dev/null 2>&1; then
    echo "L-PING-BEFORE ok"
    # One TCP connection for the whole test: nc reads lines from a fifo held open by fd 5.
    rm -f /tmp/tcp-in
    mkfifo /tmp/tcp-in
    nc "$GUEST" 7 < /tmp/tcp-in > /tmp/tcp-out 2>&1 &
    ncpid=$!
    exec 5> /tmp/tcp-in
    echo "before-migration" >&5
    if waitfor /tmp/tcp-out 'before-migration' 20; then echo "L-ECHO-BEFORE ok"; fi

    t0=$(date +%s)
    echo "L-MIGRATE $(vmm-ctl /tmp/a.sock '{"cmd":"migrate","to":"10.99.0.12:4444","downtime_ms":50}')"
    echo "L-MIGRATE-SECS $(($(date +%s) - t0))"
    n=0
    while kill -0 "$apid" 2>/dev/null && [ "$n" -lt 30 ]; do sleep 1; n=$((n + 1)); done
    wait "$apid"
    echo "L-SOURCE rc=$?"
    echo "L-DEST-STATUS $(vmm-ctl /tmp/b.sock '{"cmd":"status"}')"

    echo "after-migration" >&5
    if waitfor /tmp/tcp-out 'after-migration' 30; then echo "L-ECHO-AFTER ok"; fi
    echo "L-TAP-B rx=$($IP netns exec b cat /sys/class/net/fvmig0/statistics/rx_packets) tx=$($IP netns exec b cat /sys/class/net/fvmig0/statistics/tx_packets)"
    if ping -c 2 -W 3 "$GUEST" > /dev/null 2>&1; then echo "L-PING-AFTER ok"; else echo "L-PING-AFTER fail"; fi
    echo 'echo G-DEV $(grep eth0 /proc/net/dev)' >&4
    echo 'echo G-IRQ1 $(grep virtio /proc/interrupts | tr -s " " | tr "\n" "|")' >&4
    echo 'ping -c 2 -W 2 10.99.0.1 > /dev/null 2>&1; echo G-GPING rc=$?' >&4
    sleep 6
    echo 'echo G-IRQ2 $(grep virtio /proc/interrupts | tr -s " " | tr "\n" "|")' >&4
    echo 'echo G-DEV2 $(grep eth0 /proc/net/dev)' >&4
    sleep 2
    echo "L-TAP-B2 rx=$($IP netns exec b cat /sys/class/net/fvmig0/statistics/rx_packets) tx=$($IP netns exec b cat /sys/class/net/fvmig0/statistics/tx_packets)"
    exec 5>&-
    kill "$ncpid" 2>/dev/null
    echo "L-TCP-OUT $(tr '\n' ' ' < /tmp/tcp-out)"
    # The guest answers from b: its console is b's now.
    echo 'echo G-ON-DEST $(cat /proc/uptime)' >&4
    waitfor /tmp/cb.txt 'G-ON-DEST [0-9]' 20 || echo "L-NO-CONSOLE-ON-DEST"
else
    echo "L-NOT-READY"
fi

echo 'poweroff -f' >&4
n=0
while kill -0 "$bpid" 2>/dev/null && [ "$n" -lt 30 ]; do sleep 1; n=$((n + 1)); done
kill -9 "$bpid" "$apid" 2>/dev/null
wait "$bpid"
echo "L-DEST rc=$?"
exec 3>&- 4>&-
tr -d '\r' < /tmp/ca.txt | grep -v 'echo ' | grep -o 'G-[A-Z-]*.*' | sed 's/^/A: /'
tr -d '\r' < /tmp/cb.txt | grep -v 'echo ' | grep -o 'G-[A-Z-]*.*' | sed 's/^/B: /'
echo "--- stderr a"; cat /tmp/ea.txt
echo "--- stderr b"; cat /tmp/eb.txt
if ! grep -q 'G-ON-DEST [0-9]' /tmp/cb.txt; then
    echo "--- console a"; tr -d '\r' < /tmp/ca.txt | tail -30
    echo "--- console b"; tr -d '\r' < /tmp/cb.txt | tail -30
fi
echo "lab-migrate: done"
