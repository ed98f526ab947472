//! Split virtqueues (virtio 1.2 §2.7), used from ring 3 by the `dma-verify` workload.
//!
//! [`transfer`] (`dma-verify`) takes a queue's spinlock, writes a batch of descriptor
//! chains from descriptor 0 on, publishes them in the available ring, notifies the device
//! (an MMIO write of the queue index to its notification address), polls the used ring
//! until every chain has come back, and drops the lock. So a queue has one batch in flight
//! at a time and every descriptor is free again when the lock is released. Queues are
//! shared by vCPUs when the device has fewer than the vCPUs (vCPU `c` uses queue
//! `c % queues`).
//!
//! A [`Stream`] (`dma-bench`) holds a queue's lock for as long as it lives and keeps it
//! full: each chain has a fixed slot of descriptors, and a slot is posted again as soon as
//! its chain comes back, while the others are still with the device.
//!
//! Both notify only when the device has not set `VIRTQ_USED_F_NO_NOTIFY` (virtio 1.2
//! §2.7.10: it is still serving the ring and will see the new index).
//!
//! A [`Posted`] queue (the virtio-iommu's eventq) has device-writable buffers, one
//! descriptor each, that the device fills when it has something to say; the driver looks
//! at its used ring now and then and puts each buffer back once it has read it.
//!
//! Queues live in slots: slot `q` < `MAX_CPUS` is the DMA device's queue `q`;
//! [`IOMMU_REQUESTQ`] and [`IOMMU_EVENTQ`] are the virtio-iommu's.
//!
//! Ring layout (at the `rings` address of `guest_pattern::dma::DriverMemory`): descriptor
//! table at 0 (16 bytes each: addr u64, len u32, flags u16, next u16), available ring at
//! `AVAIL_OFFSET` (flags u16, idx u16, ring[size] u16), used ring at `USED_OFFSET` (flags
//! u16, idx u16, ring[size] of (id u32, len u32)).

use core::fmt;
use core::sync::atomic::{compiler_fence, AtomicBool, AtomicU16, AtomicU32, AtomicU64, Ordering};

use guest_pattern::dma::{AVAIL_OFFSET, BATCH, USED_OFFSET};

use crate::boot::MAX_CPUS;
use crate::timer;

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const AVAIL_F_NO_INTERRUPT: u16 = 1;
const USED_F_NO_NOTIFY: u16 = 1;
const _: () = assert!(BATCH <= 64, "transfer keeps a u64 mask of the chains");

/// Slot of the virtio-iommu's requestq.
pub const IOMMU_REQUESTQ: usize = MAX_CPUS;
/// Slot of the virtio-iommu's eventq.
pub const IOMMU_EVENTQ: usize = MAX_CPUS + 1;
const SLOTS: usize = MAX_CPUS + 2;

/// One queue: set at boot (before the workload starts, published by `smp::GO`), then its
/// indices are only touched by the holder of `lock`.
struct Vq {
    lock: AtomicBool,
    /// Its index in its device (what a notification writes).
    index: AtomicU16,
    size: AtomicU16,
    rings: AtomicU64,
    notify: AtomicU64,
    /// The driver's next available index.
    next_avail: AtomicU16,
    /// The used index seen last.
    last_used: AtomicU16,
    /// Address of its device's status register, for DEVICE_NEEDS_RESET while waiting.
    status: AtomicU64,
}

static QUEUES: [Vq; SLOTS] = [const {
    Vq {
        lock: AtomicBool::new(false),
        index: AtomicU16::new(0),
        size: AtomicU16::new(0),
        rings: AtomicU64::new(0),
        notify: AtomicU64::new(0),
        next_avail: AtomicU16::new(0),
        last_used: AtomicU16::new(0),
        status: AtomicU64::new(0),
    }
}; SLOTS];
static COUNT: AtomicU32 = AtomicU32::new(1);
/// Chains the device has used, per slot (the DMA device's count for the interrupt
/// report, `irq`).
static COMPLETIONS: [AtomicU64; SLOTS] = [const { AtomicU64::new(0) }; SLOTS];

