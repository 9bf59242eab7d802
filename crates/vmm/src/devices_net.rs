//! virtio-net NICs from `--net`: each opens (or creates) its tap, gets its MAC, and becomes a
//! [`ferro_virtio::net::Net`] on the PCI bus. The tap's name is reported on stderr
//! (`ferro-vmm: net0 tap=ferro0 mac=...`) and kept in [`NetInfo`] for status.

use std::path::Path;
use std::sync::Arc;

use ferro_api::{MacAddr, NetConfig};
use ferro_virtio::net::tap::Tap;
use ferro_virtio::net::{Net, NetCounters};
use ferro_virtio::VirtioDevice;

use crate::VmmError;

/// Name pattern of taps the VMM creates (the kernel fills in the number).
const AUTO_NAME: &str = "ferro%d";

/// One NIC as the VMM reports it.
#[derive(Debug, Clone)]
pub struct NetInfo {
    /// `net0`, `net1`, ... in PCI slot order.
    pub id: String,
    /// The tap's interface name.
    pub tap: String,
    /// The guest's MAC.
    pub mac: MacAddr,
    /// Whether the VMM created the tap (it disappears with the VMM).
    pub created: bool,
    /// Frame counters.
    pub counters: Arc<NetCounters>,
}

/// The MAC of NIC `index` when none is configured: locally administered 52:54:00, then the
/// VMM's pid and the index, so it is stable for a run and differs between NICs and VMs.
pub fn generated_mac(pid: u32, index: usize) -> MacAddr {
    MacAddr([0x52, 0x54, 0x00, (pid >> 8) as u8, pid as u8, index as u8])
}

/// Opens the taps of `nets` and appends their devices to `out`.
pub fn create(
    nets: &[NetConfig],
    out: &mut Vec<Box<dyn VirtioDevice>>,
) -> Result<Vec<NetInfo>, VmmError> {
    let mut infos = Vec::with_capacity(nets.len());
    for (i, cfg) in nets.iter().enumerate() {
        let id = format!("net{i}");
        let err = |e: &dyn std::fmt::Display| VmmError::Devices(format!("{id}: {e}"));
        let wanted = cfg.tap.as_deref().unwrap_or(AUTO_NAME);
        let existed = cfg.tap.is_some() && Path::new("/sys/class/net").join(wanted).exists();
        let tap = Tap::open(wanted).map_err(|e| err(&e))?;
        let created = !existed;
        if created {
            tap.up(cfg.bridge.as_deref()).map_err(|e| err(&e))?;
        }
        let name = tap.name().to_string();
        let mac = cfg
            .mac
            .unwrap_or_else(|| generated_mac(std::process::id(), i));
        let net = Net::new(Box::new(tap), mac.0).map_err(|e| err(&e))?;
        eprintln!("ferro-vmm: {id} tap={name} mac={mac}");
        infos.push(NetInfo {
            id,
            tap: name,
            mac,
            created,
            counters: net.counters(),
        });
        out.push(Box::new(net));
    }
    Ok(infos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_macs_are_local_unicast_and_distinct() {
        let a = generated_mac(4242, 0);
        let b = generated_mac(4242, 1);
        assert_ne!(a, b);
        assert_eq!(a, generated_mac(4242, 0));
        assert!(a.is_unicast());
        assert_eq!(a.0[..3], [0x52, 0x54, 0x00]);
    }
}
