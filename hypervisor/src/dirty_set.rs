//! The pages KVM reported dirty since the last collection, one atomic bitmap per memory
//! slot. Ring harvests (from any thread, including a vCPU handling a ring-full exit) and
//! bitmap reads all land here; a collection takes the bits and leaves zeros.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::{HypervisorError, Result};

/// Dirty bits of one memory slot, one per 4 KiB page.
#[derive(Debug)]
pub struct SlotDirtyBits {
    pub guest_phys_addr: u64,
    pub pages: u64,
    words: Vec<AtomicU64>,
}

impl SlotDirtyBits {
    pub fn new(guest_phys_addr: u64, pages: u64) -> Self {
        SlotDirtyBits {
            guest_phys_addr,
            pages,
            words: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    pub fn mark(&self, page: u64) {
        self.words[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::Relaxed);
    }

    /// Marks every page of the slot.
    pub fn mark_all(&self) {
        let full = self.pages / 64;
        for (i, w) in self.words.iter().enumerate() {
            let bits = if (i as u64) < full {
                !0
            } else {
                (1u64 << (self.pages % 64)) - 1
            };
            w.fetch_or(bits, Ordering::Relaxed);
        }
    }

    /// ORs a KVM-format bitmap (bit n = page n of the slot) in.
    pub fn merge(&self, bitmap: &[u64]) {
        for (w, b) in self.words.iter().zip(bitmap) {
            if *b != 0 {
                w.fetch_or(*b, Ordering::Relaxed);
            }
        }
    }

    /// Takes the bits, leaving zeros.
    pub fn take(&self) -> Vec<u64> {
        self.words
            .iter()
            .map(|w| {
                if w.load(Ordering::Relaxed) == 0 {
                    0
                } else {
                    w.swap(0, Ordering::Relaxed)
                }
            })
            .collect()
    }
}

/// Dirty bits of every memory slot of a VM, indexed by slot id.
#[derive(Debug, Default)]
pub struct DirtyPageSet {
    slots: Vec<SlotDirtyBits>,
}

impl DirtyPageSet {
    pub fn new(slots: Vec<SlotDirtyBits>) -> Self {
        DirtyPageSet { slots }
    }

    pub fn slots(&self) -> &[SlotDirtyBits] {
        &self.slots
    }

    /// Marks the page a ring entry names (`slot` = as_id << 16 | slot id, `offset` = page
    /// index inside the slot).
    pub fn mark_ring_entry(&self, slot: u32, offset: u64) -> Result<()> {
        let bits = self
            .slots
            .get((slot & 0xffff) as usize)
            .filter(|s| slot >> 16 == 0 && offset < s.pages)
            .ok_or(HypervisorError::RingEntryOutOfRange { slot, offset })?;
        bits.mark(offset);
        Ok(())
    }
}

/// Number of pages a bitmap marks dirty.
pub fn count_bits(bm: &[u64]) -> u64 {
    bm.iter().map(|w| w.count_ones() as u64).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mark_take_merge() {
        let set = DirtyPageSet::new(vec![
            SlotDirtyBits::new(0, 130),
            SlotDirtyBits::new(1 << 32, 64),
        ]);
        set.mark_ring_entry(0, 0).unwrap();
        set.mark_ring_entry(0, 129).unwrap();
        set.mark_ring_entry(1, 63).unwrap();
        assert!(set.mark_ring_entry(0, 130).is_err());
        assert!(set.mark_ring_entry(2, 0).is_err());
        assert!(
            set.mark_ring_entry(1 << 16, 0).is_err(),
            "address space 1 is not ours"
        );
        assert_eq!(set.slots()[0].take(), vec![1, 0, 2]);
        assert_eq!(set.slots()[0].take(), vec![0, 0, 0]);
        set.slots()[1].merge(&[0b1010]);
        assert_eq!(set.slots()[1].take(), vec![0b1010 | 1 << 63]);
        assert_eq!(count_bits(&[3, 1 << 63]), 3);
        set.slots()[0].mark_all();
        assert_eq!(count_bits(&set.slots()[0].take()), 130);
    }
}
