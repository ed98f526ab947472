// Copyright 2026 Ferry authors
// SPDX-License-Identifier: Apache-2.0

//! The policy against a fake backend, one test per rule. Each test says how it fails when its
//! rule is broken; each was checked by breaking the rule once in `src/policy.rs`.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};

use vfio_dirty::{
    BackendError, DeviceId, DirtyBackend, DirtyBitmap, DmaTracker, DomainId, Identity,
    IovaTranslator, Range, Scope,
};

const PAGE: u64 = 0x1000;
const EINVAL: i32 = 22;
const EIO: i32 = 5;
const EOPNOTSUPP: i32 = 95;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    HwInfo(DeviceId),
    Alloc(DeviceId, bool),
    Free(DomainId),
    Attach(DeviceId, DomainId),
    Detach(DeviceId, DomainId),
    Capable(DomainId),
    SetTracking(DomainId, bool),
    Read {
        domain: DomainId,
        iova: u64,
        length: u64,
        no_clear: bool,
    },
    Map(u64, u64),
    Unmap(u64, u64),
}

#[derive(Default)]
struct FakeDomain {
    dirty: bool,
    tracking: bool,
    devices: BTreeSet<DeviceId>,
    /// Dirty IOVA pages, as the IOPTE dirty bits.
    pages: BTreeSet<u64>,
}

/// Follows the kernel's rules (reference §1): a DIRTY_TRACKING domain for a device that cannot
/// track is refused (EOPNOTSUPP), attaching such a device to one too (EINVAL); reads only set
/// bits; an unmap forgets the range's dirty bits.
#[derive(Default)]
struct Fake {
    calls: Vec<Call>,
    /// Devices whose IOMMU cannot track.
    incapable: BTreeSet<DeviceId>,
    /// Domains answer "no capability" after attach although allocated for it.
    domains_lie: bool,
    /// Devices whose IOMMU claims dirty support but that a dirty domain refuses (EINVAL).
    refused: BTreeSet<DeviceId>,
    /// Enabling tracking fails (EIO).
    fail_set_tracking: bool,
    domains: BTreeMap<DomainId, FakeDomain>,
    next: DomainId,
    mappings: BTreeMap<u64, u64>,
    /// A read of a range starting here fails.
    fail_read: BTreeSet<u64>,
    /// An unmap removes at most this many bytes.
    unmap_limit: Option<u64>,
}

impl Fake {
    /// `dev` writes IOVA `iova` by DMA.
    fn dma_write(&mut self, dev: DeviceId, iova: u64) {
        let mapped = self
            .mappings
            .range(..=iova)
            .next_back()
            .is_some_and(|(&s, &l)| iova < s + l);
        assert!(mapped, "the fake device writes only mapped IOVAs");
        for d in self.domains.values_mut() {
            if d.devices.contains(&dev) && d.dirty && d.tracking {
                d.pages.insert(iova & !(PAGE - 1));
            }
        }
    }

    fn reads(&self) -> Vec<&Call> {
        self.calls
            .iter()
            .filter(|c| matches!(c, Call::Read { .. }))
            .collect()
    }
}

fn err(op: &'static str, errno: i32) -> BackendError {
    BackendError { op, errno }
}

impl DirtyBackend for Fake {
    fn device_dirty_capable(&mut self, dev: DeviceId) -> Result<bool, BackendError> {
        self.calls.push(Call::HwInfo(dev));
        Ok(!self.incapable.contains(&dev))
    }

    fn alloc_domain(&mut self, dev: DeviceId, dirty: bool) -> Result<DomainId, BackendError> {
        self.calls.push(Call::Alloc(dev, dirty));
        if dirty && self.incapable.contains(&dev) {
            return Err(err("hwpt_alloc", EOPNOTSUPP));
        }
        self.next += 1;
        self.domains.insert(
            self.next,
            FakeDomain {
                dirty,
                ..Default::default()
            },
        );
        Ok(self.next)
    }

    fn free_domain(&mut self, domain: DomainId) -> Result<(), BackendError> {
        self.calls.push(Call::Free(domain));
        self.domains.remove(&domain);
        Ok(())
    }

