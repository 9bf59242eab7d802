//! virtio-rng (device type 4, virtio 1.2 section 5.4): one request queue; the driver posts
//! device-writable buffers and the device fills them with entropy from the host's
//! `getrandom(2)`. No feature bits, no configuration space.
//!
//! At most [`MAX_FILL`] bytes are written per request (the specification lets the device fill
//! less than offered); readable buffers in a request are ignored.

use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::chain::walk_chain;
use crate::{
    device_type, features, DeviceError, DeviceState, GuestMemory, Interrupt, SavedQueue,
    VirtioDevice,
};

/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most bytes of entropy per request.
pub const MAX_FILL: usize = 64 * 1024;

/// Saved state of virtio-rng: where its queue stands, when active.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// The request queue's progress (None when not activated).
    pub queue: Option<SavedQueue>,
}

struct Active {
    mem: GuestMemory,
    queue: Queue,
    interrupt: Arc<dyn Interrupt>,
}

/// The virtio-rng device.
pub struct Rng {
    active: Option<Active>,
    indirect: bool,
}

impl Rng {
    /// A device waiting for a driver.
    pub fn new() -> Self {
        Self {
            active: None,
            indirect: false,
        }
    }
}

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}

/// Fills `buf` from the host's entropy pool.
fn entropy(buf: &mut [u8]) -> Result<(), DeviceError> {
    getrandom::fill(buf).map_err(|e| DeviceError::Host(format!("getrandom: {e}")))
}

impl Active {
    /// Serves every request in the available ring; returns whether any was used.
    fn drain(&mut self, indirect: bool) -> Result<bool, DeviceError> {
        let ring = |what: String| DeviceError::Ring { queue: 0, what };
        let mut used_any = false;
        let mut buf = vec![0u8; 4096];
        loop {
            self.queue
                .disable_notification(&self.mem)
                .map_err(|e| ring(e.to_string()))?;
            loop {
                // A driver that publishes more than a ring's worth of new entries is broken.
                let avail = self
                    .queue
                    .avail_idx(&self.mem, Ordering::Acquire)
                    .map_err(|e| ring(e.to_string()))?;
                let pending = avail.0.wrapping_sub(self.queue.next_avail());
                if pending == 0 {
                    break;
                }
                if pending > self.queue.size() {
                    return Err(ring(format!(
                        "available index runs {pending} entries ahead of a ring of {}",
                        self.queue.size()
                    )));
                }
                let Some(chain) = self.queue.pop_descriptor_chain(&self.mem) else {
                    return Err(ring("available ring is outside guest memory".into()));
                };
                let head = chain.head_index();
                let segs = walk_chain(
                    &self.mem,
                    GuestAddress(self.queue.desc_table()),
                    self.queue.size(),
                    head,
                    indirect,
                )
                .map_err(|source| DeviceError::Chain { queue: 0, source })?;
                let mut written = 0usize;
                for s in segs.iter().filter(|s| s.write) {
                    let mut left = (s.len as usize).min(MAX_FILL - written);
                    let mut addr = s.addr;
                    while left > 0 {
                        let n = left.min(buf.len());
                        entropy(&mut buf[..n])?;
                        // walk_chain checked the whole buffer is guest memory.
                        self.mem
                            .write_slice(&buf[..n], addr)
                            .map_err(|e| ring(e.to_string()))?;
                        addr = GuestAddress(addr.0 + n as u64);
                        left -= n;
                        written += n;
                    }
                    if written >= MAX_FILL {
                        break;
                    }
                }
                fence(Ordering::Release);
                self.queue
                    .add_used(&self.mem, head, written as u32)
                    .map_err(|e| ring(e.to_string()))?;
                used_any = true;
            }
            if !self
                .queue
                .enable_notification(&self.mem)
                .map_err(|e| ring(e.to_string()))?
            {
                break;
            }
        }
        Ok(used_any)
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        0
    }

    fn ack_features(&mut self, features: u64) {
        self.indirect = features & features::RING_INDIRECT_DESC != 0;
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        interrupt: Arc<dyn Interrupt>,
    ) -> Result<(), DeviceError> {
        let queue = queues
            .into_iter()
            .next()
            .ok_or_else(|| DeviceError::Activate("no request queue".into()))?;
        self.active = Some(Active {
            mem,
            queue,
            interrupt,
        });
        Ok(())
    }

    fn queue_notified(&mut self, queue: u16) -> Result<(), DeviceError> {
        let indirect = self.indirect;
        let Some(a) = self.active.as_mut() else {
            return Ok(());
        };
        if queue != 0 || !a.queue.ready() {
            return Ok(());
        }
        if a.drain(indirect)? {
            let notify = a
                .queue
                .needs_notification(&a.mem)
                .map_err(|e| DeviceError::Ring {
                    queue: 0,
                    what: e.to_string(),
                })?;
            if notify {
                a.interrupt.signal_queue(0);
            }
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.indirect = false;
    }

    fn save(&self) -> DeviceState {
        DeviceState::Rng(RngState {
            queue: self.active.as_ref().map(|a| SavedQueue::of(&a.queue)),
        })
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), DeviceError> {
        #[allow(irrefutable_let_patterns)]
        let DeviceState::Rng(s) = state
        else {
            return Err(DeviceError::Restore("not a virtio-rng state".into()));
        };
        if let (Some(a), Some(q)) = (self.active.as_mut(), s.queue) {
            a.queue.set_next_avail(q.next_avail);
            a.queue.set_next_used(q.next_used);
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "rng_tests.rs"]
mod tests;
