# Runs inside the KVM lab (busybox sh): boots the Debian test guest under ferro-vmm with three
# disks — a raw image (/dev/vda), a qcow2 image (/dev/vdb) and a read-only raw image
# (/dev/vdc) — and types commands into its shell on COM1. Boot 1 writes a random pattern to
# vda and vdb, syncs and powers off; boot 2 reads both back; boot 3 writes a second pattern to
# vdb with fsync, and the VMM is killed with SIGKILL as soon as the guest reports it; boot 4
# reads it back. (On a raw block device `sync` writes the page cache out but sends no FLUSH;
# fsync does. Boot 1 relies on the VMM flushing its disks when the guest powers off.) `qemu-img check` judges the qcow2 after each boot. Output lines start with
# `G-` (from the guest) or `L-` (from the lab) for tests/tests/lab_virtio_blk.rs.
set -u
cd /lab
RD="--initrd /guest/initramfs.cpio.gz"
CL="console=ttyS0 quiet panic=-1 probe.exit=shell"

dd if=/dev/zero of=/lab/raw.img bs=1M count=16 2>/dev/null
qemu-img create -q -f qcow2 /lab/q.qcow2 32M
dd if=/dev/urandom of=/lab/ro.img bs=1M count=4 2>/dev/null
echo "L-RO-BEFORE $(md5sum < /lab/ro.img)"
DISKS="--disk path=/lab/raw.img,format=raw,serial=FERRO-RAW --disk path=/lab/q.qcow2,format=qcow2 --disk path=/lab/ro.img,format=raw,readonly=on"

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

# boot NAME CMDFILE [kill]: boots the guest, types CMDFILE once its shell is up, and waits
# for the VMM (or SIGKILLs it once the guest prints G-SYNCED, with `kill`).
boot() {
    name=$1 cmds=$2 mode=${3:-}
    rm -f /tmp/in "/tmp/c-$name.txt"
    mkfifo /tmp/in
    # shellcheck disable=SC2086  # word splitting of $RD $DISKS is wanted
    ferro-vmm --kernel /guest/bzImage $RD --cmdline "$CL" --cpus 2 --memory 256 $DISKS \
        < /tmp/in > "/tmp/c-$name.txt" 2> "/tmp/e-$name.txt" &
    pid=$!
    exec 3> /tmp/in
    if waitfor "/tmp/c-$name.txt" 'linux-probe:' 90; then
        sleep 2
        cat "$cmds" >&3
    else
        echo "L-$name no linux-probe line"
    fi
    killed=0
    if [ "$mode" = kill ]; then
        if waitfor "/tmp/c-$name.txt" '^G-SYNCED' 90; then
            kill -9 "$pid"
            echo "L-$name killed"
            killed=1
        fi
    else
        # A guest that has not powered off by then is stuck: its VMM's threads show where.
        ( sleep 120; kill -0 "$pid" 2>/dev/null && lab-threads "$pid" > "/tmp/t-$name.txt"; kill -9 "$pid" 2>/dev/null ) &
    fi
    wait "$pid"
    echo "L-$name rc=$?"
    exec 3>&-
    tr -d '\r' < "/tmp/c-$name.txt" | grep -E '^G-' | grep -v 'echo '
    tr -d '\r' < "/tmp/c-$name.txt" | grep -iE 'virtio_blk|vd[a-c]|I/O error|blk_update' | grep -v 'G-\|echo ' | head -20
    if [ "$killed" = 0 ] && ! tr -d '\r' < "/tmp/c-$name.txt" | grep -q '^G-END'; then
        echo "--- console tail of $name"; tr -d '\r' < "/tmp/c-$name.txt" | tail -40
        echo "--- stderr of $name"; cat "/tmp/e-$name.txt"
        [ -s "/tmp/t-$name.txt" ] && { echo "--- threads of $name's VMM before the kill"; cat "/tmp/t-$name.txt"; }
    fi
    echo "L-$name qcow2-check: $(qemu-img check /lab/q.qcow2 2>&1 | tr '\n' ' ')"
}

cat > /tmp/write.txt <<'EOF'
echo G-BEGIN
for d in vda vdb vdc; do echo "G-DISK $d size=$(cat /sys/block/$d/size) ro=$(cat /sys/block/$d/ro) serial=$(cat /sys/block/$d/serial 2>/dev/null)"; done
dd if=/dev/urandom of=/tmp/pat bs=64k count=40 2>/dev/null
echo "G-PAT $(md5sum < /tmp/pat)"
dd if=/tmp/pat of=/dev/vda bs=64k 2>/dev/null; echo "G-W-VDA rc=$?"
dd if=/tmp/pat of=/dev/vdb bs=64k seek=5 2>/dev/null; echo "G-W-VDB rc=$?"
sync; echo "G-SYNC rc=$?"
dd if=/tmp/pat of=/dev/vdc bs=64k count=1 conv=fsync 2>/dev/null; echo "G-W-VDC rc=$?"
echo "G-R-VDC-ONLINE $(dd if=/dev/vdc bs=64k count=64 2>/dev/null | md5sum)"
echo G-END
poweroff -f
EOF

cat > /tmp/read.txt <<'EOF'
echo G-BEGIN
echo "G-R-VDA $(dd if=/dev/vda bs=64k count=40 2>/dev/null | md5sum)"
echo "G-R-VDB $(dd if=/dev/vdb bs=64k skip=5 count=40 2>/dev/null | md5sum)"
echo G-END
poweroff -f
EOF

cat > /tmp/kill.txt <<'EOF'
echo G-BEGIN
dd if=/dev/urandom of=/tmp/pat2 bs=64k count=48 2>/dev/null
echo "G-PAT2 $(md5sum < /tmp/pat2)"
dd if=/tmp/pat2 of=/dev/vdb bs=64k seek=100 conv=fsync 2>/dev/null; echo "G-W2-VDB rc=$?"
echo G-SYNCED
sleep 30
EOF

cat > /tmp/read2.txt <<'EOF'
echo G-BEGIN
echo "G-R2-VDB $(dd if=/dev/vdb bs=64k skip=100 count=48 2>/dev/null | md5sum)"
echo G-END
poweroff -f
EOF

boot write /tmp/write.txt
boot read /tmp/read.txt
boot kill /tmp/kill.txt kill
boot read2 /tmp/read2.txt
echo "L-RO-AFTER $(md5sum < /lab/ro.img)"
echo "lab-virtio-blk: done"
