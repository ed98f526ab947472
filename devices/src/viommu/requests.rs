//! The request queue's requests (virtio 1.2 §5.13.6, and DIRTY_TRACKING.md): parsed from
//! the bytes the driver wrote, answered with the spec's status codes. Every byte comes
//! from the guest: a request too short, with reserved bytes set or unknown flags gets its
//! status, never a panic.

use super::domain::{DomainError, GRANULE};
use super::table::{IommuTable, Tables};
use super::{
    DOMAIN_RANGE, F_BYPASS_CONFIG, F_DIRTY_TRACKING, F_MMIO, INPUT_RANGE, MSI_RANGE, PROBE_SIZE,
};

pub const T_ATTACH: u8 = 1;
pub const T_DETACH: u8 = 2;
pub const T_MAP: u8 = 3;
pub const T_UNMAP: u8 = 4;
pub const T_PROBE: u8 = 5;
pub const T_SET_DIRTY_TRACKING: u8 = 0x10;
pub const T_GET_DIRTY_BITMAP: u8 = 0x11;

pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;
pub const S_DEVERR: u8 = 3;
pub const S_INVAL: u8 = 4;
pub const S_RANGE: u8 = 5;
pub const S_NOENT: u8 = 6;
pub const S_FAULT: u8 = 7;
pub const S_NOMEM: u8 = 8;

pub const ATTACH_F_BYPASS: u32 = 1 << 0;
pub const DIRTY_TRACKING_F_ENABLE: u32 = 1 << 0;
pub const DIRTY_BITMAP_F_NO_CLEAR: u32 = 1 << 0;

pub const PROBE_T_RESV_MEM: u16 = 1;
pub const PROBE_T_DIRTY_TRACKING: u16 = 0x10;
pub const RESV_MEM_T_MSI: u8 = 1;
pub const PROBE_DIRTY_F_TRACKABLE: u32 = 1 << 0;

/// Largest bitmap one GET_DIRTY_BITMAP may ask for, in pages.
pub const MAX_BITMAP_PAGES: u64 = 1 << 24;
/// Mappings one domain may hold: past this a MAP gets NOMEM (a guest cannot make the VMM
/// grow without bound).
pub const MAX_MAPPINGS: usize = 1 << 20;
/// Domains at most (NOMEM past it).
pub const MAX_DOMAINS: usize = 1 << 16;

/// Bytes of the device-readable part each request needs (head included, tail excluded).
pub fn readable_size(kind: u8) -> Option<usize> {
    Some(match kind {
        T_ATTACH | T_DETACH => 20,
        T_MAP => 36,
        T_UNMAP => 28,
        T_PROBE => 72,
        T_SET_DIRTY_TRACKING => 16,
        T_GET_DIRTY_BITMAP => 40,
        _ => return None,
    })
}

/// What the device writes back: the payload (PROBE properties, a dirty bitmap) at the
/// start of the device-writable part, and the status in the tail.
#[derive(Debug, PartialEq, Eq)]
pub struct Reply {
    pub status: u8,
    pub payload: Vec<u8>,
}

impl Reply {
    fn status(status: u8) -> Reply {
        Reply {
            status,
            payload: Vec::new(),
        }
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap_or([0; 4]))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]))
}

fn zero(b: &[u8]) -> bool {
    b.iter().all(|x| *x == 0)
}

/// Whether `domain` holds an endpoint that cannot report its writes.
fn holds_untrackable(t: &Tables, domain: u32) -> bool {
    t.domains.get(&domain).is_some_and(|d| {
        d.endpoints
            .iter()
            .any(|e| t.endpoints.get(e).is_some_and(|e| !e.trackable))
    })
}

/// Whether `domain` holds an endpoint whose writes the guest's nested bitmaps cannot show
/// (untrackable, or served by another process).
fn holds_unreported(table: &IommuTable, t: &Tables, domain: u32) -> bool {
    holds_untrackable(t, domain)
        || t.domains
            .get(&domain)
            .is_some_and(|d| d.endpoints.iter().any(|e| table.is_external(*e)))
}

fn domain_status(e: DomainError) -> u8 {
    match e {
        DomainError::Inval(_) => S_INVAL,
        DomainError::Range(_) => S_RANGE,
    }
}

