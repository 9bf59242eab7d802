//! The image store end to end: `ferro image import|list|delete` against a real daemon, with
//! small fixtures of each format made by qemu-img (and an OVA built here). No guest runs, so
//! no /dev/kvm is needed; qemu-img is.

use std::path::{Path, PathBuf};
use std::process::Command;

use ferro_tests::Daemon;
use serde_json::Value;

fn have_qemu_img(test: &str) -> bool {
    if Command::new("qemu-img").arg("--version").output().is_ok() {
        true
    } else {
        println!("SKIPPED: no qemu-img ({test})");
        false
    }
}

fn sh(cmd: &mut Command) {
    let out = cmd.output().expect("run");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn scratch(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ferro-st-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

/// A 1 MiB raw disk with known bytes at its start and in its middle.
fn known_raw(dir: &Path) -> (PathBuf, Vec<u8>) {
    let mut bytes = vec![0u8; 1 << 20];
    bytes[..16].copy_from_slice(b"FERRO-IMPORT-001");
    bytes[512 * 1024..512 * 1024 + 5].copy_from_slice(b"MIDDL");
    let p = dir.join("base.raw");
    std::fs::write(&p, &bytes).expect("write raw");
    (p, bytes)
}

/// The guest-visible bytes of a stored qcow2 image (its first `len`).
fn contents(img: &Path, dir: &Path, len: usize) -> Vec<u8> {
    let out = dir.join("readback.raw");
    let _ = std::fs::remove_file(&out);
    sh(Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(img)
        .arg(&out));
    let mut b = std::fs::read(&out).expect("readback");
    b.truncate(len);
    b
}

fn import(d: &Daemon, file: &Path, name: &str) -> Value {
    d.json(&["image", "import", file.to_str().unwrap(), "--name", name])
}

#[test]
fn image_import_each_format_and_ova() {
    if !have_qemu_img("image_import_each_format_and_ova") {
        return;
    }
    let d = Daemon::start("img-formats");
    let w = scratch("formats");
    let (raw, bytes) = known_raw(&w);
    let mut names = Vec::new();
    for fmt in ["raw", "qcow2", "vmdk", "vpc", "vhdx"] {
        let file = w.join(format!("disk.{fmt}"));
        sh(Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", fmt])
            .arg(&raw)
            .arg(&file));
        let name = format!("img-{fmt}");
        let v = import(&d, &file, &name);
        assert_eq!(v["name"], name.as_str());
        assert_eq!(v["format"], fmt, "{v}");
        assert!(v["virtual_size"].as_u64().unwrap() >= 1 << 20, "{v}");
        let path = PathBuf::from(v["path"].as_str().unwrap());
        assert!(path.starts_with(d.dir.join("images")), "{v}");
        assert_eq!(
            contents(&path, &w, bytes.len()),
            bytes,
            "{fmt}: the imported disk's bytes differ"
        );
        names.push(name);
    }

    // An OVA: a tar of an OVF descriptor and a VMDK.
    let ova_dir = w.join("ova");
    std::fs::create_dir_all(&ova_dir).unwrap();
    sh(Command::new("qemu-img")
        .args([
            "convert",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
        ])
        .arg(&raw)
        .arg(ova_dir.join("app-disk1.vmdk")));
    std::fs::write(ova_dir.join("app.ovf"), OVF).unwrap();
    let ova = w.join("app.ova");
    sh(Command::new("tar")
        .arg("-cf")
        .arg(&ova)
        .arg("-C")
        .arg(&ova_dir)
        .args(["app.ovf", "app-disk1.vmdk"]));
    let v = d.json(&["image", "import", ova.to_str().unwrap()]);
    assert_eq!(v["name"], "app", "the default name is the file's stem: {v}");
    assert_eq!(v["format"], "ova");
    assert_eq!(v["cpus"], 2, "{v}");
    assert_eq!(v["memory_mib"], 1024, "{v}");
    assert_eq!(v["disks"].as_array().unwrap().len(), 1);
    let path = PathBuf::from(v["path"].as_str().unwrap());
    assert_eq!(contents(&path, &w, bytes.len()), bytes);
    names.push("app".into());

    let list = d.json(&["image", "list"]);
    let mut listed: Vec<String> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_string())
        .collect();
    listed.sort();
    names.sort();
    assert_eq!(listed, names);
    let table = d.ferro(&["image", "list"]);
    assert!(
        table.stdout.contains("img-vhdx") && table.stdout.contains("ova"),
        "{}",
        table.stdout
    );

    // A taken name is refused and changes nothing.
    let r = d.ferro(&[
        "image",
        "import",
        raw.to_str().unwrap(),
        "--name",
        "img-raw",
    ]);
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("exists already"), "{}", r.stderr);

    // Delete: refused while a VM's disk is based on it, then removes the file.
    let vhdx = list
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "img-vhdx")
        .and_then(|i| i["path"].as_str())
        .map(PathBuf::from)
        .unwrap();
    let overlay = w.join("vm.qcow2");
    sh(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&vhdx)
        .arg(&overlay));
    let kernel = w.join("kernel");
    std::fs::write(&kernel, b"not booted here").unwrap();
    d.json(&[
        "vm",
        "create",
        "user",
        "--kernel",
        kernel.to_str().unwrap(),
        "--disk",
        &format!("path={}", overlay.display()),
    ]);
    let r = d.ferro(&["image", "delete", "img-vhdx"]);
    assert_eq!(r.code, Some(1), "{}", r.stdout);
    assert!(r.stderr.contains("in use by VM 'user'"), "{}", r.stderr);
    d.json(&["vm", "delete", "user"]);
    d.json(&["image", "delete", "img-vhdx"]);
    assert!(!vhdx.exists());
    let r = d.ferro(&["image", "delete", "img-vhdx"]);
    assert!(r.stderr.contains("no image named"), "{}", r.stderr);
    let _ = std::fs::remove_dir_all(&w);
}

