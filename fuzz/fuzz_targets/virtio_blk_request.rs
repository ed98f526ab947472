//! Arbitrary bytes as a virtio-blk request queue: the queue's size and indexes and the
//! whole of guest RAM (rings, descriptors, indirect tables, request headers) come from
//! the input (layout in `devices::virtio::fuzzing`), then the device serves the queue as
//! its worker would. It must never panic, never loop, and put in the used ring exactly
//! the chains it says it completed.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    devices::virtio::fuzzing::block_request(data);
});
