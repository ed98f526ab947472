//! Arbitrary bytes as what a virtio-iommu driver and the devices behind the vIOMMU do:
//! requests of any type and length, split across descriptors with any writable size,
//! served from the request queue in guest RAM; DMA through the endpoints between them;
//! event buffers, the bypass byte, resets, a migration's tracking and harvest, the
//! state's round trip (input format in `devices::viommu::fuzzing`). It must never panic,
//! answer with one of the spec's status codes, never let mappings overlap, and land or
//! fault every DMA exactly as the mappings say.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    devices::viommu::fuzzing::requests(data);
});
