//! The virtio 1.x modern PCI transport (virtio 1.2 section 4.1): one function with vendor
//! 0x1af4, device 0x1040 + type, revision 1, and one 64-bit memory BAR (BAR0) holding every
//! structure the vendor capabilities point at:
//!
//! ```text
//! BAR0 + 0x0000  common configuration (struct virtio_pci_common_cfg, 0x38 bytes)
//! BAR0 + 0x1000  ISR status (1 byte, read clears)
//! BAR0 + 0x2000  device configuration (if the device has one)
//! BAR0 + 0x3000  notifications: queue n at 0x3000 + 4 * n (notify_off_multiplier 4)
//! BAR0 + 0x4000  MSI-X table (one vector per queue plus one for configuration changes)
//! BAR0 + 0x6000  MSI-X pending-bit array
//! ```
//! The capability list holds, in order: common, notify, ISR, device (if any), PCI
//! configuration access (`VIRTIO_PCI_CAP_PCI_CFG`, a window into BAR0 through configuration
//! space), MSI-X. Every notification address is an ioeventfd while BAR0 decodes; a write that
//! still reaches the transport (no ioeventfd) signals the same eventfd.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use ferro_pci::{
    BarDef, BarKind, ConfigSpace, ConfigState, MsiRouting, Msix, MsixState, PciDevice, PciIds,
};
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::transport_regs::{off, CommonRegs, QueueRegs, Signals, StatusChange};
use crate::{
    features, status, DeviceError, DeviceState, GuestMemory, Interrupt, NotifyRegistry,
    VirtioDevice, VIRTIO_PCI_DEVICE_BASE, VIRTIO_PCI_VENDOR,
};

/// Size of BAR0.
pub const BAR0_SIZE: u64 = 0x8000;
/// Offset of the common configuration in BAR0.
pub const COMMON_OFFSET: u64 = 0x0000;
/// Offset of the ISR byte in BAR0.
pub const ISR_OFFSET: u64 = 0x1000;
/// Offset of the device configuration in BAR0.
pub const DEVICE_OFFSET: u64 = 0x2000;
/// Offset of the notification area in BAR0.
pub const NOTIFY_OFFSET: u64 = 0x3000;
/// Bytes between two queues' notification addresses.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
/// Offset of the MSI-X table in BAR0.
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
/// Offset of the MSI-X PBA in BAR0.
pub const MSIX_PBA_OFFSET: u64 = 0x6000;
/// Each region's size in BAR0.
const REGION: u64 = 0x1000;

/// Vendor-specific capability id.
const CAP_VENDOR: u8 = 0x09;
/// virtio capability types.
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
const CAP_PCI_CFG: u8 = 5;
/// Offsets inside a virtio PCI_CFG capability.
const PCI_CFG_BAR: usize = 4;
const PCI_CFG_OFFSET: usize = 8;
const PCI_CFG_LENGTH: usize = 12;
const PCI_CFG_DATA: usize = 16;

/// Saved state of a transport and its device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioPciState {
    /// Format version of this struct.
    pub version: u32,
    /// PCI configuration space.
    pub pci: ConfigState,
    /// MSI-X table and control.
    pub msix: MsixState,
    /// Device status.
    pub status: u8,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// Feature-select registers (device, driver).
    pub feature_select: (u32, u32),
    /// queue_select.
    pub queue_select: u16,
    /// Queue registers.
    pub queues: Vec<QueueRegs>,
    /// MSI-X vector of each queue.
    pub queue_vectors: Vec<u16>,
    /// MSI-X vector for configuration changes.
    pub config_vector: u16,
    /// ISR bits.
    pub isr: u8,
    /// config_generation.
    pub config_generation: u8,
    /// The device's own state.
    pub device: DeviceState,
}

/// Version of [`VirtioPciState`] this code writes and reads.
pub const STATE_VERSION: u32 = 1;

/// A virtio device on PCI.
pub struct VirtioPciDevice {
    config: ConfigSpace,
    device: Box<dyn VirtioDevice>,
    regs: CommonRegs,
    signals: Arc<Signals>,
    mem: GuestMemory,
    notify: Arc<dyn NotifyRegistry>,
    queue_events: Vec<EventFd>,
    /// Where the notification eventfds are registered now (BAR0's address).
    notify_base: Option<u64>,
    active: bool,
    msix_cap: usize,
    pci_cfg_cap: usize,
    last_error: Option<String>,
}

