//! `workload=dma-verify`: only a DMA device writes the region. Each pass, for every page
//! of its share, a vCPU checks that the page still holds what the device last put there,
//! then has the device overwrite it with something else.
//!
//! * `dma=blk`: at start each vCPU writes disk blocks `i` and `i + N` for every page `i` of
//!   its share (N = pages in the region), block `k` holding `fill_page` of tag
//!   `block_tag(k)` and this run's generation; then "pass 0" reads block `i` into page `i`.
//!   Pass `p` checks page `i` holds block `i + ((p-1)%2)*N`, then reads block
//!   `i + (p%2)*N` into it.
//! * `dma=rng`: pass `p` checks page `i` still hashes to the value kept for it (from pass
//!   2), asks the device for 4096 random bytes into it, checks it changed, keeps the new
//!   hash.
//! * `dma=vfio-user` (`ferry-dma-device`, `user_device`): pass `p` checks page `i` holds
//!   `fill_page` of its DMA address and the generation kept for it (from pass 2), then has
//!   the device overwrite it: a job per batch of contiguous pages (up to
//!   `guest_pattern::user_device::MAX_JOB_BYTES`), a new seed per job; the generation the
//!   job reports is checked in every page at once and kept for the next pass.
//!
//! Requests go in batches (`guest_pattern::dma::BATCH`, fewer if the queue is small), one
//! notification per batch, completion by polling (`virtio::queue`). With `vsize=` each
//! vCPU also runs `verify` on its share of the second region, interleaved: after each
//! batch it verifies the same fraction of its `verify` share.
//!
//! With `iommu=on` the device sits behind a virtio-iommu and sees IOVAs only
//! (`dma_iommu`): batches end at window boundaries, and the `remap=`, `detach=`,
//! `nested-dirty=` and `fault=` work happens between batches and passes.

use core::ops::Range;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};

use guest_pattern::cmdline::{Config, Dma};
use guest_pattern::dma::{block_tag, disk_bytes_needed, DriverMemory, BATCH, BLOCK_SIZE};
use guest_pattern::{check_page, fill_page, page_hash, share, PageCheck, PAGE_SIZE};

use crate::dma_iommu::{self, device_address};
use crate::irq::PassWatch;
use crate::user_device;
use crate::virtio;
use crate::virtio::blk::{status_name, Requests, SECTOR, S_OK, T_IN, T_OUT};
use crate::virtio::queue::{self, Buf, Chain};
use crate::workload::{self, check_stop, Pacer, Progress};

const PAGE: u64 = PAGE_SIZE as u64;

const SECTORS_PER_BLOCK: u64 = BLOCK_SIZE / SECTOR;
/// Rounds of virtio-rng requests in a row that return no bytes before giving up.
const RNG_EMPTY_ROUNDS: u32 = 1000;

/// What the boot CPU set up, published by `smp::GO`.
struct DmaPlan {
    /// `Dma as u8`.
    dma: AtomicU8,
    /// Start of the driver memory.
    memory: AtomicU64,
    /// `dma=blk`: generation of the disk blocks' pattern, new every boot.
    generation: AtomicU64,
    /// Pages per notification.
    batch: AtomicU32,
    /// Requests (descriptor chains) per notification, at most.
    requests: AtomicU32,
    /// `dma=blk`: VIRTIO_BLK_F_FLUSH agreed: flush after writing the disk.
    flush: AtomicBool,
    /// The `verify` region (0 pages: none).
    vstart: AtomicU64,
    vpages: AtomicU64,
}

static PLAN: DmaPlan = DmaPlan {
    dma: AtomicU8::new(0),
    memory: AtomicU64::new(0),
    generation: AtomicU64::new(0),
    batch: AtomicU32::new(1),
    requests: AtomicU32::new(1),
    flush: AtomicBool::new(false),
    vstart: AtomicU64::new(0),
    vpages: AtomicU64::new(0),
};

