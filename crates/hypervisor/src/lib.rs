//! The thin KVM layer of Ferrovisor. The VMM and its devices talk to KVM only through these types:
//! [`Hypervisor`] (the `/dev/kvm` handle and what the host can do), [`Vm`] (memory slots,
//! interrupt controller, irqfds, GSI routing with MSI routes, ioeventfds) and [`Vcpu`]
//! (registers and the run loop, whose exits come back
//! as a small [`VmExit`]).

mod error;
mod host;
mod state;
mod vcpu;
mod vm;

pub use error::HypervisorError;
pub use host::{HostInfo, HostKind};
pub use kvm_bindings;
pub use state::{VcpuState, VmState, XsaveArea, STATE_VERSION};
pub use vcpu::{Vcpu, VmExit};
pub use vm::{default_irqchip_routes, IrqRoute, Vm, IRQCHIP_GSIS};

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

/// An open `/dev/kvm`.
pub struct Hypervisor {
    kvm: Kvm,
    kind: HostKind,
}

impl Hypervisor {
    /// Opens `/dev/kvm`, with a clear error when it is missing or not accessible.
    pub fn new() -> Result<Self, HypervisorError> {
        let kvm = Kvm::new().map_err(HypervisorError::open)?;
        let api = kvm.get_api_version();
        if api != 12 {
            return Err(HypervisorError::ApiVersion(api));
        }
        Ok(Self {
            kvm,
            kind: HostKind::detect(),
        })
    }

    /// Which kind of KVM this host has.
    pub fn kind(&self) -> HostKind {
        self.kind
    }

    /// The CPUID entries KVM can present to a guest on this host.
    pub fn supported_cpuid(&self) -> Result<CpuId, HypervisorError> {
        self.kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(HypervisorError::Cpuid)
    }

    /// Largest vCPU count KVM allows in one VM.
    pub fn max_vcpus(&self) -> usize {
        self.kvm.get_max_vcpus()
    }

    /// Creates an empty VM.
    pub fn create_vm(&self) -> Result<Vm, HypervisorError> {
        let fd = self.kvm.create_vm().map_err(HypervisorError::CreateVm)?;
        Ok(Vm::new(fd, self.kvm.get_vcpu_mmap_size().unwrap_or(0)))
    }

    /// The MSRs KVM saves and restores for a vCPU (KVM_GET_MSR_INDEX_LIST): the CPU's MSRs
    /// KVM virtualizes plus the ones it emulates (kvmclock's, the TSC).
    pub fn msr_index_list(&self) -> Result<Vec<u32>, HypervisorError> {
        let list = self
            .kvm
            .get_msr_index_list()
            .map_err(|source| HypervisorError::Vm {
                op: "KVM_GET_MSR_INDEX_LIST",
                source,
            })?;
        Ok(list.as_slice().to_vec())
    }

    /// What the host offers, for `ferro-vmm --host-info`.
    pub fn host_info(&self) -> HostInfo {
        HostInfo::collect(&self.kvm, self.kind)
    }
}

#[cfg(test)]
mod tests;
