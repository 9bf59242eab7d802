//! The samples of a bench run and docs/benchmarks.md.

use std::collections::BTreeMap;

use crate::stats::{fmt_ratio, fmt_value, median, min_max, ratio, Target, Verdict};

/// A system under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Sut {
    Ferro,
    Microvm,
    Q35,
    Bare,
    /// The host itself (the disk rows: O_DIRECT threads against the same image file).
    Host,
    /// The host with ferro-bench's own O_DIRECT threads (the disk rows).
    HostThreads,
    /// Per round, the better of `Host` and `HostThreads` (the disk targets' reference).
    HostBest,
    /// The host's loopback TCP (the migration rows' bandwidth reference).
    Loopback,
}

impl Sut {
    pub fn label(self) -> &'static str {
        match self {
            Sut::Ferro => "ferro-vmm",
            Sut::Microvm => "QEMU microvm",
            Sut::Q35 => "QEMU q35",
            Sut::Bare => "bare C KVM_RUN loop",
            Sut::Host => "host, fio io_uring",
            Sut::HostThreads => "host, 16 O_DIRECT threads",
            Sut::HostBest => "host, the better of fio and threads",
            Sut::Loopback => "host, loopback TCP",
        }
    }
}

/// A measured quantity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Metric {
    FirstByte,
    ProbeStart,
    Exit,
    Teardown,
    MaxRss,
    RssNoGuest,
    GuestRss,
    Pio,
    PioKernel,
    LabFirstByte,
    LabMarker,
    LabExit,
    BlkSeqWrite,
    BlkSeqRead,
    BlkRandRead,
    NetTxFps,
    NetTxMbps,
    NetRxFps,
    NetRxMbps,
    NetTxFps60,
    NetRxFps60,
    NetTxSeen,
    MigTotal,
    MigGap,
    MigDowntime,
    MigBytes,
    MigCopyRatio,
    MigRounds,
    MigDirtyRate,
    MigSwitch,
    MigFullSwitch,
    MigDirtySwitch,
    MigFullTotal,
    MigFullGap,
    MigFullDowntime,
    MigFullBytes,
    MigFullCopyRatio,
    MigFullRounds,
    MigFullDirtyRate,
    MigDirtyTotal,
    MigDirtyGap,
    MigDirtyDowntime,
    MigDirtyBytes,
    MigDirtyCopyRatio,
    MigDirtyRounds,
    MigDirtyDirtyRate,
    SnapSize,
    SnapSave,
    SnapRestore,
    SnapFullSize,
    SnapFullSave,
    SnapFullRestore,
    StoreTotal,
    StoreRun,
    StoreGap,
    StoreDowntime,
    StoreBytes,
    StoreDiskBytes,
    StoreWriteTotal,
    StoreWriteRun,
    StoreWriteDowntime,
    StoreWriteBytes,
    StoreWriteDiskBytes,
    LoopbackBw,
}

