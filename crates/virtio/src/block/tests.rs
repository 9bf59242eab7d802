//! virtio-blk through the PCI transport with hand-built descriptor tables: every request type,
//! every malformed request (answered with a status byte) and every structural chain error
//! (the device asks for a reset), on an in-memory disk.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferro_disk::{BlockBackend, DiskError};
use vm_memory::{Bytes, GuestAddress};

use super::request::{kind, status as st, MAX_RANGES, MAX_REQUEST_BYTES, SEG_MAX};
use super::*;
use crate::chain::{DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};
use crate::status;
use crate::testutil::{Driver, BUF, QSIZE};

/// A disk in memory that counts flushes and records discards / write-zeroes.
struct MemDisk {
    data: Mutex<Vec<u8>>,
    ro: bool,
    flushes: AtomicUsize,
    ops: Mutex<Vec<String>>,
    /// read_at and write_at calls.
    calls: AtomicUsize,
}

impl MemDisk {
    fn new(sectors: usize, ro: bool) -> Arc<Self> {
        let data = (0..sectors * 512).map(|i| (i / 512) as u8).collect();
        Arc::new(Self {
            data: Mutex::new(data),
            ro,
            flushes: AtomicUsize::new(0),
            ops: Mutex::new(Vec::new()),
            calls: AtomicUsize::new(0),
        })
    }
    fn err(&self) -> DiskError {
        DiskError::ReadOnly { file: "mem".into() }
    }
}

impl BlockBackend for MemDisk {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let d = self.data.lock().unwrap();
        let o = offset as usize;
        buf.copy_from_slice(d.get(o..o + buf.len()).ok_or_else(|| self.err())?);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.ro {
            return Err(self.err());
        }
        let mut d = self.data.lock().unwrap();
        let o = offset as usize;
        d.get_mut(o..o + buf.len())
            .ok_or_else(|| self.err())?
            .copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> Result<(), DiskError> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.ops
            .lock()
            .unwrap()
            .push(format!("discard {offset} {len}"));
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), DiskError> {
        self.ops
            .lock()
            .unwrap()
            .push(format!("zeroes {offset} {len} {may_unmap}"));
        let mut d = self.data.lock().unwrap();
        d[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
    fn readonly(&self) -> bool {
        self.ro
    }
    fn id(&self) -> String {
        "backend-id".into()
    }
}

const SECTORS: usize = 64;
const HDR: u64 = BUF;
const DATA: u64 = BUF + 0x1000;
const STATUS: u64 = BUF + 0x100;

fn driver_with(disk: Arc<dyn BlockBackend>, serial: Option<&str>, feats: u64) -> Driver {
    let dev = Block::new(BlockConfig {
        disk,
        serial: serial.map(str::to_string),
        name: "test-blk".into(),
    });
    let mut d = Driver::new(Box::new(dev));
    d.enable_msix();
    let s = d.bring_up(Driver::default_features() | feats);
    assert_eq!(s & status::DRIVER_OK, status::DRIVER_OK);
    d.log.take();
    d
}

fn all_features() -> u64 {
    feature::FLUSH | feature::DISCARD | feature::WRITE_ZEROES | features::RING_INDIRECT_DESC
}

fn driver() -> (Driver, Arc<MemDisk>) {
    let disk = MemDisk::new(SECTORS, false);
    (driver_with(disk.clone(), None, all_features()), disk)
}

fn header(d: &Driver, ty: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&ty.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    d.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    d.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
}

/// Waits until the used index reaches `n` (workers complete asynchronously).
fn wait_used(d: &mut Driver, n: u16) {
    let t = Instant::now();
    while d.used_idx() != n {
        // What the event loop does when the disk's io_uring has completions.
        d.t.host_event();
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "used {}",
            d.used_idx()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Publishes `head`, kicks, waits for it, and returns (status byte, used len).
fn submit(d: &mut Driver, head: u16) -> (u8, u32) {
    let before = d.used_idx();
    d.publish(head);
    d.kick();
    assert_eq!(
        d.t.status() & status::DEVICE_NEEDS_RESET,
        0,
        "{:?}",
        d.t.last_error()
    );
    wait_used(d, before.wrapping_add(1));
    // A worker decides on the interrupt after it publishes the used entry: wait for that
    // too, so a test that looks at the interrupts next sees this request's.
    let busy = d.t.poll_counter().expect("virtio-blk counts its requests");
    let t = Instant::now();
    while busy.load(Ordering::Acquire) > 0 {
        assert!(t.elapsed() < Duration::from_secs(5), "still in flight");
        std::thread::yield_now();
    }
    let (id, len) = d.used(before);
    assert_eq!(id, u32::from(head));
    (d.mem.read_obj(GuestAddress(STATUS)).unwrap(), len)
}

/// header (readable) -> data (dir) -> status (writable).
fn three(d: &Driver, data_len: u32, data_write: bool) {
    d.desc(0, HDR, 16, DESC_F_NEXT, 1);
    let f = if data_write { DESC_F_WRITE } else { 0 };
    d.desc(1, DATA, data_len, f | DESC_F_NEXT, 2);
    d.desc(2, STATUS, 1, DESC_F_WRITE, 0);
}

fn two(d: &Driver) {
    d.desc(0, HDR, 16, DESC_F_NEXT, 1);
    d.desc(1, STATUS, 1, DESC_F_WRITE, 0);
}

#[test]
fn config_space() {
    let (mut d, _) = driver();
    let cap = d.r(crate::transport::DEVICE_OFFSET, 8);
    assert_eq!(cap, SECTORS as u64);
    assert_eq!(d.r(crate::transport::DEVICE_OFFSET + 20, 4), 512);
    assert_eq!(
        d.r(crate::transport::DEVICE_OFFSET + 12, 4),
        u64::from(SEG_MAX)
    );
    assert_eq!(
        d.r(crate::transport::DEVICE_OFFSET + 40, 4),
        u64::from(MAX_RANGES)
    );
    // Past the end reads as zeros; no panic at absurd offsets.
    assert_eq!(d.r(crate::transport::DEVICE_OFFSET + 0xff0, 8), 0);
}

#[test]
fn write_then_read_back_and_flush() {
    let (mut d, disk) = driver();
    header(&d, kind::OUT, 3);
    let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7) as u8).collect();
    d.mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
    three(&d, 1024, false);
    assert_eq!(submit(&mut d, 0), (st::OK, 1));
    assert_eq!(&disk.data.lock().unwrap()[3 * 512..5 * 512], &pattern[..]);

    header(&d, kind::IN, 3);
    d.mem.write_slice(&[0u8; 1024], GuestAddress(DATA)).unwrap();
    three(&d, 1024, true);
    assert_eq!(submit(&mut d, 0), (st::OK, 1025));
    let mut got = vec![0u8; 1024];
    d.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, pattern);

    header(&d, kind::FLUSH, 0);
    two(&d);
    assert_eq!(submit(&mut d, 0), (st::OK, 1));
    assert_eq!(disk.flushes.load(Ordering::SeqCst), 1);
    // Interrupts arrived on the queue vector (1).
    assert!(d.log.take().iter().all(|l| l == "signal 1"));
}

