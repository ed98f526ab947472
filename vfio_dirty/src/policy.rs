// Copyright 2026 Ferry authors
// SPDX-License-Identifier: Apache-2.0

//! The rules of DMA dirty tracking (DESIGN.md rules 4–8, seeds 000, 002, 004), apart from
//! the ioctls. A [`DirtyBackend`] is what a hardware tracker can do (iommufd HWPTs, later
//! type1 and device DMA logging); a [`DmaTracker`] drives one over one IOVA address space
//! (an IOAS, or one virtio-iommu domain) and produces guest-physical dirty ranges.
//!
//! The rules, each with a test in `tests/policy.rs`:
//! - **Unknown scope** (rule 4, seed 000): a device that cannot report its DMA writes makes
//!   every mapped range dirty at every harvest, and an unmapped range dirty at its unmap.
//! - **Detach while tracking** (rule 5, seed 000): the device's footprint (every mapped range)
//!   is dirty at once; nobody can report its writes afterwards.
//! - **Capability is the domain's, after attach** (rule 7, seed 004): a device whose IOMMU
//!   cannot track never joins the tracking domain; it gets a domain of its own and rule 4.
//!   A domain that does not report the capability once attached is rule 4 as well.
//! - **Unmap while tracking** (rule 6): each mapped range's bits are read with NO_CLEAR before
//!   the unmap; a DMA racing its own unmap may be lost, as on hardware (seed 004). An unmap
//!   that removed less than asked proceeds with what was removed.
//! - **Set-only bitmaps** (rule 8): zeroed before every call, one mapped range at a time; a
//!   backend error makes the range all dirty, never "nothing dirty".
//! - **Behind a vIOMMU**: IOVA bits become GPA ranges through an [`IovaTranslator`], which
//!   must still hold a mapping when [`DmaTracker::unmap`] is called for it; ranges follow the
//!   guest's MAP/UNMAP (a new mapping is read from the first harvest after its MAP). A dirty
//!   IOVA the translator cannot place makes all guest RAM dirty.

use std::collections::BTreeMap;

use thiserror::Error;

use crate::bitmap::{BitmapError, DirtyBitmap};

/// A device as the backend knows it (an iommufd device id, a VFIO group, ...).
pub type DeviceId = u32;
/// A domain (an iommufd HWPT) as the backend knows it.
pub type DomainId = u32;

/// A failed backend operation: which one and the errno.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("{op} failed with errno {errno}")]
pub struct BackendError {
    pub op: &'static str,
    pub errno: i32,
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PolicyError {
    #[error("device {0} is already attached")]
    AlreadyAttached(DeviceId),
    #[error("device {0} is not attached")]
    UnknownDevice(DeviceId),
    #[error("mapping iova {iova:#x} length {length:#x} overlaps a tracked mapping")]
    Overlap { iova: u64, length: u64 },
    #[error("range iova {iova:#x} length {length:#x}: {source}")]
    Range {
        iova: u64,
        length: u64,
        source: BitmapError,
    },
    #[error("device {dev} domain {domain}: {source}")]
    Backend {
        dev: DeviceId,
        domain: DomainId,
        source: BackendError,
    },
    #[error("device {dev}: {source}")]
    Device { dev: DeviceId, source: BackendError },
    #[error("domain {domain}: {source}")]
    Domain {
        domain: DomainId,
        source: BackendError,
    },
    #[error("range iova {iova:#x} length {length:#x}: {source}")]
    RangeBackend {
        iova: u64,
        length: u64,
        source: BackendError,
    },
    #[error("dirty tracking is not on")]
    NotTracking,
}

/// What a hardware dirty tracker can do. One instance serves one IOVA address space.
pub trait DirtyBackend {
    /// Whether the device's IOMMU says it can track (iommufd `IOMMU_GET_HW_INFO`
    /// `IOMMU_HW_CAP_DIRTY_TRACKING`). Only a hint for the domain to ask for: the domain's
    /// own answer after attach ([`DirtyBackend::domain_dirty_capable`]) is what counts.
    fn device_dirty_capable(&mut self, dev: DeviceId) -> Result<bool, BackendError>;
    /// A new domain for `dev`, a dirty-tracking one when `dirty` (HWPT_ALLOC_DIRTY_TRACKING).
    fn alloc_domain(&mut self, dev: DeviceId, dirty: bool) -> Result<DomainId, BackendError>;
    fn free_domain(&mut self, domain: DomainId) -> Result<(), BackendError>;
    fn attach(&mut self, dev: DeviceId, domain: DomainId) -> Result<(), BackendError>;
    fn detach(&mut self, dev: DeviceId, domain: DomainId) -> Result<(), BackendError>;
    /// Whether the domain, with its devices attached, can track dirty pages.
    fn domain_dirty_capable(&mut self, domain: DomainId) -> Result<bool, BackendError>;
    fn set_tracking(&mut self, domain: DomainId, enable: bool) -> Result<(), BackendError>;
    /// Set (never clear) the bits of the pages dirty in `bitmap`'s range, clearing them in
    /// the domain unless `no_clear`.
    fn read_dirty(
        &mut self,
        domain: DomainId,
        bitmap: &mut DirtyBitmap,
        no_clear: bool,
    ) -> Result<(), BackendError>;
    /// Map `[iova, iova + length)` to guest-physical `gpa` in every domain.
    fn map(&mut self, iova: u64, length: u64, gpa: u64) -> Result<(), BackendError>;
    /// Unmap; returns how many bytes were removed (possibly fewer than asked).
    fn unmap(&mut self, iova: u64, length: u64) -> Result<u64, BackendError>;
}

/// IOVA → guest-physical translation (the vIOMMU domain's table, or [`Identity`]).
pub trait IovaTranslator {
    /// The GPA ranges behind `[iova, iova + length)`, or `None` when some part is unmapped.
    fn translate(&self, iova: u64, length: u64) -> Option<Vec<Range>>;
}

/// No vIOMMU: IOVA is GPA.
#[derive(Debug, Default, Clone, Copy)]
pub struct Identity;

impl IovaTranslator for Identity {
    fn translate(&self, iova: u64, length: u64) -> Option<Vec<Range>> {
        Some(vec![Range {
            start: iova,
            length,
        }])
    }
}

/// A range of addresses `[start, start + length)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Range {
    pub start: u64,
    pub length: u64,
}

