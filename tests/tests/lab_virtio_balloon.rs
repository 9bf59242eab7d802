//! virtio-balloon under a stock Linux guest, in the KVM lab: with `--balloon target=384`, one
//! vCPU and 512 MiB, the guest unloads virtio_balloon (deflating it), fills and frees 350 MiB of
//! tmpfs so ferro-vmm's RSS grows, then loads the driver again; it inflates to the target and
//! the VMM's RSS falls, because inflated pages go back to the host (MADV_DONTNEED). Driven by
//! `tests/lab/virtio_balloon.sh`.

use ferro_tests::{build_linux_guest, console_line as line, lab_available, lab_check, vmm};

fn kib(console: &str, prefix: &str) -> u64 {
    line(console, prefix)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {prefix}: {console}"))
}

#[test]
fn linux_balloon_inflation_lowers_the_vmm_rss() {
    if !lab_available() {
        return;
    }
    build_linux_guest();
    let add = format!("{}:/bin/ferro-vmm", vmm().display());
    let adds = [add];
    lab_check("virtio_balloon.sh", &adds, 600, |console| {
        assert!(console.contains("lab-virtio-balloon: done"), "{console}");
        assert_eq!(line(console, "L-VMM rc="), Some("0"), "{console}");
        assert_eq!(line(console, "G-RMMOD "), Some("ok"), "{console}");
        assert_eq!(line(console, "G-INSMOD "), Some("ok"), "{console}");
        let filled = kib(console, "L-RSS-FILLED ");
        let inflated = kib(console, "L-RSS-INFLATED ");
        // 350 MiB were touched; the balloon takes 384 MiB of 512: measured ~250 MiB given back.
        assert!(filled > 350 * 1024, "RSS after the fill: {filled} KiB");
        assert!(
            filled - inflated > 150 * 1024,
            "RSS fell from {filled} KiB to only {inflated} KiB"
        );
    });
}