/// Answers one request. `req` is the device-readable part (at least
/// [`readable_size`] bytes, checked by the caller: a shorter one is INVAL there);
/// `writable` the bytes the device may write, tail included; `features` the negotiated
/// features.
///
/// `None` for a request type the device does not know (or the extension's requests when
/// it was not negotiated): the spec's answer is nothing written and a used length of 0.
pub fn serve(table: &IommuTable, req: &[u8], writable: usize, features: u64) -> Option<Reply> {
    let kind = *req.first()?;
    let need = readable_size(kind)?;
    let dirty_on = features & (1 << F_DIRTY_TRACKING) != 0;
    if matches!(kind, T_SET_DIRTY_TRACKING | T_GET_DIRTY_BITMAP) && !dirty_on {
        return None;
    }
    if req.len() < need {
        return Some(Reply::status(S_INVAL));
    }
    // The head's reserved bytes.
    if !zero(&req[1..4]) {
        return Some(Reply::status(S_INVAL));
    }
    Some(match kind {
        T_ATTACH => attach(table, req, features),
        T_DETACH => detach(table, req),
        T_MAP => map(table, req, features),
        T_UNMAP => unmap(table, req),
        T_PROBE => probe(table, req, writable, dirty_on),
        T_SET_DIRTY_TRACKING => set_dirty_tracking(table, req),
        T_GET_DIRTY_BITMAP => get_dirty_bitmap(table, req, writable),
        _ => Reply::status(S_UNSUPP),
    })
}

fn attach(table: &IommuTable, req: &[u8], features: u64) -> Reply {
    let (domain, endpoint, flags) = (u32_at(req, 4), u32_at(req, 8), u32_at(req, 12));
    let bypass_allowed = features & (1 << F_BYPASS_CONFIG) != 0;
    let known = if bypass_allowed { ATTACH_F_BYPASS } else { 0 };
    if flags & !known != 0 || !zero(&req[16..20]) {
        return Reply::status(S_INVAL);
    }
    let bypass = flags & ATTACH_F_BYPASS != 0;
    if !DOMAIN_RANGE.contains(&domain) {
        return Reply::status(S_RANGE);
    }
    let mut t = table.write();
    let Some(ep) = t.endpoints.get(&endpoint).cloned() else {
        return Reply::status(S_NOENT);
    };
    if let Some(d) = t.domains.get(&domain) {
        if d.bypass != bypass {
            return Reply::status(S_INVAL);
        }
        // Seed 004: dirty tracking is the domain's property; it refuses an endpoint that
        // cannot report its writes.
        if d.dirty.is_some() && (!ep.trackable || table.is_external(endpoint)) {
            return Reply::status(S_UNSUPP);
        }
    } else if t.domains.len() >= MAX_DOMAINS {
        return Reply::status(S_NOMEM);
    }
    if ep.domain == Some(domain) {
        return Reply::status(S_OK);
    }
    // Attached elsewhere: an implicit DETACH first (the spec allows it), which leaves
    // bypass if the old domain was one; unattached, it leaves `bypass` now.
    if ep.domain.is_none() {
        table.bypass_ends(&t, endpoint);
    }
    if let Some(old) = ep.domain {
        leave(table, &mut t, endpoint, old);
    }
    let d = t.domains.entry(domain).or_default();
    d.bypass = bypass;
    d.endpoints.insert(endpoint);
    let maps: Vec<_> = d.mappings.mappings().cloned().collect();
    if let Some(e) = t.endpoints.get_mut(&endpoint) {
        e.domain = Some(domain);
    }
    table.tell_externals(&t, domain, Some(endpoint), &maps, true);
    Reply::status(S_OK)
}

/// `endpoint` leaves `domain`: its footprint is dirty if a migration tracks (rule 5), and
/// a domain without endpoints is gone (with its mappings and dirty bits).
fn leave(table: &IommuTable, t: &mut Tables, endpoint: u32, domain: u32) {
    let maps: Vec<_> = t
        .domains
        .get(&domain)
        .map(|d| d.mappings.mappings().cloned().collect())
        .unwrap_or_default();
    table.tell_externals(t, domain, Some(endpoint), &maps, false);
    table.endpoint_leaves(t, domain);
    table.bypass_ends(t, endpoint);
    if let Some(e) = t.endpoints.get_mut(&endpoint) {
        e.domain = None;
    }
    let empty = t.domains.get_mut(&domain).is_some_and(|d| {
        d.endpoints.remove(&endpoint);
        d.endpoints.is_empty()
    });
    if empty {
        t.domains.remove(&domain);
    }
}

