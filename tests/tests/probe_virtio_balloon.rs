//! virtio-balloon with the probe guest on /dev/kvm: the probe touches most of its memory
//! (`memtest=`), then inflates the balloon to the target given with `--balloon target=`; the
//! VMM gives those pages back to the host, so its resident set (VmRSS) falls.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferro_tests::{kvm_available, probe, vmm, wait_limited};

/// VmRSS of `pid` in KiB, if it still runs.
fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

#[test]
fn inflating_the_balloon_lowers_the_vmm_rss() {
    if !kvm_available("inflating_the_balloon_lowers_the_vmm_rss") {
        return;
    }
    let p = probe().to_str().unwrap().to_string();
    let child = Command::new(vmm())
        .args(["--kernel", &p, "--memory", "512", "--balloon", "target=384"])
        .args(["--cmdline", "memtest=440 balloon=on balloon_secs=3"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ferro-vmm");
    let pid = child.id();
    // Sample the RSS while the guest runs: its peak after memtest, and where it ends up.
    let sampler = std::thread::spawn(move || {
        let (mut peak, mut last) = (0u64, 0u64);
        let deadline = Instant::now() + Duration::from_secs(60);
        while let Some(r) = rss_kib(pid) {
            peak = peak.max(r);
            last = r;
            if Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        (peak, last)
    });
    let r = wait_limited(child, Duration::from_secs(60));
    let (peak, last) = sampler.join().unwrap();
    assert_eq!(r.code, Some(0), "{}\n{}", r.stdout, r.stderr);
    assert_eq!(r.value("memtest"), "ok");
    // 384 MiB = 98304 pages, taken from the top of RAM.
    assert_eq!(r.value("balloon_target"), "98304");
    assert_eq!(r.value("balloon_actual"), "98304");
    let line = r.value("balloon_inflated");
    assert!(line.starts_with("98304 "), "{line}");
    assert!(
        !line.contains("balloon_stats=0"),
        "statistics arrived: {line}"
    );
    // memtest touched ~440 MiB from the bottom; the balloon holds the top 384 MiB: about
    // 315 MiB of touched memory went back to the host. The RSS was sampled after exit began
    // at worst; the last sample is taken while the probe idles for balloon_secs.
    assert!(peak > 400 * 1024, "peak RSS {peak} KiB");
    assert!(
        peak - last > 250 * 1024,
        "RSS fell from {peak} KiB to only {last} KiB"
    );
}

#[test]
fn a_balloon_without_target_stays_empty() {
    if !kvm_available("a_balloon_without_target_stays_empty") {
        return;
    }
    let p = probe().to_str().unwrap().to_string();
    let r = ferro_tests::run_vmm(
        &[
            "--kernel",
            &p,
            "--balloon",
            "--cmdline",
            "balloon=on balloon_secs=1",
        ],
        Duration::from_secs(60),
    );
    assert_eq!(r.code, Some(0), "{}\n{}", r.stdout, r.stderr);
    assert!(
        r.value("balloon_inflated").starts_with("0 "),
        "{}",
        r.stdout
    );
    assert_eq!(r.value("balloon_msix"), "4");
}
