//! virtio 1.x for Ferrovisor: the modern PCI transport ([`VirtioPciDevice`]), the checked walk
//! of split-virtqueue descriptor chains ([`chain`]) and the devices, each implementing
//! [`VirtioDevice`]. The first device is virtio-rng ([`rng::Rng`]).
//!
//! How a device is driven: the transport owns the registers the driver programs (features,
//! status, queue addresses, MSI-X vectors). On DRIVER_OK it builds `virtio_queue::Queue`s and
//! hands them to [`VirtioDevice::activate`] with guest memory and an [`Interrupt`]. Queue kicks
//! arrive as ioeventfds the VMM's event loop waits on; it calls
//! [`VirtioPciDevice::queue_event`], which calls [`VirtioDevice::queue_notified`] off the vCPU
//! threads. A device that meets a malformed ring or chain returns an error: the transport then
//! sets DEVICE_NEEDS_RESET, raises a configuration interrupt and stops calling the device until
//! the driver resets it; the rest of the VM keeps running.
//!
//! Nothing here touches KVM: MSI-X leaves through `ferro_pci::MsiRouting` and notification
//! addresses are (un)registered through the injected [`NotifyRegistry`].

#![deny(unsafe_code)]
#![deny(missing_docs)]

pub mod balloon;
pub mod block;
pub mod chain;
pub mod fuzzing;
pub mod net;
mod ring;
pub mod rng;
#[cfg(test)]
mod test_rig;
#[cfg(test)]
mod testutil;
pub mod transport;
mod transport_regs;
pub mod vsock;

use std::os::fd::RawFd;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

pub use chain::{walk_chain, ChainError, Segment};
pub use transport::{VirtioPciDevice, VirtioPciState};

/// Guest memory as devices see it.
pub type GuestMemory = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
/// A split virtqueue (rust-vmm `virtio-queue`).
pub use virtio_queue::Queue;

/// PCI vendor id of virtio devices.
pub const VIRTIO_PCI_VENDOR: u16 = 0x1af4;
/// Modern virtio PCI device ids are this plus the virtio device type.
pub const VIRTIO_PCI_DEVICE_BASE: u16 = 0x1040;

/// Device types (virtio 1.2 section 5).
pub mod device_type {
    /// Network card.
    pub const NET: u32 = 1;
    /// Block device.
    pub const BLOCK: u32 = 2;
    /// Entropy source.
    pub const RNG: u32 = 4;
    /// Memory balloon.
    pub const BALLOON: u32 = 5;
    /// Socket device.
    pub const VSOCK: u32 = 19;
}

/// Device status bits (virtio 1.2 section 2.1).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u8 = 2;
    /// The driver is ready: queues may be used.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u8 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u8 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u8 = 0x80;
}

/// Feature bits the transport handles for every device.
pub mod features {
    /// Indirect descriptor tables.
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    /// used_event / avail_event interrupt and notification suppression.
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    /// virtio 1.x (modern) device: mandatory here.
    pub const VERSION_1: u64 = 1 << 32;
}

/// "No vector" for config_msix_vector and queue_msix_vector.
pub const NO_VECTOR: u16 = 0xffff;

/// How a device raises interrupts; the transport implements it (MSI-X vectors, ISR bits).
pub trait Interrupt: Send + Sync {
    /// The device used buffers of queue `queue`.
    fn signal_queue(&self, queue: u16);
    /// The device's configuration (or status: NEEDS_RESET) changed.
    fn signal_config(&self);
}

/// Where the transport puts its queue-notification addresses: the VMM backs it with KVM
/// ioeventfds, so a driver's kick signals the eventfd without leaving the kernel.
pub trait NotifyRegistry: Send + Sync {
    /// Writes of any length at guest-physical `addr` signal `fd` from now on.
    fn register(&self, addr: u64, fd: &EventFd) -> std::io::Result<()>;
    /// Undoes [`NotifyRegistry::register`].
    fn unregister(&self, addr: u64, fd: &EventFd);
}

/// Why a device stopped: the transport reports it and sets DEVICE_NEEDS_RESET.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A descriptor chain is malformed.
    #[error("queue {queue}: {source}")]
    Chain {
        /// Queue index.
        queue: u16,
        /// What is wrong with the chain.
        source: ChainError,
    },
    /// The rings themselves are broken (avail index runs ahead, ring outside memory).
    #[error("queue {queue}: {what}")]
    Ring {
        /// Queue index.
        queue: u16,
        /// What is wrong.
        what: String,
    },
    /// The queues handed over at activation are unusable.
    #[error("activation: {0}")]
    Activate(String),
    /// The host could not serve the request (e.g. no entropy).
    #[error("host: {0}")]
    Host(String),
    /// A saved state does not fit this device.
    #[error("restore: {0}")]
    Restore(String),
}

