//! virtio-pci under a stock Linux guest, in the KVM lab: the Debian kernel boots under
//! `ferro-vmm --rng`, finds the host bridge and the virtio-rng function on bus 0, binds
//! virtio_pci and virtio_rng, reads bytes from /dev/hwrng, and its interrupts arrive as PCI-MSI
//! (MSI-X through KVM routes and irqfds; the kicks go through ioeventfds). The guest is driven
//! by `tests/lab/virtio_rng.sh`, which types commands into the guest shell on COM1. A second
//! boot with `pci=nomsi` (a guest that never enables MSI-X) must still power off cleanly.

use ferro_tests::{build_linux_guest, console_line as line, lab_available, lab_check, vmm};

/// The value after `prefix` on the first console line that starts with it.

#[test]
fn linux_guest_uses_virtio_rng_over_pci() {
    if !lab_available() {
        return;
    }
    build_linux_guest();
    let add = format!("{}:/bin/ferro-vmm", vmm().display());
    let adds = [add];
    lab_check("virtio_rng.sh", &adds, 600, |console| {
        assert!(console.contains("lab-virtio: done"), "{console}");
        assert_eq!(line(console, "virtio-rng rc="), Some("0"), "{console}");
        assert!(
            console.contains("G-END"),
            "the guest ran every command: {console}"
        );

        // Bus 0: the host bridge and virtio-rng (modern id 0x1040 + 4), bound to virtio-pci.
        let pci: Vec<&str> = console
            .lines()
            .filter_map(|l| l.trim_start().strip_prefix("G-PCI "))
            .collect();
        assert!(
            pci.iter()
                .any(|l| l.starts_with("0000:00:00.0 0x1b36:0x0008")),
            "host bridge: {pci:?}"
        );
        assert!(
            pci.iter()
                .any(|l| l.contains("0x1af4:0x1044") && l.contains("driver=virtio-pci")),
            "virtio-rng bound to virtio-pci: {pci:?}"
        );

        assert_eq!(
            line(console, "G-RNG current="),
            Some("virtio_rng.0"),
            "{console}"
        );
        let bytes = line(console, "G-BYTES ").expect("bytes from /dev/hwrng");
        assert_eq!(bytes.len(), 64, "32 bytes in hex: {bytes}");
        assert_ne!(bytes, "0".repeat(64), "entropy is not all zeros");
        assert_eq!(line(console, "G-BYTES2"), Some("16384"), "{console}");

        // MSI-X: a config vector and a queue vector, and the queue one fired.
        let irqs: Vec<&str> = console
            .lines()
            .filter_map(|l| l.trim_start().strip_prefix("G-IRQ "))
            .collect();
        assert!(
            irqs.iter()
                .any(|l| l.contains("PCI-MSI") && l.contains("virtio0-config")),
            "{irqs:?}"
        );
        let input = irqs
            .iter()
            .find(|l| l.contains("virtio0-input"))
            .unwrap_or_else(|| panic!("no queue vector: {irqs:?}"));
        let count: u64 = input
            .split_whitespace()
            .skip(1)
            .take_while(|w| w.chars().all(|c| c.is_ascii_digit()))
            .map(|w| w.parse::<u64>().unwrap_or(0))
            .sum();
        assert!(count > 0, "queue interrupts delivered: {input}");

        // With pci=nomsi the guest cannot use the device, and nothing else changes.
        let nomsi = line(console, "nomsi rc=").expect("the pci=nomsi boot ran");
        assert!(
            nomsi.starts_with("0 linux-probe:"),
            "pci=nomsi boot: {nomsi}"
        );

        // The kernel took the ECAM from the MCFG (reserved by the PNP0C02 device).
        assert!(
            console.contains("PCI MMCONFIG 0000 [bus 00-00]"),
            "MMCONFIG in /proc/iomem: {console}"
        );
    });
}
