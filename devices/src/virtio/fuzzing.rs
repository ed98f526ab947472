//! Harnesses for the fuzz targets (`fuzz/fuzz_targets/virtio_*.rs`) and for the tests that
//! run them over pseudo-random inputs without cargo-fuzz: arbitrary bytes become a queue's
//! setup and the contents of guest RAM, then a device serves the queue the way the worker
//! does. Only built for tests and with the `fuzzing` feature.
//!
//! Input: byte 0 holds the queue size (`1 << min(b & 0xf, 8)`), EVENT_IDX (0x10), ring
//! addresses from the input (0x20) and the read-only disk (0x40); bytes 1..5 the device's
//! next available and next used indexes; with 0x20, three little-endian u64: descriptor
//! table, available ring, used ring (else they follow each other from address 0, see
//! [`rings`]). The rest is guest RAM from address 0, zero past the input.

use std::cell::RefCell;
use std::fs::File;
use std::io::{Read, Write};

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::device::VirtioDevice;
use super::{Block, Rng};
use crate::guest_ram::{GuestMemoryMmap, GuestRam};

/// Guest RAM: two 64 KiB regions with a hole between them.
pub const RAM: [(u64, usize); 2] = [(0, 0x1_0000), (0x2_0000, 0x1_0000)];

fn ram_ranges() -> Vec<(GuestAddress, usize)> {
    RAM.iter().map(|&(a, l)| (GuestAddress(a), l)).collect()
}
/// Sectors of the disks behind [`block_request`].
pub const DISK_SECTORS: u64 = 256;
const CTRL_EVENT_IDX: u8 = 0x10;
const CTRL_RINGS: u8 = 0x20;
const CTRL_READONLY: u8 = 0x40;

/// Where the rings are when the input does not say: descriptor table at 0, then the
/// available ring, then the used ring (4-byte aligned).
pub fn rings(size: u16) -> (u64, u64, u64) {
    let avail = 16 * u64::from(size);
    let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
    (0, avail, used)
}

/// What one run did.
#[derive(Debug, Default)]
pub struct Run {
    /// Chains given back, over all rounds.
    pub completed: usize,
    /// The used length of each, as the used ring holds it after the run.
    pub used_lens: Vec<u32>,
}

/// Sets up RAM and a queue from `input` and lets `device` serve the queue like the
/// worker: notifications off, serve, notifications on, again while the driver has more
/// (at most a few rounds: RAM does not change here unless the rings alias). Panics only
/// if the device miscounts what it put in the used ring.
pub fn run(device: &mut dyn VirtioDevice, input: &[u8]) -> Run {
    let byte = |i: usize| input.get(i).copied().unwrap_or(0);
    let u16_at = |i: usize| u16::from_le_bytes([byte(i), byte(i + 1)]);
    let u64_at = |i: usize| u64::from_le_bytes(std::array::from_fn(|k| byte(i + k)));
    let ctrl = byte(0);
    let size = 1u16 << (ctrl & 0xf).min(8);
    let (desc, avail, used, image_at) = if ctrl & CTRL_RINGS != 0 {
        (u64_at(5), u64_at(13), u64_at(21), 29)
    } else {
        let (d, a, u) = rings(size);
        (d, a, u, 5)
    };
    let mem = GuestMemoryMmap::from_ranges(&ram_ranges()).expect("harness RAM");
    let mut image = input.get(image_at..).unwrap_or(&[]);
    for (base, len) in RAM {
        let n = image.len().min(len);
        mem.write_slice(&image[..n], GuestAddress(base))
            .expect("inside RAM");
        image = &image[n..];
    }
    let ram = GuestRam::new(mem);

    let mut q = Queue::new(256).expect("valid max size");
    q.try_set_size(size).expect("power of two");
    // Misaligned addresses are refused and stay 0, as with the transport.
    let _ = q.try_set_desc_table_address(GuestAddress(desc));
    let _ = q.try_set_avail_ring_address(GuestAddress(avail));
    let _ = q.try_set_used_ring_address(GuestAddress(used));
    q.set_ready(true);
    q.set_next_avail(u16_at(1));
    q.set_next_used(u16_at(3));
    q.set_event_idx(ctrl & CTRL_EVENT_IDX != 0);

    let mem = ram.queue_memory();
    let first_used = q.next_used();
    let mut out = Run::default();
    for _ in 0..4 {
        if q.disable_notification(mem).is_err() {
            break;
        }
        let before = q.next_used();
        let n = device.process_queue(0, &mut q, &ram);
        assert_eq!(
            usize::from(q.next_used().wrapping_sub(before)),
            n,
            "the count returned is what went into the used ring"
        );
        assert!(n <= usize::from(size), "one ring's worth per call");
        out.completed += n;
        if !matches!(q.enable_notification(mem), Ok(true)) {
            break;
        }
    }
    let _ = q.needs_notification(mem);
    for i in 0..out.completed.min(usize::from(size)) {
        let slot = u64::from(first_used.wrapping_add(i as u16) % size);
        let at = q.used_ring().wrapping_add(4 + 8 * slot + 4);
        if let Ok(len) = ram.read_obj::<u32>(at) {
            out.used_lens.push(len);
        }
    }
    out
}

