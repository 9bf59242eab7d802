//! Parsing what the guests, the helpers and the host print.

/// The value of the first `key=NUMBER` token in `text` (a token starts the text or follows
/// whitespace). Accepts integers and decimals, and `-1` style negatives.
pub fn kv_num(text: &str, key: &str) -> Option<f64> {
    for line in text.lines() {
        for tok in line.split_whitespace() {
            if let Some(v) = tok.strip_prefix(key).and_then(|r| r.strip_prefix('=')) {
                if let Ok(x) = v.trim_end_matches(',').parse::<f64>() {
                    return Some(x);
                }
            }
        }
    }
    None
}

/// The value of the first `key=WORD` token in `line`.
pub fn kv_word<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|tok| tok.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// The probe's `pio_per_sec=` (port writes per second from its user-mode loop).
pub fn probe_pio_per_sec(console: &str) -> Option<f64> {
    kv_num(console, "pio_per_sec").filter(|&x| x > 0.0)
}

/// `bare_per_sec=` of benches/bare/kvm_pio_loop.c.
pub fn bare_pio_per_sec(out: &str) -> Option<f64> {
    kv_num(out, "bare_per_sec").filter(|&x| x > 0.0)
}

/// Resident memory of a process from its /proc/PID/smaps, split into the guest's RAM and the rest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Smaps {
    /// Rss of every mapping, KiB.
    pub total_kib: u64,
    /// Rss of the mappings taken to be guest RAM, KiB.
    pub guest_kib: u64,
    /// How many mappings were taken to be guest RAM.
    pub guest_mappings: u32,
}

/// Sums the `Rss:` of every mapping in smaps `text`; anonymous mappings (no path) whose size is
/// between `guest_bytes` and `guest_bytes` + 4 MiB count as guest RAM (both ferro-vmm and QEMU
/// map a VM's RAM as one anonymous mapping of exactly its size when it fits below 3 GiB).
pub fn parse_smaps(text: &str, guest_bytes: u64) -> Smaps {
    let mut s = Smaps {
        total_kib: 0,
        guest_kib: 0,
        guest_mappings: 0,
    };
    let mut is_guest = false;
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let Some(first) = it.next() else { continue };
        if first == "Rss:" {
            let kib = it.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            s.total_kib += kib;
            if is_guest {
                s.guest_kib += kib;
            }
            continue;
        }
        // A mapping header: "start-end perms offset dev inode [path]".
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                let rest: Vec<&str> = it.collect();
                let anonymous = rest.len() == 4; // perms offset dev inode, no path
                let size = b.saturating_sub(a);
                is_guest = anonymous
                    && guest_bytes > 0
                    && size >= guest_bytes
                    && size <= guest_bytes + (4 << 20);
                if is_guest {
                    s.guest_mappings += 1;
                }
            }
        }
    }
    s
}

/// One line of bench-timer: `first_byte_ms=F marker_ms=M exit_ms=E status=S`.
#[derive(Clone, Debug, PartialEq)]
pub struct TimerLine {
    pub first_byte_ms: Option<f64>,
    pub marker_ms: Option<f64>,
    pub exit_ms: Option<f64>,
    pub status: String,
}

/// Parses a bench-timer line (negative times mean "never seen").
pub fn parse_timer_line(line: &str) -> Option<TimerLine> {
    let pos = |k: &str| kv_num(line, k).filter(|&x| x >= 0.0);
    let status = kv_word(line, "status")?.to_string();
    Some(TimerLine {
        first_byte_ms: pos("first_byte_ms"),
        marker_ms: pos("marker_ms"),
        exit_ms: pos("exit_ms"),
        status,
    })
}

/// A lab result line written by the lab script: `BENCH-LAB WHO ROUND <bench-timer line>`.
#[derive(Clone, Debug, PartialEq)]
pub struct LabLine {
    pub who: String,
    pub round: u32,
    pub timer: TimerLine,
}

pub fn parse_lab_line(line: &str) -> Option<LabLine> {
    let rest = line.trim_end_matches('\r').strip_prefix("BENCH-LAB ")?;
    let mut it = rest.splitn(3, ' ');
    let who = it.next()?.to_string();
    let round = it.next()?.parse().ok()?;
    let timer = parse_timer_line(it.next().unwrap_or(""))?;
    Some(LabLine { who, round, timer })
}

/// The `model name` of the first CPU in /proc/cpuinfo.
pub fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

