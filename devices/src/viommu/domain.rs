//! One virtio-iommu domain's address space (virtio 1.2 §5.13.6.5-6): the mappings the
//! guest made with MAP, removed by UNMAP under the spec's rules, and the translation of a
//! device's DMA from IOVA to guest-physical ranges with the mapping's permissions checked.
//! Plain data: the device model and the migration own the locking.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// MAP flags.
pub const MAP_F_READ: u32 = 1 << 0;
pub const MAP_F_WRITE: u32 = 1 << 1;
pub const MAP_F_MMIO: u32 = 1 << 2;

/// Granule of mappings: the page size Ferry's device announces.
pub const GRANULE: u64 = 4096;

/// A request's outcome, as the spec's status codes name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    /// Unknown flags, an overlap with an existing mapping, an empty or reversed range.
    #[error("invalid request (VIRTIO_IOMMU_S_INVAL): {0}")]
    Inval(&'static str),
    /// Misaligned addresses, or an UNMAP that would split a mapping.
    #[error("range error (VIRTIO_IOMMU_S_RANGE): {0}")]
    Range(&'static str),
}

/// One MAP request: `[virt_start, virt_end]` (inclusive) to `phys_start`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mapping {
    pub virt_start: u64,
    pub virt_end: u64,
    pub phys_start: u64,
    pub flags: u32,
}

impl Mapping {
    /// Bytes mapped (a mapping of the whole 64-bit space counts `u64::MAX`).
    pub fn len(&self) -> u64 {
        (self.virt_end - self.virt_start).saturating_add(1)
    }

    pub fn is_empty(&self) -> bool {
        false
    }
}

/// Why a DMA through the domain was refused (a fault record for the event queue; the
/// access writes nothing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DmaFault {
    /// No mapping holds this IOVA.
    Unmapped { iova: u64 },
    /// The mapping does not allow this access.
    Permission { iova: u64, write: bool },
}

/// The mappings of one domain, by start address.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IovaDomain {
    mappings: BTreeMap<u64, Mapping>,
}

impl IovaDomain {
    pub fn mappings(&self) -> impl Iterator<Item = &Mapping> {
        self.mappings.values()
    }

    /// How many mappings the domain holds.
    pub fn count(&self) -> usize {
        self.mappings.len()
    }

    /// MAP: `[virt_start, virt_end]` to `phys_start` with `flags`. `mmio_allowed`: the
    /// driver negotiated VIRTIO_IOMMU_F_MMIO.
    pub fn map(
        &mut self,
        virt_start: u64,
        virt_end: u64,
        phys_start: u64,
        flags: u32,
        mmio_allowed: bool,
    ) -> Result<(), DomainError> {
        let known = MAP_F_READ | MAP_F_WRITE | if mmio_allowed { MAP_F_MMIO } else { 0 };
        if flags & !known != 0 {
            return Err(DomainError::Inval("unknown MAP flags"));
        }
        if virt_end < virt_start {
            return Err(DomainError::Inval("virt_end before virt_start"));
        }
        let aligned = |a: u64| a.is_multiple_of(GRANULE);
        let end_aligned = virt_end.checked_add(1).is_none_or(aligned);
        if !aligned(virt_start) || !aligned(phys_start) || !end_aligned {
            return Err(DomainError::Range(
                "addresses not aligned to the 4 KiB granule",
            ));
        }
        if phys_start.checked_add(virt_end - virt_start).is_none() {
            return Err(DomainError::Range("physical range wraps around"));
        }
        if self.overlapping(virt_start, virt_end).next().is_some() {
            return Err(DomainError::Inval("overlaps an existing mapping"));
        }
        self.mappings.insert(
            virt_start,
            Mapping {
                virt_start,
                virt_end,
                phys_start,
                flags,
            },
        );
        Ok(())
    }

    /// The mappings that share at least one address with `[start, end]`.
    fn overlapping(&self, start: u64, end: u64) -> impl Iterator<Item = &Mapping> {
        // The one starting before `start` may reach into the range; the others start in it.
        let before = self
            .mappings
            .range(..start)
            .next_back()
            .map(|(_, m)| m)
            .filter(move |m| m.virt_end >= start);
        before
            .into_iter()
            .chain(self.mappings.range(start..=end).map(|(_, m)| m))
    }