/// Zeroes the indices of the rings at `rings` and asks for no interrupts unless
/// `interrupts` (ring 0, at boot, before the device is told where they are).
pub fn init_rings(rings: u64, interrupts: bool) {
    let avail_flags = if interrupts { 0 } else { AVAIL_F_NO_INTERRUPT };
    // SAFETY: `rings` is the start of a queue's ring memory in the driver memory, which
    // bsp_main checked is RAM outside the guest image and the workload regions; nothing
    // else uses it and the device does not know it yet. The words are 2-byte aligned.
    unsafe {
        core::ptr::write_volatile((rings + AVAIL_OFFSET) as *mut u16, avail_flags);
        core::ptr::write_volatile((rings + AVAIL_OFFSET + 2) as *mut u16, 0);
        core::ptr::write_volatile((rings + USED_OFFSET) as *mut u16, 0);
        core::ptr::write_volatile((rings + USED_OFFSET + 2) as *mut u16, 0);
    }
}

/// Records queue `index` of a device as slot `slot` (ring 0, at boot): `size` entries,
/// rings at `rings`, notified at `notify`; `status` is the device status register.
pub fn publish(slot: usize, index: u16, size: u16, rings: u64, notify: u64, status: u64) {
    let vq = &QUEUES[slot];
    vq.index.store(index, Ordering::Relaxed);
    vq.size.store(size, Ordering::Relaxed);
    vq.rings.store(rings, Ordering::Relaxed);
    vq.notify.store(notify, Ordering::Relaxed);
    vq.next_avail.store(0, Ordering::Relaxed);
    vq.last_used.store(0, Ordering::Relaxed);
    vq.status.store(status, Ordering::Relaxed);
}

/// How many queues there are (ring 0, at boot).
pub fn set_count(n: u32) {
    COUNT.store(n, Ordering::Relaxed);
}

/// Chains the DMA device has used so far, on every queue.
pub fn completions() -> u64 {
    COMPLETIONS[..MAX_CPUS]
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum()
}

/// Chains the device has used so far on queue `q`.
pub fn completions_on(q: u32) -> u64 {
    COMPLETIONS[q as usize].load(Ordering::Relaxed)
}

/// The queue vCPU `cpu` uses.
pub fn queue_of(cpu: u32) -> u32 {
    cpu % COUNT.load(Ordering::Relaxed).max(1)
}

/// A buffer of a descriptor chain.
#[derive(Clone, Copy, Default)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    /// The device writes it (else it reads it).
    pub device_writes: bool,
}

/// A descriptor chain of up to three buffers.
#[derive(Clone, Copy, Default)]
pub struct Chain {
    bufs: [Buf; 3],
    len: usize,
}

impl Chain {
    pub fn new(bufs: &[Buf]) -> Chain {
        let mut c = Chain {
            bufs: [Buf::default(); 3],
            len: bufs.len(),
        };
        c.bufs[..bufs.len()].copy_from_slice(bufs);
        c
    }
}

/// The device broke the protocol (or did not answer in time).
#[derive(Clone, Copy)]
pub enum Error {
    /// The used index moved further than the chains in flight.
    TooManyUsed {
        queue: u32,
        expected: u16,
        found: u16,
    },
    /// A used element names no chain in flight, or one that came back already.
    BadId { queue: u32, id: u32 },
    /// The device status says DEVICE_NEEDS_RESET.
    NeedsReset { queue: u32, status: u8 },
    /// Not every chain came back within the time given (`transfer_within`).
    Timeout { queue: u32, out: usize, secs: u64 },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Error::TooManyUsed {
                queue,
                expected,
                found,
            } => write!(
                f,
                "queue {queue}: used index {found}, but only up to {expected} was made available"
            ),
            Error::BadId { queue, id } => write!(
                f,
                "queue {queue}: used element with id {id}, not the head of a chain in flight"
            ),
            Error::NeedsReset { queue, status } => write!(
                f,
                "queue {queue}: device status {status:#x} (DEVICE_NEEDS_RESET) while waiting"
            ),
            Error::Timeout { queue, out, secs } => write!(
                f,
                "queue {queue}: {out} request(s) still with the device after {secs} s"
            ),
        }
    }
}

