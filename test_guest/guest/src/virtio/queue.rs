//! Split virtqueues (virtio 1.2 §2.7), used from ring 3 by the `dma-verify` workload.
//!
//! [`transfer`] takes a queue's spinlock, writes a batch of descriptor chains from
//! descriptor 0 on, publishes them in the available ring, notifies the device (an MMIO
//! write of the queue index to its notification address), polls the used ring until
//! every chain has come back, and drops the lock. So a queue has one batch in flight at
//! a time and every descriptor is free again when the lock is released. Queues are shared
//! by vCPUs when the device has fewer than the vCPUs (vCPU `c` uses queue
//! `c % queues`).
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
const _: () = assert!(BATCH <= 64, "transfer keeps a u64 mask of the chains");

/// One queue: set at boot (before the workload starts, published by `smp::GO`), then its
/// indices are only touched by the holder of `lock`.
struct Vq {
    lock: AtomicBool,
    size: AtomicU16,
    rings: AtomicU64,
    notify: AtomicU64,
    /// The driver's next available index.
    next_avail: AtomicU16,
    /// The used index seen last.
    last_used: AtomicU16,
}

static QUEUES: [Vq; MAX_CPUS] = [const {
    Vq {
        lock: AtomicBool::new(false),
        size: AtomicU16::new(0),
        rings: AtomicU64::new(0),
        notify: AtomicU64::new(0),
        next_avail: AtomicU16::new(0),
        last_used: AtomicU16::new(0),
    }
}; MAX_CPUS];
static COUNT: AtomicU32 = AtomicU32::new(1);
/// Address of the device status register, for DEVICE_NEEDS_RESET while waiting.
static STATUS: AtomicU64 = AtomicU64::new(0);

/// Zeroes the flags and indices of the rings at `rings` and asks for no interrupts (ring
/// 0, at boot, before the device is told where they are).
pub fn init_rings(rings: u64) {
    // SAFETY: `rings` is the start of a queue's ring memory in the driver memory, which
    // bsp_main checked is RAM outside the guest image and the workload regions; nothing
    // else uses it and the device does not know it yet. The words are 2-byte aligned.
    unsafe {
        core::ptr::write_volatile((rings + AVAIL_OFFSET) as *mut u16, AVAIL_F_NO_INTERRUPT);
        core::ptr::write_volatile((rings + AVAIL_OFFSET + 2) as *mut u16, 0);
        core::ptr::write_volatile((rings + USED_OFFSET) as *mut u16, 0);
        core::ptr::write_volatile((rings + USED_OFFSET + 2) as *mut u16, 0);
    }
}

/// Records queue `q` (ring 0, at boot): `size` entries, rings at `rings`, notified at
/// `notify`; `status` is the device status register.
pub fn publish(q: u32, size: u16, rings: u64, notify: u64, status: u64) {
    let vq = &QUEUES[q as usize];
    vq.size.store(size, Ordering::Relaxed);
    vq.rings.store(rings, Ordering::Relaxed);
    vq.notify.store(notify, Ordering::Relaxed);
    vq.next_avail.store(0, Ordering::Relaxed);
    vq.last_used.store(0, Ordering::Relaxed);
    STATUS.store(status, Ordering::Relaxed);
}

/// How many queues there are (ring 0, at boot).
pub fn set_count(n: u32) {
    COUNT.store(n, Ordering::Relaxed);
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

/// The device broke the protocol.
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
        }
    }
}

/// Sends `count` chains (at most [`BATCH`], fitting the queue), chain `j` being
/// `chain(j)`, on `queue` and waits until the device has used every one, then calls
/// `used(j, len)` with the length the device reported for each. Ring 3.
///
/// Chains are made one at a time rather than passed in an array: the ring-3 stacks are
/// small (`boot::STACK_SIZE`).
pub fn transfer(
    queue: u32,
    count: usize,
    chain: impl Fn(usize) -> Chain,
    used: impl FnMut(usize, u32),
) -> Result<(), Error> {
    let vq = &QUEUES[queue as usize];
    while vq
        .lock
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        crate::workload::check_stop();
        core::hint::spin_loop();
    }
    let r = transfer_locked(queue, vq, count, chain, used);
    vq.lock.store(false, Ordering::Release);
    r
}

