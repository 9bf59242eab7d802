//! The registers of the modern transport's common configuration structure
//! (`struct virtio_pci_common_cfg`, virtio 1.2 section 4.1.4.3) and the interrupt state the
//! device side reads without the transport lock (ISR, MSI-X vector numbers).

use std::sync::atomic::{AtomicU16, AtomicU8, Ordering};
use std::sync::Arc;

use ferro_pci::Msix;
use serde::{Deserialize, Serialize};

use crate::{features, status, Interrupt, NO_VECTOR};

/// Offsets in the common configuration structure.
pub(crate) mod off {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const CONFIG_GENERATION: u64 = 0x15;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub const QUEUE_DESC: u64 = 0x20;
    pub const QUEUE_DRIVER: u64 = 0x28;
    pub const QUEUE_DEVICE: u64 = 0x30;
    /// Size of the structure without the 1.2 additions we do not offer.
    pub const SIZE: u64 = 0x38;
}

/// ISR bit: a queue interrupt.
const ISR_QUEUE: u8 = 1;
/// ISR bit: a configuration change.
const ISR_CONFIG: u8 = 2;

/// Interrupt state shared by the transport and the device's [`Interrupt`] handle.
pub(crate) struct Signals {
    pub msix: Arc<Msix>,
    pub isr: AtomicU8,
    pub config_vector: AtomicU16,
    pub queue_vectors: Vec<AtomicU16>,
    pub config_generation: AtomicU8,
}

impl Signals {
    pub fn new(msix: Arc<Msix>, queues: usize) -> Self {
        Self {
            msix,
            isr: AtomicU8::new(0),
            config_vector: AtomicU16::new(NO_VECTOR),
            queue_vectors: (0..queues).map(|_| AtomicU16::new(NO_VECTOR)).collect(),
            config_generation: AtomicU8::new(0),
        }
    }

    fn raise(&self, vector: u16, isr: u8) {
        self.isr.fetch_or(isr, Ordering::AcqRel);
        if vector != NO_VECTOR {
            self.msix.trigger(vector);
        }
    }

    pub fn reset(&self) {
        self.isr.store(0, Ordering::Release);
        self.config_vector.store(NO_VECTOR, Ordering::Release);
        for v in &self.queue_vectors {
            v.store(NO_VECTOR, Ordering::Release);
        }
    }
}

impl Interrupt for Signals {
    fn signal_queue(&self, queue: u16) {
        let vector = self
            .queue_vectors
            .get(usize::from(queue))
            .map_or(NO_VECTOR, |v| v.load(Ordering::Acquire));
        self.raise(vector, ISR_QUEUE);
    }

    fn signal_config(&self) {
        self.config_generation.fetch_add(1, Ordering::AcqRel);
        self.raise(self.config_vector.load(Ordering::Acquire), ISR_CONFIG);
    }
}

/// What the driver programmed for one queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueRegs {
    /// Largest size the device offers.
    pub max_size: u16,
    /// Size the driver chose (starts at `max_size`).
    pub size: u16,
    /// queue_enable was written 1.
    pub ready: bool,
    /// Descriptor table.
    pub desc: u64,
    /// Available ("driver") ring.
    pub avail: u64,
    /// Used ("device") ring.
    pub used: u64,
}

impl QueueRegs {
    fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: max_size,
            ready: false,
            desc: 0,
            avail: 0,
            used: 0,
        }
    }
}

/// What a status write asks of the transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StatusChange {
    /// Nothing beyond storing the value.
    None,
    /// Status 0: reset the device.
    Reset,
    /// DRIVER_OK was set: activate the device.
    Activate,
}

/// The common configuration registers of one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CommonRegs {
    /// Features offered.
    pub offered: u64,
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub driver_features: u64,
    pub status: u8,
    pub queue_select: u16,
    pub queues: Vec<QueueRegs>,
}

fn set_half(v: &mut u64, high: bool, half: u32) {
    if high {
        *v = (*v & 0xffff_ffff) | (u64::from(half) << 32);
    } else {
        *v = (*v & !0xffff_ffff) | u64::from(half);
    }
}

impl CommonRegs {
    pub fn new(offered: u64, max_sizes: &[u16]) -> Self {
        Self {
            offered,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            queue_select: 0,
            queues: max_sizes.iter().map(|&m| QueueRegs::new(m)).collect(),
        }
    }

    /// Back to the reset values (status 0, nothing negotiated, queues unprogrammed).
    pub fn reset(&mut self) {
        *self = Self::new(
            self.offered,
            &self.queues.iter().map(|q| q.max_size).collect::<Vec<_>>(),
        );
    }

    fn selected(&self) -> Option<&QueueRegs> {
        self.queues.get(usize::from(self.queue_select))
    }

