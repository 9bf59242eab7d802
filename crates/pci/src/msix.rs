//! MSI-X: the capability's control bits, the vector table and the pending-bit array (PBA).
//!
//! The state machine knows nothing of KVM: a vector's message reaches the VMM through the
//! injected [`MsiRouting`] (which the VMM backs with a GSI route and an irqfd) whenever the
//! guest enables MSI-X or changes an unmasked vector, and [`Msix::trigger`] either signals the
//! vector or, while it or the whole function is masked, sets its pending bit; unmasking a
//! pending vector sends it. With MSI-X disabled a trigger is dropped: the functions here have no
//! INTx, so a guest that never enables MSI-X simply gets no interrupts.
//!
//! The table and PBA live in a memory BAR of the device; the device forwards accesses in those
//! ranges to [`Msix::read_table`], [`Msix::write_table`] and [`Msix::read_pba`].

use std::sync::{Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::PciError;

/// Capability id of MSI-X.
pub const CAP_ID_MSIX: u8 = 0x11;
/// Bytes per table entry.
pub const ENTRY_SIZE: u64 = 16;
/// Most vectors a function may have.
pub const MAX_VECTORS: u16 = 2048;
/// Message control: MSI-X enable.
const CONTROL_ENABLE: u16 = 1 << 15;
/// Message control: function mask.
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
/// Vector control: masked.
const VECTOR_MASKED: u32 = 1;

/// An MSI message: where the device writes and what.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsiMessage {
    /// Address (0xFEExxxxx on x86; the upper half is used with x2APIC ids).
    pub address: u64,
    /// Data (vector number and delivery mode on x86).
    pub data: u32,
}

/// Where MSI-X vectors go: the VMM implements it per device (KVM GSI routes + irqfds).
pub trait MsiRouting: Send + Sync {
    /// Vector `vector` of this device sends `msg` from now on (`None`: it is not in use, MSI-X
    /// was disabled). Called with the MSI-X state locked, before any `signal` of that vector
    /// with the new message.
    fn route(&self, vector: u16, msg: Option<MsiMessage>);
    /// Sends vector `vector` now.
    fn signal(&self, vector: u16);
}

/// One table entry as the guest sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixEntry {
    /// Message address, low 32 bits.
    pub addr_lo: u32,
    /// Message address, high 32 bits.
    pub addr_hi: u32,
    /// Message data.
    pub data: u32,
    /// Vector control (bit 0: masked).
    pub control: u32,
}

impl Default for MsixEntry {
    /// Entries come out of reset masked.
    fn default() -> Self {
        Self {
            addr_lo: 0,
            addr_hi: 0,
            data: 0,
            control: VECTOR_MASKED,
        }
    }
}

impl MsixEntry {
    fn message(&self) -> MsiMessage {
        MsiMessage {
            address: u64::from(self.addr_hi) << 32 | u64::from(self.addr_lo),
            data: self.data,
        }
    }

    fn masked(&self) -> bool {
        self.control & VECTOR_MASKED != 0
    }

    fn bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        for (i, v) in [self.addr_lo, self.addr_hi, self.data, self.control]
            .into_iter()
            .enumerate()
        {
            b[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    fn from_bytes(b: &[u8; 16]) -> Self {
        let w = |i: usize| u32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]);
        Self {
            addr_lo: w(0),
            addr_hi: w(1),
            data: w(2),
            control: w(3),
        }
    }
}

/// Saved MSI-X state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixState {
    /// MSI-X enabled in the capability.
    pub enabled: bool,
    /// Function mask in the capability.
    pub function_masked: bool,
    /// The vector table.
    pub entries: Vec<MsixEntry>,
    /// Pending bits, one per vector.
    pub pending: Vec<bool>,
}

struct Inner {
    enabled: bool,
    function_masked: bool,
    entries: Vec<MsixEntry>,
    pending: Vec<bool>,
    /// The message last handed to the router for each vector.
    routed: Vec<Option<MsiMessage>>,
}

/// The MSI-X state of one function. Shared (`Arc`) between the device's register handlers and
/// whoever raises its interrupts; it locks internally.
pub struct Msix {
    inner: Mutex<Inner>,
    router: std::sync::Arc<dyn MsiRouting>,
}

