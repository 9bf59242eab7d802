//! Snapshots: a whole VM saved to a directory, and read back by `ferro-vmm --restore DIR`.
//!
//! ```text
//! DIR/snapshot.json   the manifest: format_version, the VmConfig, the memory layout, and the
//!                     length and FNV-1a 64 of the state file (serde JSON)
//! DIR/state.json      MachineState: KVM's VM state (PIC, IOAPIC, PIT, kvmclock), every vCPU,
//!                     the legacy devices, every virtio transport + device
//! DIR/memory          guest RAM, sparse (zero pages are holes), see [`crate::memfile`]
//! ```
//! The manifest is written last and removed first, so a directory without one holds no
//! snapshot. Every file is outside input: a reader that meets another format version, a
//! manifest that does not parse, a state file whose length or checksum differ from the
//! manifest's, or a memory file of the wrong length refuses with one [`SnapshotError`].

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use ferro_api::VmConfig;
use ferro_arch::memory_map::RamLayout;
use ferro_hypervisor::{Vcpu, VcpuState, Vm, VmState};
use ferro_virtio::VirtioPciState;
use serde::{Deserialize, Serialize};

use crate::machine::{LegacyState, Machine};
use crate::memfile::{self, MemFileError, MemRegion};
use crate::memory::GuestMemory;

/// Version of the snapshot directory format this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The manifest's file name.
pub const MANIFEST: &str = "snapshot.json";
/// The machine state's file name.
pub const STATE_FILE: &str = "state.json";
/// The guest memory's file name.
pub const MEMORY_FILE: &str = "memory";
/// Largest manifest or state file read (the state of 32 vCPUs is well under this).
const MAX_JSON: u64 = 64 << 20;

/// Why a snapshot could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A file could not be written or read.
    #[error("snapshot {path}: {what}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// The manifest says a version this code does not read.
    #[error("snapshot {0}: format version {1}, this ferro-vmm reads version {FORMAT_VERSION}")]
    Version(PathBuf, u64),
    /// A file is not what the manifest says.
    #[error("snapshot {0}: {1}")]
    Corrupt(PathBuf, String),
    /// The memory file.
    #[error(transparent)]
    Memory(#[from] MemFileError),
    /// KVM could not give or take a state.
    #[error(transparent)]
    Hypervisor(#[from] ferro_hypervisor::HypervisorError),
}

/// One RAM region in the memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionEntry {
    /// Guest-physical start.
    pub guest_addr: u64,
    /// Bytes.
    pub size: u64,
    /// Offset in the memory file.
    pub file_offset: u64,
}

/// The memory file, as the manifest describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryEntry {
    /// File name in the directory.
    pub file: String,
    /// Its length (the guest's RAM).
    pub file_size: u64,
    /// Bytes of data in it (the rest are holes).
    pub data_bytes: u64,
    /// The RAM regions, in file order.
    pub regions: Vec<RegionEntry>,
}

/// The state file, as the manifest describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateEntry {
    /// File name in the directory.
    pub file: String,
    /// Its length.
    pub len: u64,
    /// FNV-1a 64 of its bytes, as 16 hex digits.
    pub fnv64: String,
}

/// `snapshot.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`FORMAT_VERSION`].
    pub format_version: u32,
    /// The VM as it was configured.
    pub config: VmConfig,
    /// Guest memory.
    pub memory: MemoryEntry,
    /// The machine state.
    pub state: StateEntry,
}

/// Everything but guest memory.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineState {
    /// KVM's VM-wide state.
    pub vm: VmState,
    /// Every vCPU, in id order.
    pub vcpus: Vec<VcpuState>,
    /// The legacy devices.
    pub legacy: LegacyState,
    /// The virtio devices in slot order.
    pub virtio: Vec<VirtioPciState>,
}

/// What a VM to be saved is made of. The vCPUs must be paused.
pub struct Capture<'a> {
    /// The VM's configuration.
    pub config: &'a VmConfig,
    /// The KVM VM.
    pub vm: &'a Vm,
    /// A handle on every vCPU ([`Vm::vcpu_handle`]), in id order.
    pub vcpus: &'a [Vcpu],
    /// KVM_GET_MSR_INDEX_LIST.
    pub msrs: &'a [u32],
    /// The devices.
    pub machine: &'a Machine,
    /// Guest RAM.
    pub memory: &'a GuestMemory,
}

/// What [`save`] wrote.
#[derive(Debug, Clone)]
pub struct Saved {
    /// Length of the memory file (the guest's RAM).
    pub memory_bytes: u64,
    /// Bytes on disk: memory data + state + manifest.
    pub data_bytes: u64,
    /// Milliseconds from the start of the save to the manifest on disk.
    pub ms: f64,
}

