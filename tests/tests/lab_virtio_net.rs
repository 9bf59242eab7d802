//! virtio-net under a stock Linux guest, in the KVM lab: `ferro-vmm --net auto` creates a tap,
//! the Debian guest binds virtio_net (negotiating checksum offload, TSO, merged receive
//! buffers and event-idx), addresses eth0 and runs two busybox `nc` services; the lab
//! addresses the tap, pings the guest, gets an echo over TCP and sends 4 MiB whose MD5 the
//! guest reports. The balloon is there too, inflated at boot (`--balloon target=32`). Driven by
//! `tests/lab/virtio_net.sh`.

use ferro_tests::{build_linux_guest, lab_available, lab_check, vmm};

/// The value after `prefix` on the first console line that contains it.
fn line<'a>(console: &'a str, prefix: &str) -> Option<&'a str> {
    console
        .lines()
        .find_map(|l| l.split_once(prefix).map(|(_, v)| v.trim()))
}

/// Whether feature bit `bit` is set in a sysfs `features` string (one char per bit).
fn bit(features: &str, bit: usize) -> bool {
    features.as_bytes().get(bit) == Some(&b'1')
}

#[test]
fn linux_guest_serves_tcp_over_virtio_net() {
    if !lab_available() {
        return;
    }
    build_linux_guest();
    let add = format!("{}:/bin/ferro-vmm", vmm().display());
    let adds = [add];
    lab_check("virtio_net.sh", &adds, 600, |console| {
        assert!(console.contains("lab-virtio-net: done"), "{console}");
        assert_eq!(line(console, "L-VMM rc="), Some("0"), "{console}");
        assert!(
            line(console, "L-TAP ").is_some_and(|t| t.starts_with("ferro")),
            "{console}"
        );
        assert_eq!(line(console, "L-PING "), Some("ok 3"), "{console}");
        assert_eq!(
            line(console, "L-ECHO "),
            Some("hello-over-tcp"),
            "{console}"
        );
        let sent = line(console, "L-MD5 ").expect("host md5");
        let got = line(console, "G-MD5 ").expect("guest md5");
        assert_eq!(got, sent, "4 MiB over TCP arrive intact");

        // Negotiated features: virtio-net (device 1) and virtio-balloon (device 5).
        let virtio: Vec<&str> = console
            .lines()
            .filter_map(|l| l.split_once("G-VIRTIO ").map(|(_, v)| v))
            .collect();
        let net = virtio
            .iter()
            .find_map(|l| l.strip_prefix("0x0001 "))
            .unwrap_or_else(|| panic!("no virtio-net: {virtio:?}"));
        for (b, name) in [
            (0, "CSUM"),
            (1, "GUEST_CSUM"),
            (5, "MAC"),
            (7, "GUEST_TSO4"),
            (11, "HOST_TSO4"),
            (15, "MRG_RXBUF"),
            (16, "STATUS"),
            (29, "EVENT_IDX"),
            (32, "VERSION_1"),
        ] {
            assert!(bit(net, b), "virtio-net {name} negotiated: {net}");
        }
        let balloon = virtio
            .iter()
            .find_map(|l| l.strip_prefix("0x0005 "))
            .unwrap_or_else(|| panic!("no virtio-balloon: {virtio:?}"));
        assert!(
            bit(balloon, 1) && bit(balloon, 2),
            "STATS_VQ, DEFLATE_ON_OOM: {balloon}"
        );
    });
}
