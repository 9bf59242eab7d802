//! kvmclock (pvclock): nanoseconds since VM start, readable at CPL0 and CPL3 alike.

use crate::cpu::{cpuid, rdtsc, wrmsr};
use core::cell::UnsafeCell;
use core::sync::atomic::{fence, AtomicBool, Ordering};

const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
const MSR_KVM_SYSTEM_TIME: u32 = 0x12;

/// `struct pvclock_vcpu_time_info`.
#[repr(C, align(64))]
struct Pvclock {
    version: u32,
    pad0: u32,
    tsc_timestamp: u64,
    system_time: u64,
    tsc_to_system_mul: u32,
    tsc_shift: i8,
    flags: u8,
    pad: [u8; 2],
}

struct Shared(UnsafeCell<Pvclock>);
// SAFETY: the hypervisor writes the structure and the probe only reads it with volatile loads
// under the version protocol; the BSP is the only CPU that registers or reads it.
unsafe impl Sync for Shared {}

static PVCLOCK: Shared = Shared(UnsafeCell::new(Pvclock {
    version: 0,
    pad0: 0,
    tsc_timestamp: 0,
    system_time: 0,
    tsc_to_system_mul: 0,
    tsc_shift: 0,
    flags: 0,
    pad: [0; 2],
}));
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether the hypervisor is KVM (CPUID 0x40000000 signature "KVMKVMKVM\0\0\0").
pub fn is_kvm() -> bool {
    let (_, b, c, d) = cpuid(0x4000_0000, 0);
    b == u32::from_le_bytes(*b"KVMK")
        && c == u32::from_le_bytes(*b"VMKV")
        && d == u32::from_le_bytes(*b"M\0\0\0")
}

/// Registers the pvclock page with KVM if the CPU offers kvmclock. Returns whether it did.
pub fn init() -> bool {
    if !is_kvm() {
        return false;
    }
    let (features, ..) = cpuid(0x4000_0001, 0);
    let msr = if features & (1 << 3) != 0 {
        MSR_KVM_SYSTEM_TIME_NEW
    } else if features & 1 != 0 {
        MSR_KVM_SYSTEM_TIME
    } else {
        return false;
    };
    wrmsr(msr, PVCLOCK.0.get() as u64 | 1);
    // KVM fills the structure before the next entry into the guest; check it did.
    let p = PVCLOCK.0.get();
    // SAFETY: volatile reads of fields of the aligned static the hypervisor just wrote.
    let ok = unsafe {
        core::ptr::addr_of!((*p).version).read_volatile() != 0
            || core::ptr::addr_of!((*p).tsc_to_system_mul).read_volatile() != 0
    };
    ENABLED.store(ok, Ordering::Release);
    ok
}

/// Whether kvmclock is registered.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Acquire)
}

/// Nanoseconds of kvmclock (0 if not enabled). Safe to call at CPL3: it only reads the
/// (user-mapped) pvclock structure and the TSC.
#[inline(never)]
pub fn now_ns() -> u64 {
    if !enabled() {
        return 0;
    }
    let p = PVCLOCK.0.get();
    loop {
        // SAFETY: volatile reads of the aligned static under the version protocol.
        let (v0, ts, sys, mul, shift) = unsafe {
            let v0 = core::ptr::addr_of!((*p).version).read_volatile();
            fence(Ordering::Acquire);
            (
                v0,
                core::ptr::addr_of!((*p).tsc_timestamp).read_volatile(),
                core::ptr::addr_of!((*p).system_time).read_volatile(),
                core::ptr::addr_of!((*p).tsc_to_system_mul).read_volatile(),
                core::ptr::addr_of!((*p).tsc_shift).read_volatile(),
            )
        };
        let tsc = rdtsc();
        fence(Ordering::Acquire);
        // SAFETY: as above.
        let v1 = unsafe { core::ptr::addr_of!((*p).version).read_volatile() };
        if v0 & 1 != 0 || v0 != v1 {
            continue;
        }
        let mut delta = tsc.wrapping_sub(ts);
        if shift < 0 {
            delta >>= (-shift) as u32;
        } else {
            delta <<= shift as u32;
        }
        return sys.wrapping_add(((delta as u128 * mul as u128) >> 32) as u64);
    }
}