#[test]
fn image_import_refuses_junk_and_corrupt_files_leaving_nothing() {
    if !have_qemu_img("image_import_refuses_junk_and_corrupt_files_leaving_nothing") {
        return;
    }
    let d = Daemon::start("img-bad");
    let w = scratch("bad");
    let junk = w.join("notes.txt");
    std::fs::write(&junk, "hello, not a disk").unwrap();
    let r = d.ferro(&["image", "import", junk.to_str().unwrap()]);
    assert_eq!(r.code, Some(1));
    assert!(
        r.stderr
            .contains("notes.txt: not a disk image qemu-img understands")
            && r.stderr.contains("[bad_image]"),
        "{}",
        r.stderr
    );

    // A qcow2 cut short after data was written: qemu-img check finds the damage.
    let q = w.join("cut.qcow2");
    sh(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&q)
        .arg("4M"));
    sh(Command::new("qemu-io")
        .args(["-c", "write -P 0xab 0 1M"])
        .arg(&q));
    let b = std::fs::read(&q).unwrap();
    std::fs::write(&q, &b[..300_000]).unwrap();
    let r = d.ferro(&["image", "import", q.to_str().unwrap()]);
    assert_eq!(r.code, Some(1));
    assert!(
        r.stderr.contains("cut.qcow2: corrupt") && r.stderr.contains("[corrupt_image]"),
        "{}",
        r.stderr
    );

    // An OVA whose descriptor names a disk it does not hold.
    let ova_dir = w.join("ova");
    std::fs::create_dir_all(&ova_dir).unwrap();
    std::fs::write(ova_dir.join("app.ovf"), OVF).unwrap();
    let ova = w.join("broken.ova");
    sh(Command::new("tar")
        .arg("-cf")
        .arg(&ova)
        .arg("-C")
        .arg(&ova_dir)
        .arg("app.ovf"));
    let r = d.ferro(&["image", "import", ova.to_str().unwrap()]);
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("does not hold"), "{}", r.stderr);

    // A missing file is a 4xx too, over raw HTTP.
    let body = r#"{"path":"/nonexistent/disk.img"}"#;
    let (status, text) = d.http(&format!(
        "POST /v1/images HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    ));
    assert_eq!(status, 422, "{text}");

    assert_eq!(d.json(&["image", "list"]), serde_json::json!([]));
    let left: Vec<_> = std::fs::read_dir(d.dir.join("images"))
        .map(|r| r.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "failed imports left {left:?}");
    let _ = std::fs::remove_dir_all(&w);
}

const OVF: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1"
  xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
  xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData">
  <References>
    <File ovf:href="app-disk1.vmdk" ovf:id="file1"/>
  </References>
  <DiskSection>
    <Disk ovf:capacity="1048576" ovf:diskId="vmdisk1" ovf:fileRef="file1"/>
  </DiskSection>
  <VirtualSystem ovf:id="app">
    <VirtualHardwareSection>
      <Item>
        <rasd:ElementName>2 virtual CPUs</rasd:ElementName>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>2</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:AllocationUnits>byte * 2^30</rasd:AllocationUnits>
        <rasd:ElementName>1 GB of memory</rasd:ElementName>
        <rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>1</rasd:VirtualQuantity>
      </Item>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"#;

fn sha(path: &Path) -> Vec<u8> {
    std::fs::read(path).expect("read")
}

fn backing_of(path: &Path) -> String {
    let out = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(path)
        .output()
        .expect("qemu-img info");
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    v["backing-filename"].as_str().unwrap_or("").to_string()
}

#[test]
fn template_from_vm_and_image_make_linked_vms() {
    if !have_qemu_img("template_from_vm_and_image_make_linked_vms") {
        return;
    }
    let d = Daemon::start("tpl");
    let w = scratch("tpl");
    let (raw, bytes) = known_raw(&w);
    let kernel = w.join("kernel");
    std::fs::write(&kernel, b"not booted here").unwrap();
    let k = kernel.to_str().unwrap();
    d.json(&[
        "vm",
        "create",
        "src",
        "--kernel",
        k,
        "--cmdline",
        "console=ttyS0 tpl=1",
        "--cpus",
        "2",
        "--memory",
        "128",
        "--disk",
        &format!("path={}", raw.display()),
    ]);
    let t = d.json(&["template", "create", "base", "--from-vm", "src"]);
    assert_eq!(t["source"], "vm:src", "{t}");
    assert_eq!(
        (t["cpus"].as_u64(), t["memory_mib"].as_u64()),
        (Some(2), Some(128))
    );
    assert_eq!(t["cmdline"], "console=ttyS0 tpl=1");
    let base = PathBuf::from(t["disks"][0].as_str().unwrap());
    assert!(base.starts_with(d.dir.join("templates/base")), "{t}");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&base).unwrap().permissions().mode();
        assert_eq!(mode & 0o222, 0, "the base is not read-only: {mode:o}");
    }
    assert_eq!(contents(&base, &w, bytes.len()), bytes);
    let before = sha(&base);

    // A VM from the template: a linked clone, made quickly.
    let t0 = std::time::Instant::now();
    let v = d.json(&["vm", "create", "web", "--template", "base"]);
    let took = t0.elapsed();
    println!("vm create --template took {took:?}");
    assert!(took < std::time::Duration::from_secs(2), "{took:?}");
    assert_eq!(
        (v["cpus"].as_u64(), v["memory_mib"].as_u64()),
        (Some(2), Some(128))
    );
    assert_eq!(v["kernel"], k);
    let disk = PathBuf::from(v["disks"][0]["path"].as_str().unwrap());
    assert!(disk.starts_with(d.dir.join("vms/web")), "{v}");
    assert_eq!(backing_of(&disk), base.to_str().unwrap());
    assert_eq!(contents(&disk, &w, bytes.len()), bytes);
    // Writing the clone leaves the template untouched.
    sh(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x5a 0 64k"])
        .arg(&disk));
    assert_eq!(sha(&base), before, "the template changed");
    assert_ne!(contents(&disk, &w, 16), bytes[..16]);

    let list = d.json(&["template", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 1);
    let r = d.ferro(&["template", "delete", "base"]);
    assert!(r.stderr.contains("base of VM 'web'"), "{}", r.stderr);
    let r = d.ferro(&["vm", "create", "x", "--template", "nope"]);
    assert!(
        r.stderr.contains("no template named 'nope'"),
        "{}",
        r.stderr
    );
    assert!(!d.dir.join("vms/x").exists());

    // From an image: the image's file is the base; the image cannot go while it is.
    let v = import(&d, &raw, "img");
    let t = d.json(&["template", "create", "fromimg", "--from-image", "img"]);
    assert_eq!(t["disks"][0], v["path"]);
    let r = d.ferro(&["vm", "create", "w2", "--template", "fromimg"]);
    assert!(r.stderr.contains("has no kernel"), "{}", r.stderr);
    let v2 = d.json(&["vm", "create", "w2", "--template", "fromimg", "--kernel", k]);
    let disk2 = PathBuf::from(v2["disks"][0]["path"].as_str().unwrap());
    assert_eq!(backing_of(&disk2), v["path"].as_str().unwrap());
    let r = d.ferro(&["image", "delete", "img"]);
    assert!(
        r.stderr.contains("in use") || r.stderr.contains("template"),
        "{}",
        r.stderr
    );
    d.json(&["vm", "delete", "w2"]);
    let r = d.ferro(&["image", "delete", "img"]);
    assert!(
        r.stderr.contains("base of template 'fromimg'"),
        "{}",
        r.stderr
    );
    d.json(&["template", "delete", "fromimg"]);
    d.json(&["image", "delete", "img"]);
    let _ = std::fs::remove_dir_all(&w);
}

