//! The device event loop: one thread that waits (epoll) on every virtio queue's notification
//! eventfd — the ioeventfds KVM signals when the guest kicks a queue — and runs that queue's
//! processing, so requests are served off the vCPU threads and a kick costs the vCPU no exit.

use std::os::fd::AsRawFd;
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::pci::SharedVirtio;
use crate::VmmError;

/// Stack of the event loop thread.
const STACK: usize = 256 * 1024;

struct Source {
    fd: EventFd,
    device: SharedVirtio,
    queue: u16,
}

/// Starts the event loop for `devices`; `None` when there is nothing to wait for. The thread
/// lives as long as the process.
pub fn start(devices: &[SharedVirtio]) -> Result<Option<JoinHandle<()>>, VmmError> {
    let mut sources = Vec::new();
    for dev in devices {
        let fds = dev
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .queue_events()
            .map_err(VmmError::io("cannot duplicate a queue eventfd"))?;
        for (q, fd) in fds.into_iter().enumerate() {
            sources.push(Source {
                fd,
                device: dev.clone(),
                queue: q as u16,
            });
        }
    }
    if sources.is_empty() {
        return Ok(None);
    }
    let epoll = Epoll::new().map_err(VmmError::io("epoll_create"))?;
    for (i, s) in sources.iter().enumerate() {
        epoll
            .ctl(
                ControlOperation::Add,
                s.fd.as_raw_fd(),
                EpollEvent::new(EventSet::IN, i as u64),
            )
            .map_err(VmmError::io("epoll_ctl"))?;
    }
    let handle = std::thread::Builder::new()
        .name("virtio-events".into())
        .stack_size(STACK)
        .spawn(move || run(epoll, sources))
        .map_err(VmmError::io("cannot start the device event loop"))?;
    Ok(Some(handle))
}

/// Keeps SIGTERM and SIGINT away from this thread: the main thread takes them via signalfd.
fn block_exit_signals() {
    // SAFETY: sigset_t is plain data that sigemptyset/sigaddset initialise in place, and
    // pthread_sigmask only reads the initialised set (the old mask is not wanted: null).
    unsafe {
        let mut set = std::mem::zeroed::<libc::sigset_t>();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

fn run(epoll: Epoll, sources: Vec<Source>) {
    block_exit_signals();
    let mut events = vec![EpollEvent::default(); sources.len()];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                eprintln!("ferro-vmm: device event loop: {e}");
                return;
            }
        };
        for ev in &events[..n] {
            let Some(s) = usize::try_from(ev.data()).ok().and_then(|i| sources.get(i)) else {
                continue;
            };
            // Drain the counter; several kicks are served by one pass over the ring.
            let _ = s.fd.read();
            s.device
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .queue_event(s.queue);
        }
    }
}
