//! The root bus (bus 0, one function per slot), its host bridge at 00:00.0, the two
//! configuration access mechanisms and the map of decoded BARs.
//!
//! Lock order: a device's lock is never requested while the BAR map's lock is held (lookups
//! clone the device handle out of the map first), so a config write (device, then map) and a
//! BAR access (map, released, then device) on two vCPUs cannot deadlock.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use ferro_devices::PioDevice;
use vm_allocator::{AddressAllocator, AllocPolicy};

use crate::config::{BarKind, ConfigSpace, PciIds, COMMAND_BUS_MASTER, COMMAND_MEMORY};
use crate::{PciDevice, PciError};

/// Slots on bus 0.
pub const NUM_SLOTS: u8 = 32;
/// Bytes of ECAM for one bus (32 slots x 8 functions x 4 KiB).
pub const ECAM_BUS_SIZE: u64 = 1 << 20;
/// Type 1 CONFIG_ADDRESS: enable bit.
const CF8_ENABLE: u32 = 1 << 31;

/// A host bridge memory window: where BARs may decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciWindow {
    /// First address.
    pub start: u64,
    /// Length in bytes.
    pub size: u64,
}

impl PciWindow {
    fn contains(&self, addr: u64, size: u64) -> bool {
        addr >= self.start
            && addr
                .checked_add(size)
                .is_some_and(|end| end <= self.start + self.size)
    }
}

/// Places BARs in the host bridge's windows: a 32-bit window below 4 GiB and an optional
/// 64-bit one, each managed by a `vm_allocator::AddressAllocator`.
pub struct BarAllocator {
    mem32: AddressAllocator,
    mem64: Option<AddressAllocator>,
}

impl BarAllocator {
    /// An allocator over `mem32` and, if given, `mem64`.
    pub fn new(mem32: PciWindow, mem64: Option<PciWindow>) -> Result<Self, PciError> {
        let make = |w: PciWindow| {
            AddressAllocator::new(w.start, w.size).map_err(|_| PciError::BadWindow {
                start: w.start,
                size: w.size,
            })
        };
        Ok(Self {
            mem32: make(mem32)?,
            mem64: mem64.map(make).transpose()?,
        })
    }

    /// Finds a naturally aligned place for a BAR of `size` bytes: 64-bit prefetchable BARs go
    /// to the 64-bit window when there is one, everything else below 4 GiB.
    pub fn allocate(
        &mut self,
        size: u64,
        kind: BarKind,
        prefetchable: bool,
    ) -> Result<u64, PciError> {
        let high = kind == BarKind::Mem64 && prefetchable;
        let alloc = match (&mut self.mem64, high) {
            (Some(a), true) => a,
            _ => &mut self.mem32,
        };
        alloc
            .allocate(size, size, AllocPolicy::FirstMatch)
            .map(|r| r.start())
            .map_err(|_| PciError::NoBarSpace { size })
    }
}

/// The host bridge at 00:00.0: a header and nothing else.
pub struct HostBridge {
    config: ConfigSpace,
}

impl HostBridge {
    /// Red Hat's "QEMU PCIe host bridge" ids, class 06/00 (host bridge).
    pub fn new() -> Self {
        Self {
            config: ConfigSpace::new(PciIds {
                vendor: 0x1b36,
                device: 0x0008,
                revision: 0,
                class: 0x06_00_00,
                subsystem_vendor: 0x1af4,
                subsystem: 0x1100,
            }),
        }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }
    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }
}

type Dev = Arc<Mutex<dyn PciDevice>>;

fn lock(dev: &Dev) -> MutexGuard<'_, dyn PciDevice + 'static> {
    dev.lock().unwrap_or_else(|e| e.into_inner())
}

/// A BAR that decodes now.
#[derive(Clone)]
struct MappedBar {
    addr: u64,
    size: u64,
    slot: u8,
    bar: usize,
    dev: Dev,
}

