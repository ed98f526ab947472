//! `dma-verify iommu=on`: the DMA device works behind the virtio-iommu (`virtio::iommu`)
//! and is given nothing but IOVAs.
//!
//! * Boot ([`setup`], ring 0, before the DMA device's queues exist): PROBE of the
//!   device's endpoint (its BDF; each property printed), ATTACH to a domain (the first
//!   of `domain_range`, at least 1), then a MAP per window of the region, windows in
//!   reverse order (`guest_pattern::viommu::Windows`), and one of the driver memory the
//!   device touches, at `MEMORY_IOVA` (rings, headers, status bytes, staging buffers).
//!   [`device_address`] is then the only way an address reaches the device.
//! * `nested-dirty=on`, DIRTY_TRACKING negotiated: SET_DIRTY_TRACKING on the domain once
//!   mapped. The guest keeps a bit per region page the device wrote and the domain has
//!   not reported yet ([`Vcpu::wrote`]); every GET_DIRTY_BITMAP must report exactly
//!   those pages of its range (`guest: FAIL nested-dirty missing|extra iova=..`); a read
//!   without NO_CLEAR makes them reported, an UNMAP or a DETACH forgets them (the device
//!   must too). Reads: at the end of each pass over the vCPU's share, a window with
//!   NO_CLEAR before `remap=on` unmaps it (and after it is mapped again: all clean), the
//!   whole region with NO_CLEAR before `detach=on` detaches.
//! * `remap=on`: once a pass, half-way through its share, each vCPU unmaps a window wholly
//!   inside its share (not in use: its requests are done) and maps it again, at the same
//!   IOVA on even remaps and in the other bank on odd ones.
//! * `detach=on`: between passes every vCPU waits at a barrier while the boot vCPU
//!   DETACHes the endpoint, ATTACHes it again and maps everything again (the domain died
//!   with its last endpoint; a MAP answered INVAL because it did not is noted and the old
//!   mappings used), then turns dirty tracking back on.
//! * `fault=on` ([`fault_test`], at boot): one request with its data at an unmapped IOVA
//!   ([`FAULT_IOVA`]); it must fail and a fault record naming the endpoint and the IOVA
//!   arrive in the eventq; the DMA device is then reset and set up again.
//! * Fault records are looked at after every pass; one outside the fault test fails the
//!   run.

use core::ops::Range;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};

use guest_pattern::cmdline::{Config, Dma};
use guest_pattern::dma::{DriverMemory, IOMMU_SLOTS};
use guest_pattern::viommu::{
    bitmap_words, properties, Fault, Property, Windows, DIRTY_BITMAP_F_NO_CLEAR,
    DIRTY_TRACKING_F_ENABLE, FAULT_R_MAPPING, F_DIRTY_TRACKING, F_PROBE, MAP_F_READ, MAP_F_WRITE,
    MAX_REGION_BYTES, MEMORY_IOVA, PROBE_DIRTY_F_TRACKABLE, REGION_IOVA, S_INVAL, S_NOENT, S_OK,
    S_UNSUPP, WINDOW_BYTES,
};
use guest_pattern::PAGE_SIZE;

use crate::timer;
use crate::virtio::blk::{status_name, Requests, T_IN};
use crate::virtio::iommu::{self, Batch, Iommu};
use crate::virtio::queue::{self, Buf, Chain};
use crate::workload::{self, check_stop, Progress};

const PAGE: u64 = PAGE_SIZE as u64;
/// Where `fault=on` points the device: just below bank 0, never mapped.
pub const FAULT_IOVA: u64 = REGION_IOVA - 16 * PAGE;
/// Why an endpoint may be unknown to the virtio-iommu (NOENT).
const NOT_BEHIND: &str =
    " (is the device behind this IOMMU? Ferry: iommu=on on the device; QEMU: the same PCI bus)";
/// Seconds the fault test waits for the request, then for the fault record.
const FAULT_REQUEST_SECS: u64 = 10;
const FAULT_RECORD_SECS: u64 = 5;

/// What the boot vCPU set up, published by `smp::GO`.
struct Plan {
    on: AtomicBool,
    /// Nested dirty tracking is on (negotiated, trackable, enabled).
    dirty: AtomicBool,
    remap: AtomicBool,
    detach: AtomicBool,
    domain: AtomicU32,
    endpoint: AtomicU32,
    /// The region: start, pages.
    start: AtomicU64,
    pages: AtomicU64,
    /// The driver memory: base, vCPUs, `dma` (`Dma as u8`).
    base: AtomicU64,
    cpus: AtomicU32,
    dma: AtomicU8,
}

