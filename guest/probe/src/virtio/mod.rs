//! virtio 1.x over PCI (modern transport only): the vendor capabilities (common, notify, ISR,
//! device configuration), reset and status, feature negotiation, split virtqueue set-up, and
//! MSI-X vectors. Everything here runs at CPL3.

pub mod balloon;
pub mod blk;
pub mod net;
pub mod queue;
pub mod rng;
pub mod vsock;

use crate::dma::Dma;
use crate::mmio::{r16, r32, r8, w16, w32, w64, w8};
use crate::msix::Msix;
use crate::pci::{Func, Pci};
use crate::serial::Line;
use queue::Queue;

/// VIRTIO_F_VERSION_1.
pub const F_VERSION_1: u64 = 1 << 32;

/// Device status bits.
const S_ACK: u8 = 1;
const S_DRIVER: u8 = 2;
const S_DRIVER_OK: u8 = 4;
const S_FEATURES_OK: u8 = 8;
const S_FAILED: u8 = 0x80;

// Common configuration structure offsets.
const DEV_FEAT_SEL: u64 = 0x00;
const DEV_FEAT: u64 = 0x04;
const DRV_FEAT_SEL: u64 = 0x08;
const DRV_FEAT: u64 = 0x0c;
const CONFIG_MSIX: u64 = 0x10;
const STATUS: u64 = 0x14;
const Q_SELECT: u64 = 0x16;
const Q_SIZE: u64 = 0x18;
const Q_MSIX: u64 = 0x1a;
const Q_ENABLE: u64 = 0x1c;
const Q_NOTIFY_OFF: u64 = 0x1e;
const Q_DESC: u64 = 0x20;
const Q_DRIVER: u64 = 0x28;
const Q_DEVICE: u64 = 0x30;

/// PCI device id of a modern virtio device of `kind` (virtio device type).
pub fn pci_id(kind: u16) -> u16 {
    0x1040 + kind
}

/// A virtio-pci function being driven.
pub struct Virtio {
    /// Common configuration.
    pub common: u64,
    /// Notification area and its queue multiplier.
    pub notify: u64,
    notify_mul: u32,
    /// ISR status byte.
    pub isr: u64,
    /// Device-specific configuration.
    pub cfg: u64,
    /// MSI-X table (size 0: none).
    pub msix: Msix,
    /// Device vector index (see `irq`): all MSI-X entries raise `IRQ_BASE + irq`.
    pub irq: usize,
    /// Negotiated features.
    pub features: u64,
}

/// The i-th function (in bus order) that is a modern virtio device of type `kind`.
pub fn find(funcs: &[Func], kind: u16, nth: usize) -> Option<(usize, Func)> {
    funcs
        .iter()
        .copied()
        .enumerate()
        .filter(|(_, f)| f.vendor == 0x1af4 && f.device == pci_id(kind))
        .nth(nth)
}

/// How many modern virtio functions of type `kind` there are.
pub fn count(funcs: &[Func], kind: u16) -> usize {
    funcs
        .iter()
        .filter(|f| f.vendor == 0x1af4 && f.device == pci_id(kind))
        .count()
}

