//! `workload=dma-bench dma=blk bs=N [secs=S | passes=P]`: how fast virtio-blk reads into
//! the guest. The boot vCPU (the others have nothing to do) has the device read the disk
//! sequentially, `bs` bytes a request, wrapping at the end of the disk, into the region,
//! `bs`-byte buffer after buffer, wrapping at the end of the region. The queue is kept
//! full (`virtio::queue::Stream`): up to `slots` requests in flight (64 at most, fewer when
//! the queue is short or the region holds fewer buffers), each one posted again as soon as
//! it is back. A request is three descriptors: header, one `bs`-byte data descriptor,
//! status.
//!
//! First a warm-up, untimed: one request per buffer of the region (so every page of it
//! has been written once before the clock starts). Then the timed run: for `secs`
//! seconds (the last requests finish after it), or `passes` whole passes over the disk.
//! Prints `guest: dma-bench bs=<bytes> requests=<n> bytes=<n> ms=<n> MiB/s=<x> req/s=<y>
//! notifies=<n>` and PASS.
//!
//! `iommu=on`: the device sits behind a virtio-iommu, set up as for `dma-verify iommu=on`
//! (`dma_iommu::setup`: the endpoint attached to a domain, the region mapped window by
//! window, the driver memory in one mapping) before the device's queue exists; every
//! address the device is given is then an IOVA (`dma_iommu::device_address`), and the
//! read loop is the same. `bs` divides the 2 MiB window (the command line sees to it), so
//! no buffer crosses one. Nothing is remapped while it runs: what it measures is the
//! translation of every DMA.

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use guest_pattern::cmdline::{Config, Dma};
use guest_pattern::dma::DriverMemory;

use crate::timer;
use crate::virtio;
use crate::virtio::blk::{status_name, Requests, SECTOR, S_OK, T_IN};
use crate::virtio::queue::Stream;
use crate::workload;

/// Descriptors per request: header, data, status.
const STRIDE: usize = 3;
const MIB: u128 = 1 << 20;

/// What the boot CPU set up, published by `smp::GO`.
struct BenchPlan {
    memory: AtomicU64,
    bs: AtomicU64,
    /// Seconds of the timed run; 0: `passes` passes over the disk instead.
    secs: AtomicU64,
    passes: AtomicU64,
    /// Requests in flight at once.
    slots: AtomicU32,
    /// Bytes of the disk.
    disk: AtomicU64,
}

static PLAN: BenchPlan = BenchPlan {
    memory: AtomicU64::new(0),
    bs: AtomicU64::new(0),
    secs: AtomicU64::new(0),
    passes: AtomicU64::new(0),
    slots: AtomicU32::new(1),
    disk: AtomicU64::new(0),
};

/// Sets up virtio-blk with one queue and publishes the plan (boot CPU, ring 0, after the
/// ready line and before `smp::GO`). Prints `guest: dma device=...`; a missing or unusable
/// device, or a disk smaller than one request, fails the run.
pub fn setup(cfg: &Config, mem: &DriverMemory) {
    // iommu=on: the virtio-iommu first, the endpoint attached and everything mapped
    // before the device's queue is set up (as `dma_verify::setup` does).
    if cfg.iommu {
        let kind = virtio::Kind::of(Dma::Blk);
        let Some((dev, func, _)) = virtio::locate(kind) else {
            virtio::missing(kind)
        };
        let iommu = virtio::iommu::setup(mem, false);
        iommu.announce();
        crate::dma_iommu::setup(
            cfg,
            mem,
            &iommu,
            guest_pattern::viommu::endpoint(0, dev, func),
        );
    }
    // One queue: only the boot vCPU reads.
    let dev = virtio::setup(Dma::Blk, mem, 1, cfg.irq, crate::apic::id(), cfg.iommu);
    let bs = cfg.bench_bs();
    if dev.capacity < bs {
        crate::fail(format_args!(
            "disk too small: need {bs} bytes, have {}",
            dev.capacity
        ));
    }
    let buffers = cfg.size / bs;
    let slots = Stream::capacity(0, STRIDE).min(buffers as usize).max(1);
    PLAN.memory.store(mem.base, Ordering::Relaxed);
    PLAN.bs.store(bs, Ordering::Relaxed);
    PLAN.secs
        .store(cfg.bench_secs().unwrap_or(0), Ordering::Relaxed);
    PLAN.passes
        .store(cfg.passes.unwrap_or(0), Ordering::Relaxed);
    PLAN.slots.store(slots as u32, Ordering::Relaxed);
    PLAN.disk.store(dev.capacity, Ordering::Relaxed);
    struct Disk(u64);
    impl core::fmt::Display for Disk {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            write!(f, " disk={}", self.0)
        }
    }
    dev.announce(Dma::Blk, slots, slots, Disk(dev.capacity), mem.range());
}

/// When a phase stops posting requests.
#[derive(Clone, Copy)]
enum Until {
    /// After this many requests.
    Requests(u64),
    /// Once the TSC passes this.
    Tsc(u64),
}