impl Metric {
    pub fn label(self) -> &'static str {
        match self {
            Metric::FirstByte => "first serial byte",
            Metric::ProbeStart => "`probe=start` line",
            Metric::Exit => "process exit",
            Metric::Teardown => "`probe=exit:poweroff` line to process exit",
            Metric::MaxRss => "peak RSS, ru_maxrss",
            Metric::RssNoGuest => "RSS without guest RAM, smaps",
            Metric::GuestRss => "guest RAM resident, smaps",
            Metric::Pio => "port-I/O exits/s",
            Metric::PioKernel => "port-I/O exits/s, probe loop at CPL0",
            Metric::LabFirstByte => "Linux: first serial byte",
            Metric::LabMarker => "Linux: to `linux-init: start`",
            Metric::LabExit => "Linux: process exit",
            Metric::BlkSeqWrite => "disk: sequential write, 64 KiB requests",
            Metric::BlkSeqRead => "disk: sequential read, 64 KiB requests",
            Metric::BlkRandRead => "disk: 4 KiB random reads",
            Metric::NetTxFps => "net: guest→host frames/s, 1514 B",
            Metric::NetTxMbps => "net: guest→host MB/s, 1514 B",
            Metric::NetRxFps => "net: host→guest frames/s, 1514 B",
            Metric::NetRxMbps => "net: host→guest MB/s, 1514 B",
            Metric::NetTxFps60 => "net: guest→host frames/s, 60 B",
            Metric::NetRxFps60 => "net: host→guest frames/s, 60 B",
            Metric::NetTxSeen => "net: guest→host frames the host's socket saw, 1514 B",
            Metric::MigTotal => "migration, idle guest: total time",
            Metric::MigGap => "migration, idle guest: downtime, guest side: largest console gap",
            Metric::MigSwitch => "migration, idle guest: switch-over gap, guest side",
            Metric::MigFullSwitch => "migration, populated guest: switch-over gap, guest side",
            Metric::MigDirtySwitch => "migration, dirtying guest: switch-over gap, guest side",
            Metric::MigDowntime => "migration, idle guest: downtime the VMM reports",
            Metric::MigBytes => "migration, idle guest: bytes sent",
            Metric::MigCopyRatio => {
                "migration, idle guest: total time / (memory ÷ loopback bandwidth)"
            }
            Metric::MigRounds => "migration, idle guest: copy rounds",
            Metric::MigDirtyRate => "migration, idle guest: guest's dirtying rate",
            Metric::MigFullTotal => "migration, populated guest: total time",
            Metric::MigFullGap => {
                "migration, populated guest: downtime, guest side: largest console gap"
            }
            Metric::MigFullDowntime => "migration, populated guest: downtime the VMM reports",
            Metric::MigFullBytes => "migration, populated guest: bytes sent",
            Metric::MigFullCopyRatio => {
                "migration, populated guest: total time / (memory ÷ loopback bandwidth)"
            }
            Metric::MigFullRounds => "migration, populated guest: copy rounds",
            Metric::MigFullDirtyRate => "migration, populated guest: guest's dirtying rate",
            Metric::MigDirtyTotal => "migration, dirtying guest: total time",
            Metric::MigDirtyGap => {
                "migration, dirtying guest: downtime, guest side: largest console gap"
            }
            Metric::MigDirtyDowntime => "migration, dirtying guest: downtime the VMM reports",
            Metric::MigDirtyBytes => "migration, dirtying guest: bytes sent",
            Metric::MigDirtyCopyRatio => {
                "migration, dirtying guest: total time / (memory ÷ loopback bandwidth)"
            }
            Metric::MigDirtyRounds => "migration, dirtying guest: copy rounds",
            Metric::MigDirtyDirtyRate => "migration, dirtying guest: guest's dirtying rate",
            Metric::SnapSize => "snapshot, idle guest: size on disk",
            Metric::SnapSave => "snapshot, idle guest: save time (pause, write, resume)",
            Metric::SnapRestore => {
                "snapshot, idle guest: restore, spawn to the guest's next output"
            }
            Metric::SnapFullSize => "snapshot, populated guest: size on disk",
            Metric::SnapFullSave => "snapshot, populated guest: save time (pause, write, resume)",
            Metric::SnapFullRestore => {
                "snapshot, populated guest: restore, spawn to the guest's next output"
            }
            Metric::StoreTotal => "storage migration, idle guest: total time",
            Metric::StoreRun => {
                "storage migration, idle guest: total time until the destination runs"
            }
            Metric::StoreGap => {
                "storage migration, idle guest: downtime, guest side: largest console gap"
            }
            Metric::StoreDowntime => "storage migration, idle guest: downtime the VMM reports",
            Metric::StoreBytes => "storage migration, idle guest: bytes sent",
            Metric::StoreDiskBytes => "storage migration, idle guest: disk bytes sent",
            Metric::StoreWriteTotal => "storage migration, writing guest: total time",
            Metric::StoreWriteRun => {
                "storage migration, writing guest: total time until the destination runs"
            }
            Metric::StoreWriteDowntime => {
                "storage migration, writing guest: downtime the VMM reports"
            }
            Metric::StoreWriteBytes => "storage migration, writing guest: bytes sent",
            Metric::StoreWriteDiskBytes => "storage migration, writing guest: disk bytes sent",
            Metric::LoopbackBw => "loopback TCP bandwidth (one connection)",
        }
    }

    pub fn unit(self) -> &'static str {
        match self {
            Metric::MaxRss
            | Metric::RssNoGuest
            | Metric::GuestRss
            | Metric::MigBytes
            | Metric::MigDirtyBytes
            | Metric::MigFullBytes
            | Metric::SnapSize
            | Metric::SnapFullSize
            | Metric::StoreBytes
            | Metric::StoreDiskBytes
            | Metric::StoreWriteBytes
            | Metric::StoreWriteDiskBytes => "MiB",
            Metric::MigDirtyRate
            | Metric::MigFullDirtyRate
            | Metric::MigDirtyDirtyRate
            | Metric::LoopbackBw => "MiB/s",
            Metric::MigCopyRatio
            | Metric::MigDirtyCopyRatio
            | Metric::MigFullCopyRatio
            | Metric::MigFullRounds
            | Metric::MigRounds
            | Metric::MigDirtyRounds => "",
            Metric::Pio
            | Metric::PioKernel
            | Metric::NetTxFps
            | Metric::NetRxFps
            | Metric::NetTxFps60
            | Metric::NetRxFps60 => "/s",
            Metric::BlkSeqWrite | Metric::BlkSeqRead | Metric::NetTxMbps | Metric::NetRxMbps => {
                "MB/s"
            }
            Metric::BlkRandRead => "IOPS",
            Metric::NetTxSeen => "%",
            _ => "ms",
        }
    }
}