static PLAN: Plan = Plan {
    on: AtomicBool::new(false),
    dirty: AtomicBool::new(false),
    remap: AtomicBool::new(false),
    detach: AtomicBool::new(false),
    domain: AtomicU32::new(0),
    endpoint: AtomicU32::new(0),
    start: AtomicU64::new(0),
    pages: AtomicU64::new(0),
    base: AtomicU64::new(0),
    cpus: AtomicU32::new(1),
    dma: AtomicU8::new(0),
};

// Counters for the final `guest: viommu done ...` line.
static MAPS: AtomicU64 = AtomicU64::new(0);
static UNMAPS: AtomicU64 = AtomicU64::new(0);
static REMAPS: AtomicU64 = AtomicU64::new(0);
static DETACHES: AtomicU64 = AtomicU64::new(0);
static DIRTY_READS: AtomicU64 = AtomicU64::new(0);
static DIRTY_PAGES: AtomicU64 = AtomicU64::new(0);
static FAULTS: AtomicU64 = AtomicU64::new(0);
/// The fault test is under way: fault records are expected.
static FAULT_TEST: AtomicBool = AtomicBool::new(false);
/// `detach=on`'s barrier: arrivals, and the last round the boot vCPU finished.
static ARRIVED: AtomicU64 = AtomicU64::new(0);
static RELEASED: AtomicU64 = AtomicU64::new(0);
/// The note about a domain that kept its mappings has been printed.
static KEPT_NOTED: AtomicBool = AtomicBool::new(false);

fn mem() -> DriverMemory {
    DriverMemory {
        base: PLAN.base.load(Ordering::Relaxed),
        cpus: PLAN.cpus.load(Ordering::Relaxed),
        pages: PLAN.pages.load(Ordering::Relaxed),
        dma: Dma::from_u8(PLAN.dma.load(Ordering::Relaxed)).unwrap_or(Dma::Blk),
        iommu: true,
    }
}

fn windows() -> Windows {
    Windows {
        pages: PLAN.pages.load(Ordering::Relaxed),
    }
}

fn domain() -> u32 {
    PLAN.domain.load(Ordering::Relaxed)
}

fn endpoint() -> u32 {
    PLAN.endpoint.load(Ordering::Relaxed)
}

/// Whether `iommu=on` is in effect.
pub fn on() -> bool {
    PLAN.on.load(Ordering::Relaxed)
}

/// The u64 at `at` in the virtio-iommu's part of the driver memory (window IOVAs, the
/// unreported bitmap), shared between vCPUs.
fn shared_word(at: u64) -> &'static AtomicU64 {
    // SAFETY: `at` is an 8-byte aligned word of the driver memory (RAM checked at boot,
    // outside the regions and the image), in the window table or the unreported bitmap,
    // which nothing but this module touches, always through atomics; the device is never
    // given these pages.
    unsafe { AtomicU64::from_ptr(at as *mut u64) }
}

/// Where window `k` is mapped now.
fn window_iova(k: u64) -> u64 {
    shared_word(mem().iommu_window(k)).load(Ordering::Acquire)
}

fn set_window_iova(k: u64, iova: u64) {
    shared_word(mem().iommu_window(k)).store(iova, Ordering::Release);
}

/// Bit of region page `p` in the bitmap of pages written and not reported yet.
fn unreported_bit(p: u64) -> (&'static AtomicU64, u64) {
    (shared_word(mem().iommu_unreported(p / 64)), 1 << (p % 64))
}

fn is_unreported(p: u64) -> bool {
    let (w, bit) = unreported_bit(p);
    w.load(Ordering::Acquire) & bit != 0
}

/// Marks (`set`) or clears region pages `pages` as written and not reported.
fn set_unreported(pages: Range<u64>, set: bool) {
    for p in pages {
        let (w, bit) = unreported_bit(p);
        if set {
            w.fetch_or(bit, Ordering::AcqRel);
        } else {
            w.fetch_and(!bit, Ordering::AcqRel);
        }
    }
}

