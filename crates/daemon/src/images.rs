//! The image store: disk images imported from other formats and kept as qcow2 under
//! `DATA/images/`, one row each in the `images` table.
//!
//! An import is all or nothing: the file's format is detected with `qemu-img info`, each
//! disk is converted with `qemu-img convert -O qcow2` into a temporary folder under
//! `DATA/images/`, checked with `qemu-img check` and with our own reader
//! ([`ferro_disk::info`]), and only then renamed into place and recorded. A failure removes
//! the temporary folder, so nothing is left behind. OVAs are tars: their OVF descriptor
//! gives CPUs, memory and the disk files ([`crate::ova`]).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};

use ferro_api::storage::{Image, ImportImage};
use rusqlite::{params, OptionalExtension, Transaction};

use crate::error::DaemonError;
use crate::operations::{parse_qemu_progress, Part, Tracker};
use crate::ops::check_name;
use crate::ova;
use crate::store::{now_ms, Store};
use crate::supervisor::Supervisor;

/// Formats `qemu-img` may convert from (`vpc` is VHD).
const FORMATS: &[&str] = &["qcow2", "raw", "vmdk", "vpc", "vhdx"];
/// Formats `qemu-img check` can check.
const CHECKABLE: &[&str] = &["qcow2", "vmdk", "vhdx"];
/// The largest OVF descriptor read.
const MAX_OVF: u64 = 4 << 20;

/// `DATA/images/`.
pub fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("images")
}

fn bad(code: &'static str, file: &Path, what: impl std::fmt::Display) -> DaemonError {
    DaemonError::BadImage {
        code,
        message: format!("{}: {what}", file.display()),
    }
}

/// The last line qemu-img wrote to stderr.
fn last_line(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_string()
}

/// The line of a `qemu-img check` report that says what is wrong.
fn check_summary(out: &Output) -> String {
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .find(|l| l.contains("were found") || l.starts_with("qemu-img:"))
        .map(|l| l.trim().to_string())
        .unwrap_or_else(|| last_line(out))
}

fn qemu_img(args: &[&std::ffi::OsStr]) -> Result<Output, DaemonError> {
    Command::new("qemu-img")
        .args(args)
        .output()
        .map_err(DaemonError::io("cannot run qemu-img (install qemu-utils)"))
}

/// Runs `qemu-img convert -p ARGS`, reporting its progress to `part` as it goes.
fn qemu_convert(
    args: &[&std::ffi::OsStr],
    part: &Part,
    message: &str,
) -> Result<Output, DaemonError> {
    use std::process::Stdio;
    let mut child = Command::new("qemu-img")
        .arg("convert")
        .arg("-p")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(DaemonError::io("cannot run qemu-img (install qemu-utils)"))?;
    let stderr = child.stderr.take().map(|mut e| {
        std::thread::spawn(move || {
            let mut b = Vec::new();
            let _ = e.read_to_end(&mut b);
            b
        })
    });
    let mut stdout = Vec::new();
    if let Some(mut out) = child.stdout.take() {
        let mut buf = [0u8; 512];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            stdout.extend_from_slice(&buf[..n]);
            if let Some(p) = parse_qemu_progress(&String::from_utf8_lossy(&buf[..n])) {
                part.set(p, message);
            }
        }
    }
    let status = child
        .wait()
        .map_err(DaemonError::io("cannot wait for qemu-img"))?;
    let stderr = stderr.and_then(|h| h.join().ok()).unwrap_or_default();
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// What `qemu-img info` says of a file.
#[derive(Debug)]
struct Probe {
    format: String,
    virtual_size: u64,
}

