//! virtio-balloon: target and actual, inflation discards exactly the guest's pages (merged
//! into runs), deflation, statistics, and the hostile cases.

use super::*;
use crate::chain::{ChainError, DESC_F_NEXT};
use crate::test_rig::{readable, Rig, BUF};

#[derive(Default)]
struct Log(Mutex<Vec<(u64, u64)>>);

impl PageReclaim for Log {
    fn discard(&self, addr: GuestAddress, len: u64) -> std::io::Result<()> {
        self.0.lock().unwrap().push((addr.0, len));
        Ok(())
    }
}

struct T {
    dev: Balloon,
    rig: Rig,
    log: Arc<Log>,
    h: BalloonHandle,
}

fn setup() -> T {
    let log = Arc::new(Log::default());
    let mut dev = Balloon::new(0, log.clone()).unwrap();
    let h = dev.handle();
    let rig = Rig::new(3, 16);
    dev.ack_features(features::VERSION_1 | feature::STATS_VQ);
    dev.activate(rig.mem.clone(), rig.queues(false), rig.irq())
        .unwrap();
    T { dev, rig, log, h }
}

fn pfns(t: &T, at: u64, list: &[u32]) -> u32 {
    let b: Vec<u8> = list.iter().flat_map(|p| p.to_le_bytes()).collect();
    t.rig.write(at, &b);
    b.len() as u32
}

#[test]
fn target_and_actual_in_the_config() {
    let mut t = setup();
    t.rig.irq.take();
    t.h.set_target(1234);
    assert_eq!(t.rig.irq.take(), vec!["config"]);
    let mut c = [0u8; 8];
    t.dev.read_config(0, &mut c);
    assert_eq!(u32::from_le_bytes([c[0], c[1], c[2], c[3]]), 1234);
    t.dev.write_config(4, &77u32.to_le_bytes());
    assert_eq!(t.h.actual(), 77);
    // The target is the device's: writes to it are ignored, as are odd sizes.
    t.dev.write_config(0, &5u32.to_le_bytes());
    t.dev.write_config(4, &[1, 2]);
    assert_eq!((t.h.target(), t.h.actual()), (1234, 77));
    let mut far = [9u8; 3];
    t.dev.read_config(u64::MAX, &mut far);
    assert_eq!(far, [0; 3]);
}

#[test]
fn inflation_discards_the_pages_in_runs() {
    let mut t = setup();
    // Pages 0x200..0x203 and 0x300, one PFN far outside memory.
    let n = pfns(&t, BUF, &[0x200, 0x201, 0x202, 0x300, 0xffff_fff0]);
    t.rig.post(0, &[(BUF, n, false)]);
    t.dev.queue_notified(INFLATE).unwrap();
    assert_eq!(
        *t.log.0.lock().unwrap(),
        vec![(0x20_0000, 3 * PAGE), (0x30_0000, PAGE)]
    );
    assert_eq!(t.h.counts(), (4, 0, 1));
    assert_eq!(t.rig.used_idx(0), 1);
    // Deflation only counts.
    t.rig.post(1, &[(BUF, n, false)]);
    t.dev.queue_notified(DEFLATE).unwrap();
    assert_eq!(t.h.counts(), (4, 5, 1));
    assert_eq!(t.rig.used_idx(1), 1);
}

#[test]
fn pages_in_any_order_make_one_run() {
    let mut t = setup();
    // Linux hands a batch over in descending order; a repeated PFN counts once.
    let n = pfns(&t, BUF, &[0x203, 0x202, 0x300, 0x201, 0x200, 0x202]);
    t.rig.post(0, &[(BUF, n, false)]);
    t.dev.queue_notified(INFLATE).unwrap();
    assert_eq!(
        *t.log.0.lock().unwrap(),
        vec![(0x20_0000, 4 * PAGE), (0x30_0000, PAGE)]
    );
    assert_eq!(t.h.counts(), (5, 0, 0));
}

#[test]
fn statistics_are_kept_and_the_buffer_returned_on_request() {
    let mut t = setup();
    let mut b = Vec::new();
    for (tag, v) in [(4u16, 1000u64), (5, 5000)] {
        b.extend(tag.to_le_bytes());
        b.extend(v.to_le_bytes());
    }
    t.rig.write(BUF, &b);
    t.rig.post(2, &[(BUF, b.len() as u32, false)]);
    t.dev.queue_notified(STATS).unwrap();
    assert_eq!(t.h.stats().get(&5), Some(&5000));
    assert_eq!(t.rig.used_idx(2), 0, "the device holds the buffer");
    t.h.request_stats();
    let fd = t.dev.host_fd().unwrap();
    assert!(readable(fd));
    t.dev.host_ready().unwrap();
    assert!(!readable(fd));
    assert_eq!(t.rig.used_idx(2), 1);
}

#[test]
fn an_inactive_balloon_stays_quiet() {
    let log = Arc::new(Log::default());
    let dev = Balloon::new(10, log).unwrap();
    let h = dev.handle();
    h.set_target(100);
    h.request_stats();
    assert!(!readable(dev.host_fd().unwrap()));
}

#[test]
fn hostile_descriptors_need_a_reset() {
    let mut t = setup();
    t.rig.post(0, &[(0x3f_fff0, 0x100, false)]);
    assert!(matches!(
        t.dev.queue_notified(INFLATE),
        Err(DeviceError::Chain {
            queue: 0,
            source: ChainError::BufferOutsideMemory { .. }
        })
    ));
    assert!(t.log.0.lock().unwrap().is_empty());
    // Stopped: a request for statistics does nothing.
    t.h.request_stats();
    assert!(!readable(t.dev.host_fd().unwrap()));
    let mut t = setup();
    t.rig.desc(1, 0, BUF, 8, DESC_F_NEXT, 0);
    t.rig.publish(1, 0);
    assert!(matches!(
        t.dev.queue_notified(DEFLATE),
        Err(DeviceError::Chain {
            source: ChainError::TooLong(_),
            ..
        })
    ));
    let mut t = setup();
    t.rig.post(2, &[(BUF, u32::MAX, false)]);
    assert!(matches!(
        t.dev.queue_notified(STATS),
        Err(DeviceError::Chain {
            queue: 2,
            source: ChainError::BufferOutsideMemory { .. }
        })
    ));
    let mut t = setup();
    t.rig.set_avail_idx(0, 300);
    assert!(matches!(
        t.dev.queue_notified(INFLATE),
        Err(DeviceError::Ring { queue: 0, .. })
    ));
}

#[test]
fn event_idx_keeps_the_driver_kicking() {
    use vm_memory::Bytes;
    let log = Arc::new(Log::default());
    let mut dev = Balloon::new(0, log).unwrap();
    let mut rig = Rig::new(3, 16);
    dev.ack_features(features::VERSION_1 | features::RING_EVENT_IDX);
    dev.activate(rig.mem.clone(), rig.queues(true), rig.irq())
        .unwrap();
    for _ in 0..3 {
        rig.post(1, &[(BUF, 4, false)]);
        dev.queue_notified(DEFLATE).unwrap();
    }
    let at = rig.qs[1].used + 4 + 8 * 16;
    let ev: u16 = rig.mem.read_obj(GuestAddress(at)).unwrap();
    assert_eq!(ev, 3);
}

#[test]
fn state_round_trips() {
    let t = setup();
    t.h.set_target(42);
    let s = t.dev.save();
    let back: DeviceState = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
    assert_eq!(back, s);
    let DeviceState::Balloon(b) = &back else {
        panic!("{back:?}")
    };
    assert_eq!(b.target, 42);
}