/// A queue while this vCPU holds its lock: its rings and the driver's two indices.
/// Dropping it stores the indices back and releases the lock.
struct Held {
    /// The queue's index in its device.
    queue: u32,
    slot: usize,
    vq: &'static Vq,
    size: u16,
    rings: u64,
    /// The driver's available index: entries before it are written in the ring.
    next_avail: u16,
    /// The available index the device was last shown.
    published: u16,
    /// The used index seen last.
    last_used: u16,
}

impl Held {
    /// Takes the lock of the queue in slot `slot` (spinning).
    fn lock(slot: usize) -> Held {
        let vq = &QUEUES[slot];
        while vq
            .lock
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            crate::workload::check_stop();
            core::hint::spin_loop();
        }
        let next_avail = vq.next_avail.load(Ordering::Relaxed);
        Held {
            queue: u32::from(vq.index.load(Ordering::Relaxed)),
            slot,
            vq,
            size: vq.size.load(Ordering::Relaxed),
            rings: vq.rings.load(Ordering::Relaxed),
            next_avail,
            published: next_avail,
            last_used: vq.last_used.load(Ordering::Relaxed),
        }
    }

    /// Writes `chain` into descriptors `first..first + chain.len`, linked in order.
    fn write_chain(&self, first: u16, chain: &Chain) {
        assert!(
            usize::from(first) + chain.len <= usize::from(self.size),
            "more descriptors than the queue's {}",
            self.size
        );
        for (k, b) in chain.bufs[..chain.len].iter().enumerate() {
            let d = first + k as u16;
            let mut flags = if b.device_writes { DESC_F_WRITE } else { 0 };
            if k + 1 < chain.len {
                flags |= DESC_F_NEXT;
            }
            let at = self.rings + 16 * u64::from(d);
            // SAFETY: descriptor `d` < size of this queue's table (asserted above), in the
            // driver memory (RAM checked at boot, used by nobody else); this vCPU holds the
            // queue's lock, and the device reads a descriptor only while a chain holding it
            // is available and not yet used, which callers make sure this one is not.
            unsafe {
                core::ptr::write_volatile(at as *mut u64, b.addr);
                core::ptr::write_volatile((at + 8) as *mut u32, b.len);
                core::ptr::write_volatile((at + 12) as *mut u16, flags);
                core::ptr::write_volatile((at + 14) as *mut u16, d + 1);
            }
        }
    }

    /// Puts the chain starting at descriptor `head` in the available ring (the device sees
    /// it at the next [`Held::kick`]).
    fn offer(&mut self, head: u16) {
        let slot = self.next_avail % self.size;
        let at = self.rings + AVAIL_OFFSET + 4 + 2 * u64::from(slot);
        // SAFETY: entry `slot` < size of the available ring, in the driver memory; the
        // device reads it only after the index published by `kick`, and has used every
        // chain the entry held before (callers never have more chains out than entries).
        unsafe { core::ptr::write_volatile(at as *mut u16, head) };
        self.next_avail = self.next_avail.wrapping_add(1);
    }

    /// Shows the device the chains offered since the last kick and notifies it, unless it
    /// said it needs no notification (`VIRTQ_USED_F_NO_NOTIFY`: it is still working through
    /// the ring and will look at the index again). Returns whether it notified.
    fn kick(&mut self) -> bool {
        if self.next_avail == self.published {
            return false;
        }
        self.published = self.next_avail;
        let avail_idx = self.rings + AVAIL_OFFSET + 2;
        // SAFETY: the available ring's idx, 2-byte aligned in the driver memory; the device
        // only reads it. An `xchg`: the descriptors and ring entries are written before it
        // (x86 keeps stores in order, and the compiler may not move them past it), and,
        // being a full barrier, the flags below are read only after the device can see
        // the new index (else a device that is just turning notifications back on and
        // looks at the index once more could miss it, and we would not notify).
        unsafe { AtomicU16::from_ptr(avail_idx as *mut u16) }
            .swap(self.next_avail, Ordering::SeqCst);
        // SAFETY: the used ring's flags, 2-byte aligned in the driver memory, written by
        // the device; read atomically.
        let flags = unsafe { AtomicU16::from_ptr((self.rings + USED_OFFSET) as *mut u16) }
            .load(Ordering::SeqCst);
        if flags & USED_F_NO_NOTIFY != 0 {
            return false;
        }
        // The notification must not be moved before the index by the compiler either.
        compiler_fence(Ordering::SeqCst);
        // SAFETY: the notification address was checked at boot to lie in the device's
        // notify structure, below 4 GiB, mapped uncached; the write only tells the device
        // to look.
        unsafe {
            core::ptr::write_volatile(
                self.vq.notify.load(Ordering::Relaxed) as *mut u16,
                self.queue as u16,
            )
        };
        true
    }

    /// The device's used index.
    fn used_idx(&self) -> u16 {
        // SAFETY: the used ring's idx, 2-byte aligned in the driver memory; the device
        // writes it, so it is read atomically (acquire: the used elements and buffers the
        // device wrote before it are read after it).
        unsafe { AtomicU16::from_ptr((self.rings + USED_OFFSET + 2) as *mut u16) }
            .load(Ordering::Acquire)
    }

    /// Used element number `n` (an index of the used ring, wrapping): (id, len).
    fn used_elem(&self, n: u16) -> (u32, u32) {
        let slot = n % self.size;
        let elem = self.rings + USED_OFFSET + 4 + 8 * u64::from(slot);
        // SAFETY: element `slot` < size of the used ring in the driver memory, written by
        // the device before the used index callers read (acquire) showed it.
        unsafe {
            (
                core::ptr::read_volatile(elem as *const u32),
                core::ptr::read_volatile((elem + 4) as *const u32),
            )
        }
    }

    /// The used index, if the device has used more chains since `last_used`: an error if
    /// more than `out` of them (the chains it has).
    fn poll(&self, out: usize) -> Result<u16, Error> {
        let idx = self.used_idx();
        if usize::from(idx.wrapping_sub(self.last_used)) > out {
            return Err(Error::TooManyUsed {
                queue: self.queue,
                expected: self.last_used.wrapping_add(out as u16),
                found: idx,
            });
        }
        Ok(idx)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.vq.next_avail.store(self.next_avail, Ordering::Relaxed);
        self.vq.last_used.store(self.last_used, Ordering::Relaxed);
        self.vq.lock.store(false, Ordering::Release);
    }
}