/// The address the device is given for `len` bytes at `gpa`: an IOVA with `iommu=on`
/// (the region's through its window, the driver memory's at `MEMORY_IOVA`), `gpa`
/// otherwise. Anything else, or a buffer across two windows, is a bug in the guest.
pub fn device_address(gpa: u64, len: u64) -> u64 {
    if !on() {
        return gpa;
    }
    let start = PLAN.start.load(Ordering::Relaxed);
    let w = windows();
    let end = start + w.pages * PAGE;
    if (start..end).contains(&gpa) {
        let k = w.of((gpa - start) / PAGE);
        let pages = w.pages_of(k);
        let first = start + pages.start * PAGE;
        assert!(
            gpa + len <= start + pages.end * PAGE,
            "{len:#x} bytes at gpa {gpa:#x} cross the end of window {k}"
        );
        return window_iova(k) + (gpa - first);
    }
    let m = mem();
    let part = m.device_part();
    assert!(
        gpa >= part.start && gpa + len <= part.end,
        "gpa {gpa:#x} ({len:#x} bytes) is not mapped for the device"
    );
    MEMORY_IOVA + (gpa - part.start)
}

/// Whether `iova` is an address the device may have written region page `gpa` through:
/// the page's place in its window's home in either bank (`remap=on` moves a window to the
/// other bank and back, and `dma=vfio-user`'s pages name the IOVA they were written at).
/// False without `iommu=on` or for a `gpa` outside the region.
pub fn is_iova_of(gpa: u64, iova: u64) -> bool {
    let start = PLAN.start.load(Ordering::Relaxed);
    let w = windows();
    if !on() || gpa < start || gpa >= start + w.pages * PAGE {
        return false;
    }
    let page = (gpa - start) / PAGE;
    let k = w.of(page);
    let offset = (page - w.pages_of(k).start) * PAGE;
    (0..2).any(|bank| w.home(k, bank) + offset == iova)
}

/// Where a batch of `dma-verify` pages starting at region page `page` must end at the
/// latest (`limit` at most): at the end of its window with `iommu=on` (a buffer must be
/// one run of IOVAs).
pub fn batch_end(page: u64, limit: u64) -> u64 {
    if !on() {
        return limit;
    }
    let w = windows();
    limit.min(w.pages_of(w.of(page)).end)
}

