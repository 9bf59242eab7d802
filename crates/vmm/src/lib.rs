//! `ferro-vmm`: one process that runs one x86_64 VM on KVM.
//!
//! The path from a [`ferro_api::VmConfig`] to a running guest:
//! [`builder::build`] allocates guest memory ([`memory`]), loads the kernel and initrd
//! ([`kernel`]), writes ACPI tables and boot structures, puts the legacy devices on the port bus
//! and the PCI root bus with its virtio devices on the MMIO bus ([`machine`], [`pci`],
//! [`mmio`]), starts the device event loop ([`event_loop`]) and creates the vCPUs;
//! [`runner::run`] starts one thread per vCPU ([`vcpu::run_vcpu`], the KVM_RUN loop) and waits in the event loop for the guest to power
//! off, reset, panic or for a signal.

pub mod builder;
pub mod console;
mod console_socket;
pub mod control;
pub mod devices_balloon;
pub mod devices_block;
pub mod devices_net;
pub mod devices_vsock;
pub mod error;
pub mod event_loop;
pub mod kernel;
pub mod machine;
pub mod memfile;
pub mod memory;
pub mod migration;
pub mod mmio;
pub mod pci;
pub mod runner;
pub mod snapshot;
pub mod teardown;
pub mod vcpu;

pub use error::{ExitStatus, VmmError};
