//! Harness for the `viommu_requests` fuzz target (`fuzz/fuzz_targets/viommu_requests.rs`)
//! and for the tests that run it over pseudo-random inputs without cargo-fuzz. The input
//! is a sequence of operations, every byte string decoding to one: requests of every type
//! (well formed, or with reserved bytes set, too short, too long, with any writable size,
//! split across descriptors) or of any type and bytes, put in the request queue in guest
//! RAM and served by the device; DMA of the devices behind the vIOMMU between them; event
//! buffers; the bypass byte; resets; a migration's tracking and harvest; the state's round
//! trip. Only built for tests and with the `fuzzing` feature.
//!
//! After every operation the harness checks what must always hold: a known request is
//! answered with one of the spec's status codes in its tail (an unknown one gets a used
//! length of 0 and nothing written), a refused request changes nothing and writes nothing
//! but its tail, mappings never overlap (nor the MSI window), endpoints and domains agree,
//! a DMA lands or faults exactly as the mappings say (the translation is computed again
//! here, independently), a fault record goes to the event queue in order, a reset marks
//! every writable footprint while a migration tracks, the state restores to itself. A
//! broken one panics, naming it.
//!
//! Input: byte 0 takes features away from what the device offers (0x1 the dirty-tracking
//! extension, 0x2 MMIO, 0x4 BYPASS_CONFIG); then operations, one byte each and their
//! arguments (bytes past the end read as 0), at most [`MAX_OPS`].

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::requests::*;
use super::table::Tables;
use super::{
    FaultRecord, IommuEndpoint, IommuTable, ViommuState, VirtioIommu, DOMAIN_RANGE,
    FAULT_F_ADDRESS, FAULT_F_READ, FAULT_F_WRITE, FAULT_R_DOMAIN, FAULT_R_MAPPING, F_BYPASS_CONFIG,
    F_DIRTY_TRACKING, F_MMIO, GRANULE, INPUT_RANGE, MAP_F_MMIO, MAP_F_READ, MAP_F_WRITE, MSI_RANGE,
    PROBE_SIZE,
};
use crate::guest_ram::{DmaError, GuestMemoryMmap, GuestRam};
use crate::virtio::VirtioDevice;

/// Guest RAM: two 256 KiB regions with a hole between them.
pub const RAM: [(u64, usize); 2] = [(0, 0x4_0000), (0x8_0000, 0x4_0000)];
/// Operations one input runs at most.
pub const MAX_OPS: usize = 256;
/// The endpoints behind the vIOMMU: two that report their writes, one that cannot.
pub const ENDPOINTS: [(u32, bool); 3] = [(1, true), (2, true), (3, false)];

const REQ_RINGS: (u64, u64, u64) = (0x0, 0x100, 0x200);
const EVENT_RINGS: (u64, u64, u64) = (0x400, 0x500, 0x600);
const QSIZE: u16 = 16;
/// Where the readable parts of a request go (one slot of 0x400 each).
const READABLE_AT: u64 = 0x1000;
/// Where the writable part goes, at most [`MAX_WRITABLE`] bytes.
const WRITABLE_AT: u64 = 0x2000;
const MAX_WRITABLE: usize = 0x8000;
/// Event buffers, 0x40 apart.
const EVENTS_AT: u64 = 0xb000;
/// The filler of a writable part before the device writes it.
const FILL: u8 = 0xa5;

