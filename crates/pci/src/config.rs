//! The 256-byte configuration space of one PCI function: a type 0 header, a capability list and
//! up to six memory BARs.
//!
//! Every byte has a write mask; a guest write changes only the bits its mask allows, so a BAR
//! register naturally answers the sizing probe (write all ones, read back `!(size - 1)` plus its
//! type bits). Extended configuration space (offsets 0x100..0x1000, reachable through ECAM)
//! reads as zero, which tells the guest there are no extended capabilities; writes there are
//! dropped. Accesses of any size at any offset are handled byte by byte and never panic.

use serde::{Deserialize, Serialize};

/// Size of the conventional configuration space.
pub const CONFIG_SIZE: usize = 256;
/// Size of a function's configuration space through ECAM.
pub const EXTENDED_CONFIG_SIZE: u16 = 4096;

/// Header offsets.
pub mod reg {
    /// Vendor ID (16 bits).
    pub const VENDOR_ID: usize = 0x00;
    /// Device ID (16 bits).
    pub const DEVICE_ID: usize = 0x02;
    /// Command register (16 bits).
    pub const COMMAND: usize = 0x04;
    /// Status register (16 bits).
    pub const STATUS: usize = 0x06;
    /// Revision ID (8 bits).
    pub const REVISION: usize = 0x08;
    /// Programming interface, subclass and class (3 bytes from 0x09).
    pub const CLASS_PROG_IF: usize = 0x09;
    /// Header type (8 bits).
    pub const HEADER_TYPE: usize = 0x0e;
    /// First BAR; BAR *n* is at `BAR0 + 4 * n`.
    pub const BAR0: usize = 0x10;
    /// Subsystem vendor ID (16 bits).
    pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
    /// Subsystem ID (16 bits).
    pub const SUBSYSTEM_ID: usize = 0x2e;
    /// Capabilities pointer (8 bits).
    pub const CAPABILITIES: usize = 0x34;
    /// Interrupt line (8 bits, scratch for the OS).
    pub const INTERRUPT_LINE: usize = 0x3c;
    /// Interrupt pin (8 bits): 0 = no INTx.
    pub const INTERRUPT_PIN: usize = 0x3d;
}

/// Command register: I/O space decoding.
pub const COMMAND_IO: u16 = 1 << 0;
/// Command register: memory space decoding.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Command register: bus master.
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Command register: INTx disable.
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Status register: the capability list is valid.
const STATUS_CAP_LIST: u16 = 1 << 4;
/// Where the first capability goes.
const FIRST_CAPABILITY: usize = 0x40;
/// Number of BAR registers in a type 0 header.
pub const NUM_BARS: usize = 6;

/// BAR type bits: 64-bit memory BAR.
const BAR_MEM64: u32 = 0b100;
/// BAR type bits: prefetchable.
const BAR_PREFETCH: u32 = 0b1000;

/// What kind of memory BAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BarKind {
    /// A 32-bit memory BAR: placed below 4 GiB.
    Mem32,
    /// A 64-bit memory BAR (uses this register and the next).
    Mem64,
}

/// A memory BAR of a function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BarDef {
    /// Register index 0..6 (a 64-bit BAR also takes `index + 1`).
    pub index: usize,
    /// Size in bytes: a power of two, at least 4 KiB.
    pub size: u64,
    /// 32- or 64-bit.
    pub kind: BarKind,
    /// Whether the guest may map it prefetchable (no side effects on reads).
    pub prefetchable: bool,
}

/// Identity of a function, written into its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciIds {
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Revision ID.
    pub revision: u8,
    /// Class code, subclass and programming interface: `0xCCSSPP`.
    pub class: u32,
    /// Subsystem vendor ID.
    pub subsystem_vendor: u16,
    /// Subsystem ID.
    pub subsystem: u16,
}

