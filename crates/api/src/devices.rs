//! Device settings of a VM: disks, NICs, entropy, vsock, balloon. Each parses from the
//! `key=value,key=value` form the `--disk`, `--net` and `--vsock` flags take, and is serde-described
//! for config files and the API.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

/// A device option that cannot be understood.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DeviceError {
    /// An option this device does not have.
    #[error("{device}: unknown option '{key}' (known: {known})")]
    UnknownKey {
        /// Device kind.
        device: &'static str,
        /// The option given.
        key: String,
        /// The options it has.
        known: &'static str,
    },
    /// A required option is missing.
    #[error("{device}: '{key}=' is required")]
    Missing {
        /// Device kind.
        device: &'static str,
        /// The option.
        key: &'static str,
    },
    /// A value that does not fit its option.
    #[error("{device}: '{key}={value}' is invalid: {why}")]
    BadValue {
        /// Device kind.
        device: &'static str,
        /// The option.
        key: String,
        /// The value given.
        value: String,
        /// What is expected.
        why: &'static str,
    },
}

/// Splits `a=1,b=2` into pairs; a bare first item becomes `first_key=item`.
fn pairs(
    device: &'static str,
    text: &str,
    first_key: Option<&'static str>,
) -> Result<Vec<(String, String)>, DeviceError> {
    let mut out = Vec::new();
    for (i, item) in text.split(',').enumerate() {
        if item.is_empty() {
            continue;
        }
        match item.split_once('=') {
            Some((k, v)) => out.push((k.trim().to_string(), v.to_string())),
            None => match (i, first_key) {
                (0, Some(k)) => out.push((k.to_string(), item.to_string())),
                _ => {
                    return Err(DeviceError::BadValue {
                        device,
                        key: item.to_string(),
                        value: String::new(),
                        why: "expected key=value",
                    })
                }
            },
        }
    }
    Ok(out)
}

fn on_off(device: &'static str, key: &str, v: &str) -> Result<bool, DeviceError> {
    match v {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(DeviceError::BadValue {
            device,
            key: key.to_string(),
            value: v.to_string(),
            why: "use on or off",
        }),
    }
}

/// Format of a disk image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// A plain image.
    Raw,
    /// QEMU copy-on-write v2/v3, possibly with a backing chain.
    Qcow2,
}

/// How a disk's host file is cached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskCache {
    /// Through the host's page cache; a guest flush makes the data durable.
    #[default]
    Writeback,
    /// O_DIRECT where the request and the filesystem allow it (bypasses the page cache).
    None,
}

/// One virtio-blk disk:
/// `--disk path=FILE[,format=raw|qcow2][,readonly=on][,serial=S][,cache=writeback|none]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Image file.
    pub path: PathBuf,
    /// Image format; detected from the file when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<DiskFormat>,
    /// Guest may not write.
    #[serde(default)]
    pub readonly: bool,
    /// Serial number the guest sees (at most 20 bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// Host caching of the image.
    #[serde(default)]
    pub cache: DiskCache,
}

impl FromStr for DiskConfig {
    type Err = DeviceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const D: &str = "--disk";
        let mut cfg = DiskConfig {
            path: PathBuf::new(),
            format: None,
            readonly: false,
            serial: None,
            cache: DiskCache::Writeback,
        };
        for (k, v) in pairs(D, s, Some("path"))? {
            match k.as_str() {
                "path" => cfg.path = PathBuf::from(v),
                "format" => {
                    cfg.format = Some(match v.as_str() {
                        "raw" => DiskFormat::Raw,
                        "qcow2" => DiskFormat::Qcow2,
                        _ => {
                            return Err(DeviceError::BadValue {
                                device: D,
                                key: k,
                                value: v,
                                why: "use raw or qcow2",
                            })
                        }
                    })
                }
                "readonly" | "ro" => cfg.readonly = on_off(D, &k, &v)?,
                "cache" => {
                    cfg.cache = match v.as_str() {
                        "writeback" => DiskCache::Writeback,
                        "none" => DiskCache::None,
                        _ => {
                            return Err(DeviceError::BadValue {
                                device: D,
                                key: k,
                                value: v,
                                why: "use writeback or none",
                            })
                        }
                    }
                }
                "serial" => {
                    if v.len() > 20 {
                        return Err(DeviceError::BadValue {
                            device: D,
                            key: k,
                            value: v,
                            why: "at most 20 bytes",
                        });
                    }
                    cfg.serial = Some(v)
                }
                _ => {
                    return Err(DeviceError::UnknownKey {
                        device: D,
                        key: k,
                        known: "path, format, readonly, serial, cache",
                    })
                }
            }
        }
        if cfg.path.as_os_str().is_empty() {
            return Err(DeviceError::Missing {
                device: D,
                key: "path",
            });
        }
        Ok(cfg)
    }
}

