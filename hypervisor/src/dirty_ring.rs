//! One vCPU's KVM dirty ring: the mmap of `struct kvm_dirty_gfn` entries at
//! `KVM_DIRTY_LOG_PAGE_OFFSET` of the vCPU fd, and the userspace half of the harvest
//! protocol, kept in step with KVM's own indexes.
//!
//! KVM keeps two indexes per ring: `dirty` (where it pushes next) and `reset` (where its
//! `KVM_RESET_DIRTY_RINGS` walk starts). The walk resets entries for as long as they carry
//! the RESET flag and nothing stops it at `dirty`: one RESET flag too many and `reset`
//! passes `dirty`, KVM's `used = dirty - reset` wraps, and the vCPU exits "ring full"
//! forever. So this ring keeps an exact copy of KVM's reset index (from what each reset
//! returns) beside its own fetch index, and flags RESET only on entries it has seen
//! published: `reset <= fetch <= dirty` holds at every step.
//!
//! Entries are taken with a compare-exchange from DIRTY to RESET and checked again after
//! it, so an entry KVM overwrites while it is being taken (this host's KVM pushes past a
//! full ring) is noticed rather than reset unread. After KVM's reset, every entry it was
//! meant to reset is read once more: a push that raced the reset walk (KVM locks neither
//! against the other) leaves it changed, and counts as an overrun.

use std::os::unix::io::RawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use kvm_bindings::{kvm_dirty_gfn, KVM_DIRTY_LOG_PAGE_OFFSET};

use crate::{HypervisorError, Result};

pub(crate) const GFN_F_DIRTY: u32 = 1 << 0;
pub(crate) const GFN_F_RESET: u32 = 1 << 1;

/// A dirty page as a ring entry names it: `slot` = as_id << 16 | slot id, `offset` = page
/// index inside the slot.
pub(crate) type RingEntry = (u32, u64);

/// What one walk over a ring took.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingHarvest {
    /// Entries taken and flagged RESET (each needs `KVM_RESET_DIRTY_RINGS`).
    pub entries: u32,
    /// KVM overran the ring: the walk took a whole ring's worth of entries (a correct
    /// KVM keeps a reserve and never fills it), or an entry changed while it was taken.
    /// Entries were overwritten, so pages may be missing and may stay writable unlogged.
    pub overflowed: bool,
}

/// The ring's indexes, for logs and test failure messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingIndexes {
    /// Next entry this side looks at.
    pub fetch: u32,
    /// KVM's reset index as its return values tell it.
    pub reset: u32,
    /// Entries past `fetch` may already have been taken out of order (after an overrun).
    pub may_be_ahead: bool,
    /// Entries taken over the ring's life.
    pub harvested: u64,
}

impl std::fmt::Display for RingIndexes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "fetch index {}, KVM reset index {}, {} harvested{}",
            self.fetch,
            self.reset,
            self.harvested,
            if self.may_be_ahead {
                ", entries may be ahead"
            } else {
                ""
            }
        )
    }
}

/// A vCPU's dirty ring. All methods need `&mut self`: one harvester at a time per ring
/// (the indexes are ours), while KVM keeps pushing entries from the running vCPU.
#[derive(Debug)]
pub struct DirtyRing {
    base: NonNull<kvm_dirty_gfn>,
    entries: u32,
    /// Entries `< fetch_index` were seen published and taken.
    fetch_index: u32,
    /// KVM's reset index: entries `reset_index..fetch_index` are flagged RESET and wait
    /// for `KVM_RESET_DIRTY_RINGS`.
    reset_index: u32,
    /// Set once KVM overran this ring: entries at and past the fetch index may already
    /// have been taken (out of order) and reset, so an empty entry at the fetch index no
    /// longer proves that KVM published nothing there. Harvests then look further.
    may_be_ahead: bool,
    /// What the entries from `flagged_from` to the fetch index held when they were
    /// flagged RESET, checked once KVM has reset them.
    flagged: Vec<RingEntry>,
    flagged_from: u32,
    total_harvested: u64,
    /// Pages in the harvested entries, counted by [`PageRuns`] within each harvest.
    pages_harvested: u64,
    /// Published entries from the fetch index up to here were counted by
    /// [`Self::dirtied`] without being taken (where its next count goes on from).
    peeked_to: u32,
    /// Pages among those entries.
    peeked: PageRuns,
    /// Unmapped in Drop (false for test rings over memory someone else owns).
    owned: bool,
}