/// Why a transport could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The PCI layout did not work out.
    #[error(transparent)]
    Pci(#[from] ferro_pci::PciError),
    /// The PCI layout did not work out.
    #[error(transparent)]
    Config(#[from] ferro_pci::config::ConfigError),
    /// An eventfd could not be created.
    #[error("cannot create a queue eventfd: {0}")]
    EventFd(std::io::Error),
    /// The device has no queues or too many.
    #[error("{0} queues: a device has 1 to 1024")]
    Queues(usize),
}

fn vendor_cap(kind: u8, offset: u64, length: u64, extra: &[u8]) -> Vec<u8> {
    // cap_len, cfg_type, bar, id, padding[2], offset, length, then type-specific fields.
    let mut b = vec![(16 + extra.len()) as u8, kind, 0, 0, 0, 0];
    b.extend_from_slice(&(offset as u32).to_le_bytes());
    b.extend_from_slice(&(length as u32).to_le_bytes());
    b.extend_from_slice(extra);
    b
}

impl VirtioPciDevice {
    /// Wraps `device`: `router` delivers its MSI-X vectors, `notify` places its notification
    /// addresses, `mem` is guest memory for its queues.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemory,
        router: Arc<dyn MsiRouting>,
        notify: Arc<dyn NotifyRegistry>,
    ) -> Result<Self, TransportError> {
        let nq = device.queue_max_sizes().len();
        if nq == 0 || nq as u64 * u64::from(NOTIFY_OFF_MULTIPLIER) > REGION {
            return Err(TransportError::Queues(nq));
        }
        let msix = Arc::new(Msix::new(nq as u16 + 1, router)?);
        let dev_type = device.device_type();
        let mut config = ConfigSpace::new(PciIds {
            vendor: VIRTIO_PCI_VENDOR,
            device: VIRTIO_PCI_DEVICE_BASE + dev_type as u16,
            revision: 1,
            class: class_of(dev_type),
            subsystem_vendor: VIRTIO_PCI_VENDOR,
            subsystem: 0x1100,
        });
        config.add_bar(BarDef {
            index: 0,
            size: BAR0_SIZE,
            kind: BarKind::Mem64,
            prefetchable: false,
        })?;
        let ro: &[u8] = &[];
        config.add_capability(
            CAP_VENDOR,
            &vendor_cap(CAP_COMMON, COMMON_OFFSET, off::SIZE, &[]),
            ro,
        )?;
        let mult = NOTIFY_OFF_MULTIPLIER.to_le_bytes();
        let notify_len = nq as u64 * u64::from(NOTIFY_OFF_MULTIPLIER);
        config.add_capability(
            CAP_VENDOR,
            &vendor_cap(CAP_NOTIFY, NOTIFY_OFFSET, notify_len, &mult),
            ro,
        )?;
        config.add_capability(CAP_VENDOR, &vendor_cap(CAP_ISR, ISR_OFFSET, 1, &[]), ro)?;
        let dev_cfg = device.config_size() as u64;
        if dev_cfg > 0 {
            let len = dev_cfg.min(REGION);
            config.add_capability(
                CAP_VENDOR,
                &vendor_cap(CAP_DEVICE, DEVICE_OFFSET, len, &[]),
                ro,
            )?;
        }
        let body = vendor_cap(CAP_PCI_CFG, 0, 0, &[0; 4]);
        let mut wmask = vec![0u8; body.len()];
        // bar, offset, length and the data window are the driver's.
        wmask[PCI_CFG_BAR - 2] = 0xff;
        wmask[PCI_CFG_OFFSET - 2..].fill(0xff);
        let pci_cfg_cap = config.add_capability(CAP_VENDOR, &body, &wmask)?;
        let (body, wmask) = msix.capability(0, MSIX_TABLE_OFFSET as u32, MSIX_PBA_OFFSET as u32);
        let msix_cap = config.add_capability(ferro_pci::msix::CAP_ID_MSIX, &body, &wmask)?;
        let queue_events = (0..nq)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(TransportError::EventFd)?;
        let offered = device.features()
            | features::VERSION_1
            | features::RING_EVENT_IDX
            | features::RING_INDIRECT_DESC;
        let regs = CommonRegs::new(offered, device.queue_max_sizes());
        Ok(Self {
            config,
            device,
            regs,
            signals: Arc::new(Signals::new(msix, nq)),
            mem,
            notify,
            queue_events,
            notify_base: None,
            active: false,
            msix_cap,
            pci_cfg_cap,
            last_error: None,
        })
    }

    /// Copies of the queue eventfds, for the event loop (index = queue).
    pub fn queue_events(&self) -> std::io::Result<Vec<EventFd>> {
        self.queue_events.iter().map(EventFd::try_clone).collect()
    }

    /// The device status register.
    pub fn status(&self) -> u8 {
        self.regs.status
    }

    /// What made the device ask for a reset last, if anything.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// The virtio device type.
    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    /// Runs `work` on the device for the event loop, unless the device is not serving (not
    /// activated, or stopped after an error until the driver resets it); an error stops it.
    /// The default answer when it does not run or fails.
    fn serving<T: Default>(
        &mut self,
        work: impl FnOnce(&mut dyn VirtioDevice) -> Result<T, DeviceError>,
    ) -> T {
        if !self.active || self.regs.status & status::DEVICE_NEEDS_RESET != 0 {
            return T::default();
        }
        work(self.device.as_mut()).unwrap_or_else(|e| {
            self.needs_reset(e);
            T::default()
        })
    }

    /// The event loop saw a kick of queue `queue`: let the device process it.
    pub fn queue_event(&mut self, queue: u16) {
        self.serving(|d| d.queue_notified(queue));
    }

    /// The device's host-side file descriptor ([`VirtioDevice::host_fd`]), for the event loop.
    pub fn host_fd(&self) -> Option<std::os::fd::RawFd> {
        self.device.host_fd()
    }

    /// The device's [`VirtioDevice::poll_counter`].
    pub fn poll_counter(&self) -> Option<std::sync::Arc<std::sync::atomic::AtomicUsize>> {
        self.device.poll_counter()
    }

    /// The event loop polls: let the device take what its driver made available
    /// ([`VirtioDevice::poll_queues`]). Whether there was anything.
    pub fn poll_queues(&mut self) -> bool {
        self.serving(|d| d.poll_queues())
    }

    /// The event loop stops polling ([`VirtioDevice::poll_done`]). Whether the device found
    /// more to do, so the loop must not sleep yet.
    pub fn poll_done(&mut self) -> bool {
        self.serving(|d| d.poll_done())
    }

    /// The event loop saw the device's host fd readable: let the device move data.
    pub fn host_event(&mut self) {
        self.serving(|d| d.host_ready());
    }

    /// Stops the device until the driver resets it, and tells the driver.
    fn needs_reset(&mut self, e: DeviceError) {
        self.last_error = Some(e.to_string());
        self.regs.status |= status::DEVICE_NEEDS_RESET;
        if self.regs.status & status::DRIVER_OK != 0 {
            self.signals.signal_config();
        }
    }

    fn negotiated(&self) -> u64 {
        self.regs.driver_features & self.regs.offered
    }

    /// Builds the queues from the registers and starts the device.
    fn activate(&mut self) -> Result<(), DeviceError> {
        let event_idx = self.negotiated() & features::RING_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(self.regs.queues.len());
        for (i, r) in self.regs.queues.iter().enumerate() {
            let bad = |what: &str| DeviceError::Activate(format!("queue {i}: {what}"));
            let mut q = Queue::new(r.max_size).map_err(|e| bad(&e.to_string()))?;
            if r.ready {
                q.try_set_size(r.size).map_err(|e| bad(&e.to_string()))?;
                q.try_set_desc_table_address(GuestAddress(r.desc))
                    .map_err(|e| bad(&e.to_string()))?;
                q.try_set_avail_ring_address(GuestAddress(r.avail))
                    .map_err(|e| bad(&e.to_string()))?;
                q.try_set_used_ring_address(GuestAddress(r.used))
                    .map_err(|e| bad(&e.to_string()))?;
                q.set_event_idx(event_idx);
                q.set_ready(true);
                if !q.is_valid(&self.mem) {
                    return Err(bad("rings are not inside guest memory"));
                }
            }
            queues.push(q);
        }
        self.device.ack_features(self.negotiated());
        let irq: Arc<dyn Interrupt> = self.signals.clone();
        self.device.activate(self.mem.clone(), queues, irq)?;
        self.active = true;
        Ok(())
    }

    fn reset(&mut self) {
        if self.active {
            self.device.reset();
        }
        self.active = false;
        self.regs.reset();
        self.signals.reset();
        self.last_error = None;
    }

    fn common_read(&self, offset: u64, data: &mut [u8]) {
        let img = self.regs.image(&self.signals);
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| img.get(usize::try_from(o).ok()?))
                .copied()
                .unwrap_or(0);
        }
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        match self.regs.write(&self.signals, offset, data) {
            StatusChange::None => {}
            StatusChange::Reset => self.reset(),
            StatusChange::Activate => {
                if let Err(e) = self.activate() {
                    self.needs_reset(e);
                }
            }
        }
    }

    /// Moves the notification ioeventfds to BAR0 at `base` (or drops them).
    fn place_notify(&mut self, base: Option<u64>) {
        if let Some(old) = self.notify_base.take() {
            for (i, fd) in self.queue_events.iter().enumerate() {
                self.notify.unregister(notify_addr(old, i), fd);
            }
        }
        if let Some(new) = base {
            for (i, fd) in self.queue_events.iter().enumerate() {
                // Without the ioeventfd the kick still arrives as an MMIO write (bar_write).
                let _ = self.notify.register(notify_addr(new, i), fd);
            }
            self.notify_base = Some(new);
        }
    }

    /// Whether an access at config `offset` of `len` bytes touches `at..at + n`.
    fn touches(offset: u16, len: usize, at: usize, n: usize) -> bool {
        let (s, e) = (usize::from(offset), usize::from(offset) + len);
        s < at + n && at < e
    }

    /// The (offset, length) the PCI_CFG capability selects in BAR0, if valid.
    fn pci_cfg_window(&self) -> Option<(u64, usize)> {
        let c = self.pci_cfg_cap;
        let bar = self.config.u32_at(c + PCI_CFG_BAR) & 0xff;
        let off = u64::from(self.config.u32_at(c + PCI_CFG_OFFSET));
        let len = self.config.u32_at(c + PCI_CFG_LENGTH) as usize;
        (bar == 0 && matches!(len, 1 | 2 | 4) && off % len as u64 == 0).then_some((off, len))
    }

    /// Raises every ready queue's interrupt once, for a device restored from a saved state.
    /// A notification the device sent just before the save may be missing from the saved
    /// interrupt controller state (KVM injects irqfd MSIs asynchronously); with EVENT_IDX the
    /// driver would then wait for it forever while the device believes it was sent. A driver
    /// that had nothing to wait for just finds no new used buffers.
    pub fn signal_all_queues(&self) {
        if !self.active {
            return;
        }
        for (i, q) in self.regs.queues.iter().enumerate() {
            if q.ready {
                self.signals.signal_queue(i as u16);
            }
        }
    }

    /// Saves the transport and its device.
    pub fn save(&self) -> VirtioPciState {
        VirtioPciState {
            version: STATE_VERSION,
            pci: self.config.save(),
            msix: self.signals.msix.save(),
            status: self.regs.status,
            driver_features: self.regs.driver_features,
            feature_select: (
                self.regs.device_feature_select,
                self.regs.driver_feature_select,
            ),
            queue_select: self.regs.queue_select,
            queues: self.regs.queues.clone(),
            queue_vectors: self
                .signals
                .queue_vectors
                .iter()
                .map(|v| v.load(Ordering::Acquire))
                .collect(),
            config_vector: self.signals.config_vector.load(Ordering::Acquire),
            isr: self.signals.isr.load(Ordering::Acquire),
            config_generation: self.signals.config_generation.load(Ordering::Acquire),
            device: self.device.save(),
        }
    }

    /// Restores a saved state into a transport built for the same device; re-activates the
    /// device when the saved one was running. Then call `PciRoot::refresh` for its slot, which
    /// re-reads the BARs and moves the notification ioeventfds there.
    pub fn restore(&mut self, s: &VirtioPciState) -> Result<(), DeviceError> {
        let bad = |w: String| DeviceError::Restore(w);
        if s.version != STATE_VERSION {
            return Err(bad(format!(
                "state version {}, expected {STATE_VERSION}",
                s.version
            )));
        }
        let nq = self.regs.queues.len();
        if s.queues.len() != nq || s.queue_vectors.len() != nq {
            return Err(bad(format!("{} queues, expected {nq}", s.queues.len())));
        }
        if s.queues
            .iter()
            .zip(&self.regs.queues)
            .any(|(a, b)| a.max_size != b.max_size)
        {
            return Err(bad("queue sizes differ".into()));
        }
        self.reset();
        self.config
            .restore(&s.pci)
            .map_err(|e| bad(e.to_string()))?;
        self.signals
            .msix
            .restore(&s.msix)
            .map_err(|e| bad(e.to_string()))?;
        self.regs.driver_features = s.driver_features & self.regs.offered;
        (
            self.regs.device_feature_select,
            self.regs.driver_feature_select,
        ) = s.feature_select;
        self.regs.queue_select = s.queue_select;
        self.regs.queues.clone_from(&s.queues);
        for (slot, v) in self.signals.queue_vectors.iter().zip(&s.queue_vectors) {
            slot.store(*v, Ordering::Release);
        }
        self.signals
            .config_vector
            .store(s.config_vector, Ordering::Release);
        self.signals.isr.store(s.isr, Ordering::Release);
        self.signals
            .config_generation
            .store(s.config_generation, Ordering::Release);
        self.regs.status = s.status;
        if s.status & status::DRIVER_OK != 0 && s.status & status::DEVICE_NEEDS_RESET == 0 {
            self.activate()?;
            self.device.restore(&s.device)?;
            // One kick per queue: the driver may have made buffers available that the saved
            // device had not taken yet, with its kick lost with the source (or not sent, while
            // the source polled the ring). A kick with nothing new costs one pass.
            for fd in &self.queue_events {
                let _ = fd.write(1);
            }
        }
        Ok(())
    }
}

