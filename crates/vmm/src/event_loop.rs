//! The device event loop: one thread that waits (epoll) on every virtio queue's notification
//! eventfd — the ioeventfds KVM signals when the guest kicks a queue — and runs that queue's
//! processing, so requests are served off the vCPU threads and a kick costs the vCPU no exit;
//! and on each device's host-side fd (a tap, a set of sockets), when the device has one.
//!
//! Polling: while a device that offers a [`poll_counter`](ferro_virtio::VirtioDevice::poll_counter)
//! (virtio-blk) has requests in flight, the loop does not sleep in epoll at once but asks it
//! without waiting, for up to `POLL` after the last event, and for `POLL` more once the
//! last completion is in (the guest's next kick usually follows within tens of microseconds),
//! as QEMU's event loops do (`poll-max-ns`). A sleeping thread costs a wake-up per completion
//! and per kick; on a virtual host each one is an IPI through the host's own hypervisor: a
//! kick took 63 µs (p50) to reach the ring when the loop slept. A disk that stays idle costs
//! nothing: the loop sleeps as before.
//!
//! While it polls, the loop also reads the polled devices' available rings itself
//! ([`poll_queues`](ferro_virtio::VirtioDevice::poll_queues)) and the device keeps the driver's
//! kicks off meanwhile: on a host without hardware virtualization (PVM) a kick is a trapped
//! MMIO write the vCPU waits for. Before the loop sleeps it turns the kicks back on and looks at
//! the rings once more ([`poll_done`](ferro_virtio::VirtioDevice::poll_done)); a request found
//! then keeps it polling, so none is left waiting for a kick that will not come.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::pci::SharedVirtio;
use crate::VmmError;

/// Stack of the event loop thread.
const STACK: usize = 256 * 1024;

/// How long the loop keeps polling: while requests are in flight, after its last event;
/// once none are, after the last moment some were.
const POLL: Duration = Duration::from_micros(100);

/// What a readable fd means.
enum Kind {
    /// A queue kick (an ioeventfd): drained, then the queue is processed.
    Queue(EventFd, u16),
    /// The device's host side (tap, sockets): the device reads it itself.
    Host,
}

struct Source {
    kind: Kind,
    device: SharedVirtio,
}

/// Starts the event loop for `devices`; `None` when there is nothing to wait for. The thread
/// lives as long as the process.
pub fn start(devices: &[SharedVirtio]) -> Result<Option<JoinHandle<()>>, VmmError> {
    let mut sources = Vec::new();
    let mut raw = Vec::new();
    let mut pending = Vec::new();
    let mut polled = Vec::new();
    for dev in devices {
        let d = dev.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(counter) = d.poll_counter() {
            pending.push(counter);
            polled.push(dev.clone());
        }
        let fds = d
            .queue_events()
            .map_err(VmmError::io("cannot duplicate a queue eventfd"))?;
        for (q, fd) in fds.into_iter().enumerate() {
            raw.push(fd.as_raw_fd());
            sources.push(Source {
                kind: Kind::Queue(fd, q as u16),
                device: dev.clone(),
            });
        }
        // The device owns its host fd and keeps it open for as long as the device lives,
        // which is as long as this loop (both live until the process ends).
        if let Some(fd) = d.host_fd() {
            raw.push(fd);
            sources.push(Source {
                kind: Kind::Host,
                device: dev.clone(),
            });
        }
    }
    if sources.is_empty() {
        return Ok(None);
    }
    let epoll = Epoll::new().map_err(VmmError::io("epoll_create"))?;
    for (i, fd) in raw.iter().enumerate() {
        epoll
            .ctl(
                ControlOperation::Add,
                *fd,
                EpollEvent::new(EventSet::IN, i as u64),
            )
            .map_err(VmmError::io("epoll_ctl"))?;
    }
    let handle = std::thread::Builder::new()
        .name("virtio-events".into())
        .stack_size(STACK)
        .spawn(move || run(epoll, sources, pending, polled))
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

fn lock(d: &SharedVirtio) -> std::sync::MutexGuard<'_, ferro_virtio::VirtioPciDevice> {
    d.lock().unwrap_or_else(|e| e.into_inner())
}

fn run(
    epoll: Epoll,
    sources: Vec<Source>,
    pending: Vec<Arc<AtomicUsize>>,
    polled: Vec<SharedVirtio>,
) {
    block_exit_signals();
    let mut events = vec![EpollEvent::default(); sources.len()];
    // The last event handled, and the last time a device had completions due.
    let mut last = Instant::now();
    let mut busy: Option<Instant> = None;
    // Whether the loop has polled the devices' rings since it last turned kicks back on.
    let mut rings_polled = false;
    loop {
        // No clock reads at all for a VM without a polled device.
        let poll = !pending.is_empty() && {
            let now = Instant::now();
            let due = pending.iter().any(|p| p.load(Ordering::Relaxed) > 0);
            if due {
                busy = Some(now);
            }
            // With requests in flight: until POLL passes without an event (a slow disk is
            // waited for asleep). Once none are: POLL more, for the guest's next kick.
            if due {
                now.duration_since(last) < POLL
            } else {
                busy.is_some_and(|b| now.duration_since(b) < POLL)
            }
        };
        if !poll && rings_polled {
            // About to sleep: kicks back on first; what arrived meanwhile keeps us polling.
            rings_polled = false;
            let mut more = false;
            for d in &polled {
                more |= lock(d).poll_done();
            }
            if more {
                last = Instant::now();
                continue;
            }
        }
        let n = match epoll.wait(if poll { 0 } else { -1 }, &mut events) {
            Ok(0) if poll => {
                rings_polled = true;
                for d in &polled {
                    if lock(d).poll_queues() {
                        last = Instant::now();
                    }
                }
                std::hint::spin_loop();
                continue;
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                eprintln!("ferro-vmm: device event loop: {e}");
                return;
            }
        };
        if !pending.is_empty() {
            last = Instant::now();
        }
        for ev in &events[..n] {
            let Some(s) = usize::try_from(ev.data()).ok().and_then(|i| sources.get(i)) else {
                continue;
            };
            match &s.kind {
                Kind::Queue(fd, queue) => {
                    // Drain the counter; several kicks are served by one pass over the ring.
                    let _ = fd.read();
                    s.device
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .queue_event(*queue);
                }
                Kind::Host => s
                    .device
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .host_event(),
            }
        }
        // A polled device may turn kicks off when it posts completions (virtio-blk does):
        // they must be turned back on before the loop sleeps.
        rings_polled |= n > 0 && !polled.is_empty();
    }
}