/// Why a configuration space could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A BAR index past the header, or a 64-bit BAR in the last register.
    #[error("BAR {0} does not fit the header")]
    BarIndex(usize),
    /// A BAR register already used.
    #[error("BAR {0} is already defined")]
    BarInUse(usize),
    /// A BAR size that is not a power of two of at least 4 KiB (or too big for a 32-bit BAR).
    #[error("BAR size {0:#x} is not a power of two between 4 KiB and the BAR's reach")]
    BarSize(u64),
    /// The capabilities do not fit in the 256-byte space.
    #[error("capability of {0} bytes does not fit in configuration space")]
    CapabilityTooBig(usize),
}

/// The saved contents of a configuration space (the layout is rebuilt by the device's
/// constructor; only the guest-written bytes matter).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigState {
    /// The 256 bytes.
    pub bytes: Vec<u8>,
}

/// The configuration space of one function.
#[derive(Clone)]
pub struct ConfigSpace {
    bytes: [u8; CONFIG_SIZE],
    wmask: [u8; CONFIG_SIZE],
    bars: [Option<BarDef>; NUM_BARS],
    last_cap: Option<usize>,
    next_cap: usize,
}

impl ConfigSpace {
    /// A type 0 header for `ids`: no BARs, no capabilities, no INTx pin; the command register's
    /// I/O, memory, bus-master and INTx-disable bits are writable.
    pub fn new(ids: PciIds) -> Self {
        let mut c = Self {
            bytes: [0; CONFIG_SIZE],
            wmask: [0; CONFIG_SIZE],
            bars: [None; NUM_BARS],
            last_cap: None,
            next_cap: FIRST_CAPABILITY,
        };
        c.set_u16(reg::VENDOR_ID, ids.vendor);
        c.set_u16(reg::DEVICE_ID, ids.device);
        c.bytes[reg::REVISION] = ids.revision;
        c.bytes[reg::CLASS_PROG_IF..reg::CLASS_PROG_IF + 3]
            .copy_from_slice(&ids.class.to_le_bytes()[..3]);
        c.set_u16(reg::SUBSYSTEM_VENDOR_ID, ids.subsystem_vendor);
        c.set_u16(reg::SUBSYSTEM_ID, ids.subsystem);
        let cmd = COMMAND_IO | COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE;
        c.wmask[reg::COMMAND..reg::COMMAND + 2].copy_from_slice(&cmd.to_le_bytes());
        c.wmask[reg::INTERRUPT_LINE] = 0xff;
        c
    }

    fn set_u16(&mut self, at: usize, v: u16) {
        self.bytes[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }

    /// The 16-bit value at `at` (0 past the end).
    pub fn u16_at(&self, at: usize) -> u16 {
        match self.bytes.get(at..at + 2) {
            Some(b) => u16::from_le_bytes([b[0], b[1]]),
            None => 0,
        }
    }

    /// The 32-bit value at `at` (0 past the end).
    pub fn u32_at(&self, at: usize) -> u32 {
        match self.bytes.get(at..at + 4) {
            Some(b) => u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            None => 0,
        }
    }

    /// Defines a memory BAR. Its address starts at 0 (unassigned) until [`Self::set_bar_addr`]
    /// or the guest places it.
    pub fn add_bar(&mut self, bar: BarDef) -> Result<(), ConfigError> {
        let regs = match bar.kind {
            BarKind::Mem32 => 1,
            BarKind::Mem64 => 2,
        };
        if bar.index + regs > NUM_BARS {
            return Err(ConfigError::BarIndex(bar.index));
        }
        let max = match bar.kind {
            BarKind::Mem32 => 1 << 31,
            BarKind::Mem64 => 1 << 62,
        };
        if !bar.size.is_power_of_two() || bar.size < 0x1000 || bar.size > max {
            return Err(ConfigError::BarSize(bar.size));
        }
        for i in bar.index..bar.index + regs {
            if self.bars[i].is_some() || self.bar_hi_of(i).is_some() {
                return Err(ConfigError::BarInUse(i));
            }
        }
        let mut flags = 0;
        if bar.kind == BarKind::Mem64 {
            flags |= BAR_MEM64;
        }
        if bar.prefetchable {
            flags |= BAR_PREFETCH;
        }
        let mask = !(bar.size - 1);
        let lo = reg::BAR0 + 4 * bar.index;
        self.bytes[lo..lo + 4].copy_from_slice(&flags.to_le_bytes());
        self.wmask[lo..lo + 4].copy_from_slice(&((mask as u32) & !0xf).to_le_bytes());
        if bar.kind == BarKind::Mem64 {
            self.wmask[lo + 4..lo + 8].copy_from_slice(&((mask >> 32) as u32).to_le_bytes());
        }
        self.bars[bar.index] = Some(bar);
        Ok(())
    }

    /// The 64-bit BAR whose upper half is register `i`, if any.
    fn bar_hi_of(&self, i: usize) -> Option<BarDef> {
        let prev = i.checked_sub(1)?;
        self.bars[prev].filter(|b| b.kind == BarKind::Mem64)
    }

    /// The BARs defined, by register index.
    pub fn bars(&self) -> impl Iterator<Item = BarDef> + '_ {
        self.bars.iter().flatten().copied()
    }

