//! The guest's RAM regions and the memory map (e820 / PVH memmap) that describes them.

use crate::layout::{
    ACPI_END, ACPI_START, EBDA_START, HIGH_RAM_START, MMIO_HOLE_END, MMIO_HOLE_START,
};

/// What a memory map entry holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionKind {
    /// Usable RAM.
    Ram,
    /// Reserved: firmware areas, the EBDA gap, the ACPI tables' home.
    Reserved,
}

impl RegionKind {
    /// The e820 / PVH type number.
    pub fn e820_type(self) -> u32 {
        match self {
            Self::Ram => 1,
            Self::Reserved => 2,
        }
    }
}

/// One entry of the memory map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapEntry {
    /// Guest-physical start.
    pub start: u64,
    /// Length in bytes.
    pub size: u64,
    /// Kind.
    pub kind: RegionKind,
}

/// How `mem_bytes` of RAM is laid out: below the 32-bit MMIO hole, and the rest above 4 GiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamLayout {
    /// Bytes of RAM from address 0 (at most `MMIO_HOLE_START`).
    pub low: u64,
    /// Bytes of RAM from `MMIO_HOLE_END`.
    pub high: u64,
}

impl RamLayout {
    /// Splits `mem_bytes` around the MMIO hole.
    pub fn new(mem_bytes: u64) -> Self {
        let low = mem_bytes.min(MMIO_HOLE_START);
        Self {
            low,
            high: mem_bytes - low,
        }
    }

    /// The (guest address, size) ranges to back with host memory.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        let mut r = vec![(0, self.low)];
        if self.high > 0 {
            r.push((MMIO_HOLE_END, self.high));
        }
        r
    }

    /// End (exclusive) of RAM below 4 GiB.
    pub fn low_end(&self) -> u64 {
        self.low
    }

    /// The memory map handed to the guest, sorted and non-overlapping.
    pub fn memory_map(&self) -> Vec<MapEntry> {
        let mut map = vec![
            MapEntry {
                start: 0,
                size: EBDA_START,
                kind: RegionKind::Ram,
            },
            MapEntry {
                start: EBDA_START,
                size: 0xa0000 - EBDA_START,
                kind: RegionKind::Reserved,
            },
            MapEntry {
                start: ACPI_START,
                size: ACPI_END - ACPI_START,
                kind: RegionKind::Reserved,
            },
        ];
        if self.low > HIGH_RAM_START {
            map.push(MapEntry {
                start: HIGH_RAM_START,
                size: self.low - HIGH_RAM_START,
                kind: RegionKind::Ram,
            });
        }
        if self.high > 0 {
            map.push(MapEntry {
                start: MMIO_HOLE_END,
                size: self.high,
                kind: RegionKind::Ram,
            });
        }
        map
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn ram_total(map: &[MapEntry]) -> u64 {
        map.iter()
            .filter(|e| e.kind == RegionKind::Ram)
            .map(|e| e.size)
            .sum()
    }

    #[test]
    fn small_vm_has_no_high_ram() {
        let l = RamLayout::new(256 * MIB);
        assert_eq!(l.ranges(), vec![(0, 256 * MIB)]);
        let map = l.memory_map();
        assert_eq!(map.len(), 4);
        // All RAM but the 0x9fc00..0x100000 window is usable.
        assert_eq!(ram_total(&map), 256 * MIB - (HIGH_RAM_START - EBDA_START));
    }

    #[test]
    fn large_vm_splits_around_the_hole() {
        let l = RamLayout::new(16 * GIB);
        assert_eq!(l.low, 3 * GIB);
        assert_eq!(l.high, 13 * GIB);
        assert_eq!(l.ranges(), vec![(0, 3 * GIB), (4 * GIB, 13 * GIB)]);
        let map = l.memory_map();
        let last = map.last().unwrap();
        assert_eq!((last.start, last.size), (4 * GIB, 13 * GIB));
        // Nothing in the map touches the MMIO hole.
        for e in &map {
            assert!(e.start + e.size <= MMIO_HOLE_START || e.start >= MMIO_HOLE_END);
        }
    }

    #[test]
    fn map_is_sorted_and_disjoint() {
        for mib in [16, 512, 3072, 3073, 4096, 65536] {
            let map = RamLayout::new(mib * MIB).memory_map();
            for w in map.windows(2) {
                assert!(w[0].start + w[0].size <= w[1].start, "{mib}: {w:?}");
            }
        }
    }

    #[test]
    fn exactly_hole_sized_vm() {
        let l = RamLayout::new(3 * GIB);
        assert_eq!(l.high, 0);
        assert_eq!(l.ranges().len(), 1);
    }
}