fn probe(file: &Path) -> Result<Probe, DaemonError> {
    let out = qemu_img(&["info".as_ref(), "--output=json".as_ref(), file.as_os_str()])?;
    let not_image = || {
        bad(
            "bad_image",
            file,
            format!(
                "not a disk image qemu-img understands ({})",
                last_line(&out)
            ),
        )
    };
    if !out.status.success() {
        return Err(not_image());
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|_| not_image())?;
    let format = v["format"].as_str().ok_or_else(not_image)?.to_string();
    if v.get("backing-filename").is_some() {
        return Err(bad(
            "unsupported_image",
            file,
            "has a backing file: import the image it is based on, or flatten it first (qemu-img convert)",
        ));
    }
    if !FORMATS.contains(&format.as_str()) {
        return Err(bad(
            "unsupported_image",
            file,
            format!("format {format} is not supported (qcow2, raw, vmdk, vpc/VHD, vhdx, ova)"),
        ));
    }
    let virtual_size = v["virtual-size"].as_u64().ok_or_else(not_image)?;
    // qemu-img calls any file raw; a disk is whole sectors at least.
    let file_len = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
    if format == "raw" && (file_len == 0 || !file_len.is_multiple_of(512)) {
        return Err(bad(
            "bad_image",
            file,
            format!("not a disk image qemu-img understands (as raw its {file_len} bytes are not whole 512-byte sectors)"),
        ));
    }
    Ok(Probe {
        virtual_size,
        format,
    })
}

/// `qemu-img check`: 0 is clean, 3 is leaked clusters only (harmless), 63 is "cannot check
/// this format"; anything else is damage.
fn check(file: &Path, format: &str, shown: &Path) -> Result<(), DaemonError> {
    let out = qemu_img(&[
        "check".as_ref(),
        "-f".as_ref(),
        format.as_ref(),
        file.as_os_str(),
    ])?;
    match out.status.code() {
        Some(0 | 3 | 63) => Ok(()),
        _ => Err(bad(
            "corrupt_image",
            shown,
            format!("corrupt ({format}: {})", check_summary(&out)),
        )),
    }
}

/// Converts `src` to a checked qcow2 at `dst`; returns the source format and virtual size.
fn convert_one(src: &Path, dst: &Path, shown: &Path, part: &Part) -> Result<Probe, DaemonError> {
    let p = probe(src)?;
    if CHECKABLE.contains(&p.format.as_str()) {
        part.set(0.0, "checking the source");
        check(src, &p.format, shown)?;
    }
    let out = qemu_convert(
        &[
            "-f".as_ref(),
            p.format.as_ref(),
            "-O".as_ref(),
            "qcow2".as_ref(),
            src.as_os_str(),
            dst.as_os_str(),
        ],
        part,
        "converting",
    )?;
    part.set(100.0, "checking the result");
    if !out.status.success() {
        return Err(bad(
            "corrupt_image",
            shown,
            format!("corrupt: qemu-img convert failed ({})", last_line(&out)),
        ));
    }
    check(dst, "qcow2", shown)?;
    ferro_disk::info(dst).map_err(|e| {
        bad(
            "corrupt_image",
            shown,
            format!("the converted image does not read back: {e}"),
        )
    })?;
    Ok(p)
}

/// Copies `src` (of `format`) into a new standalone qcow2 at `dst` (blocking); a backing
/// chain is flattened. `dst` is removed on failure.
pub(crate) fn copy_to_qcow2(
    src: &Path,
    format: &str,
    dst: &Path,
    part: &Part,
) -> Result<(), DaemonError> {
    let out = qemu_convert(
        &[
            "-f".as_ref(),
            format.as_ref(),
            "-O".as_ref(),
            "qcow2".as_ref(),
            src.as_os_str(),
            dst.as_os_str(),
        ],
        part,
        "copying",
    )?;
    if out.status.success() {
        Ok(())
    } else {
        let _ = std::fs::remove_file(dst);
        Err(DaemonError::Io {
            what: format!("cannot copy {}", src.display()),
            source: std::io::Error::other(last_line(&out)),
        })
    }
}

