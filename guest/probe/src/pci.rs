//! PCI bus 0: configuration access (ECAM from the MCFG, else mechanism #1 at 0xCF8/0xCFC),
//! enumeration, BAR sizing and assignment, capability lists. Runs at CPL3 (ECAM is MMIO in the
//! user-accessible identity map; the configuration ports are allowed by the TSS I/O bitmap).

use crate::cpu::{inl, inw, outl, outw};
use crate::mmio;
use crate::serial::Line;

/// Configuration space access for bus 0.
#[derive(Clone, Copy)]
pub struct Pci {
    /// ECAM base of bus 0 (0: use the configuration ports).
    pub ecam: u64,
}

/// Command register bits: memory space, bus master, INTx disable.
const CMD_MEM: u16 = 1 << 1;
const CMD_MASTER: u16 = 1 << 2;
const CMD_INTX_OFF: u16 = 1 << 10;

impl Pci {
    fn ecam_addr(&self, dev: u8, func: u8, off: u16) -> u64 {
        self.ecam + ((dev as u64) << 15) + ((func as u64) << 12) + off as u64
    }

    fn port_addr(dev: u8, func: u8, off: u16) -> u32 {
        0x8000_0000 | ((dev as u32) << 11) | ((func as u32) << 8) | (off as u32 & 0xfc)
    }

    /// Reads a dword of function `(dev, func)` at `off` (4-byte aligned).
    pub fn r32(&self, dev: u8, func: u8, off: u16) -> u32 {
        if self.ecam != 0 {
            return mmio::r32(self.ecam_addr(dev, func, off));
        }
        if off >= 256 {
            return u32::MAX;
        }
        outl(0xcf8, Self::port_addr(dev, func, off));
        inl(0xcfc)
    }

    /// Reads a word at `off` (2-byte aligned).
    pub fn r16(&self, dev: u8, func: u8, off: u16) -> u16 {
        if self.ecam != 0 {
            return mmio::r16(self.ecam_addr(dev, func, off));
        }
        if off >= 256 {
            return u16::MAX;
        }
        outl(0xcf8, Self::port_addr(dev, func, off));
        inw(0xcfc + (off & 2))
    }

    /// Reads a byte at `off`.
    pub fn r8(&self, dev: u8, func: u8, off: u16) -> u8 {
        (self.r16(dev, func, off & !1) >> ((off & 1) * 8)) as u8
    }

    /// Writes a dword at `off` (4-byte aligned).
    pub fn w32(&self, dev: u8, func: u8, off: u16, v: u32) {
        if self.ecam != 0 {
            return mmio::w32(self.ecam_addr(dev, func, off), v);
        }
        if off < 256 {
            outl(0xcf8, Self::port_addr(dev, func, off));
            outl(0xcfc, v);
        }
    }

    /// Writes a word at `off` (2-byte aligned).
    pub fn w16(&self, dev: u8, func: u8, off: u16, v: u16) {
        if self.ecam != 0 {
            return mmio::w16(self.ecam_addr(dev, func, off), v);
        }
        if off < 256 {
            outl(0xcf8, Self::port_addr(dev, func, off));
            outw(0xcfc + (off & 2), v);
        }
    }

    /// Offsets of the capabilities with id `id` of a function (up to 48 list entries).
    pub fn caps(&self, dev: u8, func: u8, id: u8) -> impl Iterator<Item = u16> + '_ {
        let has_list = self.r16(dev, func, 0x06) & 0x10 != 0;
        let mut p = if has_list {
            self.r8(dev, func, 0x34) & 0xfc
        } else {
            0
        };
        let mut left = 48;
        core::iter::from_fn(move || {
            while p >= 0x40 && left > 0 {
                left -= 1;
                let at = p as u16;
                let cid = self.r8(dev, func, at);
                p = self.r8(dev, func, at + 1) & 0xfc;
                if cid == id {
                    return Some(at);
                }
            }
            None
        })
    }
}

/// Most functions remembered (virtio functions only).
pub const MAX_FUNCS: usize = 16;

/// A memory BAR: address and size (size 0: absent or I/O).
#[derive(Clone, Copy, Default)]
pub struct Bar {
    /// Guest-physical address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

/// A function the probe may drive.
#[derive(Clone, Copy, Default)]
pub struct Func {
    /// Device number on bus 0.
    pub dev: u8,
    /// Function number.
    pub func: u8,
    /// Vendor id.
    pub vendor: u16,
    /// Device id.
    pub device: u16,
    /// Memory BARs by index (a 64-bit BAR fills its lower index).
    pub bars: [Bar; 6],
}

/// Address ranges a new BAR must not overlap: RAM and reserved regions (e820), ECAM, the
/// interrupt/firmware area below 4 GiB, and every BAR seen or placed.
pub struct Busy {
    /// `[start, end)` ranges.
    pub r: [(u64, u64); 48],
    /// Valid entries.
    pub n: usize,
}

impl Busy {
    /// Records a busy range (ignored when the table is full).
    pub fn add(&mut self, s: u64, len: u64) {
        if self.n < self.r.len() && len != 0 {
            self.r[self.n] = (s, s.saturating_add(len));
            self.n += 1;
        }
    }

    /// Lowest `size`-aligned address in `[WINDOW_START, WINDOW_END)` that overlaps nothing busy.
    fn alloc(&mut self, size: u64) -> Option<u64> {
        let mut a = WINDOW_START;
        'next: while a.checked_add(size)? <= WINDOW_END {
            for &(s, e) in &self.r[..self.n] {
                if a < e && s < a + size {
                    a = e.next_multiple_of(size);
                    continue 'next;
                }
            }
            self.add(a, size);
            return Some(a);
        }
        None
    }
}