/// Bus 0: up to 32 single-function devices, the host bridge in slot 0.
pub struct PciRoot {
    slots: Vec<Option<Dev>>,
    windows: Vec<PciWindow>,
    /// Decoded BARs sorted by address; never overlapping (a guest that overlaps two BARs gets
    /// the first one placed).
    bars: RwLock<Vec<MappedBar>>,
    /// The type 1 CONFIG_ADDRESS latch.
    cf8: AtomicU32,
}

impl PciRoot {
    /// A root bus whose host bridge forwards `windows` to BARs, with the host bridge in slot 0.
    pub fn new(windows: Vec<PciWindow>) -> Self {
        let mut slots = vec![None; usize::from(NUM_SLOTS)];
        slots[0] = Some(Arc::new(Mutex::new(HostBridge::new())) as Dev);
        Self {
            slots,
            windows,
            bars: RwLock::new(Vec::new()),
            cf8: AtomicU32::new(0),
        }
    }

    /// Puts `dev` into `slot` (1..32), places its BARs with `alloc` as firmware would, and turns
    /// on memory decoding and bus mastering.
    pub fn add_device(
        &mut self,
        slot: u8,
        dev: Dev,
        alloc: &mut BarAllocator,
    ) -> Result<(), PciError> {
        let entry = self
            .slots
            .get_mut(usize::from(slot))
            .ok_or(PciError::NoSuchSlot(slot))?;
        if entry.is_some() {
            return Err(PciError::SlotInUse(slot));
        }
        {
            let mut d = lock(&dev);
            let bars: Vec<_> = d.config().bars().collect();
            for bar in bars {
                let addr = alloc.allocate(bar.size, bar.kind, bar.prefetchable)?;
                d.config_mut().set_bar_addr(bar.index, addr);
            }
            let cmd = d.config().command() | COMMAND_MEMORY | COMMAND_BUS_MASTER;
            d.config_mut()
                .write(crate::config::reg::COMMAND as u16, &cmd.to_le_bytes());
        }
        *entry = Some(dev.clone());
        self.remap(slot, &dev, &[]);
        Ok(())
    }

    /// The device in `slot`, if any.
    pub fn device(&self, slot: u8) -> Option<&Dev> {
        self.slots.get(usize::from(slot))?.as_ref()
    }

    /// Where the BARs of `cfg` decode now.
    fn decoded(&self, cfg: &ConfigSpace) -> Vec<(usize, u64, u64)> {
        if !cfg.memory_enabled() {
            return Vec::new();
        }
        cfg.bars()
            .filter_map(|b| {
                let addr = cfg.bar_addr(b.index)?;
                (addr != 0 && self.windows.iter().any(|w| w.contains(addr, b.size)))
                    .then_some((b.index, addr, b.size))
            })
            .collect()
    }

    /// Brings the map and the device up to date after its BARs may have changed from `old`.
    fn remap(&self, slot: u8, dev: &Dev, old: &[(usize, u64, u64)]) {
        let mut d = lock(dev);
        let new = self.decoded(d.config());
        if new == old {
            return;
        }
        {
            let mut map = self.bars.write().unwrap_or_else(|e| e.into_inner());
            map.retain(|m| m.slot != slot);
            for &(bar, addr, size) in &new {
                let overlaps = map
                    .iter()
                    .any(|m| addr < m.addr + m.size && m.addr < addr + size);
                if !overlaps {
                    let at = map.partition_point(|m| m.addr < addr);
                    map.insert(
                        at,
                        MappedBar {
                            addr,
                            size,
                            slot,
                            bar,
                            dev: dev.clone(),
                        },
                    );
                }
            }
        }
        for bar in d.config().bars().map(|b| b.index).collect::<Vec<_>>() {
            let was = old.iter().find(|o| o.0 == bar).map(|o| o.1);
            let now = new.iter().find(|n| n.0 == bar).map(|n| n.1);
            if was != now {
                d.bar_moved(bar, now);
            }
        }
    }