/// Waiting for the device: every second a look at the device status (DEVICE_NEEDS_RESET
/// fails), every 10 s a note; never gives up (a migration may pause the device a while).
struct Waiter {
    t0: u64,
    next_look: u64,
    next_note: u64,
    /// Give up after this many seconds (`transfer_within`).
    limit: Option<u64>,
    status: u64,
    spins: u32,
}

impl Waiter {
    fn new(vq: &Vq, limit: Option<u64>) -> Waiter {
        let hz = timer::hz();
        let t0 = timer::now();
        Waiter {
            t0,
            next_look: t0 + hz,
            next_note: t0 + 10 * hz,
            limit,
            status: vq.status.load(Ordering::Relaxed),
            spins: 0,
        }
    }

    /// One more spin while `out` of `of` requests are with the device.
    fn spin(&mut self, queue: u32, out: usize, of: usize) -> Result<(), Error> {
        core::hint::spin_loop();
        self.spins = self.spins.wrapping_add(1);
        if !self.spins.is_multiple_of(1024) {
            return Ok(());
        }
        crate::workload::check_stop();
        let now = timer::now();
        if now >= self.next_look {
            let hz = timer::hz();
            self.next_look = now + hz;
            let status = device_status(self.status);
            if status & super::NEEDS_RESET != 0 {
                return Err(Error::NeedsReset { queue, status });
            }
            let secs = (now - self.t0) / hz;
            if self.limit.is_some_and(|l| secs >= l) {
                return Err(Error::Timeout { queue, out, secs });
            }
            if now >= self.next_note {
                self.next_note += 10 * hz;
                let secs = (now - self.t0) / hz;
                say!("note: queue {queue}: {out} of {of} requests still with the device after {secs} s");
            }
        }
        Ok(())
    }
}

