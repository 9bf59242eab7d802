use super::*;
use crate::rng::Rng;
use crate::testutil::{Driver, QSIZE};
use crate::NO_VECTOR;

fn driver() -> Driver {
    Driver::new(Box::new(Rng::new()))
}

#[test]
fn pci_identity_and_capabilities() {
    let mut d = driver();
    let mut id = [0u8; 4];
    d.t.config_read(0, &mut id);
    assert_eq!(u32::from_le_bytes(id), 0x1044_1af4);
    assert_eq!(d.cfg8(8), 1, "revision 1: modern only");
    // Walk the list: common, notify, ISR, PCI_CFG (no device cfg for rng), MSI-X.
    let mut kinds = Vec::new();
    let mut p = d.cfg8(0x34) as u16;
    while p != 0 {
        if d.cfg8(p) == CAP_VENDOR {
            kinds.push(d.cfg8(p + 3));
            if d.cfg8(p + 3) == CAP_NOTIFY {
                assert_eq!(d.cfg8(p + 2), 20);
                assert_eq!(d.cfg8(p + 16), NOTIFY_OFF_MULTIPLIER as u8);
            }
        } else {
            kinds.push(0x80 | d.cfg8(p));
        }
        p = d.cfg8(p + 1) as u16;
    }
    assert_eq!(
        kinds,
        vec![CAP_COMMON, CAP_NOTIFY, CAP_ISR, CAP_PCI_CFG, 0x80 | 0x11]
    );
}

#[test]
fn features_and_version_1_is_mandatory() {
    let mut d = driver();
    d.w32(off::DEVICE_FEATURE_SELECT, 1);
    assert_eq!(d.r(off::DEVICE_FEATURE, 4), 1, "VERSION_1");
    d.w32(off::DEVICE_FEATURE_SELECT, 0);
    assert_eq!(
        d.r(off::DEVICE_FEATURE, 4),
        features::RING_EVENT_IDX | features::RING_INDIRECT_DESC
    );
    // Without VERSION_1 FEATURES_OK does not stick.
    assert_eq!(d.bring_up(0) & status::FEATURES_OK, 0);
    // Features the device did not offer are refused too.
    assert_eq!(d.bring_up(features::VERSION_1 | 1) & status::FEATURES_OK, 0);
    assert_ne!(d.bring_up(features::VERSION_1) & status::DRIVER_OK, 0);
}

