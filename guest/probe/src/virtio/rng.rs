//! virtio-rng (type 4): one request queue of device-writable buffers.

use super::queue::wr;
use super::{settle_irqs, wait_used};
use crate::devices::Ctx;
use crate::serial::Line;

/// Bytes asked for per request.
const CHUNK: u64 = 4096;

/// `rng=N`: reads N bytes of entropy; prints `rng_bytes=N rng_nonzero=C rng_irqs=I`.
pub fn run(c: &mut Ctx, n: u64) {
    let Some(v) = c.open("rng", 4, 0, 0) else {
        return;
    };
    let (Some(mut q), Some(buf)) = (v.queue(&mut c.dma, 0, 64), c.dma.alloc(CHUNK, 4096)) else {
        super::missing("rng", true);
        return v.reset();
    };
    v.driver_ok();
    let (mut got, mut nonzero) = (0u64, 0u64);
    while got < n {
        let want = (n - got).min(CHUNK);
        q.push(&[wr(buf, want as u32)]);
        q.kick();
        if !wait_used(&q, 20_000, 5_000_000_000) {
            Line::new().s("rng_timeout=").dec(got);
            break;
        }
        let Some((_, len)) = q.pop() else { break };
        let len = (len as u64).min(want);
        nonzero += crate::dma::slice(buf, len as usize)
            .iter()
            .filter(|&&b| b != 0)
            .count() as u64;
        got += len;
    }
    settle_irqs(&v);
    Line::new()
        .s("rng_bytes=")
        .dec(got)
        .s(" rng_nonzero=")
        .dec(nonzero)
        .s(" rng_irqs=")
        .dec(v.irqs() as u64);
    v.reset();
}