    /// The structure's bytes as the driver reads them now.
    pub fn image(&self, sig: &Signals) -> [u8; off::SIZE as usize] {
        let mut b = [0u8; off::SIZE as usize];
        let mut put = |at: u64, bytes: &[u8]| {
            b[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
        };
        put(
            off::DEVICE_FEATURE_SELECT,
            &self.device_feature_select.to_le_bytes(),
        );
        let feat = match self.device_feature_select {
            0 => self.offered as u32,
            1 => (self.offered >> 32) as u32,
            _ => 0,
        };
        put(off::DEVICE_FEATURE, &feat.to_le_bytes());
        put(
            off::DRIVER_FEATURE_SELECT,
            &self.driver_feature_select.to_le_bytes(),
        );
        let drv = match self.driver_feature_select {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        };
        put(off::DRIVER_FEATURE, &drv.to_le_bytes());
        put(
            off::CONFIG_MSIX_VECTOR,
            &sig.config_vector.load(Ordering::Acquire).to_le_bytes(),
        );
        put(off::NUM_QUEUES, &(self.queues.len() as u16).to_le_bytes());
        put(off::DEVICE_STATUS, &[self.status]);
        put(
            off::CONFIG_GENERATION,
            &[sig.config_generation.load(Ordering::Acquire)],
        );
        put(off::QUEUE_SELECT, &self.queue_select.to_le_bytes());
        if let Some(q) = self.selected() {
            let vector = sig.queue_vectors[usize::from(self.queue_select)].load(Ordering::Acquire);
            put(off::QUEUE_SIZE, &q.size.to_le_bytes());
            put(off::QUEUE_MSIX_VECTOR, &vector.to_le_bytes());
            put(off::QUEUE_ENABLE, &u16::from(q.ready).to_le_bytes());
            put(off::QUEUE_NOTIFY_OFF, &self.queue_select.to_le_bytes());
            put(off::QUEUE_DESC, &q.desc.to_le_bytes());
            put(off::QUEUE_DRIVER, &q.avail.to_le_bytes());
            put(off::QUEUE_DEVICE, &q.used.to_le_bytes());
        } else {
            // A queue that does not exist reads size 0 and no vector.
            put(off::QUEUE_MSIX_VECTOR, &NO_VECTOR.to_le_bytes());
        }
        b
    }

    /// Vector `v` if the MSI-X table has it, else NO_VECTOR (what the driver reads back).
    fn checked_vector(sig: &Signals, v: u16) -> u16 {
        if v < sig.msix.vectors() {
            v
        } else {
            NO_VECTOR
        }
    }

    /// Takes a driver write. Only accesses that cover one field exactly (or one 32-bit half of
    /// a 64-bit address) do anything; others are dropped.
    pub fn write(&mut self, sig: &Signals, offset: u64, data: &[u8]) -> StatusChange {
        let mut v = [0u8; 8];
        let n = data.len().min(8);
        v[..n].copy_from_slice(&data[..n]);
        let val = u64::from_le_bytes(v);
        let (w32, w16) = (val as u32, val as u16);
        let live = self.status & status::DRIVER_OK != 0;
        let negotiated = self.status & status::FEATURES_OK != 0;
        let qs = usize::from(self.queue_select);
        match (offset, data.len()) {
            (off::DEVICE_FEATURE_SELECT, 4) => self.device_feature_select = w32,
            (off::DRIVER_FEATURE_SELECT, 4) => self.driver_feature_select = w32,
            (off::DRIVER_FEATURE, 4) if !negotiated => match self.driver_feature_select {
                0 => set_half(&mut self.driver_features, false, w32),
                1 => set_half(&mut self.driver_features, true, w32),
                _ => {}
            },
            (off::CONFIG_MSIX_VECTOR, 2) => sig
                .config_vector
                .store(Self::checked_vector(sig, w16), Ordering::Release),
            (off::DEVICE_STATUS, 1) => return self.write_status(val as u8),
            (off::QUEUE_SELECT, 2) => self.queue_select = w16,
            (off::QUEUE_MSIX_VECTOR, 2) => {
                if let Some(slot) = sig.queue_vectors.get(qs) {
                    slot.store(Self::checked_vector(sig, w16), Ordering::Release);
                }
            }
            (o, l) => {
                let Some(q) = self.queues.get_mut(qs).filter(|q| !q.ready && !live) else {
                    return StatusChange::None;
                };
                match (o, l) {
                    (off::QUEUE_SIZE, 2) if w16.is_power_of_two() && w16 <= q.max_size => {
                        q.size = w16;
                    }
                    (off::QUEUE_ENABLE, 2) if w16 == 1 => q.ready = true,
                    (off::QUEUE_DESC, 8) => q.desc = val,
                    (off::QUEUE_DRIVER, 8) => q.avail = val,
                    (off::QUEUE_DEVICE, 8) => q.used = val,
                    (off::QUEUE_DESC, 4) => set_half(&mut q.desc, false, w32),
                    (0x24, 4) => set_half(&mut q.desc, true, w32),
                    (off::QUEUE_DRIVER, 4) => set_half(&mut q.avail, false, w32),
                    (0x2c, 4) => set_half(&mut q.avail, true, w32),
                    (off::QUEUE_DEVICE, 4) => set_half(&mut q.used, false, w32),
                    (0x34, 4) => set_half(&mut q.used, true, w32),
                    _ => {}
                }
            }
        }
        StatusChange::None
    }

    /// The device status state machine.
    fn write_status(&mut self, value: u8) -> StatusChange {
        if value == 0 {
            return StatusChange::Reset;
        }
        let old = self.status;
        let mut new = value & !status::DEVICE_NEEDS_RESET;
        if new & status::FEATURES_OK != 0 && old & status::FEATURES_OK == 0 {
            let acceptable = self.driver_features & !self.offered == 0
                && self.driver_features & features::VERSION_1 != 0;
            if !acceptable {
                new &= !status::FEATURES_OK;
            }
        }
        if new & status::DRIVER_OK != 0 && new & status::FEATURES_OK == 0 {
            new &= !status::DRIVER_OK;
        }
        self.status = new | (old & status::DEVICE_NEEDS_RESET);
        if new & status::DRIVER_OK != 0 && old & status::DRIVER_OK == 0 {
            StatusChange::Activate
        } else {
            StatusChange::None
        }
    }
}