/// Counts the pages a sequence of ring entries names, a run of entries naming one page
/// as one. KVM pushes an entry for every write it emulates, whether or not the page was
/// write-protected (on this host guest ring-0 code is emulated instruction by
/// instruction: zeroing one page pushed 613 entries naming it), so entries count writes,
/// and a dirty rate wants pages. Only runs are merged (one compare an entry): emulated
/// writes alternating between pages still count each time; the bursts seen here were
/// runs.
#[derive(Debug, Default, Clone, Copy)]
struct PageRuns {
    pages: u64,
    last: Option<RingEntry>,
}

impl PageRuns {
    fn add(&mut self, entry: RingEntry) {
        if self.last.replace(entry) != Some(entry) {
            self.pages += 1;
        }
    }
}

// SAFETY: the mapping is owned by this struct and only reached through `&mut self` or
// atomics on `flags`; KVM is the only other party and synchronises through those flags.
unsafe impl Send for DirtyRing {}

impl DirtyRing {
    /// Maps the ring of the vCPU whose fd is `vcpu_fd`; `entries` is the size the VM was
    /// created with (a power of two).
    pub fn map(vcpu_fd: RawFd, index: u32, entries: u32) -> Result<Self> {
        let bytes = entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        // SAFETY: page size query has no memory-safety preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as libc::off_t;
        // SAFETY: a fresh shared mapping of a KVM vCPU fd at the documented offset; the
        // result is checked before use and unmapped in Drop with the same length.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                // Populated now: the final collection reads every entry's flags while the
                // guest is paused, and a first touch of each of the ring's pages there
                // (an exit to the outer hypervisor on this host) cost ~0.5 ms of
                // downtime per vCPU with 65536 entries.
                libc::MAP_SHARED | libc::MAP_POPULATE,
                vcpu_fd,
                page * KVM_DIRTY_LOG_PAGE_OFFSET as libc::off_t,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(HypervisorError::MapRing {
                index,
                bytes,
                source: std::io::Error::last_os_error(),
            });
        }
        let base = NonNull::new(addr.cast()).expect("mmap never returns NULL on success");
        Ok(DirtyRing::over(base, entries, true))
    }

    fn over(base: NonNull<kvm_dirty_gfn>, entries: u32, owned: bool) -> Self {
        debug_assert!(entries.is_power_of_two());
        DirtyRing {
            base,
            entries,
            fetch_index: 0,
            reset_index: 0,
            may_be_ahead: false,
            flagged: faulted_in(entries as usize),
            flagged_from: 0,
            total_harvested: 0,
            pages_harvested: 0,
            peeked_to: 0,
            peeked: PageRuns::default(),
            owned,
        }
    }

    /// A ring over `base`, which the caller keeps alive and zeroed as KVM hands it out
    /// (the KVM model in the tests).
    #[cfg(test)]
    pub(crate) fn over_test_memory(base: NonNull<kvm_dirty_gfn>, entries: u32) -> Self {
        DirtyRing::over(base, entries, false)
    }

    pub fn entries(&self) -> u32 {
        self.entries
    }

    /// Pages harvested so far (see `pages_harvested`).
    pub fn pages_harvested(&self) -> u64 {
        self.pages_harvested
    }

    /// Pages KVM has published so far: those harvested plus those waiting at the fetch
    /// index, counted without taking them (no reset, so a page being rewritten makes no
    /// new entry until the next harvest, unless KVM emulates the write). Each call goes on
    /// from where the last one stopped.
    pub(crate) fn dirtied(&mut self) -> u64 {
        let room = self.entries - self.pending_reset().min(self.entries);
        if self.peeked_to.wrapping_sub(self.fetch_index) > room {
            // The fetch index moved past what was counted without a harvest (stepping
            // over entries taken ahead): count again from it.
            self.forget_peek();
        }
        while self.peeked_to.wrapping_sub(self.fetch_index) < room {
            let f = self.flags(self.peeked_to).load(Ordering::Acquire);
            if f & (GFN_F_DIRTY | GFN_F_RESET) != GFN_F_DIRTY {
                break;
            }
            // After the Acquire above, as in `harvest`.
            let entry = self.read_entry(self.peeked_to);
            self.peeked.add(entry);
            self.peeked_to = self.peeked_to.wrapping_add(1);
        }
        self.pages_harvested + self.peeked.pages
    }

    /// The next [`Self::dirtied`] counts the waiting entries from the fetch index again.
    fn forget_peek(&mut self) {
        self.peeked_to = self.fetch_index;
        self.peeked = PageRuns::default();
    }

    pub fn indexes(&self) -> RingIndexes {
        RingIndexes {
            fetch: self.fetch_index,
            reset: self.reset_index,
            may_be_ahead: self.may_be_ahead,
            harvested: self.total_harvested,
        }
    }

    pub(crate) fn reset_index(&self) -> u32 {
        self.reset_index
    }

    pub(crate) fn may_be_ahead(&self) -> bool {
        self.may_be_ahead
    }

    /// Entries flagged RESET that KVM has not reset yet.
    pub(crate) fn pending_reset(&self) -> u32 {
        self.fetch_index.wrapping_sub(self.reset_index)
    }

    /// Takes every published entry from the fetch index, in ring order, into `out`, and
    /// flags it RESET. Never takes more than the ring holds past KVM's reset index, so the
    /// flagged entries are distinct slots. `between(index)` runs after an entry is read and
    /// before it is flagged: nothing in production, KVM's model in the tests.
    pub(crate) fn harvest(
        &mut self,
        out: &mut Vec<RingEntry>,
        mut between: impl FnMut(u32),
    ) -> RingHarvest {
        let room = self.entries - self.pending_reset().min(self.entries);
        let mut h = RingHarvest::default();
        let mut runs = PageRuns::default();
        while h.entries < room {
            let index = self.fetch_index;
            let flags = self.flags(index);
            // Acquire pairs with KVM's publication of the entry, so `slot` and `offset`
            // read below are the ones KVM wrote before it set DIRTY.
            if flags.load(Ordering::Acquire) & (GFN_F_DIRTY | GFN_F_RESET) != GFN_F_DIRTY {
                break;
            }
            let entry = self.read_entry(index);
            between(index);
            if flags
                .compare_exchange(
                    GFN_F_DIRTY,
                    GFN_F_RESET,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_err()
            {
                // Only KVM changes a DIRTY entry, and only by overwriting it.
                h.overflowed = true;
                break;
            }
            // KVM writes an entry's contents before its flag. If they changed under the
            // exchange, KVM pushed over this entry: the page it now names would be reset
            // (re-protected) without ever being seen. Count it as an overrun.
            if self.read_entry(index) != entry {
                h.overflowed = true;
            }
            self.flagged.push(entry);
            out.push(entry);
            self.fetch_index = index.wrapping_add(1);
            h.entries += 1;
            runs.add(entry);
        }
        if h.entries == room && room > 0 {
            // A whole ring past KVM's reset index: KVM pushed into its own reserve, and
            // entries past what we took may have been taken here out of order.
            h.overflowed = true;
        }
        if h.overflowed {
            self.may_be_ahead = true;
        }
        self.total_harvested += u64::from(h.entries);
        self.pages_harvested += runs.pages;
        // What was counted without taking it is taken (or the harvest stopped short of
        // it): the next count starts at the fetch index.
        self.forget_peek();
        h
    }

    /// Records that `KVM_RESET_DIRTY_RINGS` reset `count` entries of this ring. Returns
    /// `false` (and leaves the model unchanged) when that is more than were flagged: KVM
    /// walked past the fetch index, which only a stray RESET flag can make it do.
    pub(crate) fn note_reset(&mut self, count: u32) -> bool {
        if count > self.pending_reset() {
            return false;
        }
        self.reset_index = self.reset_index.wrapping_add(count);
        true
    }

    /// After a reset that stopped short of the fetch index: the entry at KVM's reset
    /// index is what stopped it. A RESET one means the walk was interrupted (call again);
    /// a DIRTY one was overwritten by KVM after it was flagged. Takes every overwritten
    /// entry between KVM's reset index and the fetch index into `out` and flags it RESET
    /// again, so the next reset can reach the fetch index. Returns how many were taken,
    /// or `None` when an entry there is empty: KVM cleared it, so its reset index is not
    /// the one kept here, and flagging anything could take it past its dirty index.
    pub(crate) fn retake_overwritten(
        &mut self,
        out: &mut Vec<RingEntry>,
        mut between: impl FnMut(u32),
    ) -> Option<u32> {
        let mut taken = 0;
        let mut index = self.reset_index;
        while index != self.fetch_index {
            let flags = self.flags(index);
            let f = flags.load(Ordering::Acquire);
            if f & GFN_F_RESET == 0 {
                if f & GFN_F_DIRTY == 0 {
                    return None;
                }
                let entry = self.read_entry(index);
                between(index);
                // The index lies below the fetch index, so it was seen published: flagging
                // it cannot take KVM's reset index past its dirty index. A failed exchange
                // means KVM wrote it again: look again.
                if flags
                    .compare_exchange(f, GFN_F_RESET, Ordering::AcqRel, Ordering::Acquire)
                    .is_err()
                {
                    continue;
                }
                self.flagged[index.wrapping_sub(self.flagged_from) as usize] = entry;
                out.push(entry);
                taken += 1;
                self.may_be_ahead = true;
            }
            index = index.wrapping_add(1);
        }
        self.total_harvested += u64::from(taken);
        self.pages_harvested += u64::from(taken);
        Some(taken)
    }

    /// Once KVM's reset index has reached the fetch index: reads every entry flagged
    /// since the last check again. Each must be empty and name what it named when it was
    /// flagged. Otherwise a push landed on it a lap ahead: it raced KVM's reset walk (KVM
    /// then write-protected a page nobody saw, or left the flagged one writable, and may
    /// have cleared a published entry unseen), or came right after the walk with the ring
    /// a lap on. The entries cannot tell which, nor how far KVM got, so it counts as an
    /// overrun either way. Returns whether all entries checked out.
    pub(crate) fn check_reset(&mut self) -> bool {
        debug_assert_eq!(self.pending_reset(), 0);
        let clean = self.flagged.iter().enumerate().all(|(i, expected)| {
            let index = self.flagged_from.wrapping_add(i as u32);
            self.flags(index).load(Ordering::Acquire) == 0 && self.read_entry(index) == *expected
        });
        self.flagged.clear();
        self.flagged_from = self.fetch_index;
        if !clean {
            self.may_be_ahead = true;
        }
        clean
    }

    /// The entry at KVM's reset index still carries RESET: KVM's last walk stopped
    /// before it without being stopped by it (a pending signal).
    pub(crate) fn reset_entry_still_flagged(&self) -> bool {
        self.flags(self.reset_index).load(Ordering::Acquire) & GFN_F_RESET != 0
    }

    /// Steps over entries consumed out of order earlier (see `may_be_ahead`): when a
    /// DIRTY entry lies `d` slots past the fetch index, KVM's dirty index is past it, so
    /// the `d` empty entries before it were published too, and consumed already (taken
    /// here ahead of their turn, or cleared by a reset walk a push raced; both only after
    /// an overrun). Flags them RESET, each with an exchange from empty, and moves the fetch
    /// index to the DIRTY one. Returns how many were stepped over; 0 when nothing is
    /// published anywhere.
    ///
    /// Why a DIRTY entry `d` past the fetch index proves KVM's dirty index is past
    /// `fetch + d`: nothing but a push sets DIRTY, and no index below the fetch index can
    /// still show DIRTY (it was flagged RESET here when taken, and KVM's walk clears only
    /// RESET entries), so the push was for an index at or past the fetch index, and the
    /// slot it sits in makes that `fetch + d` plus whole rings.
    pub(crate) fn skip_taken_ahead(&mut self) -> u32 {
        let room = self.entries - self.pending_reset().min(self.entries);
        let Some(d) = self.first_dirty_within(room) else {
            return 0;
        };
        let mut skipped = 0;
        while skipped < d && self.flag_empty() {
            skipped += 1;
        }
        skipped
    }

    /// How far past the fetch index, within `room` entries, the first entry KVM flagged
    /// DIRTY lies. The final collection scans a whole ring this way with the guest
    /// paused, so it walks the ring's memory in order, in at most two straight runs (the
    /// one to the ring's end, then the wrap), rather than masking each index: 65536
    /// entries took 0.10-0.12 ms the other way, 0.07-0.08 ms this way, all downtime.
    fn first_dirty_within(&self, room: u32) -> Option<u32> {
        let start = self.fetch_index & (self.entries - 1);
        let to_end = (self.entries - start).min(room);
        let run = |from: u32, len: u32| -> Option<u32> {
            // SAFETY: `from + len` never passes `entries` (`start + to_end` and
            // `room - to_end` below), so every entry read lies inside the mapping owned
            // by self.
            let entries = unsafe { self.base.as_ptr().add(from as usize) };
            (0..len).find(|&i| {
                // SAFETY: as above; `flags` is the entry's first field, 4-byte aligned in
                // the page-aligned array of 16-byte entries, and only read atomically.
                let flags = unsafe {
                    AtomicU32::from_ptr(std::ptr::addr_of_mut!((*entries.add(i as usize)).flags))
                };
                flags.load(Ordering::Acquire) & GFN_F_DIRTY != 0
            })
        };
        run(start, to_end).or_else(|| run(0, room - to_end).map(|d| d + to_end))
    }

    /// Flags the empty entry at the fetch index RESET and moves past it; `false` when it
    /// is not empty (KVM published there meanwhile: the harvest takes it).
    fn flag_empty(&mut self) -> bool {
        let index = self.fetch_index;
        let entry = self.read_entry(index);
        if self
            .flags(index)
            .compare_exchange(0, GFN_F_RESET, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return false;
        }
        self.flagged.push(entry);
        self.fetch_index = index.wrapping_add(1);
        true
    }

    /// Steps over one empty entry at the fetch index. Only for a ring KVM reported full
    /// (its vCPU out of `KVM_RUN`, no reset since it entered) with nothing published
    /// anywhere: KVM then counts at least one published entry past its reset index that
    /// was consumed out of order, so one step cannot pass KVM's dirty index.
    pub(crate) fn step_over_one(&mut self) -> bool {
        debug_assert_eq!(self.pending_reset(), 0, "step only from a reset ring");
        self.flag_empty()
    }

    /// Reads every entry's flags once and changes nothing, so that a scan of the whole
    /// ring soon after ([`Self::skip_taken_ahead`] in the final collection, with the vCPUs
    /// parked) finds it in the caches: 1 MiB cold took ~0.15 ms of an idle guest's pause.
    pub(crate) fn warm(&self) -> u32 {
        (0..self.entries).fold(0, |acc, i| acc | self.flags(i).load(Ordering::Relaxed))
    }

    fn read_entry(&self, index: u32) -> RingEntry {
        let gfn = self.entry_ptr(index);
        // SAFETY: the entry lies inside our mapping. KVM may rewrite it concurrently when
        // it overruns the ring (a race with the kernel no mapping shared with it avoids):
        // the volatile reads of plain integers may then be stale or torn, which the
        // re-read after the exchange, `check_reset` and the retake are there to catch.
        unsafe {
            (
                std::ptr::read_volatile(std::ptr::addr_of!((*gfn).slot)),
                std::ptr::read_volatile(std::ptr::addr_of!((*gfn).offset)),
            )
        }
    }

    fn entry_ptr(&self, index: u32) -> *mut kvm_dirty_gfn {
        let i = (index & (self.entries - 1)) as usize;
        // SAFETY: i < entries, so the entry lies inside the mapping owned by self.
        unsafe { self.base.as_ptr().add(i) }
    }

    fn flags(&self, index: u32) -> &AtomicU32 {
        // SAFETY: the entry is inside our mapping; `flags` is its first field, so 4-byte
        // aligned in a page-aligned array of 16-byte entries, as `from_ptr` requires. It
        // is shared with KVM and only accessed atomically here.
        unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*self.entry_ptr(index)).flags)) }
    }
}