/// An Ethernet MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// Whether this is a unicast address a NIC may use.
    pub fn is_unicast(&self) -> bool {
        self.0[0] & 1 == 0
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl FromStr for MacAddr {
    type Err = DeviceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || DeviceError::BadValue {
            device: "--net",
            key: "mac".into(),
            value: s.to_string(),
            why: "expected six hex bytes like 52:54:00:12:34:56, unicast",
        };
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(bad());
        }
        let mut mac = [0u8; 6];
        for (dst, p) in mac.iter_mut().zip(parts) {
            if p.len() != 2 {
                return Err(bad());
            }
            *dst = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        let mac = MacAddr(mac);
        if !mac.is_unicast() {
            return Err(bad());
        }
        Ok(mac)
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// One virtio-net NIC on a tap: `--net tap=NAME[,mac=MAC][,bridge=BR]`, or `--net auto` for a
/// tap the VMM creates with a free name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// The tap device: attached if it exists, created otherwise. `None`: create one named `ferro%d`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    /// The guest's MAC; generated when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddr>,
    /// A bridge to attach a tap the VMM created to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
}

impl FromStr for NetConfig {
    type Err = DeviceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const D: &str = "--net";
        let mut cfg = NetConfig {
            tap: None,
            mac: None,
            bridge: None,
        };
        for (k, v) in pairs(D, s, Some("tap"))? {
            match k.as_str() {
                "tap" if v == "auto" => cfg.tap = None,
                "tap" => {
                    if v.is_empty() || v.len() > 15 || v.contains('/') {
                        return Err(DeviceError::BadValue {
                            device: D,
                            key: k,
                            value: v,
                            why: "an interface name of 1 to 15 bytes",
                        });
                    }
                    cfg.tap = Some(v)
                }
                "mac" => cfg.mac = Some(v.parse()?),
                "bridge" => cfg.bridge = Some(v),
                _ => {
                    return Err(DeviceError::UnknownKey {
                        device: D,
                        key: k,
                        known: "tap, mac, bridge",
                    })
                }
            }
        }
        Ok(cfg)
    }
}

/// virtio-vsock with a host-side unix socket: `--vsock cid=N,uds=PATH`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's context id (3 and up).
    pub cid: u32,
    /// Host unix socket: host connects to `PATH` and writes `CONNECT <port>\n`; guest
    /// connections to port P reach a listener at `PATH_P`.
    pub uds: PathBuf,
}

impl FromStr for VsockConfig {
    type Err = DeviceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const D: &str = "--vsock";
        let mut cid = None;
        let mut uds = None;
        for (k, v) in pairs(D, s, None)? {
            match k.as_str() {
                "cid" => {
                    let n: u32 = v.parse().map_err(|_| DeviceError::BadValue {
                        device: D,
                        key: k.clone(),
                        value: v.clone(),
                        why: "a number of 3 or more",
                    })?;
                    if n < 3 || n == u32::MAX {
                        return Err(DeviceError::BadValue {
                            device: D,
                            key: k,
                            value: v,
                            why: "a number of 3 or more (0-2 are reserved)",
                        });
                    }
                    cid = Some(n)
                }
                "uds" => uds = Some(PathBuf::from(v)),
                _ => {
                    return Err(DeviceError::UnknownKey {
                        device: D,
                        key: k,
                        known: "cid, uds",
                    })
                }
            }
        }
        Ok(VsockConfig {
            cid: cid.ok_or(DeviceError::Missing {
                device: D,
                key: "cid",
            })?,
            uds: uds.ok_or(DeviceError::Missing {
                device: D,
                key: "uds",
            })?,
        })
    }
}

/// virtio-balloon: `--balloon`, or `--balloon target=SIZE` to start with that much memory
/// (MiB, or a size like `512M`) in the balloon.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonConfig {
    /// The balloon's size at boot, in MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_mib: Option<u64>,
}

