//! The workloads every vCPU runs on its share of the region (`guest_pattern::share`).
//!
//! * `idle`: halt.
//! * `dirty`: add one to the first byte of every page, pass after pass.
//! * `verify`: in pass g, check each page holds generation g-1 (pass 1: nothing to check),
//!   then write generation g.
//! * `dma-verify`: a virtio device writes the pages (see `dma_verify`).
//! * `dma-bench`: virtio-blk reads into the region as fast as it can (see `dma_bench`).
//!
//! After each pass a vCPU prints `guest: pass <cpu> <n>` / `guest: verified <cpu> <n>` /
//! `guest: dma-verified <cpu> <n>`, at most ten lines a second (the last pass of a bounded
//! run is always printed). `rate=` paces the pages of each vCPU separately.

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};

use guest_pattern::cmdline::{Config, Workload};
use guest_pattern::{check_page, fill_page, share, PageCheck, PAGE_SIZE};

use crate::arch::halt_forever;
use crate::timer;

/// The run, published by the boot CPU before `smp::GO`.
struct Plan {
    workload: AtomicU8,
    start: AtomicU64,
    size: AtomicU64,
    /// 0 = forever.
    passes: AtomicU64,
    /// Pages per second per vCPU; 0 = unlimited.
    rate: AtomicU64,
    cpus: AtomicU32,
}

static PLAN: Plan = Plan {
    workload: AtomicU8::new(0),
    start: AtomicU64::new(0),
    size: AtomicU64::new(0),
    passes: AtomicU64::new(0),
    rate: AtomicU64::new(0),
    cpus: AtomicU32::new(1),
};

/// vCPUs that finished their passes.
static DONE: AtomicU32 = AtomicU32::new(0);
/// Set when the run is over (failure, or exit): every vCPU halts at its next page.
pub static STOP: AtomicBool = AtomicBool::new(false);
/// Set by the first vCPU to report a failure.
static FAILED: AtomicBool = AtomicBool::new(false);

/// Publishes the plan (boot CPU, before `smp::GO` is set with Release ordering).
pub fn publish(cfg: &Config, cpus: u32) {
    let w = match cfg.workload {
        Workload::Idle => 0,
        Workload::Dirty => 1,
        Workload::Verify => 2,
        Workload::DmaVerify => 3,
        Workload::DmaBench => 4,
    };
    PLAN.workload.store(w, Ordering::Relaxed);
    PLAN.start.store(cfg.start, Ordering::Relaxed);
    PLAN.size.store(cfg.size, Ordering::Relaxed);
    PLAN.passes
        .store(cfg.passes.unwrap_or(0), Ordering::Relaxed);
    PLAN.rate.store(cfg.rate.unwrap_or(0), Ordering::Relaxed);
    PLAN.cpus.store(cpus, Ordering::Relaxed);
}

/// The workload region's start and pages, and how many vCPUs run the workload.
pub(crate) fn region() -> (u64, u64, u32) {
    (
        PLAN.start.load(Ordering::Relaxed),
        PLAN.size.load(Ordering::Relaxed) / PAGE_SIZE as u64,
        PLAN.cpus.load(Ordering::Relaxed),
    )
}

/// The guest-physical addresses of vCPU `cpu`'s pages.
fn my_pages(cpu: u32) -> impl Iterator<Item = u64> {
    let start = PLAN.start.load(Ordering::Relaxed);
    let pages = PLAN.size.load(Ordering::Relaxed) / PAGE_SIZE as u64;
    share(pages, PLAN.cpus.load(Ordering::Relaxed), cpu).map(move |p| start + p * PAGE_SIZE as u64)
}

/// Runs this vCPU's part of the plan, in ring 3; never returns.
pub extern "C" fn run(cpu: u32) -> ! {
    match PLAN.workload.load(Ordering::Relaxed) {
        1 => dirty(cpu),
        2 => verify(cpu),
        3 => crate::dma_verify::run(cpu),
        4 => crate::dma_bench::run(cpu),
        _ => halt_forever(),
    }
    DONE.fetch_add(1, Ordering::AcqRel);
    if cpu != 0 {
        halt_forever();
    }
    let cpus = PLAN.cpus.load(Ordering::Relaxed);
    while DONE.load(Ordering::Acquire) != cpus {
        check_stop();
        core::hint::spin_loop();
    }
    if matches!(PLAN.workload.load(Ordering::Relaxed), 3 | 4) {
        crate::irq::report();
        crate::dma_iommu::report();
    }
    say!("PASS");
    crate::exit(0)
}

/// Halts this vCPU if the run is over.
pub(crate) fn check_stop() {
    if STOP.load(Ordering::Relaxed) {
        halt_forever();
    }
}

/// Keeps a vCPU at `rate=` pages per second.
pub(crate) struct Pacer {
    step: u64,
    next: u64,
}

impl Pacer {
    pub(crate) fn new() -> Pacer {
        let rate = PLAN.rate.load(Ordering::Relaxed);
        let step = timer::hz().checked_div(rate).map_or(0, |s| s.max(1));
        Pacer {
            step,
            next: timer::now(),
        }
    }

