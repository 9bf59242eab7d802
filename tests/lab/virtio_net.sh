# Runs inside the KVM lab (busybox sh): boots the Debian test guest under ferro-vmm with a NIC
# on a tap the VMM creates (`--net auto`) and a balloon, types commands into the guest's shell
# on COM1 (address on eth0, two TCP services with busybox nc: an echo on port 7 and a sink on
# port 9 that prints the MD5 of what it received), then, from the lab, addresses the tap,
# pings the guest and talks to both services. Output lines start with `G-` (from the guest)
# or `L-` (from the lab) for tests/tests/lab_virtio_net.rs.
set -u
cd /lab
RD="--initrd /guest/initramfs.cpio.gz"
CL="console=ttyS0 quiet panic=-1 probe.exit=shell"
GUEST=169.254.50.2
HOST=169.254.50.1

# waitfor FILE PATTERN SECS: until PATTERN appears in FILE.
waitfor() {
    n=0
    while ! tr -d '\r' < "$1" 2>/dev/null | grep -q "$2"; do
        sleep 1
        n=$((n + 1))
        [ "$n" -ge "$3" ] && return 1
    done
    return 0
}

rm -f /tmp/in /tmp/c.txt /tmp/e.txt
mkfifo /tmp/in
# shellcheck disable=SC2086  # word splitting of $RD is wanted
ferro-vmm --kernel /guest/bzImage $RD --cmdline "$CL" --cpus 2 --memory 256 \
    --net auto --balloon target=32 < /tmp/in > /tmp/c.txt 2> /tmp/e.txt &
pid=$!
exec 3> /tmp/in
if ! waitfor /tmp/e.txt 'net0 tap=' 30; then
    echo "L-NO-TAP"
fi
tap=$(sed -n 's/.*net0 tap=\([^ ]*\).*/\1/p' /tmp/e.txt | head -1)
echo "L-TAP $tap"
if waitfor /tmp/c.txt 'linux-probe:' 90; then
    sleep 2
    cat >&3 <<EOF
ip link set eth0 up
ip addr add $GUEST/16 dev eth0
for d in /sys/bus/virtio/devices/*; do echo "G-VIRTIO \$(cat \$d/device) \$(cat \$d/features)"; done
nc -l -p 7 -e cat &
(nc -l -p 9 | md5sum | sed 's/^/G-MD5 /') &
sleep 1
echo G-READY
EOF
else
    echo "L-NO-LINUX"
fi
if waitfor /tmp/c.txt '^G-READY' 60; then
    ip addr add "$HOST/16" dev "$tap"
    ip link set "$tap" up
    if ping -c 3 -W 2 "$GUEST" > /tmp/ping.txt 2>&1; then
        echo "L-PING ok $(grep -c 'bytes from' /tmp/ping.txt)"
    else
        echo "L-PING fail"; cat /tmp/ping.txt
    fi
    echo "L-ECHO $(echo hello-over-tcp | timeout 10 nc -w 2 "$GUEST" 7)"
    dd if=/dev/urandom of=/tmp/blob bs=1k count=4096 2>/dev/null
    echo "L-MD5 $(md5sum < /tmp/blob)"
    start=$(date +%s)
    timeout 30 nc -w 2 "$GUEST" 9 < /tmp/blob
    echo "L-SENT rc=$? secs=$(($(date +%s) - start))"
    waitfor /tmp/c.txt 'G-MD5 [0-9a-f]' 20 || echo "L-NO-MD5"
    echo "L-RX $(cat "/sys/class/net/$tap/statistics/rx_bytes") L-TX $(cat "/sys/class/net/$tap/statistics/tx_bytes")"
fi
echo "L-RSS $(grep VmRSS "/proc/$pid/status")"
echo 'poweroff -f' >&3
n=0
while kill -0 "$pid" 2>/dev/null && [ "$n" -lt 30 ]; do sleep 1; n=$((n + 1)); done
kill -9 "$pid" 2>/dev/null
wait "$pid"
echo "L-VMM rc=$?"
# Background jobs' output may follow a prompt or a terminal query: keep from G- on.
tr -d '\r' < /tmp/c.txt | grep -v 'echo \|sed ' | grep -o 'G-[A-Z0-9]* .*'
echo "--- stderr"; cat /tmp/e.txt
if ! grep -q 'G-MD5 [0-9a-f]' /tmp/c.txt; then
    echo "--- console tail"; tr -d '\r' < /tmp/c.txt | tail -60
fi
echo "lab-virtio-net: done"
