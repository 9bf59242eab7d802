# Runs inside the KVM lab (busybox sh): boots the Debian test guest under ferro-vmm in every
# way the VMM-core issue names, and prints one `case=... rc=... linux-probe: ...` line per boot
# for tests/tests/lab_linux.rs to check.
boot() {
    name=$1; shift
    # A bound on each boot: a nested guest that hangs fails its case, not the whole lab run.
    timeout 180 ferro-vmm "$@" > /tmp/console.txt 2> /tmp/stderr.txt
    rc=$?
    probe=$(grep -m1 '^linux-probe:' /tmp/console.txt | tr -d '\r')
    panic=$(grep -c 'Kernel panic' /tmp/console.txt)
    echo "case=$name rc=$rc panic_lines=$panic $probe"
    if [ "$rc" != 0 ] && [ "$name" != panic ]; then
        echo "--- console of $name"; tail -n 40 /tmp/console.txt; cat /tmp/stderr.txt
    fi
}
RD="--initrd /guest/initramfs.cpio.gz"
CL="console=ttyS0 quiet panic=-1"
boot vmlinux-pvh-1cpu     --kernel /guest/vmlinux $RD --cmdline "$CL probe.exit=poweroff" --cpus 1 --memory 256
boot vmlinux-linux64-1cpu --kernel /guest/vmlinux --linux-boot $RD --cmdline "$CL probe.exit=poweroff" --cpus 1 --memory 256
boot vmlinux-pvh-4cpu     --kernel /guest/vmlinux $RD --cmdline "$CL probe.exit=poweroff" --cpus 4 --memory 512
boot bzimage-1cpu         --kernel /guest/bzImage $RD --cmdline "$CL probe.exit=poweroff" --cpus 1 --memory 256
boot bzimage-4cpu         --kernel /guest/bzImage $RD --cmdline "$CL probe.exit=poweroff" --cpus 4 --memory 1G
boot reboot               --kernel /guest/bzImage $RD --cmdline "$CL probe.exit=reboot" --cpus 2 --memory 256
boot panic                --kernel /guest/bzImage $RD --cmdline "$CL probe.exit=panic" --cpus 1 --memory 256
echo "lab-cases: done"