/// An unlinked temporary file of `sectors` sectors, each filled with its own number.
pub fn temp_disk(sectors: u64) -> File {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let path = std::env::temp_dir().join(format!(
        "ferry-virtio-disk-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let mut f = std::fs::OpenOptions::new()
        .create_new(true)
        .read(true)
        .write(true)
        .open(&path)
        .expect("temporary disk");
    let _ = std::fs::remove_file(&path);
    for s in 0..sectors {
        f.write_all(&[s as u8; 512]).expect("temporary disk");
    }
    f
}

thread_local! {
    static DISKS: RefCell<Option<[Block; 2]>> = const { RefCell::new(None) };
    static RNG: RefCell<Option<Rng>> = const { RefCell::new(None) };
}

/// The `virtio_blk_request` target: `input` against a read-write or (0x40) read-only
/// disk of [`DISK_SECTORS`] sectors.
pub fn block_request(input: &[u8]) -> Run {
    DISKS.with(|d| {
        let mut d = d.borrow_mut();
        let disks = d.get_or_insert_with(|| {
            [false, true]
                .map(|ro| Block::new(temp_disk(DISK_SECTORS), ro, Some("fuzz")).expect("disk"))
        });
        let ro = input.first().is_some_and(|b| b & CTRL_READONLY != 0);
        run(&mut disks[usize::from(ro)], input)
    })
}

/// Bytes 0, 1, 2, ... (a deterministic entropy source).
pub struct Counting(pub u8);

impl Read for Counting {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        for b in buf.iter_mut() {
            *b = self.0;
            self.0 = self.0.wrapping_add(1);
        }
        Ok(buf.len())
    }
}

/// The `virtio_descriptor_chain` target: `input` against the entropy device, which
/// writes into every device-writable descriptor of a chain, so how chains are walked
/// (indirect tables, loops, lengths) decides everything.
pub fn descriptor_chain(input: &[u8]) -> Run {
    RNG.with(|r| {
        let mut r = r.borrow_mut();
        let rng = r.get_or_insert_with(|| Rng::new(Counting(0)));
        run(rng, input)
    })
}

/// A small deterministic generator (xorshift64*), for tests and seed inputs.
pub struct Prng(u64);

impl Prng {
    pub fn new(seed: u64) -> Prng {
        Prng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// True with probability 1/n.
    pub fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }

    pub fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.below(from.len() as u64) as usize]
    }
}

const HEADERS_AT: u64 = 0x400;
const HEADER_SLOTS: u64 = 32;
const TABLES_AT: u64 = 0x600;
const TABLE_DESCS: u64 = 8;
const TABLES: u64 = 4;
const IMAGE_LEN: usize = 0x800;

