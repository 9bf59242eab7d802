//! [`VmConfig`]: everything needed to run one VM, as flags, TOML or JSON.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};
use thiserror::Error;

use crate::devices::{DiskConfig, NetConfig, VsockConfig};
use crate::size::parse_mib;

/// Most vCPUs a VM may have.
pub const MAX_VCPUS: u32 = 32;
/// Least memory a VM may have, in MiB.
pub const MIN_MEMORY_MIB: u64 = 16;
/// Most memory a VM may have, in MiB (1 TiB).
pub const MAX_MEMORY_MIB: u64 = 1 << 20;

/// A configuration that cannot run.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The vCPU count is out of range.
    #[error("--cpus {0} is out of range: a VM has 1 to {MAX_VCPUS} vCPUs")]
    Cpus(u32),
    /// The memory size is out of range.
    #[error(
        "--memory {0} MiB is out of range: a VM has {MIN_MEMORY_MIB} MiB to {MAX_MEMORY_MIB} MiB"
    )]
    Memory(u64),
    /// The serial setting is not understood.
    #[error("--serial '{0}' is not one of stdio, file:PATH, socket:PATH, none")]
    Serial(String),
    /// The huge-pages setting is not understood.
    #[error("--huge-pages '{0}' is not one of auto, on, off")]
    HugePages(String),
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The config file is not valid TOML or JSON for a VmConfig.
    #[error("config file {path} is invalid: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's complaint.
        message: String,
    },
}

/// Where the VM's first serial port goes.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind", content = "path")]
pub enum SerialMode {
    /// The VMM's standard input and output.
    #[default]
    Stdio,
    /// Appended to a file.
    File(PathBuf),
    /// Discarded.
    None,
    /// A unix socket the VMM listens on: it keeps a ring buffer of recent output, replays it to
    /// each client that connects, then streams; what clients send goes to the guest's input.
    Socket(PathBuf),
}

impl std::str::FromStr for SerialMode {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stdio" => Ok(Self::Stdio),
            "none" => Ok(Self::None),
            _ => match (s.strip_prefix("file:"), s.strip_prefix("socket:")) {
                (Some(p), _) if !p.is_empty() => Ok(Self::File(PathBuf::from(p))),
                (_, Some(p)) if !p.is_empty() => Ok(Self::Socket(PathBuf::from(p))),
                _ => Err(ConfigError::Serial(s.to_string())),
            },
        }
    }
}

/// One VM, as the VMM runs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Kernel: a PVH ELF, a Linux vmlinux ELF or a Linux bzImage.
    pub kernel: PathBuf,
    /// Initial ramdisk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[serde(default)]
    pub cmdline: String,
    /// Number of vCPUs.
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    /// Guest memory in MiB; in files also "512M", "2G".
    #[serde(default = "default_memory", deserialize_with = "de_mib")]
    pub memory_mib: u64,
    /// The first serial port.
    #[serde(default)]
    pub serial: SerialMode,
    /// virtio-blk disks, in PCI slot order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskConfig>,
    /// virtio-net NICs, in PCI slot order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nets: Vec<NetConfig>,
    /// A virtio-rng entropy device.
    #[serde(default)]
    pub rng: bool,
    /// A virtio-vsock device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
    /// A virtio-balloon device.
    #[serde(default)]
    pub balloon: bool,
    /// The balloon's size at boot, in MiB (with `balloon`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon_target_mib: Option<u64>,
    /// Whether guest RAM asks the host for transparent huge pages.
    #[serde(default, skip_serializing_if = "HugePages::is_auto")]
    pub huge_pages: HugePages,
}

/// Transparent huge pages for guest RAM (`MADV_HUGEPAGE`). Huge pages make O_DIRECT disk I/O
/// straight into guest RAM cheaper (a 64 KiB request pins one 2 MiB folio instead of sixteen
/// 4 KiB pages, and reaches the host disk as one segment) and the guest's TLB misses shorter;
/// the price is that each first touch of a 2 MiB stretch makes all of it resident, so a mostly
/// idle guest's VMM is several MiB larger.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HugePages {
    /// On when a disk bypasses the host's page cache (`cache=none`), where the I/O lands in
    /// guest RAM directly; off otherwise.
    #[default]
    Auto,
    /// Always.
    On,
    /// Never (4 KiB pages).
    Off,
}

impl HugePages {
    /// Whether this is the default.
    pub fn is_auto(&self) -> bool {
        *self == HugePages::Auto
    }
}

impl std::str::FromStr for HugePages {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "on" => Ok(Self::On),
            "off" => Ok(Self::Off),
            _ => Err(ConfigError::HugePages(s.to_string())),
        }
    }
}

fn default_cpus() -> u32 {
    1
}

fn default_memory() -> u64 {
    256
}

fn de_mib<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Mib {
        Num(u64),
        Text(String),
    }
    match Mib::deserialize(d)? {
        Mib::Num(n) => Ok(n),
        Mib::Text(t) => parse_mib(&t).map_err(serde::de::Error::custom),
    }
}

impl VmConfig {
    /// This configuration with its files in `dir`, where a storage migration's destination
    /// writes them: the kernel as `kernel`, the initrd as `initrd`, disk `i` as raw image
    /// `disk{i}.raw` (the same guest-visible contents, whatever the source's format).
    pub fn relocated(&self, dir: &Path) -> VmConfig {
        let mut c = self.clone();
        c.kernel = dir.join("kernel");
        if c.initrd.is_some() {
            c.initrd = Some(dir.join("initrd"));
        }
        for (i, d) in c.disks.iter_mut().enumerate() {
            d.path = dir.join(format!("disk{i}.raw"));
            d.format = Some(crate::devices::DiskFormat::Raw);
        }
        c
    }

