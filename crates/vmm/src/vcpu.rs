//! The KVM_RUN loop of one vCPU, and the control that pauses and resumes all of them.
//!
//! Port I/O and MMIO go to the buses (MMIO: PCIe ECAM and PCI BARs); anything that ends the machine (triple fault, KVM system events,
//! failures) pulls the exit latch. To pause, [`VcpuControl`] flips the run state and kicks every
//! vCPU thread with `SIGRTMIN`: its handler sets KVM's immediate-exit flag for that thread, so a
//! kick that lands just before KVM_RUN is not lost; KVM_RUN returns EINTR and the loop parks.

use std::cell::Cell;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use ferro_hypervisor::{Vcpu, VmExit};

use crate::machine::{Buses, ExitLatch};
use crate::{ExitStatus, VmmError};

thread_local! {
    /// The immediate-exit flag of the vCPU running on this thread (null elsewhere).
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int) {
    let flag = IMMEDIATE_EXIT.with(Cell::get);
    if !flag.is_null() {
        // SAFETY: the pointer is this thread's vCPU `kvm_run.immediate_exit`, set by `run_vcpu`
        // before the vCPU first runs and valid for the thread's whole life (the Vcpu outlives
        // the loop); a volatile byte store is async-signal-safe.
        unsafe { flag.write_volatile(1) };
    }
}

/// The signal that kicks a vCPU thread out of KVM_RUN.
fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

/// Installs the kick handler (once per process), without SA_RESTART so KVM_RUN returns EINTR.
pub fn install_kick_handler() -> Result<(), VmmError> {
    // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; we set the handler
    // to a function with the C signature sigaction expects.
    let rc = unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = kick_handler as *const () as usize;
        libc::sigemptyset(&mut act.sa_mask);
        libc::sigaction(kick_signal(), &act, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(VmmError::io("cannot install the vCPU kick handler")(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunState {
    Running,
    Paused,
}

struct Shared {
    state: RunState,
    parked: usize,
    threads: Vec<libc::pthread_t>,
}

/// Pauses and resumes every vCPU of the VM.
pub struct VcpuControl {
    shared: Mutex<Shared>,
    changed: Condvar,
    count: usize,
}

impl VcpuControl {
    /// A control for `count` vCPUs, all running.
    pub fn new(count: usize) -> Self {
        Self {
            shared: Mutex::new(Shared {
                state: RunState::Running,
                parked: 0,
                threads: Vec::with_capacity(count),
            }),
            changed: Condvar::new(),
            count,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        // A poisoned lock means a vCPU thread panicked; the state itself is still consistent.
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn register_thread(&self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        self.lock().threads.push(me);
        self.changed.notify_all();
    }

    fn kick_all(&self, shared: &Shared) {
        for t in &shared.threads {
            // SAFETY: `t` is a live vCPU thread of this process (they never exit before the
            // process does, except when the VM is ending, when a failed kick is harmless).
            unsafe { libc::pthread_kill(*t, kick_signal()) };
        }
    }

    /// Stops every vCPU and waits until all are parked outside KVM_RUN.
    pub fn pause(&self, timeout: Duration) -> Result<(), VmmError> {
        let mut s = self.lock();
        s.state = RunState::Paused;
        let deadline = std::time::Instant::now() + timeout;
        while s.parked < self.count {
            self.kick_all(&s);
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(VmmError::Devices(format!(
                    "only {} of {} vCPUs paused in time",
                    s.parked, self.count
                )));
            }
            s = self
                .changed
                .wait_timeout(s, left.min(Duration::from_millis(10)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }

    /// Lets every vCPU run again.
    pub fn resume(&self) {
        self.lock().state = RunState::Running;
        self.changed.notify_all();
    }

    /// Whether the vCPUs are paused (or being paused).
    pub fn is_paused(&self) -> bool {
        self.lock().state == RunState::Paused
    }

    /// Called by a vCPU thread after KVM_RUN was interrupted: parks while paused.
    fn park_if_paused(&self, latch: &ExitLatch) {
        let mut s = self.lock();
        if s.state != RunState::Paused {
            return;
        }
        s.parked += 1;
        self.changed.notify_all();
        while s.state == RunState::Paused && !latch.is_set() {
            s = self
                .changed
                .wait_timeout(s, Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        s.parked -= 1;
    }
}

/// Runs `vcpu` until the VM ends.
pub fn run_vcpu(mut vcpu: Vcpu, bus: Arc<Buses>, latch: Arc<ExitLatch>, control: Arc<VcpuControl>) {
    let id = vcpu.id();
    IMMEDIATE_EXIT.with(|c| c.set(vcpu.immediate_exit_ptr()));
    control.register_thread();
    loop {
        match vcpu.run() {
            Ok(VmExit::IoOut { port, data, size }) => {
                // A `rep outs` delivers several accesses to the same port at once.
                for access in data.chunks(size) {
                    bus.pio.write(port, access);
                }
                if latch.is_set() {
                    return;
                }
            }
            Ok(VmExit::IoIn { port, data, size }) => {
                for access in data.chunks_mut(size) {
                    if !bus.pio.read(port, access) {
                        access.fill(0xff);
                    }
                }
            }
            // Unclaimed addresses read as all ones; writes to them are dropped.
            Ok(VmExit::MmioRead { addr, data }) => {
                if !bus.mmio.read(addr, data) {
                    data.fill(0xff);
                }
            }
            Ok(VmExit::MmioWrite { addr, data }) => {
                bus.mmio.write(addr, data);
            }
            Ok(VmExit::TripleFault) => {
                report_triple_fault(&vcpu);
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
                vcpu.set_immediate_exit(false);
                if latch.is_set() {
                    return;
                }
                control.park_if_paused(&latch);
                // Woken by the end of the VM (not a resume): never enter the guest again. A
                // migrated VM must not run on here for even one instruction.
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

/// One line on stderr with where `vcpu` was when the guest triple-faulted, so an operator (or a
/// lab log) can tell a guest bug from a VMM one without a debugger.
fn report_triple_fault(vcpu: &Vcpu) {
    let (Ok(r), Ok(s)) = (vcpu.regs(), vcpu.sregs()) else {
        eprintln!("ferro-vmm: vCPU {}: triple fault", vcpu.id());
        return;
    };
    // On AMD, KVM answers a shutdown intercept by re-initialising the vCPU (the VMCB is
    // undefined after one), so what is left to read is the reset state, not the fault's.
    if r.rip == 0xfff0 && s.cs.selector == 0xf000 {
        eprintln!(
            "ferro-vmm: vCPU {}: triple fault (registers not kept by this KVM)",
            vcpu.id()
        );
        return;
    }
    eprintln!(
        "ferro-vmm: vCPU {}: triple fault at rip={:#x} rsp={:#x} rflags={:#x} cs={:#x} \
         cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} idt={:#x}+{:#x}",
        vcpu.id(),
        r.rip,
        r.rsp,
        r.rflags,
        s.cs.selector,
        s.cr0,
        s.cr2,
        s.cr3,
        s.cr4,
        s.efer,
        s.idt.base,
        s.idt.limit
    );
}
