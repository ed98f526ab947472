//! Arbitrary bytes as descriptor chains for the virtio entropy device, which writes into
//! every device-writable buffer of a chain: chain walking (loops, indirect tables, lengths
//! past 4 GiB, buffers outside RAM or across its hole) decides everything. Same input
//! layout as `virtio_blk_request`; it must never panic or loop, and the used ring must
//! hold exactly the chains the device completed.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    devices::virtio::fuzzing::descriptor_chain(data);
});