/// An input in the harnesses' format that is mostly a well-formed queue of block
/// requests (headers, data buffers, status bytes, sometimes through indirect tables), with
/// some of it broken: the kind of input that reaches the request code, which uniformly
/// random bytes almost never do.
pub fn plausible_input(r: &mut Prng) -> Vec<u8> {
    let size_log = if r.one_in(16) {
        0
    } else {
        1 + r.below(4) as u8
    };
    let size = 1u16 << size_log;
    let mut ctrl = size_log;
    if r.one_in(2) {
        ctrl |= CTRL_EVENT_IDX;
    }
    if r.one_in(4) {
        ctrl |= CTRL_READONLY;
    }
    let (mut desc, mut avail, mut used) = rings(size);
    if r.one_in(16) {
        ctrl |= CTRL_RINGS;
        let odd = |r: &mut Prng, good: u64| {
            let any = r.next_u64();
            r.pick(&[
                good,
                good,
                0x1_0000 - 2,
                0x1_8000,
                0x2_fff0,
                good + 1,
                u64::MAX - 1,
                any,
            ])
        };
        desc = odd(r, desc);
        avail = odd(r, avail);
        used = odd(r, used);
    }
    let any = r.next_u64() as u16;
    let next_avail = r.pick(&[0u16, 0, 7, 0xfffe, any]);
    let any = r.next_u64() as u16;
    let next_used = r.pick(&[0u16, next_avail, any]);

    let mut image = vec![0u8; IMAGE_LEN];
    let put = |image: &mut Vec<u8>, at: u64, bytes: &[u8]| {
        let at = at as usize;
        if at < image.len() {
            let n = bytes.len().min(image.len() - at);
            image[at..at + n].copy_from_slice(&bytes[..n]);
        }
    };
    // Request headers.
    let mut kinds = vec![];
    for slot in 0..HEADER_SLOTS {
        let any = r.next_u64();
        let kind = r.pick(&[
            VIRTIO_BLK_T_IN,
            VIRTIO_BLK_T_IN,
            VIRTIO_BLK_T_IN,
            VIRTIO_BLK_T_OUT,
            VIRTIO_BLK_T_OUT,
            VIRTIO_BLK_T_OUT,
            VIRTIO_BLK_T_FLUSH,
            VIRTIO_BLK_T_GET_ID,
            11,
            any as u32,
        ]);
        let some = r.below(DISK_SECTORS);
        let sector = r.pick(&[
            0,
            some / 2,
            some / 4,
            some / 4,
            DISK_SECTORS - 1,
            DISK_SECTORS,
            u64::MAX >> 9,
            u64::MAX,
        ]);
        kinds.push(kind);
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        put(&mut image, HEADERS_AT + 16 * slot, &h);
    }
    let data_addr = |r: &mut Prng| -> u64 {
        match r.below(32) {
            0 => 0x1_0000 + r.below(0x1000),          // the hole
            1 => 0x1_0000 - 0x100,                    // runs into the hole
            2 => 0x3_0000 - 0x200,                    // runs off the end
            3 => r.next_u64(),                        // anywhere
            4..=17 => 0x1000 + 0x200 * r.below(0x78), // region A
            _ => 0x2_0000 + 0x200 * r.below(0x80),    // region B
        }
    };
    let data_len = |r: &mut Prng| -> u32 {
        let any = r.next_u64() as u32;
        if r.one_in(8) {
            r.pick(&[0, 1, 20, 511, 513, any])
        } else {
            r.pick(&[512, 512, 1024, 1536, 4096, 0x2000])
        }
    };
    // A chain: header, data, status; `slots` are the descriptor indexes it uses.
    let chain = |r: &mut Prng, image: &mut Vec<u8>, table: u64, slots: &[u16]| {
        let n = slots.len();
        // Data in the direction the request type wants, mostly.
        let slot = r.below(HEADER_SLOTS);
        let kind = kinds[slot as usize];
        let write_data = kind == VIRTIO_BLK_T_IN || kind == VIRTIO_BLK_T_GET_ID;
        // One thing wrong in a third of the chains.
        let broken = r.below(3 * n as u64) as usize;
        for (i, &s) in slots.iter().enumerate() {
            let (mut addr, mut len, mut flags) = if i == 0 {
                (HEADERS_AT + 16 * slot, 16u32, 0u16)
            } else if i == n - 1 {
                (0x1000 + r.below(0xe000), 1, VRING_DESC_F_WRITE as u16)
            } else {
                let f = if write_data {
                    VRING_DESC_F_WRITE as u16
                } else {
                    0
                };
                (data_addr(r), data_len(r), f)
            };
            let mut next = slots.get(i + 1).copied().unwrap_or(0);
            if i + 1 < n {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            if i == broken {
                match r.below(4) {
                    0 => flags ^= VRING_DESC_F_WRITE as u16,
                    1 => len = r.pick(&[0, 8, 17, 2, u32::MAX]),
                    2 => addr = r.next_u64(),
                    _ => {
                        // A loop back, or past the table.
                        flags |= VRING_DESC_F_NEXT as u16;
                        next = r.pick(&[slots[0], s, size, u16::MAX]);
                    }
                }
            }
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..].copy_from_slice(&next.to_le_bytes());
            put(image, table + 16 * u64::from(s), &d);
        }
    };
    // Chains in the descriptor table, some of them through an indirect table.
    let mut heads = vec![];
    let mut free = 0u16;
    let mut tables = 0u64;
    while free + 1 < size || (free < size && r.one_in(8)) {
        let want = r.pick(&[2, 3, 3, 4, 4, 5]);
        if tables < TABLES && r.one_in(4) {
            let table = TABLES_AT + 16 * TABLE_DESCS * tables;
            tables += 1;
            let n = want.min(TABLE_DESCS as u16);
            let slots: Vec<u16> = (0..n).collect();
            chain(r, &mut image, table, &slots);
            let mut len = 16 * u32::from(n);
            let mut flags = VRING_DESC_F_INDIRECT as u16;
            if r.one_in(16) {
                len = r.pick(&[0, 15, 16 * TABLE_DESCS as u32 + 16]);
            }
            if r.one_in(16) {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&table.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            put(&mut image, desc + 16 * u64::from(free), &d);
            heads.push(free);
            free += 1;
        } else {
            let n = want.min(size - free);
            let slots: Vec<u16> = (free..free + n).collect();
            chain(r, &mut image, desc, &slots);
            heads.push(free);
            free += n;
        }
    }
    if r.one_in(8) {
        heads.push(r.pick(&[size, u16::MAX]));
    }
    // The available ring: flags 0, idx, the heads from next_avail on.
    let some = r.below(u64::from(size) + 2) as u16;
    let any = r.next_u64() as u16;
    let n = heads.len() as u16;
    let published = r.pick(&[n, n, n, n, n, n, some, any]);
    put(
        &mut image,
        avail + 2,
        &next_avail.wrapping_add(published).to_le_bytes(),
    );
    for (i, h) in heads.iter().enumerate() {
        let slot = u64::from(next_avail.wrapping_add(i as u16) % size);
        put(&mut image, avail + 4 + 2 * slot, &h.to_le_bytes());
    }
    // used_event (EVENT_IDX), anything.
    put(
        &mut image,
        avail + 4 + 2 * u64::from(size),
        &(r.next_u64() as u16).to_le_bytes(),
    );
    // A few random bytes anywhere.
    for _ in 0..r.below(3) {
        let at = r.below(IMAGE_LEN as u64);
        put(&mut image, at, &[r.next_u64() as u8]);
    }

    let mut input = vec![ctrl];
    input.extend(next_avail.to_le_bytes());
    input.extend(next_used.to_le_bytes());
    if ctrl & CTRL_RINGS != 0 {
        for a in [desc, avail, used] {
            input.extend(a.to_le_bytes());
        }
    }
    while image.last() == Some(&0) {
        image.pop();
    }
    input.extend(image);
    input
}

/// One hand-made input: which target, its file name under `fuzz/seeds/<target>/`, the
/// bytes, and the used lengths the device gives back for it.
pub struct Seed {
    pub target: &'static str,
    pub name: &'static str,
    pub input: Vec<u8>,
    pub used_lens: Vec<u32>,
}

/// Builds an input with a queue of 4 at the default place: `descs` are (index, address,
/// length, flags, next) in the ring's table, `heads` go in the available ring, `bytes`
/// are (address, contents) anywhere below the input's end.
fn seed_input(
    descs: &[(u16, u64, u32, u16, u16)],
    heads: &[u16],
    bytes: &[(u64, Vec<u8>)],
) -> Vec<u8> {
    let size = 4u16;
    let (table, avail, _) = rings(size);
    let mut image = vec![0u8; 0x400];
    let mut put = |at: u64, b: &[u8]| image[at as usize..at as usize + b.len()].copy_from_slice(b);
    for &(i, addr, len, flags, next) in descs {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        put(table + 16 * u64::from(i), &d);
    }
    put(avail + 2, &(heads.len() as u16).to_le_bytes());
    for (k, h) in heads.iter().enumerate() {
        put(avail + 4 + 2 * k as u64, &h.to_le_bytes());
    }
    for (at, b) in bytes {
        put(*at, b);
    }
    while image.last() == Some(&0) {
        image.pop();
    }
    let mut input = vec![2u8, 0, 0, 0, 0]; // a queue of 4, indexes at 0
    input.extend(image);
    input
}

fn seed_header(kind: u32, sector: u64) -> Vec<u8> {
    let mut h = vec![0u8; 16];
    h[..4].copy_from_slice(&kind.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    h
}

/// The seeds committed under `fuzz/seeds/` (a test checks the files are these).
pub fn seeds() -> Vec<Seed> {
    const N: u16 = VRING_DESC_F_NEXT as u16;
    const W: u16 = VRING_DESC_F_WRITE as u16;
    const I: u16 = VRING_DESC_F_INDIRECT as u16;
    let blk = "virtio_blk_request";
    let chain = "virtio_descriptor_chain";
    vec![
        Seed {
            target: blk,
            name: "read",
            input: seed_input(
                &[
                    (0, 0x200, 16, N, 1),
                    (1, 0x1000, 1024, W | N, 2),
                    (2, 0x2000, 1, W, 0),
                ],
                &[0],
                &[(0x200, seed_header(VIRTIO_BLK_T_IN, 1))],
            ),
            used_lens: vec![1025],
        },
        Seed {
            target: blk,
            name: "write_flush_get_id",
            input: seed_input(
                &[
                    // A write, a flush and a get-id, each through an indirect table.
                    (0, 0x280, 48, I, 0),
                    (1, 0x2c0, 32, I, 0),
                    (2, 0x300, 48, I, 0),
                    (0x28, 0x200, 16, N, 1),
                    (0x29, 0x1000, 512, N, 2),
                    (0x2a, 0x2000, 1, W, 0),
                    (0x2c, 0x210, 16, N, 1),
                    (0x2d, 0x2001, 1, W, 0),
                    (0x30, 0x220, 16, N, 1),
                    (0x31, 0x1400, 20, W | N, 2),
                    (0x32, 0x2002, 1, W, 0),
                ],
                &[0, 1, 2],
                &[
                    (0x200, seed_header(VIRTIO_BLK_T_OUT, 3)),
                    (0x210, seed_header(VIRTIO_BLK_T_FLUSH, 0)),
                    (0x220, seed_header(VIRTIO_BLK_T_GET_ID, 0)),
                ],
            ),
            used_lens: vec![1, 1, 21],
        },
        Seed {
            target: blk,
            name: "indirect_read",
            input: seed_input(
                &[
                    (0, 0x280, 48, I, 0),
                    // The indirect table at 0x280.
                    (0x28, 0x200, 16, N, 1),
                    (0x29, 0x2_0000, 4096, W | N, 2),
                    (0x2a, 0x2000, 1, W, 0),
                ],
                &[0],
                &[(0x200, seed_header(VIRTIO_BLK_T_IN, 8))],
            ),
            used_lens: vec![4097],
        },
        Seed {
            target: blk,
            name: "loop_then_bad_header_then_read",
            input: seed_input(
                &[
                    (0, 0x1000, 512, W | N, 0),
                    (1, 0x200, 8, N, 2),
                    (2, 0x2000, 1, W, 0),
                    (3, 0x280, 48, I, 0),
                    (0x28, 0x200, 16, N, 1),
                    (0x29, 0x1000, 512, W | N, 2),
                    (0x2a, 0x2001, 1, W, 0),
                ],
                &[0, 1, 3],
                &[(0x200, seed_header(VIRTIO_BLK_T_IN, 0))],
            ),
            used_lens: vec![0, 1, 513],
        },
        Seed {
            target: chain,
            name: "fill",
            input: seed_input(
                &[(0, 0x1000, 100, W | N, 1), (1, 0x2_0000, 5000, W, 0)],
                &[0],
                &[],
            ),
            used_lens: vec![5100],
        },
        Seed {
            target: chain,
            name: "indirect_with_readable",
            input: seed_input(
                &[
                    (0, 0x280, 48, I, 0),
                    (0x28, 0x1000, 64, N, 1),
                    (0x29, 0x1100, 64, W | N, 2),
                    (0x2a, 0x1200, 64, W, 0),
                    (1, 0x1300, 16, W, 0),
                ],
                &[0, 1],
                &[],
            ),
            used_lens: vec![128, 16],
        },
        Seed {
            target: chain,
            name: "loop_and_hole",
            input: seed_input(
                &[
                    (0, 0x1000, 16, W | N, 1),
                    (1, 0x1100, 16, W | N, 0),
                    (2, 0x1000, 16, W | N, 3),
                    (3, 0x1_0000, 16, W, 0),
                ],
                &[0, 2],
                &[],
            ),
            used_lens: vec![0, 16],
        },
    ]
}

/// A driver's side of one queue, for the device models' tests: rings at fixed places in
/// RAM with a hole (below 1 MiB and from 2 MiB to 3 MiB), chains written descriptor by
/// descriptor. (virtio-queue 0.18's `MockSplitQueue` ends the available ring `len` bytes
/// after its entries start instead of `2 * len + 2`, so its used ring lies over the last
/// available entries and `used_event` at every queue size from 2: hence this.)
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use vm_memory::bitmap::Bitmap;
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

    pub const DESC: u64 = 0;
    pub const AVAIL: u64 = 0x1000;
    pub const USED: u64 = 0x2000;
    pub const QSIZE: u16 = 16;
    pub const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    pub const WRITE: u16 = VRING_DESC_F_WRITE as u16;
    pub const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;
    /// The hole between the two RAM regions.
    pub const HOLE: u64 = 0x10_0000;

    pub fn ram() -> GuestRam {
        GuestRam::new(
            GuestMemoryMmap::from_ranges(&[
                (GuestAddress(0), 0x10_0000),
                (GuestAddress(0x20_0000), 0x10_0000),
            ])
            .unwrap(),
        )
    }

    pub struct Driver {
        pub ram: GuestRam,
        pub q: Queue,
        next_desc: u16,
        avail_idx: u16,
        used_seen: u16,
    }

    impl Driver {
        pub fn new() -> Driver {
            let ram = ram();
            let mut q = Queue::new(256).unwrap();
            q.try_set_size(QSIZE).unwrap();
            q.try_set_desc_table_address(GuestAddress(DESC)).unwrap();
            q.try_set_avail_ring_address(GuestAddress(AVAIL)).unwrap();
            q.try_set_used_ring_address(GuestAddress(USED)).unwrap();
            q.set_ready(true);
            Driver {
                ram,
                q,
                next_desc: 0,
                avail_idx: 0,
                used_seen: 0,
            }
        }

        /// Writes descriptor `i` of the table at `table`.
        pub fn desc_at(&self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..].copy_from_slice(&next.to_le_bytes());
            self.ram.write(table + 16 * u64::from(i), &d).unwrap();
        }

        /// Takes `n` descriptor indexes of the ring's table (round robin).
        pub fn take(&mut self, n: u16) -> Vec<u16> {
            (0..n)
                .map(|_| {
                    let i = self.next_desc;
                    self.next_desc = (self.next_desc + 1) % QSIZE;
                    i
                })
                .collect()
        }

        /// Writes `descs` (address, length, WRITE/INDIRECT flags) as one chain linked
        /// with NEXT and makes it available; returns its head.
        pub fn chain(&mut self, descs: &[(u64, u32, u16)]) -> u16 {
            let idx = self.take(descs.len() as u16);
            for (k, &(addr, len, flags)) in descs.iter().enumerate() {
                let (flags, next) = match idx.get(k + 1) {
                    Some(&n) => (flags | NEXT, n),
                    None => (flags, 0),
                };
                self.desc_at(DESC, idx[k], addr, len, flags, next);
            }
            self.publish(idx[0]);
            idx[0]
        }

        /// Puts `head` in the available ring.
        pub fn publish(&mut self, head: u16) {
            let slot = u64::from(self.avail_idx % QSIZE);
            self.ram
                .write(AVAIL + 4 + 2 * slot, &head.to_le_bytes())
                .unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
            self.set_avail_idx(self.avail_idx);
        }

        pub fn set_avail_idx(&mut self, idx: u16) {
            self.avail_idx = idx;
            self.ram.write(AVAIL + 2, &idx.to_le_bytes()).unwrap();
        }

        /// The used entries (head, len) added since the last call.
        pub fn used(&mut self) -> Vec<(u32, u32)> {
            let idx: u16 = self.ram.read_obj(USED + 2).unwrap();
            let mut out = vec![];
            while self.used_seen != idx {
                let at = USED + 4 + 8 * u64::from(self.used_seen % QSIZE);
                out.push((
                    self.ram.read_obj::<u32>(at).unwrap(),
                    self.ram.read_obj::<u32>(at + 4).unwrap(),
                ));
                self.used_seen = self.used_seen.wrapping_add(1);
            }
            out
        }

        pub fn byte(&self, at: u64) -> u8 {
            self.ram.read_obj(at).unwrap()
        }

        pub fn bytes(&self, at: u64, len: usize) -> Vec<u8> {
            let mut b = vec![0; len];
            self.ram.read(at, &mut b).unwrap();
            b
        }

        /// Forgets which pages were written.
        pub fn clean(&self) {
            for r in self.ram.logged_memory().iter() {
                std::ops::Deref::deref(r).bitmap().reset();
            }
        }

        /// The guest pages written since [`Self::clean`].
        pub fn dirty_pages(&self) -> Vec<u64> {
            let mut out = vec![];
            for r in self.ram.logged_memory().iter() {
                let bitmap = std::ops::Deref::deref(r).bitmap();
                for p in 0..r.len() / 4096 {
                    if bitmap.dirty_at((p * 4096) as usize) {
                        out.push(r.start_addr().0 + p * 4096);
                    }
                }
            }
            out
        }
    }
}

