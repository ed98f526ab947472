//! A VM's dirty rings kept in step with KVM: every harvest is followed by a
//! `KVM_RESET_DIRTY_RINGS` whose count is checked against the ring it was for, a reset
//! that stops short is finished, and only then are the harvested pages published to the
//! dirty set (a page is never handed to the migration before KVM has write-protected it
//! again, so a write racing the copy always makes a new entry).
//!
//! KVM's side is behind [`RingKernel`] so that the same code runs against a model of
//! KVM's ring in the tests (`kvm_ring_model.rs`), where the interleavings that once hung
//! or lost pages are replayed one step at a time.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use crate::dirty_ring::{faulted_in, DirtyRing, RingEntry, RingIndexes};
use crate::dirty_set::DirtyPageSet;
use crate::{HypervisorError, Result};

/// Most `KVM_RESET_DIRTY_RINGS` calls to bring one ring's reset index to its fetch index
/// (each call makes progress unless interrupted or raced by an overrun; the bound only
/// guards against a KVM that never gets there).
const MAX_RESET_CALLS: u32 = 1000;

/// KVM's half of the ring protocol.
pub(crate) trait RingKernel {
    /// `KVM_RESET_DIRTY_RINGS`: how many entries it reset over all rings.
    fn reset_rings(&mut self) -> Result<u32>;
    /// Runs after an entry of ring `ring` was read and before it is flagged RESET.
    /// Nothing in production; the KVM model uses it to push from a racing vCPU.
    fn between_read_and_flag(&mut self, _ring: usize, _index: u32) {}
}

/// What one collection from one or more rings did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Collected {
    /// Entries taken and published.
    pub entries: u64,
    /// KVM overran a ring: pages may be missing or stay writable without a new entry.
    pub overflowed: bool,
    /// Entries found overwritten after they were flagged (a reset stopped short).
    pub retaken: u64,
    /// Empty entries stepped over because they had been taken out of order before.
    pub skipped: u64,
    /// `KVM_RESET_DIRTY_RINGS` calls beyond one per harvested ring.
    pub extra_resets: u64,
    /// A ring-full exit found nothing to take and no reset since the vCPU entered
    /// `KVM_RUN` could explain it, so one entry was stepped over.
    pub stepped: bool,
    /// An entry named a page outside every memory slot (first one).
    pub bad_entry: Option<RingEntry>,
}

impl Collected {
    pub fn add(&mut self, o: Collected) {
        self.entries += o.entries;
        self.overflowed |= o.overflowed;
        self.retaken += o.retaken;
        self.skipped += o.skipped;
        self.extra_resets += o.extra_resets;
        self.stepped |= o.stepped;
        self.bad_entry = self.bad_entry.or(o.bad_entry);
    }
}

/// What made the rings give up (kept to fail every later collection the same way).
struct OutOfStep {
    index: u32,
    what: String,
    indexes: RingIndexes,
}

impl OutOfStep {
    fn error(&self) -> HypervisorError {
        HypervisorError::RingOutOfStep {
            index: self.index,
            what: self.what.clone(),
            indexes: self.indexes,
        }
    }
}

/// Every vCPU's ring, under one lock held by whoever harvests.
pub(crate) struct DirtyRings {
    rings: Vec<DirtyRing>,
    /// Entries of the harvest under way, published after their reset.
    scratch: Vec<RingEntry>,
    /// KVM's reset index per ring, readable without the lock: a vCPU notes it before
    /// `KVM_RUN` to tell a stale ring-full exit from a real one.
    reset_indexes: Arc<[AtomicU32]>,
    /// Set once a ring could not be kept in step with KVM (see `RingOutOfStep`): no ring
    /// is flagged again, since a wrong copy of KVM's reset index could make a flag take it
    /// past its dirty index; every later collection fails with this.
    failed: Option<OutOfStep>,
    /// Test seam: the page of the next harvested entry is dropped from that harvest, to
    /// prove that the no-lost-page checkers do catch a lost page. Never set outside tests.
    lose_next: bool,
    /// Test-only: pages are published before their reset, the order that lost pages.
    #[cfg(test)]
    publish_first: bool,
}