impl FromStr for BalloonConfig {
    type Err = DeviceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const D: &str = "--balloon";
        let mut cfg = BalloonConfig::default();
        if s == "on" {
            return Ok(cfg);
        }
        for (k, v) in pairs(D, s, None)? {
            match k.as_str() {
                "target" => {
                    cfg.target_mib =
                        Some(
                            crate::size::parse_mib(&v).map_err(|_| DeviceError::BadValue {
                                device: D,
                                key: k.clone(),
                                value: v.clone(),
                                why: "a size in MiB, or with a unit: 512M, 1G",
                            })?,
                        )
                }
                _ => {
                    return Err(DeviceError::UnknownKey {
                        device: D,
                        key: k,
                        known: "target",
                    })
                }
            }
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_forms() {
        let d: DiskConfig = "path=/a.qcow2,format=qcow2,readonly=on,serial=X1"
            .parse()
            .unwrap();
        assert_eq!(d.path, PathBuf::from("/a.qcow2"));
        assert_eq!(d.format, Some(DiskFormat::Qcow2));
        assert!(d.readonly);
        assert_eq!(d.serial.as_deref(), Some("X1"));
        let bare: DiskConfig = "/b.img".parse().unwrap();
        assert_eq!((bare.format, bare.readonly), (None, false));
        assert!("format=raw".parse::<DiskConfig>().is_err());
        assert!("path=/a,format=vmdk".parse::<DiskConfig>().is_err());
        assert_eq!(bare.cache, DiskCache::Writeback);
        let direct: DiskConfig = "path=/a,cache=none".parse().unwrap();
        assert_eq!(direct.cache, DiskCache::None);
        assert!("path=/a,cache=unsafe".parse::<DiskConfig>().is_err());
        assert!("path=/a,aio=native".parse::<DiskConfig>().is_err());
        let j: DiskConfig = serde_json::from_str(r#"{"path":"/a","cache":"none"}"#).unwrap();
        assert_eq!(j.cache, DiskCache::None);
        let j: DiskConfig = serde_json::from_str(r#"{"path":"/a"}"#).unwrap();
        assert_eq!(j.cache, DiskCache::Writeback);
        assert!("path=/a,readonly=maybe".parse::<DiskConfig>().is_err());
        assert!("path=/a,serial=012345678901234567890"
            .parse::<DiskConfig>()
            .is_err());
    }

    #[test]
    fn net_forms() {
        let n: NetConfig = "tap=tap0,mac=52:54:00:12:34:56".parse().unwrap();
        assert_eq!(n.tap.as_deref(), Some("tap0"));
        assert_eq!(n.mac.unwrap().to_string(), "52:54:00:12:34:56");
        let auto: NetConfig = "auto".parse().unwrap();
        assert_eq!(auto.tap, None);
        assert!("tap=t,mac=01:00:00:00:00:00".parse::<NetConfig>().is_err());
        assert!("tap=t,mac=zz:00:00:00:00:00".parse::<NetConfig>().is_err());
        assert!("tap=a-very-long-interface-name"
            .parse::<NetConfig>()
            .is_err());
    }

    #[test]
    fn vsock_forms() {
        let v: VsockConfig = "cid=3,uds=/tmp/v.sock".parse().unwrap();
        assert_eq!(v.cid, 3);
        assert!("cid=2,uds=/x".parse::<VsockConfig>().is_err());
        assert!("uds=/x".parse::<VsockConfig>().is_err());
        assert!("cid=3".parse::<VsockConfig>().is_err());
    }

    #[test]
    fn balloon_forms() {
        assert_eq!("on".parse::<BalloonConfig>().unwrap().target_mib, None);
        assert_eq!("".parse::<BalloonConfig>().unwrap().target_mib, None);
        let b: BalloonConfig = "target=128".parse().unwrap();
        assert_eq!(b.target_mib, Some(128));
        assert_eq!(
            "target=1G".parse::<BalloonConfig>().unwrap().target_mib,
            Some(1024)
        );
        assert!("target=lots".parse::<BalloonConfig>().is_err());
        assert!("size=5".parse::<BalloonConfig>().is_err());
    }

    #[test]
    fn mac_serde_roundtrip() {
        let m: MacAddr = "52:54:00:ab:cd:ef".parse().unwrap();
        let j = serde_json::to_string(&m).unwrap();
        assert_eq!(j, "\"52:54:00:ab:cd:ef\"");
        assert_eq!(serde_json::from_str::<MacAddr>(&j).unwrap(), m);
    }
}