    /// UNMAP `[virt_start, virt_end]`: removes every mapping inside it and returns them
    /// (the caller makes their pages dirty first when tracking). A mapping the range would
    /// split is a RANGE error and nothing is removed.
    pub fn unmap(&mut self, virt_start: u64, virt_end: u64) -> Result<Vec<Mapping>, DomainError> {
        if virt_end < virt_start {
            return Err(DomainError::Inval("virt_end before virt_start"));
        }
        let hit: Vec<Mapping> = self.overlapping(virt_start, virt_end).copied().collect();
        if hit
            .iter()
            .any(|m| m.virt_start < virt_start || m.virt_end > virt_end)
        {
            return Err(DomainError::Range("the range would split a mapping"));
        }
        for m in &hit {
            self.mappings.remove(&m.virt_start);
        }
        Ok(hit)
    }

    /// Translates a DMA of `len` bytes at `iova` into guest-physical ranges. Every byte
    /// must be mapped with the access's permission, or nothing is done.
    pub fn translate(&self, iova: u64, len: u64, write: bool) -> Result<Vec<(u64, u64)>, DmaFault> {
        let need = if write { MAP_F_WRITE } else { MAP_F_READ };
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut at = iova;
        let mut left = len;
        while left > 0 {
            let m = self
                .mappings
                .range(..=at)
                .next_back()
                .map(|(_, m)| m)
                .filter(|m| m.virt_end >= at)
                .ok_or(DmaFault::Unmapped { iova: at })?;
            if m.flags & need == 0 {
                return Err(DmaFault::Permission { iova: at, write });
            }
            // Bytes of this mapping from `at` on, less one (all 2^64 would not fit).
            let rest = m.virt_end - at;
            let n = if left - 1 <= rest { left } else { rest + 1 };
            let gpa = m.phys_start + (at - m.virt_start);
            match out.last_mut() {
                Some(last) if last.0.checked_add(last.1) == Some(gpa) => last.1 += n,
                _ => out.push((gpa, n)),
            }
            left -= n;
            match at.checked_add(n) {
                Some(next) => at = next,
                None if left == 0 => break,
                None => return Err(DmaFault::Unmapped { iova: u64::MAX }),
            }
        }
        Ok(out)
    }

