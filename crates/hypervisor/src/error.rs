use thiserror::Error;

/// A KVM operation that failed.
#[derive(Debug, Error)]
pub enum HypervisorError {
    /// /dev/kvm does not exist.
    #[error("/dev/kvm does not exist: this host has no KVM (load kvm_intel, kvm_amd or kvm_pvm)")]
    NoKvm,
    /// /dev/kvm exists but may not be opened by this user.
    #[error("no permission to open /dev/kvm: run as root or add this user to the 'kvm' group")]
    KvmPermission,
    /// /dev/kvm could not be opened for another reason.
    #[error("cannot open /dev/kvm: {0}")]
    Open(kvm_ioctls::Error),
    /// The KVM API version is not the stable one.
    #[error("unsupported KVM API version {0} (expected 12)")]
    ApiVersion(i32),
    /// KVM_GET_SUPPORTED_CPUID failed.
    #[error("cannot read supported CPUID: {0}")]
    Cpuid(kvm_ioctls::Error),
    /// KVM_CREATE_VM failed.
    #[error("cannot create VM: {0}")]
    CreateVm(kvm_ioctls::Error),
    /// A VM-level ioctl failed.
    #[error("{op} failed: {source}")]
    Vm {
        /// What was being done.
        op: &'static str,
        /// The error from KVM.
        source: kvm_ioctls::Error,
    },
    /// A vCPU-level ioctl failed.
    #[error("vCPU {id}: {op} failed: {source}")]
    Vcpu {
        /// The vCPU index.
        id: u32,
        /// What was being done.
        op: &'static str,
        /// The error from KVM.
        source: kvm_ioctls::Error,
    },
    /// KVM accepted fewer MSRs than were given.
    #[error("vCPU {id}: KVM accepted only {set} of {wanted} MSRs")]
    Msrs {
        /// The vCPU index.
        id: u32,
        /// How many were accepted.
        set: usize,
        /// How many were given.
        wanted: usize,
    },
    /// A saved state does not fit this VM or vCPU.
    #[error("saved state: {0}")]
    State(String),
}

impl HypervisorError {
    pub(crate) fn open(e: kvm_ioctls::Error) -> Self {
        match e.errno() {
            libc::ENOENT | libc::ENODEV | libc::ENXIO => Self::NoKvm,
            libc::EACCES | libc::EPERM => Self::KvmPermission,
            _ => Self::Open(e),
        }
    }
}
