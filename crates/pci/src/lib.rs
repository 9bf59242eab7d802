//! PCI for Ferrovisor: the configuration space of a function ([`ConfigSpace`]: type 0 header,
//! capability list, memory BARs with size probing), the root bus with its host bridge at
//! 00:00.0 ([`PciRoot`]), both configuration access mechanisms over the same spaces (type 1
//! through ports 0xCF8/0xCFC, [`PciConfigAddress`] and [`PciConfigData`] on the port bus, and
//! PCIe ECAM through [`PciRoot::ecam_read`]/[`PciRoot::ecam_write`]), BAR placement in the
//! host bridge's windows ([`BarAllocator`], on `vm-allocator`) and MSI-X ([`Msix`]).
//!
//! Nothing here touches KVM: interrupts leave through the injected [`MsiRouting`], and a BAR
//! that moves is announced to its device ([`PciDevice::bar_moved`]), which may move its own
//! host resources (ioeventfds) through whatever the VMM gave it.
//!
//! Every guest access — any size, any offset, any value — is handled without panicking: reads
//! of nothing return all ones, writes to nothing are dropped.

#![deny(unsafe_code)]
#![deny(missing_docs)]

pub mod config;
pub mod msix;
pub mod root;

pub use config::{BarDef, BarKind, ConfigSpace, ConfigState, PciIds};
pub use msix::{MsiMessage, MsiRouting, Msix, MsixEntry, MsixState};
pub use root::{BarAllocator, PciConfigAddress, PciConfigData, PciRoot, PciWindow};

/// A PCI function on the root bus.
///
/// The root bus owns configuration access: it reads and writes the space the device exposes
/// through [`PciDevice::config`]/[`PciDevice::config_mut`] (a device that must observe its
/// writes — MSI-X enable, a configuration-access window — overrides [`PciDevice::config_write`]),
/// tracks where the memory BARs decode, and sends memory accesses inside a BAR to
/// [`PciDevice::bar_read`]/[`PciDevice::bar_write`] with the offset in that BAR.
pub trait PciDevice: Send {
    /// The configuration space.
    fn config(&self) -> &ConfigSpace;
    /// The configuration space, to change.
    fn config_mut(&mut self) -> &mut ConfigSpace;
    /// The guest reads configuration space at `offset` (0..4096).
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        self.config().read(offset, data);
    }
    /// The guest writes configuration space at `offset` (0..4096).
    fn config_write(&mut self, offset: u16, data: &[u8]) {
        self.config_mut().write(offset, data);
    }
    /// The guest reads BAR `bar` at `offset`: fill all of `data` (it comes pre-filled with 0xff).
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        let _ = (bar, offset, data);
    }
    /// The guest writes BAR `bar` at `offset`.
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        let _ = (bar, offset, data);
    }
    /// BAR `bar` now decodes at `addr` (`None`: it does not decode: memory space disabled,
    /// unassigned, or outside the host bridge's windows).
    fn bar_moved(&mut self, bar: usize, addr: Option<u64>) {
        let _ = (bar, addr);
    }
}

/// Errors of the PCI model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PciError {
    /// The configuration space could not be laid out.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// A slot number past 31.
    #[error("PCI slot {0} does not exist on bus 0 (0..=31)")]
    NoSuchSlot(u8),
    /// The slot is taken.
    #[error("PCI slot {0} is already occupied")]
    SlotInUse(u8),
    /// An MSI-X vector count outside 1..=2048.
    #[error("{0} MSI-X vectors: a function has 1 to 2048")]
    MsixVectors(u16),
    /// A BAR does not fit in the windows.
    #[error("no room for a BAR of {size:#x} bytes in the PCI windows")]
    NoBarSpace {
        /// Size asked for.
        size: u64,
    },
    /// A window is empty or wraps around.
    #[error("PCI window {start:#x}+{size:#x} is invalid")]
    BadWindow {
        /// First address.
        start: u64,
        /// Length.
        size: u64,
    },
    /// Saved state of the wrong size.
    #[error("saved {what} has {len} entries, expected {want}")]
    StateSize {
        /// Which part.
        what: &'static str,
        /// Entries in the saved state.
        len: usize,
        /// Entries expected.
        want: usize,
    },
}