    /// Every guest-physical range the domain maps with WRITE: what a device attached to it
    /// may have written (made dirty at a DETACH or reset while tracking).
    pub fn writable_footprint(&self) -> Vec<(u64, u64)> {
        self.mappings
            .values()
            .filter(|m| m.flags & MAP_F_WRITE != 0)
            .map(|m| (m.phys_start, m.len()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = GRANULE;
    const RW: u32 = MAP_F_READ | MAP_F_WRITE;

    /// Maps pages `[a, b]` (inclusive) at physical page `a + 100`.
    fn map(d: &mut IovaDomain, a: u64, b: u64) {
        d.map(a * P, (b + 1) * P - 1, (a + 100) * P, RW, false)
            .unwrap();
    }

    fn unmap(d: &mut IovaDomain, a: u64, b: u64) -> Result<Vec<u64>, DomainError> {
        d.unmap(a * P, (b + 1) * P - 1)
            .map(|v| v.iter().map(|m| m.virt_start / P).collect())
    }

    /// Virtio 1.2 §5.13.6.6, the examples of UNMAP, in pages.
    #[test]
    fn unmap_follows_the_spec_examples() {
        let mut d = IovaDomain::default();
        map(&mut d, 0, 9);
        assert_eq!(unmap(&mut d, 0, 9), Ok(vec![0]), "(1)");
        map(&mut d, 0, 4);
        map(&mut d, 5, 9);
        assert_eq!(unmap(&mut d, 0, 9), Ok(vec![0, 5]), "(2)");
        map(&mut d, 0, 9);
        assert!(
            matches!(unmap(&mut d, 0, 4), Err(DomainError::Range(_))),
            "(3)"
        );
        assert_eq!(d.mappings().count(), 1, "(3) removes nothing");
        assert_eq!(unmap(&mut d, 0, 9), Ok(vec![0]));
        map(&mut d, 0, 4);
        map(&mut d, 5, 9);
        assert_eq!(unmap(&mut d, 0, 4), Ok(vec![0]), "(4)");
        assert_eq!(unmap(&mut d, 5, 9), Ok(vec![5]));
        map(&mut d, 0, 4);
        assert_eq!(unmap(&mut d, 0, 9), Ok(vec![0]), "(5)");
        map(&mut d, 0, 4);
        map(&mut d, 10, 14);
        assert_eq!(unmap(&mut d, 0, 14), Ok(vec![0, 10]), "(6)");
        assert_eq!(unmap(&mut d, 0, 14), Ok(vec![]), "(7)");
        // A range that starts inside a mapping splits it too.
        map(&mut d, 0, 9);
        assert!(matches!(unmap(&mut d, 5, 20), Err(DomainError::Range(_))));
    }

    #[test]
    fn map_refuses_overlaps_bad_flags_and_misalignment() {
        let mut d = IovaDomain::default();
        map(&mut d, 10, 19);
        for (a, b) in [(5, 10), (19, 25), (12, 13), (0, 30)] {
            assert!(
                matches!(
                    d.map(a * P, (b + 1) * P - 1, 0, RW, false),
                    Err(DomainError::Inval(_))
                ),
                "[{a}, {b}] overlaps [10, 19]"
            );
        }
        assert!(matches!(
            d.map(0, P - 1, 0, MAP_F_MMIO, false),
            Err(DomainError::Inval(_))
        ));
        assert!(d.map(0, P - 1, 0, MAP_F_MMIO, true).is_ok());
        assert!(matches!(
            d.map(0x2_0000, 0x2_0000 + P - 1, 0, 1 << 7, true),
            Err(DomainError::Inval(_))
        ));
        for (s, e, p) in [(1, P - 1, 0), (P, 2 * P, 0), (P, 2 * P - 1, 7)] {
            assert!(
                matches!(
                    d.map(0x10_0000 + s, 0x10_0000 + e, p, RW, false),
                    Err(DomainError::Range(_))
                ),
                "{s:#x}-{e:#x} -> {p:#x}"
            );
        }
        assert!(matches!(
            d.map(2 * P, P, 0, RW, false),
            Err(DomainError::Inval(_))
        ));
        // The whole 64-bit space is one valid mapping.
        let mut all = IovaDomain::default();
        assert!(all.map(0, u64::MAX, 0, RW, false).is_ok());
        assert_eq!(
            all.translate(u64::MAX - 1, 2, true),
            Ok(vec![(u64::MAX - 1, 2)])
        );
        assert_eq!(all.translate(0, P, false), Ok(vec![(0, P)]));
        assert_eq!(all.writable_footprint(), vec![(0, u64::MAX)]);
    }

    #[test]
    fn translation_checks_every_byte_and_the_permission() {
        let mut d = IovaDomain::default();
        map(&mut d, 0, 1); // pages 0-1 -> 100-101
        map(&mut d, 2, 2); // page 2 -> 102: contiguous with the first
        d.map(3 * P, 4 * P - 1, 500 * P, MAP_F_READ, false).unwrap();
        assert_eq!(d.translate(P - 8, 16, true), Ok(vec![(101 * P - 8, 16)]));
        assert_eq!(
            d.translate(0, 3 * P, true),
            Ok(vec![(100 * P, 3 * P)]),
            "two mappings, one physical run"
        );
        assert_eq!(
            d.translate(3 * P - 4, 8, false),
            Ok(vec![(103 * P - 4, 4), (500 * P, 4)])
        );
        assert_eq!(
            d.translate(3 * P - 4, 8, true),
            Err(DmaFault::Permission {
                iova: 3 * P,
                write: true
            }),
            "a write into a read-only mapping"
        );
        assert_eq!(
            d.translate(4 * P - 4, 8, false),
            Err(DmaFault::Unmapped { iova: 4 * P })
        );
        assert_eq!(
            d.translate(9 * P, 1, false),
            Err(DmaFault::Unmapped { iova: 9 * P })
        );
        assert_eq!(d.translate(0, 0, true), Ok(vec![]));
        assert_eq!(d.writable_footprint(), vec![(100 * P, 2 * P), (102 * P, P)]);
    }
}
