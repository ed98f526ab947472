//! Writes the `migration_stream` seeds into the directory given as the only argument
//! (`fuzz/seeds/migration_stream` in the repository), with the crate's own encoder so
//! every memory and sparse chunk carries a correct crc32c:
//!
//! ```text
//! cd fuzz && cargo run --example gen_migration_seeds -- seeds/migration_stream
//! ```
//!
//! Not a fuzz target: `cargo fuzz build` builds only the `[[bin]]`s.

mod common;

use common::{msg, out_dir, pages, write};

use vm_migration::protocol::{
    encode_memory_chunk, encode_sparse_chunk, features, Complete, Config, Hello, MemoryFd, Message,
    PROTOCOL_VERSION,
};
use vm_migration::{RamRange, PAGE_SIZE};

/// A page with only a few non-zero stretches, which the sparse encoder keeps short.
fn sparse_page() -> Vec<u8> {
    let mut p = vec![0u8; PAGE_SIZE];
    p[8..16].copy_from_slice(b"FERRY!!!");
    p[2048..2056].copy_from_slice(&0xdead_beef_u64.to_le_bytes());
    p[PAGE_SIZE - 8..].copy_from_slice(&[0xff; 8]);
    p
}

const VM_CONFIG: &[u8] =
    br#"{"cpus":{"boot_vcpus":1,"max_vcpus":1},"memory":{"size":1048576},"payload":{"kernel":"/k"}}"#;

fn main() {
    let dir = out_dir("usage: gen_migration_seeds DIR");
    let ram = vec![
        RamRange {
            gpa: 0,
            size: 0x10_0000,
        },
        RamRange {
            gpa: 0x1_0000_0000,
            size: 0x2000,
        },
    ];

    // The source's side of a whole migration: every message it sends, in order.
    let mut s = Vec::new();
    msg(
        &mut s,
        Message::Hello(Hello {
            version: PROTOCOL_VERSION,
            features: features::ALL,
            build: "ferry seed",
        }),
    );
    msg(
        &mut s,
        Message::Config(Config {
            ram: ram.clone(),
            vm_config: VM_CONFIG,
        }),
    );
    msg(
        &mut s,
        Message::Channels {
            count: 1,
            token: 0x0123_4567_89ab_cdef,
        },
    );
    encode_memory_chunk(0x1000, &pages(1, |_| true), &mut s).unwrap();
    encode_memory_chunk(0x4000, &pages(10, |i| i % 3 == 1), &mut s).unwrap();
    encode_sparse_chunk(
        0x2_0000,
        &[sparse_page(), vec![0; PAGE_SIZE], pages(1, |_| true)].concat(),
        &mut s,
    )
    .unwrap();
    msg(
        &mut s,
        Message::IterationDone {
            iteration: 0,
            pages: 14,
            bytes: 6 * PAGE_SIZE as u64,
        },
    );
    encode_memory_chunk(0x1000, &pages(1, |_| false), &mut s).unwrap();
    msg(
        &mut s,
        Message::IterationDone {
            iteration: 1,
            pages: 1,
            bytes: 0,
        },
    );
    msg(
        &mut s,
        Message::State {
            vcpus: b"[{\"regs\":{}}]",
            devices: b"{}",
        },
    );
    msg(
        &mut s,
        Message::Complete(Complete {
            paused_us: 1234,
            source_info: b"{}",
        }),
    );
    msg(
        &mut s,
        Message::Measured {
            downtime_us: 1500,
            total_us: 90_000,
        },
    );
    write(&dir, "source_full", &s);

    // The destination's replies.
    let mut d = Vec::new();
    msg(
        &mut d,
        Message::Hello(Hello {
            version: PROTOCOL_VERSION,
            features: features::ALL,
            build: "ferry seed",
        }),
    );
    msg(&mut d, Message::ConfigAccepted);
    msg(&mut d, Message::ChannelsReady);
    msg(&mut d, Message::PassReceived { iteration: 0 });
    msg(&mut d, Message::Resumed { downtime_us: 1400 });
    msg(
        &mut d,
        Message::Refused {
            reason: "RAM layout differs",
        },
    );
    msg(
        &mut d,
        Message::Abort {
            reason: "cancelled",
        },
    );
    write(&dir, "destination_replies", &d);

    // An extra connection: its hello, then memory.
    let mut c = Vec::new();
    msg(
        &mut c,
        Message::ChannelHello {
            index: 1,
            token: 0x0123_4567_89ab_cdef,
        },
    );
    encode_memory_chunk(0x1_0000_0000, &pages(2, |_| true), &mut c).unwrap();
    encode_sparse_chunk(0x8000, &sparse_page(), &mut c).unwrap();
    write(&dir, "channel", &c);

    // A local migration: RAM as file descriptors (the fds themselves travel beside).
    let mut l = Vec::new();
    msg(
        &mut l,
        Message::MemoryFds(vec![
            MemoryFd {
                gpa: 0,
                size: 0x10_0000,
                file_offset: 0,
            },
            MemoryFd {
                gpa: 0x1_0000_0000,
                size: 0x2000,
                file_offset: 0x10_0000,
            },
        ]),
    );
    msg(
        &mut l,
        Message::Config(Config {
            ram,
            vm_config: VM_CONFIG,
        }),
    );
    write(&dir, "local_memory_fds", &l);

    // The smallest input with a data page past its crc32c.
    let mut one = Vec::new();
    encode_memory_chunk(0, &pages(1, |_| true), &mut one).unwrap();
    write(&dir, "one_data_page", &one);
}
