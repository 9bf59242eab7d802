//! Saving and restoring what KVM holds for a VM: every vCPU's architectural state and the
//! in-kernel devices (PIC, IOAPIC, PIT) and kvmclock. The structs are serde-described, so a
//! snapshot or a migration stream can carry them; KVM's own structures inside them are written
//! as their bytes (kvm-bindings' serde support).
//!
//! Ordering, from KVM's documentation and what other VMMs found: save the MP state first
//! (KVM_GET_MP_STATE accepts pending INIT/SIPI events, which changes the LAPIC), the vCPU events
//! last; restore CPUID before MSRs (which MSRs exist depends on it), and the vCPU events after
//! the LAPIC and the MSRs. kvmclock is restored with KVM_SET_CLOCK after the vCPUs' TSCs.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES,
};
use serde::{Deserialize, Serialize};

use crate::{HypervisorError, Vcpu, Vm};

/// Version of [`VcpuState`] and [`VmState`] this code writes and reads.
pub const STATE_VERSION: u32 = 1;

/// The words of a vCPU's XSAVE area (the 4 KiB `kvm_xsave` region).
const XSAVE_WORDS: usize = 1024;

/// The XSAVE area of one vCPU (the legacy 4 KiB `kvm_xsave` region).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct XsaveArea(pub Vec<u32>);

/// Everything KVM holds for one vCPU.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VcpuState {
    /// Format version ([`STATE_VERSION`]).
    pub version: u32,
    /// The vCPU's index (its APIC id).
    pub id: u32,
    /// The CPUID the guest saw.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// KVM_GET_MP_STATE.
    pub mp_state: kvm_mp_state,
    /// General-purpose registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// x87/SSE/AVX state (KVM_GET_XSAVE).
    pub xsave: XsaveArea,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// The local APIC.
    pub lapic: kvm_lapic_state,
    /// Every MSR of KVM_GET_MSR_INDEX_LIST that could be read (TSC and kvmclock's included).
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts, NMIs, SMM (KVM_GET_VCPU_EVENTS).
    pub events: kvm_vcpu_events,
    /// The TSC frequency the guest ran at, in kHz.
    pub tsc_khz: Option<u32>,
}

/// What KVM holds for the VM as a whole.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    /// Format version ([`STATE_VERSION`]).
    pub version: u32,
    /// The master 8259.
    pub pic_master: kvm_irqchip,
    /// The slave 8259.
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC.
    pub ioapic: kvm_irqchip,
    /// The 8254 PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock (KVM_GET_CLOCK).
    pub clock: kvm_clock_data,
}

impl std::fmt::Debug for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmState")
            .field("version", &self.version)
            .field("clock", &self.clock.clock)
            .finish_non_exhaustive()
    }
}

/// A saved state that does not fit.
fn bad(what: String) -> HypervisorError {
    HypervisorError::State(what)
}

impl Vcpu {
    /// Reads this vCPU's whole state. Call it on a vCPU that is not running (its thread is
    /// parked outside KVM_RUN), with `msr_indices` from [`crate::Hypervisor::msr_index_list`].
    pub fn save_state(&self, msr_indices: &[u32]) -> Result<VcpuState, HypervisorError> {
        let fd = &self.fd;
        let mp_state = fd.get_mp_state().map_err(self.err("KVM_GET_MP_STATE"))?;
        let cpuid = fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(self.err("KVM_GET_CPUID2"))?
            .as_slice()
            .to_vec();
        let regs = fd.get_regs().map_err(self.err("KVM_GET_REGS"))?;
        let sregs = fd.get_sregs().map_err(self.err("KVM_GET_SREGS"))?;
        let xsave = XsaveArea(
            fd.get_xsave()
                .map_err(self.err("KVM_GET_XSAVE"))?
                .region
                .to_vec(),
        );
        let xcrs = fd.get_xcrs().map_err(self.err("KVM_GET_XCRS"))?;
        let debugregs = fd.get_debug_regs().map_err(self.err("KVM_GET_DEBUGREGS"))?;
        let lapic = fd.get_lapic().map_err(self.err("KVM_GET_LAPIC"))?;
        let msrs = self.read_msrs(msr_indices)?;
        let events = fd
            .get_vcpu_events()
            .map_err(self.err("KVM_GET_VCPU_EVENTS"))?;
        Ok(VcpuState {
            version: STATE_VERSION,
            id: self.id,
            cpuid,
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debugregs,
            lapic,
            msrs,
            events,
            tsc_khz: self.tsc_khz(),
        })
    }