/// An empty vector with room for `n` entries whose memory is already faulted in, so the
/// first harvests (a migration's, with the guest running) do not pay page faults entry
/// by entry; a full ring's worth is 16 bytes an entry.
pub(crate) fn faulted_in(n: usize) -> Vec<RingEntry> {
    let mut v = Vec::with_capacity(n);
    v.resize(n, (0, 0));
    v.clear();
    v
}

impl Drop for DirtyRing {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        let bytes = self.entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        // SAFETY: unmapping exactly the mapping made in `map`; nothing references it after.
        unsafe { libc::munmap(self.base.as_ptr().cast(), bytes) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The straight-run scan finds what masking each index from the fetch index finds,
    /// wherever the fetch index sits and however the dirty entries wrap.
    #[test]
    fn the_first_dirty_entry_ahead_is_found_across_the_wrap() {
        const N: u32 = 16;
        let mut mem = vec![kvm_dirty_gfn::default(); N as usize];
        let mut ring = DirtyRing::over_test_memory(NonNull::new(mem.as_mut_ptr()).unwrap(), N);
        let naive = |ring: &DirtyRing, room: u32| {
            (0..room).find(|&d| {
                ring.flags(ring.fetch_index.wrapping_add(d))
                    .load(Ordering::Relaxed)
                    & GFN_F_DIRTY
                    != 0
            })
        };
        let mut checked_some = 0;
        // Every set of dirty entries from a small pseudo-random walk, at every start
        // (past a wrap of the u32 index too) and every room.
        let mut x = 0x9e37_79b9u32;
        for _ in 0..64 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            for (i, e) in mem.iter_mut().enumerate() {
                e.flags = if (x >> i) & 1 == 1 && (x >> 20) as usize % 3 != i % 3 {
                    GFN_F_DIRTY
                } else {
                    0
                };
            }
            for start in (0..N).chain([u32::MAX - 2]) {
                ring.fetch_index = start.wrapping_add(x & !(N - 1));
                for room in 0..=N {
                    let want = naive(&ring, room);
                    assert_eq!(
                        ring.first_dirty_within(room),
                        want,
                        "flags {:016b}, fetch index {}, room {room}",
                        x & 0xffff,
                        ring.fetch_index
                    );
                    checked_some += want.is_some() as u32;
                }
            }
        }
        assert!(
            checked_some > 1000,
            "only {checked_some} cases had a dirty entry"
        );
        drop(ring);
        drop(mem);
    }
}
