//! One vCPU's KVM dirty ring: the mmap of `struct kvm_dirty_gfn` entries at
//! `KVM_DIRTY_LOG_PAGE_OFFSET` of the vCPU fd, and the userspace half of the harvest
//! protocol (walk from the fetch index, load-acquire `flags`, stop at the first entry not
//! yet published, store-release RESET).

use std::os::unix::io::RawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use kvm_bindings::{kvm_dirty_gfn, KVM_DIRTY_LOG_PAGE_OFFSET};

use crate::{HypervisorError, Result};

const GFN_F_DIRTY: u32 = 1 << 0;
const GFN_F_RESET: u32 = 1 << 1;

/// What one harvest of one ring collected.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingHarvest {
    /// Entries taken from the ring and marked RESET (each needs `KVM_RESET_DIRTY_RINGS`).
    pub entries: u64,
    /// The ring was found completely full. KVM keeps a reserve below the soft limit, so a
    /// correct kernel never gets there: entries were probably overwritten and lost.
    pub overflowed: bool,
}

/// A vCPU's dirty ring. Harvesting needs `&mut self`: one harvester at a time per ring
/// (the fetch index is ours), while KVM keeps pushing entries from the running vCPU.
#[derive(Debug)]
pub struct DirtyRing {
    base: NonNull<kvm_dirty_gfn>,
    entries: u32,
    fetch_index: u32,
    /// Entries harvested over the ring's life (per-vCPU dirty rate needs it).
    total_harvested: u64,
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
                libc::MAP_SHARED,
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
        Ok(DirtyRing {
            base: NonNull::new(addr.cast()).expect("mmap never returns NULL on success"),
            entries,
            fetch_index: 0,
            total_harvested: 0,
        })
    }

    pub fn entries(&self) -> u32 {
        self.entries
    }

    pub fn total_harvested(&self) -> u64 {
        self.total_harvested
    }

    /// Collects every published entry, in ring order, calling `mark(slot, offset)` for
    /// each, and hands the entries back to KVM (RESET). The caller must then issue
    /// `KVM_RESET_DIRTY_RINGS` before reading the pages' contents.
    pub fn harvest(&mut self, mut mark: impl FnMut(u32, u64)) -> RingHarvest {
        let mut taken = 0u64;
        loop {
            let i = (self.fetch_index & (self.entries - 1)) as usize;
            // SAFETY: i < entries, so the entry lies inside the mapping owned by self.
            let gfn = unsafe { self.base.as_ptr().add(i) };
            let flags = self.flags(i);
            // Acquire pairs with KVM's release when it publishes the entry, so `slot` and
            // `offset` read below are the ones KVM wrote.
            if flags.load(Ordering::Acquire) & (GFN_F_DIRTY | GFN_F_RESET) != GFN_F_DIRTY {
                break;
            }
            // SAFETY: the entry is published (DIRTY) and KVM does not touch it again until
            // we set RESET, so these plain reads do not race.
            let (slot, offset) = unsafe { ((*gfn).slot, (*gfn).offset) };
            mark(slot, offset);
            // Release: our reads of the entry happen before KVM may reuse it.
            flags.store(GFN_F_RESET, Ordering::Release);
            self.fetch_index = self.fetch_index.wrapping_add(1);
            taken += 1;
        }
        self.total_harvested += taken;
        RingHarvest {
            entries: taken,
            overflowed: taken >= u64::from(self.entries),
        }
    }

    /// Recovers from a ring KVM overflowed. After an overflow KVM's producer index runs
    /// ahead of ours, so KVM reports the ring full while the entries at our fetch index
    /// are already reset: nothing is harvestable and the vCPU would exit forever. This
    /// marks those stale entries RESET up to the first published one (or `max_skip`
    /// entries when none is found; never more than KVM's soft limit, so KVM's reset index
    /// cannot pass its producer index). Returns how many entries were skipped; they are
    /// reset by the next `KVM_RESET_DIRTY_RINGS` like harvested ones.
    pub fn skip_stale(&mut self, max_skip: u32) -> u32 {
        let mut skipped = 0;
        let mut first_dirty = None;
        for d in 0..self.entries {
            let i = (self.fetch_index.wrapping_add(d) & (self.entries - 1)) as usize;
            if self.flags(i).load(Ordering::Acquire) & GFN_F_DIRTY != 0 {
                first_dirty = Some(d);
                break;
            }
        }
        let n = first_dirty.unwrap_or(max_skip).min(max_skip);
        while skipped < n {
            let i = (self.fetch_index & (self.entries - 1)) as usize;
            self.flags(i).store(GFN_F_RESET, Ordering::Release);
            self.fetch_index = self.fetch_index.wrapping_add(1);
            skipped += 1;
        }
        skipped
    }

    fn flags(&self, i: usize) -> &AtomicU32 {
        debug_assert!(i < self.entries as usize);
        // SAFETY: i < entries, so the entry is inside our mapping; `flags` is shared with
        // KVM and only accessed atomically.
        unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*self.base.as_ptr().add(i)).flags)) }
    }
}