/// How a device's DMA writes are known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Reported by the tracking domain it is attached to.
    Tracked(DomainId),
    /// Not reported: the device sits alone in this domain and everything mapped is dirty.
    Unknown(DomainId),
}

/// What a harvest found, in guest-physical addresses.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Harvest {
    /// Sorted, merged GPA ranges.
    pub ranges: Vec<Range>,
    /// A dirty IOVA could not be translated: all guest RAM must be taken as dirty.
    pub all_ram: bool,
    /// What went wrong on the way (each already answered by marking its range dirty).
    pub errors: Vec<PolicyError>,
}

impl Harvest {
    fn add_iova(&mut self, xlate: &dyn IovaTranslator, iova: u64, length: u64) {
        match xlate.translate(iova, length) {
            Some(r) => self.ranges.extend(r),
            None => self.all_ram = true,
        }
    }

    fn normalize(&mut self) {
        self.ranges.retain(|r| r.length != 0);
        self.ranges.sort();
        let mut out: Vec<Range> = Vec::with_capacity(self.ranges.len());
        for r in self.ranges.drain(..) {
            match out.last_mut() {
                Some(l) if r.start <= l.start.saturating_add(l.length) => {
                    let end = (r.start.saturating_add(r.length)).max(l.start + l.length);
                    l.length = end - l.start;
                }
                _ => out.push(r),
            }
        }
        self.ranges = out;
    }

    /// Whether guest-physical `gpa` is dirty in this harvest.
    pub fn contains(&self, gpa: u64) -> bool {
        self.all_ram
            || self
                .ranges
                .iter()
                .any(|r| gpa >= r.start && gpa - r.start < r.length)
    }
}

/// Applies the rules over a [`DirtyBackend`].
pub struct DmaTracker<B: DirtyBackend> {
    backend: B,
    page_size: u64,
    devices: BTreeMap<DeviceId, Scope>,
    /// The one domain trackable devices share, and whether tracking could be enabled on it.
    tracking_domain: Option<DomainId>,
    tracking_domain_ok: bool,
    /// Mapped IOVA ranges: start → length.
    mappings: BTreeMap<u64, u64>,
    tracking: bool,
    /// Dirty found between harvests (detach, unmap), returned by the next harvest.
    pending: Harvest,
    /// Reused for every query, hence zeroed before every one (rule 8).
    scratch: DirtyBitmap,
}

