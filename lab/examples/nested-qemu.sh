# Run with: lab/lab.sh run --with-qemu lab/examples/nested-qemu.sh
# Boots the Linux test guest under nested QEMU/KVM (microvm, PVH vmlinux) and checks the probe line.
# ts -s prefixes each console line with the seconds since QEMU started.
qemu-system-x86_64 -accel kvm -cpu host -M microvm,x-option-roms=off,rtc=on,acpi=on -m 256 -smp 1 \
    -nodefaults -no-user-config -display none -serial stdio -no-reboot \
    -kernel /guest/vmlinux -initrd /guest/initramfs.cpio.gz \
    -append "console=ttyS0 panic=-1 quiet probe.exit=poweroff" </dev/null 2>&1 | ts -s %.s | tee /tmp/console
grep -q 'linux-probe: ' /tmp/console
