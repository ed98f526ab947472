//! What the virtio-iommu knows, shared between its request queue (which changes it) and
//! the devices behind it (whose every DMA is translated through it): endpoints, domains
//! with their mappings and dirty bits, the fault records waiting for the event queue.
//!
//! A DMA holds the table's read lock from its translation until its bytes have landed and
//! its dirty bits are set; ATTACH, DETACH, MAP and UNMAP take the write lock. So a DMA
//! racing the UNMAP of its own mapping either lands first (and is logged, by GPA in the
//! migration's log and by IOVA in the domain's bits) or finds the mapping gone and
//! faults: there is no third outcome (DESIGN.md rule 6, done exactly for emulated
//! devices).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use vmm_sys_util::eventfd::EventFd;

use super::dirty::DirtyPages;
use super::domain::{DmaFault, IovaDomain};

/// Fault reasons (virtio 1.2 §5.13.6.9).
pub const FAULT_R_UNKNOWN: u8 = 0;
pub const FAULT_R_DOMAIN: u8 = 1;
pub const FAULT_R_MAPPING: u8 = 2;
/// Fault flags.
pub const FAULT_F_READ: u32 = 1 << 0;
pub const FAULT_F_WRITE: u32 = 1 << 1;
pub const FAULT_F_ADDRESS: u32 = 1 << 8;

/// Fault records kept while the driver has no event buffer posted; later ones are counted
/// and dropped (the spec lets a device drop them).
pub(crate) const MAX_PENDING_FAULTS: usize = 256;

/// One fault record, as the event queue carries it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FaultRecord {
    pub reason: u8,
    pub flags: u32,
    pub endpoint: u32,
    pub address: u64,
}

impl FaultRecord {
    /// The 24 bytes of `struct virtio_iommu_fault`.
    pub fn bytes(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[0] = self.reason;
        b[4..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..12].copy_from_slice(&self.endpoint.to_le_bytes());
        b[16..24].copy_from_slice(&self.address.to_le_bytes());
        b
    }
}

/// An endpoint (a PCI function behind the vIOMMU, by its BDF).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub domain: Option<u32>,
    /// Every write the device makes goes through this table (so it can be recorded).
    pub trackable: bool,
}

/// A domain: its mappings, whether it is a bypass domain, its endpoints, and its dirty
/// bits while the guest tracks it.
#[derive(Debug, Default)]
pub struct Domain {
    pub mappings: IovaDomain,
    pub bypass: bool,
    pub endpoints: BTreeSet<u32>,
    pub dirty: Option<DirtyPages>,
}

/// Everything the request queue changes.
#[derive(Debug, Default)]
pub struct Tables {
    /// The config space's `bypass` byte: unattached endpoints reach guest RAM directly.
    pub bypass: bool,
    pub endpoints: BTreeMap<u32, Endpoint>,
    pub domains: BTreeMap<u32, Domain>,
}

/// Marks guest-physical ranges dirty in the migration's log (the vmm's DMA log).
pub type GpaMarker = Box<dyn Fn(u64, u64) + Send + Sync>;

/// An endpoint whose device lives elsewhere (a vfio-user process) and reaches guest RAM
/// only through mappings it is given: the table tells it of every mapping its domain
/// gains or loses, under the table's write lock, so a harvest holding the read lock sees
/// the device's mappings and the table agree. Such a device's writes reach the migration
/// through its own log (read in `unmap` before a mapping goes), never the guest's nested
/// bitmaps, and it has no bypass: unattached it reaches nothing.
pub trait ExternalEndpoint: Send + Sync {
    /// `[iova, iova + len)` now maps guest-physical `gpa`.
    fn map(&self, iova: u64, len: u64, gpa: u64, writable: bool);
    /// `[iova, iova + len)`, mapping `gpa`, is going away: what the device wrote there
    /// must reach the migration before it returns.
    fn unmap(&self, iova: u64, len: u64, gpa: u64, writable: bool);
}