#[test]
fn queue_registers() {
    let mut d = driver();
    assert_eq!(d.r(off::NUM_QUEUES, 2), 1);
    assert_eq!(d.r(off::QUEUE_SIZE, 2), u64::from(crate::rng::QUEUE_SIZE));
    d.w16(off::QUEUE_SIZE, 100);
    assert_eq!(d.r(off::QUEUE_SIZE, 2), 256, "not a power of two");
    d.w16(off::QUEUE_SIZE, 512);
    assert_eq!(d.r(off::QUEUE_SIZE, 2), 256, "above the maximum");
    d.w16(off::QUEUE_SIZE, QSIZE);
    d.w(off::QUEUE_DESC, &0x1234_5000u64.to_le_bytes());
    assert_eq!(d.r(off::QUEUE_DESC, 8), 0x1234_5000);
    d.w32(off::QUEUE_DESC + 4, 0x1);
    assert_eq!(d.r(off::QUEUE_DESC, 8), 0x1_1234_5000);
    assert_eq!(d.r(off::QUEUE_NOTIFY_OFF, 2), 0);
    // Vectors past the table read back as NO_VECTOR.
    d.w16(off::QUEUE_MSIX_VECTOR, 5);
    assert_eq!(d.r(off::QUEUE_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
    d.w16(off::QUEUE_MSIX_VECTOR, 1);
    assert_eq!(d.r(off::QUEUE_MSIX_VECTOR, 2), 1);
    // A queue that does not exist.
    d.w16(off::QUEUE_SELECT, 1);
    assert_eq!(d.r(off::QUEUE_SIZE, 2), 0);
    assert_eq!(d.r(off::QUEUE_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
    d.w16(off::QUEUE_ENABLE, 1);
    d.w16(off::QUEUE_MSIX_VECTOR, 0);
}

#[test]
fn reset_clears_everything_but_msix() {
    let mut d = driver();
    d.enable_msix();
    d.bring_up(features::VERSION_1);
    d.set_status(0);
    assert_eq!(d.status(), 0);
    assert_eq!(d.r(off::QUEUE_ENABLE, 2), 0);
    assert_eq!(d.r(off::CONFIG_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
    d.w32(off::DRIVER_FEATURE_SELECT, 1);
    assert_eq!(d.r(off::DRIVER_FEATURE, 4), 0);
    let mut e = [0u8; 4];
    d.t.bar_read(0, MSIX_TABLE_OFFSET, &mut e);
    assert_eq!(
        u32::from_le_bytes(e),
        0xfee0_0000,
        "MSI-X is PCI state, not virtio state"
    );
}

#[test]
fn no_msix_means_no_interrupts_but_the_device_works() {
    let mut d = driver();
    d.bring_up(features::VERSION_1);
    d.log.take();
    d.desc(0, crate::testutil::BUF, 16, crate::chain::DESC_F_WRITE, 0);
    d.publish(0);
    d.kick();
    assert_eq!(d.used_idx(), 1);
    assert!(d.log.take().is_empty());
    // The ISR still says a queue interrupt happened; reading clears it.
    assert_eq!(d.r(ISR_OFFSET, 1), 1);
    assert_eq!(d.r(ISR_OFFSET, 1), 0);
}

#[test]
fn notify_addresses_follow_bar0() {
    let mut d = driver();
    d.t.bar_moved(0, Some(0xc000_0000));
    assert_eq!(d.log.take(), vec!["ioeventfd 0xc0003000"]);
    d.t.bar_moved(0, None);
    assert_eq!(d.log.take(), vec!["no-ioeventfd 0xc0003000"]);
    d.t.bar_moved(0, Some(0xd000_0000));
    d.t.bar_moved(0, Some(0xd000_8000));
    assert_eq!(
        d.log.take(),
        vec![
            "ioeventfd 0xd0003000",
            "no-ioeventfd 0xd0003000",
            "ioeventfd 0xd000b000"
        ]
    );
}

#[test]
fn notify_write_without_ioeventfd_signals_the_eventfd() {
    let mut d = driver();
    let evs = d.t.queue_events().unwrap();
    d.w16(NOTIFY_OFFSET, 0);
    assert_eq!(evs[0].read().unwrap(), 1);
    d.w16(NOTIFY_OFFSET + 0x800, 0);
}

#[test]
fn pci_cfg_capability_reaches_bar0() {
    let mut d = driver();
    let c = d.t.pci_cfg_cap as u16;
    d.t.config_write(c + PCI_CFG_BAR as u16, &[0]);
    d.t.config_write(
        c + PCI_CFG_OFFSET as u16,
        &(off::NUM_QUEUES as u32).to_le_bytes(),
    );
    d.t.config_write(c + PCI_CFG_LENGTH as u16, &2u32.to_le_bytes());
    let mut v = [0u8; 4];
    d.t.config_read(c + PCI_CFG_DATA as u16, &mut v);
    assert_eq!(
        u16::from_le_bytes([v[0], v[1]]),
        1,
        "num_queues through the window"
    );
    d.t.config_write(
        c + PCI_CFG_OFFSET as u16,
        &(off::DEVICE_STATUS as u32).to_le_bytes(),
    );
    d.t.config_write(c + PCI_CFG_LENGTH as u16, &1u32.to_le_bytes());
    d.t.config_write(c + PCI_CFG_DATA as u16, &[status::ACKNOWLEDGE]);
    assert_eq!(d.status(), status::ACKNOWLEDGE);
}

#[test]
fn odd_bar_accesses_are_safe() {
    let mut d = driver();
    d.enable_msix();
    d.bring_up(features::VERSION_1);
    for off in [
        0u64,
        1,
        0x13,
        0x37,
        0x38,
        0xfff,
        0x1000,
        0x1001,
        0x2000,
        0x3000,
        0x3ffe,
        0x4000,
        0x5fff,
        0x6000,
        0x7fff,
        0x8000,
        u64::MAX - 3,
        u64::MAX,
    ] {
        for size in [0usize, 1, 2, 3, 4, 8, 16] {
            let mut b = vec![0xffu8; size];
            d.t.bar_read(0, off, &mut b);
            d.t.bar_read(1, off, &mut b);
            if off != 0x14 {
                d.t.bar_write(0, off, &b);
            }
            d.t.bar_write(2, off, &b);
        }
    }
    for off in [0u16, 0x3f, 0x40, 0xff, 0x100, 0xfff, u16::MAX] {
        for size in [0usize, 1, 2, 4, 8] {
            let mut b = vec![0xffu8; size];
            d.t.config_read(off, &mut b);
            d.t.config_write(off, &b);
        }
    }
}
