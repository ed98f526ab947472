//! Writes the `receive_session` seeds into the directory given as the only argument
//! (`fuzz/seeds/receive_session` in the repository), with the crate's own encoder so
//! every memory and sparse chunk carries a correct crc32c:
//!
//! ```text
//! cd fuzz && cargo run --example gen_receive_seeds -- seeds/receive_session
//! ```
//!
//! A seed is what a source sends on each connection, as the target reads it: segments of
//! `u32` little-endian length + bytes, the main connection first, then the extra ones in
//! the order they are accepted. The name says how the session ends.
//!
//! Not a fuzz target: `cargo fuzz build` builds only the `[[bin]]`s.

mod common;

use common::{msg, out_dir, pages, write};

use vm_migration::protocol::{
    encode_memory_chunk, encode_sparse_chunk, features, Complete, Config, Hello, Message,
    PROTOCOL_VERSION,
};
use vm_migration::{RamRange, PAGE_SIZE};

const TOKEN: u64 = 0x0123_4567_89ab_cdef;
/// 16 pages low, 2 pages above 4 GiB: 18 pages in all.
const LOW: u64 = 0;
const HIGH: u64 = 0x1_0000_0000;

fn layout() -> Vec<RamRange> {
    vec![
        RamRange {
            gpa: LOW,
            size: 0x1_0000,
        },
        RamRange {
            gpa: HIGH,
            size: 0x2000,
        },
    ]
}

/// A page with only a few non-zero stretches, which the sparse encoder keeps short.
fn sparse_page() -> Vec<u8> {
    let mut p = vec![0u8; PAGE_SIZE];
    p[8..16].copy_from_slice(b"FERRY!!!");
    p[PAGE_SIZE - 8..].copy_from_slice(&[0xff; 8]);
    p
}

fn chunk(out: &mut Vec<u8>, gpa: u64, data: &[u8]) {
    encode_memory_chunk(gpa, data, out).expect("chunk encodes");
}

fn sparse(out: &mut Vec<u8>, gpa: u64, data: &[u8]) {
    encode_sparse_chunk(gpa, data, out).expect("sparse chunk encodes");
}

fn done(out: &mut Vec<u8>, iteration: u32, pages: u64) {
    msg(
        out,
        Message::IterationDone {
            iteration,
            pages,
            bytes: pages * PAGE_SIZE as u64,
        },
    );
}

/// `Hello` and `Config` of a source offering every feature, with `ram` as its layout.
fn handshake(out: &mut Vec<u8>, ram: Vec<RamRange>) {
    msg(
        out,
        Message::Hello(Hello {
            version: PROTOCOL_VERSION,
            features: features::ALL,
            build: "ferry seed",
        }),
    );
    msg(
        out,
        Message::Config(Config {
            ram,
            vm_config: br#"{"cpus":{"boot_vcpus":1},"memory":{"size":73728}}"#,
        }),
    );
}

fn state(out: &mut Vec<u8>) {
    msg(
        out,
        Message::State {
            vcpus: b"[{\"regs\":{}}]",
            devices: b"{}",
        },
    );
}

/// `Complete` and, after the destination's `Resumed`, the source's `Measured`.
fn complete(out: &mut Vec<u8>) {
    msg(
        out,
        Message::Complete(Complete {
            paused_us: 1234,
            source_info: b"{}",
        }),
    );
    msg(
        out,
        Message::Measured {
            downtime_us: 1500,
            total_us: 90_000,
        },
    );
}

/// The main connection of a one-connection migration: pass 0 carries every page (data,
/// zero, sparse) except `skip`, pass 1 (the final one, paused) a page turned zero and one
/// rewritten; then `State` (`states` times) and `Complete`.
fn single(skip: Option<u64>, states: usize, extra_chunk: Option<u64>) -> Vec<u8> {
    let mut s = Vec::new();
    handshake(&mut s, layout());
    let mut low = pages(8, |i| i % 3 != 2);
    if let Some(skip) = skip {
        // Send the pages around it only: two chunks.
        let at = (skip / PAGE_SIZE as u64) as usize;
        chunk(&mut s, LOW, &low[..at * PAGE_SIZE]);
        chunk(
            &mut s,
            skip + PAGE_SIZE as u64,
            &low[(at + 1) * PAGE_SIZE..],
        );
    } else {
        chunk(&mut s, LOW, &low);
    }
    sparse(
        &mut s,
        LOW + 0x8000,
        &[
            sparse_page(),
            vec![0; PAGE_SIZE],
            pages(1, |_| true),
            vec![0; 5 * PAGE_SIZE],
        ]
        .concat(),
    );
    chunk(&mut s, HIGH, &pages(2, |i| i == 1));
    if let Some(gpa) = extra_chunk {
        chunk(&mut s, gpa, &pages(1, |_| true));
    }
    done(&mut s, 0, 18);
    // Pass 1: page 1 was data and is zero now (zero_pages), page 3 changed.
    low.truncate(4 * PAGE_SIZE);
    low[PAGE_SIZE..2 * PAGE_SIZE].fill(0);
    low[3 * PAGE_SIZE] ^= 0x80;
    chunk(
        &mut s,
        LOW + PAGE_SIZE as u64,
        &low[PAGE_SIZE..2 * PAGE_SIZE],
    );
    chunk(&mut s, LOW + 3 * PAGE_SIZE as u64, &low[3 * PAGE_SIZE..]);
    done(&mut s, 1, 2);
    for _ in 0..states {
        state(&mut s);
    }
    complete(&mut s);
    s
}