/// The shared table. See the module comment for the locking rule.
pub struct IommuTable {
    tables: RwLock<Tables>,
    faults: Mutex<VecDeque<FaultRecord>>,
    faults_dropped: AtomicU64,
    /// Written when a fault is recorded: the device serves its event queue.
    fault_kick: Mutex<Option<EventFd>>,
    /// The VMM is tracking dirty pages for a migration.
    migration_tracking: AtomicBool,
    mark_gpa: Mutex<Option<GpaMarker>>,
    /// Pages made dirty by the footprint rules (DETACH, reset, untrackable harvest).
    footprint_pages: AtomicU64,
    /// Endpoints served by another process, told of their mappings.
    externals: RwLock<BTreeMap<u32, Arc<dyn ExternalEndpoint>>>,
}

impl std::fmt::Debug for IommuTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IommuTable").finish_non_exhaustive()
    }
}

/// A DMA's translation, valid while it lives (it holds the read lock): the guest-physical
/// runs, and where to record the write in the domain's dirty bits.
pub struct DmaWindow<'a> {
    guard: RwLockReadGuard<'a, Tables>,
    pub runs: Vec<(u64, u64)>,
    domain: Option<u32>,
}

impl DmaWindow<'_> {
    /// Records a write of `[iova, iova + len)` in the domain's dirty bits (if the guest
    /// tracks it). Call after the bytes landed.
    pub fn written(&self, iova: u64, len: u64) {
        if let Some(d) = self.domain.and_then(|d| self.guard.domains.get(&d)) {
            if let Some(bits) = &d.dirty {
                bits.mark(iova, len);
            }
        }
    }
}

impl Default for IommuTable {
    fn default() -> Self {
        Self::new()
    }
}

impl IommuTable {
    /// An empty table with `bypass` on (as after a system reset: a guest without a
    /// virtio-iommu driver still reaches its devices).
    pub fn new() -> IommuTable {
        IommuTable {
            tables: RwLock::new(Tables {
                bypass: true,
                ..Tables::default()
            }),
            faults: Mutex::new(VecDeque::new()),
            faults_dropped: AtomicU64::new(0),
            fault_kick: Mutex::new(None),
            migration_tracking: AtomicBool::new(false),
            mark_gpa: Mutex::new(None),
            footprint_pages: AtomicU64::new(0),
            externals: RwLock::new(BTreeMap::new()),
        }
    }

