//! VM networking: one host bridge (default `ferrobr0`, 10.77.0.1/24), a tap per NIC on it,
//! and per NIC a MAC and an IPv4 address from the bridge's subnet, kept in the `nics` table
//! (migration 4; MAC, tap and address are UNIQUE there, so two VMs never share one).
//!
//! A NIC the daemon manages is one given without `tap=` and without a `bridge=` other than
//! the daemon's (`--net auto`, or `{}` in the API). At start the daemon creates the bridge if
//! it is missing (`ip link add ... type bridge`, address, up) and passes `tap=fvXXXXXX,
//! bridge=BR,mac=...` to the VMM, which creates the tap, brings it up and enslaves it; the tap
//! is not persistent, so it disappears with the VMM however it ends (the daemon still deletes
//! a leftover one when the VM stops and before it starts). The first NIC's address reaches the
//! guest on its command line: `ferro.ip=ADDR/PREFIX ferro.gw=BRIDGE` (guest/debian) and
//! `net_ip=ADDR` (the probe guest), unless the command line sets them itself. Other NICs
//! (`tap=NAME`, or another bridge) are the caller's business; they still get a unique MAC.
//!
//! The bridge is left in place when the daemon ends. Everything here runs `ip` (iproute2) in
//! the daemon's network namespace: run the daemon under `ip netns exec NS` to keep its
//! bridge and taps there.

use std::collections::HashSet;
use std::io::Read;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use ferro_api::rest::Nic;
use ferro_api::{MacAddr, NetConfig, VmConfig};
use rusqlite::{params, Connection, Transaction};

use crate::error::DaemonError;

/// The default bridge.
pub const DEFAULT_BRIDGE: &str = "ferrobr0";
/// The default bridge address.
pub const DEFAULT_BRIDGE_ADDR: &str = "10.77.0.1/24";

/// The daemon's bridge and its subnet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetSettings {
    /// The bridge's interface name.
    pub bridge: String,
    /// The bridge's own address.
    pub addr: Ipv4Addr,
    /// Prefix length of the subnet (8..=30).
    pub prefix: u8,
}

impl Default for NetSettings {
    fn default() -> Self {
        Self {
            bridge: DEFAULT_BRIDGE.to_string(),
            addr: Ipv4Addr::new(10, 77, 0, 1),
            prefix: 24,
        }
    }
}

/// Whether `name` is a usable interface name (1 to 15 bytes, no `/`, blank or `:`).
pub fn valid_ifname(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl NetSettings {
    /// Settings from a bridge name and `ADDR/PREFIX`.
    pub fn new(bridge: &str, cidr: &str) -> Result<Self, String> {
        if !valid_ifname(bridge) {
            return Err(format!(
                "bridge '{bridge}' is not an interface name (1 to 15 of a-z A-Z 0-9 - _ .)"
            ));
        }
        let (a, p) = cidr
            .split_once('/')
            .ok_or_else(|| format!("'{cidr}' is not ADDR/PREFIX (like 10.77.0.1/24)"))?;
        let addr: Ipv4Addr = a
            .parse()
            .map_err(|_| format!("'{a}' is not an IPv4 address"))?;
        let prefix: u8 = p
            .parse()
            .ok()
            .filter(|p| (8..=30).contains(p))
            .ok_or_else(|| format!("prefix '/{p}' must be 8 to 30"))?;
        let s = Self {
            bridge: bridge.to_string(),
            addr,
            prefix,
        };
        if addr == s.network() || addr == s.broadcast() {
            return Err(format!(
                "{cidr}: the bridge needs a host address, not the subnet's network or broadcast address"
            ));
        }
        Ok(s)
    }

    fn mask(&self) -> u32 {
        u32::MAX << (32 - u32::from(self.prefix))
    }
    fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }
    fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !self.mask())
    }

    /// `ADDR/PREFIX` of the bridge.
    pub fn cidr(&self) -> String {
        format!("{}/{}", self.addr, self.prefix)
    }

    /// Whether `ip` is a guest address of the pool.
    pub fn in_pool(&self, ip: Ipv4Addr) -> bool {
        (u32::from(ip) & self.mask()) == u32::from(self.network())
            && ip != self.network()
            && ip != self.broadcast()
            && ip != self.addr
    }

    /// The lowest pool address not in `used`.
    fn free_ip(&self, used: &HashSet<Ipv4Addr>) -> Option<Ipv4Addr> {
        let first = u32::from(self.network()) + 1;
        let last = u32::from(self.broadcast()) - 1;
        (first..=last)
            .map(Ipv4Addr::from)
            .find(|ip| *ip != self.addr && !used.contains(ip))
    }

    /// Whether `n` is a NIC the daemon manages: no tap given, and no bridge but its own.
    pub fn manages(&self, n: &NetConfig) -> bool {
        n.tap.is_none() && n.bridge.as_deref().is_none_or(|b| b == self.bridge)
    }
}