#[test]
fn odd_framing_is_read_as_byte_streams() {
    // Header split over two descriptors, data and status in one writable buffer.
    let (mut d, _) = driver();
    header(&d, kind::IN, 2);
    d.desc(0, HDR, 10, DESC_F_NEXT, 1);
    d.desc(1, HDR + 10, 6, DESC_F_NEXT, 2);
    d.desc(2, DATA, 513, DESC_F_WRITE, 0);
    d.publish(0);
    d.kick();
    wait_used(&mut d, 1);
    assert_eq!(d.used(0), (0, 513));
    let mut b = [0u8; 513];
    d.mem.read_slice(&mut b, GuestAddress(DATA)).unwrap();
    assert!(b[..512].iter().all(|&x| x == 2));
    assert_eq!(b[512], st::OK);
}

#[test]
fn without_flush_writes_are_written_through() {
    let disk = MemDisk::new(SECTORS, false);
    let mut d = driver_with(disk.clone(), None, 0);
    header(&d, kind::OUT, 0);
    three(&d, 512, false);
    assert_eq!(submit(&mut d, 0).0, st::OK);
    assert_eq!(disk.flushes.load(Ordering::SeqCst), 1);
    // Discard was not negotiated.
    header(&d, kind::DISCARD, 0);
    three(&d, 16, false);
    assert_eq!(submit(&mut d, 0).0, st::UNSUPP);
}

#[test]
fn get_id_serial_and_backend() {
    let disk = MemDisk::new(SECTORS, false);
    let mut d = driver_with(disk.clone(), Some("SER-1"), all_features());
    header(&d, kind::GET_ID, 0);
    three(&d, 20, true);
    assert_eq!(submit(&mut d, 0), (st::OK, 21));
    let mut id = [0u8; 20];
    d.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..6], b"SER-1\0");
    let mut d = driver_with(disk, None, all_features());
    header(&d, kind::GET_ID, 0);
    three(&d, 20, true);
    assert_eq!(submit(&mut d, 0).0, st::OK);
    d.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..11], b"backend-id\0");
}

#[test]
fn read_only_disk() {
    let disk = MemDisk::new(SECTORS, true);
    let mut d = driver_with(disk.clone(), None, feature::FLUSH | feature::RO);
    // RO offered, discard / write-zeroes not.
    d.w32(crate::transport_regs::off::DEVICE_FEATURE_SELECT, 0);
    let f = d.r(crate::transport_regs::off::DEVICE_FEATURE, 4);
    assert_ne!(f & feature::RO, 0);
    assert_eq!(f & feature::DISCARD, 0);
    header(&d, kind::OUT, 0);
    three(&d, 512, false);
    assert_eq!(submit(&mut d, 0).0, st::IOERR);
    header(&d, kind::IN, 1);
    three(&d, 512, true);
    assert_eq!(submit(&mut d, 0).0, st::OK);
    header(&d, kind::WRITE_ZEROES, 0);
    three(&d, 16, false);
    assert_eq!(submit(&mut d, 0).0, st::UNSUPP);
    assert!(disk.data.lock().unwrap()[..512].iter().all(|&b| b == 0));
    assert!(disk.data.lock().unwrap()[512..1024].iter().all(|&b| b == 1));
}

fn range(d: &Driver, i: u64, sector: u64, num: u32, flags: u32) {
    let mut r = [0u8; 16];
    r[0..8].copy_from_slice(&sector.to_le_bytes());
    r[8..12].copy_from_slice(&num.to_le_bytes());
    r[12..16].copy_from_slice(&flags.to_le_bytes());
    d.mem.write_slice(&r, GuestAddress(DATA + i * 16)).unwrap();
}

