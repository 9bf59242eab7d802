//! What kind of KVM this host has, and the capabilities that matter to Ferrovisor.

use std::fmt::Write as _;
use std::path::Path;

use kvm_ioctls::{Cap, Kvm};

/// The kind of KVM behind /dev/kvm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKind {
    /// Hardware-assisted KVM (VT-x or AMD-V) on bare metal.
    Hardware,
    /// Hardware-assisted KVM inside a VM (nested virtualization).
    Nested,
    /// PVM: shadow-paging KVM without VT-x/AMD-V. Guest user mode runs natively; guest kernel
    /// mode is emulated and cannot run a stock Linux kernel.
    Pvm,
}

impl HostKind {
    /// Detects the kind from the loaded modules and the host CPU.
    pub fn detect() -> Self {
        let module = |m: &str| Path::new("/sys/module").join(m).exists();
        if module("kvm_pvm") {
            return Self::Pvm;
        }
        if host_has_hypervisor_bit() {
            Self::Nested
        } else {
            Self::Hardware
        }
    }

    /// A short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Hardware => "hardware",
            Self::Nested => "nested",
            Self::Pvm => "pvm",
        }
    }

    /// Whether a stock Linux kernel can run as a guest on this host.
    pub fn runs_stock_kernels(self) -> bool {
        !matches!(self, Self::Pvm)
    }
}

fn host_has_hypervisor_bit() -> bool {
    // CPUID is available on every x86_64 CPU.
    let leaf1 = std::arch::x86_64::__cpuid(1);
    leaf1.ecx & (1 << 31) != 0
}

fn vendor_module() -> &'static str {
    let m = |n: &str| Path::new("/sys/module").join(n).exists();
    if m("kvm_pvm") {
        "kvm_pvm"
    } else if m("kvm_intel") {
        "kvm_intel (VMX)"
    } else if m("kvm_amd") {
        "kvm_amd (SVM)"
    } else {
        "unknown"
    }
}

/// The host facts `ferro-vmm --host-info` prints.
#[derive(Debug, Clone)]
pub struct HostInfo {
    /// Kind of KVM.
    pub kind: HostKind,
    /// The vendor module behind /dev/kvm.
    pub module: &'static str,
    /// KVM_GET_API_VERSION.
    pub api_version: i32,
    /// Recommended and maximum vCPUs per VM.
    pub vcpus: (usize, usize),
    /// Capabilities Ferrovisor uses, with whether KVM has them.
    pub caps: Vec<(&'static str, bool)>,
}

impl HostInfo {
    pub(crate) fn collect(kvm: &Kvm, kind: HostKind) -> Self {
        let list: [(&'static str, Cap); 16] = [
            ("irqchip", Cap::Irqchip),
            ("pit2", Cap::Pit2),
            ("irqfd", Cap::Irqfd),
            ("ioeventfd", Cap::Ioeventfd),
            ("irq_routing", Cap::IrqRouting),
            ("signal_msi", Cap::SignalMsi),
            ("xsave", Cap::Xsave),
            ("xcrs", Cap::Xcrs),
            ("vcpu_events", Cap::VcpuEvents),
            ("mp_state", Cap::MpState),
            ("adjust_clock", Cap::AdjustClock),
            ("tsc_control", Cap::TscControl),
            ("tsc_deadline_timer", Cap::TscDeadlineTimer),
            ("immediate_exit", Cap::ImmediateExit),
            ("user_memory", Cap::UserMemory),
            ("readonly_mem", Cap::ReadonlyMem),
        ];
        Self {
            kind,
            module: vendor_module(),
            api_version: kvm.get_api_version(),
            vcpus: (kvm.get_nr_vcpus(), kvm.get_max_vcpus()),
            caps: list
                .iter()
                .map(|(n, c)| (*n, kvm.check_extension(*c)))
                .collect(),
        }
    }

    /// Human-readable report, one `key: value` per line.
    pub fn report(&self) -> String {
        let mut s = String::new();
        let what = match self.kind {
            HostKind::Hardware => "hardware KVM (VT-x/AMD-V)",
            HostKind::Nested => "nested KVM (hardware-assisted, inside a VM)",
            HostKind::Pvm => "PVM (software KVM without VT-x/AMD-V: guest kernels are emulated, stock Linux cannot boot; use the KVM lab)",
        };
        let _ = writeln!(s, "kvm: {what}");
        let _ = writeln!(s, "kind: {}", self.kind.name());
        let _ = writeln!(s, "module: {}", self.module);
        let _ = writeln!(s, "api_version: {}", self.api_version);
        let _ = writeln!(
            s,
            "vcpus: recommended {} max {}",
            self.vcpus.0, self.vcpus.1
        );
        for (name, present) in &self.caps {
            let _ = writeln!(s, "cap.{name}: {}", if *present { "yes" } else { "no" });
        }
        s
    }
}