/// A queue's progress and layout, to save (serde mirror of `virtio_queue::QueueState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedQueue {
    /// Largest size the device offers.
    pub max_size: u16,
    /// Next available-ring entry the device will take.
    pub next_avail: u16,
    /// Next used-ring entry the device will fill.
    pub next_used: u16,
    /// EVENT_IDX negotiated.
    pub event_idx_enabled: bool,
    /// Size the driver chose.
    pub size: u16,
    /// The driver enabled it.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
}

impl SavedQueue {
    /// The state of `q`.
    pub fn of(q: &Queue) -> Self {
        let s = q.state();
        Self {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

/// Saved state of a device (the part the transport does not hold), one variant per device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "device", rename_all = "lowercase")]
pub enum DeviceState {
    /// virtio-rng.
    Rng(rng::RngState),
    /// virtio-blk.
    Block(block::BlockState),
    /// virtio-net.
    Net(net::NetState),
    /// virtio-vsock.
    Vsock(vsock::VsockState),
    /// virtio-balloon.
    Balloon(balloon::BalloonState),
}

/// A virtio device behind a transport.
///
/// Rules every device follows: no method panics on anything the guest controls; queue
/// processing walks chains with [`walk_chain`] and returns [`DeviceError`] on any malformed
/// ring or chain instead of guessing; device configuration reads of any offset and size fill
/// `data` (0 past the end).
pub trait VirtioDevice: Send {
    /// The virtio device type ([`device_type`]).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue (powers of two); its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Device-specific feature bits offered (the transport adds VERSION_1, EVENT_IDX and
    /// INDIRECT_DESC).
    fn features(&self) -> u64;
    /// The features the driver accepted (a subset of what was offered), at FEATURES_OK.
    fn ack_features(&mut self, features: u64) {
        let _ = features;
    }
    /// Size of the device configuration space in bytes (0: none).
    fn config_size(&self) -> usize {
        0
    }
    /// Reads device configuration at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let _ = offset;
        data.fill(0);
    }
    /// Writes device configuration at `offset`.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let _ = (offset, data);
    }
    /// The driver set DRIVER_OK: start serving `queues` (one per `queue_max_sizes` entry; a
    /// queue the driver did not enable is not `ready()`).
    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        interrupt: Arc<dyn Interrupt>,
    ) -> Result<(), DeviceError>;
    /// The driver kicked queue `queue`.
    fn queue_notified(&mut self, queue: u16) -> Result<(), DeviceError>;
    /// Back to the state before activation (the driver wrote status 0).
    fn reset(&mut self);
    /// The device's own state.
    fn save(&self) -> DeviceState;
    /// Restores [`VirtioDevice::save`]'s result; called after `activate` when the saved
    /// transport was active.
    fn restore(&mut self, state: &DeviceState) -> Result<(), DeviceError>;
    /// A file descriptor for host-side work (a tap, an epoll set of sockets) that the event
    /// loop waits on, level-triggered, for the device's whole life: when it is readable the
    /// loop calls [`VirtioDevice::host_ready`]. The device keeps it quiet while it has nothing
    /// to do (inactive, stopped after an error, no buffers to fill). `None`: no host side.
    fn host_fd(&self) -> Option<RawFd> {
        None
    }
    /// [`VirtioDevice::host_fd`] is readable: move data between the host and the queues.
    fn host_ready(&mut self) -> Result<(), DeviceError> {
        Ok(())
    }
    /// A live count of the device's requests in flight: while it is above zero, and shortly
    /// after, the event loop polls its fds instead of sleeping (a completion to reap or the
    /// guest's next kick is due soon). Asked once, when the loop starts.
    fn poll_counter(&self) -> Option<std::sync::Arc<std::sync::atomic::AtomicUsize>> {
        None
    }
    /// The event loop is polling (see [`VirtioDevice::poll_counter`]): take the requests the
    /// driver made available without waiting for its kick. A device may turn the driver's
    /// kicks off while the loop polls it; [`VirtioDevice::poll_done`] turns them back on.
    /// Returns whether there was anything to take.
    fn poll_queues(&mut self) -> Result<bool, DeviceError> {
        Ok(false)
    }
    /// The event loop stops polling and will sleep until an fd is ready: the device turns the
    /// driver's kicks back on, then looks at its queues once more (the driver may have added
    /// a request before it saw kicks wanted) and takes what is there. Returns whether there
    /// was anything to take; then the loop polls on instead of sleeping.
    fn poll_done(&mut self) -> Result<bool, DeviceError> {
        Ok(false)
    }
}