#[test]
fn vm_clone_full_and_linked() {
    if !have_qemu_img("vm_clone_full_and_linked") {
        return;
    }
    let d = Daemon::start("clone");
    let w = scratch("clone");
    let (raw, bytes) = known_raw(&w);
    let kernel = w.join("kernel");
    std::fs::write(&kernel, b"not booted here").unwrap();
    d.json(&[
        "vm",
        "create",
        "src",
        "--kernel",
        kernel.to_str().unwrap(),
        "--cpus",
        "2",
        "--disk",
        &format!("path={}", raw.display()),
    ]);

    // Full: a standalone copy under the clone's folder; the source is unchanged.
    let v = d.json(&["vm", "clone", "src", "full"]);
    assert_eq!(
        (v["name"].as_str(), v["cpus"].as_u64()),
        (Some("full"), Some(2))
    );
    let full = PathBuf::from(v["disks"][0]["path"].as_str().unwrap());
    assert!(full.starts_with(d.dir.join("vms/full")), "{v}");
    assert_eq!(backing_of(&full), "");
    assert_eq!(contents(&full, &w, bytes.len()), bytes);
    let s = d.json(&["vm", "show", "src"]);
    assert_eq!(s["disks"][0]["path"], raw.to_str().unwrap());

    // Linked: both VMs get overlays on the frozen, read-only source disk.
    let v = d.json(&["vm", "clone", "src", "lk", "--linked"]);
    let lk = PathBuf::from(v["disks"][0]["path"].as_str().unwrap());
    assert!(lk.starts_with(d.dir.join("vms/lk")), "{v}");
    assert_eq!(backing_of(&lk), raw.to_str().unwrap());
    let s = d.json(&["vm", "show", "src"]);
    let src_disk = PathBuf::from(s["disks"][0]["path"].as_str().unwrap());
    assert!(src_disk.starts_with(d.dir.join("vms/src")), "{s}");
    assert_eq!(backing_of(&src_disk), raw.to_str().unwrap());
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&raw).unwrap().permissions().mode();
        assert_eq!(mode & 0o222, 0, "the base is not read-only: {mode:o}");
    }
    let before = sha(&raw);
    sh(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x5a 0 64k"])
        .arg(&lk));
    assert_eq!(sha(&raw), before, "the base changed");
    assert_eq!(
        contents(&src_disk, &w, bytes.len()),
        bytes,
        "the source saw the clone's write"
    );

    let r = d.ferro(&["vm", "clone", "src", "lk"]);
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("exists already"), "{}", r.stderr);
    let r = d.ferro(&["vm", "clone", "src", "src"]);
    assert!(r.stderr.contains("exists already"), "{}", r.stderr);
    let r = d.ferro(&["vm", "clone", "nope", "x"]);
    assert!(r.stderr.contains("no VM named 'nope'"), "{}", r.stderr);
    let _ = std::fs::remove_dir_all(&w);
}