fn detach(table: &IommuTable, req: &[u8]) -> Reply {
    let (domain, endpoint) = (u32_at(req, 4), u32_at(req, 8));
    if !zero(&req[12..20]) {
        return Reply::status(S_INVAL);
    }
    let mut t = table.write();
    let Some(ep) = t.endpoints.get(&endpoint) else {
        return Reply::status(S_NOENT);
    };
    if !t.domains.contains_key(&domain) {
        return Reply::status(S_NOENT);
    }
    if ep.domain != Some(domain) {
        return Reply::status(S_INVAL);
    }
    leave(table, &mut t, endpoint, domain);
    Reply::status(S_OK)
}

/// IOVAs no mapping may cover, whatever the domain: MAP refuses them, and so does a
/// migrated state that holds them.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum ReservedIova {
    /// Past the input range the config space announces.
    OutsideInput,
    /// The MSI doorbell window, reserved (PROBE says so).
    OverMsi,
}

impl ReservedIova {
    pub(super) fn of(virt_start: u64, virt_end: u64) -> Option<ReservedIova> {
        if virt_start < *INPUT_RANGE.start() || virt_end > *INPUT_RANGE.end() {
            Some(ReservedIova::OutsideInput)
        } else if virt_start <= *MSI_RANGE.end() && virt_end >= *MSI_RANGE.start() {
            Some(ReservedIova::OverMsi)
        } else {
            None
        }
    }

    /// MAP's answer.
    fn status(&self) -> u8 {
        match self {
            ReservedIova::OutsideInput => S_RANGE,
            ReservedIova::OverMsi => S_INVAL,
        }
    }
}

impl std::fmt::Display for ReservedIova {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReservedIova::OutsideInput => write!(f, "is outside the input range {INPUT_RANGE:x?}"),
            ReservedIova::OverMsi => write!(f, "covers the MSI window {MSI_RANGE:x?}"),
        }
    }
}

fn map(table: &IommuTable, req: &[u8], features: u64) -> Reply {
    let domain = u32_at(req, 4);
    let (virt_start, virt_end, phys_start) = (u64_at(req, 8), u64_at(req, 16), u64_at(req, 24));
    let flags = u32_at(req, 32);
    let mut t = table.write();
    let Some(d) = t.domains.get_mut(&domain) else {
        return Reply::status(S_NOENT);
    };
    if d.bypass {
        return Reply::status(S_INVAL);
    }
    if let Some(r) = ReservedIova::of(virt_start, virt_end) {
        return Reply::status(r.status());
    }
    if d.mappings.count() >= MAX_MAPPINGS {
        return Reply::status(S_NOMEM);
    }
    let mmio = features & (1 << F_MMIO) != 0;
    match d
        .mappings
        .map(virt_start, virt_end, phys_start, flags, mmio)
    {
        Ok(()) => {
            let added = super::domain::Mapping {
                virt_start,
                virt_end,
                phys_start,
                flags,
            };
            table.tell_externals(&t, domain, None, &[added], true);
            Reply::status(S_OK)
        }
        Err(e) => Reply::status(domain_status(e)),
    }
}

fn unmap(table: &IommuTable, req: &[u8]) -> Reply {
    let domain = u32_at(req, 4);
    let (virt_start, virt_end) = (u64_at(req, 8), u64_at(req, 16));
    if !zero(&req[24..28]) {
        return Reply::status(S_INVAL);
    }
    let mut t = table.write();
    let untrackable = holds_untrackable(&t, domain);
    let Some(d) = t.domains.get(&domain) else {
        return Reply::status(S_NOENT);
    };
    if d.bypass {
        return Reply::status(S_INVAL);
    }
    // Rule 6 for devices in other processes: their logs are read while the mappings
    // still translate, then the mappings leave the devices.
    let overlapping = d
        .mappings
        .mappings()
        .filter(|m| m.virt_start <= virt_end && m.virt_end >= virt_start);
    let (going, split): (Vec<_>, Vec<_>) = overlapping
        .cloned()
        .partition(|m| m.virt_start >= virt_start && m.virt_end <= virt_end);
    if split.is_empty() {
        // (A range that would split a mapping removes nothing: the UNMAP below fails.)
        table.tell_externals(&t, domain, None, &going, false);
    }
    let Some(d) = t.domains.get_mut(&domain) else {
        return Reply::status(S_NOENT);
    };
    let removed = match d.mappings.unmap(virt_start, virt_end) {
        Ok(r) => r,
        Err(e) => return Reply::status(domain_status(e)),
    };
    // Seed 001: what follows is about what was removed, not what was asked.
    for m in &removed {
        if let Some(bits) = &d.dirty {
            bits.forget(m.virt_start, m.virt_end);
        }
    }
    // Rule 6: the range's dirty state reaches the migration before the mapping goes. An
    // emulated device's writes are in the log already (they held the read lock this
    // write lock waited for); a device that cannot report makes the range dirty.
    if untrackable && table.migration_tracking() {
        let ranges: Vec<(u64, u64)> = removed
            .iter()
            .filter(|m| m.flags & super::MAP_F_WRITE != 0)
            .map(|m| (m.phys_start, m.len()))
            .collect();
        table.mark_footprint(&ranges);
    }
    Reply::status(S_OK)
}

