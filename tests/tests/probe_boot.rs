//! The probe guest on /dev/kvm: CPUs, memory map, RTC, the ways a VM ends, console input,
//! signals and configuration files.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferro_tests::{kvm_available, probe, run_probe, vmm, wait_limited};

fn boot_cpus(n: u32) {
    if !kvm_available("boot_cpus") {
        return;
    }
    let cpus = n.to_string();
    let r = run_probe("exit=poweroff", &["--cpus", &cpus]);
    assert_eq!(r.code, Some(0), "{}\n{}", r.stdout, r.stderr);
    assert_eq!(r.value("acpi_cpus"), cpus);
    assert_eq!(r.value("cpus_online"), cpus, "{}", r.stdout);
    let mut aps: Vec<u32> = r
        .report()
        .get("ap")
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|v| v.parse().expect("ap=<apic id>"))
        .collect();
    aps.sort_unstable();
    assert_eq!(aps, (1..n).collect::<Vec<_>>());
    assert_eq!(r.value("user"), "ok");
    assert!(r.stdout.starts_with("probe=start"), "{}", r.stdout);
}

#[test]
fn one_vcpu_boots_and_powers_off() {
    boot_cpus(1);
}

#[test]
fn four_vcpus_all_report() {
    boot_cpus(4);
}

#[test]
fn thirty_two_vcpus_all_report() {
    boot_cpus(32);
}

fn ram_entries(r: &ferro_tests::Run) -> Vec<(u64, u64)> {
    r.report()["e820"]
        .iter()
        .filter_map(|e| {
            let f: Vec<&str> = e.split(',').collect();
            let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok();
            (f.get(2) == Some(&"1")).then(|| Some((hex(f[0])?, hex(f[1])?)))?
        })
        .collect()
}

#[test]
fn two_gib_memory_map() {
    if !kvm_available("two_gib_memory_map") {
        return;
    }
    let r = run_probe("exit=poweroff smp=off", &["--memory", "2G"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let ram = ram_entries(&r);
    let top = ram.iter().map(|(a, s)| a + s).max().unwrap();
    assert_eq!(top, 2 << 30);
    let total: u64 = ram.iter().map(|(_, s)| s).sum();
    assert_eq!(r.value("mem_ram_bytes"), total.to_string());
    assert!(total > (2 << 30) - (1 << 20) && total < (2 << 30));
}

#[test]
fn sixteen_gib_memory_map_has_high_ram() {
    if !kvm_available("sixteen_gib_memory_map_has_high_ram") {
        return;
    }
    let r = run_probe("exit=poweroff smp=off memtest=64", &["--memory", "16G"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let ram = ram_entries(&r);
    // 3 GiB below the MMIO hole, 13 GiB above 4 GiB.
    assert!(ram.contains(&(1 << 32, 13 << 30)), "{ram:x?}");
    assert!(ram.iter().all(|(a, s)| a + s <= 3 << 30 || *a >= 1 << 32));
    assert_eq!(r.value("memtest"), "ok");
}

/// Days since 1970-01-01 to a civil date.
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn today_utc() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let (y, m, d) = civil(secs.div_euclid(86_400));
    format!("{y:04}-{m:02}-{d:02}")
}

#[test]
fn rtc_reads_the_host_date() {
    if !kvm_available("rtc_reads_the_host_date") {
        return;
    }
    let before = today_utc();
    let r = run_probe("exit=poweroff smp=off", &[]);
    let after = today_utc();
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let rtc = r.value("rtc");
    let date = rtc.split(' ').next().unwrap().to_string();
    assert!(
        date == before || date == after,
        "guest {rtc}, host {before}"
    );
}

#[test]
fn reboot_ends_with_status_0() {
    if !kvm_available("reboot_ends_with_status_0") {
        return;
    }
    let r = run_probe("exit=reboot smp=off", &[]);
    assert_eq!(r.code, Some(0), "{}\n{}", r.stdout, r.stderr);
    assert_eq!(r.value("probe"), "exit:reboot");
}

#[test]
fn triple_fault_ends_with_status_2() {
    if !kvm_available("triple_fault_ends_with_status_2") {
        return;
    }
    let r = run_probe("exit=triplefault smp=off", &[]);
    assert_eq!(r.code, Some(2), "{}\n{}", r.stdout, r.stderr);
}

#[test]
fn guest_panic_ends_with_status_3() {
    if !kvm_available("guest_panic_ends_with_status_3") {
        return;
    }
    let r = run_probe("exit=panic smp=off", &[]);
    assert_eq!(r.code, Some(3), "{}\n{}", r.stdout, r.stderr);
}

#[test]
fn serial_to_file_and_none() {
    if !kvm_available("serial_to_file_and_none") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("ferro-serial-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("console.log");
    let arg = format!("file:{}", file.display());
    let r = run_probe("exit=poweroff smp=off", &["--serial", &arg]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r.stdout.is_empty());
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains("probe=done"), "{text}");
    let r = run_probe("exit=poweroff smp=off", &["--serial", "none"]);
    assert_eq!(r.code, Some(0));
    assert!(r.stdout.is_empty());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn config_files_toml_and_json() {
    if !kvm_available("config_files_toml_and_json") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("ferro-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = probe().display().to_string();
    let toml = dir.join("vm.toml");
    std::fs::write(
        &toml,
        format!("kernel = \"{p}\"\ncmdline = \"exit=poweroff\"\ncpus = 2\nmemory_mib = \"512M\"\n"),
    )
    .unwrap();
    let json = dir.join("vm.json");
    std::fs::write(
        &json,
        format!(r#"{{"kernel":"{p}","cmdline":"exit=poweroff","cpus":3,"memory_mib":512}}"#),
    )
    .unwrap();
    for (file, cpus) in [(&toml, "2"), (&json, "3")] {
        let r = ferro_tests::run_vmm(
            &["--config", file.to_str().unwrap()],
            Duration::from_secs(60),
        );
        assert_eq!(r.code, Some(0), "{}", r.stderr);
        assert_eq!(r.value("cpus_online"), cpus);
    }
    // Flags override the file.
    let r = ferro_tests::run_vmm(
        &["--config", toml.to_str().unwrap(), "--cpus", "1"],
        Duration::from_secs(60),
    );
    assert_eq!(r.value("cpus_online"), "1");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn sigterm_stops_the_vm_promptly() {
    if !kvm_available("sigterm_stops_the_vm_promptly") {
        return;
    }
    let mut child = Command::new(vmm())
        .args(["--kernel", probe().to_str().unwrap()])
        .args(["--cmdline", "exit=halt smp=off", "--cpus", "2"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while out.read_line(&mut line).unwrap() > 0 && !line.contains("probe=exit:halt") {}
    assert!(line.contains("probe=exit:halt"), "{line}");
    let sent = Instant::now();
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let r = wait_limited(child, Duration::from_secs(10));
    assert_eq!(r.code, Some(143), "{}", r.stderr);
    assert!(
        sent.elapsed() < Duration::from_secs(2),
        "{:?}",
        sent.elapsed()
    );
}

#[test]
fn typing_reaches_the_guest() {
    if !kvm_available("typing_reaches_the_guest") {
        return;
    }
    let mut child = Command::new(vmm())
        .args(["--kernel", probe().to_str().unwrap()])
        .args(["--cmdline", "exit=poweroff smp=off input=5"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"hello").unwrap();
    let r = wait_limited(child, Duration::from_secs(60));
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(r.value("input"), "hello");
}