/// Sets up the device and publishes the plan (boot CPU, ring 0, after the ready line and
/// before `smp::GO`). Prints `guest: dma device=...`; a missing or unusable device, or a
/// disk too small, fails the run.
pub fn setup(cfg: &Config, mem: &DriverMemory) {
    let dma = mem.dma;
    if dma == Dma::VfioUser {
        // Not virtio: no queues; a job covers up to MAX_JOB_BYTES of contiguous pages.
        user_device::setup(cfg, mem);
        let pages = guest_pattern::user_device::MAX_JOB_PAGES as usize;
        publish(cfg, mem, 0, pages, 1, false);
        return;
    }
    let kind = virtio::Kind::of(dma);
    // iommu=on: the virtio-iommu first, and the DMA device's endpoint attached and its
    // memory mapped before its queues are set up.
    if cfg.iommu {
        let Some((dev, func, _)) = virtio::locate(kind) else {
            virtio::missing(kind)
        };
        let iommu = virtio::iommu::setup(mem, cfg.nested_dirty);
        iommu.announce();
        dma_iommu::setup(
            cfg,
            mem,
            &iommu,
            guest_pattern::viommu::endpoint(0, dev, func),
        );
    }
    let apic = crate::apic::id();
    let mut dev = virtio::setup(dma, mem, mem.cpus, cfg.irq, apic, cfg.iommu);
    if cfg.fault {
        dma_iommu::fault_test(dma, mem);
        // The device may be broken now (QEMU: DEVICE_NEEDS_RESET): start it afresh.
        dev = virtio::setup(dma, mem, mem.cpus, cfg.irq, apic, cfg.iommu);
    }
    if dma == Dma::Blk {
        let need = disk_bytes_needed(cfg.size);
        if dev.capacity < need {
            crate::fail(format_args!(
                "disk too small: need {need} bytes, have {}",
                dev.capacity
            ));
        }
    }
    // virtio-blk: a request per page, three descriptors each. virtio-rng: a descriptor per
    // request, several pages each when the queue is short (QEMU's has 8 entries).
    let (batch, requests) = match dma {
        Dma::Blk => {
            let n = (usize::from(dev.queue_size) / 3).clamp(1, BATCH);
            (n, n)
        }
        Dma::Rng | Dma::VfioUser => (BATCH, usize::from(dev.queue_size).clamp(1, BATCH)),
    };
    let generation = crate::timer::now() | 1;
    publish(cfg, mem, generation, batch, requests, dev.flush());

    struct Disk(Dma, u64, u64);
    impl core::fmt::Display for Disk {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            match self.0 {
                Dma::Blk => write!(f, " disk={} generation={:#x}", self.1, self.2),
                Dma::Rng | Dma::VfioUser => Ok(()),
            }
        }
    }
    dev.announce(
        dma,
        batch,
        requests,
        Disk(dma, dev.capacity, generation),
        mem.range(),
    );
}

/// Publishes the plan (boot CPU, before `smp::GO`): `batch` pages per notification (per
/// job), at most `requests` chains.
fn publish(
    cfg: &Config,
    mem: &DriverMemory,
    generation: u64,
    batch: usize,
    requests: usize,
    flush: bool,
) {
    PLAN.dma.store(mem.dma as u8, Ordering::Relaxed);
    PLAN.memory.store(mem.base, Ordering::Relaxed);
    PLAN.generation.store(generation, Ordering::Relaxed);
    PLAN.batch.store(batch as u32, Ordering::Relaxed);
    PLAN.requests.store(requests as u32, Ordering::Relaxed);
    PLAN.flush.store(flush, Ordering::Relaxed);
    if let Some(v) = cfg.verify_region() {
        PLAN.vstart.store(v.start, Ordering::Relaxed);
        PLAN.vpages
            .store((v.end - v.start) / PAGE, Ordering::Relaxed);
    }
}

/// This vCPU's view of the run.
struct Cx {
    cpu: u32,
    dma: Dma,
    queue: u32,
    /// Pages per notification.
    batch: usize,
    /// Requests per notification, at most.
    requests: usize,
    mem: DriverMemory,
    /// Start of the region.
    start: u64,
    /// Pages in the region.
    pages: u64,
    /// This vCPU's pages (indices into the region).
    share: Range<u64>,
    generation: u64,
}