/// A temporary folder removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(images: &Path, name: &str) -> Result<Self, DaemonError> {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = images.join(format!(
            ".import-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p)
            .map_err(DaemonError::io(format!("cannot create {}", p.display())))?;
        Ok(Self(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Whether `file` is a tar (the `ustar` magic at offset 257), as an OVA is.
fn is_tar(file: &Path) -> bool {
    let mut head = [0u8; 263];
    std::fs::File::open(file)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok()
        && &head[257..262] == b"ustar"
}

fn tar(args: &[&std::ffi::OsStr], file: &Path) -> Result<Output, DaemonError> {
    let out = Command::new("tar")
        .args(args)
        .output()
        .map_err(DaemonError::io("cannot run tar"))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(bad(
            "bad_image",
            file,
            format!("not a readable OVA: {}", last_line(&out)),
        ))
    }
}

/// Extracts an OVA's descriptor and disks into `tmp`; returns the descriptor and the disk
/// files, in its order.
fn unpack_ova(file: &Path, tmp: &Path) -> Result<(ova::Ovf, Vec<PathBuf>), DaemonError> {
    let list = tar(&["-tf".as_ref(), file.as_os_str()], file)?;
    let members: Vec<String> = String::from_utf8_lossy(&list.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    let Some(ovf_name) = members
        .iter()
        .find(|m| m.ends_with(".ovf") && ova::plain_file_name(m))
    else {
        return Err(bad("bad_image", file, "an OVA without an .ovf descriptor"));
    };
    let ovf_path = tmp.join(ovf_name);
    let extract = |member: &str| -> Result<PathBuf, DaemonError> {
        tar(
            &[
                "-xf".as_ref(),
                file.as_os_str(),
                "-C".as_ref(),
                tmp.as_os_str(),
                "--no-same-owner".as_ref(),
                "--".as_ref(),
                member.as_ref(),
            ],
            file,
        )?;
        let path = tmp.join(member);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() => Ok(path),
            _ => Err(bad(
                "bad_image",
                file,
                format!("OVA member {member} is not a regular file"),
            )),
        }
    };
    extract(ovf_name)?;
    let mut xml = String::new();
    std::fs::File::open(&ovf_path)
        .and_then(|f| f.take(MAX_OVF).read_to_string(&mut xml))
        .map_err(|e| bad("bad_image", file, format!("cannot read {ovf_name}: {e}")))?;
    let ovf = ova::parse(&xml);
    if ovf.files.is_empty() {
        return Err(bad(
            "bad_image",
            file,
            format!("{ovf_name} names no disk file"),
        ));
    }
    let mut disks = Vec::new();
    for f in &ovf.files {
        if !ova::plain_file_name(f) || !members.contains(f) {
            return Err(bad(
                "bad_image",
                file,
                format!("{ovf_name} names disk file '{f}', which the OVA does not hold"),
            ));
        }
        disks.push(extract(f)?);
    }
    Ok((ovf, disks))
}

/// Converts `file` into checked qcow2 files under `DATA/images/` named after `name`; returns
/// the image to record. Blocking (runs qemu-img). Nothing is left behind on failure.
pub fn convert(
    data_dir: &Path,
    file: &Path,
    name: &str,
    progress: &Tracker,
) -> Result<Image, DaemonError> {
    if !file.is_absolute() {
        return Err(DaemonError::BadRequest(format!(
            "{}: the path must be absolute (it is read on the daemon's host)",
            file.display()
        )));
    }
    match std::fs::metadata(file) {
        Ok(m) if m.is_file() => {}
        Ok(_) => return Err(bad("bad_image", file, "not a regular file")),
        Err(e) => return Err(bad("bad_image", file, format!("cannot be read: {e}"))),
    }
    let images = dir(data_dir);
    let tmp = TempDir::new(&images, name)?;
    let (format, ovf, sources) = if is_tar(file) {
        let (ovf, disks) = unpack_ova(file, &tmp.0)?;
        ("ova".to_string(), Some(ovf), disks)
    } else {
        (String::new(), None, vec![file.to_path_buf()])
    };
    let mut converted = Vec::new();
    let mut first: Option<Probe> = None;
    for (i, src) in sources.iter().enumerate() {
        let out = tmp.0.join(format!("disk{i}.qcow2"));
        let p = convert_one(src, &out, file, &progress.part(i, sources.len()))?;
        first.get_or_insert(p);
        converted.push(out);
    }
    let Some(first) = first else {
        return Err(bad("bad_image", file, "holds no disk"));
    };
    let disks: Vec<PathBuf> = (0..converted.len())
        .map(|i| match i {
            0 => images.join(format!("{name}.qcow2")),
            _ => images.join(format!("{name}-disk{}.qcow2", i + 1)),
        })
        .collect();
    for (from, to) in converted.iter().zip(&disks) {
        if let Err(e) = std::fs::rename(from, to) {
            for d in &disks {
                let _ = std::fs::remove_file(d);
            }
            return Err(DaemonError::Io {
                what: format!("cannot move the image into {}", to.display()),
                source: e,
            });
        }
    }
    Ok(Image {
        name: name.to_string(),
        format: if format.is_empty() {
            first.format
        } else {
            format
        },
        virtual_size: first.virtual_size,
        path: disks[0].clone(),
        disks,
        cpus: ovf.as_ref().and_then(|o| o.cpus),
        memory_mib: ovf.as_ref().and_then(|o| o.memory_mib),
        created_ms: now_ms(),
    })
}

fn decode(data: String) -> Result<Image, DaemonError> {
    serde_json::from_str(&data).map_err(|_| {
        DaemonError::Store(rusqlite::Error::InvalidColumnType(
            0,
            "images.data".into(),
            rusqlite::types::Type::Text,
        ))
    })
}

/// Every image, by name.
pub fn list(s: &Store) -> Result<Vec<Image>, DaemonError> {
    let mut st = s.conn().prepare("SELECT data FROM images ORDER BY name")?;
    let rows = st.query_map([], |r| r.get::<_, String>(0))?;
    rows.map(|r| decode(r?)).collect()
}

/// One image.
pub fn get(s: &Store, name: &str) -> Result<Image, DaemonError> {
    let data: Option<String> = s
        .conn()
        .query_row("SELECT data FROM images WHERE name = ?1", [name], |r| {
            r.get(0)
        })
        .optional()?;
    decode(data.ok_or_else(|| DaemonError::NoSuch {
        what: "image",
        name: name.to_string(),
    })?)
}

fn insert(tx: &Transaction<'_>, img: &Image) -> Result<(), DaemonError> {
    let data = serde_json::to_string(img).map_err(|e| DaemonError::BadRequest(e.to_string()))?;
    let r = tx.execute(
        "INSERT INTO images (name, data, created_ms) VALUES (?1, ?2, ?3)",
        params![img.name, data, i64::try_from(img.created_ms).unwrap_or(0)],
    );
    match r {
        Err(rusqlite::Error::SqliteFailure(e, _))
            if e.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            Err(taken(&img.name))
        }
        other => other.map(|_| ()).map_err(DaemonError::from),
    }
}