/// Sets up what the DMA device (function `dev.func` on bus 0, `endpoint`) will see
/// through `iommu`: PROBE, ATTACH, MAPs, dirty tracking (see the module documentation);
/// prints `guest: viommu probe ...` per property and `guest: viommu pci=...`. Ring 0, at
/// boot, before the DMA device is set up.
#[inline(never)]
pub fn setup(cfg: &Config, mem: &DriverMemory, iommu: &Iommu, endpoint: u32) {
    let w = Windows { pages: mem.pages };
    if cfg.size > MAX_REGION_BYTES {
        crate::fail(format_args!(
            "iommu=on: a region of {:#x} bytes does not fit the driver's IOVA layout (1 TiB at most)",
            cfg.size
        ));
    }
    let (first_domain, last_domain) = iommu.domain_range;
    let domain = first_domain.max(1);
    if domain > last_domain {
        crate::fail(format_args!(
            "virtio-iommu: domain_range {first_domain}-{last_domain} has no domain but 0"
        ));
    }
    let part = mem.device_part();
    let used: [(&str, Range<u64>); 4] = [
        ("the region (bank 0)", w.bank(0)),
        ("the region (bank 1)", w.bank(1)),
        (
            "the driver memory",
            MEMORY_IOVA..MEMORY_IOVA + (part.end - part.start),
        ),
        // Only fault=on uses it.
        (
            "the fault test",
            FAULT_IOVA..FAULT_IOVA + if cfg.fault { PAGE } else { 0 },
        ),
    ];
    let (lo, hi) = iommu.input_range;
    for (what, r) in &used {
        if !r.is_empty() && (r.start < lo || r.end - 1 > hi) {
            crate::fail(format_args!(
                "virtio-iommu: input_range {lo:#x}-{hi:#x} does not hold the IOVAs of {what}, {:#x}-{:#x}",
                r.start,
                r.end - 1
            ));
        }
    }

    // PROBE: print every property; the IOVAs must keep out of reserved regions.
    let mut dirty_flags = None;
    if iommu.has(F_PROBE) {
        let (status, props) = iommu::probe(mem, endpoint, iommu.probe_size);
        if status != Some(S_OK) {
            crate::fail(format_args!(
                "virtio-iommu: PROBE of endpoint {endpoint:#x} answered {}{}",
                status.map_or(
                    "nothing (used length 0)",
                    guest_pattern::viommu::status_name
                ),
                if status == Some(S_NOENT) {
                    NOT_BEHIND
                } else {
                    ""
                }
            ));
        }
        let mut count = 0;
        for p in properties(props) {
            let p = p.unwrap_or_else(|e| {
                crate::fail(format_args!(
                    "virtio-iommu: PROBE of endpoint {endpoint:#x}: {e}"
                ))
            });
            say!("viommu probe endpoint={endpoint:#x} {p}");
            count += 1;
            match p {
                Property::ResvMem { start, end, .. } => {
                    for (what, r) in &used {
                        if !r.is_empty() && start < r.end && r.start <= end {
                            crate::fail(format_args!(
                                "virtio-iommu: reserved region {start:#x}-{end:#x} of endpoint {endpoint:#x} overlaps the IOVAs of {what}"
                            ));
                        }
                    }
                }
                Property::DirtyTracking { flags } => dirty_flags = Some(flags),
                Property::Other { .. } => {}
            }
        }
        if count == 0 {
            say!("viommu probe endpoint={endpoint:#x} none");
        }
    } else {
        say!(
            "note: the virtio-iommu offers no PROBE: the endpoint's reserved regions are not known"
        );
    }

    // The plan, with every window at home in bank 0 and nothing unreported.
    PLAN.domain.store(domain, Ordering::Relaxed);
    PLAN.endpoint.store(endpoint, Ordering::Relaxed);
    PLAN.start.store(cfg.start, Ordering::Relaxed);
    PLAN.pages.store(mem.pages, Ordering::Relaxed);
    PLAN.base.store(mem.base, Ordering::Relaxed);
    PLAN.cpus.store(mem.cpus, Ordering::Relaxed);
    PLAN.dma.store(mem.dma as u8, Ordering::Relaxed);
    PLAN.remap.store(cfg.remap, Ordering::Relaxed);
    PLAN.detach.store(cfg.detach, Ordering::Relaxed);
    for k in 0..w.count() {
        shared_word(mem.iommu_window(k)).store(w.home(k, 0), Ordering::Relaxed);
    }
    for i in 0..bitmap_words(mem.pages) {
        shared_word(mem.iommu_unreported(i)).store(0, Ordering::Relaxed);
    }
    PLAN.on.store(true, Ordering::Release);

    let mut b = Batch::new(mem.iommu_requests(0));
    let i = b.attach(domain, endpoint);
    b.send();
    if b.status(i) == Some(S_NOENT) {
        b.fail(
            i,
            Some(S_NOENT),
            Some(format_args!("{}", NOT_BEHIND.trim())),
        );
    }
    b.expect_ok(i, None);
    map_all(&mut b, false);

    let nested = if !cfg.nested_dirty {
        "off"
    } else if !iommu.has(F_DIRTY_TRACKING) {
        say!("note: nested dirty tracking not offered (feature bit 10); running without it");
        "not-offered"
    } else {
        let Some(flags) = dirty_flags else {
            crate::fail(format_args!(
                "virtio-iommu: DIRTY_TRACKING negotiated, but the PROBE of endpoint {endpoint:#x} has no dirty-tracking property"
            ))
        };
        let i = b.set_dirty_tracking(domain, DIRTY_TRACKING_F_ENABLE);
        b.send();
        if flags & PROBE_DIRTY_F_TRACKABLE != 0 {
            b.expect_ok(i, None);
            PLAN.dirty.store(true, Ordering::Release);
            "on"
        } else {
            match b.status(i) {
                Some(S_UNSUPP) => {
                    say!("note: nested dirty tracking: endpoint {endpoint:#x} is not TRACKABLE and SET_DIRTY_TRACKING answered UNSUPP; running without it");
                    "untrackable"
                }
                s => b.fail(
                    i,
                    s,
                    Some(format_args!(
                        "endpoint {endpoint:#x} is not TRACKABLE: the extension says UNSUPP"
                    )),
                ),
            }
        }
    };
    say!(
        "viommu pci=00:{:02x}.{} features={:#x} domain={domain} endpoint={endpoint:#x} region_iova={REGION_IOVA:#x} memory_iova={MEMORY_IOVA:#x} windows={} window_bytes={WINDOW_BYTES:#x} mappings={} nested-dirty={nested}",
        iommu.dev,
        iommu.func,
        iommu.features,
        w.count(),
        w.count() + 1
    );
}