    /// Re-reads where the BARs of the device in `slot` decode, e.g. after its configuration
    /// space was restored from a snapshot, and tells the device about any change.
    pub fn refresh(&self, slot: u8) {
        let Some(dev) = self.device(slot) else {
            return;
        };
        let old: Vec<(usize, u64, u64)> = {
            let map = self.bars.read().unwrap_or_else(|e| e.into_inner());
            map.iter()
                .filter(|m| m.slot == slot)
                .map(|m| (m.bar, m.addr, m.size))
                .collect()
        };
        self.remap(slot, dev, &old);
    }

    /// Configuration read of 00:`slot`.`func`, register `reg` (0..4096).
    pub fn config_read(&self, slot: u8, func: u8, reg: u16, data: &mut [u8]) {
        data.fill(0xff);
        if func != 0 {
            return;
        }
        if let Some(dev) = self.device(slot) {
            lock(dev).config_read(reg, data);
        }
    }

    /// Configuration write of 00:`slot`.`func`, register `reg` (0..4096).
    pub fn config_write(&self, slot: u8, func: u8, reg: u16, data: &[u8]) {
        if func != 0 {
            return;
        }
        let Some(dev) = self.device(slot) else {
            return;
        };
        let old = {
            let mut d = lock(dev);
            let old = self.decoded(d.config());
            d.config_write(reg, data);
            old
        };
        self.remap(slot, dev, &old);
    }

    /// Splits an ECAM offset into (slot, function, register), or `None` past bus 0.
    fn ecam_decode(offset: u64, len: usize) -> Option<(u8, u8, u16)> {
        if offset >= ECAM_BUS_SIZE {
            return None;
        }
        let reg = (offset & 0xfff) as u16;
        // An access that would cross into the next function is not a valid ECAM access.
        if usize::from(reg) + len > 0x1000 {
            return None;
        }
        Some((
            ((offset >> 15) & 0x1f) as u8,
            ((offset >> 12) & 7) as u8,
            reg,
        ))
    }

    /// A guest read at `offset` in the ECAM area (bus 0 only).
    pub fn ecam_read(&self, offset: u64, data: &mut [u8]) {
        match Self::ecam_decode(offset, data.len()) {
            Some((slot, func, reg)) => self.config_read(slot, func, reg, data),
            None => data.fill(0xff),
        }
    }

    /// A guest write at `offset` in the ECAM area (bus 0 only).
    pub fn ecam_write(&self, offset: u64, data: &[u8]) {
        if let Some((slot, func, reg)) = Self::ecam_decode(offset, data.len()) {
            self.config_write(slot, func, reg, data);
        }
    }

    /// The BAR decoding `addr`: its device, index and `addr`'s offset in it.
    fn find_bar(&self, addr: u64) -> Option<(Dev, usize, u64)> {
        let map = self.bars.read().unwrap_or_else(|e| e.into_inner());
        let i = map.partition_point(|m| m.addr <= addr).checked_sub(1)?;
        let m = &map[i];
        let off = addr - m.addr;
        (off < m.size).then(|| (m.dev.clone(), m.bar, off))
    }

    /// A guest read of memory at `addr`: returns false when no BAR decodes it.
    pub fn bar_read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find_bar(addr) {
            Some((dev, bar, off)) => {
                data.fill(0xff);
                lock(&dev).bar_read(bar, off, data);
                true
            }
            None => false,
        }
    }

    /// A guest write of memory at `addr`: returns false when no BAR decodes it.
    pub fn bar_write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find_bar(addr) {
            Some((dev, bar, off)) => {
                lock(&dev).bar_write(bar, off, data);
                true
            }
            None => false,
        }
    }

    /// The BARs decoding now: (address, size, slot, BAR index), by address.
    pub fn mapped_bars(&self) -> Vec<(u64, u64, u8, usize)> {
        let map = self.bars.read().unwrap_or_else(|e| e.into_inner());
        map.iter()
            .map(|m| (m.addr, m.size, m.slot, m.bar))
            .collect()
    }
}