    /// Reads the MSRs of `indices` that KVM lets us read, skipping the others.
    fn read_msrs(&self, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, HypervisorError> {
        let mut out = Vec::with_capacity(indices.len());
        let mut rest = indices;
        while !rest.is_empty() {
            let take = rest.len().min(KVM_MAX_MSR_ENTRIES);
            let entries: Vec<kvm_msr_entry> = rest[..take]
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = Msrs::from_entries(&entries).map_err(|_| HypervisorError::Msrs {
                id: self.id,
                set: 0,
                wanted: take,
            })?;
            let got = self
                .fd
                .get_msrs(&mut msrs)
                .map_err(self.err("KVM_GET_MSRS"))?
                .min(take);
            out.extend_from_slice(&msrs.as_slice()[..got]);
            // KVM stops at the first MSR it cannot read: skip that one.
            let used = if got == take { take } else { got + 1 };
            rest = &rest[used..];
        }
        Ok(out)
    }

    /// Puts back a state [`Vcpu::save_state`] returned, on a new vCPU of a new VM.
    pub fn restore_state(&self, s: &VcpuState) -> Result<(), HypervisorError> {
        if s.version != STATE_VERSION {
            return Err(bad(format!(
                "vCPU state version {}, expected {STATE_VERSION}",
                s.version
            )));
        }
        if s.id != self.id {
            return Err(bad(format!(
                "vCPU state of vCPU {} for vCPU {}",
                s.id, self.id
            )));
        }
        if s.xsave.0.len() != XSAVE_WORDS {
            return Err(bad(format!("XSAVE area of {} words", s.xsave.0.len())));
        }
        let fd = &self.fd;
        let cpuid = CpuId::from_entries(&s.cpuid)
            .map_err(|_| bad(format!("{} CPUID entries", s.cpuid.len())))?;
        fd.set_cpuid2(&cpuid).map_err(self.err("KVM_SET_CPUID2"))?;
        fd.set_mp_state(s.mp_state)
            .map_err(self.err("KVM_SET_MP_STATE"))?;
        fd.set_regs(&s.regs).map_err(self.err("KVM_SET_REGS"))?;
        fd.set_sregs(&s.sregs).map_err(self.err("KVM_SET_SREGS"))?;
        let mut xsave = kvm_xsave::default();
        xsave.region.copy_from_slice(&s.xsave.0);
        // SAFETY: `xsave` is a whole `kvm_xsave` (the 4 KiB region, no extra part) that lives
        // across the call; KVM_SET_XSAVE reads only that region because KVM_CAP_XSAVE2 is never
        // enabled on our VMs.
        unsafe { fd.set_xsave(&xsave) }.map_err(self.err("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&s.xcrs).map_err(self.err("KVM_SET_XCRS"))?;
        fd.set_debug_regs(&s.debugregs)
            .map_err(self.err("KVM_SET_DEBUGREGS"))?;
        fd.set_lapic(&s.lapic).map_err(self.err("KVM_SET_LAPIC"))?;
        for chunk in s.msrs.chunks(KVM_MAX_MSR_ENTRIES) {
            let msrs = Msrs::from_entries(chunk).map_err(|_| HypervisorError::Msrs {
                id: self.id,
                set: 0,
                wanted: chunk.len(),
            })?;
            let set = fd.set_msrs(&msrs).map_err(self.err("KVM_SET_MSRS"))?;
            if let Some(refused) = chunk.get(set) {
                return Err(bad(format!(
                    "vCPU {}: KVM refused MSR {:#x}",
                    self.id, refused.index
                )));
            }
        }
        fd.set_vcpu_events(&s.events)
            .map_err(self.err("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

impl Vm {
    /// A second handle on `vcpu` (its descriptor duplicated), so another thread can read its
    /// state while the vCPU's own thread is parked outside KVM_RUN.
    pub fn vcpu_handle(&self, vcpu: &Vcpu) -> Result<Vcpu, HypervisorError> {
        use std::os::fd::AsRawFd;
        let err = |source| HypervisorError::Vcpu {
            id: vcpu.id,
            op: "dup",
            source,
        };
        // SAFETY: dup(2) of a descriptor this process owns (the vCPU's); the result is checked.
        let fd = unsafe { libc::dup(vcpu.fd.as_raw_fd()) };
        if fd < 0 {
            return Err(err(kvm_ioctls::Error::last()));
        }
        // SAFETY: `fd` is a fresh duplicate of a vCPU descriptor of this VM that nothing else
        // owns; the VcpuFd takes ownership of it (closing it on drop) and maps its own kvm_run.
        let fd = unsafe { self.fd.create_vcpu_from_rawfd(fd) }.map_err(err)?;
        Ok(Vcpu::new(vcpu.id, fd))
    }

    fn irqchip(&self, chip: u32) -> Result<kvm_irqchip, HypervisorError> {
        let mut c = kvm_irqchip {
            chip_id: chip,
            ..Default::default()
        };
        self.fd
            .get_irqchip(&mut c)
            .map_err(|source| HypervisorError::Vm {
                op: "KVM_GET_IRQCHIP",
                source,
            })?;
        Ok(c)
    }

    /// Reads the in-kernel PIC, IOAPIC, PIT and kvmclock (vCPUs paused).
    pub fn save_state(&self) -> Result<VmState, HypervisorError> {
        let err = |op| move |source| HypervisorError::Vm { op, source };
        Ok(VmState {
            version: STATE_VERSION,
            pic_master: self.irqchip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: self.irqchip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: self.irqchip(KVM_IRQCHIP_IOAPIC)?,
            pit: self.fd.get_pit2().map_err(err("KVM_GET_PIT2"))?,
            clock: self.fd.get_clock().map_err(err("KVM_GET_CLOCK"))?,
        })
    }

    /// Puts back [`Vm::save_state`]'s result, after the vCPUs' states: the guest's kvmclock
    /// continues from the saved value (it never goes backward, and the time the VM was not
    /// running is not counted).
    pub fn restore_state(&self, s: &VmState) -> Result<(), HypervisorError> {
        if s.version != STATE_VERSION {
            return Err(bad(format!(
                "VM state version {}, expected {STATE_VERSION}",
                s.version
            )));
        }
        let err = |op| move |source| HypervisorError::Vm { op, source };
        for (chip, want) in [
            (&s.pic_master, KVM_IRQCHIP_PIC_MASTER),
            (&s.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
            (&s.ioapic, KVM_IRQCHIP_IOAPIC),
        ] {
            if chip.chip_id != want {
                return Err(bad(format!(
                    "irqchip {} where {want} belongs",
                    chip.chip_id
                )));
            }
            self.fd.set_irqchip(chip).map_err(err("KVM_SET_IRQCHIP"))?;
        }
        self.fd.set_pit2(&s.pit).map_err(err("KVM_SET_PIT2"))?;
        // Only the clock value is given back; KVM refuses flags it does not take on SET.
        let clock = kvm_clock_data {
            clock: s.clock.clock,
            ..Default::default()
        };
        self.fd.set_clock(&clock).map_err(err("KVM_SET_CLOCK"))
    }
}