fn transfer_locked(
    queue: u32,
    vq: &Vq,
    m: usize,
    make: impl Fn(usize) -> Chain,
    mut used_len: impl FnMut(usize, u32),
) -> Result<(), Error> {
    let size = vq.size.load(Ordering::Relaxed);
    let rings = vq.rings.load(Ordering::Relaxed);
    assert!(m <= BATCH, "{m} chains in one batch");
    let avail = rings + AVAIL_OFFSET;
    let used = rings + USED_OFFSET;
    let next_avail = vq.next_avail.load(Ordering::Relaxed);
    let last_used = vq.last_used.load(Ordering::Relaxed);

    // Descriptors from 0 on: every earlier chain has been used, so all are free.
    let mut heads = [0u16; BATCH];
    let mut d: u16 = 0;
    for (j, head) in heads[..m].iter_mut().enumerate() {
        let chain = make(j);
        assert!(
            usize::from(d) + chain.len <= usize::from(size),
            "more descriptors than the queue's {size}"
        );
        *head = d;
        for (k, b) in chain.bufs[..chain.len].iter().enumerate() {
            let mut flags = if b.device_writes { DESC_F_WRITE } else { 0 };
            if k + 1 < chain.len {
                flags |= DESC_F_NEXT;
            }
            let at = rings + 16 * u64::from(d);
            // SAFETY: descriptor `d` < size of this queue's table, in the driver memory
            // (RAM checked at boot, used by nobody else); this vCPU holds the queue's
            // lock and the device reads descriptors only once they are made available
            // below, and is done with every earlier one (all were used).
            unsafe {
                core::ptr::write_volatile(at as *mut u64, b.addr);
                core::ptr::write_volatile((at + 8) as *mut u32, b.len);
                core::ptr::write_volatile((at + 12) as *mut u16, flags);
                core::ptr::write_volatile((at + 14) as *mut u16, d + 1);
            }
            d += 1;
        }
        let slot = next_avail.wrapping_add(j as u16) % size;
        // SAFETY: entry `slot` < size of the available ring, in the driver memory; the
        // device reads it only after the index below is published.
        unsafe { core::ptr::write_volatile((avail + 4 + 2 * u64::from(slot)) as *mut u16, *head) };
    }
    let new_avail = next_avail.wrapping_add(m as u16);
    // SAFETY: the available ring's idx, 2-byte aligned in the driver memory; the device
    // only reads it. A release store: the descriptors and ring entries are written first
    // (and x86 keeps stores in order for the device to see).
    unsafe { AtomicU16::from_ptr((avail + 2) as *mut u16) }.store(new_avail, Ordering::Release);
    // The notification must not be moved before the index by the compiler either.
    compiler_fence(Ordering::SeqCst);
    // SAFETY: the notification address was checked at boot to lie in the device's notify
    // structure, below 4 GiB, mapped uncached; the write only tells the device to look.
    unsafe {
        core::ptr::write_volatile(vq.notify.load(Ordering::Relaxed) as *mut u16, queue as u16)
    };

    // Poll the used ring until all m chains are back.
    // SAFETY: the used ring's idx, 2-byte aligned in the driver memory; the device writes
    // it, so it is read atomically (acquire: the used elements and buffers the device
    // wrote before it are read after it).
    let used_idx = unsafe { AtomicU16::from_ptr((used + 2) as *mut u16) };
    let hz = timer::hz();
    let t0 = timer::now();
    let mut next_look = t0 + hz;
    let mut next_note = t0 + 10 * hz;
    let mut spins: u32 = 0;
    loop {
        let idx = used_idx.load(Ordering::Acquire);
        let done = idx.wrapping_sub(last_used);
        if usize::from(done) == m {
            break;
        }
        if usize::from(done) > m {
            return Err(Error::TooManyUsed {
                queue,
                expected: last_used.wrapping_add(m as u16),
                found: idx,
            });
        }
        core::hint::spin_loop();
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(1024) {
            crate::workload::check_stop();
            let now = timer::now();
            if now >= next_look {
                next_look = now + hz;
                let status = device_status();
                if status & super::NEEDS_RESET != 0 {
                    return Err(Error::NeedsReset { queue, status });
                }
                if now >= next_note {
                    next_note += 10 * hz;
                    let secs = (now - t0) / hz;
                    say!(
                        "note: queue {queue}: {} of {m} requests still with the device after {secs} s",
                        m - usize::from(done)
                    );
                }
            }
        }
    }
    // Chains seen back (BATCH <= 64).
    let mut seen: u64 = 0;
    for i in 0..m {
        let slot = last_used.wrapping_add(i as u16) % size;
        let elem = used + 4 + 8 * u64::from(slot);
        // SAFETY: element `slot` < size of the used ring in the driver memory, written by
        // the device before the index read above (acquire).
        let (id, len) = unsafe {
            (
                core::ptr::read_volatile(elem as *const u32),
                core::ptr::read_volatile((elem + 4) as *const u32),
            )
        };
        match heads[..m].iter().position(|&h| u32::from(h) == id) {
            Some(j) if seen & 1 << j == 0 => {
                seen |= 1 << j;
                used_len(j, len);
            }
            _ => return Err(Error::BadId { queue, id }),
        }
    }
    vq.next_avail.store(new_avail, Ordering::Relaxed);
    vq.last_used
        .store(last_used.wrapping_add(m as u16), Ordering::Relaxed);
    Ok(())
}

fn device_status() -> u8 {
    // SAFETY: the device status register in the common configuration, checked at boot to
    // be below 4 GiB in the device's BAR and mapped uncached; reading it has no effect.
    unsafe { core::ptr::read_volatile(STATUS.load(Ordering::Relaxed) as *const u8) }
}