/// MAPs the driver memory and every window where the window table says (batches in `b`).
/// `again` (after a re-ATTACH): a first MAP answered INVAL means the domain kept its
/// mappings; then nothing more is mapped and it returns true.
#[inline(never)]
fn map_all(b: &mut Batch, again: bool) -> bool {
    let m = mem();
    let part = m.device_part();
    let flags = MAP_F_READ | MAP_F_WRITE;
    let i = b.map(
        domain(),
        MEMORY_IOVA,
        MEMORY_IOVA + (part.end - part.start) - 1,
        part.start,
        flags,
    );
    b.send();
    if again && b.status(i) == Some(S_INVAL) {
        return true;
    }
    b.expect_ok(i, None);
    MAPS.fetch_add(1, Ordering::Relaxed);
    let w = windows();
    let start = PLAN.start.load(Ordering::Relaxed);
    for k in 0..w.count() {
        if b.is_full() {
            send_all_ok(b, &MAPS);
        }
        let pages = w.pages_of(k);
        let iova = window_iova(k);
        b.map(
            domain(),
            iova,
            iova + (pages.end - pages.start) * PAGE - 1,
            start + pages.start * PAGE,
            flags,
        );
    }
    send_all_ok(b, &MAPS);
    false
}

/// Sends the batch; every request must be answered OK; counts them in `counter`.
fn send_all_ok(b: &mut Batch, counter: &AtomicU64) {
    let n = b.len();
    b.send();
    for i in 0..n {
        b.expect_ok(i, None);
    }
    counter.fetch_add(n as u64, Ordering::Relaxed);
}

/// One GET_DIRTY_BITMAP in a batch: its first region page, pages, IOVA.
#[derive(Clone, Copy, Default)]
struct Read {
    page: u64,
    pages: u64,
    iova: u64,
}

/// Where a dirty-bitmap read happens, for failure lines.
#[derive(Clone, Copy)]
enum When {
    EndOfPass,
    BeforeUnmap,
    AfterMapAgain,
    BeforeDetach,
}

impl When {
    fn name(self) -> &'static str {
        match self {
            When::EndOfPass => "at the end of the pass",
            When::BeforeUnmap => "before UNMAP, NO_CLEAR",
            When::AfterMapAgain => "after MAP again",
            When::BeforeDetach => "before DETACH, NO_CLEAR",
        }
    }
}

/// GET_DIRTY_BITMAP over region pages `pages`, a request per window they touch, with
/// `flags`, each checked against the pages written and not reported (see the module
/// documentation); returns how many pages the device reported. Any difference fails the
/// run.
#[inline(never)]
fn read_dirty(
    b: &mut Batch,
    cpu: u32,
    pass: u64,
    pages: Range<u64>,
    flags: u32,
    when: When,
) -> u64 {
    let w = windows();
    let mut reads = [Read::default(); IOMMU_SLOTS];
    let mut reported = 0;
    for (k, pages) in w.pieces(pages) {
        if b.is_full() {
            reported += check_reads(b, &reads, cpu, pass, flags, when);
        }
        let iova = window_iova(k) + (pages.start - w.pages_of(k).start) * PAGE;
        let n = pages.end - pages.start;
        let i = b.get_dirty_bitmap(domain(), flags, iova, n);
        reads[i] = Read {
            page: pages.start,
            pages: n,
            iova,
        };
    }
    reported + check_reads(b, &reads, cpu, pass, flags, when)
}

/// Sends the GET_DIRTY_BITMAP requests of `b` (described by `reads`) and checks each.
#[inline(never)]
fn check_reads(b: &mut Batch, reads: &[Read], cpu: u32, pass: u64, flags: u32, when: When) -> u64 {
    let n = b.len();
    if n == 0 {
        return 0;
    }
    b.send();
    DIRTY_READS.fetch_add(n as u64, Ordering::Relaxed);
    let start = PLAN.start.load(Ordering::Relaxed);
    let mut reported = 0;
    for (i, r) in reads[..n].iter().enumerate() {
        b.expect_ok(i, None);
        // (missing, extra) counts and the first of each.
        let (mut missing, mut extra) = (0u64, 0u64);
        let (mut first_missing, mut first_extra) = (None, None);
        for word in 0..bitmap_words(r.pages) {
            let got = b.bitmap_word(i, word);
            for bit in 0..64 {
                let j = word * 64 + bit;
                let dirty = got >> bit & 1 != 0;
                let want = j < r.pages && is_unreported(r.page + j);
                reported += u64::from(dirty);
                if dirty && !want {
                    extra += 1;
                    first_extra.get_or_insert(j);
                } else if want && !dirty {
                    missing += 1;
                    first_missing.get_or_insert(j);
                }
            }
        }
        let bad = first_missing
            .map(|j| ("missing", j))
            .or(first_extra.map(|j| ("extra", j)));
        if let Some((what, j)) = bad {
            struct Gpa(Option<u64>);
            impl core::fmt::Display for Gpa {
                fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                    match self.0 {
                        Some(g) => write!(f, "{g:#x}"),
                        None => f.write_str("none (a bit past the range)"),
                    }
                }
            }
            let gpa = (j < r.pages).then(|| start + (r.page + j) * PAGE);
            workload::fail(format_args!(
                "nested-dirty {what} iova={:#x} gpa={} cpu={cpu} pass={pass} ({}: {missing} missing, {extra} extra of {} pages from iova {:#x}, domain {})",
                r.iova + j * PAGE,
                Gpa(gpa),
                when.name(),
                r.pages,
                r.iova,
                domain()
            ));
        }
        if flags & DIRTY_BITMAP_F_NO_CLEAR == 0 {
            set_unreported(r.page..r.page + r.pages, false);
        }
    }
    DIRTY_PAGES.fetch_add(reported, Ordering::Relaxed);
    reported
}