/// One row of the `nics` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicRow {
    /// Index among the VM's NICs.
    pub idx: u32,
    /// The MAC.
    pub mac: MacAddr,
    /// The daemon's tap (managed NICs only).
    pub tap: Option<String>,
    /// The pool address (managed NICs only).
    pub ip: Option<Ipv4Addr>,
}

/// The NIC rows of VM `vm`, by index.
pub fn rows(conn: &Connection, vm: &str) -> Result<Vec<NicRow>, DaemonError> {
    let mut st = conn.prepare("SELECT idx, mac, tap, ip FROM nics WHERE vm = ?1 ORDER BY idx")?;
    let rows = st.query_map([vm], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, Option<String>>(2)?,
            r.get::<_, Option<String>>(3)?,
        ))
    })?;
    let mut out = Vec::new();
    for r in rows {
        let (idx, mac, tap, ip) = r?;
        out.push(NicRow {
            idx: u32::try_from(idx).unwrap_or(u32::MAX),
            mac: mac.parse().map_err(|_| corrupt("nics.mac"))?,
            tap,
            ip: match ip {
                Some(i) => Some(i.parse().map_err(|_| corrupt("nics.ip"))?),
                None => None,
            },
        });
    }
    Ok(out)
}

fn corrupt(what: &str) -> DaemonError {
    DaemonError::Store(rusqlite::Error::InvalidColumnType(
        0,
        what.to_string(),
        rusqlite::types::Type::Text,
    ))
}

fn random_bytes<const N: usize>() -> Result<[u8; N], DaemonError> {
    let mut b = [0u8; N];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(DaemonError::io("cannot read /dev/urandom"))?;
    Ok(b)
}

