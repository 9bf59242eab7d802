//! One virtual CPU: its architectural state and the run loop's exits.

use kvm_bindings::kvm_msr_entry;
use kvm_bindings::{
    kvm_fpu, kvm_lapic_state, kvm_regs, kvm_sregs, CpuId, Msrs, KVM_SYSTEM_EVENT_CRASH,
    KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::HypervisorError;

/// Why `Vcpu::run` returned.
#[derive(Debug)]
pub enum VmExit<'a> {
    /// The guest read an I/O port; fill `data`.
    IoIn {
        /// Port number.
        port: u16,
        /// Bytes to fill: `size` bytes per access, several accesses for a `rep ins`.
        data: &'a mut [u8],
        /// Width of one access (1, 2 or 4).
        size: usize,
    },
    /// The guest wrote an I/O port.
    IoOut {
        /// Port number.
        port: u16,
        /// Bytes written: `size` bytes per access, several accesses for a `rep outs`.
        data: &'a [u8],
        /// Width of one access (1, 2 or 4).
        size: usize,
    },
    /// The guest read unbacked memory; fill `data`.
    MmioRead {
        /// Guest-physical address.
        addr: u64,
        /// Bytes to fill.
        data: &'a mut [u8],
    },
    /// The guest wrote unbacked memory.
    MmioWrite {
        /// Guest-physical address.
        addr: u64,
        /// Bytes written.
        data: &'a [u8],
    },
    /// Triple fault: the CPU shut down.
    TripleFault,
    /// The guest asked KVM for a power-off (PSCI-like system event).
    PowerOff,
    /// The guest asked KVM for a reset.
    Reset,
    /// The guest reported a crash through KVM.
    Crash,
    /// KVM_RUN was interrupted by a signal or an immediate-exit request.
    Interrupted,
    /// The vCPU halted with no in-kernel LAPIC to wait on.
    Halt,
    /// KVM could not enter or continue the guest.
    Failed(String),
}

/// A KVM vCPU.
pub struct Vcpu {
    pub(crate) id: u32,
    pub(crate) fd: VcpuFd,
    run: *const kvm_bindings::kvm_run,
}

// SAFETY: `run` points into the vCPU's own `kvm_run` mapping, owned by `fd`, which moves with
// the Vcpu; nothing else aliases it from another thread.
unsafe impl Send for Vcpu {}

impl Vcpu {
    pub(crate) fn new(id: u32, mut fd: VcpuFd) -> Self {
        let run = fd.get_kvm_run() as *const kvm_bindings::kvm_run;
        Self { id, fd, run }
    }

    /// Width of the port access of the current I/O exit.
    fn io_size(run: *const kvm_bindings::kvm_run) -> usize {
        // SAFETY: `run` is this vCPU's mapped `kvm_run`, valid while the fd lives; it is read
        // right after KVM_RUN returned an I/O exit, when the `io` member of the union is the
        // live one; `size` is a plain byte that the data slice (at `data_offset`) does not cover.
        let size = unsafe { (*run).__bindgen_anon_1.io.size };
        usize::from(size.clamp(1, 4))
    }

    /// The vCPU's index, which is also its APIC id.
    pub fn id(&self) -> u32 {
        self.id
    }

    pub(crate) fn err(
        &self,
        op: &'static str,
    ) -> impl FnOnce(kvm_ioctls::Error) -> HypervisorError {
        let id = self.id;
        move |source| HypervisorError::Vcpu { id, op, source }
    }

    /// Sets the CPUID the guest sees.
    pub fn set_cpuid(&self, cpuid: &CpuId) -> Result<(), HypervisorError> {
        self.fd
            .set_cpuid2(cpuid)
            .map_err(self.err("KVM_SET_CPUID2"))
    }

    /// Reads the general-purpose registers.
    pub fn regs(&self) -> Result<kvm_regs, HypervisorError> {
        self.fd.get_regs().map_err(self.err("KVM_GET_REGS"))
    }

    /// Sets the general-purpose registers.
    pub fn set_regs(&self, regs: &kvm_regs) -> Result<(), HypervisorError> {
        self.fd.set_regs(regs).map_err(self.err("KVM_SET_REGS"))
    }

    /// Reads the special registers.
    pub fn sregs(&self) -> Result<kvm_sregs, HypervisorError> {
        self.fd.get_sregs().map_err(self.err("KVM_GET_SREGS"))
    }

