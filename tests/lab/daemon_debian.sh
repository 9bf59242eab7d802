# Runs inside the KVM lab (busybox sh): the whole host stack end to end. `ferro daemon` with its
# defaults (data in /var/lib/ferro, bridge ferrobr0 10.77.0.1/24); the Debian template root
# disk imported (`ferro image import`), made a template, and a VM created from it as a linked
# clone (qcow2 overlay) with a NIC on the daemon's bridge; it boots to `ferro-guest: ready`,
# the lab reaches its HTTP service at the address `ferro vm show` gives, then stops it with the
# ACPI power button. Used by scripts/demo.sh on hosts without hardware KVM and by
# tests/tests/lab_daemon.rs. Output lines start with `D-`.
set -u
trap '' PIPE
export FERRO_HOST=unix:/var/lib/ferro/ferro.sock
# iproute2's ip and qemu-img, packed by the caller into /usr/local/bin, before busybox's.
export PATH=/usr/local/bin:$PATH
t0=$(cut -d' ' -f1 /proc/uptime)
elapsed() { awk -v s="$t0" '{printf "%.1f", $1 - s}' /proc/uptime; }
say() { echo "D-$*"; }
fail() { say "FAIL $*"; ferro vm log web 2>&1 | tail -40; cat /tmp/daemon.log; exit 1; }

mkdir -p /var/lib/ferro
ferro daemon --vmm /bin/ferro-vmm > /tmp/daemon.log 2>&1 &
n=0
while [ ! -S /var/lib/ferro/ferro.sock ]; do
    sleep 0.2; n=$((n + 1)); [ "$n" -ge 100 ] && fail "the daemon did not start"
done
say "daemon up $(elapsed) s"
ferro image import /lab/debian.qcow2 --name debian || fail "image import"
ferro template create debian --from-image debian || fail "template create"
say "template ready $(elapsed) s"
md5sum /var/lib/ferro/images/*.qcow2 > /tmp/base.md5
t1=$(cut -d' ' -f1 /proc/uptime)
ferro vm create web --template debian --kernel /guest/bzImage \
    --initrd /lab/debian-initrd.cpio.gz --cmdline "console=ttyS0 root=/dev/vda quiet" \
    --cpus 2 --memory 512 --net auto --restart on-failure || fail "vm create"
ferro vm start web || fail "vm start"
ferro vm show web
addr=$(ferro vm show web --json | tr ',{}' '\n\n\n' | grep '"address"' | head -n 1 | cut -d'"' -f4 | cut -d/ -f1)
[ -n "$addr" ] || fail "no address in ferro vm show"
say "address $addr"
n=0
while ! ferro vm log web 2>/dev/null | grep -q 'ferro-guest: ready'; do
    sleep 1; n=$((n + 1)); [ "$n" -ge 300 ] && fail "no 'ferro-guest: ready'"
done
say "ready $(awk -v s="$t1" '{printf "%.1f", $1 - s}' /proc/uptime) s after vm create"
http=$(printf 'GET /demo HTTP/1.0\r\n\r\n' | timeout 20 nc "$addr" 80 | tr -d '\r' | tail -n 1)
say "http $http"
say "console: ferro console web (Ctrl-] detaches); log: ferro vm log web; address: $addr"
ferro vm stop web --timeout 120 || fail "vm stop"
say "state $(ferro vm show web --json | tr ',{}' '\n\n\n' | grep '"state"' | head -n 1 | cut -d'"' -f4)"
if md5sum -c /tmp/base.md5 >/dev/null 2>&1; then say "base unchanged"; else say "base changed"; fi
say "done $(elapsed) s"
