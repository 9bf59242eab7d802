//! `ferro daemon` and the `ferro` CLI end to end: real daemon, real VMMs, the probe guest.

use std::time::{Duration, Instant};

use ferro_tests::{kvm_available, probe, Daemon};
use serde_json::Value;

fn create(d: &Daemon, name: &str, cmdline: &str, restart: &str) -> Value {
    let p = probe().to_str().unwrap().to_string();
    d.json(&[
        "vm",
        "create",
        name,
        "--kernel",
        &p,
        "--cmdline",
        cmdline,
        "--memory",
        "64",
        "--restart",
        restart,
    ])
}

/// Polls `ferro vm show NAME --json` until `ok` holds.
fn wait_for(d: &Daemon, name: &str, limit: Duration, ok: impl Fn(&Value) -> bool) -> Value {
    let t = Instant::now();
    loop {
        let v = d.json(&["vm", "show", name]);
        if ok(&v) {
            return v;
        }
        assert!(t.elapsed() < limit, "timed out; last: {v}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn pid_of(v: &Value) -> u32 {
    v["pid"].as_u64().expect("a pid") as u32
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

fn kill9(pid: u32) {
    // SAFETY: kill(2) on the pid of a VMM this test's daemon started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

#[test]
fn daemon_create_start_show_stop_delete() {
    if !kvm_available("daemon_create_start_show_stop_delete") {
        return;
    }
    let d = Daemon::start("basic");
    let v = create(&d, "web", "exit=halt", "never");
    assert_eq!(v["state"], "stopped");
    assert!(v.get("pid").is_none());
    assert_eq!(v["restarts"], 0);
    let v = d.json(&["vm", "start", "web"]);
    assert_eq!(v["state"], "running");
    let pid = pid_of(&v);
    assert!(alive(pid));
    let v = d.json(&["vm", "show", "web"]);
    assert_eq!((v["state"].as_str(), pid_of(&v)), (Some("running"), pid));
    let list = d.json(&["vm", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 1);
    let table = d.ferro(&["vm", "list"]);
    assert!(
        table.stdout.contains("web") && table.stdout.contains("running"),
        "{}",
        table.stdout
    );
    // Deleting a running VM is refused without --force.
    let r = d.ferro(&["vm", "delete", "web"]);
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("--force"), "{}", r.stderr);
    // The probe ignores the power button: the forced stop comes after the timeout.
    let v = d.json(&["vm", "stop", "web", "--timeout", "0.2"]);
    assert_eq!(v["state"], "stopped");
    assert!(v.get("pid").is_none());
    assert!(!alive(pid));
    let kinds: Vec<String> = d
        .json(&["vm", "events", "web"])
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(kinds, ["created", "started", "stop_timeout", "stopped"]);
    let r = d.ferro(&["vm", "delete", "web"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(d.json(&["vm", "list"]), Value::Array(vec![]));
    assert!(!d.dir.join("vms/web").exists());
}

#[test]
fn daemon_failed_create_leaves_nothing() {
    let d = Daemon::start("badcreate");
    let r = d.ferro(&["vm", "create", "x", "--kernel", "/nonexistent/kernel"]);
    assert_eq!(r.code, Some(1));
    assert!(
        r.stderr
            .contains("kernel /nonexistent/kernel cannot be read"),
        "{}",
        r.stderr
    );
    let p = probe().to_str().unwrap().to_string();
    let r = d.ferro(&["vm", "create", "y", "--kernel", &p, "--cpus", "0"]);
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("bad_request"), "{}", r.stderr);
    assert_eq!(d.json(&["vm", "list"]), Value::Array(vec![]));
    assert!(!d.dir.join("vms/x").exists());
    // Duplicate names are refused and change nothing.
    create(&d, "z", "exit=halt", "never");
    let r = d.ferro(&["vm", "create", "z", "--kernel", &p, "--cpus", "2"]);
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("[conflict]"), "{}", r.stderr);
    assert_eq!(d.json(&["vm", "show", "z"])["cpus"], 1);
}

#[test]
fn daemon_malformed_requests_get_json_errors() {
    let d = Daemon::start("malformed");
    let p = probe().to_str().unwrap().to_string();
    let post = |body: &str| {
        d.http(&format!(
            "POST /v1/vms HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ))
    };
    for (body, status) in [
        ("{not json".to_string(), 400),
        (format!(r#"{{"name":"a","kernel":"{p}","cpu":2}}"#), 400),
        (
            format!(r#"{{"name":"a","kernel":"{p}","memory_mib":-5}}"#),
            400,
        ),
        (
            format!(r#"{{"name":"a","kernel":"{p}","memory_mib":1}}"#),
            400,
        ),
        (format!(r#"{{"name":"../a","kernel":"{p}"}}"#), 400),
        (
            format!(r#"{{"name":"a","kernel":"{p}","disks":[{{"path":"/no/such/disk"}}]}}"#),
            400,
        ),
    ] {
        let (s, b) = post(&body);
        assert_eq!(s, status, "{body}: {b}");
        let v: Value = serde_json::from_str(&b).unwrap_or_else(|e| panic!("{e}: {b}"));
        assert!(v["code"].is_string() && v["message"].is_string(), "{b}");
    }
    for (req, status, code) in [
        ("GET /v1/vms/nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 404, "not_found"),
        ("GET /v2/what HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 404, "not_found"),
        ("PUT /v1/vms HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", 405, "method_not_allowed"),
        ("POST /v1/vms/a/clone HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", 400, "bad_request"),
        ("POST /v1/vms/a/stop?timeout=abc HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", 400, "bad_request"),
    ] {
        let (s, b) = d.http(req);
        assert_eq!(s, status, "{req}: {b}");
        let v: Value = serde_json::from_str(&b).unwrap_or_else(|e| panic!("{e}: {b}"));
        assert_eq!(v["code"], code, "{b}");
    }
    assert_eq!(d.json(&["vm", "list"]), Value::Array(vec![]));
}

#[test]
fn daemon_restarts_a_killed_vmm_on_failure() {
    if !kvm_available("daemon_restarts_a_killed_vmm_on_failure") {
        return;
    }
    let d = Daemon::start("onfailure");
    create(&d, "svc", "exit=halt", "on-failure");
    let pid = pid_of(&d.json(&["vm", "start", "svc"]));
    let t = Instant::now();
    kill9(pid);
    let v = wait_for(&d, "svc", Duration::from_secs(1), |v| {
        v["state"] == "running" && v["pid"].as_u64().is_some_and(|p| p as u32 != pid)
    });
    assert!(t.elapsed() < Duration::from_secs(1));
    assert_eq!(v["restarts"], 1);
    assert!(alive(pid_of(&v)));
    let events = d.json(&["vm", "events", "svc"]).to_string();
    assert!(
        events.contains("\"crashed\"") && events.contains("\"restarted\""),
        "{events}"
    );
}

#[test]
fn daemon_never_policy_leaves_a_killed_vm_crashed() {
    if !kvm_available("daemon_never_policy_leaves_a_killed_vm_crashed") {
        return;
    }
    let d = Daemon::start("never");
    create(&d, "svc", "exit=halt", "never");
    let pid = pid_of(&d.json(&["vm", "start", "svc"]));
    kill9(pid);
    let v = wait_for(&d, "svc", Duration::from_secs(2), |v| {
        v["state"] == "crashed"
    });
    assert_eq!(v["restarts"], 0);
    assert!(v.get("pid").is_none());
    // A crashed VM starts again by hand.
    assert_eq!(d.json(&["vm", "start", "svc"])["state"], "running");
}

#[test]
fn daemon_guest_poweroff_stops_without_restart() {
    if !kvm_available("daemon_guest_poweroff_stops_without_restart") {
        return;
    }
    let d = Daemon::start("poweroff");
    // The probe waits for one byte of console input, then powers off.
    create(&d, "po", "exit=poweroff input=1", "on-failure");
    let v = d.json(&["vm", "start", "po"]);
    let sock = v["console_socket"].as_str().unwrap().to_string();
    let mut con = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    std::io::Write::write_all(&mut con, b"q").unwrap();
    let v = wait_for(&d, "po", Duration::from_secs(5), |v| {
        v["state"] == "stopped"
    });
    assert_eq!(v["restarts"], 0);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(d.json(&["vm", "show", "po"])["state"], "stopped");
    let events = d.json(&["vm", "events", "po"]).to_string();
    assert!(events.contains("powered_off"), "{events}");
    // The console output is kept after the VM stopped.
    let log = d.ferro(&["vm", "log", "po"]);
    assert!(log.stdout.contains("probe=exit:poweroff"), "{}", log.stdout);
}

#[test]
fn daemon_restart_readopts_running_vm() {
    if !kvm_available("daemon_restart_readopts_running_vm") {
        return;
    }
    let mut d = Daemon::start("readopt");
    create(&d, "keep", "exit=halt", "on-failure");
    let pid = pid_of(&d.json(&["vm", "start", "keep"]));
    d.restart();
    let v = d.json(&["vm", "show", "keep"]);
    assert_eq!(v["state"], "running");
    assert_eq!(pid_of(&v), pid, "same VMM");
    assert!(alive(pid));
    assert_eq!(v["restarts"], 0);
    let events = d.json(&["vm", "events", "keep"]).to_string();
    assert!(events.contains("adopted"), "{events}");
    // The adopted VMM is still watched: a crash is noticed and restarted.
    kill9(pid);
    let v = wait_for(&d, "keep", Duration::from_secs(2), |v| {
        v["state"] == "running" && v["pid"].as_u64().is_some_and(|p| p as u32 != pid)
    });
    assert_eq!(v["restarts"], 1);
}

#[test]
fn daemon_pause_resume_and_log() {
    if !kvm_available("daemon_pause_resume_and_log") {
        return;
    }
    let d = Daemon::start("pause");
    create(&d, "p", "exit=halt", "never");
    d.json(&["vm", "start", "p"]);
    assert_eq!(d.json(&["vm", "pause", "p"])["state"], "paused");
    let r = d.ferro(&["vm", "pause", "p"]);
    assert_eq!(r.code, Some(1), "pausing twice is refused");
    assert_eq!(d.json(&["vm", "resume", "p"])["state"], "running");
    let t = Instant::now();
    loop {
        let log = d.ferro(&["vm", "log", "p"]);
        if log.stdout.contains("probe=exit:halt") {
            assert!(log.stdout.starts_with("probe=start"), "{}", log.stdout);
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "{}", log.stdout);
        std::thread::sleep(Duration::from_millis(20));
    }
    // Reboot keeps the VMM process (restart in place).
    let pid = pid_of(&d.json(&["vm", "show", "p"]));
    assert_eq!(pid_of(&d.json(&["vm", "reboot", "p"])), pid);
    assert_eq!(d.json(&["vm", "stop", "p", "--force"])["state"], "stopped");
}

#[test]
fn daemon_console_attach_through_the_api() {
    if !kvm_available("daemon_console_attach_through_the_api") {
        return;
    }
    let d = Daemon::start("console");
    // The probe echoes one byte of console input, then powers off.
    create(&d, "c", "exit=poweroff input=1", "never");
    d.json(&["vm", "start", "c"]);
    let mut child = std::process::Command::new(ferro_tests::ferro())
        .args(["console", "c"])
        .env("FERRO_HOST", format!("unix:{}", d.socket().display()))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    std::io::Write::write_all(&mut stdin, b"z").unwrap();
    // stdin stays open: the session ends when the VM powers off and the console closes.
    let r = ferro_tests::wait_limited(child, Duration::from_secs(20));
    drop(stdin);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r.stdout.starts_with("probe=start"), "{}", r.stdout);
    assert!(r.stdout.contains("input=z"), "{}", r.stdout);
    assert!(r.stdout.contains("probe=exit:poweroff"), "{}", r.stdout);
    assert!(r.stderr.contains("console closed"), "{}", r.stderr);
    wait_for(&d, "c", Duration::from_secs(5), |v| v["state"] == "stopped");
    // A stopped VM has no console to attach to.
    let r = d.ferro(&["console", "c"]);
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("start it first"), "{}", r.stderr);
}

#[test]
fn daemon_crash_loop_gives_up() {
    if !kvm_available("daemon_crash_loop_gives_up") {
        return;
    }
    let d = Daemon::start("crashloop");
    // exit=panic: the VMM ends with status 3 right after boot, every time.
    create(&d, "loop", "exit=panic smp=off", "on-failure");
    d.json(&["vm", "start", "loop"]);
    // Restarts back off (0, 250, 500, 1000, 2000 ms); while it waits the VM shows as crashed.
    let t = Instant::now();
    let events = loop {
        let e = d.json(&["vm", "events", "loop"]).to_string();
        if e.contains("crash_loop") {
            break e;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "{e}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(events.contains("status 3"), "{events}");
    let v = d.json(&["vm", "show", "loop"]);
    assert_eq!(v["state"], "crashed");
    assert_eq!(v["restarts"], 5, "{v}");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        d.json(&["vm", "show", "loop"])["state"],
        "crashed",
        "no restart after giving up"
    );
}

#[test]
fn daemon_edit_a_stopped_vm_only() {
    if !kvm_available("daemon_edit_a_stopped_vm_only") {
        return;
    }
    let d = Daemon::start("edit");
    create(&d, "e", "exit=halt", "never");
    let v = d.json(&[
        "vm",
        "edit",
        "e",
        "--cpus",
        "2",
        "--memory",
        "128M",
        "--restart",
        "always",
    ]);
    assert_eq!(
        (
            v["cpus"].as_u64(),
            v["memory_mib"].as_u64(),
            v["restart"].as_str()
        ),
        (Some(2), Some(128), Some("always"))
    );
    d.json(&["vm", "start", "e"]);
    let r = d.ferro(&["vm", "edit", "e", "--cpus", "4"]);
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("stop it before"), "{}", r.stderr);
    // The restart policy may change while it runs.
    assert_eq!(
        d.json(&["vm", "edit", "e", "--restart", "never"])["restart"],
        "never"
    );
    let r = d.ferro(&["vm", "edit", "e", "--memory", "1"]);
    assert_eq!(r.code, Some(1));
}

#[test]
fn daemon_restart_applies_policy_to_a_vmm_that_died_meanwhile() {
    if !kvm_available("daemon_restart_applies_policy_to_a_vmm_that_died_meanwhile") {
        return;
    }
    let mut d = Daemon::start("lost");
    create(&d, "a", "exit=halt", "on-failure");
    create(&d, "b", "exit=halt", "never");
    let pa = pid_of(&d.json(&["vm", "start", "a"]));
    let pb = pid_of(&d.json(&["vm", "start", "b"]));
    d.kill();
    kill9(pa);
    kill9(pb);
    // Orphans are reaped by init; wait until both are gone.
    let t = Instant::now();
    while alive(pa) || alive(pb) {
        assert!(t.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(10));
    }
    d.restart();
    let a = wait_for(&d, "a", Duration::from_secs(2), |v| v["state"] == "running");
    assert_eq!(a["restarts"], 1);
    assert_ne!(pid_of(&a), pa);
    let b = d.json(&["vm", "show", "b"]);
    assert_eq!(b["state"], "crashed");
    let events = d.json(&["vm", "events", "b"]).to_string();
    assert!(events.contains("\"lost\""), "{events}");
}

#[test]
fn daemon_tcp_needs_the_bearer_token() {
    let dir = std::env::temp_dir().join(format!("ferro-d-{}-tcp", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let token = dir.join("token");
    std::fs::write(&token, "s3cret\n").unwrap();
    // A free port: bind 0, read it, release it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut daemon = std::process::Command::new(ferro_tests::ferro())
        .args([
            "daemon",
            "--data-dir",
            dir.to_str().unwrap(),
            "--listen",
            &format!("tcp:127.0.0.1:{port}"),
            "--token-file",
            token.to_str().unwrap(),
        ])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "daemon did not listen"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let host = format!("http://127.0.0.1:{port}");
    let run = |args: &[&str]| -> ferro_tests::Run {
        std::process::Command::new(ferro_tests::ferro())
            .args(args)
            .env("FERRO_HOST", &host)
            .output()
            .unwrap()
            .into()
    };
    let r = run(&["vm", "list"]);
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("[unauthorized]"), "{}", r.stderr);
    let r = run(&[
        "vm",
        "list",
        "--json",
        "--token-file",
        token.to_str().unwrap(),
    ]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(r.stdout.trim(), "[]");
    let _ = daemon.kill();
    let _ = daemon.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn daemon_cli_completions_and_unreachable_daemon() {
    let r: ferro_tests::Run = std::process::Command::new(ferro_tests::ferro())
        .args(["completions", "bash"])
        .output()
        .unwrap()
        .into();
    assert_eq!(r.code, Some(0));
    assert!(
        r.stdout.contains("ferro") && r.stdout.contains("complete"),
        "{}",
        &r.stdout[..200.min(r.stdout.len())]
    );
    let r: ferro_tests::Run = std::process::Command::new(ferro_tests::ferro())
        .args(["vm", "list", "--host", "unix:/nonexistent/ferro.sock"])
        .output()
        .unwrap()
        .into();
    assert_eq!(r.code, Some(1));
    assert!(
        r.stderr.contains("is `ferro daemon` running?"),
        "{}",
        r.stderr
    );
}

#[test]
fn daemon_edit_adds_and_removes_devices_and_refuses_bad_edits_whole() {
    if !kvm_available("daemon_edit_adds_and_removes_devices_and_refuses_bad_edits_whole") {
        return;
    }
    let d = Daemon::start("edit-devices");
    let disks: Vec<String> = (0..3)
        .map(|i| {
            let p = d.dir.join(format!("d{i}.raw"));
            std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
            p.to_str().unwrap().to_string()
        })
        .collect();
    create(&d, "e", "exit=halt", "never");
    let v = d.json(&[
        "vm",
        "edit",
        "e",
        "--add-disk",
        &disks[0],
        "--add-disk",
        &format!("path={},readonly=on", disks[1]),
        "--add-net",
        "tap=fvtest0",
        "--cmdline",
        "exit=poweroff",
    ]);
    let paths = |v: &Value| -> Vec<String> {
        v["disks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["path"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(paths(&v), [disks[0].clone(), disks[1].clone()]);
    assert_eq!(v["disks"][1]["readonly"], true);
    assert_eq!(v["cmdline"], "exit=poweroff");
    assert_eq!(v["nics"].as_array().unwrap().len(), 1);
    assert_eq!(v["nics"][0]["tap"], "fvtest0");
    let mac = v["nics"][0]["mac"].as_str().unwrap().to_string();
    assert!(mac.starts_with("52:54:fe:"), "{v}");
    // Remove the first disk, add a third: order is kept.
    let v = d.json(&[
        "vm",
        "edit",
        "e",
        "--remove-disk",
        "0",
        "--add-disk",
        &disks[2],
    ]);
    assert_eq!(paths(&v), [disks[1].clone(), disks[2].clone()]);

    // Bad edits: a 400 with the code, and nothing changed (not even the valid parts).
    let before = d.json(&["vm", "show", "e"]);
    for args in [
        vec!["--remove-disk", "5"],
        vec!["--cpus", "2", "--remove-net", "3"],
        vec!["--remove-disk", "0", "--remove-disk", "0"],
        vec!["--cpus", "0"],
        vec!["--memory", "1", "--cmdline", "changed"],
        vec!["--cpus", "2", "--add-disk", "/nonexistent/disk.img"],
    ] {
        let mut a = vec!["vm", "edit", "e"];
        a.extend(args.iter());
        let r = d.ferro(&a);
        assert_eq!(r.code, Some(1), "{args:?} was accepted");
        assert!(r.stderr.contains("[bad_request]"), "{args:?}: {}", r.stderr);
        assert_eq!(
            d.json(&["vm", "show", "e"]),
            before,
            "{args:?} changed the VM"
        );
    }
    let r = d.ferro(&["vm", "edit", "e"]);
    assert_eq!(r.code, Some(1), "an empty edit is refused");
    // Raw API: unknown fields and wrong types are 400s.
    let patch = |body: &str| {
        d.http(&format!(
            "PATCH /v1/vms/e HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ))
    };
    let (status, body) = patch(r#"{"remove_disks":[-1]}"#);
    assert_eq!(status, 400, "{body}");
    let (status, body) = patch(r#"{"disks":[],"add_disks":[{"path":"/x"}]}"#);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("bad_request"), "{body}");
    let (status, body) = patch(r#"{"remove_nets":[0]}"#);
    assert_eq!(status, 200, "{body}");
    assert_eq!(d.json(&["vm", "show", "e"])["nics"], Value::Array(vec![]));

    // While it runs: 409, nothing changed; the restart policy alone may change. It must stay
    // up for that: an `exit=poweroff` probe would be stopped again before the checks.
    d.json(&["vm", "edit", "e", "--cmdline", "exit=halt"]);
    d.json(&["vm", "start", "e"]);
    let before = d.json(&["vm", "show", "e"]);
    let r = d.ferro(&["vm", "edit", "e", "--remove-disk", "0"]);
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("[invalid_state]"), "{}", r.stderr);
    let (status, body) = patch(r#"{"add_nets":[{}]}"#);
    assert_eq!(status, 409, "{body}");
    assert_eq!(d.json(&["vm", "show", "e"])["disks"], before["disks"]);
    assert_eq!(
        d.json(&["vm", "edit", "e", "--restart", "always"])["restart"],
        "always"
    );
    d.json(&["vm", "stop", "e", "--force"]);
}
