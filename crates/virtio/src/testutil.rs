//! A minimal virtio driver for tests: programs a transport through BAR0 as Linux would, with
//! rings at fixed places in a 1 MiB guest memory.

use std::sync::{Arc, Mutex};

use ferro_pci::{MsiMessage, MsiRouting, PciDevice};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::transport::{VirtioPciDevice, MSIX_TABLE_OFFSET};
use crate::transport_regs::off;
use crate::{features, status, GuestMemory, NotifyRegistry, VirtioDevice};

/// Descriptor table, avail ring and used ring of queue 0.
pub const DESC: u64 = 0x1000;
pub const AVAIL: u64 = 0x3000;
pub const USED: u64 = 0x4000;
/// Where test buffers go.
pub const BUF: u64 = 0x10000;
pub const QSIZE: u16 = 16;

/// Records MSI-X routes and signals, and notification registrations.
#[derive(Default)]
pub struct Log(pub Mutex<Vec<String>>);

impl Log {
    pub fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

impl MsiRouting for Log {
    fn route(&self, vector: u16, msg: Option<MsiMessage>) {
        self.0
            .lock()
            .unwrap()
            .push(format!("route {vector} {}", msg.is_some()));
    }
    fn signal(&self, vector: u16) {
        self.0.lock().unwrap().push(format!("signal {vector}"));
    }
}

impl NotifyRegistry for Log {
    fn register(&self, addr: u64, _fd: &EventFd) -> std::io::Result<()> {
        self.0.lock().unwrap().push(format!("ioeventfd {addr:#x}"));
        Ok(())
    }
    fn unregister(&self, addr: u64, _fd: &EventFd) {
        self.0
            .lock()
            .unwrap()
            .push(format!("no-ioeventfd {addr:#x}"));
    }
}

pub struct Driver {
    pub t: VirtioPciDevice,
    pub mem: GuestMemory,
    pub log: Arc<Log>,
    pub avail_idx: u16,
}

impl Driver {
    pub fn new(dev: Box<dyn VirtioDevice>) -> Self {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let log = Arc::new(Log::default());
        let t = VirtioPciDevice::new(dev, mem.clone(), log.clone(), log.clone()).unwrap();
        Self {
            t,
            mem,
            log,
            avail_idx: 0,
        }
    }

    pub fn w(&mut self, offset: u64, data: &[u8]) {
        self.t.bar_write(0, offset, data);
    }
    pub fn w16(&mut self, offset: u64, v: u16) {
        self.w(offset, &v.to_le_bytes());
    }
    pub fn w32(&mut self, offset: u64, v: u32) {
        self.w(offset, &v.to_le_bytes());
    }
    pub fn r(&mut self, offset: u64, n: usize) -> u64 {
        let mut d = [0u8; 8];
        self.t.bar_read(0, offset, &mut d[..n]);
        u64::from_le_bytes(d)
    }
    pub fn status(&mut self) -> u8 {
        self.r(off::DEVICE_STATUS, 1) as u8
    }
    pub fn set_status(&mut self, s: u8) {
        self.w(off::DEVICE_STATUS, &[s]);
    }

    /// Enables MSI-X in config space with vectors 0 (config) and 1 (queue 0) unmasked.
    pub fn enable_msix(&mut self) {
        for v in 0..2u64 {
            let e = MSIX_TABLE_OFFSET + v * 16;
            self.w32(e, 0xfee0_0000);
            self.w32(e + 8, 0x30 + v as u32);
            self.w32(e + 12, 0);
        }
        // The MSI-X capability is the last one; find it by walking the list.
        let mut p = self.cfg8(0x34) as u16;
        while p != 0 {
            if self.cfg8(p) == 0x11 {
                self.t.config_write(p + 3, &[0x80]);
                return;
            }
            p = self.cfg8(p + 1) as u16;
        }
        panic!("no MSI-X capability");
    }

    pub fn cfg8(&mut self, at: u16) -> u8 {
        let mut b = [0u8];
        self.t.config_read(at, &mut b);
        b[0]
    }

    /// The full Linux-like bring-up of queue 0; returns the final status.
    pub fn bring_up(&mut self, driver_features: u64) -> u8 {
        self.set_status(0);
        self.set_status(status::ACKNOWLEDGE);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER);
        self.w32(off::DRIVER_FEATURE_SELECT, 0);
        self.w32(off::DRIVER_FEATURE, driver_features as u32);
        self.w32(off::DRIVER_FEATURE_SELECT, 1);
        self.w32(off::DRIVER_FEATURE, (driver_features >> 32) as u32);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        self.set_status(s);
        if self.status() & status::FEATURES_OK == 0 {
            return self.status();
        }
        self.w16(off::CONFIG_MSIX_VECTOR, 0);
        self.w16(off::QUEUE_SELECT, 0);
        self.w16(off::QUEUE_SIZE, QSIZE);
        self.w16(off::QUEUE_MSIX_VECTOR, 1);
        self.w32(off::QUEUE_DESC, DESC as u32);
        self.w32(off::QUEUE_DESC + 4, 0);
        self.w32(off::QUEUE_DRIVER, AVAIL as u32);
        self.w32(off::QUEUE_DRIVER + 4, 0);
        self.w32(off::QUEUE_DEVICE, USED as u32);
        self.w32(off::QUEUE_DEVICE + 4, 0);
        self.w16(off::QUEUE_ENABLE, 1);
        self.set_status(s | status::DRIVER_OK);
        self.avail_idx = 0;
        self.status()
    }

    pub fn default_features() -> u64 {
        features::VERSION_1
    }

    pub fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        crate::chain::tests::put(&self.mem, DESC, i, addr, len, flags, next);
    }

    /// Publishes `head` in the available ring.
    pub fn publish(&mut self, head: u16) {
        let slot = AVAIL + 4 + u64::from(self.avail_idx % QSIZE) * 2;
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .unwrap();
    }

    pub fn set_avail_idx(&mut self, idx: u16) {
        self.avail_idx = idx;
        self.mem.write_obj(idx, GuestAddress(AVAIL + 2)).unwrap();
    }

    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    /// (id, len) of used element `i`.
    pub fn used(&self, i: u16) -> (u32, u32) {
        let at = USED + 4 + u64::from(i % QSIZE) * 8;
        (
            self.mem.read_obj(GuestAddress(at)).unwrap(),
            self.mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }

    pub fn kick(&mut self) {
        self.t.queue_event(0);
    }

    /// The used ring's flags (bit 0: VRING_USED_F_NO_NOTIFY, the device wants no kicks).
    pub fn used_flags(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED)).unwrap()
    }
}
