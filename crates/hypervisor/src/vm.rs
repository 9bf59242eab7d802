//! One VM: memory slots, the in-kernel interrupt controllers and interrupt file descriptors.

use kvm_bindings::{
    kvm_irq_routing_entry, kvm_pit_config, kvm_userspace_memory_region, KvmIrqRouting,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP,
    KVM_IRQ_ROUTING_MSI, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::{HypervisorError, Vcpu};

/// Address of the three pages KVM needs for the real-mode TSS on Intel (below the 4 GiB hole's top).
const TSS_ADDRESS: usize = 0xfffb_d000;
/// Address of the identity-map page KVM needs on Intel, just below the TSS.
const IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// GSIs 0..`IRQCHIP_GSIS` are the in-kernel PIC/IOAPIC pins; MSI routes use GSIs from here up.
pub const IRQCHIP_GSIS: u32 = 24;

/// One entry of the GSI routing table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IrqRoute {
    /// GSI `gsi` drives `pin` of an in-kernel interrupt controller.
    Irqchip {
        /// The GSI.
        gsi: u32,
        /// `KVM_IRQCHIP_PIC_MASTER`, `KVM_IRQCHIP_PIC_SLAVE` or `KVM_IRQCHIP_IOAPIC`.
        chip: u32,
        /// The pin.
        pin: u32,
    },
    /// GSI `gsi` sends an MSI message.
    Msi {
        /// The GSI.
        gsi: u32,
        /// Message address.
        address: u64,
        /// Message data.
        data: u32,
    },
}

/// KVM's default routes, which KVM_SET_GSI_ROUTING replaces and so every table we set must
/// repeat: GSI 0..16 to the IOAPIC pin and the PIC pin of the same number, 16..24 to the IOAPIC.
pub fn default_irqchip_routes() -> Vec<IrqRoute> {
    let mut routes = Vec::with_capacity(40);
    for gsi in 0..IRQCHIP_GSIS {
        routes.push(IrqRoute::Irqchip {
            gsi,
            chip: KVM_IRQCHIP_IOAPIC,
            pin: gsi,
        });
        if gsi < 16 {
            let chip = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            routes.push(IrqRoute::Irqchip {
                gsi,
                chip,
                pin: gsi % 8,
            });
        }
    }
    routes
}

impl IrqRoute {
    fn to_kvm(self) -> kvm_irq_routing_entry {
        let mut e = kvm_irq_routing_entry::default();
        match self {
            Self::Irqchip { gsi, chip, pin } => {
                e.gsi = gsi;
                e.type_ = KVM_IRQ_ROUTING_IRQCHIP;
                e.u.irqchip.irqchip = chip;
                e.u.irqchip.pin = pin;
            }
            Self::Msi { gsi, address, data } => {
                e.gsi = gsi;
                e.type_ = KVM_IRQ_ROUTING_MSI;
                e.u.msi.address_lo = address as u32;
                e.u.msi.address_hi = (address >> 32) as u32;
                e.u.msi.data = data;
            }
        }
        e
    }
}

/// A KVM VM.
pub struct Vm {
    pub(crate) fd: VmFd,
    _run_size: usize,
}

fn vm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> HypervisorError {
    move |source| HypervisorError::Vm { op, source }
}

impl Vm {
    pub(crate) fn new(fd: VmFd, run_size: usize) -> Self {
        Self {
            fd,
            _run_size: run_size,
        }
    }