impl Msix {
    /// `vectors` vectors (1..=2048), all masked, MSI-X disabled.
    pub fn new(vectors: u16, router: std::sync::Arc<dyn MsiRouting>) -> Result<Self, PciError> {
        if vectors == 0 || vectors > MAX_VECTORS {
            return Err(PciError::MsixVectors(vectors));
        }
        let n = usize::from(vectors);
        Ok(Self {
            inner: Mutex::new(Inner {
                enabled: false,
                function_masked: false,
                entries: vec![MsixEntry::default(); n],
                pending: vec![false; n],
                routed: vec![None; n],
            }),
            router,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Number of vectors.
    pub fn vectors(&self) -> u16 {
        self.lock().entries.len() as u16
    }

    /// Bytes of the table in the BAR.
    pub fn table_size(&self) -> u64 {
        u64::from(self.vectors()) * ENTRY_SIZE
    }

    /// Bytes of the PBA in the BAR (whole qwords).
    pub fn pba_size(&self) -> u64 {
        u64::from(self.vectors()).div_ceil(64) * 8
    }

    /// The capability body (after id and next pointer) and its write mask, for a table at
    /// `table_offset` and a PBA at `pba_offset` in BAR `bar` (offsets 8-byte aligned).
    pub fn capability(&self, bar: u8, table_offset: u32, pba_offset: u32) -> ([u8; 10], [u8; 10]) {
        let mut body = [0u8; 10];
        body[0..2].copy_from_slice(&(self.vectors() - 1).to_le_bytes());
        body[2..6].copy_from_slice(&(table_offset | u32::from(bar & 7)).to_le_bytes());
        body[6..10].copy_from_slice(&(pba_offset | u32::from(bar & 7)).to_le_bytes());
        let mut wmask = [0u8; 10];
        wmask[1] = ((CONTROL_ENABLE | CONTROL_FUNCTION_MASK) >> 8) as u8;
        (body, wmask)
    }

    /// Takes the capability's message control word after the guest wrote it.
    pub fn set_control(&self, control: u16) {
        let mut s = self.lock();
        s.enabled = control & CONTROL_ENABLE != 0;
        s.function_masked = control & CONTROL_FUNCTION_MASK != 0;
        for v in 0..s.entries.len() {
            self.refresh(&mut s, v);
        }
    }

    /// Whether MSI-X is enabled.
    pub fn enabled(&self) -> bool {
        self.lock().enabled
    }

    /// Brings vector `v`'s route up to date and sends it if it became deliverable while pending.
    fn refresh(&self, s: &mut Inner, v: usize) {
        let entry = s.entries[v];
        let want = if !s.enabled {
            None
        } else if entry.masked() {
            // A masked vector keeps its route: nothing is signalled through it meanwhile.
            s.routed[v]
        } else {
            Some(entry.message())
        };
        if want != s.routed[v] {
            s.routed[v] = want;
            self.router.route(v as u16, want);
        }
        if s.enabled && !s.function_masked && !entry.masked() && s.pending[v] {
            s.pending[v] = false;
            self.router.signal(v as u16);
        }
    }

    /// Reads the vector table at `offset` (any size; past the table reads 0).
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        let s = self.lock();
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| {
                    let e = s.entries.get(usize::try_from(o / ENTRY_SIZE).ok()?)?;
                    Some(e.bytes()[(o % ENTRY_SIZE) as usize])
                })
                .unwrap_or(0);
        }
    }

    /// Writes the vector table at `offset` (any size; past the table is dropped).
    pub fn write_table(&self, offset: u64, data: &[u8]) {
        let mut s = self.lock();
        let mut touched: Option<usize> = None;
        for (i, b) in data.iter().enumerate() {
            let Some(o) = offset.checked_add(i as u64) else {
                break;
            };
            let Ok(v) = usize::try_from(o / ENTRY_SIZE) else {
                break;
            };
            let Some(e) = s.entries.get_mut(v) else {
                break;
            };
            let mut bytes = e.bytes();
            bytes[(o % ENTRY_SIZE) as usize] = *b;
            *e = MsixEntry::from_bytes(&bytes);
            if let Some(prev) = touched.filter(|&p| p != v) {
                self.refresh(&mut s, prev);
            }
            touched = Some(v);
        }
        if let Some(v) = touched {
            self.refresh(&mut s, v);
        }
    }