/// Samples and failures of one run of the tool.
#[derive(Default, Debug)]
pub struct Results {
    pub samples: BTreeMap<(Metric, Sut), Vec<f64>>,
    /// The same samples by alternation round, for per-round ratios.
    pub by_round: BTreeMap<(Metric, Sut), BTreeMap<usize, f64>>,
    pub failures: BTreeMap<(Metric, Sut), Vec<String>>,
    /// Why a whole system or metric was not measured (e.g. a missing binary).
    pub skipped: BTreeMap<(Metric, Sut), String>,
}

impl Results {
    /// Records `v` for (m, s) from alternation round `round`.
    pub fn add(&mut self, m: Metric, s: Sut, round: usize, v: f64) {
        self.samples.entry((m, s)).or_default().push(v);
        self.by_round.entry((m, s)).or_default().insert(round, v);
    }

    /// The median over rounds of ours/theirs, using only rounds where both were measured:
    /// steadier than the ratio of medians when the host's load drifts during a run.
    pub fn paired_ratio(&self, ours: (Metric, Sut), theirs: (Metric, Sut)) -> Option<f64> {
        let a = self.by_round.get(&ours)?;
        let b = self.by_round.get(&theirs)?;
        let ratios: Vec<f64> = a
            .iter()
            .filter_map(|(round, x)| ratio(Some(*x), b.get(round).copied()))
            .collect();
        median(&ratios)
    }

    pub fn fail(&mut self, m: Metric, s: Sut, why: impl Into<String>) {
        self.failures.entry((m, s)).or_default().push(why.into());
    }

    pub fn skip(&mut self, m: Metric, s: Sut, why: impl Into<String>) {
        self.skipped.entry((m, s)).or_insert_with(|| why.into());
    }

    pub fn median(&self, m: Metric, s: Sut) -> Option<f64> {
        self.samples.get(&(m, s)).and_then(|v| median(v))
    }

    /// Why (m, s) has no samples, if it has none.
    pub fn why_missing(&self, m: Metric, s: Sut) -> Option<String> {
        if self.median(m, s).is_some() {
            return None;
        }
        if let Some(f) = self.failures.get(&(m, s)).and_then(|f| f.first()) {
            return Some(f.clone());
        }
        if let Some(w) = self.skipped.get(&(m, s)) {
            return Some(w.clone());
        }
        Some("not run".to_string())
    }
}