    pub(crate) fn page_done(&mut self) {
        if self.step == 0 {
            return;
        }
        self.next += self.step;
        let now = timer::now();
        // More than 20 ms behind (the vCPU was held back or not running): go on from now
        // instead of catching up in a burst. A burst writes the share again before a
        // dirty log has seen its pages anew (one entry per page between two harvests), so
        // the pages it wrote would outrun what a dirty limit counts.
        if now > self.next + timer::hz() / 50 {
            self.next = now;
        }
        while timer::now() < self.next {
            core::hint::spin_loop();
        }
    }
}

/// Rate-limited per-pass progress lines.
pub(crate) struct Progress {
    last: u64,
}

impl Progress {
    pub(crate) fn new() -> Progress {
        Progress { last: 0 }
    }

    /// Whether to print the line for pass `n`: at most ten a second, plus the last one.
    pub(crate) fn due(&mut self, n: u64) -> bool {
        let now = timer::now();
        let last_pass = n == PLAN.passes.load(Ordering::Relaxed);
        if n == 1 || last_pass || now.wrapping_sub(self.last) >= timer::hz() / 10 {
            self.last = now;
            return true;
        }
        false
    }
}

/// Whether pass `n` was the last one.
pub(crate) fn finished(n: u64) -> bool {
    n == PLAN.passes.load(Ordering::Relaxed)
}

fn dirty(cpu: u32) {
    // Start every counter of the share from 0 (whatever the RAM held before).
    for gpa in my_pages(cpu) {
        // SAFETY: the page is RAM inside the checked workload region (mapped, not the
        // guest's own memory) and in this vCPU's share only, so no one else writes it.
        unsafe { core::ptr::write_volatile(gpa as *mut u8, 0) };
    }
    let mut pacer = Pacer::new();
    let mut progress = Progress::new();
    let mut n = 0;
    loop {
        n += 1;
        for gpa in my_pages(cpu) {
            check_stop();
            let p = gpa as *mut u8;
            // SAFETY: as above: this vCPU's own RAM page of the region.
            unsafe { core::ptr::write_volatile(p, core::ptr::read_volatile(p).wrapping_add(1)) };
            pacer.page_done();
        }
        if progress.due(n) {
            say!("pass {cpu} {n}");
        }
        if finished(n) {
            return;
        }
    }
}

fn verify(cpu: u32) {
    let mut pacer = Pacer::new();
    let mut progress = Progress::new();
    let mut generation = 0;
    loop {
        generation += 1;
        for gpa in my_pages(cpu) {
            check_stop();
            verify_page(cpu, gpa, generation);
            pacer.page_done();
        }
        if progress.due(generation) {
            say!("verified {cpu} {generation}");
        }
        if finished(generation) {
            return;
        }
    }
}

/// `verify` on one page in pass `generation`: check it holds generation - 1 (from pass 2),
/// then write `generation`. The page must be RAM of a checked workload region, in this
/// vCPU's share only.
pub(crate) fn verify_page(cpu: u32, gpa: u64, generation: u64) {
    // SAFETY: the page is RAM inside a checked workload region: identity-mapped, outside
    // the guest image and the driver memory, and in this vCPU's share only, so this is
    // the only reference to it; it holds plain bytes.
    let page = unsafe { &mut *(gpa as *mut [u8; PAGE_SIZE]) };
    if generation > 1 {
        let found = check_page(page, gpa);
        if !found.is(generation - 1) {
            mismatch(cpu, gpa, generation - 1, found);
        }
    }
    fill_page(page, gpa, generation);
}

fn mismatch(cpu: u32, gpa: u64, expected: u64, found: PageCheck) -> ! {
    failure(format_args!(
        "MISMATCH cpu={cpu} gpa={gpa:#x} expected={expected} found={}{}",
        found.generation(),
        Why(found)
    ))
}

/// Ends the run for a wrong page: prints `guest: <what>`, then `guest: FAIL`, and exits
/// with failure. Only the first vCPU to fail prints; the others halt.
pub(crate) fn failure(what: core::fmt::Arguments) -> ! {
    if FAILED.swap(true, Ordering::AcqRel) {
        halt_forever();
    }
    STOP.store(true, Ordering::Relaxed);
    say!("{what}");
    say!("FAIL");
    crate::exit(1)
}

/// Ends the run for anything else that went wrong: `guest: FAIL <why>`, exit with failure.
/// Only the first vCPU to fail prints; the others halt.
pub(crate) fn fail(why: core::fmt::Arguments) -> ! {
    if FAILED.swap(true, Ordering::AcqRel) {
        halt_forever();
    }
    STOP.store(true, Ordering::Relaxed);
    say!("FAIL {why}");
    crate::exit(1)
}

/// What else is wrong with a page beyond its generation, as a suffix of the MISMATCH line.
struct Why(PageCheck);

impl core::fmt::Display for Why {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            PageCheck::Ok { .. } => Ok(()),
            PageCheck::BadChecksum { .. } => write!(f, " (bad checksum)"),
            PageCheck::WrongGpa { found_gpa, .. } => write!(f, " (page of gpa {found_gpa:#x})"),
            PageCheck::NotWritten { .. } => write!(f, " (no verify pattern)"),
        }
    }
}