/// The `device_state` target's virtio-pci half (`fuzz/fuzz_targets/device_state.rs`): a
/// migrated [`VirtioPciState`] restored into a real virtio-pci function (virtio-rng,
/// virtio-blk over a temporary disk, or the virtio-iommu) over [`RAM`], then used as a
/// guest would. See [`pci_state`].
pub mod pci_state {
    use std::cell::RefCell;
    use std::fs::File;
    use std::sync::{Arc, Mutex};

    use virtio_queue::QueueT;
    use vm_memory::bitmap::Bitmap;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

    use super::super::device::VirtioDevice;
    use super::super::interrupt::InterruptSink;
    use super::super::pci_transport::{VirtioPciDevice, VirtioPciState, BAR, NOTIFY_MULTIPLIER};
    use super::super::{Block, QueueState, Rng};
    use super::{ram_ranges, temp_disk, Counting, DISK_SECTORS, RAM};
    use crate::guest_ram::{GuestMemoryMmap, GuestRam};
    use crate::pci::{MsixEffect, PciDevice, MSIX_CAP_ID};
    use crate::viommu::{IommuTable, VirtioIommu};

    /// The functions a state can be restored into (the target's first byte, modulo).
    pub const KINDS: [&str; 3] = ["rng", "blk", "viommu"];
    /// Guest operations taken from the input at most.
    pub const MAX_OPS: usize = 32;
    /// Bytes per guest operation.
    pub const OP_LEN: usize = 8;
    const NOTIFY_OFFSET: u64 = 0x3000;
    const MSIX_TABLE_OFFSET: u64 = 0x4000;
    const MSIX_PBA_OFFSET: u64 = 0x6000;
    const PAGE: usize = 0x1000;
    /// The common configuration's registers and their widths.
    const COMMON_REGS: [(u64, usize); 20] = [
        (0x00, 4),
        (0x04, 4),
        (0x08, 4),
        (0x0c, 4),
        (0x10, 2),
        (0x12, 2),
        (0x14, 1),
        (0x15, 1),
        (0x16, 2),
        (0x18, 2),
        (0x1a, 2),
        (0x1c, 2),
        (0x1e, 2),
        (0x20, 4),
        (0x24, 4),
        (0x28, 4),
        (0x2c, 4),
        (0x30, 4),
        (0x34, 4),
        (0x38, 2),
    ];