/// One row of a summary table: `ours` compared with `theirs` against `target`.
#[derive(Clone, Copy, Debug)]
pub struct Row {
    pub metric: Metric,
    pub ours: Sut,
    /// The comparator's metric (the same as `metric` unless a row compares across them).
    pub their_metric: Metric,
    pub theirs: Sut,
    pub target: Target,
}

impl Row {
    pub const fn new(metric: Metric, theirs: Sut, target: Target) -> Row {
        Row::across(metric, metric, theirs, target)
    }

    /// ferro-vmm's `metric` against `theirs`'s `their_metric`.
    pub const fn across(metric: Metric, their_metric: Metric, theirs: Sut, target: Target) -> Row {
        Row {
            metric,
            ours: Sut::Ferro,
            their_metric,
            theirs,
            target,
        }
    }
}

/// Markdown table cells must not contain `|` or newlines.
fn cell(s: &str) -> String {
    let s = s.replace('|', "/").replace(['\n', '\r'], " ");
    if s.chars().count() > 160 {
        let t: String = s.chars().take(157).collect();
        format!("{t}...")
    } else {
        s
    }
}

fn value_cell(r: &Results, m: Metric, s: Sut) -> String {
    match r.median(m, s) {
        Some(v) => fmt_value(v, m.unit()),
        None => cell(&format!(
            "not measured: {}",
            r.why_missing(m, s).unwrap_or_default()
        )),
    }
}

/// The summary table for `rows`.
pub fn summary_table(r: &Results, rows: &[Row]) -> String {
    let mut t = String::from(
        "| metric | ferro-vmm median | comparator median | ratio | per-round ratio | target | pass/fail |\n\
         | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for row in rows {
        let ours = r.median(row.metric, row.ours);
        let theirs = r.median(row.their_metric, row.theirs);
        let rat = ratio(ours, theirs)
            .map(fmt_ratio)
            .unwrap_or_else(|| "—".into());
        let verdict: Verdict = row.target.judge(ours, theirs);
        let paired = r
            .paired_ratio((row.metric, row.ours), (row.their_metric, row.theirs))
            .map(fmt_ratio)
            .unwrap_or_else(|| "—".into());
        t.push_str(&format!(
            "| {} (vs {}) | {} | {} | {} | {} | {} | {} |\n",
            row.metric.label(),
            row.theirs.label(),
            value_cell(r, row.metric, row.ours),
            value_cell(r, row.their_metric, row.theirs),
            rat,
            paired,
            row.target.describe(row.metric.unit()),
            verdict.label()
        ));
    }
    t
}

/// Every (metric, system) with n, min, median, max and failed runs.
pub fn spread_table(r: &Results, metrics: &[Metric]) -> String {
    let mut t = String::from(
        "| metric | system | runs | min | median | max | failed runs |\n\
         | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    let mut keys: Vec<(Metric, Sut)> = r
        .samples
        .keys()
        .chain(r.failures.keys())
        .copied()
        .filter(|(m, _)| metrics.contains(m))
        .collect();
    keys.sort();
    keys.dedup();
    for (m, s) in keys {
        let v = r.samples.get(&(m, s)).cloned().unwrap_or_default();
        let f = r.failures.get(&(m, s)).map(|f| f.len()).unwrap_or(0);
        let (lo, hi) = match min_max(&v) {
            Some((lo, hi)) => (fmt_value(lo, m.unit()), fmt_value(hi, m.unit())),
            None => ("—".into(), "—".into()),
        };
        let med = median(&v)
            .map(|x| fmt_value(x, m.unit()))
            .unwrap_or_else(|| "—".into());
        let failed = match r.failures.get(&(m, s)).and_then(|f| f.first()) {
            Some(first) => cell(&format!("{f}: {first}")),
            None => "0".into(),
        };
        t.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            m.label(),
            s.label(),
            v.len(),
            lo,
            med,
            hi,
            failed
        ));
    }
    t
}

/// The marker pair around a generated section of docs/benchmarks.md.
fn markers(name: &str) -> (String, String) {
    (
        format!("<!-- ferro-bench:{name}:begin -->"),
        format!("<!-- ferro-bench:{name}:end -->"),
    )
}