impl Cx {
    fn gpa(&self, page: u64) -> u64 {
        self.start + page * PAGE
    }

    /// Sends `count` chains, chain j = `chain(j)`, and waits for them, passing each used
    /// length to `used`; a device breaking the protocol fails the run.
    fn transfer(&self, count: usize, chain: impl Fn(usize) -> Chain, used: impl FnMut(usize, u32)) {
        if let Err(e) = queue::transfer(self.queue as usize, count, chain, used) {
            workload::fail(format_args!("{}: {e}", virtio::name(self.dma)));
        }
    }
}

/// The `verify` region's share of this vCPU, worked through alongside the DMA pages.
struct Interleave {
    start: u64,
    share: Range<u64>,
    /// Pages of the share verified in this pass.
    done: u64,
}

impl Interleave {
    fn new(cpu: u32, cpus: u32) -> Option<Interleave> {
        let pages = PLAN.vpages.load(Ordering::Relaxed);
        (pages > 0).then(|| Interleave {
            start: PLAN.vstart.load(Ordering::Relaxed),
            share: share(pages, cpus, cpu),
            done: 0,
        })
    }

    /// Verifies (pass `generation`) pages of the share until `num / den` of it is done
    /// (all of it when `den` is 0).
    fn catch_up(&mut self, cpu: u32, generation: u64, num: u64, den: u64, pacer: &mut Pacer) {
        let total = self.share.end - self.share.start;
        let target = if den == 0 {
            total
        } else {
            (u128::from(total) * u128::from(num.min(den)) / u128::from(den)) as u64
        };
        while self.done < target {
            check_stop();
            let gpa = self.start + (self.share.start + self.done) * PAGE;
            workload::verify_page(cpu, gpa, generation);
            pacer.page_done();
            self.done += 1;
        }
    }
}

/// Runs `dma-verify` on vCPU `cpu` (ring 3); returns after the last pass.
pub fn run(cpu: u32) {
    let (start, pages, cpus) = workload::region();
    let dma = Dma::from_u8(PLAN.dma.load(Ordering::Relaxed)).unwrap_or(Dma::Blk);
    let cx = Cx {
        cpu,
        dma,
        queue: queue::queue_of(cpu),
        batch: PLAN.batch.load(Ordering::Relaxed) as usize,
        requests: PLAN.requests.load(Ordering::Relaxed) as usize,
        mem: DriverMemory {
            base: PLAN.memory.load(Ordering::Relaxed),
            cpus,
            pages,
            dma,
            iommu: dma_iommu::on(),
        },
        start,
        pages,
        share: share(pages, cpus, cpu),
        generation: PLAN.generation.load(Ordering::Relaxed),
    };
    let mut verify = Interleave::new(cpu, cpus);
    match dma {
        Dma::Blk => blk(&cx, &mut verify),
        Dma::Rng => rng(&cx, &mut verify),
        Dma::VfioUser => vfio_user(&cx, &mut verify),
    }
}

/// The share in batches of `n` pages (each within one window with `iommu=on`).
fn chunks(r: &Range<u64>, n: usize) -> impl Iterator<Item = Range<u64>> {
    let end = r.end;
    let mut at = r.start;
    core::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let stop = dma_iommu::batch_end(at, (at + n as u64).min(end));
        let chunk = at..stop;
        at = stop;
        Some(chunk)
    })
}

/// After pass `pass`: finishes its `verify` pages, checks the queue's interrupts
/// (`irq=msix`), prints the progress lines (`dirty`: pages the nested dirty bitmap
/// reported, `iommu::Vcpu::pass_end`); whether that was the last pass. If not,
/// `detach=on` happens here.
fn pass_done(
    cx: &Cx,
    pass: u64,
    verify: &mut Option<Interleave>,
    st: &mut Passes,
    dirty: Option<u64>,
) -> bool {
    if let Some(v) = verify.as_mut() {
        v.catch_up(cx.cpu, pass, 0, 0, &mut st.pacer);
        v.done = 0;
    }
    st.irqs.pass_done(cx.cpu, pass);
    if st.progress.due(pass) {
        say!("dma-verified {} {pass}", cx.cpu);
        if verify.is_some() {
            say!("verified {} {pass}", cx.cpu);
        }
        if let Some(n) = dirty {
            say!("nested-dirty checked {} {pass} pages={n}", cx.cpu);
        }
    }
    let last = workload::finished(pass);
    if !last {
        st.iommu.between_passes(pass);
    }
    last
}

