# Run with: lab/lab.sh run --add target/release/ferro-vmm:/bin/ferro-vmm lab/examples/ferro-vmm.sh
# Boots the Linux test guest under ferro-vmm on the lab's kvm_amd and checks the probe line.
ferro-vmm --kernel /guest/bzImage --initrd /guest/initramfs.cpio.gz \
    --cmdline "console=ttyS0 panic=-1 quiet probe.exit=poweroff" --cpus 1 --memory 256 </dev/null 2>&1 \
    | ts -s %.s | tee /tmp/console
grep -q 'linux-probe: ' /tmp/console