/// Wraps `body` in the section markers of `name`.
pub fn section(name: &str, body: &str) -> String {
    let (b, e) = markers(name);
    format!("{b}\n{}\n{e}\n", body.trim_end())
}

/// The section `name` (markers included) of an earlier docs/benchmarks.md, if it has one.
pub fn old_section(doc: &str, name: &str) -> Option<String> {
    let (b, e) = markers(name);
    let start = doc.find(&b)?;
    let end = doc[start..].find(&e)? + start + e.len();
    Some(format!("{}\n", &doc[start..end]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_round_trip() {
        let doc = format!(
            "# intro\n{}\nmiddle\n{}",
            section("vmm", "table A\n"),
            section("lab", "table B")
        );
        assert_eq!(
            old_section(&doc, "vmm").unwrap(),
            "<!-- ferro-bench:vmm:begin -->\ntable A\n<!-- ferro-bench:vmm:end -->\n"
        );
        assert!(old_section(&doc, "lab").unwrap().contains("table B"));
        assert!(old_section(&doc, "other").is_none());
        assert!(old_section("<!-- ferro-bench:vmm:begin --> no end", "vmm").is_none());
    }

    #[test]
    fn tables() {
        let mut r = Results::default();
        for (i, v) in [2.0, 3.0, 2.5].into_iter().enumerate() {
            r.add(Metric::FirstByte, Sut::Ferro, i + 1, v);
        }
        for (i, v) in [30.0, 40.0, 35.0].into_iter().enumerate() {
            r.add(Metric::FirstByte, Sut::Microvm, i + 1, v);
        }
        r.fail(Metric::FirstByte, Sut::Q35, "exit status 1: boom");
        r.skip(Metric::Pio, Sut::Microvm, "qemu-system-x86_64 not found");
        r.add(Metric::Pio, Sut::Ferro, 1, 1000.0);
        let rows = [
            Row::new(Metric::FirstByte, Sut::Microvm, Target::RatioAtMost(0.1)),
            Row::new(Metric::FirstByte, Sut::Q35, Target::Info),
            Row::new(Metric::Pio, Sut::Microvm, Target::RatioAtLeast(1.05)),
        ];
        let t = summary_table(&r, &rows);
        assert!(t.contains(
            "| first serial byte (vs QEMU microvm) | 2.50 ms | 35.0 ms | 0.071× | 0.071× | ≤ 0.10× | pass |"
        ));
        assert!(t.contains("not measured: exit status 1: boom | — | — | — | info |"));
        assert!(t.contains(
            "not measured: qemu-system-x86_64 not found | — | — | ≥ 1.05× | not measured |"
        ));
        let s = spread_table(&r, &[Metric::FirstByte]);
        assert!(
            s.contains("| first serial byte | ferro-vmm | 3 | 2.00 ms | 2.50 ms | 3.00 ms | 0 |")
        );
        assert!(
            s.contains("| first serial byte | QEMU q35 | 0 | — | — | — | 1: exit status 1: boom |")
        );
        assert!(!s.contains("port-I/O"));
    }

    #[test]
    fn paired_ratios() {
        let mut r = Results::default();
        // Round 2 is slow for both (host load): the per-round ratios stay at 0.5.
        for (round, a, b) in [(1, 1.0, 2.0), (2, 10.0, 20.0), (3, 1.5, 3.0)] {
            r.add(Metric::Exit, Sut::Ferro, round, a);
            r.add(Metric::Exit, Sut::Microvm, round, b);
        }
        r.add(Metric::Exit, Sut::Ferro, 4, 100.0); // no partner: ignored
        let p = r.paired_ratio((Metric::Exit, Sut::Ferro), (Metric::Exit, Sut::Microvm));
        assert_eq!(p, Some(0.5));
        assert_eq!(
            r.paired_ratio((Metric::Exit, Sut::Ferro), (Metric::Exit, Sut::Q35)),
            None
        );
    }

    #[test]
    fn cells_are_sanitised() {
        assert_eq!(cell("a|b\nc"), "a/b c");
        assert_eq!(cell(&"x".repeat(200)).chars().count(), 160);
    }
}