/// Sends `m` chains (at most [`BATCH`], fitting the queue), chain `j` being
/// `make(j)`, on the queue in slot `slot` and waits until the device has used every one,
/// then calls `used_len(j, len)` with the length the device reported for each. Ring 3
/// (or ring 0 at boot).
///
/// Chains are made one at a time rather than passed in an array: the ring-3 stacks are
/// small (`boot::STACK_SIZE`).
pub fn transfer(
    slot: usize,
    m: usize,
    make: impl Fn(usize) -> Chain,
    used_len: impl FnMut(usize, u32),
) -> Result<(), Error> {
    transfer_within(slot, m, make, used_len, None)
}

/// [`transfer`], giving up after `limit` seconds if given ([`Error::Timeout`]). After an
/// error the queue is unusable until it is set up again (chains may still be out).
pub fn transfer_within(
    slot: usize,
    m: usize,
    make: impl Fn(usize) -> Chain,
    mut used_len: impl FnMut(usize, u32),
    limit: Option<u64>,
) -> Result<(), Error> {
    assert!(m <= BATCH, "{m} chains in one batch");
    let mut q = Held::lock(slot);
    let queue = q.queue;
    // Descriptors from 0 on: every earlier chain has been used, so all are free.
    let mut heads = [0u16; BATCH];
    let mut d: u16 = 0;
    for (j, head) in heads[..m].iter_mut().enumerate() {
        let chain = make(j);
        q.write_chain(d, &chain);
        q.offer(d);
        *head = d;
        d += chain.len as u16;
    }
    q.kick();

    // Poll the used ring until all m chains are back.
    let mut waiter = Waiter::new(q.vq, limit);
    loop {
        let done = usize::from(q.poll(m)?.wrapping_sub(q.last_used));
        if done == m {
            break;
        }
        waiter.spin(queue, m - done, m)?;
    }
    // Chains seen back (BATCH <= 64).
    let mut seen: u64 = 0;
    for i in 0..m {
        let (id, len) = q.used_elem(q.last_used.wrapping_add(i as u16));
        match heads[..m].iter().position(|&h| u32::from(h) == id) {
            Some(j) if seen & 1 << j == 0 => {
                seen |= 1 << j;
                used_len(j, len);
            }
            _ => return Err(Error::BadId { queue, id }),
        }
    }
    q.last_used = q.last_used.wrapping_add(m as u16);
    COMPLETIONS[slot].fetch_add(m as u64, Ordering::Relaxed);
    Ok(())
}

/// A queue of device-writable buffers the device fills when it has something to say
/// (the virtio-iommu's eventq): buffer `d` is descriptor `d`.
pub struct Posted;

impl Posted {
    /// Offers `count` (at most the queue's size) one-descriptor buffers, buffer `d` being
    /// `buf(d)`, on the queue in slot `slot` (at boot, after DRIVER_OK).
    pub fn post(slot: usize, count: u16, buf: impl Fn(u16) -> Buf) {
        let mut q = Held::lock(slot);
        assert!(count <= q.size, "{count} buffers in a queue of {}", q.size);
        for d in 0..count {
            q.write_chain(d, &Chain::new(&[buf(d)]));
            q.offer(d);
        }
        q.kick();
    }

    /// Calls `got(d, len)` for every buffer the device has used since the last look
    /// (without waiting), then offers each one again as `buf(d)`. Returns how many.
    pub fn take(
        slot: usize,
        mut got: impl FnMut(u16, u32),
        buf: impl Fn(u16) -> Buf,
    ) -> Result<usize, Error> {
        let mut q = Held::lock(slot);
        let size = usize::from(q.size);
        let idx = q.poll(size)?;
        let n = idx.wrapping_sub(q.last_used);
        for i in 0..n {
            let (id, len) = q.used_elem(q.last_used.wrapping_add(i));
            if id >= u32::from(q.size) {
                return Err(Error::BadId { queue: q.queue, id });
            }
            let d = id as u16;
            got(d, len);
            q.write_chain(d, &Chain::new(&[buf(d)]));
            q.offer(d);
        }
        q.last_used = idx;
        q.kick();
        COMPLETIONS[slot].fetch_add(u64::from(n), Ordering::Relaxed);
        Ok(usize::from(n))
    }
}

