//! Walks a split-virtqueue descriptor chain laid out by the input (see
//! `ferro_virtio::fuzzing::chain_walk`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ferro_virtio::fuzzing::chain_walk(data);
});