impl DirtyRings {
    pub fn new(rings: Vec<DirtyRing>) -> Self {
        let reset_indexes = rings
            .iter()
            .map(|r| AtomicU32::new(r.reset_index()))
            .collect();
        let most = rings
            .iter()
            .map(|r| r.entries() as usize)
            .max()
            .unwrap_or(0);
        DirtyRings {
            rings,
            scratch: faulted_in(most),
            reset_indexes,
            failed: None,
            lose_next: false,
            #[cfg(test)]
            publish_first: false,
        }
    }

    pub fn lose_next_entry_for_test(&mut self) {
        self.lose_next = true;
    }

    #[cfg(test)]
    pub fn publish_before_reset_for_test(&mut self) {
        self.publish_first = true;
    }

    pub fn reset_indexes(&self) -> Arc<[AtomicU32]> {
        self.reset_indexes.clone()
    }

    pub fn len(&self) -> usize {
        self.rings.len()
    }

    pub fn ring(&self, index: usize) -> Option<&DirtyRing> {
        self.rings.get(index)
    }

    /// [`DirtyRing::dirtied`] of every ring.
    pub fn dirtied(&mut self) -> Vec<u64> {
        self.rings.iter_mut().map(DirtyRing::dirtied).collect()
    }

    pub fn indexes(&self, index: usize) -> Option<RingIndexes> {
        self.rings.get(index).map(DirtyRing::indexes)
    }

    /// [`DirtyRing::warm`] on every ring.
    pub fn warm(&self) {
        for r in &self.rings {
            std::hint::black_box(r.warm());
        }
    }

    /// Harvests every ring, one ring and its reset at a time (so each reset count is
    /// known to belong to one ring), publishing into `sink`. `look_ahead` (the final
    /// collection, every vCPU parked) also looks past an empty entry at a ring's fetch
    /// index, whether or not that ring is known to have been overrun.
    pub fn collect_all(
        &mut self,
        kernel: &mut impl RingKernel,
        sink: &DirtyPageSet,
        look_ahead: bool,
    ) -> Result<Collected> {
        let mut all = Collected::default();
        for i in 0..self.rings.len() {
            all.add(self.collect_ring(i, kernel, sink, look_ahead)?);
        }
        Ok(all)
    }

    /// Handles ring `i`'s `KVM_EXIT_DIRTY_RING_FULL`, on the thread of its vCPU (so KVM
    /// pushes nothing to it meanwhile). `reset_before_run` is KVM's reset index as the
    /// vCPU saw it before `KVM_RUN`.
    pub fn handle_full(
        &mut self,
        i: usize,
        reset_before_run: u32,
        kernel: &mut impl RingKernel,
        sink: &DirtyPageSet,
    ) -> Result<Collected> {
        let mut out = self.collect_ring(i, kernel, sink, true)?;
        if out.entries > 0 || out.skipped > 0 {
            return Ok(out);
        }
        let ring = &mut self.rings[i];
        if ring.reset_index() != reset_before_run {
            // Someone reset this ring since KVM looked at it: the exit is stale, and KVM
            // will let the vCPU run now.
            return Ok(out);
        }
        // KVM saw this very reset index and called the ring full, yet nothing is
        // published anywhere: what it counts was consumed out of order before. Step over
        // one entry; the next exit, if any, steps over the next.
        let known_ahead = ring.may_be_ahead();
        if ring.step_over_one() {
            out.stepped = true;
            // Consumed entries nobody knew of: something went unseen.
            out.overflowed |= !known_ahead;
            self.reset_ring(i, kernel, &mut out)?;
        }
        Ok(out)
    }