/// Looks at the eventq: prints `guest: viommu fault ...` per record; outside the fault
/// test any record fails the run.
#[inline(never)]
pub fn check_faults() {
    if !on() {
        return;
    }
    let n = iommu::take_faults(|f| say!("viommu fault {f}"));
    FAULTS.fetch_add(n as u64, Ordering::Relaxed);
    if n > 0 && !FAULT_TEST.load(Ordering::Relaxed) {
        workload::fail(format_args!(
            "virtio-iommu reported {n} fault(s) (the line above) outside fault=on's test"
        ));
    }
}

/// `fault=on`: has the DMA device (set up, queue 0) work on a buffer at [`FAULT_IOVA`],
/// which nothing maps: a fault record naming the endpoint (reason mapping, and the IOVA
/// if it gives one) must arrive within 5 s. The request should fail (an error status,
/// nothing written, the device asking for a reset, no answer within 10 s); a device that
/// reports success instead (QEMU's: the write goes nowhere) gets a note. Prints the
/// record(s) and `guest: viommu fault-test dma=<blk|rng> iova=0x.. request=<what
/// happened> faults=<n>`. The caller then sets the device up again. Ring 0, at boot.
#[inline(never)]
pub fn fault_test(dma: Dma, mem: &DriverMemory) {
    if dma == Dma::VfioUser {
        // The command line refuses it; this is a virtio queue test.
        crate::fail(format_args!("fault=on: not with dma=vfio-user"));
    }
    FAULT_TEST.store(true, Ordering::Relaxed);
    let len = PAGE as u32;
    let mut used = 0;
    let req = Requests::of(mem, 0);
    let r = queue::transfer_within(
        0,
        1,
        |_| match dma {
            Dma::Blk => req.data_at(0, T_IN, 0, FAULT_IOVA, len),
            Dma::Rng | Dma::VfioUser => Chain::new(&[Buf {
                addr: FAULT_IOVA,
                len,
                device_writes: true,
            }]),
        },
        |_, l| used = l,
        Some(FAULT_REQUEST_SECS),
    );
    struct Outcome(u8, u32, Option<queue::Error>, Dma);
    impl core::fmt::Display for Outcome {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            match (&self.2, self.3) {
                (Some(queue::Error::NeedsReset { status, .. }), _) => {
                    write!(f, "device-needs-reset(status={status:#x})")
                }
                (Some(queue::Error::Timeout { secs, .. }), _) => {
                    write!(f, "no-answer-in-{secs}s")
                }
                (Some(_), _) => f.write_str("broken"),
                (None, Dma::Blk) => write!(f, "status={}({})", self.0, status_name(self.0)),
                (None, Dma::Rng | Dma::VfioUser) => write!(f, "used={}", self.1),
            }
        }
    }
    let (status, err) = match r {
        Ok(()) => (req.status(0), None),
        Err(e @ (queue::Error::NeedsReset { .. } | queue::Error::Timeout { .. })) => (0, Some(e)),
        Err(e) => crate::fail(format_args!("fault=on: {}: {e}", crate::virtio::name(dma))),
    };
    let wrote = err.is_none()
        && match dma {
            Dma::Blk => status == crate::virtio::blk::S_OK,
            Dma::Rng | Dma::VfioUser => used > 0,
        };
    let outcome = Outcome(status, used, err, dma);
    // The fault record(s).
    let ep = endpoint();
    let t0 = timer::now();
    let mut seen = 0;
    let mut bad: Option<Fault> = None;
    while seen == 0 && timer::now() - t0 < FAULT_RECORD_SECS * timer::hz() {
        seen += iommu::take_faults(|f| {
            say!("viommu fault {f}");
            let about = f.endpoint == ep
                && f.reason == FAULT_R_MAPPING
                && (!f.has_address() || (FAULT_IOVA..FAULT_IOVA + PAGE).contains(&f.address));
            if !about && bad.is_none() {
                bad = Some(f);
            }
        });
    }
    // Any more that follow at once.
    let t1 = timer::now();
    while timer::now() - t1 < timer::hz() / 5 {
        seen += iommu::take_faults(|f| say!("viommu fault {f}"));
    }
    FAULTS.fetch_add(seen as u64, Ordering::Relaxed);
    if seen == 0 {
        crate::fail(format_args!(
            "fault=on: no fault record within {FAULT_RECORD_SECS} s after a {} request at unmapped iova {FAULT_IOVA:#x} ({outcome})",
            crate::virtio::name(dma)
        ));
    }
    if let Some(f) = bad {
        crate::fail(format_args!(
            "fault=on: the fault record ({f}) is not about endpoint {ep:#x} (reason mapping) at iova {FAULT_IOVA:#x}"
        ));
    }
    if wrote {
        // QEMU's devices do this: the write went nowhere, the request completes.
        say!(
            "note: fault=on: {} reported success ({outcome}) for a buffer at unmapped iova {FAULT_IOVA:#x}; the IOMMU faulted it and nothing was written",
            crate::virtio::name(dma)
        );
    }
    say!(
        "viommu fault-test dma={} iova={FAULT_IOVA:#x} request={outcome} faults={seen}",
        dma.name()
    );
    FAULT_TEST.store(false, Ordering::Relaxed);
}