    /// Writes the address of BAR `index` as firmware would.
    pub fn set_bar_addr(&mut self, index: usize, addr: u64) {
        let Some(bar) = self.bars.get(index).copied().flatten() else {
            return;
        };
        let lo = reg::BAR0 + 4 * index;
        let old = self.u32_at(lo);
        let new_lo = (addr as u32 & !0xf & !(bar.size as u32).wrapping_sub(1)) | (old & 0xf);
        self.bytes[lo..lo + 4].copy_from_slice(&new_lo.to_le_bytes());
        if bar.kind == BarKind::Mem64 {
            self.bytes[lo + 4..lo + 8].copy_from_slice(&((addr >> 32) as u32).to_le_bytes());
        }
    }

    /// The address BAR `index` holds now (whatever the command register says).
    pub fn bar_addr(&self, index: usize) -> Option<u64> {
        let bar = self.bars.get(index).copied().flatten()?;
        let lo = reg::BAR0 + 4 * index;
        let mut addr = u64::from(self.u32_at(lo) & !0xf);
        if bar.kind == BarKind::Mem64 {
            addr |= u64::from(self.u32_at(lo + 4)) << 32;
        }
        Some(addr)
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.u16_at(reg::COMMAND)
    }

    /// Whether the function decodes its memory BARs.
    pub fn memory_enabled(&self) -> bool {
        self.command() & COMMAND_MEMORY != 0
    }

    /// Whether the function may master the bus (DMA); virtio devices ignore it, as QEMU does.
    pub fn bus_master(&self) -> bool {
        self.command() & COMMAND_BUS_MASTER != 0
    }

    /// Appends a capability with id `id` and `body` (the bytes after the id and next pointer),
    /// whose bytes the guest may change per `body_wmask` (same length as `body`, or empty for a
    /// read-only capability). Returns its offset.
    pub fn add_capability(
        &mut self,
        id: u8,
        body: &[u8],
        body_wmask: &[u8],
    ) -> Result<usize, ConfigError> {
        let len = 2 + body.len();
        let at = self.next_cap;
        let end = at + len;
        if end > CONFIG_SIZE || (!body_wmask.is_empty() && body_wmask.len() != body.len()) {
            return Err(ConfigError::CapabilityTooBig(len));
        }
        self.bytes[at] = id;
        self.bytes[at + 1] = 0;
        self.bytes[at + 2..end].copy_from_slice(body);
        if !body_wmask.is_empty() {
            self.wmask[at + 2..end].copy_from_slice(body_wmask);
        }
        match self.last_cap {
            Some(prev) => self.bytes[prev + 1] = at as u8,
            None => {
                self.bytes[reg::CAPABILITIES] = at as u8;
                let status = self.u16_at(reg::STATUS) | STATUS_CAP_LIST;
                self.set_u16(reg::STATUS, status);
            }
        }
        self.last_cap = Some(at);
        // Capabilities start dword-aligned.
        self.next_cap = end.next_multiple_of(4);
        Ok(at)
    }