fn probe(table: &IommuTable, req: &[u8], writable: usize, dirty_on: bool) -> Reply {
    let endpoint = u32_at(req, 4);
    if !zero(&req[8..72]) {
        return Reply::status(S_INVAL);
    }
    if writable < PROBE_SIZE as usize + 4 {
        return Reply::status(S_INVAL);
    }
    let t = table.read();
    let Some(ep) = t.endpoints.get(&endpoint) else {
        return Reply::status(S_NOENT);
    };
    let mut p = Vec::with_capacity(PROBE_SIZE as usize);
    // RESV_MEM, MSI: the x86 interrupt doorbell.
    p.extend_from_slice(&PROBE_T_RESV_MEM.to_le_bytes());
    p.extend_from_slice(&20u16.to_le_bytes());
    p.extend_from_slice(&[RESV_MEM_T_MSI, 0, 0, 0]);
    p.extend_from_slice(&MSI_RANGE.start().to_le_bytes());
    p.extend_from_slice(&MSI_RANGE.end().to_le_bytes());
    if dirty_on {
        p.extend_from_slice(&PROBE_T_DIRTY_TRACKING.to_le_bytes());
        p.extend_from_slice(&8u16.to_le_bytes());
        let flags = if ep.trackable {
            PROBE_DIRTY_F_TRACKABLE
        } else {
            0
        };
        p.extend_from_slice(&flags.to_le_bytes());
        p.extend_from_slice(&0u32.to_le_bytes());
    }
    p.resize(PROBE_SIZE as usize, 0);
    Reply {
        status: S_OK,
        payload: p,
    }
}

fn set_dirty_tracking(table: &IommuTable, req: &[u8]) -> Reply {
    let (domain, flags) = (u32_at(req, 4), u32_at(req, 8));
    if flags & !DIRTY_TRACKING_F_ENABLE != 0 || !zero(&req[12..16]) {
        return Reply::status(S_INVAL);
    }
    let mut t = table.write();
    let untrackable = holds_unreported(table, &t, domain);
    let Some(d) = t.domains.get_mut(&domain) else {
        return Reply::status(S_NOENT);
    };
    if flags & DIRTY_TRACKING_F_ENABLE != 0 {
        // A bypass domain translates nothing, so it has no IOVA pages to report.
        if untrackable || d.bypass {
            return Reply::status(S_UNSUPP);
        }
        if d.dirty.is_none() {
            d.dirty = Some(Default::default());
        }
    } else {
        d.dirty = None;
    }
    Reply::status(S_OK)
}

fn get_dirty_bitmap(table: &IommuTable, req: &[u8], writable: usize) -> Reply {
    let (domain, flags) = (u32_at(req, 4), u32_at(req, 8));
    let (iova, length, page_size) = (u64_at(req, 16), u64_at(req, 24), u64_at(req, 32));
    if flags & !DIRTY_BITMAP_F_NO_CLEAR != 0 || !zero(&req[12..16]) {
        return Reply::status(S_INVAL);
    }
    let t = table.read();
    let Some(d) = t.domains.get(&domain) else {
        return Reply::status(S_NOENT);
    };
    let Some(bits) = &d.dirty else {
        return Reply::status(S_INVAL);
    };
    let range_ok = page_size.is_power_of_two()
        && page_size >= GRANULE
        && length > 0
        && iova.is_multiple_of(page_size)
        && length.is_multiple_of(page_size)
        && iova.checked_add(length - 1).is_some()
        && length / page_size <= MAX_BITMAP_PAGES;
    if !range_ok {
        return Reply::status(S_RANGE);
    }
    let words = (length / page_size).div_ceil(64) as usize;
    if writable < words * 8 + 4 {
        return Reply::status(S_INVAL);
    }
    let bitmap = bits.read(
        iova,
        length,
        page_size,
        flags & DIRTY_BITMAP_F_NO_CLEAR != 0,
    );
    Reply {
        status: S_OK,
        payload: bitmap.iter().flat_map(|w| w.to_le_bytes()).collect(),
    }
}
