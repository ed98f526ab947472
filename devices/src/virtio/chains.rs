//! What every device model does with a queue before its own work: taking the chains the
//! driver made available, one ring's worth per call, walking each to its end, and giving
//! each back in the used ring with the length the device wrote. The guest controls every
//! byte involved, so nothing here trusts it: a chain that does not end, a head that is
//! not a descriptor, an available index that runs ahead of the ring, rings outside RAM,
//! all end in a log line (rate-limited) and the queue going on.
//!
//! `virtio-queue`'s descriptor iterator stops silently on a loop (after queue-size
//! descriptors), on a `next` past the table, on a descriptor it cannot read, on a bad or
//! nested indirect table and on a chain of more than 4 GiB. In all these cases the last
//! descriptor it yielded still says NEXT, which is how [`Walked::complete`] tells a
//! chain that ended from one that was cut short.

use std::fmt;
use std::num::Wrapping;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};

use crate::guest_ram::{GuestRam, RingMemory};

/// One descriptor chain, walked.
#[derive(Debug)]
pub(crate) struct Walked {
    pub head: u16,
    /// The first descriptors of the chain, at most the limit [`walk`] was given.
    pub descs: Vec<Descriptor>,
    /// How many descriptors the chain has (more than `descs.len()` if it is too long).
    pub count: usize,
    pub last: Option<Descriptor>,
    /// The chain ended with a descriptor without NEXT (it was not cut short).
    pub complete: bool,
}

impl Walked {
    pub fn too_long(&self) -> bool {
        self.count > self.descs.len()
    }

    /// Whether the chain can be served: one that does not end or is longer than `limit`
    /// says (of the descriptors it has too many) is reported to `log` with `outcome` (what
    /// the device then does), and is not.
    pub fn usable(&self, log: &mut GuestErrorLog, limit: &str, outcome: &str) -> bool {
        if let Some(why) = self.broken() {
            log.report(format_args!("head {}: {why}; {outcome}", self.head));
            return false;
        }
        if self.too_long() {
            log.report(format_args!(
                "head {}: {} descriptors, more than {limit}; {outcome}",
                self.head, self.count
            ));
            return false;
        }
        true
    }

    /// Why the chain cannot be served at all, if it cannot.
    pub fn broken(&self) -> Option<&'static str> {
        if self.count == 0 {
            Some("the head is not a readable descriptor (index past the table, outside RAM, or a bad indirect table)")
        } else if !self.complete {
            Some("the chain does not end (it loops, is longer than its table, points past its table or outside RAM, or nests indirect tables)")
        } else {
            None
        }
    }
}

/// Walks `chain` to its end (virtio-queue bounds the walk by the table's size), keeping
/// the first `keep` descriptors.
pub(crate) fn walk(chain: DescriptorChain<&RingMemory>, keep: usize) -> Walked {
    let head = chain.head_index();
    let mut descs = Vec::new();
    let mut count = 0usize;
    let mut last = None;
    for d in chain {
        count += 1;
        if descs.len() < keep {
            descs.push(d);
        }
        last = Some(d);
    }
    Walked {
        head,
        descs,
        count,
        last,
        complete: last.is_some_and(|d| !d.has_next()),
    }
}

/// Serves up to one ring's worth of the chains available in `queue`: `serve` does the
/// device's work and returns the bytes it wrote into the chain's device-writable buffers,
/// which become the used length. Returns how many chains went into the used ring.
///
/// Bounded per call (a ring whose used index aliases its available index would otherwise
/// never run dry); the worker calls again while the driver has more.
pub(crate) fn serve_chains(
    queue: &mut Queue,
    ram: &GuestRam,
    keep: usize,
    log: &mut GuestErrorLog,
    serve: impl FnMut(&Walked, &GuestRam, &mut GuestErrorLog) -> u32,
) -> usize {
    serve_chains_while(queue, ram, keep, log, || true, serve)
}

/// [`serve_chains`], taking a chain only while `wanted` says the device has something
/// to put in it (an event queue's buffers wait for events).
pub(crate) fn serve_chains_while(
    queue: &mut Queue,
    ram: &GuestRam,
    keep: usize,
    log: &mut GuestErrorLog,
    mut wanted: impl FnMut() -> bool,
    mut serve: impl FnMut(&Walked, &GuestRam, &mut GuestErrorLog) -> u32,
) -> usize {
    let mem = ram.queue_memory();
    let size = queue.size();
    let mut done = 0usize;
    let mut chain_ends = Vec::new();
    for _ in 0..size {
        if !wanted() {
            break;
        }
        // The available index, read here rather than left to virtio-queue, which logs
        // every refusal at error level and cannot say why it found nothing.
        let Ok(Wrapping(avail)) = queue.avail_idx(mem, Ordering::Acquire) else {
            // The ring's header is not in RAM: nothing can be served, and the worker's
            // check for more fails the same way, so it stops.
            log.report(format_args!(
                "available ring at {:#x} is outside RAM",
                queue.avail_ring()
            ));
            break;
        };
        let next = queue.next_avail();
        if avail == next {
            break;
        }
        let ahead = avail.wrapping_sub(next);
        // The entry virtio-queue is about to read (it logs at error level if it cannot).
        let entry = queue
            .avail_ring()
            .checked_add(4 + 2 * u64::from(next % size.max(1)));
        let readable = entry.is_some_and(|at| ram.read(at, &mut [0u8; 2]).is_ok());
        let chain = if ahead > size || !readable {
            None
        } else {
            queue.iter(mem).ok().and_then(|mut a| a.next())
        };
        let Some(chain) = chain else {
            // The driver published more entries than the ring holds, the entry is not in
            // RAM, or the ring is at 0, which virtio-queue refuses. Nothing any call can
            // take: move to the driver's index, or the worker's "anything new?" check
            // spins on these entries for good.
            log.report(format_args!(
                "available ring at {:#x} unusable (index {avail}, device at {next}, queue size {size}): skipping its entries",
                queue.avail_ring()
            ));
            queue.set_next_avail(avail);
            break;
        };
        if chain.head_index() >= size {
            // Not a descriptor, and add_used refuses it (logging at error level): it
            // cannot be given back.
            log.report(format_args!(
                "available ring names head {} in a queue of {size}; dropped",
                chain.head_index()
            ));
            continue;
        }
        let walked = walk(chain, keep);
        let used = serve(&walked, ram, log);
        // A device may leave the last byte of the chain (blk's status) for the round's
        // mark: see GuestRam::write_marked_by_round.
        if let Some(last) = walked.last.filter(|d| d.is_write_only() && d.len() > 0) {
            chain_ends.push(last.addr().0.saturating_add(u64::from(last.len()) - 1));
        }
        // add_used counts the entry in before it publishes the used index, so it can
        // fail with the entry counted (the index outside RAM, the entry inside): the
        // device's own used index is what says whether the chain went in.
        let before = queue.next_used();
        let added = queue.add_used(mem, walked.head, used);
        if queue.next_used() != before {
            done += 1;
        }
        if let Err(e) = added {
            log.report(format_args!(
                "cannot give head {} back: used ring at {:#x}: {e}",
                walked.head,
                queue.used_ring()
            ));
        }
    }
    // add_used wrote through the unlogged view, and the chains' last bytes may have been
    // too: one mark for the round.
    if done > 0 {
        ram.mark_used_ring(queue);
    }
    ram.mark_pages(&chain_ends);
    done
}