fn notify_addr(bar0: u64, queue: usize) -> u64 {
    bar0 + NOTIFY_OFFSET + queue as u64 * u64::from(NOTIFY_OFF_MULTIPLIER)
}

/// PCI class code of a virtio device type, as QEMU presents them (others: class 0x00,
/// subclass 0xff).
fn class_of(device_type: u32) -> u32 {
    match device_type {
        crate::device_type::NET => 0x02_00_00,
        crate::device_type::BLOCK => 0x01_00_00,
        _ => 0x00_ff_00,
    }
}

impl PciDevice for VirtioPciDevice {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }

    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        let data_at = self.pci_cfg_cap + PCI_CFG_DATA;
        if Self::touches(offset, data.len(), data_at, 4) {
            if let Some((off, len)) = self.pci_cfg_window() {
                let mut buf = [0xffu8; 4];
                self.bar_read(0, off, &mut buf[..len]);
                self.config.set_bytes(data_at, &buf);
            }
        }
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) {
        self.config.write(offset, data);
        let len = data.len();
        if Self::touches(offset, len, self.msix_cap + 2, 2) {
            self.signals
                .msix
                .set_control(self.config.u16_at(self.msix_cap + 2));
        }
        let data_at = self.pci_cfg_cap + PCI_CFG_DATA;
        if Self::touches(offset, len, data_at, 4) {
            if let Some((off, n)) = self.pci_cfg_window() {
                let mut buf = [0u8; 4];
                self.config.read(data_at as u16, &mut buf);
                self.bar_write(0, off, &buf[..n]);
            }
        }
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != 0 {
            return;
        }
        let region = offset / REGION * REGION;
        let rel = offset - region;
        match region {
            COMMON_OFFSET => self.common_read(rel, data),
            ISR_OFFSET if rel == 0 => {
                if let Some(b) = data.first_mut() {
                    *b = self.signals.isr.swap(0, Ordering::AcqRel);
                }
            }
            DEVICE_OFFSET => self.device.read_config(rel, data),
            NOTIFY_OFFSET => {}
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => self
                .signals
                .msix
                .read_table(offset - MSIX_TABLE_OFFSET, data),
            o if o >= MSIX_PBA_OFFSET => self.signals.msix.read_pba(offset - MSIX_PBA_OFFSET, data),
            _ => {}
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != 0 {
            return;
        }
        let region = offset / REGION * REGION;
        let rel = offset - region;
        match region {
            COMMON_OFFSET => self.common_write(rel, data),
            DEVICE_OFFSET => self.device.write_config(rel, data),
            NOTIFY_OFFSET => {
                let q = rel / u64::from(NOTIFY_OFF_MULTIPLIER);
                if let Some(fd) = usize::try_from(q)
                    .ok()
                    .and_then(|q| self.queue_events.get(q))
                {
                    let _ = fd.write(1);
                }
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => self
                .signals
                .msix
                .write_table(offset - MSIX_TABLE_OFFSET, data),
            _ => {}
        }
    }

    fn bar_moved(&mut self, bar: usize, addr: Option<u64>) {
        if bar == 0 {
            self.place_notify(addr);
        }
    }
}

#[cfg(test)]
#[path = "transport_tests.rs"]
mod tests;