/// The first `n` lines of `ferro-vmm --host-info`, without the capability list.
pub fn host_info_head(text: &str, n: usize) -> Vec<String> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .take(n)
        .map(|l| l.trim_end().to_string())
        .collect()
}

/// The last `n` non-empty lines of `text`, for error messages.
pub fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROBE: &str = "probe=start\ncmdline=exit=poweroff smp=off pio=200000\nuser=ok\n\
pio_exits=200000 pio_ns=5922280585 pio_per_sec=33770\nprobe=done\nprobe=exit:poweroff\n";

    #[test]
    fn probe_pio() {
        assert_eq!(probe_pio_per_sec(PROBE), Some(33770.0));
        assert_eq!(kv_num(PROBE, "pio_ns"), Some(5_922_280_585.0));
        // Whole keys only: "pio" is the cmdline's pio=, not a prefix of pio_exits=.
        assert_eq!(kv_num(PROBE, "pio"), Some(200_000.0));
        assert_eq!(kv_num(PROBE, "exits"), None);
        assert_eq!(probe_pio_per_sec("probe=start\npio_per_sec=0\n"), None);
        assert_eq!(probe_pio_per_sec("probe=start\nprobe=done\n"), None);
    }

    #[test]
    fn bare_pio() {
        let out = "bare_exits=129024 bare_ns=1001836400 bare_per_sec=128787\n";
        assert_eq!(bare_pio_per_sec(out), Some(128_787.0));
        assert_eq!(bare_pio_per_sec("kvm_pio_loop: KVM_RUN: failed"), None);
    }

    #[test]
    fn smaps() {
        let text = "\
55fec3dbf000-55fec41c6000 r--p 00000000 fe:00 10199058                   /usr/bin/qemu-system-x86_64
Size:               4124 kB
Rss:                4060 kB
55fec543a000-55fec5e5b000 rw-p 00000000 00:00 0                          [heap]
Rss:                4284 kB
7fb4d7000000-7fb4d7200000 rw-p 00000000 00:00 0
Rss:                2048 kB
7fb4d7e00000-7fb4e7e00000 rw-p 00000000 00:00 0
Size:             262144 kB
Rss:                4096 kB
Pss:                4096 kB
";
        let s = parse_smaps(text, 256 << 20);
        assert_eq!(s.total_kib, 4060 + 4284 + 2048 + 4096);
        assert_eq!(s.guest_kib, 4096);
        assert_eq!(s.guest_mappings, 1);
        let s = parse_smaps(text, 512 << 20);
        assert_eq!(s.guest_kib, 0);
        assert_eq!(s.guest_mappings, 0);
    }

    #[test]
    fn timer_lines() {
        let l = parse_timer_line("first_byte_ms=3.155 marker_ms=3.288 exit_ms=32.335 status=0")
            .unwrap();
        assert_eq!(l.first_byte_ms, Some(3.155));
        assert_eq!(l.marker_ms, Some(3.288));
        assert_eq!(l.exit_ms, Some(32.335));
        assert_eq!(l.status, "0");
        let l =
            parse_timer_line("first_byte_ms=-1.000 marker_ms=-1.000 exit_ms=1001.9 status=timeout")
                .unwrap();
        assert_eq!(l.first_byte_ms, None);
        assert_eq!(l.marker_ms, None);
        assert_eq!(l.status, "timeout");
        assert!(parse_timer_line("garbage").is_none());
    }

    #[test]
    fn lab_lines() {
        let l = parse_lab_line(
            "BENCH-LAB ferro 3 first_byte_ms=10.5 marker_ms=900.25 exit_ms=1200 status=0\r",
        )
        .unwrap();
        assert_eq!(l.who, "ferro");
        assert_eq!(l.round, 3);
        assert_eq!(l.timer.marker_ms, Some(900.25));
        assert!(parse_lab_line("BENCH-LAB qemu x first_byte_ms=1 status=0").is_none());
        assert!(parse_lab_line("linux-init: start").is_none());
    }

    #[test]
    fn host_bits() {
        let ci = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9B14\nflags\t: fpu\n";
        assert_eq!(cpu_model(ci).as_deref(), Some("AMD EPYC 9B14"));
        assert_eq!(cpu_model("nothing"), None);
        let hi = "kvm: PVM (software KVM)\nkind: pvm\nmodule: kvm_pvm\napi_version: 12\n";
        assert_eq!(
            host_info_head(hi, 3),
            vec!["kvm: PVM (software KVM)", "kind: pvm", "module: kvm_pvm"]
        );
        assert_eq!(last_lines("a\n\nb\nc\n", 2), "b | c");
    }
}