/// Makes the `nics` rows of VM `vm` match `nets` (inside the caller's transaction): a NIC
/// keeps its row (found by MAC), a new one gets a free MAC and, when managed, a tap name and
/// a pool address; rows of removed NICs go. Writes the MACs into `nets`. A MAC another VM
/// uses is a conflict; an exhausted pool too.
pub fn sync(
    tx: &Transaction<'_>,
    net: &NetSettings,
    vm: &str,
    nets: &mut [NetConfig],
) -> Result<Vec<NicRow>, DaemonError> {
    let old = rows(tx, vm)?;
    tx.execute("DELETE FROM nics WHERE vm = ?1", [vm])?;
    let mut used_macs: HashSet<MacAddr> = HashSet::new();
    let mut used_taps: HashSet<String> = HashSet::new();
    let mut used_ips: HashSet<Ipv4Addr> = HashSet::new();
    {
        let mut st = tx.prepare("SELECT mac, tap, ip FROM nics")?;
        let all = st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Option<String>>(1)?,
                r.get::<_, Option<String>>(2)?,
            ))
        })?;
        for r in all {
            let (m, t, i) = r?;
            if let Ok(m) = m.parse() {
                used_macs.insert(m);
            }
            used_taps.extend(t);
            if let Some(Ok(i)) = i.map(|i| i.parse()) {
                used_ips.insert(i);
            }
        }
    }
    let mut out = Vec::new();
    for (i, n) in nets.iter_mut().enumerate() {
        let idx = u32::try_from(i).unwrap_or(u32::MAX);
        let prev = n.mac.and_then(|m| old.iter().find(|r| r.mac == m));
        let mac = match n.mac {
            Some(m) => {
                if used_macs.contains(&m) {
                    let owner: String = tx
                        .query_row("SELECT vm FROM nics WHERE mac = ?1", [m.to_string()], |r| {
                            r.get(0)
                        })
                        .unwrap_or_else(|_| "another NIC of this VM".into());
                    return Err(DaemonError::Conflict(format!(
                        "MAC {m} is in use by VM '{owner}': leave mac= out and the daemon picks a free one"
                    )));
                }
                m
            }
            None => loop {
                let b = random_bytes::<3>()?;
                let m = MacAddr([0x52, 0x54, 0xfe, b[0], b[1], b[2]]);
                if !used_macs.contains(&m) {
                    break m;
                }
            },
        };
        used_macs.insert(mac);
        n.mac = Some(mac);
        let (tap, ip) = if net.manages(n) {
            let tap = match prev.and_then(|p| p.tap.clone()) {
                Some(t) => t,
                None => loop {
                    let b = random_bytes::<3>()?;
                    let t = format!("fv{:02x}{:02x}{:02x}", b[0], b[1], b[2]);
                    if !used_taps.contains(&t) && !Path::new("/sys/class/net").join(&t).exists() {
                        break t;
                    }
                },
            };
            used_taps.insert(tap.clone());
            let ip = match prev.and_then(|p| p.ip).filter(|ip| net.in_pool(*ip)) {
                Some(ip) => ip,
                None => net.free_ip(&used_ips).ok_or_else(|| {
                    DaemonError::Conflict(format!(
                        "the address pool of bridge {} ({}) is exhausted: delete a VM's NIC or give the daemon a larger --bridge-address",
                        net.bridge,
                        net.cidr()
                    ))
                })?,
            };
            used_ips.insert(ip);
            (Some(tap), Some(ip))
        } else {
            (None, None)
        };
        tx.execute(
            "INSERT INTO nics (vm, idx, mac, tap, ip) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                vm,
                i64::from(idx),
                mac.to_string(),
                tap,
                ip.map(|i| i.to_string())
            ],
        )?;
        out.push(NicRow { idx, mac, tap, ip });
    }
    Ok(out)
}

/// Removes the NIC rows of a deleted VM.
pub fn forget(tx: &Transaction<'_>, vm: &str) -> Result<(), DaemonError> {
    tx.execute("DELETE FROM nics WHERE vm = ?1", [vm])?;
    Ok(())
}

/// The API view of a VM's NICs.
pub fn view(net: &NetSettings, nets: &[NetConfig], rows: &[NicRow]) -> Vec<Nic> {
    nets.iter()
        .enumerate()
        .map(|(i, n)| {
            let row = rows.iter().find(|r| Some(r.mac) == n.mac);
            let managed = row.is_some_and(|r| r.tap.is_some());
            Nic {
                index: u32::try_from(i).unwrap_or(u32::MAX),
                mac: n
                    .mac
                    .or(row.map(|r| r.mac))
                    .map(|m| m.to_string())
                    .unwrap_or_default(),
                tap: if managed {
                    row.and_then(|r| r.tap.clone())
                } else {
                    n.tap.clone()
                },
                bridge: if managed {
                    Some(net.bridge.clone())
                } else {
                    n.bridge.clone()
                },
                address: row
                    .and_then(|r| r.ip)
                    .map(|ip| format!("{ip}/{}", net.prefix)),
            }
        })
        .collect()
}

/// What the VMM runs: `cfg` with the managed NICs' taps and bridge filled in and the first
/// NIC's address on the command line.
pub fn runtime_config(net: &NetSettings, cfg: &VmConfig, rows: &[NicRow]) -> VmConfig {
    let mut out = cfg.clone();
    for n in &mut out.nets {
        if let Some(r) = rows.iter().find(|r| Some(r.mac) == n.mac) {
            if let Some(t) = &r.tap {
                n.tap = Some(t.clone());
                n.bridge = Some(net.bridge.clone());
            }
        }
    }
    let first = out
        .nets
        .first()
        .and_then(|n| rows.iter().find(|r| Some(r.mac) == n.mac))
        .and_then(|r| r.ip);
    if let Some(ip) = first {
        let mut extra = Vec::new();
        if !has_param(&out.cmdline, "ferro.ip") {
            extra.push(format!("ferro.ip={ip}/{}", net.prefix));
            if !has_param(&out.cmdline, "ferro.gw") {
                extra.push(format!("ferro.gw={}", net.addr));
            }
        }
        if !has_param(&out.cmdline, "net_ip") {
            extra.push(format!("net_ip={ip}"));
        }
        for e in extra {
            if !out.cmdline.is_empty() {
                out.cmdline.push(' ');
            }
            out.cmdline.push_str(&e);
        }
    }
    out
}