/// Type 1 CONFIG_ADDRESS at port 0xCF8: only 32-bit accesses reach the latch (a byte at 0xCF9
/// is the reset register, which is a different device).
pub struct PciConfigAddress(pub Arc<PciRoot>);

impl PioDevice for PciConfigAddress {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        if offset == 0 && data.len() == 4 {
            data.copy_from_slice(&self.0.cf8.load(Ordering::Relaxed).to_le_bytes());
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        if let (0, Ok(v)) = (offset, <[u8; 4]>::try_from(data)) {
            self.0.cf8.store(u32::from_le_bytes(v), Ordering::Relaxed);
        }
    }
}

/// Type 1 CONFIG_DATA at ports 0xCFC..0xCFF: the register CONFIG_ADDRESS selects.
pub struct PciConfigData(pub Arc<PciRoot>);

impl PciConfigData {
    /// (slot, function, register) for an access at `offset` in the data window, if enabled.
    fn target(&self, offset: u16, len: usize) -> Option<(u8, u8, u16)> {
        let a = self.0.cf8.load(Ordering::Relaxed);
        let bus = (a >> 16) & 0xff;
        if a & CF8_ENABLE == 0 || bus != 0 || usize::from(offset) + len > 4 {
            return None;
        }
        let reg = (a & 0xfc) as u16 + offset;
        Some((((a >> 11) & 0x1f) as u8, ((a >> 8) & 7) as u8, reg))
    }
}

