//! virtio-rng through the PCI transport, driven like Linux drives it, and every hostile
//! descriptor case: the device must set DEVICE_NEEDS_RESET, raise a configuration interrupt
//! and stay quiet until reset, after which it works again.

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::chain::{DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};
use crate::status;
use crate::testutil::{Driver, BUF, DESC, QSIZE};

fn rng_driver() -> Driver {
    let mut d = Driver::new(Box::new(Rng::new()));
    d.enable_msix();
    let s = d.bring_up(Driver::default_features() | features::RING_EVENT_IDX);
    assert_eq!(s & status::DRIVER_OK, status::DRIVER_OK);
    d.log.take();
    d
}

/// One good request works (the device is healthy before and after a hostile case).
fn serve_one(d: &mut Driver) {
    d.mem.write_slice(&[0u8; 64], GuestAddress(BUF)).unwrap();
    d.desc(0, BUF, 64, DESC_F_WRITE, 0);
    let before = d.used_idx();
    d.publish(0);
    d.kick();
    assert_eq!(d.used_idx(), before.wrapping_add(1));
    assert_eq!(d.used(before), (0, 64));
    let mut got = [0u8; 64];
    d.mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
    assert_ne!(got, [0u8; 64], "64 bytes of entropy are not all zero");
}

#[test]
fn fills_requests_and_interrupts() {
    let mut d = rng_driver();
    serve_one(&mut d);
    assert_eq!(d.log.take(), vec!["signal 1"]);
    // Two chained writable buffers: both filled, total reported.
    d.desc(2, BUF, 8, DESC_F_WRITE | DESC_F_NEXT, 5);
    d.desc(5, BUF + 0x100, 24, DESC_F_WRITE, 0);
    d.publish(2);
    d.kick();
    assert_eq!(d.used(1), (2, 32));
    assert_eq!(d.t.status() & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn huge_buffers_are_filled_up_to_the_cap() {
    let mut d = rng_driver();
    d.desc(0, BUF, 0x8_0000, DESC_F_WRITE, 0);
    d.publish(0);
    d.kick();
    assert_eq!(d.used(0), (0, MAX_FILL as u32));
}

#[test]
fn readable_buffers_are_ignored() {
    let mut d = rng_driver();
    d.desc(0, BUF, 16, 0, 0);
    d.publish(0);
    d.kick();
    assert_eq!(d.used(0), (0, 0));
}

/// Runs one hostile case: the device must ask for a reset and raise the config vector (0),
/// leave the used ring alone, ignore further kicks, and recover after a reset.
fn hostile(setup: impl FnOnce(&mut Driver)) {
    let mut d = rng_driver();
    serve_one(&mut d);
    d.log.take();
    let used = d.used_idx();
    setup(&mut d);
    d.kick();
    assert_ne!(
        d.status() & status::DEVICE_NEEDS_RESET,
        0,
        "{:?}",
        d.t.last_error()
    );
    assert_eq!(d.log.take(), vec!["signal 0"], "config interrupt");
    assert_eq!(d.used_idx(), used, "nothing used");
    d.kick();
    assert!(d.log.take().is_empty(), "a broken device stays quiet");
    // The driver resets and brings the device up again; it works.
    let s = d.bring_up(Driver::default_features());
    assert_eq!(s & status::DEVICE_NEEDS_RESET, 0);
    d.mem
        .write_obj(0u16, GuestAddress(crate::testutil::USED + 2))
        .unwrap();
    serve_one(&mut d);
}

#[test]
fn chain_outside_guest_memory() {
    hostile(|d| {
        d.desc(1, 0xf_ff00, 0x200, DESC_F_WRITE, 0);
        d.publish(1);
    });
}

#[test]
fn buffer_address_wraps() {
    hostile(|d| {
        d.desc(1, u64::MAX - 8, 64, DESC_F_WRITE, 0);
        d.publish(1);
    });
}

#[test]
fn chain_loops() {
    hostile(|d| {
        d.desc(1, BUF, 8, DESC_F_WRITE | DESC_F_NEXT, 2);
        d.desc(2, BUF, 8, DESC_F_WRITE | DESC_F_NEXT, 1);
        d.publish(1);
    });
}

#[test]
fn chain_loops_on_itself() {
    hostile(|d| {
        d.desc(3, BUF, 8, DESC_F_WRITE | DESC_F_NEXT, 3);
        d.publish(3);
    });
}

#[test]
fn chain_longer_than_the_queue() {
    hostile(|d| {
        // QSIZE descriptors chained in order, the last pointing past the table.
        for i in 0..QSIZE {
            d.desc(i, BUF, 1, DESC_F_WRITE | DESC_F_NEXT, i + 1);
        }
        d.publish(0);
    });
}

#[test]
fn head_index_past_the_queue() {
    hostile(|d| d.publish(QSIZE + 3));
}

#[test]
fn absurd_length() {
    hostile(|d| {
        d.desc(1, BUF, u32::MAX, DESC_F_WRITE, 0);
        d.publish(1);
    });
}

#[test]
fn avail_index_runs_ahead() {
    hostile(|d| {
        let idx = d.avail_idx.wrapping_add(QSIZE + 1);
        d.set_avail_idx(idx);
    });
}

#[test]
fn nested_indirect_table() {
    hostile(|d| {
        crate::chain::tests::put(&d.mem, 0x8000, 0, 0x8000, 16, DESC_F_INDIRECT, 0);
        d.desc(1, 0x8000, 16, DESC_F_INDIRECT, 0);
        d.publish(1);
    });
}

#[test]
fn descriptor_table_moved_outside_memory_is_refused_at_driver_ok() {
    let mut d = Driver::new(Box::new(Rng::new()));
    d.enable_msix();
    d.set_status(status::ACKNOWLEDGE | status::DRIVER);
    d.w32(crate::transport_regs::off::DRIVER_FEATURE_SELECT, 1);
    d.w32(crate::transport_regs::off::DRIVER_FEATURE, 1);
    d.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
    d.w32(crate::transport_regs::off::QUEUE_DESC, 0xfff0_0000);
    d.w16(crate::transport_regs::off::QUEUE_ENABLE, 1);
    d.log.take();
    d.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK);
    assert_ne!(d.status() & status::DEVICE_NEEDS_RESET, 0);
    assert!(d.t.last_error().unwrap().contains("guest memory"));
    let _ = DESC;
}

#[test]
fn device_level_save_restore() {
    let mut d = rng_driver();
    serve_one(&mut d);
    let saved = d.t.save();
    let json = serde_json::to_string(&saved).unwrap();
    let back: crate::VirtioPciState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, saved);
    let DeviceState::Rng(ref r) = saved.device else {
        panic!("not an rng state")
    };
    assert_eq!(r.queue.unwrap().next_avail, 1);
    // A fresh transport restored from it continues where the first stopped.
    let mut e = Driver::new(Box::new(Rng::new()));
    e.mem = d.mem.clone();
    let mut t = crate::VirtioPciDevice::new(
        Box::new(Rng::new()),
        d.mem.clone(),
        e.log.clone(),
        e.log.clone(),
    )
    .unwrap();
    t.restore(&saved).unwrap();
    assert_eq!(t.save(), saved);
    e.t = t;
    e.avail_idx = 1;
    serve_one(&mut e);
}
