//! The dirty bits of one domain for the guest's own dirty tracking (DIRTY_TRACKING.md):
//! one bit per 4 KiB IOVA page an endpoint wrote, kept sparse (a domain spans up to 2^48
//! bytes of IOVA, of which a guest maps a little).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::domain::GRANULE;

/// Pages per chunk: one chunk covers 2 MiB of IOVA.
const CHUNK_PAGES: u64 = 512;
const WORDS: usize = (CHUNK_PAGES / 64) as usize;
/// Chunks a domain keeps at most (128 GiB of IOVA written, 4 MiB of bits): past that
/// the domain reports every page as dirty until its tracking is turned off (a guest could
/// otherwise make the VMM grow without bound by aliasing RAM at many IOVAs).
pub const MAX_CHUNKS: usize = 1 << 16;

/// Set-only until read: writes set bits (from several device threads at once), a read
/// returns them and, unless asked not to, clears them.
#[derive(Debug, Default)]
pub struct DirtyPages {
    chunks: Mutex<BTreeMap<u64, [u64; WORDS]>>,
    /// More chunks were needed than [`MAX_CHUNKS`]: every page reads as dirty.
    overflowed: std::sync::atomic::AtomicBool,
}

/// [`DirtyPages`] as plain data (the migration stream).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirtyPagesState {
    /// (first IOVA page of the chunk / 512, the chunk's 512 bits).
    pub chunks: Vec<(u64, Vec<u64>)>,
    /// Every page reads as dirty ([`MAX_CHUNKS`] was reached).
    #[serde(default)]
    pub overflowed: bool,
}

impl DirtyPages {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, [u64; WORDS]>> {
        self.chunks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks every page `[iova, iova + len)` touches.
    pub fn mark(&self, iova: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = iova / GRANULE;
        let last = iova.saturating_add(len - 1) / GRANULE;
        let mut chunks = self.lock();
        for page in first..=last {
            let full = chunks.len() >= MAX_CHUNKS;
            let c = match chunks.entry(page / CHUNK_PAGES) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(_) if full => {
                    self.overflowed.store(true, Ordering::Relaxed);
                    return;
                }
                std::collections::btree_map::Entry::Vacant(e) => e.insert([0; WORDS]),
            };
            let bit = page % CHUNK_PAGES;
            c[(bit / 64) as usize] |= 1 << (bit % 64);
        }
    }

    /// The bitmap of `[iova, iova + len)` in units of `page_size` (a power of two, at least
    /// the granule, with `iova` and `len` multiples of it: the caller checked), bit i for
    /// the unit at `iova + i * page_size`. Clears what it reports unless `no_clear`.
    pub fn read(&self, iova: u64, len: u64, page_size: u64, no_clear: bool) -> Vec<u64> {
        let units = len / page_size;
        let per_unit = page_size / GRANULE;
        let mut out = vec![0u64; units.div_ceil(64) as usize];
        if self.overflowed.load(Ordering::Relaxed) {
            // Over-reporting is safe; missing a page is not.
            for (i, w) in out.iter_mut().enumerate() {
                let left = units - i as u64 * 64;
                *w = if left >= 64 { !0 } else { (1 << left) - 1 };
            }
            return out;
        }
        let mut chunks = self.lock();
        // Only the chunks in range are visited: a sparse domain reads fast.
        let first_page = iova / GRANULE;
        let end_page = first_page + units * per_unit;
        let keys: Vec<u64> = chunks
            .range(first_page / CHUNK_PAGES..=(end_page - 1) / CHUNK_PAGES)
            .map(|(k, _)| *k)
            .collect();
        for k in keys {
            let lo = (k * CHUNK_PAGES).max(first_page);
            let hi = ((k + 1) * CHUNK_PAGES).min(end_page);
            let Some(c) = chunks.get_mut(&k) else {
                continue;
            };
            for page in lo..hi {
                let bit = page % CHUNK_PAGES;
                let (w, m) = ((bit / 64) as usize, 1u64 << (bit % 64));
                if c[w] & m != 0 {
                    let unit = (page - first_page) / per_unit;
                    out[(unit / 64) as usize] |= 1 << (unit % 64);
                    if !no_clear {
                        c[w] &= !m;
                    }
                }
            }
            if c.iter().all(|w| *w == 0) {
                chunks.remove(&k);
            }
        }
        out
    }