/// Warnings about a guest's bad requests, at most [`GuestErrorLog::PER_WINDOW`] per
/// [`GuestErrorLog::WINDOW`]; the rest go to debug and are counted in the next warning.
#[derive(Debug)]
pub(crate) struct GuestErrorLog {
    device: &'static str,
    window: Option<Instant>,
    in_window: u32,
    suppressed: u64,
    total: u64,
}

impl GuestErrorLog {
    pub const PER_WINDOW: u32 = 10;
    pub const WINDOW: Duration = Duration::from_secs(60);

    pub fn new(device: &'static str) -> Self {
        GuestErrorLog {
            device,
            window: None,
            in_window: 0,
            suppressed: 0,
            total: 0,
        }
    }

    /// How many bad requests were reported so far.
    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn report(&mut self, what: fmt::Arguments) {
        if self.admit(Instant::now()) {
            log::warn!("{}: guest error: {what}", self.device);
        } else {
            log::debug!("{}: guest error: {what}", self.device);
        }
    }

    /// Counts one report at `now`; true if it is to be a warning.
    fn admit(&mut self, now: Instant) -> bool {
        self.total += 1;
        let fresh = self
            .window
            .is_none_or(|start| now.duration_since(start) >= Self::WINDOW);
        if fresh {
            if self.suppressed > 0 {
                log::warn!(
                    "{}: {} more guest errors in the last {:?} were logged at debug level",
                    self.device,
                    self.suppressed,
                    Self::WINDOW
                );
            }
            self.window = Some(now);
            self.in_window = 0;
            self.suppressed = 0;
        }
        if self.in_window < Self::PER_WINDOW {
            self.in_window += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::fuzzing::testing::{Driver, WRITE};
    use crate::virtio::fuzzing::{self, Counting};
    use crate::virtio::{Rng, VirtioDevice};
    use vm_memory::GuestAddress;

    #[test]
    fn a_used_ring_whose_index_is_outside_ram_still_counts_what_went_in() {
        // Found by the fuzzer: the used ring's header in the hole, its entries in RAM.
        let mut d = Driver::new();
        let used = 0x20_0000 - 4;
        d.q.try_set_used_ring_address(GuestAddress(used)).unwrap();
        let head = d.chain(&[(0x4_0000, 16, WRITE)]);
        let mut rng = Rng::new(Counting(0));
        assert_eq!(rng.process_queue(0, &mut d.q, &d.ram.clone()), 1);
        assert_eq!(d.q.next_used(), 1);
        assert_eq!(d.ram.read_obj::<u32>(used + 4).unwrap(), u32::from(head));
        assert_eq!(d.ram.read_obj::<u32>(used + 8).unwrap(), 16);
        // The fuzzer's inputs themselves.
        for input in [
            &b"\xff\xef\xff\x3d\x02\x30\x00\x00\x00\x02\x00\x00\x00\x00\x76\x02\x00\x00\x00\x00\x00\x00\xff\x01\x00\x00\x00\x00\x00\x02\x0e\x00\x00"[..],
            &b"\xfe\xbe\xff\xff\xff\xff\x00\x00\x00\x00\x08\x00\x92\x00\xea\x00\x00\x00\x00\x00\x00\x00\xff\x01\x00\x00\x00\x00\x00\xe3\xdd\xb7"[..],
        ] {
            fuzzing::block_request(input);
            fuzzing::descriptor_chain(input);
        }
    }

    #[test]
    fn a_flood_of_guest_errors_is_mostly_debug() {
        let mut l = GuestErrorLog::new("test");
        let t0 = Instant::now();
        let warned = (0..1000).filter(|_| l.admit(t0)).count();
        assert_eq!(warned, GuestErrorLog::PER_WINDOW as usize);
        assert_eq!(l.suppressed, 1000 - u64::from(GuestErrorLog::PER_WINDOW));
        // The next window warns again (and says how many were not).
        assert!(l.admit(t0 + GuestErrorLog::WINDOW));
        assert_eq!(l.suppressed, 0);
        assert_eq!(l.total(), 1001);
    }
}