    fn attach(&mut self, dev: DeviceId, domain: DomainId) -> Result<(), BackendError> {
        self.calls.push(Call::Attach(dev, domain));
        let d = self.domains.get_mut(&domain).unwrap();
        if d.dirty && (self.incapable.contains(&dev) || self.refused.contains(&dev)) {
            return Err(err("attach", EINVAL));
        }
        d.devices.insert(dev);
        Ok(())
    }

    fn detach(&mut self, dev: DeviceId, domain: DomainId) -> Result<(), BackendError> {
        self.calls.push(Call::Detach(dev, domain));
        self.domains.get_mut(&domain).unwrap().devices.remove(&dev);
        Ok(())
    }

    fn domain_dirty_capable(&mut self, domain: DomainId) -> Result<bool, BackendError> {
        self.calls.push(Call::Capable(domain));
        Ok(self.domains[&domain].dirty && !self.domains_lie)
    }

    fn set_tracking(&mut self, domain: DomainId, enable: bool) -> Result<(), BackendError> {
        self.calls.push(Call::SetTracking(domain, enable));
        let d = self.domains.get_mut(&domain).unwrap();
        if !d.dirty {
            return Err(err("set_dirty_tracking", EOPNOTSUPP));
        }
        if self.fail_set_tracking && enable {
            return Err(err("set_dirty_tracking", EIO));
        }
        d.tracking = enable;
        d.pages.clear();
        Ok(())
    }

    fn read_dirty(
        &mut self,
        domain: DomainId,
        bitmap: &mut DirtyBitmap,
        no_clear: bool,
    ) -> Result<(), BackendError> {
        let (iova, length) = (bitmap.iova(), bitmap.length());
        self.calls.push(Call::Read {
            domain,
            iova,
            length,
            no_clear,
        });
        if self.fail_read.contains(&iova) {
            return Err(err("get_dirty_bitmap", EIO));
        }
        let d = self.domains.get_mut(&domain).unwrap();
        if !d.tracking {
            return Err(err("get_dirty_bitmap", EINVAL));
        }
        let hit: Vec<u64> = d.pages.range(iova..iova + length).copied().collect();
        for p in hit {
            bitmap.set(p); // only sets, as the kernel
            if !no_clear {
                d.pages.remove(&p);
            }
        }
        Ok(())
    }

    fn map(&mut self, iova: u64, length: u64, _gpa: u64) -> Result<(), BackendError> {
        self.calls.push(Call::Map(iova, length));
        self.mappings.insert(iova, length);
        Ok(())
    }

    fn unmap(&mut self, iova: u64, length: u64) -> Result<u64, BackendError> {
        self.calls.push(Call::Unmap(iova, length));
        let mut budget = self.unmap_limit.unwrap_or(u64::MAX);
        let inside: Vec<(u64, u64)> = self
            .mappings
            .range(iova..iova + length)
            .map(|(&s, &l)| (s, l))
            .collect();
        let mut removed = 0;
        for (s, l) in inside {
            if l > budget {
                break;
            }
            budget -= l;
            removed += l;
            self.mappings.remove(&s);
            for d in self.domains.values_mut() {
                // The IOPTEs are gone, and their dirty bits with them.
                let gone: Vec<u64> = d.pages.range(s..s + l).copied().collect();
                for p in gone {
                    d.pages.remove(&p);
                }
            }
        }
        Ok(removed)
    }
}

fn tracker(fake: Fake) -> DmaTracker<Fake> {
    DmaTracker::new(fake, PAGE)
}

fn r(start: u64, length: u64) -> Range {
    Range { start, length }
}

/// Rule 4 (seed 000): a device of unknown DMA scope makes its whole mapped range dirty at
/// every harvest. Fails if the tracker harvested only the tracking domain's bits (the second
/// harvest would be empty: nothing was written through a tracked device).
#[test]
fn unknown_scope_device_dirties_every_mapping_at_every_harvest() {
    let mut fake = Fake::default();
    fake.incapable.insert(7);
    let mut t = tracker(fake);
    assert!(matches!(t.add_device(7).unwrap(), Scope::Unknown(_)));
    t.map(0x10_0000, 4 * PAGE, 0x10_0000).unwrap();
    t.map(0x40_0000, PAGE, 0x40_0000).unwrap();
    t.start();
    for _ in 0..2 {
        let h = t.harvest(&Identity).unwrap();
        assert_eq!(h.ranges, vec![r(0x10_0000, 4 * PAGE), r(0x40_0000, PAGE)]);
        assert!(!h.all_ram);
    }
}