/// What a vCPU keeps from pass to pass.
struct Passes {
    pacer: Pacer,
    progress: Progress,
    irqs: PassWatch,
    iommu: dma_iommu::Vcpu,
}

impl Passes {
    fn new(cx: &Cx) -> Passes {
        Passes {
            pacer: Pacer::new(),
            progress: Progress::new(),
            irqs: PassWatch::new(cx.queue),
            iommu: dma_iommu::Vcpu::new(cx.cpu, cx.share.clone()),
        }
    }
}

fn blk(cx: &Cx, verify: &mut Option<Interleave>) {
    let n = cx.pages;
    // The disk: blocks i and i + N for every page i of the share, through the staging
    // buffer (the CPU never writes the region).
    let staging = cx.mem.staging(cx.cpu);
    for base in [0, n] {
        for chunk in chunks(&cx.share, cx.batch) {
            for (j, i) in chunk.clone().enumerate() {
                check_stop();
                // SAFETY: page j < BATCH of this vCPU's own staging buffer, in the driver
                // memory (RAM checked at boot, outside the regions and the image); the
                // device reads it only during the transfer below, not now.
                let page = unsafe { &mut *((staging + j as u64 * PAGE) as *mut [u8; PAGE_SIZE]) };
                fill_page(page, block_tag(base + i), cx.generation);
            }
            blk_io(
                cx,
                T_OUT,
                base + chunk.start,
                chunk.end - chunk.start,
                staging,
            );
        }
    }
    if PLAN.flush.load(Ordering::Relaxed) {
        blk_flush(cx);
    }
    let mut st = Passes::new(cx);
    let total = cx.share.end - cx.share.start;
    // Pass 0 only reads (block i into page i).
    let mut pass = 0;
    loop {
        let mut done = 0;
        for chunk in chunks(&cx.share, cx.batch) {
            if pass > 0 {
                let old = ((pass - 1) % 2) * n;
                for i in chunk.clone() {
                    check_stop();
                    let gpa = cx.gpa(i);
                    // SAFETY: a page of the dma-verify region (RAM, checked at boot) in this
                    // vCPU's share: the device writes it only while this vCPU has a request
                    // for it in flight, which is not now.
                    let page = unsafe { &*(gpa as *const [u8; PAGE_SIZE]) };
                    let found = check_page(page, block_tag(i + old));
                    if !found.is(cx.generation) {
                        blk_mismatch(cx.cpu, gpa, i + old, cx.generation, found);
                    }
                }
            }
            let count = chunk.end - chunk.start;
            blk_io(
                cx,
                T_IN,
                chunk.start + (pass % 2) * n,
                count,
                cx.gpa(chunk.start),
            );
            st.iommu.wrote(chunk.clone());
            for _ in 0..count {
                st.pacer.page_done();
            }
            done += count;
            if pass > 0 {
                if let Some(v) = verify.as_mut() {
                    v.catch_up(cx.cpu, pass, done, total, &mut st.pacer);
                }
            }
            st.iommu.after_batch(pass, done, total);
        }
        let dirty = st.iommu.pass_end(pass);
        if pass > 0 && pass_done(cx, pass, verify, &mut st, dirty) {
            return;
        }
        pass += 1;
    }
}

