//! x86_64 machine model for Ferrovisor: where things live in guest memory, how CPUs are described
//! (CPUID, MSRs, registers at entry), how kernels are entered (PVH and the Linux boot protocol) and
//! the ACPI tables that describe the machine.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod memory_map;
pub mod regs;