    /// Interrupts go nowhere (the transport's own state is what is checked).
    struct NullSink;

    impl InterruptSink for NullSink {
        fn msix(&self, _effect: MsixEffect) {}
        fn intx(&self, _level: bool) {}
    }

    thread_local! {
        static DISK: RefCell<Option<File>> = const { RefCell::new(None) };
    }

    /// A new function of kind `kind` (see [`KINDS`]) over `ram`.
    pub fn device(kind: u8, ram: &GuestRam) -> (VirtioPciDevice, Arc<Mutex<dyn VirtioDevice>>) {
        let d: Arc<Mutex<dyn VirtioDevice>> = match usize::from(kind) % KINDS.len() {
            0 => Arc::new(Mutex::new(Rng::new(Counting(0)))),
            1 => {
                let disk = DISK.with(|d| {
                    d.borrow_mut()
                        .get_or_insert_with(|| temp_disk(DISK_SECTORS))
                        .try_clone()
                        .expect("a second descriptor of the disk")
                });
                Arc::new(Mutex::new(
                    Block::new(disk, false, Some("fuzz")).expect("disk"),
                ))
            }
            _ => {
                let table = IommuTable::new();
                for (id, trackable) in crate::viommu::fuzzing::ENDPOINTS {
                    table.add_endpoint(id, trackable);
                }
                Arc::new(Mutex::new(VirtioIommu::new(Arc::new(table))))
            }
        };
        let name = KINDS[usize::from(kind) % KINDS.len()].to_string();
        let pci = VirtioPciDevice::new(name, d.clone(), ram.clone(), Arc::new(NullSink))
            .expect("a valid function");
        (pci, d)
    }