fn taken(name: &str) -> DaemonError {
    DaemonError::Conflict(format!(
        "an image named '{name}' exists already: pick another name (--name) or delete it first"
    ))
}

/// The default name of an imported file: its name without the extension.
fn default_name(file: &Path) -> String {
    file.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The name an import request gives its image, checked to be valid and free.
pub fn import_name(sup: &Supervisor, req: &ImportImage) -> Result<String, DaemonError> {
    let name = req.name.clone().unwrap_or_else(|| default_name(&req.path));
    check_name(&name)?;
    if sup.store(|s| get(s, &name)).is_ok() {
        return Err(taken(&name));
    }
    if !req.path.is_absolute() {
        return Err(DaemonError::BadRequest(format!(
            "{}: the path must be absolute (it is read on the daemon's host)",
            req.path.display()
        )));
    }
    Ok(name)
}

/// Imports a file on the daemon's host, reporting progress to `progress`.
pub async fn import(
    sup: &Supervisor,
    req: ImportImage,
    progress: Tracker,
) -> Result<Image, DaemonError> {
    let name = import_name(sup, &req)?;
    let data_dir = sup.0.data_dir.clone();
    let (n, path) = (name.clone(), req.path.clone());
    let img = tokio::task::spawn_blocking(move || convert(&data_dir, &path, &n, &progress))
        .await
        .map_err(|e| DaemonError::Vmm(format!("the import task failed: {e}")))??;
    let r = sup.store(|s| s.transaction(|tx| insert(tx, &img)));
    if let Err(e) = r {
        // Another import of the same name won: keep its files, drop ours.
        if !matches!(e, DaemonError::Conflict(_)) {
            for d in &img.disks {
                let _ = std::fs::remove_file(d);
            }
        }
        return Err(e);
    }
    Ok(img)
}

/// Whether `disk`, or an image in its backing chain, is `target`.
pub fn chain_uses(disk: &Path, target: &Path) -> bool {
    let same = |a: &Path| {
        a == target || matches!((a.canonicalize(), target.canonicalize()), (Ok(x), Ok(y)) if x == y)
    };
    same(disk)
        || ferro_disk::info(disk)
            .map(|i| i.backing_chain.iter().any(|b| same(&b.path)))
            .unwrap_or(false)
}

/// Deletes an image and its files; refused while a VM's disk is (or is based on) one of them.
pub async fn delete(sup: &Supervisor, name: &str) -> Result<(), DaemonError> {
    let img = sup.store(|s| get(s, name))?;
    let vms = sup.store(|s| s.list())?;
    for vm in &vms {
        if vm
            .config
            .disks
            .iter()
            .any(|d| img.disks.iter().any(|i| chain_uses(&d.path, i)))
        {
            return Err(DaemonError::Conflict(format!(
                "image '{name}' is in use by VM '{}': delete the VM first",
                vm.name
            )));
        }
    }
    if let Some(t) = sup.store(|s| crate::templates::uses_any(s, &img.disks))? {
        return Err(DaemonError::Conflict(format!(
            "image '{name}' is the base of template '{t}': delete the template first"
        )));
    }
    sup.store(|s| {
        s.conn()
            .execute("DELETE FROM images WHERE name = ?1", [name])?;
        Ok(())
    })?;
    for d in &img.disks {
        let _ = std::fs::remove_file(d);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn have_qemu_img() -> bool {
        Command::new("qemu-img").arg("--version").output().is_ok()
    }

    fn scratch(test: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ferro-images-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Nothing under `DATA/images/` but what is listed.
    fn files(data: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir(data))
            .map(|r| {
                r.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    #[test]
    fn converts_vmdk_and_refuses_junk_leaving_nothing() {
        if !have_qemu_img() {
            println!("SKIPPED: no qemu-img");
            return;
        }
        let d = scratch("convert");
        let src = d.join("a.vmdk");
        let st = Command::new("qemu-img")
            .args(["create", "-q", "-f", "vmdk"])
            .arg(&src)
            .arg("2M")
            .status()
            .unwrap();
        assert!(st.success());
        let img = convert(&d, &src, "a", &Tracker::none()).unwrap();
        assert_eq!((img.format.as_str(), img.virtual_size), ("vmdk", 2 << 20));
        assert_eq!(files(&d), ["a.qcow2"]);
        assert_eq!(ferro_disk::info(&img.path).unwrap().virtual_size, 2 << 20);
        let over = d.join("over.qcow2");
        let st = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(&img.path)
            .arg(&over)
            .status()
            .unwrap();
        assert!(st.success());
        assert!(
            chain_uses(&over, &img.path),
            "{:?}",
            ferro_disk::info(&over)
        );
        assert!(!chain_uses(&src, &img.path));

        let junk = d.join("junk.txt");
        std::fs::write(&junk, "hello").unwrap();
        let e = convert(&d, &junk, "junk", &Tracker::none()).unwrap_err();
        assert!(
            matches!(
                e,
                DaemonError::BadImage {
                    code: "bad_image",
                    ..
                }
            ),
            "{e}"
        );
        assert!(
            e.to_string()
                .contains("not a disk image qemu-img understands"),
            "{e}"
        );

        // A qcow2 cut short: qemu-img check finds the damage.
        let q = d.join("q.qcow2");
        assert!(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&q)
            .arg("4M")
            .status()
            .unwrap()
            .success());
        assert!(Command::new("qemu-io")
            .args(["-c", "write -P 0xab 0 1M"])
            .arg(&q)
            .output()
            .unwrap()
            .status
            .success());
        let bytes = std::fs::read(&q).unwrap();
        std::fs::write(&q, &bytes[..300_000]).unwrap();
        let e = convert(&d, &q, "q", &Tracker::none()).unwrap_err();
        assert!(
            matches!(
                e,
                DaemonError::BadImage {
                    code: "corrupt_image",
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("corrupt"), "{e}");

        assert!(convert(&d, Path::new("relative.img"), "r", &Tracker::none()).is_err());
        assert!(convert(&d, &d.join("missing.img"), "m", &Tracker::none()).is_err());
        assert_eq!(files(&d), ["a.qcow2"], "failed imports left files behind");
        let _ = std::fs::remove_dir_all(&d);
    }
}
