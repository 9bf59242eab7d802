//! The KVM_RUN loop of one vCPU: port I/O goes to the bus, and anything that ends the machine
//! (triple fault, KVM system events, failures) pulls the exit latch.

use std::sync::Arc;

use ferro_devices::PioBus;
use ferro_hypervisor::{Vcpu, VmExit};

use crate::machine::ExitLatch;
use crate::ExitStatus;

/// Runs `vcpu` until the VM ends.
pub fn run_vcpu(mut vcpu: Vcpu, bus: Arc<PioBus>, latch: Arc<ExitLatch>) {
    let id = vcpu.id();
    loop {
        match vcpu.run() {
            Ok(VmExit::IoOut { port, data }) => {
                bus.write(port, data);
                if latch.is_set() {
                    return;
                }
            }
            Ok(VmExit::IoIn { port, data }) => {
                if !bus.read(port, data) {
                    data.fill(0xff);
                }
            }
            // No MMIO devices yet: reads of unbacked addresses float high, writes are dropped.
            Ok(VmExit::MmioRead { data, .. }) => data.fill(0xff),
            Ok(VmExit::MmioWrite { .. }) => {}
            Ok(VmExit::TripleFault) => {
                latch.request(ExitStatus::TripleFault);
                return;
            }
            Ok(VmExit::PowerOff) | Ok(VmExit::Reset) => {
                latch.request(ExitStatus::Ok);
                return;
            }
            Ok(VmExit::Crash) => {
                latch.request(ExitStatus::GuestPanic);
                return;
            }
            Ok(VmExit::Interrupted) | Ok(VmExit::Halt) => {
                if latch.is_set() {
                    return;
                }
            }
            Ok(VmExit::Failed(why)) => {
                eprintln!("ferro-vmm: vCPU {id}: {why}");
                latch.request(ExitStatus::KvmFailure);
                return;
            }
            Err(e) => {
                eprintln!("ferro-vmm: {e}");
                latch.request(ExitStatus::KvmFailure);
                return;
            }
        }
    }
}
