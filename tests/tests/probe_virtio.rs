//! virtio-pci with the probe guest on /dev/kvm: the probe enumerates bus 0 through the ECAM
//! the MCFG names, finds the host bridge and virtio-rng, drives the modern transport with
//! MSI-X and reads entropy, with the queue interrupts arriving through KVM MSI routes.

use ferro_tests::{kvm_available, run_probe};

#[test]
fn probe_reads_entropy_from_virtio_rng() {
    if !kvm_available("probe_reads_entropy_from_virtio_rng") {
        return;
    }
    let r = run_probe("rng=4096", &["--cpus", "2", "--rng"]);
    assert_eq!(r.code, Some(0), "{}\n{}", r.stdout, r.stderr);
    assert_eq!(r.value("pci_config"), "ecam:0xe0000000", "{}", r.stdout);
    let pci = r.report().get("pci").cloned().unwrap_or_default();
    assert!(
        pci.iter().any(|p| p.starts_with("00:00.0 1b36:0008")),
        "host bridge: {pci:?}"
    );
    assert!(
        pci.iter().any(|p| p.starts_with("00:01.0 1af4:1044")),
        "virtio-rng: {pci:?}"
    );
    let rng = r.fields("rng_bytes");
    assert_eq!(rng.get("rng_bytes"), Some(&4096), "{}", r.stdout);
    assert!(rng["rng_nonzero"] > 4000, "{rng:?}");
    assert!(rng["rng_irqs"] >= 1, "MSI-X queue interrupts: {rng:?}");
    let probe = r.report().get("probe").cloned().unwrap_or_default();
    assert!(probe.iter().any(|p| p == "done"), "{}", r.stdout);
}

#[test]
fn no_rng_no_device_but_the_host_bridge() {
    if !kvm_available("no_rng_no_device_but_the_host_bridge") {
        return;
    }
    let r = run_probe("rng=16", &[]);
    assert_eq!(r.code, Some(0), "{}\n{}", r.stdout, r.stderr);
    let pci = r.report().get("pci").cloned().unwrap_or_default();
    assert_eq!(pci.len(), 1, "only the host bridge: {pci:?}");
    assert_eq!(r.value("rng"), "none", "{}", r.stdout);
}
