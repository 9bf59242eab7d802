//! Live migration on /dev/kvm: the probe's `count=` workload (a counter, and memory it keeps
//! rewriting) runs under a source `ferro-vmm --control`, a destination `ferro-vmm --incoming
//! tcp:127.0.0.1:0` waits, and a `migrate` request moves the VM while it runs. The destination
//! must carry on where the source stopped (counter, clock and the checksum of the memory, which
//! the host recomputes); the source must exit 0 only after that. Failed migrations (nobody
//! listening, a peer that hangs up, a destination killed mid-way, another protocol version)
//! must leave the source running and answering.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

use ferro_tests::{kvm_available, vmm};

#[path = "probe_migrate/harness.rs"]
mod harness;

use harness::*;

#[test]
fn migrate_a_dirtying_guest_to_a_new_process() {
    if !kvm_available("migrate_a_dirtying_guest_to_a_new_process") {
        return;
    }
    let dir = scratch("dirtying");
    let (mut dst, port) = Vmm::destination(&dir);
    let waiting = dst.request(r#"{"cmd":"status"}"#);
    assert_eq!(waiting["status"]["state"], "incoming", "{waiting}");
    assert_eq!(
        dst.request(r#"{"cmd":"pause"}"#)["code"],
        "invalid_state",
        "an incoming VMM answers only status"
    );
    let mut src = Vmm::source(&dir, "count=1000", &["--memory", "512", "--cpus", "2"]);
    src.wait_tick(20);
    let started = Instant::now();
    let answer = migrate(&src, port, "");
    let took = started.elapsed();
    let r = &answer[0];
    assert_eq!(r["result"], "ok", "{r}\n{}", src.stderr());
    let m = &r["status"]["migration"];
    assert_eq!(m["phase"], "completed", "{r}");
    let rounds = m["rounds"].as_u64().unwrap();
    let bytes = m["bytes"].as_u64().unwrap();
    let downtime = m["downtime_ms"].as_u64().unwrap();
    // At least round 0 and the stop-and-copy round; at least the 4 MiB the guest writes; far
    // less than its 512 MiB (untouched memory is not sent).
    assert!((2..=31).contains(&rounds), "{r}");
    assert!(bytes > 4 << 20 && bytes < 64 << 20, "{r}");
    assert!(downtime <= took.as_millis() as u64, "{r}");
    assert!(m["final_dirty_pages"].is_u64(), "{r}");
    let exit = answer.get(1).expect("the exit event follows the answer");
    assert_eq!(
        (&exit["event"], &exit["reason"], &exit["code"]),
        (&"exit".into(), &"migrated".into(), &0.into()),
        "{exit}"
    );
    assert_eq!(
        src.wait(Duration::from_secs(10)),
        Some(0),
        "{}",
        src.stderr()
    );
    assert!(
        src.stderr().contains("migrated to 127.0.0.1"),
        "{}",
        src.stderr()
    );

    assert_eq!(
        dst.wait(Duration::from_secs(60)),
        Some(0),
        "{}",
        dst.stderr()
    );
    // The source's last line may be cut where the vCPU stopped (the destination prints the
    // rest of it): only whole lines count.
    let mut src_lines = src.lines();
    src_lines.pop();
    let before = ticks(&src_lines);
    let after = ticks(&dst.lines());
    let last = *before.last().unwrap();
    let first = *after.first().expect("the destination printed no tick");
    // The destination goes on from where the source stopped: the tick after the last whole
    // line (or the one after, when the pause fell inside a line), never back; its clock too.
    assert!(
        (last.tick + 1..=last.tick + 2).contains(&first.tick),
        "{first:?} after {last:?}"
    );
    assert!(first.rounds > last.rounds && first.clock > last.clock);
    for w in after.windows(2) {
        assert_eq!(w[1].tick, w[0].tick + 1, "{w:?}");
        assert!(
            w[1].rounds > w[0].rounds && w[1].clock > w[0].clock,
            "{w:?}"
        );
    }
    assert_eq!(after.last().unwrap().tick, 1000);
    check_sums("source", &before[before.len().saturating_sub(3)..]);
    check_sums("destination", &after[..3.min(after.len())]);
    check_sums("destination", &after[after.len() - 2..]);
    let lines = dst.lines();
    assert!(lines.iter().any(|l| l == "count_done=1000"));
    assert!(lines.iter().any(|l| l == "probe=exit:poweroff"));
    println!(
        "dirtying guest (512 MiB, 2 vCPUs, 4 MiB rewritten): total {} ms, downtime {downtime} ms, {} KiB, {rounds} rounds, {} pages in the last round; {}",
        m["total_ms"], bytes >> 10, m["final_dirty_pages"],
        src.stderr().lines().find(|l| l.contains("stop-and-copy")).unwrap_or_default()
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn migrate_an_idle_guest_with_a_device() {
    if !kvm_available("migrate_an_idle_guest_with_a_device") {
        return;
    }
    let dir = scratch("idle");
    let (mut dst, port) = Vmm::destination(&dir);
    // The probe reads the rng, then halts: an idle guest with a virtio device, whose state and
    // the pages the device wrote must arrive too.
    let mut src = Vmm::source(
        &dir,
        "smp=off rng=4096 exit=halt",
        &["--memory", "256", "--rng"],
    );
    let t = Instant::now();
    while !src.lines().iter().any(|l| l.starts_with("rng_bytes=")) {
        assert!(t.elapsed() < Duration::from_secs(30), "{:?}", src.lines());
        std::thread::sleep(Duration::from_millis(10));
    }
    let answer = migrate(&src, port, r#","downtime_ms":20"#);
    let r = &answer[0];
    assert_eq!(r["result"], "ok", "{r}\n{}", src.stderr());
    let m = &r["status"]["migration"];
    assert_eq!(
        src.wait(Duration::from_secs(10)),
        Some(0),
        "{}",
        src.stderr()
    );
    let s = dst.request(r#"{"cmd":"status"}"#);
    assert_eq!(s["status"]["state"], "running", "{s}");
    assert_eq!(s["status"]["vcpus"], 1, "{s}");
    // The halted guest is woken by nothing; the destination runs it until it is told to quit.
    let q = dst.request_lines(r#"{"cmd":"quit"}"#, 2);
    assert_eq!(q[1]["reason"], "quit", "{q:?}");
    assert_eq!(
        dst.wait(Duration::from_secs(10)),
        Some(0),
        "{}",
        dst.stderr()
    );
    println!(
        "idle guest (256 MiB, rng): total {} ms, downtime {} ms, {} KiB, {} rounds, {} pages in the last round",
        m["total_ms"],
        m["downtime_ms"],
        m["bytes"].as_u64().unwrap() >> 10,
        m["rounds"],
        m["final_dirty_pages"]
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_migrated_vm_that_reboots_starts_again_from_its_configuration() {
    if !kvm_available("a_migrated_vm_that_reboots_starts_again_from_its_configuration") {
        return;
    }
    let dir = scratch("reboot");
    let mut cmd = Command::new(vmm());
    cmd.args(["--incoming", "tcp:127.0.0.1:0", "--on-reboot", "restart"]);
    let (mut dst, port) = Vmm::destination_from(&mut cmd, &dir);
    let mut src = Vmm::source(&dir, "count=150 exit=reboot smp=off", &["--memory", "64"]);
    src.wait_tick(5);
    assert_eq!(
        migrate(&src, port, "")[0]["result"],
        "ok",
        "{}",
        src.stderr()
    );
    assert_eq!(src.wait(Duration::from_secs(10)), Some(0));
    // The guest reboots on the destination, which boots it afresh in place (same pid):
    // a second probe=start, and boots = 2.
    let t = Instant::now();
    while dst.lines().iter().filter(|l| *l == "probe=start").count() < 1 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{}\n{:?}",
            dst.stderr(),
            dst.lines()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let t = Instant::now();
    let s = loop {
        if let Ok(mut c) = UnixStream::connect(&dst.control) {
            let _ = writeln!(c, r#"{{"cmd":"status"}}"#);
            let mut line = String::new();
            let _ = BufReader::new(c).read_line(&mut line);
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                if v["status"]["boots"] == 2 {
                    break v;
                }
            }
        }
        assert!(t.elapsed() < Duration::from_secs(30), "{}", dst.stderr());
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(s["status"]["state"], "running", "{s}");
    let q = dst.request_lines(r#"{"cmd":"quit"}"#, 2);
    assert_eq!(q[1]["reason"], "quit", "{q:?}");
    assert_eq!(
        dst.wait(Duration::from_secs(10)),
        Some(0),
        "{}",
        dst.stderr()
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn migrate_during_disk_io() {
    if !kvm_available("migrate_during_disk_io") {
        return;
    }
    let dir = scratch("disk");
    // Disks are shared storage: both VMMs open the same file at the same path.
    let disk = dir.join("disk.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(512 << 20)
        .unwrap();
    let (mut dst, port) = Vmm::destination(&dir);
    // The probe writes a pattern over the whole disk, flushes and reads it back: the block
    // device writes guest memory (used ring, read data) from its own threads all along, which
    // KVM's dirty log does not see; the destination's memory check must still agree.
    let mut src = Vmm::source(
        &dir,
        "smp=off blk=write blk_sectors=1048576",
        &[
            "--memory",
            "128",
            "--disk",
            &format!("path={}", disk.display()),
        ],
    );
    src.wait_line("blk_capacity=");
    std::thread::sleep(Duration::from_millis(150));
    let answer = migrate(&src, port, "");
    let r = &answer[0];
    assert_eq!(r["result"], "ok", "{r}\n{}", src.stderr());
    assert_eq!(
        src.wait(Duration::from_secs(10)),
        Some(0),
        "{}",
        src.stderr()
    );
    assert_eq!(
        dst.wait(Duration::from_secs(60)),
        Some(0),
        "{}",
        dst.stderr()
    );
    let all = [src.lines(), dst.lines()].concat().join("\n");
    assert!(all.contains("blk_write=ok"), "{all}");
    assert!(all.contains("blk_flush=ok"), "{all}");
    assert!(all.contains("blk_verify=ok"), "{all}");
    let m = &r["status"]["migration"];
    let resent = src
        .stderr()
        .lines()
        .find(|l| l.contains("written by devices"))
        .unwrap_or_default()
        .to_string();
    println!(
        "guest doing disk I/O (128 MiB): total {} ms, downtime {} ms, {} KiB, {} rounds; {resent}",
        m["total_ms"],
        m["downtime_ms"],
        m["bytes"].as_u64().unwrap() >> 10,
        m["rounds"]
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn migrate_a_vm_restored_from_a_snapshot() {
    if !kvm_available("migrate_a_vm_restored_from_a_snapshot") {
        return;
    }
    // A restored VM's memory is mapped from the snapshot's file: pages it has not touched
    // since hold the file's bytes, not zeros, and must be sent all the same.
    let dir = scratch("restored");
    let snap = dir.join("snap");
    let first = Vmm::source(&dir, "count=1000 smp=off", &["--memory", "128"]);
    first.wait_tick(5);
    let r = first.request(&format!(
        r#"{{"cmd":"snapshot","dir":"{}","resume":false}}"#,
        snap.display()
    ));
    assert_eq!(r["result"], "ok", "{r}");
    drop(first);
    let mut cmd = Command::new(vmm());
    cmd.arg("--restore")
        .arg(&snap)
        .env("FERRO_MIGRATE_VERIFY", "1");
    let mut src = Vmm::spawn(&mut cmd, dir.join("src.sock"));
    let t = Instant::now();
    while UnixStream::connect(&src.control).is_err() {
        assert!(t.elapsed() < Duration::from_secs(10), "{}", src.stderr());
        std::thread::sleep(Duration::from_millis(5));
    }
    let (mut dst, port) = Vmm::destination(&dir);
    let at = ticks(&src.lines()).first().map_or(6, |t| t.tick);
    src.wait_tick(at + 3);
    let answer = migrate(&src, port, "");
    assert_eq!(answer[0]["result"], "ok", "{}\n{}", answer[0], src.stderr());
    assert_eq!(
        src.wait(Duration::from_secs(10)),
        Some(0),
        "{}",
        src.stderr()
    );
    assert_eq!(
        dst.wait(Duration::from_secs(60)),
        Some(0),
        "{}",
        dst.stderr()
    );
    let after = ticks(&dst.lines());
    assert_eq!(after.last().unwrap().tick, 1000);
    check_sums("destination", &after[..3.min(after.len())]);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_migrated_vm_sets_up_and_uses_its_device_on_the_destination() {
    if !kvm_available("a_migrated_vm_sets_up_and_uses_its_device_on_the_destination") {
        return;
    }
    // The probe counts, then enumerates PCI, sets the rng up (BAR, MSI-X, queue) and reads
    // it: all of that on the destination, on the device state that came from the source.
    // (migrate_during_disk_io moves a device in the middle of its work.)
    let dir = scratch("device");
    let (mut dst, port) = Vmm::destination(&dir);
    let mut src = Vmm::source(&dir, "count=60 smp=off rng=4096", &["--rng"]);
    src.wait_tick(10);
    assert_eq!(
        migrate(&src, port, "")[0]["result"],
        "ok",
        "{}",
        src.stderr()
    );
    assert_eq!(src.wait(Duration::from_secs(10)), Some(0));
    assert_eq!(
        dst.wait(Duration::from_secs(60)),
        Some(0),
        "{}",
        dst.stderr()
    );
    let out = dst.lines().join("\n");
    assert!(out.contains("rng_bytes=4096"), "{out}");
    assert!(!out.contains("rng_irqs=0"), "{out}");
    assert!(!src.lines().iter().any(|l| l.starts_with("rng_bytes=")));
    std::fs::remove_dir_all(dir).unwrap();
}

/// The source answered `answer` with an error containing `want`, and still runs the guest.
fn still_running(src: &Vmm, answer: &serde_json::Value, want: &str) {
    assert_eq!(answer["result"], "error", "{answer}");
    let message = answer["message"].as_str().unwrap();
    assert!(message.contains(want), "want {want:?}: {message}");
    assert!(!message.contains('\n'), "{message}");
    let s = src.request(r#"{"cmd":"status"}"#);
    assert_eq!(s["status"]["state"], "running", "{s}");
    assert_eq!(s["status"]["migration"]["phase"], "failed", "{s}");
    let at = ticks(&src.lines()).last().unwrap().tick;
    src.wait_tick(at + 3);
}

#[test]
fn failed_migrations_leave_the_source_running() {
    if !kvm_available("failed_migrations_leave_the_source_running") {
        return;
    }
    let dir = scratch("failed");
    let mut src = Vmm::source(&dir, "count=100000", &["--memory", "128"]);
    src.wait_tick(5);

    // Nobody listens.
    let free = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = free.local_addr().unwrap().port();
    drop(free);
    let a = migrate(&src, port, "");
    still_running(&src, &a[0], "cannot connect");

    // A listener that hangs up at once.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let t = std::thread::spawn(move || drop(l.accept()));
    let a = migrate(&src, port, "");
    t.join().unwrap();
    still_running(&src, &a[0], "migration to 127.0.0.1");

    // A peer of another protocol version.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let t = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut hello = b"FERROMIG".to_vec();
        hello.extend_from_slice(&99u32.to_le_bytes());
        hello.extend_from_slice(&0u32.to_le_bytes());
        s.write_all(&hello).unwrap();
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    });
    let a = migrate(&src, port, "");
    t.join().unwrap();
    still_running(&src, &a[0], "version 99");

    // A real destination killed mid-way: the stream goes through a proxy that stops after
    // 2 MiB (round 0 is under way), so the source is seen migrating; then the destination is
    // killed and the proxy hangs up on the source.
    let (mut dst, port) = Vmm::destination(&dir);
    let proxy = Proxy::start(port, 2 << 20);
    let mut conn = UnixStream::connect(&src.control).unwrap();
    conn.write_all(
        format!(
            "{{\"cmd\":\"migrate\",\"to\":\"127.0.0.1:{}\"}}\n",
            proxy.port
        )
        .as_bytes(),
    )
    .unwrap();
    proxy.stalled();
    let progress = src.request(r#"{"cmd":"status"}"#);
    assert_eq!(progress["status"]["state"], "migrating", "{progress}");
    let m = &progress["status"]["migration"];
    // Round 0 may have fitted in the socket buffers: then the vCPUs are paused already.
    assert!(
        m["phase"] == "precopy" || m["phase"] == "stop_and_copy",
        "{progress}"
    );
    assert!(m["bytes"].as_u64() > Some(1 << 20), "{progress}");
    let t = Instant::now();
    loop {
        let d = dst.request(r#"{"cmd":"status"}"#);
        assert_eq!(d["status"]["state"], "incoming", "{d}");
        if d["status"]["migration"]["pages"].as_u64() > Some(0) {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "{d}");
        std::thread::sleep(Duration::from_millis(20));
    }
    dst.kill();
    drop(proxy);
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line).unwrap();
    let a: serde_json::Value = serde_json::from_str(&line).unwrap();
    still_running(&src, &a, "migration to 127.0.0.1");

    // After all that the guest finishes on the source as if nothing happened.
    src.request(r#"{"cmd":"quit"}"#);
    assert_eq!(src.wait(Duration::from_secs(10)), Some(0));
    // `quit` may stop the vCPU in the middle of a line: only whole lines count.
    let mut lines = src.lines();
    lines.pop();
    let ts = ticks(&lines);
    for w in ts.windows(2) {
        assert_eq!(w[1].tick, w[0].tick + 1, "{w:?}");
    }
    check_sums("source", &ts[ts.len() - 2..]);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_destination_fed_a_broken_stream_exits_1_with_one_line() {
    if !kvm_available("a_destination_fed_a_broken_stream_exits_1_with_one_line") {
        return;
    }
    let dir = scratch("broken");
    for (what, bytes, want) in [
        (
            "not our protocol",
            b"GET / HTTP/1.1\r\n\r\n".to_vec(),
            "does not speak",
        ),
        ("cut after the hello", hello(WIRE), "closed the connection"),
        ("the version before", hello(WIRE - 1), "version 2"),
        ("another version", hello(7), "version 7"),
        (
            "garbage after the hello",
            [hello(WIRE), vec![0x99, 0, 0, 0, 0]].concat(),
            "unknown record kind",
        ),
    ] {
        let (mut dst, port) = Vmm::destination(&dir);
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(&bytes).unwrap();
        let _ = s.shutdown(std::net::Shutdown::Write);
        assert_eq!(dst.wait(Duration::from_secs(10)), Some(1), "{what}");
        let err = dst.stderr();
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 2, "{what}: {err}");
        assert!(lines[1].contains(want), "{what}: want {want:?}: {err}");
        assert!(
            !dir.join("dst.sock").exists(),
            "{what}: the control socket stayed"
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// The migration stream's version (`ferro_vmm::migration::wire::VERSION`).
const WIRE: u32 = 3;

fn hello(version: u32) -> Vec<u8> {
    let mut h = b"FERROMIG".to_vec();
    h.extend_from_slice(&version.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h
}

#[test]
fn a_destination_with_a_token_turns_away_everyone_else() {
    if !kvm_available("a_destination_with_a_token_turns_away_everyone_else") {
        return;
    }
    let dir = scratch("token");
    let token = dir.join("token");
    std::fs::write(&token, "s3cret-one-time\n").unwrap();
    let mut cmd = Command::new(vmm());
    cmd.args(["--incoming", "tcp:127.0.0.1:0", "--incoming-token-file"])
        .arg(&token);
    let (mut dst, port) = Vmm::destination_from(&mut cmd, &dir);
    let mut src = Vmm::source(&dir, "count=1000", &["--memory", "64"]);
    src.wait_tick(5);
    // Someone who speaks the protocol but has no token, then a wrong one, then a stranger
    // that says nothing useful: each is turned away with a reason, and the wait goes on.
    let r = &migrate(&src, port, "")[0];
    still_running(&src, r, "only with its migration token");
    let r = &migrate(&src, port, r#","token":"guess""#)[0];
    still_running(&src, r, "wrong migration token");
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    assert_eq!(
        dst.request(r#"{"cmd":"status"}"#)["status"]["state"],
        "incoming",
        "{}",
        dst.stderr()
    );
    // The source with the token moves the VM.
    let before = ticks(&src.lines()).last().unwrap().tick;
    let r = &migrate(&src, port, r#","token":"s3cret-one-time""#)[0];
    assert_eq!(r["result"], "ok", "{r}\n{}", dst.stderr());
    assert_eq!(src.wait(Duration::from_secs(10)), Some(0));
    dst.wait_tick(before + 3);
    let err = dst.stderr();
    assert_eq!(err.matches("turned away").count(), 3, "{err}");
    dst.kill();
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn migrate_during_disk_reads() {
    if !kvm_available("migrate_during_disk_reads") {
        return;
    }
    // The guest only reads here: the block device fills its buffers from the disk and the
    // guest just checks them, so no vCPU write (KVM's dirty log) ever names those pages. Only
    // the device-write tracking sends them again; the destination's memory check and the
    // guest's own check of what it read fail without it.
    let dir = scratch("disk-reads");
    let disk = dir.join("disk.raw");
    let sectors: u64 = 512 << 11;
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(sectors * 512)
        .unwrap();
    ferro_tests::write_blk_pattern(&disk, sectors, 3);
    let (mut dst, port) = Vmm::destination(&dir);
    let mut src = Vmm::source(
        &dir,
        &format!("smp=off blk=verify blk_seed=3 blk_sectors={sectors} blk_qd=2"),
        &[
            "--memory",
            "128",
            "--disk",
            &format!("path={},readonly=on", disk.display()),
        ],
    );
    src.wait_line("blk_capacity=");
    std::thread::sleep(Duration::from_millis(100));
    let answer = migrate(&src, port, "");
    let r = &answer[0];
    assert_eq!(r["result"], "ok", "{r}\n{}\n{}", src.stderr(), dst.stderr());
    assert_eq!(
        src.wait(Duration::from_secs(10)),
        Some(0),
        "{}",
        src.stderr()
    );
    assert_eq!(
        dst.wait(Duration::from_secs(60)),
        Some(0),
        "{}",
        dst.stderr()
    );
    let (s, d) = (src.lines().join("\n"), dst.lines().join("\n"));
    assert!(d.contains("blk_verify=ok"), "src {s}\ndst {d}");
    assert!(
        !s.contains("blk_verify"),
        "the guest finished before it moved: {s}"
    );
    let devices = src
        .stderr()
        .lines()
        .find(|l| l.contains("written by devices"))
        .unwrap_or_default()
        .to_string();
    println!("guest reading its disk: {devices}");
    std::fs::remove_dir_all(dir).unwrap();
}