#[test]
fn discard_and_write_zeroes() {
    let (mut d, disk) = driver();
    header(&d, kind::DISCARD, 0);
    range(&d, 0, 2, 4, 0);
    range(&d, 1, 10, 1, 0);
    three(&d, 32, false);
    assert_eq!(submit(&mut d, 0).0, st::OK);
    header(&d, kind::WRITE_ZEROES, 0);
    range(&d, 0, 5, 2, 1);
    three(&d, 16, false);
    assert_eq!(submit(&mut d, 0).0, st::OK);
    assert_eq!(
        *disk.ops.lock().unwrap(),
        vec![
            "discard 1024 2048",
            "discard 5120 512",
            "zeroes 2560 1024 true"
        ]
    );
    disk.ops.lock().unwrap().clear();
    // A range past the end, unmap on discard, reserved flags, a partial range, too many
    // ranges: refused, and nothing is applied.
    for (sector, num, flags, ty, want) in [
        (60, 8, 0, kind::DISCARD, st::IOERR),
        (u64::MAX, 2, 0, kind::DISCARD, st::IOERR),
        (0, 1, 1, kind::DISCARD, st::UNSUPP),
        (0, 1, 2, kind::WRITE_ZEROES, st::UNSUPP),
    ] {
        header(&d, ty, 0);
        range(&d, 0, 0, 1, 0);
        range(&d, 1, sector, num, flags);
        three(&d, 32, false);
        assert_eq!(submit(&mut d, 0).0, want, "{sector} {num} {flags}");
    }
    header(&d, kind::DISCARD, 0);
    three(&d, 24, false);
    assert_eq!(submit(&mut d, 0).0, st::IOERR);
    three(&d, (MAX_RANGES + 1) * 16, false);
    assert_eq!(submit(&mut d, 0).0, st::IOERR);
    assert!(disk.ops.lock().unwrap().is_empty());
}

/// Malformed requests get a status byte and leave the disk alone; the device stays healthy.
#[test]
fn malformed_requests_get_ioerr_or_unsupp() {
    let (mut d, disk) = driver();
    let before = disk.data.lock().unwrap().clone();
    type Case = (&'static str, Box<dyn Fn(&Driver)>, u8);
    let cases: Vec<Case> = vec![
        (
            "read with readable data",
            Box::new(|d| {
                header(d, kind::IN, 0);
                three(d, 512, false);
            }),
            st::IOERR,
        ),
        (
            "write with writable data",
            Box::new(|d| {
                header(d, kind::OUT, 0);
                three(d, 512, true);
            }),
            st::IOERR,
        ),
        (
            "short header",
            Box::new(|d| {
                header(d, kind::OUT, 0);
                d.desc(0, HDR, 8, DESC_F_NEXT, 2);
                d.desc(2, STATUS, 1, DESC_F_WRITE, 0);
            }),
            st::IOERR,
        ),
        (
            "not whole sectors",
            Box::new(|d| {
                header(d, kind::IN, 0);
                three(d, 100, true);
            }),
            st::IOERR,
        ),
        (
            "past the capacity",
            Box::new(|d| {
                header(d, kind::OUT, SECTORS as u64 - 1);
                three(d, 1024, false);
            }),
            st::IOERR,
        ),
        (
            "sector overflows",
            Box::new(|d| {
                header(d, kind::IN, u64::MAX);
                three(d, 512, true);
            }),
            st::IOERR,
        ),
        (
            "flush with data",
            Box::new(|d| {
                header(d, kind::FLUSH, 0);
                three(d, 512, false);
            }),
            st::IOERR,
        ),
        (
            "get_id without a buffer",
            Box::new(|d| {
                header(d, kind::GET_ID, 0);
                two(d);
            }),
            st::IOERR,
        ),
        (
            "unknown type",
            Box::new(|d| {
                header(d, 0x77, 0);
                two(d);
            }),
            st::UNSUPP,
        ),
        (
            "secure erase",
            Box::new(|d| {
                header(d, 14, 0);
                three(d, 16, false);
            }),
            st::UNSUPP,
        ),
    ];
    for (what, setup, want) in cases {
        setup(&d);
        assert_eq!(submit(&mut d, 0).0, want, "{what}");
    }
    assert_eq!(*disk.data.lock().unwrap(), before);
}

#[test]
fn absurd_lengths_and_too_many_segments() {
    // Parsing alone, in a guest memory big enough for the largest request.
    let big = GuestMemory::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind::IN.to_le_bytes());
    big.write_slice(&h, GuestAddress(0)).unwrap();
    let lim = request::Limits {
        capacity: u64::MAX / 512,
        readonly: false,
        discard: false,
        write_zeroes: false,
    };
    let seg = |addr: u64, len: u32, write: bool| crate::chain::Segment {
        addr: GuestAddress(addr),
        len,
        write,
    };
    for (len, ok) in [(MAX_REQUEST_BYTES, true), (MAX_REQUEST_BYTES + 512, false)] {
        let segs = [
            seg(0, 16, false),
            seg(0x1000, len, true),
            seg(0x10, 1, true),
        ];
        assert_eq!(request::parse(&big, &segs, &lim).is_ok(), ok, "{len}");
    }

    let mut d = driver_with(MemDisk::new(1024, false), None, all_features());
    // SEG_MAX + 1 data segments through an indirect table.
    let it = BUF + 0x2_0000;
    let n = SEG_MAX as u16 + 3;
    header(&d, kind::IN, 0);
    crate::chain::tests::put(&d.mem, it, 0, HDR, 16, DESC_F_NEXT, 1);
    for i in 1..n - 1 {
        crate::chain::tests::put(&d.mem, it, i, DATA, 512, DESC_F_WRITE | DESC_F_NEXT, i + 1);
    }
    crate::chain::tests::put(&d.mem, it, n - 1, STATUS, 1, DESC_F_WRITE, 0);
    d.desc(0, it, u32::from(n) * 16, DESC_F_INDIRECT, 0);
    assert_eq!(submit(&mut d, 0).0, st::IOERR);
    // SEG_MAX segments are fine.
    crate::chain::tests::put(&d.mem, it, n - 2, STATUS, 1, DESC_F_WRITE, 0);
    d.desc(0, it, u32::from(n - 1) * 16, DESC_F_INDIRECT, 0);
    assert_eq!(submit(&mut d, 0).0, st::OK);
}

