#!/bin/sh
# Boot the Debian template in the KVM lab and check it: "ferro-guest: ready", the TCP echo and
# HTTP services over a tap (static address from ferro.ip=), then a clean power-off.
#   VMM=qemu (default): nested QEMU/KVM q35 with a second NIC whose address comes from a DHCP
#                       server on the lab side; power-off by the ACPI power button (system_powerdown).
#   VMM=ferro-vmm:      one NIC; power-off by `poweroff` typed on the serial console.
# From the repo (busybox sh inside the lab; the files land where the paths below expect them):
#   lab/lab.sh run --with-qemu --add build/debian/debian.qcow2:/lab/debian.qcow2 \
#     --add build/debian/debian-initrd.cpio.gz:/lab/debian-initrd.cpio.gz guest/debian/lab/boot.sh
#   (echo VMM=ferro-vmm; cat guest/debian/lab/boot.sh) | lab/lab.sh run \
#     --add target/release/ferro-vmm:/bin/ferro-vmm --add ...(same two files)... -
# Console lines are prefixed with the lab's uptime (a shell loop: busybox ts buffers into files).
set -u
VMM=${VMM:-qemu}
EXTRA=${EXTRA:-}          # more kernel parameters, e.g. quiet
CMDLINE="console=ttyS0 root=/dev/vda ferro.ip=169.254.10.2/16 $EXTRA"
now() { cut -d' ' -f1 /proc/uptime; }
since() { awk -v s="$1" '{printf "%.1f", $1 - s}' /proc/uptime; }
waitfor() {   # waitfor PATTERN SECONDS: 0 once the console has PATTERN
    n=$(($2 * 2))
    while ! grep -q "$1" /tmp/console.log; do
        [ -e /tmp/vmm.done ] && return 1
        n=$((n - 1)); [ "$n" -le 0 ] && return 1
        sleep 0.5
    done
}

tunctl -t tap0 >/dev/null && ip addr add 169.254.10.1/16 dev tap0 && ip link set tap0 up
if [ "$VMM" = qemu ]; then
    tunctl -t tap1 >/dev/null && ip addr add 192.168.77.1/24 dev tap1 && ip link set tap1 up
    printf 'start 192.168.77.100\nend 192.168.77.110\ninterface tap1\nlease_file /tmp/leases\nopt subnet 255.255.255.0\n' > /tmp/udhcpd.conf
    touch /tmp/leases
    udhcpd -S /tmp/udhcpd.conf
fi
mkfifo /tmp/in
: > /tmp/console.log
exec 3<>/tmp/in           # the guest's serial input; read-write so opening never blocks
start=$(now)
(
    if [ "$VMM" = qemu ]; then
        qemu-system-x86_64 -accel kvm -cpu host -M q35 -m 512 -nodefaults -display none \
            -serial stdio -no-reboot -monitor tcp:127.0.0.1:4444,server,nowait \
            -kernel /guest/bzImage -initrd /lab/debian-initrd.cpio.gz -append "$CMDLINE" \
            -drive file=/lab/debian.qcow2,if=virtio \
            -netdev tap,id=n0,ifname=tap0,script=no,downscript=no -device virtio-net-pci,netdev=n0 \
            -netdev tap,id=n1,ifname=tap1,script=no,downscript=no -device virtio-net-pci,netdev=n1
    else
        ferro-vmm --kernel /guest/bzImage --initrd /lab/debian-initrd.cpio.gz --cmdline "$CMDLINE" \
            --disk path=/lab/debian.qcow2 --net tap=tap0 --memory 512
    fi <&3 2>&1 | while IFS= read -r l; do echo "$(now) $l"; done > /tmp/console.log
    echo finished > /tmp/vmm.done
) &
tail -f /tmp/console.log &
fail() { sleep 1; echo "TEST: FAIL: $*"; exit 1; }

waitfor 'ferro-guest: ready' 600 || fail "no 'ferro-guest: ready'"
echo "TEST: ready $(since "$start") s after $VMM started"
out=$(echo hello-ferro | timeout 10 nc 169.254.10.2 7)
echo "TEST: echo: $out"; [ "$out" = hello-ferro ] || fail "echo"
out=$(printf 'GET /t HTTP/1.0\r\n\r\n' | timeout 10 nc 169.254.10.2 80 | tail -n 1)
echo "TEST: http: $out"; case "$out" in "ferro-guest: ok "*) ;; *) fail "http" ;; esac
ping -c 2 -W 5 169.254.10.2 >/dev/null || fail "ping"
echo "TEST: ping ok"
# In the guest (autologin shell): the failed units, boot time, addresses, a write to the disk.
cat >&3 <<'CMDS'
systemctl --failed --no-legend; systemd-analyze; ip -br -4 addr; echo data >/root/f && sync && echo "write=$(cat /root/f)"; echo CMDS-$((6*7))
CMDS
waitfor 'CMDS-42' 120 || fail "guest shell"
if [ "$VMM" = qemu ]; then
    grep -q 'eth1 .*192\.168\.77\.' /tmp/console.log || fail "no DHCP address on eth1"
    echo "TEST: dhcp ok (eth1)"
    t=$(now); echo system_powerdown | timeout 3 nc 127.0.0.1 4444 >/dev/null; how="power button"
else
    t=$(now); printf 'poweroff\n' >&3; how="poweroff"
fi
n=240
while [ ! -e /tmp/vmm.done ]; do n=$((n - 1)); [ "$n" -le 0 ] && fail "no power-off"; sleep 0.5; done
grep -q 'reboot: Power down' /tmp/console.log || fail "the guest did not power down"
echo "TEST: $VMM exited $(since "$t") s after $how; PASS"