    /// Overwrites bytes of the space as the device (not the guest) sees fit, e.g. a capability
    /// field the device updates. Out-of-range bytes are ignored.
    pub fn set_bytes(&mut self, at: usize, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            if let Some(slot) = at.checked_add(i).and_then(|o| self.bytes.get_mut(o)) {
                *slot = *b;
            }
        }
    }

    /// What the guest reads at `offset` (any size; extended space reads as 0).
    pub fn read(&self, offset: u16, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::from(offset)
                .checked_add(i)
                .and_then(|o| self.bytes.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    /// Takes a guest write at `offset`: only the bits the write mask allows change.
    pub fn write(&mut self, offset: u16, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            let Some(o) = usize::from(offset).checked_add(i) else {
                return;
            };
            if o >= CONFIG_SIZE {
                return;
            }
            let m = self.wmask[o];
            self.bytes[o] = (self.bytes[o] & !m) | (b & m);
        }
    }

    /// The bytes to save.
    pub fn save(&self) -> ConfigState {
        ConfigState {
            bytes: self.bytes.to_vec(),
        }
    }

    /// Puts back the guest-writable bits of a saved space; the read-only layout stays as this
    /// device built it.
    pub fn restore(&mut self, state: &ConfigState) -> Result<(), crate::PciError> {
        if state.bytes.len() != CONFIG_SIZE {
            return Err(crate::PciError::StateSize {
                what: "configuration space",
                len: state.bytes.len(),
                want: CONFIG_SIZE,
            });
        }
        for (o, b) in state.bytes.iter().enumerate() {
            let m = self.wmask[o];
            self.bytes[o] = (self.bytes[o] & !m) | (b & m);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> PciIds {
        PciIds {
            vendor: 0x1af4,
            device: 0x1044,
            revision: 1,
            class: 0xff_00_00,
            subsystem_vendor: 0x1af4,
            subsystem: 0x1100,
        }
    }

    fn rd32(c: &ConfigSpace, off: u16) -> u32 {
        let mut d = [0u8; 4];
        c.read(off, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn header_identity_is_read_only() {
        let mut c = ConfigSpace::new(ids());
        assert_eq!(rd32(&c, 0), 0x1044_1af4);
        c.write(0, &[0xff; 4]);
        assert_eq!(rd32(&c, 0), 0x1044_1af4);
        assert_eq!(rd32(&c, 8) >> 8, 0xff_00_00);
        assert_eq!(rd32(&c, 0x2c), 0x1100_1af4);
        assert_eq!(c.bytes[reg::INTERRUPT_PIN], 0);
    }

    #[test]
    fn command_register_masks_reserved_bits() {
        let mut c = ConfigSpace::new(ids());
        c.write(4, &0xffffu16.to_le_bytes());
        assert_eq!(c.command(), 0x0407);
        assert!(c.memory_enabled());
        c.write(4, &[0, 0]);
        assert!(!c.memory_enabled());
    }

    #[test]
    fn bar32_sizing_probe() {
        let mut c = ConfigSpace::new(ids());
        c.add_bar(BarDef {
            index: 1,
            size: 0x4000,
            kind: BarKind::Mem32,
            prefetchable: false,
        })
        .unwrap();
        c.write(0x14, &[0xff; 4]);
        assert_eq!(rd32(&c, 0x14), 0xffff_c000);
        c.write(0x14, &0xc000_1234u32.to_le_bytes());
        assert_eq!(c.bar_addr(1), Some(0xc000_0000));
        assert_eq!(rd32(&c, 0x10), 0, "BAR0 undefined reads 0");
        c.write(0x10, &[0xff; 4]);
        assert_eq!(rd32(&c, 0x10), 0, "undefined BARs size as absent");
    }

    #[test]
    fn bar64_sizing_probe_and_flags() {
        let mut c = ConfigSpace::new(ids());
        c.add_bar(BarDef {
            index: 0,
            size: 0x8000,
            kind: BarKind::Mem64,
            prefetchable: true,
        })
        .unwrap();
        assert_eq!(rd32(&c, 0x10), 0b1100);
        c.write(0x10, &[0xff; 4]);
        c.write(0x14, &[0xff; 4]);
        assert_eq!(rd32(&c, 0x10), 0xffff_800c);
        assert_eq!(rd32(&c, 0x14), 0xffff_ffff);
        c.set_bar_addr(0, 0x10_e000_0000);
        assert_eq!(c.bar_addr(0), Some(0x10_e000_0000));
        assert!(c
            .add_bar(BarDef {
                index: 1,
                size: 0x1000,
                kind: BarKind::Mem32,
                prefetchable: false
            })
            .is_err());
    }

    #[test]
    fn bad_bars_are_refused() {
        let mut c = ConfigSpace::new(ids());
        let bar = |index, size, kind| BarDef {
            index,
            size,
            kind,
            prefetchable: false,
        };
        assert!(c.add_bar(bar(5, 0x1000, BarKind::Mem64)).is_err());
        assert!(c.add_bar(bar(6, 0x1000, BarKind::Mem32)).is_err());
        assert!(c.add_bar(bar(0, 0x1800, BarKind::Mem32)).is_err());
        assert!(c.add_bar(bar(0, 0x100, BarKind::Mem32)).is_err());
    }

    #[test]
    fn capability_list_links() {
        let mut c = ConfigSpace::new(ids());
        let a = c.add_capability(0x09, &[1, 2, 3], &[]).unwrap();
        let b = c.add_capability(0x11, &[0; 10], &[0xff; 10]).unwrap();
        assert_eq!(a, 0x40);
        assert_eq!(b, 0x48);
        assert_eq!(c.bytes[reg::CAPABILITIES], 0x40);
        assert_ne!(c.u16_at(reg::STATUS) & STATUS_CAP_LIST, 0);
        assert_eq!(c.bytes[a + 1], b as u8);
        assert_eq!(c.bytes[b + 1], 0);
        c.write(a as u16 + 2, &[9, 9]);
        assert_eq!(c.bytes[a + 2], 1, "read-only capability");
        c.write(b as u16 + 2, &[9]);
        assert_eq!(c.bytes[b + 2], 9);
        assert!(c.add_capability(0x09, &[0; 250], &[]).is_err());
    }

    #[test]
    fn any_offset_and_size_is_safe() {
        let mut c = ConfigSpace::new(ids());
        for off in [0u16, 3, 0xfe, 0xff, 0x100, 0xffc, 0xfff, u16::MAX] {
            for size in [0usize, 1, 2, 4, 8] {
                let mut d = vec![0u8; size];
                c.read(off, &mut d);
                c.write(off, &d);
            }
        }
        let mut d = [0xaau8; 4];
        c.read(0x100, &mut d);
        assert_eq!(d, [0; 4]);
    }

    #[test]
    fn save_restore_keeps_only_writable_bits() {
        let mut c = ConfigSpace::new(ids());
        c.write(4, &[0x06, 0]);
        let mut s = c.save();
        s.bytes[0] = 0; // vendor is read-only: ignored on restore
        let mut d = ConfigSpace::new(ids());
        d.restore(&s).unwrap();
        assert_eq!(d.command(), 6);
        assert_eq!(d.u16_at(0), 0x1af4);
        assert!(d.restore(&ConfigState { bytes: vec![0; 3] }).is_err());
    }
}