/// One request per block: `count` blocks from `first_block`, block j to or from the page
/// at `buf + j * 4096`.
fn blk_io(cx: &Cx, kind: u32, first_block: u64, count: u64, buf: u64) {
    let count = count as usize;
    let req = Requests::of(&cx.mem, cx.cpu);
    let chain = |j: usize| {
        let block = first_block + j as u64;
        req.data(
            j,
            kind,
            block * SECTORS_PER_BLOCK,
            buf + j as u64 * PAGE,
            PAGE_SIZE as u32,
        )
    };
    cx.transfer(count, chain, |_, _| {});
    for j in 0..count {
        let got = req.status(j);
        if got != S_OK {
            workload::fail(format_args!(
                "virtio-blk {} of block {} {} gpa {:#x}: status {got} ({})",
                if kind == T_IN { "read" } else { "write" },
                first_block + j as u64,
                if kind == T_IN { "into" } else { "from" },
                buf + j as u64 * PAGE,
                status_name(got)
            ));
        }
    }
}

fn blk_flush(cx: &Cx) {
    let req = Requests::of(&cx.mem, cx.cpu);
    cx.transfer(1, |_| req.flush(0), |_, _| {});
    let got = req.status(0);
    if got != S_OK {
        workload::fail(format_args!(
            "virtio-blk flush: status {got} ({})",
            status_name(got)
        ));
    }
}

fn blk_mismatch(cpu: u32, gpa: u64, block: u64, generation: u64, found: PageCheck) -> ! {
    struct Why(PageCheck);
    impl core::fmt::Display for Why {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            match self.0 {
                PageCheck::Ok { .. } => Ok(()),
                PageCheck::BadChecksum { .. } => write!(f, " (bad checksum)"),
                PageCheck::WrongGpa { found_gpa, .. } => {
                    write!(f, " (holds block {})", found_gpa / BLOCK_SIZE)
                }
                PageCheck::NotWritten { .. } => write!(f, " (no block pattern)"),
            }
        }
    }
    workload::failure(format_args!(
        "MISMATCH cpu={cpu} gpa={gpa:#x} block={block} expected={generation} found={}{}",
        found.generation(),
        Why(found)
    ))
}

fn rng(cx: &Cx, verify: &mut Option<Interleave>) {
    let mut st = Passes::new(cx);
    let total = cx.share.end - cx.share.start;
    let mut pass = 0;
    loop {
        pass += 1;
        let mut done = 0;
        for chunk in chunks(&cx.share, cx.batch) {
            let mut before = [0u64; BATCH];
            for (j, i) in chunk.clone().enumerate() {
                check_stop();
                let gpa = cx.gpa(i);
                let h = page_hash(region_page(gpa));
                if pass > 1 {
                    let kept = read_hash(cx.mem.hash(i));
                    if h != kept {
                        workload::failure(format_args!(
                            "MISMATCH cpu={} gpa={gpa:#x} expected={kept:#018x} found={h:#018x} (hash of the random page changed)",
                            cx.cpu
                        ));
                    }
                }
                before[j] = h;
            }
            let count = chunk.end - chunk.start;
            rng_fill(cx, cx.gpa(chunk.start), count as usize);
            st.iommu.wrote(chunk.clone());
            for (j, i) in chunk.clone().enumerate() {
                let gpa = cx.gpa(i);
                let h = page_hash(region_page(gpa));
                if h == before[j] {
                    workload::fail(format_args!(
                        "device did not write gpa {gpa:#x} (virtio-rng, cpu {}, pass {pass})",
                        cx.cpu
                    ));
                }
                write_hash(cx.mem.hash(i), h);
                st.pacer.page_done();
            }
            done += count;
            if let Some(v) = verify.as_mut() {
                v.catch_up(cx.cpu, pass, done, total, &mut st.pacer);
            }
            st.iommu.after_batch(pass, done, total);
        }
        let dirty = st.iommu.pass_end(pass);
        if pass_done(cx, pass, verify, &mut st, dirty) {
            return;
        }
    }
}