/// The run on the boot vCPU.
struct Bench {
    req: Requests,
    bs: u64,
    start: u64,
    /// Buffers in the region, blocks of `bs` on the disk.
    buffers: u64,
    blocks: u64,
    /// Sequence number of the next request: disk block `next % blocks` into buffer
    /// `next % buffers`.
    next: u64,
    /// The request each slot has in flight (for failure lines).
    slot_request: [u64; guest_pattern::dma::BATCH],
}

impl Bench {
    fn post(&mut self, stream: &mut Stream, slot: usize) {
        let n = self.next;
        self.next += 1;
        self.slot_request[slot] = n;
        let sector = (n % self.blocks) * self.bs / SECTOR;
        let buf = self.start + (n % self.buffers) * self.bs;
        let chain = self.req.data(slot, T_IN, sector, buf, self.bs as u32);
        stream.post(slot, &chain);
    }

    /// Keeps up to `slots` requests in flight until `until`, then lets them finish;
    /// returns the requests done.
    fn phase(&mut self, stream: &mut Stream, slots: usize, until: Until) -> u64 {
        let first = self.next;
        let more = |next: u64, now: u64| match until {
            Until::Requests(n) => next - first < n,
            Until::Tsc(end) => now < end,
        };
        let now = timer::now();
        for slot in 0..slots {
            if !more(self.next, now) {
                break;
            }
            self.post(stream, slot);
        }
        stream.kick();
        let mut done = 0;
        while stream.in_flight() > 0 {
            let mut free = [0u8; guest_pattern::dma::BATCH];
            let mut nfree = 0;
            let got = stream.reap(|slot, _len| {
                free[nfree] = slot as u8;
                nfree += 1;
            });
            if let Err(e) = got {
                workload::fail(format_args!("virtio-blk: {e}"));
            }
            workload::check_stop();
            let now = match until {
                Until::Tsc(_) => timer::now(),
                Until::Requests(_) => 0,
            };
            for &slot in &free[..nfree] {
                let slot = usize::from(slot);
                let status = self.req.status(slot);
                if status != S_OK {
                    let n = self.slot_request[slot];
                    workload::fail(format_args!(
                        "virtio-blk read of {} bytes at disk offset {} into gpa {:#x}: status {status} ({})",
                        self.bs,
                        (n % self.blocks) * self.bs,
                        self.start + (n % self.buffers) * self.bs,
                        status_name(status)
                    ));
                }
                done += 1;
                if more(self.next, now) {
                    self.post(stream, slot);
                }
            }
            stream.kick();
        }
        done
    }
}

/// Runs `dma-bench` on vCPU `cpu` (ring 3): the boot vCPU reads, the others return at
/// once.
pub fn run(cpu: u32) {
    if cpu != 0 {
        return;
    }
    let (start, pages, cpus) = workload::region();
    let bs = PLAN.bs.load(Ordering::Relaxed);
    let mem = DriverMemory {
        base: PLAN.memory.load(Ordering::Relaxed),
        cpus,
        pages,
        dma: Dma::Blk,
        iommu: crate::dma_iommu::on(),
    };
    let slots = PLAN.slots.load(Ordering::Relaxed) as usize;
    let blocks = PLAN.disk.load(Ordering::Relaxed) / bs;
    let buffers = pages * guest_pattern::PAGE_SIZE as u64 / bs;
    let mut b = Bench {
        req: Requests::of(&mem, 0),
        bs,
        start,
        buffers,
        blocks,
        next: 0,
        slot_request: [0; guest_pattern::dma::BATCH],
    };
    let mut stream = Stream::open(0, STRIDE, slots);
    // Warm-up: every buffer of the region once.
    b.phase(&mut stream, slots, Until::Requests(buffers));
    let notified = stream.notifies();
    let secs = PLAN.secs.load(Ordering::Relaxed);
    let hz = timer::hz();
    let t0 = timer::now();
    let until = if secs > 0 {
        Until::Tsc(t0 + secs * hz)
    } else {
        Until::Requests(PLAN.passes.load(Ordering::Relaxed) * blocks)
    };
    let requests = b.phase(&mut stream, slots, until);
    let ticks = (timer::now() - t0).max(1);
    let notifies = stream.notifies() - notified;
    drop(stream);
    let bytes = requests * bs;
    let ms = u128::from(ticks) * 1000 / u128::from(hz);
    // MiB/s to a tenth, rounded.
    let tenths = (u128::from(bytes) * 10 * u128::from(hz) + u128::from(ticks) * MIB / 2)
        / (u128::from(ticks) * MIB);
    let per_sec =
        (u128::from(requests) * u128::from(hz) + u128::from(ticks) / 2) / u128::from(ticks);
    say!(
        "dma-bench bs={bs} requests={requests} bytes={bytes} ms={ms} MiB/s={}.{} req/s={per_sec} notifies={notifies}",
        tenths / 10,
        tenths % 10
    );
}