    /// Reads the pending-bit array at `offset` (any size; past it reads 0). Writes to the PBA
    /// are ignored, as the specification asks.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        let s = self.lock();
        for (i, b) in data.iter_mut().enumerate() {
            let Some(byte) = offset.checked_add(i as u64) else {
                *b = 0;
                continue;
            };
            let mut v = 0u8;
            for bit in 0..8u64 {
                let idx = byte.saturating_mul(8).saturating_add(bit);
                let set = usize::try_from(idx)
                    .ok()
                    .and_then(|i| s.pending.get(i))
                    .copied()
                    .unwrap_or(false);
                v |= u8::from(set) << bit;
            }
            *b = v;
        }
    }

    /// Raises vector `vector`: signals it, or marks it pending while masked. Dropped when
    /// MSI-X is disabled or the vector does not exist.
    pub fn trigger(&self, vector: u16) {
        let mut s = self.lock();
        let v = usize::from(vector);
        let Some(entry) = s.entries.get(v).copied() else {
            return;
        };
        if !s.enabled {
            return;
        }
        if s.function_masked || entry.masked() {
            s.pending[v] = true;
            return;
        }
        drop(s);
        self.router.signal(vector);
    }

    /// Back to the reset state: disabled, all vectors masked, nothing pending, no routes.
    pub fn reset(&self) {
        let mut s = self.lock();
        s.enabled = false;
        s.function_masked = false;
        for e in s.entries.iter_mut() {
            *e = MsixEntry::default();
        }
        s.pending.iter_mut().for_each(|p| *p = false);
        for v in 0..s.routed.len() {
            if s.routed[v].take().is_some() {
                self.router.route(v as u16, None);
            }
        }
    }

    /// The state to save.
    pub fn save(&self) -> MsixState {
        let s = self.lock();
        MsixState {
            enabled: s.enabled,
            function_masked: s.function_masked,
            entries: s.entries.clone(),
            pending: s.pending.clone(),
        }
    }

    /// Restores a saved state with the same number of vectors, re-routing what is in use.
    pub fn restore(&self, state: &MsixState) -> Result<(), PciError> {
        let mut s = self.lock();
        let n = s.entries.len();
        if state.entries.len() != n || state.pending.len() != n {
            return Err(PciError::StateSize {
                what: "MSI-X table",
                len: state.entries.len(),
                want: n,
            });
        }
        s.enabled = state.enabled;
        s.function_masked = state.function_masked;
        s.entries.clone_from(&state.entries);
        s.pending.clone_from(&state.pending);
        for v in 0..n {
            self.refresh(&mut s, v);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[derive(Default)]
    struct Log(Mutex<Vec<String>>);

    impl Log {
        fn take(&self) -> Vec<String> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    impl MsiRouting for Log {
        fn route(&self, vector: u16, msg: Option<MsiMessage>) {
            let s = match msg {
                Some(m) => format!("route {vector} {:#x}/{:#x}", m.address, m.data),
                None => format!("unroute {vector}"),
            };
            self.0.lock().unwrap().push(s);
        }
        fn signal(&self, vector: u16) {
            self.0.lock().unwrap().push(format!("signal {vector}"));
        }
    }

    fn setup(n: u16) -> (Arc<Log>, Msix) {
        let log = Arc::new(Log::default());
        let m = Msix::new(n, log.clone()).unwrap();
        (log, m)
    }

    fn program(m: &Msix, v: u64, addr: u32, data: u32, masked: bool) {
        m.write_table(v * 16, &addr.to_le_bytes());
        m.write_table(v * 16 + 4, &0u32.to_le_bytes());
        m.write_table(v * 16 + 8, &data.to_le_bytes());
        m.write_table(v * 16 + 12, &u32::from(masked).to_le_bytes());
    }

    #[test]
    fn disabled_msix_drops_triggers() {
        let (log, m) = setup(2);
        program(&m, 0, 0xfee0_0000, 0x41, false);
        m.trigger(0);
        assert!(log.take().is_empty(), "no routes or signals while disabled");
    }

    #[test]
    fn enable_routes_and_signals() {
        let (log, m) = setup(2);
        program(&m, 0, 0xfee0_0000, 0x41, false);
        m.set_control(CONTROL_ENABLE);
        assert_eq!(log.take(), vec!["route 0 0xfee00000/0x41"]);
        m.trigger(0);
        assert_eq!(log.take(), vec!["signal 0"]);
        m.trigger(1);
        assert!(log.take().is_empty(), "vector 1 is masked");
        m.trigger(7);
        assert!(log.take().is_empty(), "no such vector");
    }

    #[test]
    fn masked_vector_becomes_pending_and_fires_on_unmask() {
        let (log, m) = setup(3);
        m.set_control(CONTROL_ENABLE);
        program(&m, 2, 0xfee0_1000, 0x55, true);
        log.take();
        m.trigger(2);
        let mut pba = [0u8; 8];
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0b100);
        m.write_table(2 * 16 + 12, &0u32.to_le_bytes());
        assert_eq!(
            log.take(),
            vec!["route 2 0xfee01000/0x55", "signal 2"],
            "route before the pending signal"
        );
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0);
    }

    #[test]
    fn function_mask_holds_all_vectors() {
        let (log, m) = setup(2);
        program(&m, 0, 0xfee0_0000, 0x30, false);
        m.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        log.take();
        m.trigger(0);
        assert!(log.take().is_empty());
        m.set_control(CONTROL_ENABLE);
        assert_eq!(log.take(), vec!["signal 0"]);
    }

    #[test]
    fn changing_an_unmasked_vector_reroutes() {
        let (log, m) = setup(1);
        m.set_control(CONTROL_ENABLE);
        program(&m, 0, 0xfee0_0000, 0x30, false);
        log.take();
        m.write_table(8, &0x31u32.to_le_bytes());
        assert_eq!(log.take(), vec!["route 0 0xfee00000/0x31"]);
        // A 64-bit write covering address low and high.
        m.write_table(0, &0x0000_0001_fee0_2000u64.to_le_bytes());
        assert_eq!(log.take(), vec!["route 0 0x1fee02000/0x31"]);
        let mut d = [0u8; 16];
        m.read_table(0, &mut d);
        assert_eq!(u32::from_le_bytes(d[0..4].try_into().unwrap()), 0xfee0_2000);
    }

    #[test]
    fn disable_and_reset_unroute() {
        let (log, m) = setup(1);
        program(&m, 0, 0xfee0_0000, 0x30, false);
        m.set_control(CONTROL_ENABLE);
        log.take();
        m.set_control(0);
        assert_eq!(log.take(), vec!["unroute 0"]);
        m.set_control(CONTROL_ENABLE);
        log.take();
        m.reset();
        assert_eq!(log.take(), vec!["unroute 0"]);
        let mut d = [0u8; 4];
        m.read_table(12, &mut d);
        assert_eq!(u32::from_le_bytes(d), 1, "masked after reset");
    }

    #[test]
    fn odd_accesses_are_safe() {
        let (_, m) = setup(4);
        for off in [0u64, 3, 15, 63, 64, 65, 4096, u64::MAX - 2, u64::MAX] {
            for size in [0usize, 1, 2, 4, 8, 16] {
                let mut d = vec![0xffu8; size];
                m.read_table(off, &mut d);
                m.write_table(off, &d);
                m.read_pba(off, &mut d);
            }
        }
        assert!(Msix::new(0, Arc::new(Log::default())).is_err());
        assert!(Msix::new(4096, Arc::new(Log::default())).is_err());
    }

    #[test]
    fn capability_layout() {
        let (_, m) = setup(3);
        let (body, wmask) = m.capability(0, 0x4000, 0x5000);
        assert_eq!(u16::from_le_bytes([body[0], body[1]]), 2, "table size - 1");
        assert_eq!(u32::from_le_bytes(body[2..6].try_into().unwrap()), 0x4000);
        assert_eq!(u32::from_le_bytes(body[6..10].try_into().unwrap()), 0x5000);
        assert_eq!(wmask[1], 0xc0);
        assert_eq!(m.pba_size(), 8);
        assert_eq!(m.table_size(), 48);
    }

    #[test]
    fn save_restore_round_trip() {
        let (log, m) = setup(2);
        program(&m, 1, 0xfee0_0000, 0x42, false);
        m.set_control(CONTROL_ENABLE);
        let s = m.save();
        let (log2, m2) = setup(2);
        m2.restore(&s).unwrap();
        assert_eq!(log2.take(), vec!["route 1 0xfee00000/0x42"]);
        assert_eq!(m2.save(), s);
        let (_, m3) = setup(3);
        assert!(m3.restore(&s).is_err());
        drop(log);
    }
}