/// Rule 5 (seed 000): a detach while tracking makes the device's footprint dirty at once.
/// Fails if the detach only detached: its domain is freed with the device, so its bits (and
/// the write below) are gone and the next harvest would be empty.
#[test]
fn detach_while_tracking_dirties_the_footprint() {
    let mut t = tracker(Fake::default());
    let Scope::Tracked(td) = t.add_device(1).unwrap() else {
        panic!("a capable device is tracked")
    };
    t.map(0x20_0000, 8 * PAGE, 0x20_0000).unwrap();
    t.start();
    t.backend_mut().dma_write(1, 0x20_3000);
    t.remove_device(1, &Identity).unwrap();
    assert!(t.backend().calls.contains(&Call::Free(td)));
    let h = t.harvest(&Identity).unwrap();
    assert_eq!(h.ranges, vec![r(0x20_0000, 8 * PAGE)]);
    // Not tracking: a detach owes nothing.
    t.stop().unwrap();
    t.add_device(2).unwrap();
    t.remove_device(2, &Identity).unwrap();
    t.start();
    assert!(t.harvest(&Identity).unwrap().ranges.is_empty());
}

/// Rule 7 (seed 004): a device that cannot track never joins the tracking domain; it gets its
/// own domain and the unknown-scope rule. Fails if it were attached to the tracking domain
/// (the Attach(2, td) call), or if it were given no unknown scope (the harvest would miss
/// the page it wrote, which no tracker sees).
#[test]
fn device_that_cannot_track_gets_its_own_domain() {
    let mut fake = Fake::default();
    fake.incapable.insert(2);
    let mut t = tracker(fake);
    let Scope::Tracked(td) = t.add_device(1).unwrap() else {
        panic!("device 1 can track")
    };
    let Scope::Unknown(own) = t.add_device(2).unwrap() else {
        panic!("device 2 cannot track")
    };
    assert_ne!(own, td);
    assert!(!t.backend().calls.contains(&Call::Attach(2, td)));
    assert!(t.backend().calls.contains(&Call::Alloc(2, false)));
    t.map(0, 16 * PAGE, 0).unwrap();
    t.start();
    t.backend_mut().dma_write(2, 0x5000);
    let h = t.harvest(&Identity).unwrap();
    assert!(h.contains(0x5000));
    assert_eq!(h.ranges, vec![r(0, 16 * PAGE)]);
    // A third capable device joins the existing tracking domain.
    assert_eq!(t.add_device(3).unwrap(), Scope::Tracked(td));
}

/// Rule 7, the capability is the domain's, read after attach: a device whose IOMMU claims
/// dirty support, in a domain that then does not report the capability, is of unknown
/// scope. Fails if the device's claim were trusted (nothing would be dirty).
#[test]
fn capability_is_read_from_the_domain_after_attach() {
    let mut t = tracker(Fake {
        domains_lie: true,
        ..Default::default()
    });
    let Scope::Unknown(d) = t.add_device(1).unwrap() else {
        panic!("the domain does not report the capability")
    };
    let calls = &t.backend().calls;
    let attach = calls.iter().position(|c| *c == Call::Attach(1, d)).unwrap();
    let capable = calls.iter().position(|c| *c == Call::Capable(d)).unwrap();
    assert!(attach < capable, "capability checked after attach");
    t.map(0, 2 * PAGE, 0).unwrap();
    t.start();
    assert_eq!(t.harvest(&Identity).unwrap().ranges, vec![r(0, 2 * PAGE)]);
}