/// A driver's side of one split queue in guest RAM.
pub struct Ring {
    pub q: Queue,
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl Ring {
    /// A queue of `size` with its rings at `desc`, `avail` and `used`.
    pub fn new(desc: u64, avail: u64, used: u64, size: u16) -> Ring {
        let mut q = Queue::new(256).expect("valid max size");
        q.try_set_size(size).expect("a power of two");
        q.try_set_desc_table_address(GuestAddress(desc))
            .expect("aligned");
        q.try_set_avail_ring_address(GuestAddress(avail))
            .expect("aligned");
        q.try_set_used_ring_address(GuestAddress(used))
            .expect("aligned");
        q.set_ready(true);
        Ring {
            q,
            desc,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    /// Writes `descs` (address, length, device-writable) as one chain linked with NEXT
    /// and makes it available; returns its head.
    pub fn chain(&mut self, ram: &GuestRam, descs: &[(u64, u32, bool)]) -> u16 {
        let size = self.q.size();
        let idx: Vec<u16> = (0..descs.len())
            .map(|_| {
                let i = self.next_desc;
                self.next_desc = (self.next_desc + 1) % size;
                i
            })
            .collect();
        for (k, &(addr, len, write)) in descs.iter().enumerate() {
            let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
            let mut next = 0u16;
            if let Some(&n) = idx.get(k + 1) {
                flags |= VRING_DESC_F_NEXT as u16;
                next = n;
            }
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..].copy_from_slice(&next.to_le_bytes());
            ram.write(self.desc + 16 * u64::from(idx[k]), &d)
                .expect("the descriptor table is in RAM");
        }
        self.publish(ram, idx[0]);
        idx[0]
    }

    /// Puts `head` (a descriptor index, or anything) in the available ring.
    pub fn publish(&mut self, ram: &GuestRam, head: u16) {
        let slot = u64::from(self.avail_idx % self.q.size());
        ram.write(self.avail + 4 + 2 * slot, &head.to_le_bytes())
            .expect("the available ring is in RAM");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        ram.write(self.avail + 2, &self.avail_idx.to_le_bytes())
            .expect("the available ring is in RAM");
    }

    /// The used entries (head, length) added since the last call.
    pub fn used(&mut self, ram: &GuestRam) -> Vec<(u32, u32)> {
        let idx: u16 = ram.read_obj(self.used + 2).expect("used ring in RAM");
        let mut out = vec![];
        while self.used_seen != idx {
            let at = self.used + 4 + 8 * u64::from(self.used_seen % self.q.size());
            out.push((
                ram.read_obj::<u32>(at).expect("used ring in RAM"),
                ram.read_obj::<u32>(at + 4).expect("used ring in RAM"),
            ));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}

/// The input, read byte by byte (0 past its end).
struct Input<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Input<'_> {
    fn done(&self) -> bool {
        self.at >= self.bytes.len()
    }

    fn u8(&mut self) -> u8 {
        let b = self.bytes.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        b
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(std::array::from_fn(|_| self.u8()))
    }

    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[usize::from(self.u8()) % from.len()]
    }

    /// An IOVA: mostly one of the first 64 pages, sometimes an edge.
    fn iova(&mut self) -> u64 {
        let b = self.u8();
        match b >> 5 {
            0..=5 => u64::from(b & 0x3f) * GRANULE,
            6 => [
                *MSI_RANGE.start(),
                *INPUT_RANGE.end() + 1,
                !(GRANULE - 1),
                7 * GRANULE + 1,
            ][usize::from(b & 3)],
            _ => self.u64(),
        }
    }

    /// A guest-physical address: pages of both RAM regions, of the hole, past the end.
    fn gpa(&mut self) -> u64 {
        let b = self.u8();
        match b >> 6 {
            0 | 1 => 0x1_0000 + u64::from(b & 0x3f) * GRANULE,
            2 => 0x8_0000 + u64::from(b & 0x3f) * 4 * GRANULE,
            _ => [0x4_0000, 0xc_0000 - GRANULE, !(GRANULE - 1), 0x1001][usize::from(b & 3)],
        }
    }

    fn domain(&mut self) -> u32 {
        let b = self.u8();
        if b < 0xf0 {
            1 + u32::from(b % 4)
        } else {
            [0, 0x1_0000, *DOMAIN_RANGE.end(), u32::MAX][usize::from(b & 3)]
        }
    }

    fn endpoint(&mut self) -> u32 {
        self.pick(&[1, 2, 3, 1, 2, 3, 4, 0, u32::MAX])
    }
}

/// What one run did (the tests check the generator reaches the code, not just the
/// parser).
#[derive(Debug, Default, Clone)]
pub struct Run {
    pub ops: usize,
    /// Requests answered, by status.
    pub statuses: [usize; 9],
    /// Requests given back with a used length of 0.
    pub unanswered: usize,
    pub dma_ok: usize,
    pub dma_faults: usize,
    pub events_delivered: usize,
    /// GPA ranges the footprint rules marked.
    pub marks: u64,
}

/// One request as the harness built it.
struct Request {
    readable: Vec<u8>,
    writable: usize,
    /// Readable parts (at least 1) and writable parts (1 or 2).
    split: (usize, usize),
    split_at: u8,
}

struct Harness {
    ram: GuestRam,
    dma_ram: GuestRam,
    table: Arc<IommuTable>,
    device: VirtioIommu,
    features: u64,
    reqq: Ring,
    eventq: Ring,
    /// Sizes of the event buffers posted and not given back, in order.
    events_posted: VecDeque<u32>,
    next_event_slot: u64,
    marks: Arc<AtomicU64>,
    /// Marks of all of RAM (an untrackable endpoint leaving bypass), counted apart.
    all_marks: Arc<AtomicU64>,
    pattern: u8,
    run: Run,
}

fn new_table() -> IommuTable {
    let table = IommuTable::new();
    for (id, trackable) in ENDPOINTS {
        table.add_endpoint(id, trackable);
    }
    table
}

/// Runs `input` (see the module comment); panics if an invariant breaks.
pub fn requests(input: &[u8]) -> Run {
    run(input, None).expect("nothing to restore").0
}

/// The `device_state` target's vIOMMU half: restores `state` (a migrated
/// [`ViommuState`]) into the harness's table, then runs `input` against it, with every
/// check of [`requests`]. None if the state was refused (after checking the refusal
/// changed nothing); else what the run did and the table's state at its end (which
/// restores into a new table to itself).
pub fn restored_requests(state: &ViommuState, input: &[u8]) -> Option<(Run, ViommuState)> {
    run(input, Some(state))
}

/// Runs `input` like [`requests`] and gives the table's state at the end (the seeds of
/// the `device_state` target: states a driver really built).
pub fn requests_with_state(input: &[u8]) -> (Run, ViommuState) {
    run(input, None).expect("nothing to restore")
}

/// The committed seeds of the `device_state` target's vIOMMU half: (name, the state a
/// run of the first input left, the operations run after restoring it).
pub fn state_seeds() -> Vec<(&'static str, ViommuState, Vec<u8>)> {
    use build::*;
    let cat = |parts: &[Vec<u8>]| -> Vec<u8> {
        let mut v = vec![0u8]; // every feature
        for p in parts {
            v.extend_from_slice(p);
        }
        v
    };
    let after = cat(&[
        dma(true, 1, 3, 0),
        dma(true, 2, 1, 1),
        bitmap(1, 0, 16),
        event(),
        unmap(1, 0, 4),
        detach(1, 1),
        harvest(),
        reset(),
    ]);
    [
        (
            "viommu_tracking",
            cat(&[
                attach(0, 2),
                map(0, 1, 2, 3),
                attach(1, 1),
                track(1),
                map(1, 0, 8, 0),
                dma(true, 1, 2, 5),
                dma(true, 1, 6, 1),
            ]),
        ),
        (
            "viommu_faults_untrackable",
            cat(&[
                attach(2, 3),
                map(2, 0, 2, 10),
                migration_toggle(),
                attach(1, 1),
                map(1, 4, 4, 20),
                dma(true, 1, 5, 0),
                dma(false, 2, 9, 0),
                dma(true, 3, 7, 0),
            ]),
        ),
    ]
    .into_iter()
    .map(|(name, input)| {
        let (_, state) = requests_with_state(&input);
        (name, state, after.clone())
    })
    .collect()
}

/// What [`requests`] runs, in the state of the [`ViommuState`] given, if any; and the
/// table's state at the end.
fn run(input: &[u8], restore: Option<&ViommuState>) -> Option<(Run, ViommuState)> {
    let mem = GuestMemoryMmap::from_ranges(
        &RAM.iter()
            .map(|&(a, l)| (GuestAddress(a), l))
            .collect::<Vec<_>>(),
    )
    .expect("harness RAM");
    let ram = GuestRam::new(mem);
    let dma_ram = ram.with_own_log();
    let table = Arc::new(new_table());
    let marks = Arc::new(AtomicU64::new(0));
    let all_marks = Arc::new(AtomicU64::new(0));
    {
        let marks = marks.clone();
        let all_marks = all_marks.clone();
        let log = dma_ram.clone();
        table.set_gpa_marker(Box::new(move |gpa, len| {
            if (gpa, len) == (0, u64::MAX) {
                all_marks.fetch_add(1, Ordering::Relaxed);
            } else {
                marks.fetch_add(1, Ordering::Relaxed);
            }
            log.mark_gpa_range(gpa, len);
        }));
    }
    let mut input = Input {
        bytes: input,
        at: 0,
    };
    let mut device = VirtioIommu::new(table.clone());
    let take = input.u8();
    let mut features = device.features();
    for (bit, feature) in [(1, F_DIRTY_TRACKING), (2, F_MMIO), (4, F_BYPASS_CONFIG)] {
        if take & bit != 0 {
            features &= !(1u64 << feature);
        }
    }
    device.activate(features).expect("activates");
    if let Some(state) = restore {
        let before = table.state();
        if table.restore(state).is_err() {
            assert_eq!(table.state(), before, "a refused state changes nothing");
            return None;
        }
        // What the table took is what it gives back, and restores again to itself.
        let mine = table.state();
        let other = new_table();
        other.restore(&mine).expect("a table's own state restores");
        assert_eq!(other.state(), mine);
    }
    let mut h = Harness {
        ram,
        dma_ram,
        table,
        device,
        features,
        reqq: Ring::new(REQ_RINGS.0, REQ_RINGS.1, REQ_RINGS.2, QSIZE),
        eventq: Ring::new(EVENT_RINGS.0, EVENT_RINGS.1, EVENT_RINGS.2, QSIZE),
        events_posted: VecDeque::new(),
        next_event_slot: 0,
        marks,
        all_marks,
        pattern: 0,
        run: Run::default(),
    };
    h.check_tables();
    while !input.done() && h.run.ops < MAX_OPS {
        h.run.ops += 1;
        let op = input.u8();
        match op % 16 {
            0..=7 | 15 => {
                let r = structured(&mut input);
                h.request(r);
            }
            8 => {
                let kind = input.u8();
                let len = usize::from(input.u8() % 140);
                let mut readable: Vec<u8> = (0..len).map(|_| input.u8()).collect();
                if let Some(b) = readable.first_mut() {
                    *b = kind;
                }
                let writable = usize::from(input.u16()) % MAX_WRITABLE;
                let split = (1 + usize::from(op >> 4) % 3, 1 + usize::from(op >> 6) % 2);
                let split_at = input.u8();
                h.request(Request {
                    readable,
                    writable,
                    split,
                    split_at,
                });
            }
            9 | 10 => h.dma(&mut input, op % 16 == 9),
            11 => h.event(&mut input),
            12 => h.config(&mut input),
            13 => h.migration(&mut input),
            _ => h.round_trip(),
        }
        h.check_tables();
    }
    h.run.marks = h.marks.load(Ordering::Relaxed);
    let end = h.table.state();
    h.round_trip();
    Some((h.run, end))
}

/// A request of a known type with fields from the input, sometimes broken.
fn structured(input: &mut Input) -> Request {
    let t = input.u8();
    let kind = [
        T_ATTACH,
        T_DETACH,
        T_MAP,
        T_UNMAP,
        T_PROBE,
        T_SET_DIRTY_TRACKING,
        T_GET_DIRTY_BITMAP,
        T_MAP,
    ][usize::from(t % 8)];
    let need = readable_size(kind).expect("a known type");
    let mut r = vec![0u8; need];
    r[0] = kind;
    let put32 =
        |r: &mut Vec<u8>, at: usize, v: u32| r[at..at + 4].copy_from_slice(&v.to_le_bytes());
    let put64 =
        |r: &mut Vec<u8>, at: usize, v: u64| r[at..at + 8].copy_from_slice(&v.to_le_bytes());
    let pages = |input: &mut Input| -> u64 { 1 + u64::from(input.u8() % 8) };
    let mut writable = 4usize;
    // Reserved bytes of the type (the head's are 1..4).
    let reserved: std::ops::Range<usize> = match kind {
        T_ATTACH => 16..20,
        T_DETACH => 12..20,
        T_UNMAP => 24..28,
        T_PROBE => 8..72,
        T_SET_DIRTY_TRACKING | T_GET_DIRTY_BITMAP => 12..16,
        _ => 1..4,
    };
    match kind {
        T_ATTACH => {
            put32(&mut r, 4, input.domain());
            put32(&mut r, 8, input.endpoint());
            let f = input.pick(&[0, 0, 0, ATTACH_F_BYPASS, 2, ATTACH_F_BYPASS | 1 << 9]);
            put32(&mut r, 12, f);
        }
        T_DETACH => {
            put32(&mut r, 4, input.domain());
            put32(&mut r, 8, input.endpoint());
        }
        T_MAP => {
            put32(&mut r, 4, input.domain());
            let start = input.iova();
            let end = if input.u8() < 0xf0 {
                start.wrapping_add(pages(input) * GRANULE - 1)
            } else {
                input.iova()
            };
            put64(&mut r, 8, start);
            put64(&mut r, 16, end);
            put64(&mut r, 24, input.gpa());
            let rw = MAP_F_READ | MAP_F_WRITE;
            let f = input.pick(&[
                rw,
                rw,
                rw,
                MAP_F_READ,
                MAP_F_WRITE,
                0,
                rw | MAP_F_MMIO,
                rw | 1 << 3,
            ]);
            put32(&mut r, 32, f);
        }
        T_UNMAP => {
            put32(&mut r, 4, input.domain());
            let start = input.iova();
            let end = match input.u8() {
                0..=0xdf => start.wrapping_add(pages(input) * 2 * GRANULE - 1),
                0xe0..=0xef => u64::MAX,
                _ => input.iova(),
            };
            put64(&mut r, 8, start);
            put64(&mut r, 16, end);
        }
        T_PROBE => {
            put32(&mut r, 4, input.endpoint());
            writable = PROBE_SIZE as usize + 4;
        }
        T_SET_DIRTY_TRACKING => {
            put32(&mut r, 4, input.domain());
            let f = input.pick(&[DIRTY_TRACKING_F_ENABLE, DIRTY_TRACKING_F_ENABLE, 0, 2]);
            put32(&mut r, 8, f);
        }
        _ => {
            put32(&mut r, 4, input.domain());
            let f = input.pick(&[0, 0, DIRTY_BITMAP_F_NO_CLEAR, 2]);
            put32(&mut r, 8, f);
            let iova = input.iova();
            let page_size = input.pick(&[
                GRANULE,
                GRANULE,
                GRANULE,
                2 * GRANULE,
                512 * GRANULE,
                3 * GRANULE,
                GRANULE / 2,
                1 << 63,
            ]);
            let units = match input.u8() {
                0..=0xef => 1 + u64::from(input.u8()),
                0xf0..=0xf7 => 0,
                _ => (1 << 24) + 1,
            };
            let length = units.wrapping_mul(page_size);
            put64(&mut r, 16, iova);
            put64(&mut r, 24, length);
            put64(&mut r, 32, page_size);
            writable = (units.div_ceil(64) as usize)
                .saturating_mul(8)
                .saturating_add(4)
                .min(MAX_WRITABLE);
        }
    }
    if t & 0x08 != 0 {
        let at = reserved.start + usize::from(input.u8()) % reserved.len();
        r[at] = input.u8() | 1;
    }
    if t & 0x10 != 0 {
        // Shorter (INVAL) or longer (the rest is ignored) than the type needs.
        let b = input.u8();
        let len = if b & 1 == 0 {
            usize::from(b >> 1) % need
        } else {
            need + usize::from(b >> 1) % 64
        };
        r.resize(len.max(1), 0);
    }
    if t & 0x20 != 0 {
        let any = usize::from(input.u16()) % MAX_WRITABLE;
        writable = input.pick(&[0, 1, 3, writable - 1, writable + 1, writable + 100, any]);
    }
    let split = (1 + usize::from(t >> 6) % 3, 1 + usize::from(t >> 7));
    Request {
        readable: r,
        writable,
        split,
        split_at: input.u8(),
    }
}

/// Cuts `total` into `parts` lengths (the last ones may be 0 when `total` is small; a
/// zero-length descriptor is a descriptor like any other).
fn cut(total: usize, parts: usize, seed: u8) -> Vec<usize> {
    let mut out = Vec::with_capacity(parts);
    let mut left = total;
    for k in 0..parts {
        if k + 1 == parts {
            out.push(left);
        } else {
            let n = (usize::from(seed.rotate_left(3 * k as u32)) * (k + 1)) % (left + 1);
            out.push(n);
            left -= n;
        }
    }
    out
}

impl Harness {
    fn dirty_log(&self) -> Vec<bool> {
        let mut out = vec![];
        for r in self.dma_ram.logged_memory().iter() {
            for p in 0..r.len() / GRANULE {
                out.push(r.bitmap().dirty_at((p * GRANULE) as usize));
            }
        }
        out
    }

    fn request(&mut self, r: Request) {
        let features = self.features;
        let (ram, table) = (&self.ram, &self.table);
        // The readable parts in slots of their own, the writable ones one after the other.
        let mut descs = vec![];
        let mut at = 0usize;
        for (k, len) in cut(r.readable.len(), r.split.0, r.split_at)
            .into_iter()
            .enumerate()
        {
            let addr = READABLE_AT + 0x400 * k as u64;
            ram.write(addr, &r.readable[at..at + len])
                .expect("request slots are in RAM");
            at += len;
            descs.push((addr, len as u32, false));
        }
        let mut waddr = WRITABLE_AT;
        for len in cut(r.writable, r.split.1, r.split_at.rotate_left(4)) {
            descs.push((waddr, len as u32, true));
            waddr += len as u64;
        }
        ram.write(WRITABLE_AT, &vec![FILL; r.writable])
            .expect("the writable part is in RAM");
        self.reqq.chain(ram, &descs);

        let before = table.state();
        let marks = self.marks.load(Ordering::Relaxed);
        let all_marks = self.all_marks.load(Ordering::Relaxed);
        let tracking = table.migration_tracking();
        let kind = r.readable.first().copied();
        let known = kind
            .and_then(readable_size)
            .filter(|_| {
                features & (1 << F_DIRTY_TRACKING) != 0
                    || !matches!(kind, Some(T_SET_DIRTY_TRACKING | T_GET_DIRTY_BITMAP))
            })
            .is_some();
        let n = self.device.process_queue(0, &mut self.reqq.q, ram);
        assert_eq!(n, 1, "a well-formed chain is given back");
        let used = self.reqq.used(ram);
        assert_eq!(used.len(), 1);
        let len = used[0].1 as usize;
        let mut w = vec![0u8; r.writable];
        ram.read(WRITABLE_AT, &mut w).expect("in RAM");
        if !known || r.writable < 4 {
            assert_eq!(len, 0, "unknown type {kind:?} or no room for the tail");
            assert!(w.iter().all(|b| *b == FILL), "nothing written");
            assert_eq!(
                table.state(),
                before,
                "an unanswered request changes nothing"
            );
            self.run.unanswered += 1;
            return;
        }
        assert_eq!(len, r.writable, "a reply fills the writable part");
        let tail = &w[r.writable - 4..];
        let status = tail[0];
        assert!(status <= S_NOMEM, "status {status} is one of the spec's");
        assert_eq!(&tail[1..], &[0, 0, 0], "the tail's reserved bytes");
        self.run.statuses[usize::from(status)] += 1;
        let kind = kind.expect("known");
        let need = readable_size(kind).expect("known");
        if r.readable.len() < need || r.readable[1..4] != [0, 0, 0] {
            assert_eq!(status, S_INVAL, "short request or reserved head");
        }
        let after = table.state();
        let marked = self.marks.load(Ordering::Relaxed) - marks;
        let all_marked = self.all_marks.load(Ordering::Relaxed) - all_marks;
        if status != S_OK {
            assert_eq!(marked + all_marked, 0, "a refused request marks nothing");
            assert_eq!(
                after, before,
                "a refused request (status {status}) changes nothing"
            );
            assert!(
                w[..r.writable - 4].iter().all(|b| *b == FILL),
                "a refused request writes nothing but its tail"
            );
            return;
        }
        let q = &r.readable;
        let u32_at = |at: usize| u32::from_le_bytes(q[at..at + 4].try_into().expect("4 bytes"));
        let u64_at = |at: usize| u64::from_le_bytes(q[at..at + 8].try_into().expect("8 bytes"));
        let mappings = |s: &ViommuState, d: u32| {
            s.domains
                .iter()
                .find(|x| x.id == d)
                .map(|x| x.mappings.clone())
                .unwrap_or_default()
        };
        // Rules 5 and 6: what a request must have marked in the migration's log.
        let writable =
            |ms: &[super::Mapping]| ms.iter().filter(|m| m.flags & MAP_F_WRITE != 0).count() as u64;
        let domain_of = |s: &ViommuState, ep: u32| {
            s.endpoints
                .iter()
                .find(|e| e.id == ep)
                .and_then(|e| e.domain)
        };
        let want_marks = match kind {
            T_DETACH if tracking => writable(&mappings(&before, u32_at(4))),
            T_ATTACH if tracking => match domain_of(&before, u32_at(8)) {
                Some(old) if old != u32_at(4) => writable(&mappings(&before, old)),
                _ => 0,
            },
            T_UNMAP if tracking => {
                let d = u32_at(4);
                let untrackable = before
                    .endpoints
                    .iter()
                    .any(|e| e.domain == Some(d) && !e.trackable);
                let now = mappings(&after, d);
                let gone: Vec<_> = mappings(&before, d)
                    .into_iter()
                    .filter(|m| !now.contains(m))
                    .collect();
                if untrackable {
                    writable(&gone)
                } else {
                    0
                }
            }
            _ => 0,
        };
        assert_eq!(marked, want_marks, "ranges marked by {kind:#x}");
        // An untrackable endpoint that stops bypassing makes all of RAM dirty.
        let leaves_bypass = |ep: u32| {
            tracking
                && before.endpoints.iter().any(|e| {
                    e.id == ep
                        && !e.trackable
                        && match e.domain {
                            None => before.bypass,
                            Some(d) => before.domains.iter().any(|x| x.id == d && x.bypass),
                        }
                })
        };
        let want_all = match kind {
            T_ATTACH if domain_of(&before, u32_at(8)) != Some(u32_at(4)) => {
                u64::from(leaves_bypass(u32_at(8)))
            }
            T_DETACH => u64::from(leaves_bypass(u32_at(8))),
            _ => 0,
        };
        assert_eq!(all_marked, want_all, "all-RAM marks by {kind:#x}");
        match kind {
            T_MAP => {
                let (d, vs, ve, ps) = (u32_at(4), u64_at(8), u64_at(16), u64_at(24));
                let now = mappings(&after, d);
                assert!(
                    now.iter()
                        .any(|m| m.virt_start == vs && m.virt_end == ve && m.phys_start == ps),
                    "MAP OK: the mapping is there"
                );
                assert_eq!(now.len(), mappings(&before, d).len() + 1);
            }
            T_UNMAP => {
                let (d, vs, ve) = (u32_at(4), u64_at(8), u64_at(16));
                let now = mappings(&after, d);
                assert!(
                    now.iter().all(|m| m.virt_end < vs || m.virt_start > ve),
                    "UNMAP OK: nothing left in [{vs:#x}, {ve:#x}]"
                );
                let gone: Vec<_> = mappings(&before, d)
                    .into_iter()
                    .filter(|m| !now.contains(m))
                    .collect();
                assert!(
                    gone.iter().all(|m| m.virt_start >= vs && m.virt_end <= ve),
                    "UNMAP removes whole mappings inside its range only"
                );
            }
            T_PROBE => {
                assert_eq!(after, before);
                assert!(r.writable >= PROBE_SIZE as usize + 4);
                assert_eq!(&w[..4], &[1, 0, 20, 0], "RESV_MEM first");
                assert_eq!(&w[8..16], &MSI_RANGE.start().to_le_bytes());
                assert_eq!(&w[16..24], &MSI_RANGE.end().to_le_bytes());
            }
            T_GET_DIRTY_BITMAP => {
                let (length, page_size) = (u64_at(24), u64_at(32));
                let units = length / page_size;
                let words = units.div_ceil(64) as usize;
                assert!(r.writable >= 8 * words + 4);
                if units % 64 != 0 {
                    let last = u64::from_le_bytes(
                        w[8 * (words - 1)..8 * words].try_into().expect("8 bytes"),
                    );
                    assert_eq!(last >> (units % 64), 0, "no bits past the last page");
                }
            }
            _ => {}
        }
    }

    /// The translation of a DMA, computed from the mappings without the domain's code:
    /// the guest-physical runs, or the fault record it must leave.
    fn expected(
        t: &Tables,
        ep: u32,
        iova: u64,
        len: u64,
        write: bool,
    ) -> Result<Vec<(u64, u64)>, FaultRecord> {
        let flags = if write { FAULT_F_WRITE } else { FAULT_F_READ } | FAULT_F_ADDRESS;
        let fault = |reason, address| FaultRecord {
            reason,
            flags,
            endpoint: ep,
            address,
        };
        let direct = if len == 0 { vec![] } else { vec![(iova, len)] };
        let Some(d) = t.endpoints.get(&ep).and_then(|e| e.domain) else {
            return if t.bypass {
                Ok(direct)
            } else {
                Err(fault(FAULT_R_DOMAIN, iova))
            };
        };
        let d = t.domains.get(&d).expect("an endpoint's domain exists");
        if d.bypass {
            return Ok(direct);
        }
        let need = if write { MAP_F_WRITE } else { MAP_F_READ };
        let mut runs: Vec<(u64, u64)> = vec![];
        let (mut at, mut left) = (iova, len);
        while left > 0 {
            let Some(m) = d
                .mappings
                .mappings()
                .find(|m| m.virt_start <= at && at <= m.virt_end)
            else {
                return Err(fault(FAULT_R_MAPPING, at));
            };
            if m.flags & need == 0 {
                return Err(fault(FAULT_R_MAPPING, at));
            }
            let n = left.min((m.virt_end - at).saturating_add(1));
            let gpa = m.phys_start + (at - m.virt_start);
            match runs.last_mut() {
                Some(last) if last.0 + last.1 == gpa => last.1 += n,
                _ => runs.push((gpa, n)),
            }
            left -= n;
            at = at.wrapping_add(n);
        }
        Ok(runs)
    }

    fn in_ram(gpa: u64, len: u64) -> bool {
        RAM.iter().any(|&(base, size)| {
            gpa >= base
                && gpa
                    .checked_add(len)
                    .is_some_and(|end| end <= base + size as u64)
        })
    }

    fn dma(&mut self, input: &mut Input, write: bool) {
        let ep = input.pick(&[1u32, 2, 3]);
        let iova = input.iova().wrapping_add(u64::from(input.u8()) * 61);
        let len = input.pick(&[1u64, 8, GRANULE, 2 * GRANULE + 3, 100, 0]);
        let dev = self.dma_ram.behind_iommu(IommuEndpoint {
            id: ep,
            table: self.table.clone(),
        });
        let (expected, tracked) = {
            let t = self.table.read();
            let tracked = t
                .endpoints
                .get(&ep)
                .and_then(|e| e.domain)
                .and_then(|d| t.domains.get(&d))
                .is_some_and(|d| d.dirty.is_some() && !d.bypass);
            (Self::expected(&t, ep, iova, len, write), tracked)
        };
        // Unattached in bypass, or in a bypass domain, an IOVA is a guest-physical
        // address: the harness keeps its own rings and buffers (below 64 KiB) to itself.
        if let Ok(runs) = &expected {
            if runs.iter().any(|&(gpa, _)| gpa < 0x1_0000) {
                return;
            }
        }
        let overflows = iova.checked_add(len).is_none();
        let faults = self.table.pending_faults();
        let dropped = self.table.faults_dropped();
        let log = self.dirty_log();
        self.pattern = self.pattern.wrapping_add(1);
        let mut buf = vec![self.pattern; len as usize];
        let result = if write {
            dev.write(iova, &buf)
        } else {
            dev.read(iova, &mut buf)
        };
        let faults_now = self.table.pending_faults();
        match (&result, &expected) {
            (Err(DmaError::OutOfRam { .. }), _) if overflows => {
                assert_eq!(faults_now, faults);
            }
            (Ok(()), Ok(runs)) => {
                assert!(runs.iter().all(|&(g, n)| Self::in_ram(g, n)));
                let mut at = 0usize;
                for &(gpa, n) in runs {
                    let mut back = vec![0u8; n as usize];
                    self.ram.read(gpa, &mut back).expect("in RAM");
                    assert_eq!(back, buf[at..at + n as usize], "the bytes are at {gpa:#x}");
                    at += n as usize;
                }
                if write && tracked && len > 0 {
                    let t = self.table.read();
                    let d = t.endpoints[&ep].domain.expect("attached");
                    let bits = t.domains[&d].dirty.as_ref().expect("tracked");
                    let page = iova & !(GRANULE - 1);
                    assert_eq!(bits.read(page, GRANULE, GRANULE, true), vec![1], "IOVA bit");
                }
                assert_eq!(faults_now, faults);
                self.run.dma_ok += 1;
            }
            (Err(DmaError::OutOfRam { .. }), Ok(runs)) => {
                assert!(!runs.iter().all(|&(g, n)| Self::in_ram(g, n)));
                assert_eq!(self.dirty_log(), log, "nothing written");
                assert_eq!(faults_now, faults);
            }
            (Err(DmaError::Fault { iova: at, .. }), Err(record)) => {
                assert_eq!(*at, iova);
                assert_eq!(self.dirty_log(), log, "nothing written");
                if faults.len() < 256 {
                    assert_eq!(faults_now.last(), Some(record), "the fault is recorded");
                    assert_eq!(faults_now.len(), faults.len() + 1);
                } else {
                    assert_eq!(self.table.faults_dropped(), dropped + 1);
                }
                self.run.dma_faults += 1;
            }
            _ => panic!(
                "DMA of endpoint {ep} at {iova:#x}+{len:#x} (write {write}): {result:?}, the mappings say {expected:?}"
            ),
        }
    }

    fn event(&mut self, input: &mut Input) {
        let size = input.pick(&[24u32, 24, 24, 32, 23, 0, 8]);
        if self.events_posted.len() < usize::from(QSIZE) / 2 {
            let addr = EVENTS_AT + 0x40 * (self.next_event_slot % 32);
            self.next_event_slot += 1;
            self.ram.write(addr, &[FILL; 0x40]).expect("in RAM");
            self.eventq.chain(&self.ram, &[(addr, size, true)]);
            self.events_posted.push_back(size);
        }
        let mut faults: VecDeque<FaultRecord> = self.table.pending_faults().into();
        // What the device must do: every buffer in order while a record waits; a small
        // one is given back empty and the record waits for the next.
        let mut expect = vec![];
        while !faults.is_empty() {
            let Some(size) = self.events_posted.pop_front() else {
                break;
            };
            if size >= 24 {
                expect.push((24, faults.pop_front()));
            } else {
                expect.push((0, None));
            }
        }
        let n = self.device.process_queue(1, &mut self.eventq.q, &self.ram);
        let used = self.eventq.used(&self.ram);
        assert_eq!(n, expect.len());
        assert_eq!(used.len(), expect.len());
        for ((head, len), (want, record)) in used.into_iter().zip(expect) {
            assert_eq!(len, want, "event buffer used length");
            if let Some(record) = record {
                let addr = self.event_addr(head);
                let mut b = [0u8; 24];
                self.ram.read(addr, &mut b).expect("in RAM");
                assert_eq!(b, record.bytes(), "the fault record, in order");
                self.run.events_delivered += 1;
            }
        }
        assert_eq!(self.table.pending_faults(), Vec::from(faults));
    }

    /// The buffer address of event descriptor `head` (read back from the table).
    fn event_addr(&self, head: u32) -> u64 {
        self.ram
            .read_obj::<u64>(EVENT_RINGS.0 + 16 * u64::from(head))
            .expect("in RAM")
    }

    /// How many untrackable endpoints bypass now, if a migration tracks (each leaving
    /// bypass marks all of RAM once), else 0.
    fn bypassing_untrackable(&self) -> u64 {
        if !self.table.migration_tracking() {
            return 0;
        }
        let t = self.table.read();
        t.endpoints
            .values()
            .filter(|e| {
                !e.trackable
                    && match e.domain {
                        None => t.bypass,
                        Some(d) => t.domains.get(&d).is_some_and(|d| d.bypass),
                    }
            })
            .count() as u64
    }

    fn footprints(t: &Tables) -> Vec<(u64, u64)> {
        t.domains
            .values()
            .flat_map(|d| d.mappings.writable_footprint())
            .collect()
    }

    fn config(&mut self, input: &mut Input) {
        match input.u8() % 4 {
            0 | 1 => {
                let b = input.pick(&[0u8, 1, 2]);
                let before = self.table.read().bypass;
                let want_all = if b == 0 {
                    self.bypassing_untrackable()
                } else {
                    0
                };
                let all = self.all_marks.load(Ordering::Relaxed);
                self.device.write_config(36, &[b]);
                let now = self.table.read().bypass;
                assert_eq!(now, if b <= 1 { b == 1 } else { before });
                assert_eq!(self.all_marks.load(Ordering::Relaxed) - all, want_all);
                let mut c = [0u8; 1];
                self.device.read_config(36, &mut c);
                assert_eq!(c[0], u8::from(now));
            }
            2 => {
                // The vIOMMU's own reset: every endpoint leaves, footprints dirty while a
                // migration tracks.
                let (footprint, tracking) = {
                    let t = self.table.read();
                    (Self::footprints(&t), self.table.migration_tracking())
                };
                let marks = self.marks.load(Ordering::Relaxed);
                let (all, want_all) = (
                    self.all_marks.load(Ordering::Relaxed),
                    self.bypassing_untrackable(),
                );
                let bypass = self.table.read().bypass;
                self.device.reset();
                assert_eq!(self.all_marks.load(Ordering::Relaxed) - all, want_all);
                let t = self.table.read();
                assert!(t.domains.is_empty());
                assert!(t.endpoints.values().all(|e| e.domain.is_none()));
                assert_eq!(t.bypass, bypass, "bypass survives a device reset");
                drop(t);
                let marked = self.marks.load(Ordering::Relaxed) - marks;
                let want = if tracking { footprint.len() as u64 } else { 0 };
                assert_eq!(marked, want, "reset marks every writable mapping");
                self.device.activate(self.features).expect("activates");
            }
            _ => {
                let ep = input.pick(&[1u32, 2, 3]);
                let want = {
                    let t = self.table.read();
                    let d = t.endpoints[&ep].domain;
                    match d {
                        Some(d) if self.table.migration_tracking() => {
                            t.domains[&d].mappings.writable_footprint().len() as u64
                        }
                        _ => 0,
                    }
                };
                let marks = self.marks.load(Ordering::Relaxed);
                let all = self.all_marks.load(Ordering::Relaxed);
                let want_all = {
                    let t = self.table.read();
                    let e = &t.endpoints[&ep];
                    let bypassing = match e.domain {
                        None => t.bypass,
                        Some(d) => t.domains[&d].bypass,
                    };
                    u64::from(self.table.migration_tracking() && !e.trackable && bypassing)
                };
                self.dma_ram
                    .behind_iommu(IommuEndpoint {
                        id: ep,
                        table: self.table.clone(),
                    })
                    .device_reset();
                assert_eq!(self.marks.load(Ordering::Relaxed) - marks, want);
                assert_eq!(self.all_marks.load(Ordering::Relaxed) - all, want_all);
            }
        }
    }

    fn migration(&mut self, input: &mut Input) {
        if input.u8() & 1 == 0 {
            let on = !self.table.migration_tracking();
            self.table.set_migration_tracking(on);
            return;
        }
        let want: Vec<(u64, u64)> = {
            let t = self.table.read();
            t.domains
                .values()
                .filter(|d| d.endpoints.iter().any(|e| !t.endpoints[e].trackable))
                .flat_map(|d| d.mappings.writable_footprint())
                .collect()
        };
        assert_eq!(self.table.harvest_untrackable(), want, "rule 4");
    }

    fn round_trip(&mut self) {
        let state = self.table.state();
        let other = new_table();
        other.restore(&state).expect("a table's own state restores");
        assert_eq!(other.state(), state);
    }

    /// What always holds of the tables.
    fn check_tables(&self) {
        let t = self.table.read();
        for (id, d) in &t.domains {
            assert!(DOMAIN_RANGE.contains(id), "domain {id}");
            assert!(
                !d.endpoints.is_empty(),
                "domain {id} without endpoints lives on"
            );
            for e in &d.endpoints {
                assert_eq!(
                    t.endpoints[e].domain,
                    Some(*id),
                    "endpoint {e} of domain {id}"
                );
                if d.dirty.is_some() {
                    assert!(t.endpoints[e].trackable, "a tracking domain holds {e}");
                }
            }
            if d.bypass {
                assert_eq!(d.mappings.mappings().count(), 0, "bypass domain {id} maps");
            }
            let mut prev: Option<u64> = None;
            for m in d.mappings.mappings() {
                assert!(m.virt_start <= m.virt_end);
                assert_eq!(m.virt_start % GRANULE, 0);
                assert_eq!(m.phys_start % GRANULE, 0);
                assert_eq!(m.virt_end.wrapping_add(1) % GRANULE, 0);
                assert!(
                    INPUT_RANGE.contains(&m.virt_end),
                    "{m:x?} past the input range"
                );
                assert!(
                    m.virt_end < *MSI_RANGE.start() || m.virt_start > *MSI_RANGE.end(),
                    "{m:x?} over the MSI window"
                );
                if let Some(p) = prev {
                    assert!(p < m.virt_start, "mappings overlap in domain {id}");
                }
                prev = Some(m.virt_end);
            }
        }
        for (id, e) in &t.endpoints {
            if let Some(d) = e.domain {
                assert!(
                    t.domains.get(&d).is_some_and(|d| d.endpoints.contains(id)),
                    "endpoint {id} in domain {d}"
                );
            }
        }
    }
}

/// Inputs in the harness's format, built like a driver would (`Op`s to bytes): the seeds
/// committed under `fuzz/seeds/viommu_requests/` and the start of the tests' runs.
pub mod build {
    /// A structured request: `t`'s low 3 bits pick the type (0 ATTACH, 1 DETACH, 2 MAP,
    /// 3 UNMAP, 4 PROBE, 5 SET_DIRTY_TRACKING, 6 GET_DIRTY_BITMAP), then its field bytes
    /// as [`Input`] reads them, then the split byte.
    pub fn request(t: u8, fields: &[u8]) -> Vec<u8> {
        let mut v = vec![0, t];
        v.extend_from_slice(fields);
        v.push(0);
        v
    }

    pub fn attach(domain: u8, endpoint: u8) -> Vec<u8> {
        request(0, &[domain, endpoint, 0])
    }

    pub fn detach(domain: u8, endpoint: u8) -> Vec<u8> {
        request(1, &[domain, endpoint])
    }

    /// MAP of `pages` (1-8) IOVA pages from page `iova_page` (< 64) to the harness's
    /// RAM page `gpa_page` (< 64), read-write.
    pub fn map(domain: u8, iova_page: u8, pages: u8, gpa_page: u8) -> Vec<u8> {
        request(2, &[domain, iova_page, 0, pages - 1, gpa_page, 0])
    }

    pub fn unmap(domain: u8, iova_page: u8, pages_div2: u8) -> Vec<u8> {
        request(3, &[domain, iova_page, 0, pages_div2 - 1])
    }

    pub fn probe(endpoint: u8) -> Vec<u8> {
        request(4, &[endpoint])
    }

    pub fn track(domain: u8) -> Vec<u8> {
        request(5, &[domain, 0])
    }

    /// GET_DIRTY_BITMAP of `units` 4 KiB pages from IOVA page `iova_page`.
    pub fn bitmap(domain: u8, iova_page: u8, units: u8) -> Vec<u8> {
        request(6, &[domain, 0, iova_page, 0, 0, units - 1])
    }

    /// A DMA write (or read) of 8 bytes at IOVA page `iova_page` + 61 * `offset`.
    pub fn dma(write: bool, endpoint: u8, iova_page: u8, offset: u8) -> Vec<u8> {
        vec![if write { 9 } else { 10 }, endpoint, iova_page, offset, 1]
    }

    /// A 24-byte event buffer, and the event queue served.
    pub fn event() -> Vec<u8> {
        vec![11, 0]
    }

    pub fn reset() -> Vec<u8> {
        vec![12, 2]
    }

    pub fn migration_toggle() -> Vec<u8> {
        vec![13, 0]
    }

    pub fn harvest() -> Vec<u8> {
        vec![13, 1]
    }

    pub fn round_trip() -> Vec<u8> {
        vec![14]
    }

    /// The committed seeds: (name, input).
    pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
        let cat = |parts: &[Vec<u8>]| -> Vec<u8> {
            let mut v = vec![0u8]; // every feature
            for p in parts {
                v.extend_from_slice(p);
            }
            v
        };
        vec![
            (
                "map_dma_unmap",
                cat(&[
                    attach(0, 0),
                    map(0, 1, 2, 3),
                    dma(true, 0, 1, 2),
                    dma(true, 0, 4, 0),
                    event(),
                    unmap(0, 1, 1),
                    dma(false, 0, 1, 0),
                    event(),
                ]),
            ),
            (
                "tracking",
                cat(&[
                    attach(1, 1),
                    track(1),
                    map(1, 0, 8, 0),
                    dma(true, 1, 2, 5),
                    bitmap(1, 0, 16),
                    dma(true, 1, 3, 0),
                    round_trip(),
                    unmap(1, 0, 4),
                    bitmap(1, 0, 16),
                    probe(1),
                ]),
            ),
            (
                "untrackable_and_reset",
                cat(&[
                    attach(2, 2),
                    map(2, 0, 2, 10),
                    migration_toggle(),
                    harvest(),
                    track(2),
                    attach(2, 1),
                    detach(2, 2),
                    reset(),
                ]),
            ),
        ]
    }
}