    /// Forgets the bits of `[start, end]` (inclusive; an UNMAP removed its mappings).
    pub fn forget(&self, start: u64, end: u64) {
        // Only the chunks present are visited: the range may be huge and sparse.
        let first = start / GRANULE;
        let last = end / GRANULE;
        let mut chunks = self.lock();
        let keys: Vec<u64> = chunks
            .range(first / CHUNK_PAGES..=last / CHUNK_PAGES)
            .map(|(k, _)| *k)
            .collect();
        for k in keys {
            let lo = (k * CHUNK_PAGES).max(first);
            let hi = ((k + 1) * CHUNK_PAGES - 1).min(last);
            if let Some(c) = chunks.get_mut(&k) {
                for page in lo..=hi {
                    let bit = page % CHUNK_PAGES;
                    c[(bit / 64) as usize] &= !(1 << (bit % 64));
                }
                if c.iter().all(|w| *w == 0) {
                    chunks.remove(&k);
                }
            }
        }
    }

    /// How many pages are set.
    pub fn count(&self) -> u64 {
        self.lock()
            .values()
            .flat_map(|c| c.iter())
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    pub fn state(&self) -> DirtyPagesState {
        DirtyPagesState {
            chunks: self.lock().iter().map(|(k, c)| (*k, c.to_vec())).collect(),
            overflowed: self.overflowed.load(Ordering::Relaxed),
        }
    }

    /// Rebuilds from `state`; a chunk of the wrong size is refused, naming it.
    pub fn from_state(state: &DirtyPagesState) -> Result<DirtyPages, String> {
        let mut chunks = BTreeMap::new();
        for (k, words) in &state.chunks {
            let c: [u64; WORDS] = words.as_slice().try_into().map_err(|_| {
                format!("dirty chunk {k:#x} has {} words, not {WORDS}", words.len())
            })?;
            chunks.insert(*k, c);
        }
        if chunks.len() > MAX_CHUNKS {
            return Err(format!(
                "{} dirty chunks, more than {MAX_CHUNKS}",
                chunks.len()
            ));
        }
        Ok(DirtyPages {
            chunks: Mutex::new(chunks),
            overflowed: std::sync::atomic::AtomicBool::new(state.overflowed),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = GRANULE;

    #[test]
    fn marks_read_back_per_unit_and_clear_unless_asked_not_to() {
        let d = DirtyPages::default();
        d.mark(5 * P + 10, 1); // page 5
        d.mark(511 * P, 2 * P); // pages 511, 512 (across a chunk boundary)
        assert_eq!(d.count(), 3);
        // 4 KiB units over pages 0..1024.
        let b = d.read(0, 1024 * P, P, true);
        assert_eq!(b.len(), 16);
        assert_eq!(b[0], 1 << 5);
        assert_eq!(b[7], 1 << 63);
        assert_eq!(b[8], 1);
        // 2 MiB units: unit 0 (pages 0..512) and unit 1 (512..1024).
        assert_eq!(d.read(0, 1024 * P, 512 * P, true), vec![0b11]);
        // A window starting at page 4: bit 1 = page 5.
        assert_eq!(d.read(4 * P, 4 * P, P, false), vec![0b10]);
        assert_eq!(d.count(), 2, "page 5 was read with clear");
        assert_eq!(d.read(0, 1024 * P, P, false)[0], 0);
    }

    #[test]
    fn forget_drops_only_the_range_and_state_round_trips() {
        let d = DirtyPages::default();
        for p in [1u64, 2, 3, 700, 100_000] {
            d.mark(p * P, 1);
        }
        d.forget(2 * P, 700 * P + P - 1);
        assert_eq!(d.count(), 2);
        let s = d.state();
        let back = DirtyPages::from_state(&s).unwrap();
        assert_eq!(
            back.read(0, 128 * 1024 * P, P, true),
            d.read(0, 128 * 1024 * P, P, true)
        );
        let bad = DirtyPagesState {
            chunks: vec![(3, vec![0; 2])],
            overflowed: false,
        };
        assert!(DirtyPages::from_state(&bad)
            .unwrap_err()
            .contains("chunk 0x3"));
    }

    /// A guest that writes more sparse IOVA than the domain keeps bits for: the domain
    /// then reports every page dirty (safe), and the state says so across a migration.
    #[test]
    fn past_the_chunk_limit_every_page_reads_dirty() {
        let d = DirtyPages::default();
        for c in 0..MAX_CHUNKS as u64 {
            d.mark(c * CHUNK_PAGES * P, 1);
        }
        assert_eq!(d.read(0, 64 * P, P, true), vec![1]);
        d.mark(MAX_CHUNKS as u64 * CHUNK_PAGES * P, 1);
        assert_eq!(d.read(0, 64 * P, P, true), vec![!0]);
        assert_eq!(d.read(0, 3 * P, P, false), vec![0b111]);
        let back = DirtyPages::from_state(&d.state()).unwrap();
        assert_eq!(back.read(0, 3 * P, P, true), vec![0b111]);
    }
}