/// Rule 7: a device the tracking domain refuses at attach (its IOMMU claimed support) gets
/// its own domain and the unknown-scope rule. Fails if the refusal were returned as an error
/// or the device kept as tracked (the harvest would miss its write).
#[test]
fn device_refused_by_the_tracking_domain_gets_its_own_domain() {
    let mut t = tracker(Fake {
        refused: BTreeSet::from([2]),
        ..Default::default()
    });
    let Scope::Tracked(td) = t.add_device(1).unwrap() else {
        panic!("device 1 can track")
    };
    let Scope::Unknown(own) = t.add_device(2).unwrap() else {
        panic!("device 2 was refused")
    };
    assert_ne!(own, td);
    t.map(0, 4 * PAGE, 0).unwrap();
    t.start();
    t.backend_mut().dma_write(2, 0x2000);
    assert_eq!(t.harvest(&Identity).unwrap().ranges, vec![r(0, 4 * PAGE)]);
    // The same when it is the first device, refused by the dirty domain made for it.
    let mut t = tracker(Fake {
        refused: BTreeSet::from([1]),
        ..Default::default()
    });
    let Scope::Unknown(own) = t.add_device(1).unwrap() else {
        panic!("device 1 was refused")
    };
    assert!(t.backend().calls.contains(&Call::Alloc(1, false)));
    assert!(t.backend().domains[&own].devices.contains(&1));
}

/// Rule 4, a tracking domain whose tracking cannot be enabled reports nothing: every mapping
/// is dirty at every harvest. Fails if the failed enable were ignored: the tracker would go
/// on reading a domain that tracks nothing (the reads below), and only a backend that fails
/// such reads, as this fake does, would keep the ranges dirty.
#[test]
fn failed_enable_makes_everything_dirty() {
    let mut t = tracker(Fake {
        fail_set_tracking: true,
        ..Default::default()
    });
    t.add_device(1).unwrap();
    t.map(0, 4 * PAGE, 0).unwrap();
    t.map(0x10_0000, 4 * PAGE, 0x10_0000).unwrap();
    t.start();
    for i in 0..2 {
        let h = t.harvest(&Identity).unwrap();
        assert_eq!(h.ranges, vec![r(0, 4 * PAGE), r(0x10_0000, 4 * PAGE)]);
        assert_eq!(h.errors.len(), if i == 0 { 1 } else { 0 });
    }
    assert!(
        t.backend().reads().is_empty(),
        "a domain not tracking is not read"
    );
}

/// Rule 6: unmap while tracking reads the range with NO_CLEAR first, then unmaps. Fails if
/// the unmap came first (the fake forgets the bits of unmapped IOPTEs, as hardware does: the
/// page written just before would be lost), or if the read cleared.
#[test]
fn unmap_reads_no_clear_then_unmaps() {
    let mut t = tracker(Fake::default());
    let Scope::Tracked(td) = t.add_device(1).unwrap() else {
        panic!()
    };
    t.map(0x10_0000, 4 * PAGE, 0x10_0000).unwrap();
    t.map(0x20_0000, 4 * PAGE, 0x20_0000).unwrap();
    t.start();
    t.backend_mut().dma_write(1, 0x10_2000);
    t.backend_mut().calls.clear();
    assert_eq!(t.unmap(0x10_0000, 4 * PAGE, &Identity).unwrap(), 4 * PAGE);
    assert_eq!(
        t.backend().calls,
        vec![
            Call::Read {
                domain: td,
                iova: 0x10_0000,
                length: 4 * PAGE,
                no_clear: true
            },
            Call::Unmap(0x10_0000, 4 * PAGE)
        ]
    );
    let h = t.harvest(&Identity).unwrap();
    assert_eq!(h.ranges, vec![r(0x10_2000, PAGE)]);
    // The unmapped range is no longer read: one read, of the mapping left.
    assert_eq!(t.backend().reads().len(), 2);
}

