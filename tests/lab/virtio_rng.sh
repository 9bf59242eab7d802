# Runs inside the KVM lab (busybox sh): boots the Debian test guest under ferro-vmm with
# --rng and a shell on the console, types commands into it (stdin is COM1), and prints what
# the guest saw, for tests/tests/lab_virtio.rs to check: the PCI functions (vendor:device),
# the hw_random backend, bytes from /dev/hwrng, and the MSI-X interrupt lines.
guest_cmds() {
    sleep 12
    echo 'echo G-BEGIN'
    echo 'for d in /sys/bus/pci/devices/*; do echo "G-PCI $(basename $d) $(cat $d/vendor):$(cat $d/device) driver=$(basename $(readlink $d/driver) 2>/dev/null)"; done'
    echo 'echo "G-RNG current=$(cat /sys/class/misc/hw_random/rng_current)"'
    echo 'echo "G-BYTES $(dd if=/dev/hwrng bs=32 count=1 2>/dev/null | od -An -tx1 | tr -d " \n")"'
    echo 'echo "G-BYTES2 $(dd if=/dev/hwrng bs=4096 count=4 2>/dev/null | wc -c)"'
    echo 'grep -i msi /proc/interrupts | sed "s/^/G-IRQ /"'
    echo 'grep -i -E "mmconfig|ecam|PCI0|virtio" /proc/iomem | sed "s/^/G-IOMEM /"'
    echo 'echo G-END'
    echo 'poweroff -f'
    sleep 30
}
RD="--initrd /guest/initramfs.cpio.gz"
CL="console=ttyS0 quiet panic=-1 probe.exit=shell"
guest_cmds | timeout 120 ferro-vmm --kernel /guest/bzImage $RD --cmdline "$CL" --cpus 2 --memory 256 --rng \
    > /tmp/console.txt 2> /tmp/stderr.txt
rc=$?
echo "virtio-rng rc=$rc"
tr -d '\r' < /tmp/console.txt | grep -E '^G-|PCI|pci|virtio|MMCONFIG|ECAM' | grep -v 'echo ' | head -80
echo "--- stderr"; cat /tmp/stderr.txt
if ! grep -q G-END /tmp/console.txt; then
    echo "--- console tail"; tr -d '\r' < /tmp/console.txt | tail -60
fi
# A guest that never enables MSI-X: virtio_pci cannot get an interrupt (no INTx here), the
# device just stays unused, and the VM boots and powers off as usual.
timeout 180 ferro-vmm --kernel /guest/bzImage $RD --cmdline "console=ttyS0 quiet panic=-1 probe.exit=poweroff pci=nomsi" \
    --cpus 1 --memory 256 --rng > /tmp/nomsi.txt 2>&1
rc=$?
echo "nomsi rc=$rc $(tr -d '\r' < /tmp/nomsi.txt | grep -m1 '^linux-probe:')"
echo "lab-virtio: done"
