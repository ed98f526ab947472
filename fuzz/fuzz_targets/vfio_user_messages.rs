//! Arbitrary bytes as vfio-user messages, both directions (input format in
//! `vfio_dirty::vfio_user::fuzzing`). Byte 0 even: a request Ferry sent, built from the
//! next bytes, and a broken or hostile device's reply to it, through the header and reply
//! parsers and the socket framing. Byte 0 odd: a hostile client's messages to an
//! in-process ferry-dma-device (no socket, no DMA mappings: no descriptors come with the
//! messages, so its jobs end UNMAPPED), through the request parser and the device's region,
//! configuration space, migration state and DMA log code. Nothing may panic, what decodes
//! must encode back to itself, a reply carries no more than was asked, and every answer
//! the device gives must decode on the client's side.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vfio_dirty::vfio_user::fuzzing;

fuzz_target!(|data: &[u8]| {
    match data.split_first() {
        Some((direction, rest)) if direction & 1 == fuzzing::CLIENT => fuzzing::client_side(rest),
        Some((_, rest)) => fuzzing::server_side(rest, &mut dma_device::Device::new()),
        None => {}
    }
});