/// Window for BARs the firmware left unassigned: 32-bit, below the IOAPIC/LAPIC area (QEMU
/// microvm's PCIe MMIO window starts at 3 GiB).
const WINDOW_START: u64 = 0xc000_0000;
const WINDOW_END: u64 = 0xfec0_0000;

fn hex2(l: &mut Line, v: u64, digits: u32) {
    for i in (0..digits).rev() {
        l.b(&[b"0123456789abcdef"[((v >> (4 * i)) & 15) as usize]]);
    }
}

/// Prints `bb:dd.f` for a bus-0 function.
pub fn bdf(l: &mut Line, dev: u8, func: u8) {
    hex2(l, 0, 2);
    l.s(":");
    hex2(l, dev as u64, 2);
    l.s(".");
    hex2(l, func as u64, 1);
}

/// Walks bus 0: prints `pci=bb:dd.f vvvv:dddd class=0xcccccc` per function, and for each virtio
/// function (vendor 0x1af4) sizes its memory BARs, assigns unassigned ones from the window, and
/// enables memory decoding and bus mastering. Returns the number of virtio functions stored.
pub fn scan(pci: &Pci, busy: &mut Busy, out: &mut [Func; MAX_FUNCS]) -> usize {
    let mut n = 0;
    for dev in 0..32u8 {
        for func in 0..8u8 {
            let id = pci.r32(dev, func, 0);
            if id & 0xffff == 0xffff || id == 0 {
                if func == 0 {
                    break;
                }
                continue;
            }
            let class = pci.r32(dev, func, 8) >> 8;
            let hdr = pci.r8(dev, func, 0x0e);
            {
                let mut l = Line::new();
                l.s("pci=");
                bdf(&mut l, dev, func);
                l.s(" ");
                hex2(&mut l, (id & 0xffff) as u64, 4);
                l.s(":");
                hex2(&mut l, (id >> 16) as u64, 4);
                l.s(" class=0x");
                hex2(&mut l, class as u64, 6);
            }
            if id & 0xffff == 0x1af4 && hdr & 0x7f == 0 && n < MAX_FUNCS {
                let mut f = Func {
                    dev,
                    func,
                    vendor: id as u16,
                    device: (id >> 16) as u16,
                    ..Default::default()
                };
                size_bars(pci, &mut f, busy);
                out[n] = f;
                n += 1;
            }
            if func == 0 && hdr & 0x80 == 0 {
                break;
            }
        }
    }
    // Assign only after every firmware-placed BAR is known to `busy`.
    for f in out[..n].iter_mut() {
        assign_bars(pci, f, busy);
    }
    n
}

/// Sizes the memory BARs of `f` with decoding off; records firmware-assigned ones as busy.
fn size_bars(pci: &Pci, f: &mut Func, busy: &mut Busy) {
    let (d, fu) = (f.dev, f.func);
    let cmd = pci.r16(d, fu, 4);
    pci.w16(d, fu, 4, cmd & !(CMD_MEM | 1));
    let mut i = 0;
    while i < 6 {
        let off = 0x10 + 4 * i as u16;
        let lo = pci.r32(d, fu, off);
        let is64 = lo & 1 == 0 && (lo >> 1) & 3 == 2 && i < 5;
        if lo & 1 != 0 {
            i += 1;
            continue;
        }
        pci.w32(d, fu, off, u32::MAX);
        let mut mask = (pci.r32(d, fu, off) & !0xf) as u64;
        pci.w32(d, fu, off, lo);
        let mut addr = (lo & !0xf) as u64;
        if is64 {
            let hi = pci.r32(d, fu, off + 4);
            pci.w32(d, fu, off + 4, u32::MAX);
            mask |= (pci.r32(d, fu, off + 4) as u64) << 32;
            pci.w32(d, fu, off + 4, hi);
            addr |= (hi as u64) << 32;
        } else if mask != 0 {
            mask |= 0xffff_ffff_0000_0000;
        }
        let size = if mask == 0 {
            0
        } else {
            (!mask).wrapping_add(1)
        };
        f.bars[i] = Bar { addr, size };
        if size != 0 && addr != 0 {
            busy.add(addr, size);
        }
        i += if is64 { 2 } else { 1 };
    }
    pci.w16(d, fu, 4, cmd);
}

/// Places the BARs of `f` that are unassigned or outside the mapped address space, then turns
/// on memory decoding and bus mastering (INTx off: the probe uses MSI-X).
fn assign_bars(pci: &Pci, f: &mut Func, busy: &mut Busy) {
    let (d, fu) = (f.dev, f.func);
    let cmd = pci.r16(d, fu, 4);
    pci.w16(d, fu, 4, cmd & !(CMD_MEM | 1));
    for i in 0..6 {
        let b = f.bars[i];
        if b.size == 0 || (b.addr != 0 && crate::phys::ok(b.addr, b.size)) {
            continue;
        }
        let off = 0x10 + 4 * i as u16;
        let mut l = Line::new();
        l.s("pci_assign=");
        bdf(&mut l, d, fu);
        l.s(" bar").dec(i as u64).s("=");
        match busy.alloc(b.size.max(0x1000)) {
            Some(a) => {
                let lo = pci.r32(d, fu, off);
                pci.w32(d, fu, off, (lo & 0xf) | a as u32);
                if (lo >> 1) & 3 == 2 {
                    pci.w32(d, fu, off + 4, (a >> 32) as u32);
                }
                f.bars[i].addr = a;
                l.hex(a).s(" size=").hex(b.size);
            }
            None => {
                f.bars[i].size = 0;
                l.s("none");
            }
        }
    }
    pci.w16(d, fu, 4, (cmd & !1) | CMD_MEM | CMD_MASTER | CMD_INTX_OFF);
}
