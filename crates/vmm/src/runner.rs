//! Running a built VM: one thread per vCPU, and the event loop on the main thread that feeds
//! console input to COM1 and waits for the end (guest request, vCPU failure, SIGTERM/SIGINT).

use std::io::Read;
use std::os::fd::AsRawFd;

use crate::builder::BuiltVm;
use crate::console::{EscapeFilter, RawTerminal};
use std::sync::Arc;

use crate::vcpu::{install_kick_handler, run_vcpu, VcpuControl};
use crate::{ExitStatus, VmmError};

/// Stack size of a vCPU thread: the loop needs little, and 32 of them should stay small.
const VCPU_STACK: usize = 256 * 1024;

/// Blocks SIGTERM and SIGINT in this thread (and the threads it spawns) and returns a signalfd
/// that reports them instead.
fn signal_fd() -> Result<std::fs::File, VmmError> {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise and modify it in place.
    let set = unsafe {
        let mut set = std::mem::zeroed::<libc::sigset_t>();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        set
    };
    // SAFETY: `set` is an initialised sigset; the old mask is not wanted (null).
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(VmmError::Io {
            what: "cannot block signals",
            source: std::io::Error::from_raw_os_error(rc),
        });
    }
    // SAFETY: -1 asks for a new descriptor; `set` is initialised.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
    if fd < 0 {
        return Err(VmmError::io("signalfd")(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a new descriptor this function owns.
    Ok(unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// Runs the VM until it ends and returns how.
pub fn run(vm: BuiltVm, console_input: bool) -> Result<ExitStatus, VmmError> {
    let mut sigfd = signal_fd()?;
    install_kick_handler()?;
    let control = Arc::new(VcpuControl::new(vm.vcpus.len()));
    let BuiltVm {
        vcpus,
        machine,
        latch,
        vm,
        memory,
        hypervisor,
    } = vm;
    // Never dropped: tearing the VM down is left to the process exit (see teardown.rs).
    let _keep = std::mem::ManuallyDrop::new((vm, memory, hypervisor));
    for vcpu in vcpus {
        let bus = machine.bus.clone();
        let latch = latch.clone();
        let control = control.clone();
        std::thread::Builder::new()
            .name(format!("vcpu{}", vcpu.id()))
            .stack_size(VCPU_STACK)
            .spawn(move || run_vcpu(vcpu, bus, latch, control))
            .map_err(VmmError::io("cannot start a vCPU thread"))?;
    }

    let terminal = if console_input {
        Some(RawTerminal::enter())
    } else {
        None
    };
    let interactive = terminal.as_ref().is_some_and(RawTerminal::is_interactive);
    let mut stdin_open = console_input;
    let mut filter = EscapeFilter::default();
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        if let Some(status) = latch.status() {
            return Ok(status);
        }
        let mut fds = vec![
            libc::pollfd {
                fd: latch.event().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: sigfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // Only read more input when the guest has taken what we hold.
        if stdin_open && pending.is_empty() {
            fds.push(libc::pollfd {
                fd: 0,
                events: libc::POLLIN,
                revents: 0,
            });
        }
        let timeout = if pending.is_empty() { -1 } else { 5 };
        // SAFETY: `fds` is a live array of `fds.len()` pollfd structures.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(VmmError::io("poll")(e));
        }
        if fds[1].revents & libc::POLLIN != 0 {
            let mut info = [0u8; 128];
            if sigfd.read(&mut info).is_ok() {
                let signo = u32::from_ne_bytes([info[0], info[1], info[2], info[3]]);
                return Ok(if signo == libc::SIGINT as u32 {
                    ExitStatus::Interrupted
                } else {
                    ExitStatus::Terminated
                });
            }
        }
        if fds.len() > 2 && fds[2].revents & (libc::POLLIN | libc::POLLHUP) != 0 {
            // SAFETY: reads into `buf`, which is valid for `buf.len()` bytes.
            let got = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
            if got <= 0 {
                stdin_open = false;
            } else if interactive {
                if filter.feed(&buf[..got as usize], &mut pending) {
                    return Ok(ExitStatus::Interrupted);
                }
            } else {
                pending.extend_from_slice(&buf[..got as usize]);
            }
        }
        if !pending.is_empty() {
            let mut serial = machine
                .serial
                .lock()
                .map_err(|_| VmmError::Devices("serial device poisoned".into()))?;
            let taken = serial.enqueue_input(&pending);
            pending.drain(..taken);
        }
    }
}