#[test]
fn no_status_byte_completes_with_zero_length() {
    let (mut d, _) = driver();
    header(&d, kind::IN, 0);
    d.desc(0, HDR, 16, DESC_F_NEXT, 1);
    d.desc(1, DATA, 512, 0, 0);
    d.publish(0);
    d.kick();
    wait_used(&mut d, 1);
    assert_eq!(d.used(0), (0, 0));
    assert_eq!(d.t.status() & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn many_requests_in_flight_batch_interrupts() {
    let (mut d, disk) = driver();
    // QSIZE reads of one sector each (sector i), published at once, one indirect table each.
    for i in 0..QSIZE {
        let h = BUF + 0x4000 + u64::from(i) * 0x400;
        let mut hb = [0u8; 16];
        hb[8..16].copy_from_slice(&u64::from(i).to_le_bytes());
        d.mem.write_slice(&hb, GuestAddress(h)).unwrap();
        let it = BUF + 0x2_0000 + u64::from(i) * 0x100;
        crate::chain::tests::put(&d.mem, it, 0, h, 16, DESC_F_NEXT, 1);
        crate::chain::tests::put(&d.mem, it, 1, h + 0x100, 512, DESC_F_WRITE | DESC_F_NEXT, 2);
        crate::chain::tests::put(&d.mem, it, 2, h + 0x300, 1, DESC_F_WRITE, 0);
        d.desc(i, it, 48, DESC_F_INDIRECT, 0);
        d.publish(i);
    }
    d.kick();
    wait_used(&mut d, QSIZE);
    for i in 0..QSIZE {
        let h = BUF + 0x4000 + u64::from(i) * 0x400;
        let s: u8 = d.mem.read_obj(GuestAddress(h + 0x300)).unwrap();
        assert_eq!(s, st::OK);
        let b: u8 = d.mem.read_obj(GuestAddress(h + 0x100 + 511)).unwrap();
        assert_eq!(b, i as u8);
    }
    let irqs = d.log.take().len();
    assert!((1..=QSIZE as usize).contains(&irqs), "{irqs}");
    assert_eq!(disk.flushes.load(Ordering::SeqCst), 0);
}

/// Builds request `i` (type `ty`, 8 sectors at `sector`) in its own indirect table; the data
/// buffer is at the returned address, the status byte 0x2000 after it.
fn eight_sectors(d: &Driver, i: u16, ty: u32, sector: u64) -> u64 {
    let h = BUF + 0x4000 + u64::from(i) * 0x3000;
    let mut hb = [0u8; 16];
    hb[0..4].copy_from_slice(&ty.to_le_bytes());
    hb[8..16].copy_from_slice(&sector.to_le_bytes());
    d.mem.write_slice(&hb, GuestAddress(h)).unwrap();
    let data = h + 0x800;
    let f = if ty == kind::IN { DESC_F_WRITE } else { 0 };
    let it = BUF + 0x3_8000 + u64::from(i) * 0x100;
    crate::chain::tests::put(&d.mem, it, 0, h, 16, DESC_F_NEXT, 1);
    crate::chain::tests::put(&d.mem, it, 1, data, 4096, f | DESC_F_NEXT, 2);
    crate::chain::tests::put(&d.mem, it, 2, data + 0x2000, 1, DESC_F_WRITE, 0);
    d.mem
        .write_obj(0xffu8, GuestAddress(data + 0x2000))
        .unwrap();
    d.desc(i, it, 48, DESC_F_INDIRECT, 0);
    data
}

#[test]
fn contiguous_requests_share_one_disk_call() {
    let (mut d, disk) = driver();
    // Eight writes of 8 sectors, 0..64 in order, published at once: one disk call.
    for i in 0..8u16 {
        let data = eight_sectors(&d, i, kind::OUT, u64::from(i) * 8);
        d.mem
            .write_slice(&[0xa0 + i as u8; 4096], GuestAddress(data))
            .unwrap();
        d.publish(i);
    }
    d.kick();
    wait_used(&mut d, 8);
    assert_eq!(disk.calls.load(Ordering::SeqCst), 1);
    for i in 0..8u16 {
        let data = BUF + 0x4000 + u64::from(i) * 0x3000 + 0x800;
        assert_eq!(
            d.mem.read_obj::<u8>(GuestAddress(data + 0x2000)).unwrap(),
            st::OK
        );
        let at = usize::from(i) * 4096;
        assert!(disk.data.lock().unwrap()[at..at + 4096]
            .iter()
            .all(|&b| b == 0xa0 + i as u8));
    }
    // Reads back in reverse order are not contiguous in ring order: one call each; each gets
    // its own data and used length.
    for (k, i) in (0..8u16).rev().enumerate() {
        eight_sectors(&d, k as u16, kind::IN, u64::from(i) * 8);
        d.publish(k as u16);
    }
    d.kick();
    wait_used(&mut d, 16);
    assert_eq!(disk.calls.load(Ordering::SeqCst), 1 + 8);
    for (k, i) in (0..8u16).rev().enumerate() {
        let data = BUF + 0x4000 + (k as u64) * 0x3000 + 0x800;
        assert_eq!(
            d.mem.read_obj::<u8>(GuestAddress(data + 0x2000)).unwrap(),
            st::OK
        );
        let mut b = [0u8; 4096];
        d.mem.read_slice(&mut b, GuestAddress(data)).unwrap();
        assert!(b.iter().all(|&x| x == 0xa0 + i as u8), "request {k}");
    }
    for n in 8..16u16 {
        assert_eq!(d.used(n).1, 4097);
    }
    // In order again: one call for all eight.
    for i in 0..8u16 {
        eight_sectors(&d, i, kind::IN, u64::from(i) * 8);
        d.publish(i);
    }
    d.kick();
    wait_used(&mut d, 24);
    assert_eq!(disk.calls.load(Ordering::SeqCst), 1 + 8 + 1);
    for i in 0..8u16 {
        let data = BUF + 0x4000 + u64::from(i) * 0x3000 + 0x800;
        let mut b = [0u8; 4096];
        d.mem.read_slice(&mut b, GuestAddress(data)).unwrap();
        assert!(b.iter().all(|&x| x == 0xa0 + i as u8), "request {i}");
    }
}

#[test]
fn runs_together_only_for_contiguous_reads_or_writes() {
    let r = |op, sector, len| request::Request {
        op,
        sector,
        len,
        status: GuestAddress(0),
    };
    let segs: &[crate::chain::Segment] = &[];
    let a = r(request::Op::Read, 0, 4096);
    let b = r(request::Op::Read, 8, 4096);
    let w = r(request::Op::Write, 8, 4096);
    let gap = r(request::Op::Read, 9, 4096);
    let f = r(request::Op::Flush, 0, 0);
    let huge = r(request::Op::Read, 8, request::CHUNK as u32);
    assert!(request::runs_together(&[(segs, &a), (segs, &b)]));
    assert!(!request::runs_together(&[(segs, &a), (segs, &w)]));
    assert!(!request::runs_together(&[(segs, &a), (segs, &gap)]));
    assert!(!request::runs_together(&[(segs, &f)]));
    assert!(!request::runs_together(&[(segs, &a), (segs, &huge)]));
    assert!(!request::runs_together(&[]));
}

/// Structural chain errors: NEEDS_RESET, config interrupt, nothing used, quiet until reset.
fn hostile(setup: impl FnOnce(&mut Driver)) {
    let (mut d, _) = driver();
    header(&d, kind::FLUSH, 0);
    two(&d);
    assert_eq!(submit(&mut d, 0).0, st::OK);
    d.log.take();
    let used = d.used_idx();
    setup(&mut d);
    d.kick();
    assert_ne!(d.status() & status::DEVICE_NEEDS_RESET, 0);
    assert_eq!(d.log.take(), vec!["signal 0"]);
    assert_eq!(d.used_idx(), used);
    d.kick();
    assert!(d.log.take().is_empty());
    let s = d.bring_up(Driver::default_features() | all_features());
    assert_eq!(s & status::DEVICE_NEEDS_RESET, 0);
    d.mem
        .write_obj(0u16, GuestAddress(crate::testutil::USED + 2))
        .unwrap();
    header(&d, kind::FLUSH, 0);
    two(&d);
    assert_eq!(submit(&mut d, 0).0, st::OK);
}

#[test]
fn hostile_buffer_outside_memory() {
    hostile(|d| {
        d.desc(3, HDR, 16, DESC_F_NEXT, 4);
        d.desc(4, 0xf_ff00, 0x1000, DESC_F_WRITE, 0);
        d.publish(3);
    });
}

#[test]
fn hostile_loop() {
    hostile(|d| {
        d.desc(3, HDR, 16, DESC_F_NEXT, 4);
        d.desc(4, DATA, 512, DESC_F_NEXT, 3);
        d.publish(3);
    });
}

#[test]
fn hostile_readable_after_writable() {
    hostile(|d| {
        d.desc(3, HDR, 16, DESC_F_WRITE | DESC_F_NEXT, 4);
        d.desc(4, STATUS, 1, 0, 0);
        d.publish(3);
    });
}

#[test]
fn hostile_head_past_the_queue() {
    hostile(|d| d.publish(QSIZE + 1));
}

#[test]
fn hostile_absurd_length() {
    hostile(|d| {
        d.desc(3, HDR, u32::MAX, DESC_F_NEXT, 4);
        d.desc(4, STATUS, 1, DESC_F_WRITE, 0);
        d.publish(3);
    });
}

#[test]
fn hostile_avail_index_runs_ahead() {
    hostile(|d| {
        let i = d.avail_idx.wrapping_add(QSIZE + 5);
        d.set_avail_idx(i);
    });
}

#[test]
fn save_has_nothing_in_flight_and_restores() {
    let (mut d, _) = driver();
    header(&d, kind::FLUSH, 0);
    two(&d);
    submit(&mut d, 0);
    let s = d.t.save();
    let DeviceState::Block(b) = &s.device else {
        panic!("{:?}", s.device)
    };
    assert_eq!(b.queue.unwrap().next_used, 1);
    assert_eq!(b.queue.unwrap().next_avail, 1);
    let disk = MemDisk::new(SECTORS, false);
    let dev = Block::new(BlockConfig {
        disk,
        serial: None,
        name: "t2".into(),
    });
    let mut d2 = Driver::new(Box::new(dev));
    d2.t.restore(&s).unwrap();
    assert_eq!(d2.t.save(), s);
}

/// The event loop's polling: requests the driver makes available are taken without a kick,
/// kicks stay off while the loop polls and come back on when it stops; a request made while
/// they were off is taken then, and completions turn them off again before the driver sees
/// them (it refills at once).
#[test]
fn polling_takes_requests_without_kicks_and_turns_kicks_back_on() {
    const NO_NOTIFY: u16 = 1;
    let (mut d, disk) = driver();
    header(&d, kind::FLUSH, 0);
    two(&d);
    // Nothing available: polling finds nothing, but kicks go off for as long as it polls.
    assert!(!d.t.poll_queues());
    assert_eq!(d.used_flags() & NO_NOTIFY, NO_NOTIFY);
    d.publish(0);
    assert!(
        d.t.poll_queues(),
        "a request made available is taken without a kick"
    );
    wait_used(&mut d, 1);
    assert_eq!(disk.flushes.load(Ordering::SeqCst), 1);
    assert!(!d.t.poll_queues(), "nothing new");
    // The loop stops polling: kicks back on, nothing was left.
    assert!(!d.t.poll_done());
    assert_eq!(d.used_flags() & NO_NOTIFY, 0);
    // A request made after the last poll but before kicks came back on: poll_done takes it
    // and tells the loop to keep polling.
    assert!(!d.t.poll_queues());
    d.publish(0);
    assert!(d.t.poll_done(), "the last look takes what the driver added");
    // (wait_used reaps as the loop does, with host_event: that turns kicks off again.)
    wait_used(&mut d, 2);
    assert_eq!(disk.flushes.load(Ordering::SeqCst), 2);
    assert!(!d.t.poll_done());
    assert_eq!(d.used_flags() & NO_NOTIFY, 0);
    // Kicks on: a kicked request is served as before, and kicks stay on.
    d.publish(0);
    d.kick();
    assert_eq!(d.used_flags() & NO_NOTIFY, 0);
    // Completions of the io_uring turn kicks off (host_event is how the loop reaps them).
    wait_used(&mut d, 3);
    d.t.host_event();
    assert_eq!(d.used_flags() & NO_NOTIFY, NO_NOTIFY);
    assert!(!d.t.poll_done());
    assert_eq!(d.used_flags() & NO_NOTIFY, 0);
    assert_eq!(d.t.status() & status::DEVICE_NEEDS_RESET, 0);
}

/// A snapshot taken while the loop polled (kicks off in guest memory) restores with kicks on,
/// and the restored transport kicks its queue once, so an available request is not stranded.
#[test]
fn restore_turns_kicks_back_on() {
    let (mut d, _) = driver();
    header(&d, kind::FLUSH, 0);
    two(&d);
    assert!(!d.t.poll_queues());
    assert_eq!(d.used_flags() & 1, 1);
    let s = d.t.save();
    let mut d2 = Driver::new(Box::new(Block::new(BlockConfig {
        disk: MemDisk::new(SECTORS, false),
        serial: None,
        name: "t2".into(),
    })));
    // The restored VM's memory is the saved one: same rings, flags included.
    let flags = d.used_flags();
    d2.mem
        .write_obj(flags, GuestAddress(crate::testutil::USED))
        .unwrap();
    d2.t.restore(&s).unwrap();
    assert_eq!(d2.used_flags() & 1, 0);
}

/// Guest buffers become host iovecs: one per piece, a buffer across two memory regions gives
/// two, and a stream shorter than asked (or memory that is not there) is refused.
#[test]
fn host_iovecs_follow_regions() {
    let mem = crate::GuestMemory::from_ranges(&[
        (GuestAddress(0), 0x10000),
        (GuestAddress(0x10000), 0x10000),
    ])
    .unwrap();
    let seg = |addr: u64, len: u32| crate::chain::Segment {
        addr: GuestAddress(addr),
        len,
        write: true,
    };
    let host = |a: u64| {
        vm_memory::GuestMemoryBackend::get_host_address(&mem, GuestAddress(a)).unwrap() as usize
    };
    let segs = [seg(0x100, 0x100), seg(0xff00, 0x200), seg(0x12000, 0x1000)];
    let mut out = Vec::new();
    // Skip 0x80 bytes of the stream, take 0x380: the rest of the first buffer, the second
    // (two pieces), and 0x100 of the third.
    assert!(request::host_iovecs(
        &mem,
        segs.iter(),
        0x80,
        0x380,
        &mut out
    ));
    let got: Vec<(usize, usize)> = out.iter().map(|v| (v.addr(), v.len())).collect();
    assert_eq!(
        got,
        vec![
            (host(0x180), 0x80),
            (host(0xff00), 0x100),
            (host(0x10000), 0x100),
            (host(0x12000), 0x100),
        ]
    );
    out.clear();
    assert!(!request::host_iovecs(
        &mem,
        segs.iter(),
        0,
        0x1301,
        &mut out
    ));
    out.clear();
    assert!(!request::host_iovecs(
        &mem,
        [seg(0x1f000, 0x2000)].iter(),
        0,
        0x2000,
        &mut out
    ));
}

/// A raw image of `SECTORS` sectors, byte `i` = `byte(i)`, in a fresh directory named after
/// `tag`, opened with O_DIRECT: (directory, path, contents, backend).
fn raw_direct(
    tag: &str,
    byte: impl Fn(usize) -> u8,
) -> (
    std::path::PathBuf,
    std::path::PathBuf,
    Vec<u8>,
    Arc<dyn BlockBackend>,
) {
    let dir = std::env::temp_dir().join(format!("{tag}{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("disk.img");
    let init: Vec<u8> = (0..SECTORS * 512).map(byte).collect();
    std::fs::write(&path, &init).unwrap();
    let opts = ferro_disk::OpenOptions {
        direct: true,
        ..Default::default()
    };
    let disk: Arc<dyn BlockBackend> = Arc::from(ferro_disk::open(&path, &opts).unwrap());
    (dir, path, init, disk)
}

/// Header (status byte at +16) of page request `i` (see [`page_request`]).
fn page_hdr(i: u64) -> u64 {
    BUF + 0x8000 + 32 * i
}

/// Data of page request `i`: a page-aligned 4 KiB of its own, which O_DIRECT can take.
fn page_data(i: u64) -> u64 {
    DATA + 0x1000 * i
}

/// Writes page request `i`: a 4 KiB read or write (`ty`) of `sector` on [`page_data`],
/// descriptors `3i..3i+2`, status 0xff until the device answers. Returns its head.
fn page_request(d: &Driver, i: u64, ty: u32, sector: u64) -> u16 {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&ty.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    d.mem.write_slice(&h, GuestAddress(page_hdr(i))).unwrap();
    d.mem
        .write_obj(0xffu8, GuestAddress(page_hdr(i) + 16))
        .unwrap();
    let dir = if ty == kind::IN { DESC_F_WRITE } else { 0 };
    let k = 3 * i as u16;
    d.desc(k, page_hdr(i), 16, DESC_F_NEXT, k + 1);
    d.desc(k + 1, page_data(i), 4096, dir | DESC_F_NEXT, k + 2);
    d.desc(k + 2, page_hdr(i) + 16, 1, DESC_F_WRITE, 0);
    k
}

/// The status byte of page request `i`.
fn page_status(d: &Driver, i: u64) -> u8 {
    d.mem.read_obj(GuestAddress(page_hdr(i) + 16)).unwrap()
}

/// A raw image opened with O_DIRECT: page-aligned guest buffers go straight between the file
/// and guest memory, unaligned ones through the bounce buffer; both read and write right.
#[test]
fn raw_file_direct_aligned_and_unaligned_buffers() {
    let (dir, path, init, disk) = raw_direct("ferro-virtio-blk-", |i| (i / 512) as u8 ^ 0x5a);
    let mut d = driver_with(disk, None, all_features());
    // A plain file: reads and writes go through io_uring where the host has it.
    let uring = io_uring::IoUring::new(4).is_ok();
    assert_eq!(d.t.host_fd().is_some(), uring);
    let mut expect = init.clone();
    // DATA is page-aligned: O_DIRECT into guest memory. DATA + 1 and a 1000 + 3096 split are
    // not: the bounce buffer. Every write is read back through both kinds.
    for (k, &(addr, split)) in [(DATA, 4096u32), (DATA + 1, 4096), (DATA, 1000)]
        .iter()
        .enumerate()
    {
        let sector = 8 * k as u64 + 8;
        let pat: Vec<u8> = (0..4096u32).map(|i| (i * 13 + k as u32) as u8).collect();
        d.mem.write_slice(&pat, GuestAddress(addr)).unwrap();
        header(&d, kind::OUT, sector);
        d.desc(0, HDR, 16, DESC_F_NEXT, 1);
        d.desc(1, addr, split, DESC_F_NEXT, 2);
        if split < 4096 {
            d.desc(1, addr, split, DESC_F_NEXT, 3);
            d.desc(3, addr + u64::from(split), 4096 - split, DESC_F_NEXT, 2);
        }
        d.desc(2, STATUS, 1, DESC_F_WRITE, 0);
        assert_eq!(submit(&mut d, 0), (st::OK, 1), "write {k}");
        let at = sector as usize * 512;
        expect[at..at + 4096].copy_from_slice(&pat);
        for (raddr, rsplit) in [(DATA + 0x2000, 4096u32), (DATA + 0x2003, 512)] {
            d.mem
                .write_slice(&[0u8; 4096], GuestAddress(raddr))
                .unwrap();
            header(&d, kind::IN, sector);
            d.desc(0, HDR, 16, DESC_F_NEXT, 1);
            d.desc(1, raddr, rsplit, DESC_F_WRITE | DESC_F_NEXT, 3);
            d.desc(
                3,
                raddr + u64::from(rsplit),
                4096 - rsplit,
                DESC_F_WRITE | DESC_F_NEXT,
                2,
            );
            d.desc(2, STATUS, 1, DESC_F_WRITE, 0);
            assert_eq!(submit(&mut d, 0), (st::OK, 4097), "read {k} at {raddr:#x}");
            let mut b = vec![0u8; 4096];
            d.mem.read_slice(&mut b, GuestAddress(raddr)).unwrap();
            assert_eq!(b, pat, "read {k} at {raddr:#x}");
        }
    }
    // Flush, then the file holds it all.
    header(&d, kind::FLUSH, 0);
    two(&d);
    assert_eq!(submit(&mut d, 0), (st::OK, 1));
    assert_eq!(std::fs::read(&path).unwrap(), expect);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A reset while reads are in io_uring's hands, from another thread than the one that
/// submitted them, which meanwhile waits on a mutex (as the event loop waits for the device
/// a vCPU thread holds): io_uring posts their completions in the submitter's context, which
/// a futex wait lets run, and the reset reaps them itself. Nothing deadlocks, and the reads
/// complete into the used ring with their data.
#[test]
fn reset_reaps_ring_reads_submitted_by_a_blocked_thread() {
    let (dir, _, init, disk) = raw_direct("ferro-virtio-blk-reset-", |i| (i / 512) as u8 ^ 0xa5);
    let d = driver_with(disk, None, all_features());
    if d.t.host_fd().is_none() {
        // No io_uring on this host: nothing to test.
        return;
    }
    // Four single 4 KiB reads of sectors 0, 16, 32, 48 (not contiguous: four ring entries).
    for i in 0..4u64 {
        page_request(&d, i, kind::IN, 16 * i);
    }
    let d = Arc::new(Mutex::new(d));
    let gate = Arc::new(Mutex::new(()));
    let held = gate.lock().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let t = {
        let (d, gate) = (d.clone(), gate.clone());
        std::thread::spawn(move || {
            {
                let mut d = d.lock().unwrap();
                for i in 0..4u16 {
                    d.publish(3 * i);
                }
                d.kick();
            }
            tx.send(()).unwrap();
            // Blocks in a futex wait until the reset is done.
            drop(gate.lock().unwrap());
        })
    };
    rx.recv().unwrap();
    let mut d = d.lock().unwrap();
    d.set_status(0);
    assert_eq!(
        d.used_idx(),
        4,
        "every read completed before the reset ended"
    );
    for i in 0..4u64 {
        assert_eq!(page_status(&d, i), st::OK);
        let mut b = vec![0u8; 4096];
        d.mem
            .read_slice(&mut b, GuestAddress(page_data(i)))
            .unwrap();
        let at = 16 * 512 * i as usize;
        assert_eq!(b, init[at..at + 4096], "read {i}");
    }
    drop(d);
    drop(held);
    t.join().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Contiguous reads of a raw image in one kick become one run (through io_uring where the
/// host has it): each request gets its own 4 KiB of the file, its status and its used length;
/// a request that breaks the run is read on its own, right too.
#[test]
fn raw_file_merged_reads_each_get_their_data() {
    let (dir, _, init, disk) = raw_direct("ferro-virtio-blk-run-", |i| {
        (i / 512) as u8 ^ (i % 251) as u8
    });
    let mut d = driver_with(disk, None, all_features());
    // Requests 0..=5 read 4 KiB blocks 0..=5 in order (one run); request 6 reads block 7 (not
    // contiguous: a job of its own).
    let block = |i: u16| if i < 6 { u64::from(i) } else { 7 };
    let mut data = Vec::new();
    for i in 0..7u16 {
        data.push(eight_sectors(&d, i, kind::IN, block(i) * 8));
        d.mem
            .write_slice(&[0u8; 4096], GuestAddress(data[usize::from(i)]))
            .unwrap();
        d.publish(i);
    }
    d.kick();
    wait_used(&mut d, 7);
    for i in 0..7u16 {
        let at = data[usize::from(i)];
        assert_eq!(
            d.mem.read_obj::<u8>(GuestAddress(at + 0x2000)).unwrap(),
            st::OK,
            "status {i}"
        );
        let mut b = vec![0u8; 4096];
        d.mem.read_slice(&mut b, GuestAddress(at)).unwrap();
        let off = block(i) as usize * 4096;
        assert_eq!(b, init[off..off + 4096], "data of request {i}");
        assert_eq!(d.used(i).1, 4097, "used length of request {i}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Writes of a raw image go through io_uring where the host has it, merged into one run when
/// contiguous; a disk that logs writes for storage migration still sees every one of them,
/// marked before the guest is told, and the file holds the data.
#[test]
fn ring_writes_reach_the_file_and_the_write_log() {
    let (dir, path, _, inner) = raw_direct("ferro-virtio-blk-log-", |_| 0);
    let tracked = Arc::new(ferro_disk::tracked::Tracked::new(inner));
    tracked.log().start();
    let mut d = driver_with(tracked.clone(), None, all_features());
    // Four page-aligned 4 KiB writes of sectors 0, 8, 16, 24: one contiguous run.
    let mut expect = Vec::new();
    for i in 0..4u64 {
        let pat: Vec<u8> = (0..4096u64).map(|b| (b * 7 + i + 1) as u8).collect();
        d.mem.write_slice(&pat, GuestAddress(page_data(i))).unwrap();
        expect.extend_from_slice(&pat);
        let head = page_request(&d, i, kind::OUT, 8 * i);
        d.publish(head);
    }
    assert!(tracked.log().take().iter().all(|w| *w == 0));
    d.kick();
    wait_used(&mut d, 4);
    for i in 0..4u64 {
        assert_eq!(page_status(&d, i), st::OK, "status {i}");
    }
    assert_eq!(tracked.log().take()[0] & 1, 1, "block 0 is marked");
    assert_eq!(std::fs::read(&path).unwrap()[..4 * 4096], expect[..]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Reaping the ring a few completions at a time, the event loop takes between two steps what
/// the driver has already made: a request published without a kick while completions wait
/// (the driver refilling a freed slot) is served by the reap itself, with no kick and no poll.
#[test]
fn reaping_takes_requests_made_meanwhile() {
    let (dir, _, init, disk) = raw_direct("ferro-virtio-blk-reap-", |i| (i / 512) as u8 ^ 0x3c);
    let mut d = driver_with(disk, None, all_features());
    if d.t.host_fd().is_none() {
        // No io_uring on this host: nothing to test.
        return;
    }
    // Five single 4 KiB reads of sectors 0, 16, 32, 48, 8 (none contiguous with the one
    // before it: five ring entries).
    let sector = |i: u64| if i < 4 { 16 * i } else { 8 };
    for i in 0..5u64 {
        page_request(&d, i, kind::IN, sector(i));
    }
    for i in 0..4u16 {
        d.publish(3 * i);
    }
    d.kick();
    // The four finish in the kernel; their completions wait for the event loop.
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(d.used_idx(), 0);
    d.publish(12);
    // Only what the event loop does when the ring's descriptor is readable: no kick.
    wait_used(&mut d, 5);
    for i in 0..5u64 {
        assert_eq!(page_status(&d, i), st::OK, "status {i}");
        let mut b = vec![0u8; 4096];
        d.mem
            .read_slice(&mut b, GuestAddress(page_data(i)))
            .unwrap();
        let at = 512 * sector(i) as usize;
        assert_eq!(b, init[at..at + 4096], "read {i}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