/// Rule 6, an unmap that removed less than asked proceeds with what was removed: the mapping
/// left stays tracked. Fails if the tracker forgot every mapping it asked to unmap (the
/// later write to the mapping left would never be read).
#[test]
fn short_unmap_keeps_tracking_what_is_left() {
    let mut t = tracker(Fake {
        unmap_limit: Some(2 * PAGE),
        ..Default::default()
    });
    t.add_device(1).unwrap();
    t.map(0x10_0000, 2 * PAGE, 0x10_0000).unwrap();
    t.map(0x10_2000, 2 * PAGE, 0x10_2000).unwrap();
    t.start();
    assert_eq!(t.unmap(0x10_0000, 4 * PAGE, &Identity).unwrap(), 2 * PAGE);
    t.backend_mut().dma_write(1, 0x10_3000);
    let h = t.harvest(&Identity).unwrap();
    assert_eq!(h.ranges, vec![r(0x10_3000, PAGE)]);
}

/// A fake vIOMMU domain table: IOVA start → (GPA, length).
#[derive(Default)]
struct Viommu(RefCell<BTreeMap<u64, (u64, u64)>>);

impl IovaTranslator for Viommu {
    fn translate(&self, iova: u64, length: u64) -> Option<Vec<Range>> {
        let t = self.0.borrow();
        let (&s, &(gpa, l)) = t.range(..=iova).next_back()?;
        (iova + length <= s + l).then(|| vec![r(gpa + (iova - s), length)])
    }
}

/// Behind a vIOMMU: bits are translated to GPAs, and the tracked ranges follow the guest's
/// MAP/UNMAP without dropping bits. The guest unmaps IOVA 0x10000 (GPA 0x200000) after the
/// device wrote it and maps the same IOVA to GPA 0x300000, where the device writes again.
/// Fails if bits were not read before the unmap (0x201000 lost), if they were translated
/// after the remap (0x301000 reported instead), if the new mapping were not tracked from its
/// MAP (0x300000 lost), or if no translation happened (IOVA 0x10000 reported).
#[test]
fn viommu_ranges_follow_map_and_unmap() {
    let vi = Viommu::default();
    let mut t = tracker(Fake::default());
    t.add_device(1).unwrap();
    vi.0.borrow_mut().insert(0x1_0000, (0x20_0000, 4 * PAGE));
    t.map(0x1_0000, 4 * PAGE, 0x20_0000).unwrap();
    t.start();
    t.backend_mut().dma_write(1, 0x1_1000);
    // The guest's UNMAP: the tracker first, while the vIOMMU still translates the range.
    t.unmap(0x1_0000, 4 * PAGE, &vi).unwrap();
    vi.0.borrow_mut().remove(&0x1_0000);
    // The guest's MAP of the same IOVA elsewhere.
    vi.0.borrow_mut().insert(0x1_0000, (0x30_0000, 4 * PAGE));
    t.map(0x1_0000, 4 * PAGE, 0x30_0000).unwrap();
    t.backend_mut().dma_write(1, 0x1_0000);
    let h = t.harvest(&vi).unwrap();
    assert_eq!(h.ranges, vec![r(0x20_1000, PAGE), r(0x30_0000, PAGE)]);
    assert!(!h.all_ram);
}

/// A dirty IOVA the vIOMMU cannot translate makes all RAM dirty. Fails if it were dropped.
#[test]
fn untranslatable_dirty_iova_makes_all_ram_dirty() {
    let vi = Viommu::default();
    let mut t = tracker(Fake::default());
    t.add_device(1).unwrap();
    t.map(0x1_0000, PAGE, 0x20_0000).unwrap(); // the translator was never told
    t.start();
    t.backend_mut().dma_write(1, 0x1_0000);
    assert!(t.harvest(&vi).unwrap().all_ram);
}

/// Rule 8: the bitmap is zeroed before every call. The tracker reuses one buffer and the
/// fake only sets bits, so without the zeroing the second harvest would report 0x3000 again.
#[test]
fn bitmap_is_zeroed_before_every_call() {
    let mut t = tracker(Fake::default());
    t.add_device(1).unwrap();
    t.map(0, 16 * PAGE, 0).unwrap();
    t.map(0x10_0000, 16 * PAGE, 0x10_0000).unwrap();
    t.start();
    t.backend_mut().dma_write(1, 0x3000);
    assert_eq!(t.harvest(&Identity).unwrap().ranges, vec![r(0x3000, PAGE)]);
    t.backend_mut().dma_write(1, 0x10_5000);
    assert_eq!(
        t.harvest(&Identity).unwrap().ranges,
        vec![r(0x10_5000, PAGE)]
    );
    assert!(t.harvest(&Identity).unwrap().ranges.is_empty());
    // One mapped range at a time, and reads that clear.
    for c in t.backend().reads() {
        let Call::Read {
            iova,
            length,
            no_clear,
            ..
        } = c
        else {
            unreachable!()
        };
        assert!(t.backend().mappings.get(iova) == Some(length) && !no_clear);
    }
}