/// A queue kept busy: up to `slots` chains of at most `stride` descriptors each in flight
/// at once, slot `s` in descriptors `s * stride ..`; as chains come back their slots are
/// filled again, without waiting for the rest (`dma-bench`). Holds the queue's lock from
/// [`Stream::open`] until dropped, which must be with nothing in flight. Ring 3.
pub struct Stream {
    q: Held,
    stride: usize,
    slots: usize,
    /// Slots whose chain is with the device (BATCH <= 64).
    in_flight: u64,
    /// Notifications sent.
    notifies: u64,
}

impl Stream {
    /// How many chains of `stride` descriptors `queue` can have in flight in a stream.
    pub fn capacity(queue: u32, stride: usize) -> usize {
        (usize::from(QUEUES[queue as usize].size.load(Ordering::Relaxed)) / stride.max(1))
            .min(BATCH)
    }

    pub fn open(queue: u32, stride: usize, slots: usize) -> Stream {
        assert!(
            slots >= 1 && slots <= Self::capacity(queue, stride),
            "{slots} slots of {stride} descriptors"
        );
        Stream {
            q: Held::lock(queue as usize),
            stride,
            slots,
            in_flight: 0,
            notifies: 0,
        }
    }

    /// Writes `chain` into free slot `slot` and offers it (the device sees it at the next
    /// [`Stream::kick`]).
    pub fn post(&mut self, slot: usize, chain: &Chain) {
        assert!(slot < self.slots && self.in_flight & 1 << slot == 0 && chain.len <= self.stride);
        let head = (slot * self.stride) as u16;
        self.q.write_chain(head, chain);
        self.q.offer(head);
        self.in_flight |= 1 << slot;
    }

    /// Shows the device what was posted since the last kick (notifying it if it wants).
    pub fn kick(&mut self) {
        if self.q.kick() {
            self.notifies += 1;
        }
    }

    /// Chains with the device.
    pub fn in_flight(&self) -> usize {
        self.in_flight.count_ones() as usize
    }

    /// Notifications sent so far.
    pub fn notifies(&self) -> u64 {
        self.notifies
    }

    /// Waits until the device has used at least one chain in flight (returns 0 at once if
    /// none is), then calls `done(slot, len)` for each chain it has used, whose slot is
    /// then free; returns how many.
    pub fn reap(&mut self, mut done: impl FnMut(usize, u32)) -> Result<usize, Error> {
        let out = self.in_flight();
        if out == 0 {
            return Ok(0);
        }
        let mut waiter = Waiter::new(self.q.vq, None);
        let idx = loop {
            let idx = self.q.poll(out)?;
            if idx != self.q.last_used {
                break idx;
            }
            waiter.spin(self.q.queue, out, out)?;
        };
        let n = idx.wrapping_sub(self.q.last_used);
        for i in 0..n {
            let (id, len) = self.q.used_elem(self.q.last_used.wrapping_add(i));
            let slot = id as usize / self.stride;
            if !(id as usize).is_multiple_of(self.stride)
                || slot >= self.slots
                || self.in_flight & 1 << slot == 0
            {
                return Err(Error::BadId {
                    queue: self.q.queue,
                    id,
                });
            }
            self.in_flight &= !(1 << slot);
            done(slot, len);
        }
        self.q.last_used = idx;
        COMPLETIONS[self.q.slot].fetch_add(u64::from(n), Ordering::Relaxed);
        Ok(usize::from(n))
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        assert!(
            self.in_flight == 0,
            "a stream dropped with chains in flight"
        );
    }
}

/// The device status register at `at`.
fn device_status(at: u64) -> u8 {
    // SAFETY: `at` is a queue's device status register in the common configuration
    // (`publish`), checked at boot to be below 4 GiB in the device's BAR and mapped
    // uncached; reading it has no effect.
    unsafe { core::ptr::read_volatile(at as *const u8) }
}
