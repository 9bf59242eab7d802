# Runs inside the KVM lab (busybox sh + iproute2's ip + the ferro CLI): two hosts' daemons,
# each in its own network namespace, live-migrate a running Debian-kernel guest while the lab
# holds a TCP connection to it.
#
#   lab (client, 10.99.0.254 on bridge brc)
#    ├─ veth ─ netns a: bridge br0 (10.99.0.252) ─ ferro daemon A (tcp 10.99.0.252:7000)
#    └─ veth ─ netns b: bridge br0 (10.99.0.253) ─ ferro daemon B (tcp 10.99.0.253:7000)
#
# A VM is created on A with a NIC on A's bridge (the daemon gives it an address from the
# subnet, passed as ferro.ip=, and the guest serves TCP echo on port 7); the lab connects to
# it, then `ferro vm migrate web --to http://10.99.0.253:7000`; afterwards B runs the VM, A no
# longer has it, and the same TCP connection echoes again. Lines start with `M-`.
set -u
trap '' PIPE
IP=/usr/local/bin/ip    # busybox's sh runs its own applets before PATH: call iproute2 by path
export PATH=/usr/local/bin:$PATH    # for the daemons (they run `ip` through PATH)
say() { echo "M-$*"; }
dump() {
    for h in a b; do
        echo "--- daemon $h"; tail -30 "/tmp/daemon-$h.log"
    done
}
fail() { say "FAIL $*"; dump; exit 1; }
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
$IP addr add 10.99.0.254/24 dev brc
$IP link set brc up
n=252
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
    mkdir -p "/tmp/data-$h"
    n=$((n + 1))
done
echo "lab-migration-token" > /tmp/token
$IP netns exec a ferro daemon --data-dir /tmp/data-a --listen tcp:10.99.0.252:7000 \
    --token-file /tmp/token --bridge br0 --bridge-address 10.99.0.252/24 --vmm /bin/ferro-vmm \
    > /tmp/daemon-a.log 2>&1 &
$IP netns exec b ferro daemon --data-dir /tmp/data-b --listen tcp:10.99.0.253:7000 \
    --token-file /tmp/token --bridge br0 --bridge-address 10.99.0.253/24 --vmm /bin/ferro-vmm \
    > /tmp/daemon-b.log 2>&1 &
A="--host http://10.99.0.252:7000 --token-file /tmp/token"
B="--host http://10.99.0.253:7000 --token-file /tmp/token"
n=0
# shellcheck disable=SC2086  # $A and $B are word lists
until ferro $A vm list > /dev/null 2>&1 && ferro $B vm list > /dev/null 2>&1; do
    sleep 0.5; n=$((n + 1)); [ "$n" -ge 60 ] && fail "the daemons did not start"
done
say "daemons up"

# shellcheck disable=SC2086
ferro $A vm create web --kernel /guest/bzImage --initrd /guest/initramfs.cpio.gz \
    --cmdline "console=ttyS0 quiet panic=-1 probe.exit=wait probe.echo=7" \
    --cpus 2 --memory 256 --net auto || fail "vm create"
# shellcheck disable=SC2086
ferro $A vm start web || fail "vm start"
# shellcheck disable=SC2086
addr=$(ferro $A vm show web --json | tr ',{}' '\n\n\n' | grep '"address"' | head -n 1 | cut -d'"' -f4 | cut -d/ -f1)
[ -n "$addr" ] || fail "no address"
say "address $addr"
n=0
# shellcheck disable=SC2086
until ferro $A vm log web 2>/dev/null | grep -q "linux-probe: eth0"; do
    sleep 1; n=$((n + 1)); [ "$n" -ge 120 ] && fail "the guest did not come up"
done
ping -c 2 -W 3 "$addr" > /dev/null 2>&1 && say "ping-before ok"

rm -f /tmp/tcp-in
mkfifo /tmp/tcp-in
nc "$addr" 7 < /tmp/tcp-in > /tmp/tcp-out 2>&1 &
ncpid=$!
exec 5> /tmp/tcp-in
echo "before-migration" >&5
waitfor /tmp/tcp-out 'before-migration' 20 && say "echo-before ok"

# shellcheck disable=SC2086
ferro $A vm migrate web --to http://10.99.0.253:7000 > /tmp/migrate.txt 2>&1
say "migrate rc=$?"
tr '\n' ' ' < /tmp/migrate.txt | sed 's/^/M-migrate-output /'; echo
# shellcheck disable=SC2086
say "a-has $(ferro $A vm list --json | tr ',{}' '\n\n\n' | grep -c '"name"')"
# shellcheck disable=SC2086
say "b-state $(ferro $B vm show web --json | tr ',{}' '\n\n\n' | grep '"state"' | head -n 1 | cut -d'"' -f4)"

echo "after-migration" >&5
waitfor /tmp/tcp-out 'after-migration' 30 && say "echo-after ok"
exec 5>&-
kill "$ncpid" 2>/dev/null
say "tcp-out $(tr '\n' ' ' < /tmp/tcp-out)"
ping -c 2 -W 3 "$addr" > /dev/null 2>&1 && say "ping-after ok"

# shellcheck disable=SC2086
ferro $B vm stop web --force > /dev/null 2>&1
# shellcheck disable=SC2086
say "b-after-stop $(ferro $B vm show web --json | tr ',{}' '\n\n\n' | grep '"state"' | head -n 1 | cut -d'"' -f4)"
grep -q "echo-after\|after-migration" /tmp/tcp-out || dump
say "done"