impl Drop for DirtyRing {
    fn drop(&mut self) {
        let bytes = self.entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        // SAFETY: unmapping exactly the mapping made in `map`; nothing references it after.
        unsafe { libc::munmap(self.base.as_ptr().cast(), bytes) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ring over anonymous memory, filled by the test as KVM would fill it.
    fn anon_ring(entries: u32) -> DirtyRing {
        let bytes = entries as usize * 16;
        // SAFETY: anonymous private mapping, checked below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        DirtyRing {
            base: NonNull::new(addr.cast()).unwrap(),
            entries,
            fetch_index: 0,
            total_harvested: 0,
        }
    }

    fn push(r: &DirtyRing, idx: u32, slot: u32, offset: u64) {
        let i = (idx & (r.entries - 1)) as usize;
        // SAFETY: i < entries; test-only single-threaded writes.
        unsafe {
            let g = r.base.as_ptr().add(i);
            (*g).slot = slot;
            (*g).offset = offset;
            (*g).flags = GFN_F_DIRTY;
        }
    }

    fn flags(r: &DirtyRing, i: usize) -> u32 {
        // SAFETY: i < entries.
        unsafe { (*r.base.as_ptr().add(i)).flags }
    }

    #[test]
    fn walks_in_order_and_stops_at_first_unpublished() {
        let mut r = anon_ring(256);
        push(&r, 0, 0, 5);
        push(&r, 1, 1, 7);
        push(&r, 3, 0, 9); // gap at 2: must not be taken yet
        let mut seen = vec![];
        let h = r.harvest(|s, o| seen.push((s, o)));
        assert_eq!(h.entries, 2);
        assert!(!h.overflowed);
        assert_eq!(seen, vec![(0, 5), (1, 7)]);
        assert_eq!(flags(&r, 0), GFN_F_RESET);
        assert_eq!(flags(&r, 3), GFN_F_DIRTY);
        // KVM resets collected entries, then publishes entry 2.
        push(&r, 2, 0, 8);
        seen.clear();
        r.harvest(|s, o| seen.push((s, o)));
        assert_eq!(seen, vec![(0, 8), (0, 9)]);
        assert_eq!(r.total_harvested(), 4);
    }

    #[test]
    fn skip_stale_resyncs_with_the_producer() {
        let mut r = anon_ring(256);
        // KVM's producer ran 3 entries ahead: positions 0..3 are reset, 3 is published.
        push(&r, 3, 0, 42);
        assert_eq!(r.harvest(|_, _| {}).entries, 0);
        assert_eq!(r.skip_stale(64), 3);
        assert_eq!(flags(&r, 0), GFN_F_RESET);
        let mut seen = vec![];
        r.harvest(|_, o| seen.push(o));
        assert_eq!(seen, vec![42]);
        // Nothing published anywhere: skip only the bounded amount.
        assert_eq!(r.skip_stale(64), 64);
    }

    #[test]
    fn wraps_around() {
        let mut r = anon_ring(256);
        for i in 0..256 {
            push(&r, i, 0, i as u64);
        }
        let h = r.harvest(|_, _| {});
        assert_eq!(h.entries, 256);
        assert!(
            h.overflowed,
            "a completely full ring means KVM overran its reserve"
        );
        // KVM_RESET_DIRTY_RINGS clears the flags; then entries wrap to index 0.
        for i in 0..256 {
            // SAFETY: i < entries.
            unsafe { (*r.base.as_ptr().add(i)).flags = 0 };
        }
        push(&r, 256, 0, 1000);
        let mut seen = vec![];
        r.harvest(|_, o| seen.push(o));
        assert_eq!(seen, vec![1000]);
    }
}