impl<B: DirtyBackend> DmaTracker<B> {
    /// `page_size`: the tracking granule (a power of two).
    pub fn new(backend: B, page_size: u64) -> Self {
        DmaTracker {
            backend,
            page_size,
            devices: BTreeMap::new(),
            tracking_domain: None,
            tracking_domain_ok: false,
            mappings: BTreeMap::new(),
            tracking: false,
            pending: Harvest::default(),
            scratch: DirtyBitmap::default(),
        }
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    pub fn scope(&self, dev: DeviceId) -> Option<Scope> {
        self.devices.get(&dev).copied()
    }

    pub fn is_tracking(&self) -> bool {
        self.tracking
    }

    /// Attach a device (rule 7): a device whose IOMMU says it can track joins the tracking
    /// domain (or makes it); any other, or one refused by the domain, or one whose new domain
    /// does not report the capability after attach, gets a domain of its own and rule 4.
    pub fn add_device(&mut self, dev: DeviceId) -> Result<Scope, PolicyError> {
        if self.devices.contains_key(&dev) {
            return Err(PolicyError::AlreadyAttached(dev));
        }
        // An error asking is "cannot track": the conservative answer.
        if self.backend.device_dirty_capable(dev).unwrap_or(false) {
            if let Some(td) = self.tracking_domain {
                if self.backend.attach(dev, td).is_ok() {
                    let scope = Scope::Tracked(td);
                    self.devices.insert(dev, scope);
                    return Ok(scope);
                }
            } else if let Ok(d) = self.backend.alloc_domain(dev, true) {
                if self.backend.attach(dev, d).is_err() {
                    // Refused by a dirty domain made for it: it goes alone, below.
                    let _ = self.backend.free_domain(d);
                    return self.add_untracked(dev);
                }
                let scope = if self.backend.domain_dirty_capable(d).unwrap_or(false) {
                    self.tracking_domain = Some(d);
                    self.tracking_domain_ok = true;
                    if self.tracking {
                        self.enable_tracking_domain(d);
                    }
                    Scope::Tracked(d)
                } else {
                    Scope::Unknown(d)
                };
                self.devices.insert(dev, scope);
                return Ok(scope);
            }
        }
        self.add_untracked(dev)
    }

    /// A domain of its own for `dev`, without dirty tracking: rule 4 from now on.
    fn add_untracked(&mut self, dev: DeviceId) -> Result<Scope, PolicyError> {
        let d = self
            .backend
            .alloc_domain(dev, false)
            .map_err(|source| PolicyError::Device { dev, source })?;
        if let Err(source) = self.backend.attach(dev, d) {
            let _ = self.backend.free_domain(d);
            return Err(PolicyError::Backend {
                dev,
                domain: d,
                source,
            });
        }
        let scope = Scope::Unknown(d);
        self.devices.insert(dev, scope);
        Ok(scope)
    }

    fn enable_tracking_domain(&mut self, d: DomainId) {
        if let Err(source) = self.backend.set_tracking(d, true) {
            // The domain cannot report: its devices are of unknown scope from now on.
            self.tracking_domain_ok = false;
            self.pending
                .errors
                .push(PolicyError::Domain { domain: d, source });
        }
    }

    /// Detach a device (rule 5): while tracking, its footprint — every mapped range — is dirty
    /// at once, before it goes.
    pub fn remove_device(
        &mut self,
        dev: DeviceId,
        xlate: &dyn IovaTranslator,
    ) -> Result<(), PolicyError> {
        let scope = self
            .devices
            .remove(&dev)
            .ok_or(PolicyError::UnknownDevice(dev))?;
        if self.tracking {
            for (&iova, &length) in &self.mappings {
                self.pending.add_iova(xlate, iova, length);
            }
        }
        let domain = match scope {
            Scope::Tracked(d) | Scope::Unknown(d) => d,
        };
        let detached = self.backend.detach(dev, domain);
        let still_used = self.devices.values().any(|s| match s {
            Scope::Tracked(d) | Scope::Unknown(d) => *d == domain,
        });
        if !still_used {
            if self.tracking_domain == Some(domain) {
                self.tracking_domain = None;
                self.tracking_domain_ok = false;
            }
            let _ = self.backend.free_domain(domain);
        }
        detached.map_err(|source| PolicyError::Backend {
            dev,
            domain,
            source,
        })
    }

    /// Map `[iova, iova + length)` to `gpa` (the guest's MAP, or guest RAM without a vIOMMU);
    /// while tracking, the range is read from the next harvest on. A range ending at 2^64 is
    /// refused (the kernel would take it; Ferry's guests have no use for it).
    pub fn map(&mut self, iova: u64, length: u64, gpa: u64) -> Result<(), PolicyError> {
        if iova.checked_add(length).is_none() {
            return Err(PolicyError::Range {
                iova,
                length,
                source: BitmapError::Overflow { iova, length },
            });
        }
        DirtyBitmap::check(iova, length, self.page_size).map_err(|source| PolicyError::Range {
            iova,
            length,
            source,
        })?;
        let end = iova + length;
        let before = self.mappings.range(..end).next_back();
        if before.is_some_and(|(&s, &l)| s + l > iova) {
            return Err(PolicyError::Overlap { iova, length });
        }
        self.backend
            .map(iova, length, gpa)
            .map_err(|source| PolicyError::RangeBackend {
                iova,
                length,
                source,
            })?;
        self.mappings.insert(iova, length);
        Ok(())
    }

    /// Unmap (rule 6): while tracking, each mapped range's bits are read with NO_CLEAR and
    /// kept for the next harvest, then the range is unmapped. `xlate` must still translate
    /// the range. Returns the bytes removed; fewer than asked leaves the rest mapped and
    /// tracked.
    pub fn unmap(
        &mut self,
        iova: u64,
        length: u64,
        xlate: &dyn IovaTranslator,
    ) -> Result<u64, PolicyError> {
        let end = iova.saturating_add(length);
        let hit: Vec<(u64, u64)> = self
            .mappings
            .range(..end)
            .filter(|(&s, &l)| s + l > iova)
            .map(|(&s, &l)| (s, l))
            .collect();
        if self.tracking {
            let unknown = self.has_unknown_scope();
            for &(s, l) in &hit {
                // The part of this mapping being unmapped, widened to whole pages.
                let a = iova.max(s) & !(self.page_size - 1);
                let b = end.min(s + l).next_multiple_of(self.page_size).min(s + l);
                if unknown {
                    self.pending.add_iova(xlate, a, b - a);
                } else if let Some(td) = self.tracking_domain {
                    self.read_range(td, a, b - a, true, xlate);
                }
            }
        }
        let removed =
            self.backend
                .unmap(iova, length)
                .map_err(|source| PolicyError::RangeBackend {
                    iova,
                    length,
                    source,
                })?;
        // What the backend removed: whole mappings, in address order, up to `removed` bytes.
        let mut left = removed;
        for (s, l) in hit {
            if l > left {
                break;
            }
            left -= l;
            self.mappings.remove(&s);
        }
        Ok(removed)
    }

    fn has_unknown_scope(&self) -> bool {
        self.devices
            .values()
            .any(|s| matches!(s, Scope::Unknown(_)))
            || (self.tracking_domain.is_some() && !self.tracking_domain_ok)
    }

    /// Read one mapped range of `domain` into `pending`, translated to GPAs.
    fn read_range(
        &mut self,
        domain: DomainId,
        iova: u64,
        length: u64,
        no_clear: bool,
        xlate: &dyn IovaTranslator,
    ) {
        let out = &mut self.pending;
        if let Err(source) = self.scratch.prepare(iova, length, self.page_size) {
            out.errors.push(PolicyError::Range {
                iova,
                length,
                source,
            });
            out.add_iova(xlate, iova, length);
            return;
        }
        match self.backend.read_dirty(domain, &mut self.scratch, no_clear) {
            Ok(()) => {
                for (a, l) in self.scratch.runs() {
                    out.add_iova(xlate, a, l);
                }
            }
            Err(source) => {
                // Rule 8: an error is "all of it dirty", never "nothing dirty".
                out.errors.push(PolicyError::RangeBackend {
                    iova,
                    length,
                    source,
                });
                out.add_iova(xlate, iova, length);
            }
        }
    }

    /// Start tracking: enable it on the tracking domain; from now on devices of unknown scope
    /// dirty every mapped range at every harvest.
    pub fn start(&mut self) {
        self.pending = Harvest::default();
        self.tracking = true;
        if let Some(td) = self.tracking_domain {
            self.tracking_domain_ok = true;
            self.enable_tracking_domain(td);
        }
    }

    /// Stop tracking.
    pub fn stop(&mut self) -> Result<(), PolicyError> {
        self.tracking = false;
        if let Some(td) = self.tracking_domain {
            self.backend
                .set_tracking(td, false)
                .map_err(|source| PolicyError::Domain { domain: td, source })?;
        }
        Ok(())
    }

    /// The guest-physical ranges dirtied by DMA since the last harvest (or since `start`).
    pub fn harvest(&mut self, xlate: &dyn IovaTranslator) -> Result<Harvest, PolicyError> {
        if !self.tracking {
            return Err(PolicyError::NotTracking);
        }
        let ranges: Vec<(u64, u64)> = self.mappings.iter().map(|(&s, &l)| (s, l)).collect();
        if self.has_unknown_scope() {
            // Rule 4: somebody may have written anywhere mapped.
            for &(s, l) in &ranges {
                self.pending.add_iova(xlate, s, l);
            }
        }
        if let (Some(td), true) = (self.tracking_domain, self.tracking_domain_ok) {
            // Rule 8: one mapped range at a time, each into a freshly zeroed bitmap. Even
            // when everything is dirty already, the read clears the domain's bits.
            for &(s, l) in &ranges {
                self.read_range(td, s, l, false, xlate);
            }
        }
        let mut h = std::mem::take(&mut self.pending);
        h.normalize();
        Ok(h)
    }
}