    /// Adds endpoint `id`, served by another process that `hooks` tells of its mappings.
    pub fn add_external_endpoint(&self, id: u32, hooks: Arc<dyn ExternalEndpoint>) {
        self.add_endpoint(id, true);
        self.externals
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, hooks);
    }

    pub fn is_external(&self, id: u32) -> bool {
        self.externals
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&id)
    }

    /// Tells the external endpoints of `domain` (or only `only`) of each of `maps`:
    /// `gained` true for new mappings, false for ones going away.
    pub(crate) fn tell_externals(
        &self,
        t: &Tables,
        domain: u32,
        only: Option<u32>,
        maps: &[super::domain::Mapping],
        gained: bool,
    ) {
        let ext = self.externals.read().unwrap_or_else(|p| p.into_inner());
        if ext.is_empty() {
            return;
        }
        let Some(d) = t.domains.get(&domain) else {
            return;
        };
        for ep in d.endpoints.iter().filter(|e| only.is_none_or(|o| o == **e)) {
            let Some(h) = ext.get(ep) else { continue };
            for m in maps {
                let w = m.flags & super::MAP_F_WRITE != 0;
                if gained {
                    h.map(m.virt_start, m.len(), m.phys_start, w);
                } else {
                    h.unmap(m.virt_start, m.len(), m.phys_start, w);
                }
            }
        }
    }

    /// After a restore: each external endpoint is given its domain's mappings.
    pub fn replay_externals(&self) {
        let t = self.read();
        for (id, e) in &t.endpoints {
            if let Some(d) = e.domain {
                let maps: Vec<_> = t
                    .domains
                    .get(&d)
                    .map(|d| d.mappings.mappings().cloned().collect())
                    .unwrap_or_default();
                self.tell_externals(&t, d, Some(*id), &maps, true);
            }
        }
    }

    pub fn read(&self) -> RwLockReadGuard<'_, Tables> {
        self.tables.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn write(&self) -> RwLockWriteGuard<'_, Tables> {
        self.tables.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds endpoint `id` (a device put behind the vIOMMU), unattached.
    pub fn add_endpoint(&self, id: u32, trackable: bool) {
        self.write().endpoints.insert(
            id,
            Endpoint {
                domain: None,
                trackable,
            },
        );
    }

    /// Where the footprint rules mark guest-physical pages (the VMM's DMA log).
    pub fn set_gpa_marker(&self, mark: GpaMarker) {
        *self.mark_gpa.lock().unwrap_or_else(|p| p.into_inner()) = Some(mark);
    }

    /// The eventfd written whenever a fault record waits (the device's event queue).
    pub fn set_fault_kick(&self, fd: Option<EventFd>) {
        *self.fault_kick.lock().unwrap_or_else(|p| p.into_inner()) = fd;
    }

    /// The VMM starts or stops tracking dirty pages for a migration.
    pub fn set_migration_tracking(&self, on: bool) {
        self.migration_tracking.store(on, Ordering::SeqCst);
    }

    pub fn migration_tracking(&self) -> bool {
        self.migration_tracking.load(Ordering::SeqCst)
    }

    /// Pages the footprint rules made dirty so far.
    pub fn footprint_pages(&self) -> u64 {
        self.footprint_pages.load(Ordering::Relaxed)
    }

    /// Marks `ranges` (guest-physical) dirty in the migration's log.
    pub(crate) fn mark_footprint(&self, ranges: &[(u64, u64)]) {
        if let Some(mark) = &*self.mark_gpa.lock().unwrap_or_else(|p| p.into_inner()) {
            for &(gpa, len) in ranges {
                mark(gpa, len);
                self.footprint_pages
                    .fetch_add(len.div_ceil(4096), Ordering::Relaxed);
            }
        }
    }

    /// The guest-physical ranges `domain` maps writable.
    pub(crate) fn footprint(tables: &Tables, domain: u32) -> Vec<(u64, u64)> {
        tables
            .domains
            .get(&domain)
            .map(|d| d.mappings.writable_footprint())
            .unwrap_or_default()
    }

    /// Rule 5 (seed 000): an endpoint leaves its domain (DETACH, device reset, unplug) while
    /// a migration tracks: what it may have written is dirty now, because afterwards
    /// nobody can say.
    pub(crate) fn endpoint_leaves(&self, tables: &Tables, domain: u32) {
        if self.migration_tracking() {
            self.mark_footprint(&Self::footprint(tables, domain));
        }
    }

    /// Whether endpoint `id` reaches guest RAM untranslated (unattached with `bypass` on,
    /// or in a bypass domain).
    pub(crate) fn in_bypass(t: &Tables, id: u32) -> bool {
        t.endpoints.get(&id).is_some_and(|e| match e.domain {
            None => t.bypass,
            Some(d) => t.domains.get(&d).is_some_and(|d| d.bypass),
        })
    }

    /// Rule 5 for an endpoint that cannot report its writes and is about to stop
    /// bypassing: nothing but all of RAM bounds what it wrote since the last harvest, so
    /// all of RAM is dirty now (not counted in [`Self::footprint_pages`]).
    pub(crate) fn bypass_ends(&self, t: &Tables, id: u32) {
        let untrackable = t.endpoints.get(&id).is_some_and(|e| !e.trackable);
        if untrackable && self.migration_tracking() && Self::in_bypass(t, id) {
            if let Some(mark) = &*self.mark_gpa.lock().unwrap_or_else(|p| p.into_inner()) {
                mark(0, u64::MAX);
            }
        }
    }

    /// The driver of endpoint `id`'s device reset it: rule 5 for its domain.
    pub fn endpoint_reset(&self, id: u32) {
        let t = self.read();
        self.bypass_ends(&t, id);
        if let Some(d) = t.endpoints.get(&id).and_then(|e| e.domain) {
            self.endpoint_leaves(&t, d);
        }
    }

    /// Rule 4 (seed 000): every harvest marks the whole writable footprint of every domain
    /// holding an endpoint that cannot report its writes. Returns the ranges marked.
    pub fn harvest_untrackable(&self) -> Vec<(u64, u64)> {
        let t = self.read();
        let mut ranges = Vec::new();
        for (id, d) in &t.domains {
            if d.endpoints
                .iter()
                .any(|e| t.endpoints.get(e).is_some_and(|e| !e.trackable))
            {
                ranges.extend(Self::footprint(&t, *id));
            }
        }
        // Unattached untrackable endpoints in bypass reach all of RAM: the VMM marks all.
        self.mark_footprint(&ranges);
        ranges
    }

    /// Whether an untrackable endpoint reaches guest RAM through bypass, unattached or in
    /// a bypass domain (then nothing but all of RAM bounds what it wrote).
    pub fn untrackable_in_bypass(&self) -> bool {
        let t = self.read();
        t.endpoints
            .iter()
            .any(|(id, e)| !e.trackable && Self::in_bypass(&t, *id))
    }

    /// Translates a DMA of endpoint `id`: `len` bytes at `iova`. A refusal is recorded
    /// for the event queue and nothing may be accessed.
    pub fn translate(
        &self,
        id: u32,
        iova: u64,
        len: u64,
        write: bool,
    ) -> Result<DmaWindow<'_>, DmaFault> {
        let guard = self.read();
        let flags = if write { FAULT_F_WRITE } else { FAULT_F_READ } | FAULT_F_ADDRESS;
        let fault = |reason: u8, address: u64| FaultRecord {
            reason,
            flags,
            endpoint: id,
            address,
        };
        let domain = guard.endpoints.get(&id).and_then(|e| e.domain);
        let result = match domain.map(|d| (d, guard.domains.get(&d))) {
            None if guard.bypass => Ok((vec![(iova, len)], None)),
            None | Some((_, None)) => {
                Err((DmaFault::Unmapped { iova }, fault(FAULT_R_DOMAIN, iova)))
            }
            Some((_, Some(d))) if d.bypass => Ok((vec![(iova, len)], None)),
            Some((id, Some(d))) => d
                .mappings
                .translate(iova, len, write)
                .map(|runs| (runs, Some(id)))
                .map_err(|f| {
                    let at = match f {
                        DmaFault::Unmapped { iova } | DmaFault::Permission { iova, .. } => iova,
                    };
                    (f, fault(FAULT_R_MAPPING, at))
                }),
        };
        match result {
            Ok((runs, domain)) => Ok(DmaWindow {
                guard,
                runs,
                domain,
            }),
            Err((f, record)) => {
                drop(guard);
                self.push_fault(record);
                Err(f)
            }
        }
    }

    fn push_fault(&self, record: FaultRecord) {
        {
            let mut q = self.faults.lock().unwrap_or_else(|p| p.into_inner());
            if q.len() >= MAX_PENDING_FAULTS {
                self.faults_dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            q.push_back(record);
        }
        if let Some(fd) = &*self.fault_kick.lock().unwrap_or_else(|p| p.into_inner()) {
            let _ = fd.write(1);
        }
    }

    /// The oldest fault record waiting, if any (the event queue takes it).
    pub fn pop_fault(&self) -> Option<FaultRecord> {
        self.faults
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front()
    }

    /// Puts back a record the event queue could not deliver.
    pub fn unpop_fault(&self, record: FaultRecord) {
        self.faults
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_front(record);
    }

    pub fn pending_faults(&self) -> Vec<FaultRecord> {
        self.faults
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .collect()
    }

    pub fn set_pending_faults(&self, records: Vec<FaultRecord>) {
        *self.faults.lock().unwrap_or_else(|p| p.into_inner()) = records.into();
    }

    pub fn faults_dropped(&self) -> u64 {
        self.faults_dropped.load(Ordering::Relaxed)
    }
}

/// A device's handle on its endpoint: what [`crate::guest_ram::GuestRam`] translates
/// through.
#[derive(Clone, Debug)]
pub struct IommuEndpoint {
    pub id: u32,
    pub table: Arc<IommuTable>,
}
