//! Errors of the VMM and the process exit statuses they map to.

use std::path::PathBuf;

use thiserror::Error;

/// How `ferro-vmm` ends. The numbers are part of its interface (the daemon and tests rely on them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum ExitStatus {
    /// The guest powered off or rebooted.
    Ok = 0,
    /// The VM could not be built or a host resource failed (bad input, no KVM, ...).
    Error = 1,
    /// A vCPU triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault = 2,
    /// The guest kernel panicked (pvpanic or a KVM crash event).
    GuestPanic = 3,
    /// KVM could not run the guest (entry failure, emulation failure).
    KvmFailure = 4,
    /// SIGINT stopped the VM (128 + 2).
    Interrupted = 130,
    /// SIGTERM stopped the VM (128 + 15).
    Terminated = 143,
}

/// Anything that stops a VM from being built or run.
#[derive(Debug, Error)]
pub enum VmmError {
    /// The configuration is out of range.
    #[error(transparent)]
    Config(#[from] ferro_api::ConfigError),
    /// KVM refused something.
    #[error(transparent)]
    Hypervisor(#[from] ferro_hypervisor::HypervisorError),
    /// A file given by the user could not be opened or read.
    #[error("cannot read {what} {path}: {source}")]
    ReadFile {
        /// "kernel" or "initrd".
        what: &'static str,
        /// The path given.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The kernel file is not a format we boot.
    #[error("{0} is not a kernel: expected an ELF (vmlinux or PVH) or a Linux bzImage")]
    NotAKernel(PathBuf),
    /// The kernel is recognised but could not be loaded.
    #[error("cannot load kernel {path}: {reason}")]
    KernelLoad {
        /// The path given.
        path: PathBuf,
        /// Why (from the loader).
        reason: String,
    },
    /// The command line is too long or contains a NUL.
    #[error("kernel command line is invalid: {0}")]
    Cmdline(String),
    /// Boot structures could not be written.
    #[error(transparent)]
    Boot(#[from] ferro_arch::boot::BootError),
    /// ACPI tables could not be written.
    #[error("cannot build ACPI tables: {0}")]
    Acpi(String),
    /// CPUID could not be configured.
    #[error("cannot configure CPUID: {0}")]
    Cpuid(String),
    /// Registers or page tables could not be set up.
    #[error(transparent)]
    Regs(#[from] ferro_arch::regs::RegsError),
    /// Guest memory could not be allocated.
    #[error("cannot allocate {mib} MiB of guest memory: {reason}")]
    Memory {
        /// Size asked.
        mib: u64,
        /// Why.
        reason: String,
    },
    /// A device could not be set up.
    #[error("cannot set up devices: {0}")]
    Devices(String),
    /// A snapshot could not be written or read.
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    /// A live migration failed (`--incoming`: one line, exit status 1).
    #[error("{0}")]
    Migration(String),
    /// A host I/O resource failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
}

impl VmmError {
    /// Shorthand for a host I/O failure.
    pub fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> Self {
        move |source| Self::Io { what, source }
    }
}