    /// Harvests ring `i`, resets it in KVM until KVM's reset index reaches the fetch
    /// index, then publishes what it took. `look_ahead`: an empty entry at the fetch index
    /// is not taken as "nothing published" (see [`DirtyRing::skip_taken_ahead`]); always
    /// so for a ring KVM once overran.
    fn collect_ring(
        &mut self,
        i: usize,
        kernel: &mut impl RingKernel,
        sink: &DirtyPageSet,
        look_ahead: bool,
    ) -> Result<Collected> {
        if let Some(failed) = &self.failed {
            return Err(failed.error());
        }
        self.scratch.clear();
        let mut out = Collected::default();
        let ring = &mut self.rings[i];
        let known_ahead = ring.may_be_ahead();
        let h = ring.harvest(&mut self.scratch, |x| kernel.between_read_and_flag(i, x));
        out.overflowed |= h.overflowed;
        if look_ahead || known_ahead {
            // The harvest stops at the first empty entry, which after an overrun may be
            // one consumed ahead of its turn with published ones past it: step over and go
            // on.
            loop {
                let skipped = ring.skip_taken_ahead();
                if skipped == 0 {
                    break;
                }
                out.skipped += u64::from(skipped);
                // Consumed entries in a ring not known to be overrun: something went unseen.
                out.overflowed |= !known_ahead;
                let h = ring.harvest(&mut self.scratch, |x| kernel.between_read_and_flag(i, x));
                out.overflowed |= h.overflowed;
            }
        }
        if self.lose_next && !self.scratch.is_empty() {
            // Every entry naming that page: KVM may log a page twice.
            self.lose_next = false;
            let lost = self.scratch[0];
            self.scratch.retain(|e| *e != lost);
        }
        // Published after the reset: until KVM has write-protected a page again, a write
        // to it makes no new entry, so a migration that took and copied it earlier would
        // miss that write.
        let published_early = if self.publishes_before_reset() {
            self.publish(0, sink, &mut out);
            self.scratch.len()
        } else {
            0
        };
        let reset = self.reset_ring(i, kernel, &mut out);
        // Even when the reset failed: what was taken is dirty (the caller then treats all
        // RAM as dirty, since pages KVM did not reset stay writable without entries).
        self.publish(published_early, sink, &mut out);
        out.entries = self.scratch.len() as u64;
        reset.map(|()| out)
    }

    fn publishes_before_reset(&self) -> bool {
        #[cfg(test)]
        return self.publish_first;
        #[cfg(not(test))]
        false
    }

    /// Marks `scratch[from..]` in the dirty set.
    fn publish(&self, from: usize, sink: &DirtyPageSet, out: &mut Collected) {
        for &(slot, offset) in &self.scratch[from..] {
            if sink.mark_ring_entry(slot, offset).is_err() {
                out.bad_entry.get_or_insert((slot, offset));
            }
        }
    }

    /// Gives up on the rings: see `failed`.
    fn fail(&mut self, i: usize, what: String) -> HypervisorError {
        let failed = OutOfStep {
            index: i as u32,
            what,
            indexes: self.rings[i].indexes(),
        };
        let e = failed.error();
        self.failed = Some(failed);
        e
    }

    /// Calls `KVM_RESET_DIRTY_RINGS` until KVM's reset index for ring `i` is its fetch
    /// index. A call that stops short was interrupted (call again) or ran into an entry
    /// KVM overwrote after it was flagged (take it, flag it again, call again).
    fn reset_ring(
        &mut self,
        i: usize,
        kernel: &mut impl RingKernel,
        out: &mut Collected,
    ) -> Result<()> {
        let ring = &mut self.rings[i];
        let mut calls = 0u32;
        while ring.pending_reset() > 0 {
            if calls == MAX_RESET_CALLS {
                let what = format!(
                    "KVM_RESET_DIRTY_RINGS left {} entries after {calls} calls",
                    ring.pending_reset()
                );
                return Err(self.fail(i, what));
            }
            calls += 1;
            let count = match kernel.reset_rings() {
                Ok(count) => count,
                // What KVM reset before failing is unknown: the copy of its index is lost.
                Err(e) => return Err(self.fail(i, e.to_string())),
            };
            if !ring.note_reset(count) {
                let what = format!(
                    "KVM_RESET_DIRTY_RINGS reset {count} entries, only {} were flagged",
                    ring.pending_reset()
                );
                return Err(self.fail(i, what));
            }
            if ring.pending_reset() > 0 {
                if ring.reset_entry_still_flagged() {
                    // Interrupted: a kernel may have cleared the last entries of that walk
                    // without write-protecting their pages, which nothing here can see.
                    out.overflowed = true;
                }
                let Some(retaken) = ring
                    .retake_overwritten(&mut self.scratch, |x| kernel.between_read_and_flag(i, x))
                else {
                    return Err(self.fail(
                        i,
                        "an entry below the fetch index is already empty, so \
                         KVM's reset index is not the one kept here"
                            .into(),
                    ));
                };
                if retaken > 0 {
                    out.retaken += u64::from(retaken);
                    out.overflowed = true;
                }
            }
        }
        if !ring.check_reset() {
            out.overflowed = true;
        }
        out.extra_resets += u64::from(calls.saturating_sub(1));
        self.reset_indexes[i].store(ring.reset_index(), Ordering::Release);
        Ok(())
    }
}