    /// Sets the special registers.
    pub fn set_sregs(&self, sregs: &kvm_sregs) -> Result<(), HypervisorError> {
        self.fd.set_sregs(sregs).map_err(self.err("KVM_SET_SREGS"))
    }

    /// Sets the x87/SSE state.
    pub fn set_fpu(&self, fpu: &kvm_fpu) -> Result<(), HypervisorError> {
        self.fd.set_fpu(fpu).map_err(self.err("KVM_SET_FPU"))
    }

    /// Sets model-specific registers; all of them must be accepted.
    pub fn set_msrs(&self, entries: &[(u32, u64)]) -> Result<(), HypervisorError> {
        let list: Vec<kvm_msr_entry> = entries
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&list).map_err(|_| HypervisorError::Msrs {
            id: self.id,
            set: 0,
            wanted: list.len(),
        })?;
        let set = self.fd.set_msrs(&msrs).map_err(self.err("KVM_SET_MSRS"))?;
        if set != list.len() {
            return Err(HypervisorError::Msrs {
                id: self.id,
                set,
                wanted: list.len(),
            });
        }
        Ok(())
    }

    /// Reads the local APIC state.
    pub fn lapic(&self) -> Result<kvm_lapic_state, HypervisorError> {
        self.fd.get_lapic().map_err(self.err("KVM_GET_LAPIC"))
    }

    /// Sets the local APIC state.
    pub fn set_lapic(&self, state: &kvm_lapic_state) -> Result<(), HypervisorError> {
        self.fd.set_lapic(state).map_err(self.err("KVM_SET_LAPIC"))
    }

    /// The TSC frequency KVM gives this vCPU, in kHz.
    pub fn tsc_khz(&self) -> Option<u32> {
        self.fd.get_tsc_khz().ok().filter(|&k| k > 0)
    }

    /// Sets or clears KVM's immediate-exit flag: while set, KVM_RUN returns at once (EINTR).
    pub fn set_immediate_exit(&mut self, exit: bool) {
        self.fd.set_kvm_immediate_exit(u8::from(exit));
    }

    /// The address of this vCPU's immediate-exit flag in the shared `kvm_run` page, for a
    /// signal handler on the vCPU's own thread to set. It stays valid while this `Vcpu` lives.
    pub fn immediate_exit_ptr(&mut self) -> *mut u8 {
        &mut self.fd.get_kvm_run().immediate_exit as *mut u8
    }

    /// Runs the vCPU until the next exit that needs the VMM.
    pub fn run(&mut self) -> Result<VmExit<'_>, HypervisorError> {
        let id = self.id;
        let run = self.run;
        match self.fd.run() {
            Ok(exit) => Ok(match exit {
                VcpuExit::IoIn(port, data) => VmExit::IoIn {
                    port,
                    data,
                    size: Self::io_size(run),
                },
                VcpuExit::IoOut(port, data) => VmExit::IoOut {
                    port,
                    data,
                    size: Self::io_size(run),
                },
                VcpuExit::MmioRead(addr, data) => VmExit::MmioRead { addr, data },
                VcpuExit::MmioWrite(addr, data) => VmExit::MmioWrite { addr, data },
                VcpuExit::Shutdown => VmExit::TripleFault,
                VcpuExit::Hlt => VmExit::Halt,
                VcpuExit::Intr => VmExit::Interrupted,
                VcpuExit::SystemEvent(kind, _) => match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => VmExit::PowerOff,
                    KVM_SYSTEM_EVENT_RESET => VmExit::Reset,
                    KVM_SYSTEM_EVENT_CRASH => VmExit::Crash,
                    other => VmExit::Failed(format!("unknown system event {other}")),
                },
                VcpuExit::FailEntry(reason, cpu) => VmExit::Failed(format!(
                    "KVM could not enter the guest (hardware reason {reason:#x}, cpu {cpu})"
                )),
                VcpuExit::InternalError => {
                    VmExit::Failed("KVM internal error (emulation failure)".into())
                }
                other => VmExit::Failed(format!("unhandled exit {other:?}")),
            }),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                Ok(VmExit::Interrupted)
            }
            Err(source) => Err(HypervisorError::Vcpu {
                id,
                op: "KVM_RUN",
                source,
            }),
        }
    }
}
