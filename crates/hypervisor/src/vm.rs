//! One VM: memory slots, the in-kernel interrupt controllers and interrupt file descriptors.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use crate::{HypervisorError, Vcpu};

/// Address of the three pages KVM needs for the real-mode TSS on Intel (below the 4 GiB hole's top).
const TSS_ADDRESS: usize = 0xfffb_d000;
/// Address of the identity-map page KVM needs on Intel, just below the TSS.
const IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// A KVM VM.
pub struct Vm {
    fd: VmFd,
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

    /// Makes a signal on `fd` raise interrupt line `gsi`.
    pub fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), HypervisorError> {
        self.fd.register_irqfd(fd, gsi).map_err(vm_err("KVM_IRQFD"))
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