    /// Guest RAM ([`RAM`]) holding `image` from address 0, its dirty log clear.
    pub fn ram(image: &[u8]) -> GuestRam {
        let mem = GuestMemoryMmap::from_ranges(&ram_ranges()).expect("harness RAM");
        let mut image = image;
        for (base, len) in RAM {
            let n = image.len().min(len);
            mem.write_slice(&image[..n], GuestAddress(base))
                .expect("inside RAM");
            image = &image[n..];
        }
        for r in mem.iter() {
            // The region's own bitmap (not a slice of it): what the harness wrote is not
            // the device's doing.
            let region: &vm_memory::MmapRegion<_> = r;
            region.bitmap().reset();
        }
        GuestRam::new(mem)
    }

    fn contents(ram: &GuestRam) -> Vec<u8> {
        let mut out = vec![];
        for (base, len) in RAM {
            let mut b = vec![0u8; len];
            ram.read(base, &mut b).expect("inside RAM");
            out.extend(b);
        }
        out
    }

    /// Every page whose bytes changed since `before` is marked in the dirty log: a
    /// migration would otherwise send the page as it was.
    fn check_dirty_log(ram: &GuestRam, before: &[u8]) {
        let after = contents(ram);
        let mut at = 0usize;
        for r in ram.logged_memory().iter() {
            let len = r.len() as usize;
            for p in (0..len).step_by(PAGE) {
                let (a, b) = (
                    &before[at + p..at + p + PAGE],
                    &after[at + p..at + p + PAGE],
                );
                if a != b {
                    assert!(
                        r.bitmap().dirty_at(p),
                        "page {:#x} written but not in the dirty log",
                        r.start_addr().0 + p as u64
                    );
                }
            }
            at += len;
        }
    }