fn fnv64(data: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for &b in data {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn io(path: &Path, what: &'static str) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let path = path.to_path_buf();
    move |source| SnapshotError::Io { path, what, source }
}

/// Writes `data` to `path` through a temporary file renamed over it.
fn write_file(path: &Path, data: &[u8]) -> Result<(), SnapshotError> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp, "cannot create"))?;
    f.write_all(data).map_err(io(&tmp, "cannot write"))?;
    f.sync_all().map_err(io(&tmp, "cannot sync"))?;
    std::fs::rename(&tmp, path).map_err(io(path, "cannot rename into place"))
}

/// Saves the VM `c` describes into `dir`. The virtio devices are locked for the whole save, so
/// the device event loop cannot touch guest memory meanwhile.
pub fn save(dir: &Path, c: &Capture<'_>) -> Result<Saved, SnapshotError> {
    let t0 = Instant::now();
    std::fs::create_dir_all(dir).map_err(io(dir, "cannot create the directory"))?;
    let manifest_path = dir.join(MANIFEST);
    match std::fs::remove_file(&manifest_path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(io(&manifest_path, "cannot remove the old manifest")(e))
        }
        _ => {}
    }
    let guards: Vec<_> = c
        .machine
        .pci
        .virtio
        .iter()
        .map(|d| d.lock().unwrap_or_else(|e| e.into_inner()))
        .collect();
    let virtio = guards.iter().map(|d| d.save()).collect();
    let vcpus = c
        .vcpus
        .iter()
        .map(|v| v.save_state(c.msrs))
        .collect::<Result<Vec<_>, _>>()?;
    let state = MachineState {
        vm: c.vm.save_state()?,
        vcpus,
        legacy: c.machine.save_legacy(),
        virtio,
    };
    // A new memory file renamed over the old one: a VM restored from this directory maps the
    // old file and must keep seeing it.
    let mem_tmp = dir.join("memory.tmp");
    let written = memfile::write(c.memory, &mem_tmp)?;
    drop(guards);
    std::fs::rename(&mem_tmp, dir.join(MEMORY_FILE)).map_err(io(dir, "cannot rename memory"))?;
    let state_bytes = serde_json::to_vec(&state)
        .map_err(|e| SnapshotError::Corrupt(dir.to_path_buf(), e.to_string()))?;
    write_file(&dir.join(STATE_FILE), &state_bytes)?;
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        config: c.config.clone(),
        memory: MemoryEntry {
            file: MEMORY_FILE.into(),
            file_size: written.file_size,
            data_bytes: written.data_bytes,
            regions: written
                .regions
                .iter()
                .map(|r| RegionEntry {
                    guest_addr: r.guest_addr,
                    size: r.size,
                    file_offset: r.file_offset,
                })
                .collect(),
        },
        state: StateEntry {
            file: STATE_FILE.into(),
            len: state_bytes.len() as u64,
            fnv64: format!("{:016x}", fnv64(&state_bytes)),
        },
    };
    let text = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| SnapshotError::Corrupt(dir.to_path_buf(), e.to_string()))?;
    write_file(&manifest_path, &text)?;
    Ok(Saved {
        memory_bytes: written.file_size,
        data_bytes: written.data_bytes + state_bytes.len() as u64 + text.len() as u64,
        ms: t0.elapsed().as_secs_f64() * 1000.0,
    })
}

/// Reads a file of at most [`MAX_JSON`] bytes.
fn read_small(path: &Path) -> Result<Vec<u8>, SnapshotError> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(io(path, "cannot open"))?;
    let mut data = Vec::new();
    f.take(MAX_JSON + 1)
        .read_to_end(&mut data)
        .map_err(io(path, "cannot read"))?;
    if data.len() as u64 > MAX_JSON {
        return Err(SnapshotError::Corrupt(
            path.to_path_buf(),
            format!("larger than {MAX_JSON} bytes"),
        ));
    }
    Ok(data)
}

/// A file name from the manifest: a plain name inside the directory.
fn member(dir: &Path, name: &str) -> Result<PathBuf, SnapshotError> {
    let plain = !name.is_empty()
        && Path::new(name).file_name().and_then(|n| n.to_str()) == Some(name)
        && name != "..";
    if !plain {
        return Err(SnapshotError::Corrupt(
            dir.to_path_buf(),
            format!("file name {name:?} is not a plain name in the directory"),
        ));
    }
    Ok(dir.join(name))
}

/// A snapshot read back, its memory not yet mapped.
pub struct Loaded {
    /// The manifest.
    pub manifest: Manifest,
    /// The machine state.
    pub state: MachineState,
    /// The memory file's path.
    pub memory_path: PathBuf,
}