/// A vCPU's side of `iommu=on` during `dma-verify` (ring 3).
pub struct Vcpu {
    cpu: u32,
    share: Range<u64>,
    /// Remaps so far, and whether this pass had one.
    remaps: u64,
    remapped: bool,
    /// Pages the reads of this pass reported.
    reported: u64,
    /// `detach=on` rounds so far.
    rounds: u64,
    remap_lines: Progress,
    detach_lines: Progress,
}

impl Vcpu {
    pub fn new(cpu: u32, share: Range<u64>) -> Vcpu {
        Vcpu {
            cpu,
            share,
            remaps: 0,
            remapped: false,
            reported: 0,
            rounds: 0,
            remap_lines: Progress::new(),
            detach_lines: Progress::new(),
        }
    }

    fn dirty(&self) -> bool {
        PLAN.dirty.load(Ordering::Relaxed)
    }

    fn batch(&self) -> Batch {
        Batch::new(mem().iommu_requests(self.cpu))
    }

    /// The device has written region pages `pages` (a request is back).
    pub fn wrote(&self, pages: Range<u64>) {
        if on() && self.dirty() {
            set_unreported(pages, true);
        }
    }

    /// After a batch, `done` of the share's `total` pages done in pass `pass`: half-way
    /// through, `remap=on` remaps a window.
    #[inline(never)]
    pub fn after_batch(&mut self, pass: u64, done: u64, total: u64) {
        if !on() || !PLAN.remap.load(Ordering::Relaxed) || self.remapped || 2 * done < total {
            return;
        }
        self.remapped = true;
        let w = windows();
        let whole = w.whole_in(&self.share);
        if whole.is_empty() {
            return;
        }
        let k = whole.start + self.remaps % (whole.end - whole.start);
        let old = window_iova(k);
        let new = if self.remaps.is_multiple_of(2) {
            old
        } else {
            w.home(k, 1 - Windows::bank_of(old))
        };
        self.remaps += 1;
        let pages = w.pages_of(k);
        let bytes = (pages.end - pages.start) * PAGE;
        let mut b = self.batch();
        if self.dirty() {
            self.reported += read_dirty(
                &mut b,
                self.cpu,
                pass,
                pages.clone(),
                DIRTY_BITMAP_F_NO_CLEAR,
                When::BeforeUnmap,
            );
        }
        let i = b.unmap(domain(), old, old + bytes - 1);
        b.send();
        b.expect_ok(i, Some(format_args!("remap=on, window {k}")));
        UNMAPS.fetch_add(1, Ordering::Relaxed);
        if self.dirty() {
            // The device forgot them with the mapping.
            set_unreported(pages.clone(), false);
        }
        let start = PLAN.start.load(Ordering::Relaxed);
        let gpa = start + pages.start * PAGE;
        let i = b.map(
            domain(),
            new,
            new + bytes - 1,
            gpa,
            MAP_F_READ | MAP_F_WRITE,
        );
        b.send();
        b.expect_ok(i, Some(format_args!("remap=on, window {k}")));
        MAPS.fetch_add(1, Ordering::Relaxed);
        set_window_iova(k, new);
        if self.dirty() {
            // Nothing written since the UNMAP: all clean.
            self.reported += read_dirty(&mut b, self.cpu, pass, pages, 0, When::AfterMapAgain);
        }
        REMAPS.fetch_add(1, Ordering::Relaxed);
        if self.remap_lines.due(pass) {
            say!(
                "viommu remap {} {pass} window={k} gpa={gpa:#x}-{:#x} iova={old:#x}->{new:#x}",
                self.cpu,
                gpa + bytes
            );
        }
    }

