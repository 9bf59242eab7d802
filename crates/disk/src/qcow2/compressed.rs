//! Compressed clusters, as `qemu-img convert -c` writes them: a raw deflate stream (zlib
//! compression type) of one cluster, packed at any 512-byte-sector offset.

use miniz_oxide::inflate::core::{decompress, inflate_flags, DecompressorOxide};
use miniz_oxide::inflate::TINFLStatus;

/// Host offset and length in bytes of the compressed data an L2 entry describes: the low
/// `62 - (cluster_bits - 8)` bits are the offset, the next `cluster_bits - 8` bits the number
/// of extra 512-byte sectors.
pub(crate) fn parse(entry: u64, cluster_bits: u32) -> (u64, u64) {
    let shift = 62 - (cluster_bits - 8);
    let offset = entry & ((1u64 << shift) - 1);
    let sectors = ((entry >> shift) & ((1u64 << (cluster_bits - 8)) - 1)) + 1;
    (offset, sectors * 512 - (offset & 511))
}

/// Inflates `input` into `out` (one cluster). The stream may end early or carry trailing
/// bytes, as QEMU allows, as long as it fills `out`; false when the data is not deflate.
pub(crate) fn inflate(input: &[u8], out: &mut [u8]) -> bool {
    let mut state = Box::<DecompressorOxide>::default();
    let flags = inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF;
    let (status, _, written) = decompress(&mut state, input, out, 0, flags);
    written == out.len() && matches!(status, TINFLStatus::Done | TINFLStatus::HasMoreOutput)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_matches_qemu_layout() {
        // 64 KiB clusters: 54 offset bits, 8 sector-count bits.
        let e = (1u64 << 62) | (3u64 << 54) | 0x12_3456;
        assert_eq!(parse(e, 16), (0x12_3456, 4 * 512 - 0x56));
    }

    #[test]
    fn garbage_does_not_inflate() {
        let mut out = vec![0u8; 4096];
        assert!(!inflate(&[0xff; 64], &mut out));
        assert!(!inflate(&[], &mut out));
    }
}