impl Virtio {
    /// Locates the capabilities of `f`, enables MSI-X towards APIC `dest` on vector index `irq`,
    /// resets the device and negotiates: the device must offer VERSION_1; the driver takes
    /// `want & offered`. Leaves the device in FEATURES_OK (queues next, then `driver_ok`).
    pub fn open(pci: &Pci, f: &Func, dest: u32, irq: usize, want: u64) -> Option<Virtio> {
        let mut v = Virtio {
            common: 0,
            notify: 0,
            notify_mul: 0,
            isr: 0,
            cfg: 0,
            msix: Msix::default(),
            irq,
            features: 0,
        };
        for cap in pci.caps(f.dev, f.func, 0x09) {
            let kind = pci.r8(f.dev, f.func, cap + 3);
            let bar = pci.r8(f.dev, f.func, cap + 4) as usize;
            let off = pci.r32(f.dev, f.func, cap + 8) as u64;
            let len = pci.r32(f.dev, f.func, cap + 12) as u64;
            let Some(b) = f.bars.get(bar) else { continue };
            if b.size == 0 || off + len > b.size {
                continue;
            }
            let a = b.addr + off;
            match kind {
                1 if v.common == 0 => v.common = a,
                2 if v.notify == 0 => {
                    v.notify = a;
                    v.notify_mul = pci.r32(f.dev, f.func, cap + 16);
                }
                3 if v.isr == 0 => v.isr = a,
                4 if v.cfg == 0 => v.cfg = a,
                _ => {}
            }
        }
        if v.common == 0 || v.notify == 0 {
            return None;
        }
        v.msix = Msix::enable(pci, f, dest, crate::irq::IRQ_BASE + irq as u8).unwrap_or_default();
        w8(v.common + STATUS, 0);
        let mut n = 0;
        while r8(v.common + STATUS) != 0 && n < 1_000_000 {
            n += 1;
        }
        w8(v.common + STATUS, S_ACK);
        w8(v.common + STATUS, S_ACK | S_DRIVER);
        let mut offered = 0u64;
        for sel in 0..2u32 {
            w32(v.common + DEV_FEAT_SEL, sel);
            offered |= (r32(v.common + DEV_FEAT) as u64) << (32 * sel);
        }
        if offered & F_VERSION_1 == 0 {
            w8(v.common + STATUS, S_FAILED);
            return None;
        }
        v.features = offered & (want | F_VERSION_1);
        for sel in 0..2u32 {
            w32(v.common + DRV_FEAT_SEL, sel);
            w32(v.common + DRV_FEAT, (v.features >> (32 * sel)) as u32);
        }
        w8(v.common + STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
        if r8(v.common + STATUS) & S_FEATURES_OK == 0 {
            w8(v.common + STATUS, S_FAILED);
            return None;
        }
        if v.msix.size != 0 {
            w16(v.common + CONFIG_MSIX, 0);
        }
        Some(v)
    }

    /// Sets up queue `idx` with at most `max` descriptors (rounded down to a power of two) and
    /// its MSI-X vector, and enables it.
    pub fn queue(&self, dma: &mut Dma, idx: u16, max: u16) -> Option<Queue> {
        w16(self.common + Q_SELECT, idx);
        let dev_max = r16(self.common + Q_SIZE);
        if dev_max == 0 || dev_max == u16::MAX {
            return None;
        }
        let want = dev_max.min(max.max(1));
        let size = 1u16 << (15 - want.leading_zeros());
        let mut q = Queue::alloc(dma, idx, size)?;
        w16(self.common + Q_SIZE, size);
        w64(self.common + Q_DESC, q.desc);
        w64(self.common + Q_DRIVER, q.avail);
        w64(self.common + Q_DEVICE, q.used);
        if self.msix.size != 0 {
            let entry = if self.msix.size > 1 + idx { 1 + idx } else { 0 };
            w16(self.common + Q_MSIX, entry);
        }
        let off = r16(self.common + Q_NOTIFY_OFF) as u64;
        q.notify = self.notify + off * self.notify_mul as u64;
        w16(self.common + Q_ENABLE, 1);
        Some(q)
    }

    /// Sets DRIVER_OK: the device is live.
    pub fn driver_ok(&self) {
        w8(
            self.common + STATUS,
            S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
        );
    }

    /// Resets the device (stops all DMA into the probe's memory).
    pub fn reset(&self) {
        w8(self.common + STATUS, 0);
        let mut n = 0;
        while r8(self.common + STATUS) != 0 && n < 1_000_000 {
            n += 1;
        }
    }

    /// Interrupts taken on this device's vector so far.
    pub fn irqs(&self) -> u32 {
        crate::irq::count(self.irq)
    }

    /// Device configuration accessors.
    pub fn cfg8(&self, off: u64) -> u8 {
        r8(self.cfg + off)
    }
    /// Device configuration, 32 bits.
    pub fn cfg32(&self, off: u64) -> u32 {
        r32(self.cfg + off)
    }
    /// Device configuration, 64 bits (two 32-bit reads, as the spec allows; retried when the
    /// configuration generation changes in between).
    pub fn cfg64(&self, off: u64) -> u64 {
        loop {
            let g = r8(self.common + 0x15);
            let v = r32(self.cfg + off) as u64 | (r32(self.cfg + off + 4) as u64) << 32;
            if r8(self.common + 0x15) == g {
                return v;
            }
        }
    }
    /// Writes device configuration, 32 bits.
    pub fn cfg_w32(&self, off: u64, v: u32) {
        w32(self.cfg + off, v);
    }
}

/// Waits until `q` has a used chain: spins at CPL3 for `spin_ns`, then sleeps in the kernel
/// until an interrupt (the device's MSI-X, or the timer tick) and checks again, up to
/// `timeout_ns` in all. Returns whether a used chain is there.
pub fn wait_used(q: &Queue, spin_ns: u64, timeout_ns: u64) -> bool {
    wait(q, spin_ns, timeout_ns, false)
}

/// [`wait_used`] for a polling driver: the device is asked not to interrupt while the CPU
/// spins, and to interrupt again (checked once more after asking) before it sleeps. The
/// queue may stay quiet on return, for the next wait: the caller ends with `q.quiet(false)`.
pub fn wait_used_polled(q: &Queue, spin_ns: u64, timeout_ns: u64) -> bool {
    wait(q, spin_ns, timeout_ns, true)
}

fn wait(q: &Queue, spin_ns: u64, timeout_ns: u64, polled: bool) -> bool {
    let t0 = crate::kvmclock::now_ns();
    let clock = crate::kvmclock::enabled();
    let mut sleeps = 0u64;
    let mut quiet = polled;
    if quiet {
        q.quiet(true);
    }
    loop {
        if q.has_used() {
            return true;
        }
        let dt = crate::kvmclock::now_ns() - t0;
        if !clock || !crate::devices::IRQ_OK.load(core::sync::atomic::Ordering::Acquire) {
            if quiet {
                quiet = false;
                q.quiet(false);
                continue;
            }
            sleeps += 1;
            if sleeps > timeout_ns / 1_000_000 + 1 {
                return q.has_used();
            }
            idle();
            continue;
        }
        if dt > timeout_ns {
            return q.has_used();
        }
        if dt > spin_ns && crate::devices::IRQ_OK.load(core::sync::atomic::Ordering::Acquire) {
            if quiet {
                quiet = false;
                q.quiet(false);
                continue;
            }
            crate::trap::wait_for_irq();
        } else {
            crate::cpu::pause();
        }
    }
}

/// One idle step at CPL3: sleep until the next interrupt when interrupts work (at most a timer
/// tick, ~1 ms), else a short spin.
pub fn idle() {
    if crate::devices::IRQ_OK.load(core::sync::atomic::Ordering::Acquire) {
        crate::trap::wait_for_irq();
    } else {
        for _ in 0..100_000 {
            crate::cpu::pause();
        }
    }
}

/// Lets interrupts that became pending while user mode ran (IF clear) be taken: sleeps up to
/// 20 times (timer ticks) while the device's count is still 0.
pub fn settle_irqs(v: &Virtio) {
    for _ in 0..20 {
        if v.irqs() != 0 || !crate::devices::IRQ_OK.load(core::sync::atomic::Ordering::Acquire) {
            return;
        }
        crate::trap::wait_for_irq();
    }
}

/// Prints `<name>=none` when a requested device is missing, or `<name>=init_failed`.
pub fn missing(name: &str, found: bool) {
    Line::new()
        .s(name)
        .s(if found { "=init_failed" } else { "=none" });
}