fn has_param(cmdline: &str, key: &str) -> bool {
    cmdline
        .split_ascii_whitespace()
        .any(|w| w.split_once('=').is_some_and(|(k, _)| k == key))
}

/// The managed taps of `rows`.
pub fn taps(rows: &[NicRow]) -> Vec<String> {
    rows.iter().filter_map(|r| r.tap.clone()).collect()
}

async fn ip(args: &[&str]) -> Result<std::process::Output, DaemonError> {
    tokio::process::Command::new("ip")
        .args(args)
        .output()
        .await
        .map_err(DaemonError::io("cannot run ip (install iproute2)"))
}

fn ip_failed(what: &str, out: &std::process::Output) -> DaemonError {
    DaemonError::Io {
        what: what.to_string(),
        source: std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()),
    }
}

/// Creates the bridge if it is missing, gives it its address and brings it up.
pub async fn ensure_bridge(net: &NetSettings) -> Result<(), DaemonError> {
    let sys = Path::new("/sys/class/net").join(&net.bridge);
    if !sys.exists() {
        let out = ip(&["link", "add", &net.bridge, "type", "bridge"]).await?;
        if !out.status.success() && !sys.exists() {
            return Err(ip_failed(
                &format!("cannot create bridge {}", net.bridge),
                &out,
            ));
        }
    } else if !sys.join("bridge").exists() {
        return Err(DaemonError::Conflict(format!(
            "interface {} exists and is not a bridge: give the daemon another --bridge",
            net.bridge
        )));
    }
    let cidr = net.cidr();
    let out = ip(&["addr", "replace", &cidr, "dev", &net.bridge]).await?;
    if !out.status.success() {
        return Err(ip_failed(
            &format!("cannot give bridge {} address {cidr}", net.bridge),
            &out,
        ));
    }
    let out = ip(&["link", "set", &net.bridge, "up"]).await?;
    if !out.status.success() {
        return Err(ip_failed(
            &format!("cannot bring bridge {} up", net.bridge),
            &out,
        ));
    }
    Ok(())
}