/// A migration over the main connection and two extra ones, accepted in the order 2, 1.
/// Returns the main connection's bytes and the extra ones' in accept order.
fn parallel(token_on_lane_1: u64) -> (Vec<u8>, Vec<Vec<u8>>) {
    let mut m = Vec::new();
    handshake(&mut m, layout());
    msg(
        &mut m,
        Message::Channels {
            count: 2,
            token: TOKEN,
        },
    );
    let mut l1 = Vec::new();
    msg(
        &mut l1,
        Message::ChannelHello {
            index: 1,
            token: token_on_lane_1,
        },
    );
    let mut l2 = Vec::new();
    msg(
        &mut l2,
        Message::ChannelHello {
            index: 2,
            token: TOKEN,
        },
    );
    // Pass 0: main the first 6 low pages, lane 1 the next 10 (sparse), lane 2 the high two.
    chunk(&mut m, LOW, &pages(6, |i| i != 4));
    done(&mut m, 0, 6);
    sparse(
        &mut l1,
        LOW + 0x6000,
        &[sparse_page(), vec![0; 8 * PAGE_SIZE], pages(1, |_| true)].concat(),
    );
    done(&mut l1, 0, 10);
    chunk(&mut l2, HIGH, &pages(2, |_| true));
    done(&mut l2, 0, 2);
    // Pass 1 (final): a page on main turned zero, one on lane 1 rewritten, none on lane 2.
    chunk(&mut m, LOW + 0x1000, &pages(1, |_| false));
    done(&mut m, 1, 1);
    chunk(&mut l1, LOW + 0x7000, &pages(1, |_| true));
    done(&mut l1, 1, 1);
    done(&mut l2, 1, 0);
    state(&mut m);
    complete(&mut m);
    (m, vec![l2, l1])
}

fn input(main: &[u8], extra: &[Vec<u8>]) -> Vec<u8> {
    let mut v = Vec::new();
    for seg in std::iter::once(main).chain(extra.iter().map(|e| &e[..])) {
        v.extend_from_slice(&(seg.len() as u32).to_le_bytes());
        v.extend_from_slice(seg);
    }
    v
}

fn main() {
    let dir = out_dir("usage: gen_receive_seeds DIR");

    write(&dir, "ok_single", &input(&single(None, 1, None), &[]));
    let (m, lanes) = parallel(TOKEN);
    write(&dir, "ok_two_channels", &input(&m, &lanes));

    // One extra connection only: lane 2's pages go over main in pass 0.
    let (mut m1, lanes1) = parallel(TOKEN);
    let announce = {
        let mut v = Vec::new();
        msg(
            &mut v,
            Message::Channels {
                count: 2,
                token: TOKEN,
            },
        );
        v
    };
    let at = m1
        .windows(announce.len())
        .position(|w| w == announce)
        .expect("Channels in the main connection");
    let mut one = Vec::new();
    msg(
        &mut one,
        Message::Channels {
            count: 1,
            token: TOKEN,
        },
    );
    chunk(&mut one, HIGH, &pages(2, |i| i == 0));
    m1.splice(at..at + announce.len(), one);
    write(&dir, "ok_one_channel", &input(&m1, &lanes1[1..]));

    let (m, lanes) = parallel(TOKEN ^ 1);
    write(&dir, "refused_wrong_token", &input(&m, &lanes));
    write(
        &dir,
        "refused_outside_ram",
        &input(&single(None, 1, Some(LOW + 0x1_0000)), &[]),
    );
    write(
        &dir,
        "refused_missing_page",
        &input(&single(Some(LOW + 0x5000), 1, None), &[]),
    );
    write(
        &dir,
        "refused_state_twice",
        &input(&single(None, 2, None), &[]),
    );
    write(
        &dir,
        "refused_no_state",
        &input(&single(None, 0, None), &[]),
    );

    // Five ranges: more than the fake VM takes.
    let mut many = Vec::new();
    handshake(
        &mut many,
        (0..5)
            .map(|i| RamRange {
                gpa: i * 0x10_0000,
                size: 0x1000,
            })
            .collect(),
    );
    write(&dir, "refused_config", &input(&many, &[]));

    // Both extra connections call themselves number 1.
    let (m, mut lanes) = parallel(TOKEN);
    let mut twice = Vec::new();
    msg(
        &mut twice,
        Message::ChannelHello {
            index: 1,
            token: TOKEN,
        },
    );
    let hello_len = twice.len();
    twice.extend_from_slice(&lanes[0][hello_len..]);
    lanes[0] = twice;
    write(&dir, "refused_channel_opened_twice", &input(&m, &lanes));

    // The extra connection ends pass 0, the main connection goes on to State and Complete
    // without its IterationDone. Which wins the race decides the outcome (resumed, or
    // the extra connection's pages missing); before the fix, an extra connection waiting
    // at the barrier kept the destination waiting forever.
    let mut m = Vec::new();
    handshake(&mut m, layout());
    msg(
        &mut m,
        Message::Channels {
            count: 1,
            token: TOKEN,
        },
    );
    // Enough pages (sent again and again) that the extra connection is at its barrier
    // long before the main connection is done.
    for _ in 0..8 {
        chunk(&mut m, LOW, &pages(16, |i| i % 2 == 0));
    }
    state(&mut m);
    complete(&mut m);
    let mut l = Vec::new();
    msg(
        &mut l,
        Message::ChannelHello {
            index: 1,
            token: TOKEN,
        },
    );
    chunk(&mut l, HIGH, &pages(2, |_| true));
    done(&mut l, 0, 2);
    write(&dir, "main_skips_iteration_done", &input(&m, &[l]));
}