/// `dma=vfio-user`: pass `p`, a job at a time (up to `cx.batch` pages, inside one window
/// with `iommu=on`): from pass 2 each page must hold `fill_page` of its DMA address and
/// the generation kept for it; then the device overwrites the pages, every page must hold
/// the generation the job reports, and that is kept.
fn vfio_user(cx: &Cx, verify: &mut Option<Interleave>) {
    let mut st = Passes::new(cx);
    let total = cx.share.end - cx.share.start;
    let mut pass = 0;
    loop {
        pass += 1;
        let mut done = 0;
        for chunk in chunks(&cx.share, cx.batch) {
            let count = chunk.end - chunk.start;
            let len = count * PAGE;
            let first = cx.gpa(chunk.start);
            // The chunk is one run of DMA addresses (it ends at its window's end).
            let addr = device_address(first, len);
            if pass > 1 {
                for (j, i) in chunk.clone().enumerate() {
                    check_stop();
                    let gpa = cx.gpa(i);
                    let dma = addr + j as u64 * PAGE;
                    let kept = read_hash(cx.mem.generation(i));
                    let found = check_user_page(gpa, dma);
                    if !found.is(kept) {
                        user_mismatch(cx.cpu, gpa, dma, kept, found, None);
                    }
                }
            }
            let seed = crate::timer::now() ^ u64::from(cx.cpu) << 56;
            let generation = match user_device::job(addr, len, seed) {
                Ok(g) => g,
                Err(r) => workload::fail(format_args!(
                    "vfio-user job dma={addr:#x} len={len:#x} (gpa {first:#x}, cpu {}, pass {pass}): status {} ({})",
                    cx.cpu,
                    r.status,
                    guest_pattern::user_device::status_name(r.status)
                )),
            };
            st.iommu.wrote(chunk.clone());
            for (j, i) in chunk.clone().enumerate() {
                let gpa = cx.gpa(i);
                let dma = addr + j as u64 * PAGE;
                let slot = cx.mem.generation(i);
                if generation == 0 || (pass > 1 && read_hash(slot) == generation) {
                    workload::fail(format_args!(
                        "vfio-user job dma={addr:#x} len={len:#x} (gpa {first:#x}, cpu {}, pass {pass}): GENERATION reads {generation:#x}, {}",
                        cx.cpu,
                        if generation == 0 {
                            "no job written yet"
                        } else {
                            "the generation gpa's page already held: not a new job"
                        }
                    ));
                }
                let found = check_page(region_page(gpa), dma);
                if !found.is(generation) {
                    user_mismatch(cx.cpu, gpa, dma, generation, found, Some((addr, len, pass)));
                }
                write_hash(slot, generation);
                st.pacer.page_done();
            }
            done += count;
            if let Some(v) = verify.as_mut() {
                v.catch_up(cx.cpu, pass, done, total, &mut st.pacer);
            }
            st.iommu.after_batch(pass, done, total);
        }
        let dirty = st.iommu.pass_end(pass);
        if pass_done(cx, pass, verify, &mut st, dirty) {
            return;
        }
    }
}

/// `dma=vfio-user`: what region page `gpa` holds, checked as written at DMA address `dma`
/// or, with `iommu=on`, at the page's IOVA in the other bank (`remap=on` moved its
/// window since the device wrote it: the same page under another IOVA).
fn check_user_page(gpa: u64, dma: u64) -> PageCheck {
    let page = region_page(gpa);
    match check_page(page, dma) {
        PageCheck::WrongGpa { found_gpa, .. } if dma_iommu::is_iova_of(gpa, found_gpa) => {
            check_page(page, found_gpa)
        }
        found => found,
    }
}