/// Makes sure the taps are gone: a tap ends with its VMM (give it a moment), a leftover one
/// (made persistent by someone, or still held) is deleted.
pub async fn release_taps(taps: &[String]) {
    let t = Instant::now();
    for tap in taps {
        let sys = Path::new("/sys/class/net").join(tap);
        while sys.exists() && t.elapsed() < Duration::from_secs(1) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Only a tun/tap device is ours to delete.
        if sys.join("tun_flags").exists() {
            let _ = ip(&["link", "del", tap]).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_and_pool() {
        let n = NetSettings::new("br9", "10.0.0.1/30").unwrap();
        assert!(!n.in_pool(Ipv4Addr::new(10, 0, 0, 1)));
        assert!(n.in_pool(Ipv4Addr::new(10, 0, 0, 2)));
        assert!(!n.in_pool(Ipv4Addr::new(10, 0, 0, 3)));
        let mut used = HashSet::new();
        assert_eq!(n.free_ip(&used), Some(Ipv4Addr::new(10, 0, 0, 2)));
        used.insert(Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(n.free_ip(&used), None);
        assert!(NetSettings::new("br", "10.0.0.0/24").is_err());
        assert!(NetSettings::new("br", "10.0.0.1/31").is_err());
        assert!(NetSettings::new("br", "10.0.0.1").is_err());
        assert!(NetSettings::new("a-very-long-bridge-name", "10.0.0.1/24").is_err());
        assert!(NetSettings::new("br", "300.0.0.1/24").is_err());
        let d = NetSettings::default();
        assert_eq!(
            (d.bridge.as_str(), d.cidr()),
            ("ferrobr0", "10.77.0.1/24".into())
        );
    }

    #[test]
    fn sync_keeps_macs_and_addresses_unique_and_reuses_freed_ones() {
        let dir = std::env::temp_dir().join(format!("ferro-net-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = crate::store::Store::open(&dir.join("db")).unwrap();
        let net = NetSettings::new("br0", "10.9.0.1/29").unwrap(); // pool .2 .. .6
        let auto = || NetConfig {
            tap: None,
            mac: None,
            bridge: None,
        };
        let mut all = Vec::new();
        for vm in ["a", "b"] {
            let mut nets = vec![auto(), auto()];
            let rows = s.transaction(|tx| sync(tx, &net, vm, &mut nets)).unwrap();
            assert!(nets.iter().all(|n| n.mac.is_some()));
            all.extend(rows);
        }
        let macs: HashSet<_> = all.iter().map(|r| r.mac).collect();
        let ips: Vec<_> = all.iter().filter_map(|r| r.ip).collect();
        let taps: HashSet<_> = all.iter().filter_map(|r| r.tap.clone()).collect();
        assert_eq!((macs.len(), taps.len()), (4, 4));
        let ip = |n| Ipv4Addr::new(10, 9, 0, n);
        assert_eq!(ips, [ip(2), ip(3), ip(4), ip(5)]);
        // Two more NICs do not fit the pool (one address left): refused, nothing stored.
        let mut nets = vec![auto(), auto()];
        let e = s.transaction(|tx| sync(tx, &net, "c", &mut nets));
        assert!(matches!(e, Err(DaemonError::Conflict(_))), "{e:?}");
        assert!(rows(s.conn(), "c").unwrap().is_empty());
        // Another VM's MAC is refused.
        let mut nets = vec![NetConfig {
            mac: Some(all[0].mac),
            ..auto()
        }];
        let e = s.transaction(|tx| sync(tx, &net, "c", &mut nets));
        assert!(matches!(e, Err(DaemonError::Conflict(_))), "{e:?}");
        // b's addresses come back when it goes; a keeps its own on a re-sync.
        s.transaction(|tx| forget(tx, "b")).unwrap();
        let mut nets = vec![auto(), auto()];
        let c = s.transaction(|tx| sync(tx, &net, "c", &mut nets)).unwrap();
        assert_eq!(
            c.iter().map(|r| r.ip).collect::<Vec<_>>(),
            [Some(ip(4)), Some(ip(5))]
        );
        let mut a_nets: Vec<NetConfig> = all[..2]
            .iter()
            .map(|r| NetConfig {
                mac: Some(r.mac),
                ..auto()
            })
            .collect();
        let again = s
            .transaction(|tx| sync(tx, &net, "a", &mut a_nets))
            .unwrap();
        assert_eq!(again, all[..2]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn command_line_gets_the_first_address_once() {
        let net = NetSettings::default();
        let mut cfg = VmConfig::new("/k");
        cfg.cmdline = "exit=halt".into();
        let mac: MacAddr = "52:54:fe:00:00:01".parse().unwrap();
        cfg.nets.push(NetConfig {
            tap: None,
            mac: Some(mac),
            bridge: None,
        });
        let rows = [NicRow {
            idx: 0,
            mac,
            tap: Some("fv000001".into()),
            ip: Some(Ipv4Addr::new(10, 77, 0, 2)),
        }];
        let r = runtime_config(&net, &cfg, &rows);
        assert_eq!(
            r.cmdline,
            "exit=halt ferro.ip=10.77.0.2/24 ferro.gw=10.77.0.1 net_ip=10.77.0.2"
        );
        assert_eq!(r.nets[0].tap.as_deref(), Some("fv000001"));
        assert_eq!(r.nets[0].bridge.as_deref(), Some("ferrobr0"));
        cfg.cmdline = "net_ip=1.2.3.4 ferro.ip=1.2.3.4/8".into();
        assert_eq!(runtime_config(&net, &cfg, &rows).cmdline, cfg.cmdline);
    }
}
