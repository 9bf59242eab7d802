# Runs inside the KVM lab (busybox sh): boots the Debian test guest under ferro-vmm with
# `--vsock cid=3,uds=/tmp/v.sock`; the guest's initramfs gets /bin/vsock-tool appended
# (/lab/vs.cpio, built from tests/lab/vsock/vsock-tool.c). Host to guest: the guest listens on
# port 1234 and echoes; the lab connects through /tmp/v.sock with `CONNECT 1234`. Guest to
# host: the lab listens on /tmp/v.sock_5000; the guest connects to CID 2 port 5000. Output
# lines start with `G-`/`VS-` (guest) or `L-` (lab) for tests/tests/lab_virtio_vsock.rs.
set -u
# A write to the console fifo after the VMM is gone must fail, not kill the script.
trap '' PIPE
cd /lab
# Linux looks for the next archive of an initramfs only at a 4-byte-aligned offset: pad the
# compressed base archive with zeros to a multiple of 4 before appending ours.
cp /guest/initramfs.cpio.gz /tmp/rd.img
pad=$(( (4 - $(wc -c < /tmp/rd.img) % 4) % 4 ))
[ "$pad" -gt 0 ] && head -c "$pad" /dev/zero >> /tmp/rd.img
cat /lab/vs.cpio >> /tmp/rd.img
CL="console=ttyS0 quiet panic=-1 probe.exit=shell"

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
ferro-vmm --kernel /guest/bzImage --initrd /tmp/rd.img --cmdline "$CL" --cpus 2 --memory 256 \
    --vsock cid=3,uds=/tmp/v.sock < /tmp/in > /tmp/c.txt 2> /tmp/e.txt &
pid=$!
exec 3> /tmp/in
if waitfor /tmp/c.txt 'linux-probe:' 90; then
    sleep 2
    echo 'echo "G-VSOCK-DEV $(ls /dev/vsock) $(cat /sys/bus/virtio/devices/*/device | tr "\n" " ")"' >&3
    echo 'vsock-tool listen 1234 &' >&3
else
    echo "L-NO-LINUX"
fi
if waitfor /tmp/c.txt 'VS-LISTENING' 30; then
    timeout 20 vsock-tool uds-connect /tmp/v.sock 1234 hello-from-the-lab | sed 's/^/L-/'
    waitfor /tmp/c.txt "VS-ECHOED" 20 || echo "L-NO-ECHOED"
else
    echo "L-NO-LISTENER"
fi
timeout 30 vsock-tool uds-serve /tmp/v.sock_5000 > /tmp/serve.txt 2>&1 &
srv=$!
# On a loaded host the listener can take a while: ask the guest to connect only once it exists.
n=0
while [ ! -S /tmp/v.sock_5000 ] && [ "$n" -lt 20 ]; do sleep 1; n=$((n + 1)); done
echo 'vsock-tool connect 2 5000 hello-from-the-guest' >&3
waitfor /tmp/c.txt 'VS-REPLY' 20 || echo "L-NO-REPLY"
wait "$srv"
sed 's/^/L-/' /tmp/serve.txt
echo 'poweroff -f' >&3
n=0
while kill -0 "$pid" 2>/dev/null && [ "$n" -lt 30 ]; do sleep 1; n=$((n + 1)); done
kill -9 "$pid" 2>/dev/null
wait "$pid"
echo "L-VMM rc=$?"
tr -d '\r' < /tmp/c.txt | grep -v 'echo \|vsock-tool ' | grep -o '\(G\|VS\)-[A-Z0-9-]* .*'
echo "--- stderr"; cat /tmp/e.txt
if ! grep -q 'VS-REPLY' /tmp/c.txt; then
    echo "--- console tail"; tr -d '\r' < /tmp/c.txt | tail -60
fi
echo "lab-virtio-vsock: done"