/// `GET path` over the API socket, as JSON.
fn get_json(d: &Daemon, path: &str) -> (u16, Value) {
    let (status, body) = d.http(&format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    ));
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

fn post_json(d: &Daemon, path: &str, body: &str) -> (u16, String, Value) {
    let (status, text) = d.http(&format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    ));
    let v = serde_json::from_str(&text).unwrap_or(Value::Null);
    (status, text, v)
}

#[test]
fn image_import_and_clone_report_progress() {
    if !have_qemu_img("image_import_and_clone_report_progress") {
        return;
    }
    let d = Daemon::start("img-progress");
    let w = scratch("progress");
    // 192 MiB of incompressible-looking, non-zero data: the conversion takes a while.
    let src = w.join("big.raw");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&src).unwrap();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..192 {
            for c in buf.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                c.copy_from_slice(&x.to_le_bytes());
            }
            f.write_all(&buf).unwrap();
        }
    }
    // The API: 202, a Location, progress that rises to 100, the image as the result.
    let body = format!(r#"{{"path":"{}","name":"big"}}"#, src.display());
    let (status, text, op) = post_json(&d, "/v1/images?async=true", &body);
    assert_eq!(status, 202, "{text}");
    let id = op["id"].as_u64().expect("an operation id");
    assert_eq!(op["kind"], "image_import");
    let t = std::time::Instant::now();
    let mut seen = Vec::new();
    let done = loop {
        let (status, op) = get_json(&d, &format!("/v1/operations/{id}"));
        assert_eq!(status, 200, "{op}");
        seen.push(op["progress"].as_f64().unwrap());
        if op["state"] != "running" {
            break op;
        }
        assert!(t.elapsed().as_secs() < 120, "the import did not end: {op}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["progress"], 100.0);
    assert_eq!(done["result"]["name"], "big");
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]),
        "progress went back: {seen:?}"
    );
    println!(
        "import of 192 MiB: {:.2} s, {} polls, progress seen {seen:?}",
        t.elapsed().as_secs_f64(),
        seen.len()
    );
    // Bad requests are answered at once, with no operation.
    let (status, text, _) = post_json(&d, "/v1/images?async=true", &body);
    assert_eq!(status, 409, "a taken name: {text}");
    let (status, text, _) = post_json(
        &d,
        "/v1/images?async=true",
        r#"{"path":"rel.raw","name":"r"}"#,
    );
    assert_eq!(status, 400, "{text}");
    // A failed import ends as a failed operation with the synchronous call's code, and
    // leaves nothing.
    let junk = w.join("junk.txt");
    std::fs::write(&junk, "hello").unwrap();
    let (status, _, op) = post_json(
        &d,
        "/v1/images?async=true",
        &format!(r#"{{"path":"{}"}}"#, junk.display()),
    );
    assert_eq!(status, 202);
    let failed = loop {
        let (_, op) = get_json(&d, &format!("/v1/operations/{}", op["id"]));
        if op["state"] != "running" {
            break op;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(failed["state"], "failed", "{failed}");
    assert_eq!(failed["status"], 422);
    assert_eq!(failed["error"]["code"], "bad_image");
    assert_eq!(d.json(&["image", "list"]).as_array().unwrap().len(), 1);
    let (status, _) = get_json(&d, "/v1/operations/999999");
    assert_eq!(status, 404);

    // The CLI without a terminal: plain progress lines on stderr, the table on stdout.
    let r = d.ferro(&["image", "import", src.to_str().unwrap(), "--name", "big2"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r.stderr.contains("importing"), "{}", r.stderr);
    assert!(r.stderr.contains("100%"), "{}", r.stderr);
    assert!(r.stdout.contains("big2"), "{}", r.stdout);
    let r = d.ferro(&["image", "import", junk.to_str().unwrap(), "--name", "junk2"]);
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("[bad_image]"), "{}", r.stderr);

    // A full clone reports its copy the same way.
    let p = d.json(&["image", "list"])[0]["path"]
        .as_str()
        .unwrap()
        .to_string();
    let disk = w.join("vm.qcow2");
    sh(Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "qcow2"])
        .arg(&p)
        .arg(&disk));
    let kernel = w.join("kernel");
    std::fs::write(&kernel, b"not booted").unwrap();
    d.json(&[
        "vm",
        "create",
        "src",
        "--kernel",
        kernel.to_str().unwrap(),
        "--disk",
        disk.to_str().unwrap(),
    ]);
    let r = d.ferro(&["vm", "clone", "src", "copy"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(
        r.stderr.contains("copying the disks of src"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("100%"), "{}", r.stderr);
    let r = d.ferro(&["vm", "clone", "src", "copy"]);
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("[conflict]"), "{}", r.stderr);
    let _ = std::fs::remove_dir_all(&w);
}