/// `dma=vfio-user`: page `gpa` (written at DMA address `dma`) does not hold `expected`:
/// `guest: MISMATCH cpu=<c> gpa=0x.. dma=0x.. expected=0x.. found=0x..[ (why)]`, with
/// `job`, found right after the job that wrote it (` right after job dma=0x.. len=0x..
/// pass=<p>`).
fn user_mismatch(
    cpu: u32,
    gpa: u64,
    dma: u64,
    expected: u64,
    found: PageCheck,
    job: Option<(u64, u64, u64)>,
) -> ! {
    struct Why(PageCheck, Option<(u64, u64, u64)>);
    impl core::fmt::Display for Why {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            match self.0 {
                PageCheck::Ok { .. } => Ok(()),
                PageCheck::BadChecksum { .. } => write!(f, " (bad checksum)"),
                PageCheck::WrongGpa { found_gpa, .. } => {
                    write!(f, " (page of dma {found_gpa:#x})")
                }
                PageCheck::NotWritten { .. } => write!(f, " (no page pattern)"),
            }?;
            match self.1 {
                Some((addr, len, pass)) => {
                    write!(f, " right after job dma={addr:#x} len={len:#x} pass={pass}")
                }
                None => Ok(()),
            }
        }
    }
    workload::failure(format_args!(
        "MISMATCH cpu={cpu} gpa={gpa:#x} dma={dma:#x} expected={expected:#x} found={:#x}{}",
        found.generation(),
        Why(found, job)
    ))
}

/// A page of the dma-verify region, to read between requests.
fn region_page(gpa: u64) -> &'static [u8; PAGE_SIZE] {
    // SAFETY: callers pass pages of the dma-verify region (RAM, checked at boot) in this
    // vCPU's share, and use the reference only while no request for that page is in
    // flight, so nothing writes the page meanwhile.
    unsafe { &*(gpa as *const [u8; PAGE_SIZE]) }
}

/// Reads the u64 kept for a page: its hash (`dma=rng`) or generation (`dma=vfio-user`).
fn read_hash(at: u64) -> u64 {
    // SAFETY: the hash or generation slot of a page of this vCPU's share, in the driver
    // memory (RAM checked at boot, 8-byte aligned); only this vCPU uses it.
    unsafe { core::ptr::read_volatile(at as *const u64) }
}

fn write_hash(at: u64, h: u64) {
    // SAFETY: as for `read_hash`.
    unsafe { core::ptr::write_volatile(at as *mut u64, h) }
}

/// Has virtio-rng fill the `count` pages from `gpa`: `cx.requests` requests at most, one
/// device-writable descriptor each, the pages split evenly between them; a buffer the
/// device filled only in part is asked again for the rest.
fn rng_fill(cx: &Cx, gpa: u64, count: usize) {
    let bufs = cx.requests.min(count);
    // Buffer b: its address and length.
    let buffer = |b: usize| {
        let (first, end) = (b * count / bufs, (b + 1) * count / bufs);
        (
            gpa + first as u64 * PAGE,
            ((end - first) * PAGE_SIZE) as u32,
        )
    };
    let mut filled = [0u32; BATCH];
    let mut empty_rounds = 0;
    loop {
        // The buffers not full yet.
        let mut which = [0u8; BATCH];
        let mut m = 0;
        for (b, &f) in filled[..bufs].iter().enumerate() {
            if f < buffer(b).1 {
                which[m] = b as u8;
                m += 1;
            }
        }
        if m == 0 {
            return;
        }
        let mut used = [0u32; BATCH];
        cx.transfer(
            m,
            |k| {
                let b = usize::from(which[k]);
                let (addr, len) = buffer(b);
                let (at, left) = (addr + u64::from(filled[b]), len - filled[b]);
                Chain::new(&[Buf {
                    addr: device_address(at, u64::from(left)),
                    len: left,
                    device_writes: true,
                }])
            },
            |k, len| used[k] = len,
        );
        let mut got = 0;
        for (k, &b) in which[..m].iter().enumerate() {
            let b = usize::from(b);
            let (addr, len) = buffer(b);
            let want = len - filled[b];
            if used[k] > want {
                workload::fail(format_args!(
                    "virtio-rng reported {} bytes written into a {want}-byte buffer at gpa {:#x}",
                    used[k],
                    addr + u64::from(filled[b])
                ));
            }
            filled[b] += used[k];
            got += used[k];
        }
        if got == 0 {
            empty_rounds += 1;
            if empty_rounds == RNG_EMPTY_ROUNDS {
                workload::fail(format_args!(
                    "virtio-rng returned no bytes {RNG_EMPTY_ROUNDS} times in a row"
                ));
            }
        } else {
            empty_rounds = 0;
        }
    }
}
