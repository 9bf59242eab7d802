# Runs inside the KVM lab (busybox sh): boots the Debian template (systemd, root on virtio-blk)
# under ferro-vmm from a qcow2 overlay (/lab/vm.qcow2) on the read-only base (/lab/debian.qcow2),
# with a NIC on a tap. Boot 1: wait for `ferro-guest: ready`, reach the guest's TCP echo (port
# 7) and HTTP (port 80) services and ping it from the lab, write a file, sync, power off.
# Boot 2: the file is there. The base's MD5 is taken before and after. Output lines start with
# `L-` (lab) or `G-` (guest) for tests/tests/lab_debian.rs.
set -u
trap '' PIPE
cd /lab
IP=169.254.10.2
CL="console=ttyS0 root=/dev/vda ferro.ip=$IP/16 quiet"
tunctl -t tap0 >/dev/null && ip addr add 169.254.10.1/16 dev tap0 && ip link set tap0 up
chmod 0444 /lab/debian.qcow2
echo "L-BASE-MD5-BEFORE $(md5sum /lab/debian.qcow2 | cut -d' ' -f1)"

waitfor() {   # waitfor FILE PATTERN SECONDS
    n=0
    while ! tr -d '\r' < "$1" 2>/dev/null | grep -q "$2"; do
        kill -0 "$pid" 2>/dev/null || return 1
        sleep 1
        n=$((n + 1))
        [ "$n" -ge "$3" ] && return 1
    done
    return 0
}

# boot N: starts ferro-vmm with its console in /tmp/cN.txt and input from fd 3.
boot() {
    rm -f /tmp/in
    mkfifo /tmp/in
    # Opened read-write first, so neither this open nor ferro-vmm's can block on the other.
    exec 3<> /tmp/in
    ferro-vmm --kernel /guest/bzImage --initrd /lab/debian-initrd.cpio.gz --cmdline "$CL" \
        --disk path=/lab/vm.qcow2 --net tap=tap0 --cpus 2 --memory 512 \
        < /tmp/in 3>&- > "/tmp/c$1.txt" 2> "/tmp/e$1.txt" &
    pid=$!
    t0=$(cut -d' ' -f1 /proc/uptime)
    echo "L-BOOT$1 started"
}
# stop N: power off from the guest's shell and report the VMM's status.
stop() {
    echo 'poweroff' >&3
    n=0
    while kill -0 "$pid" 2>/dev/null && [ "$n" -lt 180 ]; do sleep 1; n=$((n + 1)); done
    # A guest that did not power off: where each of the VMM's threads is, for the report.
    kill -0 "$pid" 2>/dev/null && lab-threads "$pid" > "/tmp/t$1.txt"
    kill -9 "$pid" 2>/dev/null
    wait "$pid"
    rc=$?
    echo "L-VMM$1 rc=$rc"
    [ "$rc" = 0 ] || echo "$1" >> /tmp/bad
    exec 3>&-
}
# ask N CMD PATTERN: types CMD into boot N's shell until PATTERN shows on its console, again every
# 20 s, for at most 120 s. "ferro-guest: ready" does not wait for the autologin shell: a line typed
# while login still sets the terminal up can be flushed, so the commands here are safe to repeat.
ask() {
    tries=0
    while [ "$tries" -lt 6 ]; do
        echo "$2" >&3
        waitfor "/tmp/c$1.txt" "$3" 20 && return 0
        tries=$((tries + 1))
    done
    return 1
}
elapsed() { awk -v s="$t0" '{printf "%.1f", $1 - s}' /proc/uptime; }

: > /tmp/bad
boot 1
if waitfor /tmp/c1.txt 'ferro-guest: ready' 240; then
    echo "L-READY1 $(elapsed) s"
    echo "L-ECHO $(echo hello-ferro | timeout 20 nc $IP 7)"
    echo "L-HTTP $(printf 'GET /t HTTP/1.0\r\n\r\n' | timeout 20 nc $IP 80 | tr -d '\r' | tail -n 1)"
    if ping -c 2 -W 5 $IP >/dev/null 2>&1; then echo "L-PING ok"; else echo "L-PING failed"; fi
    # The pattern: anywhere on a line (bash may put terminal control bytes first), but not the
    # echoed command, where `$(` follows the tag.
    ask 1 'echo ferro-persist-$((6*7)) > /root/persist && sync && echo "G-WROTE $(cat /root/persist)"' \
        'G-WROTE [^$]' || { echo "L-NO-WRITE"; echo 1 >> /tmp/bad; }
else
    echo "L-NO-READY1"
    lab-threads "$pid"
fi
stop 1

boot 2
if waitfor /tmp/c2.txt 'ferro-guest: ready' 240; then
    echo "L-READY2 $(elapsed) s"
    ask 2 'echo "G-READ $(cat /root/persist 2>&1)"' 'G-READ [^$]' ||
        { echo "L-NO-READ"; echo 2 >> /tmp/bad; }
else
    echo "L-NO-READY2"
    lab-threads "$pid"
fi
stop 2
echo "L-BASE-MD5-AFTER $(md5sum /lab/debian.qcow2 | cut -d' ' -f1)"
for n in 1 2; do
    tr -d '\r' < "/tmp/c$n.txt" | grep -v 'echo ' | grep -o 'G-[A-Z]* .*'
done
for n in 1 2; do
    # A boot that never got ready, lost its shell or did not power off: its console and threads.
    if ! tr -d '\r' < "/tmp/c$n.txt" | grep -q 'ferro-guest: ready' || grep -qx "$n" /tmp/bad; then
        echo "--- console $n tail"; tr -d '\r' < "/tmp/c$n.txt" | tail -60; cat "/tmp/e$n.txt"
        [ -s "/tmp/t$n.txt" ] && { echo "--- threads of VMM $n before the kill"; cat "/tmp/t$n.txt"; }
    fi
done
echo "lab-debian-disk: done"