impl Loaded {
    /// The memory regions for [`memfile::map`].
    pub fn regions(&self) -> Vec<MemRegion> {
        self.manifest
            .memory
            .regions
            .iter()
            .map(|r| MemRegion {
                guest_addr: r.guest_addr,
                size: r.size,
                file_offset: r.file_offset,
            })
            .collect()
    }

    /// Maps guest memory from the memory file (MAP_PRIVATE: pages load when first touched).
    pub fn map_memory(&self) -> Result<GuestMemory, SnapshotError> {
        Ok(memfile::map_regions(
            &self.memory_path,
            &self.regions(),
            self.manifest.memory.file_size,
        )?)
    }
}

/// Reads and checks the snapshot in `dir`.
pub fn load(dir: &Path) -> Result<Loaded, SnapshotError> {
    let corrupt = |w: String| SnapshotError::Corrupt(dir.to_path_buf(), w);
    let manifest_path = dir.join(MANIFEST);
    let text = read_small(&manifest_path)?;
    let value: serde_json::Value = serde_json::from_slice(&text)
        .map_err(|e| corrupt(format!("{MANIFEST} is not JSON: {e}")))?;
    match value.get("format_version").and_then(|v| v.as_u64()) {
        Some(v) if v == u64::from(FORMAT_VERSION) => {}
        Some(v) => return Err(SnapshotError::Version(dir.to_path_buf(), v)),
        None => return Err(corrupt(format!("{MANIFEST} has no format_version"))),
    }
    let manifest: Manifest = serde_json::from_value(value)
        .map_err(|e| corrupt(format!("{MANIFEST} is not a manifest: {e}")))?;
    manifest
        .config
        .validate()
        .map_err(|e| corrupt(format!("its configuration: {e}")))?;
    let layout = RamLayout::new(manifest.config.memory_mib << 20);
    let want: Vec<(u64, u64)> = layout.ranges().into_iter().collect();
    let have: Vec<(u64, u64)> = manifest
        .memory
        .regions
        .iter()
        .map(|r| (r.guest_addr, r.size))
        .collect();
    if want != have {
        return Err(corrupt(format!(
            "its memory regions do not match {} MiB of RAM",
            manifest.config.memory_mib
        )));
    }
    let state_path = member(dir, &manifest.state.file)?;
    let bytes = read_small(&state_path)?;
    if bytes.len() as u64 != manifest.state.len {
        return Err(corrupt(format!(
            "{} has {} bytes, the manifest says {}: truncated or not this snapshot's",
            manifest.state.file,
            bytes.len(),
            manifest.state.len
        )));
    }
    if format!("{:016x}", fnv64(&bytes)) != manifest.state.fnv64 {
        return Err(corrupt(format!(
            "{} does not match its checksum: it is corrupt",
            manifest.state.file
        )));
    }
    let state: MachineState = serde_json::from_slice(&bytes)
        .map_err(|e| corrupt(format!("{}: {e}", manifest.state.file)))?;
    if state.vcpus.len() != manifest.config.cpus as usize {
        return Err(corrupt(format!(
            "{} vCPU states for {} vCPUs",
            state.vcpus.len(),
            manifest.config.cpus
        )));
    }
    let memory_path = member(dir, &manifest.memory.file)?;
    let loaded = Loaded {
        manifest,
        state,
        memory_path,
    };
    memfile::check_layout(&loaded.regions(), loaded.manifest.memory.file_size)?;
    let len = std::fs::metadata(&loaded.memory_path)
        .map_err(io(&loaded.memory_path, "cannot stat"))?
        .len();
    if len != loaded.manifest.memory.file_size {
        return Err(corrupt(format!(
            "{} has {len} bytes, the manifest says {}: it is truncated",
            loaded.manifest.memory.file, loaded.manifest.memory.file_size
        )));
    }
    Ok(loaded)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ferro-snapunit-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn refuses_missing_bad_and_unknown_manifests() {
        let d = dir("manifest");
        assert!(matches!(load(&d), Err(SnapshotError::Io { .. })));
        std::fs::write(d.join(MANIFEST), b"{not json").unwrap();
        assert!(matches!(load(&d), Err(SnapshotError::Corrupt(..))));
        std::fs::write(d.join(MANIFEST), br#"{"format_version": 99}"#).unwrap();
        let e = load(&d).err().unwrap();
        assert!(matches!(e, SnapshotError::Version(_, 99)), "{e}");
        std::fs::write(d.join(MANIFEST), br#"{"format_version": 1}"#).unwrap();
        assert!(matches!(load(&d), Err(SnapshotError::Corrupt(..))));
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn member_names_stay_inside() {
        let d = Path::new("/snap");
        assert!(member(d, "memory").is_ok());
        for bad in ["", "..", "../x", "/etc/passwd", "a/b"] {
            assert!(member(d, bad).is_err(), "{bad}");
        }
    }
}