/// Rule 8: a backend error during a harvest makes the affected range all dirty. Fails if an
/// error were taken as "nothing dirty" (the range would be missing) or spread to the others.
#[test]
fn read_error_makes_the_range_all_dirty() {
    let mut fake = Fake::default();
    fake.fail_read.insert(0x10_0000);
    let mut t = tracker(fake);
    t.add_device(1).unwrap();
    t.map(0, 4 * PAGE, 0).unwrap();
    t.map(0x10_0000, 4 * PAGE, 0x10_0000).unwrap();
    t.start();
    let h = t.harvest(&Identity).unwrap();
    assert_eq!(h.ranges, vec![r(0x10_0000, 4 * PAGE)]);
    assert_eq!(h.errors.len(), 1);
    assert!(
        h.errors[0].to_string().contains("0x100000"),
        "{}",
        h.errors[0]
    );
}

/// Rules 4 and 6 together: with a device of unknown scope, an unmap while tracking makes the
/// unmapped range dirty at once (the next harvest no longer sees the mapping). Fails if the
/// unmap only read the tracking domain.
#[test]
fn unknown_scope_unmap_dirties_the_unmapped_range() {
    let mut fake = Fake::default();
    fake.incapable.insert(9);
    let mut t = tracker(fake);
    t.add_device(1).unwrap();
    t.add_device(9).unwrap();
    t.map(0x10_0000, 4 * PAGE, 0x10_0000).unwrap();
    t.start();
    t.harvest(&Identity).unwrap();
    t.unmap(0x10_0000, 4 * PAGE, &Identity).unwrap();
    assert_eq!(
        t.harvest(&Identity).unwrap().ranges,
        vec![r(0x10_0000, 4 * PAGE)]
    );
}

/// A device added while tracking makes a tracking domain that is tracking at once.
#[test]
fn device_added_while_tracking_is_tracked() {
    let mut t = tracker(Fake::default());
    t.map(0, 4 * PAGE, 0).unwrap();
    t.start();
    let Scope::Tracked(td) = t.add_device(1).unwrap() else {
        panic!()
    };
    assert!(t.backend().calls.contains(&Call::SetTracking(td, true)));
    t.backend_mut().dma_write(1, 0x1000);
    assert_eq!(t.harvest(&Identity).unwrap().ranges, vec![r(0x1000, PAGE)]);
}

#[test]
fn errors_name_the_offending_value() {
    let mut t = tracker(Fake::default());
    let e = t.map(0x800, PAGE, 0).unwrap_err();
    assert!(e.to_string().contains("0x800"), "{e}");
    t.map(0, 2 * PAGE, 0).unwrap();
    let e = t.map(PAGE, PAGE, 0).unwrap_err();
    assert!(e.to_string().contains("0x1000"), "{e}");
    let e = t.remove_device(42, &Identity).unwrap_err();
    assert!(e.to_string().contains("42"), "{e}");
    assert!(t.harvest(&Identity).is_err());
}

/// A guest may ask for a mapping of any size (the vIOMMU takes up to 2^48): checking it
/// allocates nothing, so a 256 TiB mapping costs what a page does until the backend says
/// whether guest RAM is behind it. (Checking it with a scratch bitmap allocated 8 GiB and
/// aborted the process.)
#[test]
fn a_huge_mapping_is_checked_without_allocating_its_bitmap() {
    let mut t = tracker(Fake::default());
    t.add_device(1).unwrap();
    t.map(1 << 32, (1 << 48) - (1 << 32), 0).unwrap();
    assert_eq!(
        t.backend().calls.last(),
        Some(&Call::Map(1 << 32, (1 << 48) - (1 << 32)))
    );
}