    fn rbar(d: &mut VirtioPciDevice, offset: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        d.read_bar(BAR, offset, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    fn wbar(d: &mut VirtioPciDevice, offset: u64, v: u64, len: usize) {
        d.write_bar(BAR, offset, &v.to_le_bytes()[..len]);
    }

    /// The offset of the MSI-X capability in configuration space.
    pub fn msix_cap(d: &VirtioPciDevice) -> usize {
        let c = d.config().bytes();
        let mut at = usize::from(c[0x34]);
        let mut hops = 0;
        while at != 0 && at + 1 < c.len() && hops < 48 {
            if c[at] == MSIX_CAP_ID {
                return at;
            }
            at = usize::from(c[at + 1]);
            hops += 1;
        }
        0
    }

    /// What a second restore of `s` must give again: the positions of running queues
    /// may move on (the worker serves what was published), the ISR and pending bits with
    /// the interrupts it signals.
    fn comparable(s: &VirtioPciState) -> String {
        let mut s = s.clone();
        s.isr = 0;
        s.msix.pending.fill(0);
        if let Some(r) = &mut s.running {
            for (_, q) in r.iter_mut() {
                *q = QueueState {
                    next_avail: 0,
                    next_used: 0,
                    ..*q
                };
            }
        }
        format!("{s:?}")
    }

    /// Serves `running` in this thread as the worker would (notifications off, serve,
    /// on, a few rounds), marking each used ring as the worker does.
    fn serve(device: &Mutex<dyn VirtioDevice>, running: &[(u16, QueueState)], ram: &GuestRam) {
        for (i, qs) in running {
            let mut q = qs.to_queue().expect("a state's own queue");
            let mem = ram.queue_memory();
            for _ in 0..4 {
                if q.disable_notification(mem).is_err() {
                    break;
                }
                let before = q.next_used();
                let n = device
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .process_queue(*i, &mut q, ram);
                assert_eq!(
                    usize::from(q.next_used().wrapping_sub(before)),
                    n,
                    "the count returned is what went into the used ring"
                );
                assert!(n <= usize::from(q.size()), "one ring's worth per call");
                if !matches!(q.enable_notification(mem), Ok(true)) {
                    break;
                }
            }
            ram.mark_used_ring(&q);
        }
    }

    /// What one run did.
    #[derive(Debug, Default)]
    pub struct Outcome {
        /// The state was taken.
        pub restored: bool,
        /// Queues it left running.
        pub running: usize,
        /// The function's state at the end (the target checks it survives JSON).
        pub last: Option<VirtioPciState>,
    }

    /// Restores `state` into a new function of kind `kind`, then uses it: `tail` is the
    /// number of guest operations (byte 0, at most [`MAX_OPS`]), the operations
    /// ([`OP_LEN`] bytes each: kind, offset (2), width, value (4)), then guest RAM from
    /// address 0. Panics if the function breaks: a panic anywhere, a state it gave that
    /// does not restore again, a restore of its own state that differs, a
    /// write to RAM the dirty log missed, a used ring count that does not match.
    pub fn pci_state(kind: u8, state: &VirtioPciState, tail: &[u8]) -> Outcome {
        let nops = usize::from(tail.first().copied().unwrap_or(0)).min(MAX_OPS);
        let ops_end = (1 + nops * OP_LEN).min(tail.len());
        let ops = tail.get(1..ops_end).unwrap_or(&[]);
        let image = tail.get(ops_end..).unwrap_or(&[]);
        let ram = ram(image);
        let before = contents(&ram);
        let (mut dev, device) = device(kind, &ram);
        let queues = device
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .queue_max_sizes()
            .len();
        let mut out = Outcome::default();
        if dev.restore(state).is_ok() {
            out.restored = true;
            // The state it gives is the state it took, and restores again to itself.
            dev.pause();
            let s1 = dev.state();
            assert_eq!(
                comparable(&s1),
                comparable(&VirtioPciState {
                    running: s1.running.clone(),
                    ..state.clone()
                }),
                "a restored function gives back what it took"
            );
            let (mut again, _) = super::pci_state::device(kind, &ram);
            again
                .restore(&s1)
                .expect("a restored function's own state restores");
            again.pause();
            assert_eq!(comparable(&again.state()), comparable(&s1));
            drop(again);
            out.running = s1.running.as_ref().map_or(0, Vec::len);
            dev.resume();
        }
        // A guest's reads: every register of the common configuration for each queue
        // (and one past them), the device configuration, the ISR, the MSI-X table and
        // pending bits; then notifications and interrupts.
        for sel in 0..=queues {
            wbar(&mut dev, 0x16, sel as u64, 2);
            for (off, len) in COMMON_REGS {
                rbar(&mut dev, off, len);
            }
        }
        for off in (0x2000..0x2040).step_by(4) {
            rbar(&mut dev, off, 4);
        }
        rbar(&mut dev, 0x1000, 1);
        for v in 0..=queues as u64 + 1 {
            for f in 0..4 {
                rbar(&mut dev, MSIX_TABLE_OFFSET + 16 * v + 4 * f, 4);
            }
        }
        rbar(&mut dev, MSIX_PBA_OFFSET, 8);
        let mut cfg = [0u8; 4];
        for off in (0..256).step_by(4) {
            dev.read_config(off, &mut cfg);
        }
        for q in 0..queues as u64 {
            wbar(
                &mut dev,
                NOTIFY_OFFSET + q * u64::from(NOTIFY_MULTIPLIER),
                q,
                2,
            );
            dev.interrupt().signal_queue(q as u16);
        }
        dev.interrupt().signal_config();
        // The input's operations.
        let msix = msix_cap(&dev);
        for op in ops.chunks(OP_LEN) {
            let b = |i: usize| op.get(i).copied().unwrap_or(0);
            let off = u64::from(u16::from_le_bytes([b(1), b(2)]));
            let len = [1usize, 2, 4, 8][usize::from(b(3) % 4)];
            let v = u64::from(u32::from_le_bytes([b(4), b(5), b(6), b(7)]));
            match b(0) % 8 {
                0 => {
                    rbar(&mut dev, off % 0x8000, len);
                }
                1 => wbar(&mut dev, off % 0x8000, v, len),
                // The common configuration, where the handshake happens.
                2 => wbar(&mut dev, off % 0x3c, v, len),
                3 => {
                    let mut d = [0u8; 8];
                    dev.read_config(usize::from(off as u8), &mut d[..len]);
                }
                4 => dev.write_config(usize::from(off as u8), &v.to_le_bytes()[..len]),
                // MSI-X enable / function mask.
                5 => dev.write_config(msix + 2, &(v as u16).to_le_bytes()),
                6 => {
                    let q = off % queues as u64;
                    wbar(
                        &mut dev,
                        NOTIFY_OFFSET + q * u64::from(NOTIFY_MULTIPLIER),
                        q,
                        2,
                    );
                }
                _ => {
                    if off & 1 == 0 {
                        dev.interrupt().signal_queue((off >> 1) as u16);
                    } else {
                        dev.interrupt().signal_config();
                    }
                }
            }
        }
        // Stopped as for a migration: the queues served once more here, the state given
        // must serialise and restore into a new function.
        dev.pause();
        let last = dev.state();
        if let Some(r) = &last.running {
            serve(&*device, r, &ram);
        }
        let (mut next, _) = super::pci_state::device(kind, &ram);
        if let Err(e) = next.restore(&last) {
            panic!("a function's own state does not restore: {e}");
        }
        next.pause();
        drop(next);
        drop(dev);
        check_dirty_log(&ram, &before);
        out.last = Some(last);
        out
    }

    /// One seed of the `device_state` target: a state saved from a function a driver
    /// really set up, and the rest of the input (no operations, then guest RAM as the
    /// source left it, with one more request published after the pause).
    pub struct StateSeed {
        pub name: &'static str,
        pub kind: u8,
        pub state: VirtioPciState,
        pub tail: Vec<u8>,
    }

    const QSIZE: u64 = 8;

    fn rings(q: u64) -> (u64, u64, u64) {
        let base = 0x200 * q;
        (base, base + 0x80, base + 0xc0)
    }

    fn put_desc(ram: &GuestRam, q: u64, i: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        ram.write(rings(q).0 + 16 * i, &d).expect("in RAM");
    }

    /// Makes `head` available in queue `q` as its `n`th entry.
    fn publish(ram: &GuestRam, q: u64, n: u16, head: u16) {
        let avail = rings(q).1;
        ram.write_obj(head, avail + 4 + 2 * (u64::from(n) % QSIZE))
            .expect("in RAM");
        ram.write_obj(n + 1, avail + 2).expect("in RAM");
    }

    /// Puts request number `n` of a `kind` function in its queue 0 (and, for the vIOMMU,
    /// an event buffer in queue 1).
    fn request(ram: &GuestRam, kind: u8, n: u16) {
        use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
        const N: u16 = VRING_DESC_F_NEXT as u16;
        const W: u16 = VRING_DESC_F_WRITE as u16;
        let d = 3 * u64::from(n);
        let buf = 0x800 + 0x100 * u64::from(n);
        match kind {
            0 => put_desc(ram, 0, d, buf, 64, W, 0),
            1 => {
                let mut h = [0u8; 16];
                h[..4].copy_from_slice(
                    &virtio_bindings::bindings::virtio_blk::VIRTIO_BLK_T_IN.to_le_bytes(),
                );
                h[8..].copy_from_slice(&(3 + u64::from(n)).to_le_bytes());
                ram.write(buf, &h).expect("in RAM");
                put_desc(ram, 0, d, buf, 16, N, (d + 1) as u16);
                put_desc(
                    ram,
                    0,
                    d + 1,
                    0x2_0000 + 0x200 * u64::from(n),
                    512,
                    W | N,
                    (d + 2) as u16,
                );
                put_desc(ram, 0, d + 2, buf + 0x20, 1, W, 0);
            }
            _ => {
                // ATTACH endpoint 1 to domain 1 + n, then its tail.
                let mut r = [0u8; 20];
                r[0] = crate::viommu::T_ATTACH;
                r[4..8].copy_from_slice(&(1 + u32::from(n)).to_le_bytes());
                r[8..12].copy_from_slice(&1u32.to_le_bytes());
                ram.write(buf, &r).expect("in RAM");
                put_desc(ram, 0, d, buf, 20, N, (d + 1) as u16);
                put_desc(ram, 0, d + 1, buf + 0x40, 4, W, 0);
                put_desc(ram, 1, u64::from(n), buf + 0x80, 24, W, 0);
                publish(ram, 1, n, n);
            }
        }
        publish(ram, 0, n, d as u16);
    }

    /// A driver's setup of a `kind` function over `ram`: features (all offered),
    /// MSI-X vectors programmed and unmasked if `msix`, every queue of 8 in RAM with its
    /// vector, then DRIVER_OK if `driver_ok`.
    fn bring_up(dev: &mut VirtioPciDevice, queues: u64, msix: bool, driver_ok: bool) {
        wbar(dev, 0x14, 1, 1);
        wbar(dev, 0x14, 1 | 2, 1);
        for sel in 0..2 {
            wbar(dev, 0x00, sel, 4);
            let f = rbar(dev, 0x04, 4);
            wbar(dev, 0x08, sel, 4);
            wbar(dev, 0x0c, f, 4);
        }
        wbar(dev, 0x14, 1 | 2 | 8, 1);
        assert_ne!(rbar(dev, 0x14, 1) & 8, 0, "FEATURES_OK");
        if msix {
            let cap = msix_cap(dev);
            dev.write_config(cap + 2, &0x8000u16.to_le_bytes());
            for v in 0..=queues {
                let at = MSIX_TABLE_OFFSET + 16 * v;
                wbar(dev, at, 0xfee0_0000, 8);
                wbar(dev, at + 8, 0x40 + v, 4);
                wbar(dev, at + 12, 0, 4);
            }
            wbar(dev, 0x10, 0, 2);
        }
        for q in 0..queues {
            let (d, a, u) = rings(q);
            wbar(dev, 0x16, q, 2);
            wbar(dev, 0x18, QSIZE, 2);
            if msix {
                wbar(dev, 0x1a, q + 1, 2);
            }
            for (off, addr) in [(0x20, d), (0x28, a), (0x30, u)] {
                wbar(dev, off, addr, 4);
                wbar(dev, off + 4, 0, 4);
            }
            wbar(dev, 0x1c, 1, 2);
        }
        wbar(dev, 0x16, 0, 2);
        if driver_ok {
            wbar(dev, 0x14, 1 | 2 | 8 | 4, 1);
        }
    }

    /// Waits (bounded) until queue 0's used index reaches `n`.
    fn wait_used(ram: &GuestRam, n: u16) {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while ram.read_obj::<u16>(rings(0).2 + 2).expect("in RAM") < n {
            assert!(std::time::Instant::now() < until, "the worker served");
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    /// The committed seeds of the `device_state` target's virtio-pci half.
    pub fn seeds() -> Vec<StateSeed> {
        let mut out = vec![];
        for (name, kind, msix, driver_ok) in [
            ("rng_running_msix", 0u8, true, true),
            ("blk_running_msix", 1, true, true),
            ("blk_running_intx", 1, false, true),
            ("viommu_running_msix", 2, true, true),
            ("rng_features_ok", 0, true, false),
        ] {
            let ram = ram(&[]);
            let (mut dev, device) = device(kind, &ram);
            let queues = device
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .queue_max_sizes()
                .len() as u64;
            request(&ram, kind, 0);
            bring_up(&mut dev, queues, msix, driver_ok);
            if driver_ok {
                assert!(dev.is_active(), "{name}: DRIVER_OK");
                wait_used(&ram, 1);
            }
            dev.pause();
            let state = dev.state();
            // The driver goes on while the source stops: one more request.
            request(&ram, kind, 1);
            let mut image = contents(&ram);
            image.truncate(0x1000);
            while image.last() == Some(&0) {
                image.pop();
            }
            let mut tail = vec![0u8];
            tail.extend(image);
            out.push(StateSeed {
                name,
                kind,
                state,
                tail,
            });
        }
        out
    }
}