impl PioDevice for PciConfigData {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        match self.target(offset, data.len()) {
            Some((slot, func, reg)) => self.0.config_read(slot, func, reg, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        if let Some((slot, func, reg)) = self.target(offset, data.len()) {
            self.0.config_write(slot, func, reg, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BarDef;

    /// A device with a 64-bit BAR0 of 16 KiB that echoes offsets and records moves.
    struct Echo {
        config: ConfigSpace,
        moves: Vec<(usize, Option<u64>)>,
        last_write: Option<(usize, u64, Vec<u8>)>,
    }

    impl Echo {
        fn new() -> Arc<Mutex<Self>> {
            let mut config = ConfigSpace::new(PciIds {
                vendor: 0x1af4,
                device: 0x1044,
                revision: 1,
                class: 0xff0000,
                subsystem_vendor: 0,
                subsystem: 0,
            });
            config
                .add_bar(BarDef {
                    index: 0,
                    size: 0x4000,
                    kind: BarKind::Mem64,
                    prefetchable: false,
                })
                .unwrap();
            Arc::new(Mutex::new(Self {
                config,
                moves: Vec::new(),
                last_write: None,
            }))
        }
    }

    impl PciDevice for Echo {
        fn config(&self) -> &ConfigSpace {
            &self.config
        }
        fn config_mut(&mut self) -> &mut ConfigSpace {
            &mut self.config
        }
        fn bar_read(&mut self, _bar: usize, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = (offset as u8).wrapping_add(i as u8);
            }
        }
        fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
            self.last_write = Some((bar, offset, data.to_vec()));
        }
        fn bar_moved(&mut self, bar: usize, addr: Option<u64>) {
            self.moves.push((bar, addr));
        }
    }

    const W32: PciWindow = PciWindow {
        start: 0xc000_0000,
        size: 0x2000_0000,
    };

    fn root_with(dev: Arc<Mutex<Echo>>) -> Arc<PciRoot> {
        let mut root = PciRoot::new(vec![W32]);
        let mut alloc = BarAllocator::new(W32, None).unwrap();
        root.add_device(1, dev, &mut alloc).unwrap();
        Arc::new(root)
    }

    fn cf8(root: &Arc<PciRoot>, slot: u32, reg: u32) -> (PciConfigAddress, PciConfigData) {
        let mut a = PciConfigAddress(root.clone());
        a.write(0, &(CF8_ENABLE | slot << 11 | reg).to_le_bytes());
        (a, PciConfigData(root.clone()))
    }

    fn cf8_read32(root: &Arc<PciRoot>, slot: u32, reg: u32) -> u32 {
        let (_, mut d) = cf8(root, slot, reg);
        let mut v = [0u8; 4];
        d.read(0, &mut v);
        u32::from_le_bytes(v)
    }

    #[test]
    fn host_bridge_and_device_through_both_mechanisms() {
        let dev = Echo::new();
        let root = root_with(dev);
        assert_eq!(cf8_read32(&root, 0, 0), 0x0008_1b36);
        assert_eq!(cf8_read32(&root, 0, 8) >> 8, 0x06_00_00);
        assert_eq!(cf8_read32(&root, 1, 0), 0x1044_1af4);
        assert_eq!(cf8_read32(&root, 2, 0), 0xffff_ffff, "empty slot");
        let mut v = [0u8; 4];
        root.ecam_read(1 << 15, &mut v);
        assert_eq!(u32::from_le_bytes(v), 0x1044_1af4);
        root.ecam_read((1 << 15) | (1 << 12), &mut v);
        assert_eq!(v, [0xff; 4], "function 1 absent");
        root.ecam_read(ECAM_BUS_SIZE, &mut v);
        assert_eq!(v, [0xff; 4], "bus 1 absent");
        // A 16-bit read of the device id through 0xCFE.
        let (_, mut d) = cf8(&root, 1, 0);
        let mut w = [0u8; 2];
        d.read(2, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x1044);
    }

    #[test]
    fn cf8_latch_needs_dword_and_enable() {
        let root = root_with(Echo::new());
        let mut a = PciConfigAddress(root.clone());
        a.write(0, &[1]);
        let mut v = [0u8; 4];
        a.read(0, &mut v);
        assert_eq!(v, [0; 4], "byte writes do not reach the latch");
        a.write(0, &(1u32 << 11).to_le_bytes());
        let mut d = PciConfigData(root.clone());
        d.read(0, &mut v);
        assert_eq!(v, [0xff; 4], "enable bit clear");
        a.write(0, &(CF8_ENABLE | 1 << 16).to_le_bytes());
        d.read(0, &mut v);
        assert_eq!(v, [0xff; 4], "bus 1");
        a.write(0, &CF8_ENABLE.to_le_bytes());
        d.read(3, &mut v);
        assert_eq!(v, [0xff; 4], "access past 0xCFF");
    }

    #[test]
    fn firmware_placement_and_bar_access() {
        let dev = Echo::new();
        let root = root_with(dev.clone());
        assert_eq!(root.mapped_bars(), vec![(0xc000_0000, 0x4000, 1, 0)]);
        assert_eq!(dev.lock().unwrap().moves, vec![(0, Some(0xc000_0000))]);
        let mut d = [0u8; 2];
        assert!(root.bar_read(0xc000_0010, &mut d));
        assert_eq!(d, [0x10, 0x11]);
        assert!(root.bar_write(0xc000_3ffc, &[1, 2, 3, 4]));
        assert_eq!(
            dev.lock().unwrap().last_write,
            Some((0, 0x3ffc, vec![1, 2, 3, 4]))
        );
        assert!(!root.bar_read(0xc000_4000, &mut d));
        assert!(!root.bar_read(0xbfff_ffff, &mut d));
    }

    #[test]
    fn guest_moves_and_disables_bars() {
        let dev = Echo::new();
        let root = root_with(dev.clone());
        dev.lock().unwrap().moves.clear();
        let cmd = |v: u16| root.ecam_write((1 << 15) | 4, &v.to_le_bytes());
        cmd(0);
        assert!(root.mapped_bars().is_empty());
        // Sizing with decoding off.
        root.ecam_write((1 << 15) | 0x10, &[0xff; 4]);
        root.ecam_write((1 << 15) | 0x14, &[0xff; 4]);
        let mut v = [0u8; 4];
        root.ecam_read((1 << 15) | 0x10, &mut v);
        assert_eq!(u32::from_le_bytes(v), 0xffff_c004);
        root.ecam_write((1 << 15) | 0x10, &0xd000_0000u32.to_le_bytes());
        root.ecam_write((1 << 15) | 0x14, &0u32.to_le_bytes());
        cmd(2);
        assert_eq!(root.mapped_bars(), vec![(0xd000_0000, 0x4000, 1, 0)]);
        // Outside every window: not decoded.
        cmd(0);
        root.ecam_write((1 << 15) | 0x14, &1u32.to_le_bytes());
        cmd(2);
        assert!(root.mapped_bars().is_empty());
        assert_eq!(
            dev.lock().unwrap().moves,
            vec![(0, None), (0, Some(0xd000_0000)), (0, None)]
        );
    }

    #[test]
    fn refresh_picks_up_a_restored_config_space() {
        let dev = Echo::new();
        let root = root_with(dev.clone());
        dev.lock().unwrap().config.set_bar_addr(0, 0xd000_0000);
        assert_eq!(root.mapped_bars(), vec![(0xc000_0000, 0x4000, 1, 0)]);
        root.refresh(1);
        assert_eq!(root.mapped_bars(), vec![(0xd000_0000, 0x4000, 1, 0)]);
        assert_eq!(
            dev.lock().unwrap().moves.last(),
            Some(&(0, Some(0xd000_0000)))
        );
        root.refresh(9);
    }

    #[test]
    fn overlapping_bars_keep_the_first() {
        let a = Echo::new();
        let b = Echo::new();
        let mut root = PciRoot::new(vec![W32]);
        let mut alloc = BarAllocator::new(W32, None).unwrap();
        root.add_device(1, a.clone(), &mut alloc).unwrap();
        root.add_device(2, b, &mut alloc).unwrap();
        let root = Arc::new(root);
        assert_eq!(root.mapped_bars().len(), 2);
        // Move slot 2's BAR onto slot 1's.
        root.ecam_write((2 << 15) | 0x10, &0xc000_0000u32.to_le_bytes());
        assert_eq!(root.mapped_bars(), vec![(0xc000_0000, 0x4000, 1, 0)]);
    }

    #[test]
    fn slots_are_checked() {
        let mut root = PciRoot::new(vec![W32]);
        let mut alloc = BarAllocator::new(W32, None).unwrap();
        assert_eq!(
            root.add_device(0, Echo::new(), &mut alloc),
            Err(PciError::SlotInUse(0))
        );
        assert_eq!(
            root.add_device(32, Echo::new(), &mut alloc),
            Err(PciError::NoSuchSlot(32))
        );
    }

    #[test]
    fn allocator_uses_the_right_window() {
        let w64 = PciWindow {
            start: 1 << 36,
            size: 1 << 34,
        };
        let mut a = BarAllocator::new(W32, Some(w64)).unwrap();
        assert_eq!(a.allocate(0x4000, BarKind::Mem64, true).unwrap(), 1 << 36);
        assert_eq!(
            a.allocate(0x4000, BarKind::Mem64, false).unwrap(),
            0xc000_0000
        );
        assert_eq!(
            a.allocate(0x1000, BarKind::Mem32, false).unwrap(),
            0xc000_4000
        );
        assert_eq!(
            a.allocate(0x8000, BarKind::Mem32, false).unwrap(),
            0xc000_8000
        );
        assert!(a.allocate(1 << 40, BarKind::Mem32, false).is_err());
        assert!(BarAllocator::new(PciWindow { start: 0, size: 0 }, None).is_err());
    }

    #[test]
    fn odd_ecam_accesses_are_safe() {
        let root = root_with(Echo::new());
        for off in [0u64, 0xffe, 0xfff, 0x8ffd, ECAM_BUS_SIZE - 1, u64::MAX] {
            for size in [0usize, 1, 2, 4, 8] {
                let mut d = vec![0u8; size];
                root.ecam_read(off, &mut d);
                root.ecam_write(off, &d);
            }
        }
    }
}