    /// Pass `pass` is over: with nested dirty tracking, reads and checks the dirty bits of
    /// the share; returns the pages reported during the pass (`None` without tracking).
    /// Looks at the eventq either way.
    pub fn pass_end(&mut self, pass: u64) -> Option<u64> {
        if !on() {
            return None;
        }
        check_faults();
        self.remapped = false;
        if !self.dirty() {
            return None;
        }
        let mut b = self.batch();
        let n = self.reported
            + read_dirty(
                &mut b,
                self.cpu,
                pass,
                self.share.clone(),
                0,
                When::EndOfPass,
            );
        self.reported = 0;
        Some(n)
    }

    /// Between pass `pass` and the next (`detach=on`): every vCPU waits here while the boot
    /// vCPU detaches the endpoint and attaches it again.
    pub fn between_passes(&mut self, pass: u64) {
        if !on() || !PLAN.detach.load(Ordering::Relaxed) {
            return;
        }
        self.rounds += 1;
        let round = self.rounds;
        ARRIVED.fetch_add(1, Ordering::AcqRel);
        if self.cpu == 0 {
            let cpus = u64::from(PLAN.cpus.load(Ordering::Relaxed));
            while ARRIVED.load(Ordering::Acquire) < cpus * round {
                check_stop();
                core::hint::spin_loop();
            }
            self.detach_and_attach(pass);
            RELEASED.store(round, Ordering::Release);
        } else {
            while RELEASED.load(Ordering::Acquire) < round {
                check_stop();
                core::hint::spin_loop();
            }
        }
    }

    /// DETACH, ATTACH, MAP everything again, dirty tracking on again (the boot vCPU, with
    /// every other vCPU at the barrier and nothing in flight).
    #[inline(never)]
    fn detach_and_attach(&mut self, pass: u64) {
        let mut b = self.batch();
        let w = windows();
        if self.dirty() {
            read_dirty(
                &mut b,
                self.cpu,
                pass,
                0..w.pages,
                DIRTY_BITMAP_F_NO_CLEAR,
                When::BeforeDetach,
            );
        }
        let (d, ep) = (domain(), endpoint());
        let i = b.detach(d, ep);
        b.send();
        b.expect_ok(i, Some(format_args!("detach=on")));
        if self.dirty() {
            // The domain died with its last endpoint, and its bits with it.
            set_unreported(0..w.pages, false);
        }
        let i = b.attach(d, ep);
        b.send();
        b.expect_ok(i, Some(format_args!("detach=on")));
        let kept = map_all(&mut b, true);
        if kept && !KEPT_NOTED.swap(true, Ordering::Relaxed) {
            say!("note: viommu: MAP after the re-ATTACH answered INVAL: domain {d} kept its mappings when its last endpoint left (Ferry and the spec destroy it); using them");
        }
        if self.dirty() {
            let i = b.set_dirty_tracking(d, DIRTY_TRACKING_F_ENABLE);
            b.send();
            b.expect_ok(i, Some(format_args!("detach=on")));
        }
        DETACHES.fetch_add(1, Ordering::Relaxed);
        if self.detach_lines.due(pass) {
            say!(
                "viommu re-attached endpoint={ep:#x} domain={d} after pass {pass} mappings={}",
                if kept { 0 } else { w.count() + 1 }
            );
        }
    }
}

/// `guest: viommu done maps=<n> unmaps=<n> remaps=<n> detaches=<n> dirty_reads=<n>
/// dirty_pages=<n> faults=<n>` (boot vCPU, every vCPU done), after a last look at the
/// eventq.
#[inline(never)]
pub fn report() {
    if !on() {
        return;
    }
    check_faults();
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    say!(
        "viommu done maps={} unmaps={} remaps={} detaches={} dirty_reads={} dirty_pages={} faults={}",
        get(&MAPS),
        get(&UNMAPS),
        get(&REMAPS),
        get(&DETACHES),
        get(&DIRTY_READS),
        get(&DIRTY_PAGES),
        get(&FAULTS)
    );
}
