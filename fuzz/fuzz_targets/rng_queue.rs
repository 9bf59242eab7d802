//! Runs virtio-rng's queue processing over rings laid out by the input (see
//! `ferro_virtio::fuzzing::rng_queue`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ferro_virtio::fuzzing::rng_queue(data);
});