    /// Sets up the x86 platform pieces every VM needs: TSS and identity map pages, the in-kernel
    /// PIC/IOAPIC/LAPICs and the in-kernel PIT (with port 0x61 handled in the kernel).
    pub fn setup_platform(&self) -> Result<(), HypervisorError> {
        self.fd
            .set_identity_map_address(IDENTITY_MAP_ADDRESS)
            .map_err(vm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
        self.fd
            .set_tss_address(TSS_ADDRESS)
            .map_err(vm_err("KVM_SET_TSS_ADDR"))?;
        self.fd
            .create_irq_chip()
            .map_err(vm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd.create_pit2(pit).map_err(vm_err("KVM_CREATE_PIT2"))
    }

    /// Maps host memory into the guest.
    ///
    /// # Safety
    /// `host_addr..host_addr + size` must be a mapping owned by the caller that stays valid and
    /// is not unmapped for as long as the VM exists.
    pub unsafe fn map_memory(
        &self,
        slot: u32,
        guest_addr: u64,
        size: u64,
        host_addr: u64,
    ) -> Result<(), HypervisorError> {
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: guest_addr,
            memory_size: size,
            userspace_addr: host_addr,
        };
        // SAFETY: the caller guarantees the host range is a live mapping that outlives the VM,
        // which is what KVM_SET_USER_MEMORY_REGION requires.
        unsafe { self.fd.set_user_memory_region(region) }
            .map_err(vm_err("KVM_SET_USER_MEMORY_REGION"))
    }

    /// Turns dirty-page logging on or off for the memory slot [`Vm::map_memory`] made with
    /// the same `slot`, `guest_addr`, `size` and `host_addr` (KVM_SET_USER_MEMORY_REGION with
    /// only KVM_MEM_LOG_DIRTY_PAGES changed; vCPUs may run meanwhile). Turning it on starts an
    /// empty log; [`Vm::dirty_log`] then reports the pages the guest (or KVM on its behalf)
    /// wrote. Writes by host threads through their own mapping are not logged.
    ///
    /// # Safety
    /// As for [`Vm::map_memory`]: the host range is the slot's live mapping, owned by the
    /// caller and kept for as long as the VM exists.
    pub unsafe fn set_dirty_logging(
        &self,
        slot: u32,
        guest_addr: u64,
        size: u64,
        host_addr: u64,
        on: bool,
    ) -> Result<(), HypervisorError> {
        let region = kvm_userspace_memory_region {
            slot,
            flags: if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
            guest_phys_addr: guest_addr,
            memory_size: size,
            userspace_addr: host_addr,
        };
        // SAFETY: the same slot with the same live host range the caller guarantees outlives
        // the VM; only the flags differ, which KVM applies to the existing slot in place.
        unsafe { self.fd.set_user_memory_region(region) }
            .map_err(vm_err("KVM_SET_USER_MEMORY_REGION (dirty logging)"))
    }

    /// KVM_GET_DIRTY_LOG: the pages of `slot` (of `size` bytes) written since logging started
    /// or since the last call, one bit per 4 KiB page (bit `i % 64` of word `i / 64`), and
    /// clears the log. The slot must have dirty logging on.
    pub fn dirty_log(&self, slot: u32, size: u64) -> Result<Vec<u64>, HypervisorError> {
        let size = usize::try_from(size).map_err(|_| HypervisorError::Vm {
            op: "KVM_GET_DIRTY_LOG (slot too large)",
            source: kvm_ioctls::Error::new(libc::EINVAL),
        })?;
        // kvm-ioctls sizes the bitmap from `size` (one bit per page) and checks the ioctl.
        self.fd
            .get_dirty_log(slot, size)
            .map_err(vm_err("KVM_GET_DIRTY_LOG"))
    }

    /// Makes a signal on `fd` raise interrupt line `gsi`.
    pub fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), HypervisorError> {
        self.fd.register_irqfd(fd, gsi).map_err(vm_err("KVM_IRQFD"))
    }

    /// Stops a signal on `fd` from raising `gsi`.
    pub fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), HypervisorError> {
        self.fd
            .unregister_irqfd(fd, gsi)
            .map_err(vm_err("KVM_IRQFD (deassign)"))
    }

    /// Replaces the whole GSI routing table with `routes` (include
    /// [`default_irqchip_routes`] to keep the legacy interrupt lines working).
    pub fn set_gsi_routing(&self, routes: &[IrqRoute]) -> Result<(), HypervisorError> {
        let entries: Vec<kvm_irq_routing_entry> = routes.iter().map(|r| r.to_kvm()).collect();
        let table = KvmIrqRouting::from_entries(&entries).map_err(|_| HypervisorError::Vm {
            op: "KVM_SET_GSI_ROUTING (table too large)",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        self.fd
            .set_gsi_routing(&table)
            .map_err(vm_err("KVM_SET_GSI_ROUTING"))
    }

    /// Makes a guest write of any length at MMIO address `addr` signal `fd` inside KVM, with
    /// no exit to the VMM.
    pub fn register_mmio_ioeventfd(&self, fd: &EventFd, addr: u64) -> Result<(), HypervisorError> {
        self.fd
            .register_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(vm_err("KVM_IOEVENTFD"))
    }

    /// Undoes [`Vm::register_mmio_ioeventfd`].
    pub fn unregister_mmio_ioeventfd(
        &self,
        fd: &EventFd,
        addr: u64,
    ) -> Result<(), HypervisorError> {
        self.fd
            .unregister_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(vm_err("KVM_IOEVENTFD (deassign)"))
    }

    /// Creates vCPU `id` (its APIC id).
    pub fn create_vcpu(&self, id: u32) -> Result<Vcpu, HypervisorError> {
        let fd = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(|source| HypervisorError::Vcpu {
                id,
                op: "KVM_CREATE_VCPU",
                source,
            })?;
        Ok(Vcpu::new(id, fd))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_routes_match_kvm() {
        let r = default_irqchip_routes();
        assert_eq!(r.len(), 16 * 2 + 8);
        assert!(r.contains(&IrqRoute::Irqchip {
            gsi: 9,
            chip: KVM_IRQCHIP_PIC_SLAVE,
            pin: 1
        }));
        assert!(r.contains(&IrqRoute::Irqchip {
            gsi: 23,
            chip: KVM_IRQCHIP_IOAPIC,
            pin: 23
        }));
        let e = IrqRoute::Msi {
            gsi: 30,
            address: 0x1_fee0_0000,
            data: 0x41,
        }
        .to_kvm();
        assert_eq!(e.type_, KVM_IRQ_ROUTING_MSI);
        // SAFETY: `to_kvm` filled the `msi` member of the union for an MSI route.
        let (lo, hi, data) = unsafe { (e.u.msi.address_lo, e.u.msi.address_hi, e.u.msi.data) };
        assert_eq!((lo, hi, data), (0xfee0_0000, 1, 0x41));
    }
}