    /// Whether guest RAM should ask for transparent huge pages ([`HugePages`]).
    pub fn wants_huge_pages(&self) -> bool {
        match self.huge_pages {
            HugePages::On => true,
            HugePages::Off => false,
            HugePages::Auto => self
                .disks
                .iter()
                .any(|d| d.cache == crate::devices::DiskCache::None),
        }
    }

    /// A config with defaults for everything but the kernel.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: None,
            cmdline: String::new(),
            cpus: default_cpus(),
            memory_mib: default_memory(),
            serial: SerialMode::default(),
            disks: Vec::new(),
            nets: Vec::new(),
            rng: false,
            vsock: None,
            balloon: false,
            balloon_target_mib: None,
            huge_pages: HugePages::Auto,
        }
    }

    /// Reads a config file: JSON if it ends in `.json` or starts with `{`, TOML otherwise.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let parse_err = |message: String| ConfigError::Parse {
            path: path.to_path_buf(),
            message: message.lines().next().unwrap_or_default().to_string(),
        };
        let json =
            path.extension().is_some_and(|e| e == "json") || text.trim_start().starts_with('{');
        let cfg: Self = if json {
            serde_json::from_str(&text).map_err(|e| parse_err(e.to_string()))?
        } else {
            toml::from_str(&text).map_err(|e| parse_err(e.message().to_string()))?
        };
        Ok(cfg)
    }

    /// Checks the ranges a VM must respect.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.cpus == 0 || self.cpus > MAX_VCPUS {
            return Err(ConfigError::Cpus(self.cpus));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(ConfigError::Memory(self.memory_mib));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_and_json_agree() {
        let t: VmConfig = toml::from_str(
            "kernel = \"/k\"\ncpus = 4\nmemory_mib = \"2G\"\nserial = { kind = \"file\", path = \"/tmp/s\" }\n",
        )
        .unwrap();
        let j: VmConfig = serde_json::from_str(
            r#"{"kernel":"/k","cpus":4,"memory_mib":2048,"serial":{"kind":"file","path":"/tmp/s"}}"#,
        )
        .unwrap();
        assert_eq!(t, j);
        assert_eq!(t.memory_mib, 2048);
        assert_eq!(t.serial, SerialMode::File("/tmp/s".into()));
    }

    #[test]
    fn huge_pages_follow_the_disks_unless_forced() {
        let mut c = VmConfig::new("/k");
        assert!(!c.wants_huge_pages(), "no disk: 4 KiB pages");
        c.disks.push("path=/d.img".parse().unwrap());
        assert!(!c.wants_huge_pages(), "page-cached disk: 4 KiB pages");
        c.disks.push("path=/e.img,cache=none".parse().unwrap());
        assert!(c.wants_huge_pages(), "O_DIRECT disk: huge pages");
        c.huge_pages = "off".parse().unwrap();
        assert!(!c.wants_huge_pages());
        c.disks.clear();
        c.huge_pages = "on".parse().unwrap();
        assert!(c.wants_huge_pages());
        assert!(matches!(
            "always".parse::<HugePages>(),
            Err(ConfigError::HugePages(v)) if v == "always"
        ));
        // In files: lowercase words; the default is left out when written.
        let j: VmConfig = serde_json::from_str(r#"{"kernel":"/k","huge_pages":"off"}"#).unwrap();
        assert_eq!(j.huge_pages, HugePages::Off);
        let back = serde_json::to_string(&VmConfig::new("/k")).unwrap();
        assert!(!back.contains("huge_pages"), "{back}");
        assert!(serde_json::from_str::<VmConfig>(r#"{"kernel":"/k","huge_pages":1}"#).is_err());
    }

    #[test]
    fn defaults() {
        let c: VmConfig = toml::from_str("kernel = \"/k\"").unwrap();
        assert_eq!(c, VmConfig::new("/k"));
        assert_eq!((c.cpus, c.memory_mib), (1, 256));
        c.validate().unwrap();
    }

    #[test]
    fn ranges() {
        let mut c = VmConfig::new("/k");
        c.cpus = 0;
        assert!(matches!(c.validate(), Err(ConfigError::Cpus(0))));
        c.cpus = 33;
        assert!(matches!(c.validate(), Err(ConfigError::Cpus(33))));
        c.cpus = 32;
        c.memory_mib = 8;
        assert!(matches!(c.validate(), Err(ConfigError::Memory(8))));
        c.memory_mib = 16384;
        c.validate().unwrap();
    }

    #[test]
    fn unknown_field_rejected() {
        assert!(toml::from_str::<VmConfig>("kernel = \"/k\"\ncpu = 2").is_err());
    }

    #[test]
    fn serial_modes() {
        assert_eq!("stdio".parse::<SerialMode>().unwrap(), SerialMode::Stdio);
        assert_eq!("none".parse::<SerialMode>().unwrap(), SerialMode::None);
        assert_eq!(
            "file:/x".parse::<SerialMode>().unwrap(),
            SerialMode::File("/x".into())
        );
        assert!("file:".parse::<SerialMode>().is_err());
        assert_eq!(
            "socket:/s".parse::<SerialMode>().unwrap(),
            SerialMode::Socket("/s".into())
        );
        assert!("socket:".parse::<SerialMode>().is_err());
        assert!("tty".parse::<SerialMode>().is_err());
    }
}
