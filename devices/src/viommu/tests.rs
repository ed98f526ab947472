//! The virtio-iommu request by request (virtio 1.2 §5.13.6 and DIRTY_TRACKING.md), each
//! request built byte by byte as a driver builds it, and the rules DESIGN.md takes from
//! the kernel discussions (4 to 8) for the DMA of the devices behind it, through a
//! `GuestRam` over real guest memory; then the device through its queues in guest RAM, and
//! the fuzz harness over generated inputs.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::fuzzing::{self, Ring};
use super::*;
use crate::guest_ram::{DmaError, GuestRam};
use crate::virtio::fuzzing::{temp_disk, testing, Prng};
use crate::virtio::VirtioDevice;

const P: u64 = GRANULE;
const RW: u32 = MAP_F_READ | MAP_F_WRITE;
const ENABLE: u32 = DIRTY_TRACKING_F_ENABLE;
const NO_CLEAR: u32 = DIRTY_BITMAP_F_NO_CLEAR;
/// What a driver of Ferry's device negotiates (the transport's bits aside).
const FEATURES: u64 =
    1 << F_MAP_UNMAP | 1 << F_PROBE | 1 << F_MMIO | 1 << F_BYPASS_CONFIG | 1 << F_DIRTY_TRACKING;

// Requests, as a driver lays them out (virtio 1.2 §5.13.6, DIRTY_TRACKING.md).

fn head(kind: u8, len: usize) -> Vec<u8> {
    let mut r = vec![0u8; len];
    r[0] = kind;
    r
}

fn le32(r: &mut [u8], at: usize, v: u32) {
    r[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn le64(r: &mut [u8], at: usize, v: u64) {
    r[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn attach(domain: u32, endpoint: u32, flags: u32) -> Vec<u8> {
    let mut r = head(T_ATTACH, 20);
    le32(&mut r, 4, domain);
    le32(&mut r, 8, endpoint);
    le32(&mut r, 12, flags);
    r
}

fn detach(domain: u32, endpoint: u32) -> Vec<u8> {
    let mut r = head(T_DETACH, 20);
    le32(&mut r, 4, domain);
    le32(&mut r, 8, endpoint);
    r
}

fn map(domain: u32, virt_start: u64, virt_end: u64, phys_start: u64, flags: u32) -> Vec<u8> {
    let mut r = head(T_MAP, 36);
    le32(&mut r, 4, domain);
    le64(&mut r, 8, virt_start);
    le64(&mut r, 16, virt_end);
    le64(&mut r, 24, phys_start);
    le32(&mut r, 32, flags);
    r
}

fn unmap(domain: u32, virt_start: u64, virt_end: u64) -> Vec<u8> {
    let mut r = head(T_UNMAP, 28);
    le32(&mut r, 4, domain);
    le64(&mut r, 8, virt_start);
    le64(&mut r, 16, virt_end);
    r
}

fn probe(endpoint: u32) -> Vec<u8> {
    let mut r = head(T_PROBE, 72);
    le32(&mut r, 4, endpoint);
    r
}

fn set_tracking(domain: u32, flags: u32) -> Vec<u8> {
    let mut r = head(T_SET_DIRTY_TRACKING, 16);
    le32(&mut r, 4, domain);
    le32(&mut r, 8, flags);
    r
}

fn get_bitmap(domain: u32, flags: u32, iova: u64, length: u64, page_size: u64) -> Vec<u8> {
    let mut r = head(T_GET_DIRTY_BITMAP, 40);
    le32(&mut r, 4, domain);
    le32(&mut r, 8, flags);
    le64(&mut r, 16, iova);
    le64(&mut r, 24, length);
    le64(&mut r, 32, page_size);
    r
}

/// The device-writable bytes a driver gives `req`: the tail, PROBE's properties, the
/// bitmap.
fn writable_for(req: &[u8]) -> usize {
    match req[0] {
        T_PROBE => PROBE_SIZE as usize + 4,
        T_GET_DIRTY_BITMAP => {
            let at = |i: usize| u64::from_le_bytes(req[i..i + 8].try_into().unwrap());
            let (length, page_size) = (at(24), at(32));
            let units = length.checked_div(page_size).unwrap_or(0);
            (units.div_ceil(64) as usize).min(1 << 22) * 8 + 4
        }
        _ => 4,
    }
}

fn dirty_pages(ram: &GuestRam) -> Vec<u64> {
    let mut out = vec![];
    for r in ram.logged_memory().iter() {
        for p in 0..r.len() / P {
            if r.bitmap().dirty_at((p * P) as usize) {
                out.push(r.start_addr().0 + p * P);
            }
        }
    }
    out
}

fn clean(ram: &GuestRam) {
    for r in ram.logged_memory().iter() {
        std::ops::Deref::deref(r).bitmap().reset();
    }
}

fn record(reason: u8, flags: u32, endpoint: u32, address: u64) -> FaultRecord {
    FaultRecord {
        reason,
        flags,
        endpoint,
        address,
    }
}

/// A VM's side of the vIOMMU: its table with endpoints, guest RAM (1 MiB at 0 and at
/// 2 MiB, the hole between) with the vIOMMU's DMA log apart, and the ranges the footprint
/// rules marked.
struct Vm {
    table: Arc<IommuTable>,
    /// The VM's RAM, as the vIOMMU device itself writes it.
    ram: GuestRam,
    /// The same RAM with the log of what devices behind the vIOMMU write.
    dma: GuestRam,
    marked: Arc<Mutex<Vec<(u64, u64)>>>,
    features: u64,
}

impl Vm {
    fn new(endpoints: &[(u32, bool)]) -> Vm {
        let ram = testing::ram();
        let dma = ram.with_own_log();
        let table = Arc::new(IommuTable::new());
        for &(id, trackable) in endpoints {
            table.add_endpoint(id, trackable);
        }
        let marked = Arc::new(Mutex::new(vec![]));
        let (m, log) = (marked.clone(), dma.clone());
        table.set_gpa_marker(Box::new(move |gpa, len| {
            m.lock().unwrap().push((gpa, len));
            log.mark_gpa_range(gpa, len);
        }));
        Vm {
            table,
            ram,
            dma,
            marked,
            features: FEATURES,
        }
    }

    fn reply(&self, req: &[u8], writable: usize) -> Option<Reply> {
        serve(&self.table, req, writable, self.features)
    }

    fn status(&self, req: &[u8]) -> u8 {
        self.reply(req, writable_for(req))
            .expect("a known request")
            .status
    }

    #[track_caller]
    fn ok(&self, req: &[u8]) {
        assert_eq!(self.status(req), S_OK, "{req:02x?}");
    }

    /// The DMA of the device behind endpoint `id`.
    fn endpoint(&self, id: u32) -> GuestRam {
        self.dma.behind_iommu(IommuEndpoint {
            id,
            table: self.table.clone(),
        })
    }

    /// The ranges marked since the last call.
    fn marked(&self) -> Vec<(u64, u64)> {
        std::mem::take(&mut *self.marked.lock().unwrap())
    }

    /// Pages in the vIOMMU's DMA log.
    fn dirty(&self) -> Vec<u64> {
        dirty_pages(&self.dma)
    }

    fn clean(&self) {
        clean(&self.dma);
    }

    fn mappings(&self, domain: u32) -> Vec<Mapping> {
        self.table
            .read()
            .domains
            .get(&domain)
            .map(|d| d.mappings.mappings().copied().collect())
            .unwrap_or_default()
    }

    fn domain_of(&self, endpoint: u32) -> Option<u32> {
        self.table.read().endpoints[&endpoint].domain
    }

    fn has_domain(&self, domain: u32) -> bool {
        self.table.read().domains.contains_key(&domain)
    }

    /// GET_DIRTY_BITMAP: the status and the bitmap's words.
    fn bitmap(
        &self,
        domain: u32,
        iova: u64,
        length: u64,
        page_size: u64,
        flags: u32,
    ) -> (u8, Vec<u64>) {
        let r = get_bitmap(domain, flags, iova, length, page_size);
        let reply = self.reply(&r, writable_for(&r)).expect("answered");
        let words = reply
            .payload
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        (reply.status, words)
    }

    /// The IOVA pages whose bits are set in `[0, pages * P)` of `domain` (not cleared).
    fn bits(&self, domain: u32, pages: u64) -> BTreeSet<u64> {
        let (status, words) = self.bitmap(domain, 0, pages * P, P, NO_CLEAR);
        assert_eq!(status, S_OK);
        (0..pages)
            .filter(|p| words[(p / 64) as usize] >> (p % 64) & 1 == 1)
            .collect()
    }

    /// The fault records waiting, taken.
    fn faults(&self) -> Vec<FaultRecord> {
        std::iter::from_fn(|| self.table.pop_fault()).collect()
    }

    fn bytes(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.ram.read(gpa, &mut b).unwrap();
        b
    }
}

const ALL_TYPES: [u8; 7] = [
    T_ATTACH,
    T_DETACH,
    T_MAP,
    T_UNMAP,
    T_PROBE,
    T_SET_DIRTY_TRACKING,
    T_GET_DIRTY_BITMAP,
];

#[test]
fn unknown_types_are_not_answered_and_short_requests_are_inval() {
    let vm = Vm::new(&[(1, true)]);
    for kind in [0u8, 6, 7, 0x0f, 0x12, 0x20, 0x80, 0xff] {
        assert_eq!(vm.reply(&head(kind, 128), 4), None, "type {kind:#x}");
    }
    assert_eq!(vm.reply(&[], 4), None, "no head at all");
    // The extension's requests are unknown unless its feature was negotiated.
    let without = FEATURES & !(1 << F_DIRTY_TRACKING);
    for r in [set_tracking(1, ENABLE), get_bitmap(1, 0, 0, P, P)] {
        assert_eq!(serve(&vm.table, &r, 12, without), None);
    }
    for kind in ALL_TYPES {
        let need = readable_size(kind).unwrap();
        for len in [1, 4, need / 2, need - 1] {
            let reply = vm.reply(&head(kind, len), 4096).unwrap();
            assert_eq!(reply.status, S_INVAL, "type {kind:#x} in {len} bytes");
            assert_eq!(reply.payload, Vec::<u8>::new());
        }
        for at in 1..4 {
            let mut r = head(kind, need);
            r[at] = 0x80;
            assert_eq!(
                vm.reply(&r, 4096).unwrap().status,
                S_INVAL,
                "type {kind:#x}, head reserved byte {at}"
            );
        }
    }
    // A complete ATTACH cut short by one byte is refused, changing nothing.
    assert_eq!(vm.status(&attach(1, 1, 0)[..19]), S_INVAL);
    assert!(vm.table.read().domains.is_empty());
    // Longer than its type needs: the rest is not looked at.
    let mut r = attach(1, 1, 0);
    r.extend([0xff; 40]);
    vm.ok(&r);
    assert_eq!(vm.domain_of(1), Some(1));
}

#[test]
fn attach_follows_the_spec() {
    let vm = Vm::new(&[(1, true), (2, true), (3, true)]);
    for at in 16..20 {
        let mut r = attach(1, 1, 0);
        r[at] = 1;
        assert_eq!(vm.status(&r), S_INVAL, "reserved byte {at}");
    }
    for flags in [1 << 1, 1 << 31, ATTACH_F_BYPASS | 1 << 4] {
        assert_eq!(vm.status(&attach(1, 1, flags)), S_INVAL, "flags {flags:#x}");
    }
    // ATTACH_F_BYPASS is a flag of BYPASS_CONFIG.
    let r = attach(1, 1, ATTACH_F_BYPASS);
    let without = FEATURES & !(1 << F_BYPASS_CONFIG);
    assert_eq!(serve(&vm.table, &r, 4, without).unwrap().status, S_INVAL);
    for domain in [0, *DOMAIN_RANGE.end() + 1, u32::MAX] {
        assert_eq!(
            vm.status(&attach(domain, 1, 0)),
            S_RANGE,
            "domain {domain:#x}"
        );
    }
    assert_eq!(vm.status(&attach(1, 77, 0)), S_NOENT);
    assert!(
        vm.table.read().domains.is_empty(),
        "a refused ATTACH made a domain"
    );
    assert_eq!(vm.domain_of(1), None);

    vm.ok(&attach(1, 1, 0));
    vm.ok(&map(1, 0, P - 1, 0x4_0000, RW));
    vm.ok(&attach(1, 1, 0));
    assert_eq!(vm.mappings(1).len(), 1, "attaching again changes nothing");
    // A bypass domain and a mapping one do not mix.
    assert_eq!(vm.status(&attach(1, 2, ATTACH_F_BYPASS)), S_INVAL);
    assert_eq!(vm.domain_of(2), None);
    vm.ok(&attach(5, 2, ATTACH_F_BYPASS));
    assert_eq!(vm.status(&attach(5, 3, 0)), S_INVAL);
    assert_eq!(vm.domain_of(3), None);
    vm.ok(&attach(5, 3, ATTACH_F_BYPASS));
    // Elsewhere is a DETACH first: domain 1 loses its last endpoint and dies with its
    // mapping...
    vm.ok(&attach(2, 1, 0));
    assert_eq!(vm.domain_of(1), Some(2));
    assert!(!vm.has_domain(1));
    // ...and its ID makes a new domain.
    vm.ok(&attach(1, 1, 0));
    assert_eq!(vm.mappings(1), vec![]);
    assert!(!vm.has_domain(2));
    // A domain with endpoints left lives on.
    vm.ok(&attach(1, 2, 0));
    assert_eq!(vm.table.read().domains[&5].endpoints, BTreeSet::from([3]));
    assert_eq!(
        vm.table.read().domains[&1].endpoints,
        BTreeSet::from([1, 2])
    );
}

#[test]
fn detach_follows_the_spec() {
    let vm = Vm::new(&[(1, true), (2, true), (3, true)]);
    vm.ok(&attach(1, 1, 0));
    vm.ok(&attach(1, 2, 0));
    vm.ok(&attach(2, 3, 0));
    vm.ok(&map(1, 0, P - 1, 0x4_0000, RW));
    for at in 12..20 {
        let mut r = detach(1, 1);
        r[at] = 1;
        assert_eq!(vm.status(&r), S_INVAL, "reserved byte {at}");
    }
    assert_eq!(vm.status(&detach(1, 77)), S_NOENT, "unknown endpoint");
    assert_eq!(vm.status(&detach(9, 1)), S_NOENT, "unknown domain");
    assert_eq!(vm.status(&detach(2, 1)), S_INVAL, "not in that domain");
    assert_eq!(vm.domain_of(1), Some(1));
    vm.ok(&detach(1, 1));
    assert_eq!(vm.domain_of(1), None);
    assert_eq!(vm.mappings(1).len(), 1, "endpoint 2 keeps the domain");
    assert_eq!(vm.status(&detach(1, 1)), S_INVAL, "not attached any more");
    vm.ok(&detach(1, 2));
    assert!(!vm.has_domain(1), "the last endpoint took the domain along");
    assert_eq!(vm.status(&detach(1, 2)), S_NOENT);
    assert!(vm.has_domain(2));
}

#[test]
fn map_follows_the_spec() {
    let vm = Vm::new(&[(1, true), (2, true)]);
    assert_eq!(vm.status(&map(1, 0, P - 1, 0, RW)), S_NOENT);
    vm.ok(&attach(1, 1, 0));
    vm.ok(&attach(2, 2, ATTACH_F_BYPASS));
    assert_eq!(
        vm.status(&map(2, 0, P - 1, 0, RW)),
        S_INVAL,
        "bypass domain"
    );
    for flags in [1 << 3, 1 << 31, RW | 1 << 7] {
        assert_eq!(
            vm.status(&map(1, 0, P - 1, 0, flags)),
            S_INVAL,
            "flags {flags:#x}"
        );
    }
    // MMIO only with its feature.
    let mmio = map(1, P, 2 * P - 1, 0xfe00_0000, RW | MAP_F_MMIO);
    let without = FEATURES & !(1 << F_MMIO);
    assert_eq!(serve(&vm.table, &mmio, 4, without).unwrap().status, S_INVAL);
    vm.ok(&mmio);
    for (vs, ve, ps) in [
        (0x10_0001, 0x10_0fff, 0),
        (0x10_0000, 0x10_0ffe, 0),
        (0x10_0000, 0x10_1000, 0),
        (0x10_0000, 0x10_0fff, 0x800),
    ] {
        assert_eq!(
            vm.status(&map(1, vs, ve, ps, RW)),
            S_RANGE,
            "{vs:#x}-{ve:#x} -> {ps:#x}"
        );
    }
    assert_eq!(
        vm.status(&map(1, 0x20_0000, 0x1f_ffff, 0, RW)),
        S_INVAL,
        "reversed"
    );
    // Beyond the input range.
    let top = *INPUT_RANGE.end() + 1;
    for (vs, ve) in [(top, top + P - 1), (top - P, top + P - 1), (0, u64::MAX)] {
        assert_eq!(
            vm.status(&map(1, vs, ve, 0, RW)),
            S_RANGE,
            "{vs:#x}-{ve:#x}"
        );
    }
    vm.ok(&map(1, top - P, top - 1, 0x4_0000, RW));
    // The MSI window is reserved (PROBE says so).
    for (vs, ve) in [
        (0xfee0_0000, 0xfee0_0fff),
        (0xfeef_f000, 0xfef0_0fff),
        (0xfe00_0000, 0xffff_ffff),
    ] {
        assert_eq!(
            vm.status(&map(1, vs, ve, 0, RW)),
            S_INVAL,
            "{vs:#x}-{ve:#x}"
        );
    }
    vm.ok(&map(1, 0xfedf_f000, 0xfedf_ffff, 0x4_0000, RW));
    vm.ok(&map(1, 0xfef0_0000, 0xfef0_0fff, 0x4_0000, RW));
    // Overlaps.
    vm.ok(&map(1, 0x40_0000, 0x40_3fff, 0x4_0000, RW));
    for (vs, ve) in [
        (0x3f_f000, 0x40_0fff),
        (0x40_3000, 0x40_4fff),
        (0x40_1000, 0x40_1fff),
        (0x3f_0000, 0x40_ffff),
    ] {
        assert_eq!(
            vm.status(&map(1, vs, ve, 0, RW)),
            S_INVAL,
            "{vs:#x}-{ve:#x}"
        );
    }
    vm.ok(&map(1, 0x40_4000, 0x40_4fff, 0x8_0000, MAP_F_READ));
    let starts: Vec<u64> = vm.mappings(1).iter().map(|m| m.virt_start).collect();
    assert_eq!(
        starts,
        vec![P, 0x40_0000, 0x40_4000, 0xfedf_f000, 0xfef0_0000, top - P],
        "only what was accepted"
    );
    // DMA goes where the mappings say: PA = VA - virt_start + phys_start.
    let dev = vm.endpoint(1);
    dev.write(0x40_1ffc, &[1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
    assert_eq!(vm.bytes(0x4_1ffc, 8), vec![1, 2, 3, 4, 5, 6, 7, 8]);
    dev.write(top - 2, &[9, 9]).unwrap();
    assert_eq!(vm.bytes(0x4_0ffe, 2), vec![9, 9]);
}

#[test]
fn map_past_the_mapping_limit_is_nomem() {
    let vm = Vm::new(&[(1, true)]);
    vm.ok(&attach(1, 1, 0));
    {
        let mut t = vm.table.write();
        let d = t.domains.get_mut(&1).unwrap();
        for i in 0..MAX_MAPPINGS as u64 {
            let at = 0x1_0000_0000 + i * P;
            d.mappings
                .map(at, at + P - 1, 0, MAP_F_READ, false)
                .unwrap();
        }
    }
    assert_eq!(vm.status(&map(1, 0, P - 1, 0, RW)), S_NOMEM);
    vm.ok(&unmap(1, 0x1_0000_0000, 0x1_0000_0fff));
    vm.ok(&map(1, 0, P - 1, 0, RW));
}

#[test]
fn unmap_follows_the_spec() {
    let vm = Vm::new(&[(1, true), (2, true)]);
    assert_eq!(vm.status(&unmap(1, 0, P - 1)), S_NOENT);
    vm.ok(&attach(1, 1, 0));
    vm.ok(&attach(2, 2, ATTACH_F_BYPASS));
    assert_eq!(vm.status(&unmap(2, 0, P - 1)), S_INVAL, "bypass domain");
    for at in 24..28 {
        let mut r = unmap(1, 0, P - 1);
        r[at] = 1;
        assert_eq!(vm.status(&r), S_INVAL, "reserved byte {at}");
    }
    assert_eq!(vm.status(&unmap(1, 2 * P, P)), S_INVAL, "reversed");
    vm.ok(&map(1, 0x1_0000, 0x1_3fff, 0x4_0000, RW));
    vm.ok(&map(1, 0x1_4000, 0x1_7fff, 0x5_0000, RW));
    vm.ok(&map(1, 0x2_0000, 0x2_0fff, 0x6_0000, RW));
    let all = vm.mappings(1);
    // Splits remove nothing.
    assert_eq!(vm.status(&unmap(1, 0x1_0000, 0x1_1fff)), S_RANGE);
    assert_eq!(vm.status(&unmap(1, 0x1_2000, 0x1_5fff)), S_RANGE);
    assert_eq!(vm.status(&unmap(1, 0x1_5000, 0x2_ffff)), S_RANGE);
    assert_eq!(vm.mappings(1), all);
    // A range over a hole and a whole mapping; then the next one exactly.
    vm.ok(&unmap(1, 0, 0x1_3fff));
    assert_eq!(vm.mappings(1), all[1..].to_vec());
    vm.ok(&unmap(1, 0x1_4000, 0x1_7fff));
    // Nothing there: OK.
    vm.ok(&unmap(1, 0x1_0000, 0x1_ffff));
    // The whole 64-bit space.
    vm.ok(&unmap(1, 0, u64::MAX));
    assert_eq!(vm.mappings(1), vec![]);
    // The DMA through the unmapped range faults.
    assert!(matches!(
        vm.endpoint(1).write(0x2_0000, &[1]),
        Err(DmaError::Fault { .. })
    ));
}

/// Walks PROBE properties as a driver does: (type, payload) until type 0 or the end.
fn properties(mut p: &[u8]) -> Vec<(u16, Vec<u8>)> {
    let mut out = vec![];
    while p.len() >= 4 {
        let kind = u16::from_le_bytes([p[0], p[1]]) & 0xfff;
        let len = usize::from(u16::from_le_bytes([p[2], p[3]]));
        if kind == 0 {
            break;
        }
        out.push((kind, p[4..4 + len].to_vec()));
        p = &p[4 + len..];
    }
    out
}

#[test]
fn probe_reports_the_msi_window_and_whether_writes_are_tracked() {
    let mut vm = Vm::new(&[(1, true), (9, false)]);
    let reply = vm.reply(&probe(1), 68).unwrap();
    assert_eq!(reply.status, S_OK);
    let mut want = vec![];
    want.extend(PROBE_T_RESV_MEM.to_le_bytes());
    want.extend(20u16.to_le_bytes());
    want.extend([RESV_MEM_T_MSI, 0, 0, 0]);
    want.extend(0xfee0_0000u64.to_le_bytes());
    want.extend(0xfeef_ffffu64.to_le_bytes());
    want.extend(PROBE_T_DIRTY_TRACKING.to_le_bytes());
    want.extend(8u16.to_le_bytes());
    want.extend(PROBE_DIRTY_F_TRACKABLE.to_le_bytes());
    want.extend(0u32.to_le_bytes());
    want.resize(PROBE_SIZE as usize, 0);
    assert_eq!(reply.payload, want);
    let props = properties(&reply.payload);
    assert_eq!(props.len(), 2);
    assert_eq!(props[1], (0x10, vec![1, 0, 0, 0, 0, 0, 0, 0]));
    // An endpoint that cannot report its writes says so.
    let reply = vm.reply(&probe(9), 68).unwrap();
    assert_eq!(properties(&reply.payload)[1], (0x10, vec![0; 8]));
    // More room than probe_size: the same properties.
    assert_eq!(vm.reply(&probe(1), 200).unwrap().payload, want);
    for writable in [0, 4, 24, 67] {
        let reply = vm.reply(&probe(1), writable).unwrap();
        assert_eq!(reply.status, S_INVAL, "{writable} bytes for the properties");
        assert!(reply.payload.is_empty());
    }
    assert_eq!(vm.reply(&probe(77), 68).unwrap().status, S_NOENT);
    for at in [8, 40, 71] {
        let mut r = probe(1);
        r[at] = 1;
        assert_eq!(
            vm.reply(&r, 68).unwrap().status,
            S_INVAL,
            "reserved byte {at}"
        );
    }
    // Without the extension: RESV_MEM alone, then zeros.
    vm.features &= !(1 << F_DIRTY_TRACKING);
    let reply = vm.reply(&probe(1), 68).unwrap();
    assert_eq!(reply.payload[..24], want[..24]);
    assert_eq!(reply.payload[24..], [0; 40]);
    assert_eq!(properties(&reply.payload).len(), 1);
}

#[test]
fn set_dirty_tracking_follows_dirty_tracking_md() {
    let vm = Vm::new(&[(1, true), (2, true), (9, false)]);
    assert_eq!(vm.status(&set_tracking(1, ENABLE)), S_NOENT);
    vm.ok(&attach(1, 1, 0));
    vm.ok(&map(1, 0, 4 * P - 1, 0x4_0000, RW));
    for at in 12..16 {
        let mut r = set_tracking(1, ENABLE);
        r[at] = 1;
        assert_eq!(vm.status(&r), S_INVAL, "reserved byte {at}");
    }
    for flags in [2, 1 << 31, ENABLE | 4] {
        assert_eq!(
            vm.status(&set_tracking(1, flags)),
            S_INVAL,
            "flags {flags:#x}"
        );
    }
    assert_eq!(
        vm.bitmap(1, 0, P, P, 0).0,
        S_INVAL,
        "refusals turned nothing on"
    );
    vm.ok(&set_tracking(1, ENABLE));
    let dev = vm.endpoint(1);
    dev.write(P + 5, &[1]).unwrap();
    assert_eq!(vm.bits(1, 4), BTreeSet::from([1]));
    vm.ok(&set_tracking(1, ENABLE));
    assert_eq!(
        vm.bits(1, 4),
        BTreeSet::from([1]),
        "on again changes nothing"
    );
    vm.ok(&set_tracking(1, 0));
    assert_eq!(vm.bitmap(1, 0, P, P, 0).0, S_INVAL);
    vm.ok(&set_tracking(1, 0));
    dev.write(2 * P, &[1]).unwrap();
    vm.ok(&set_tracking(1, ENABLE));
    assert_eq!(
        vm.bits(1, 4),
        BTreeSet::new(),
        "starts clean: off forgot every bit"
    );
    // A domain holding an endpoint that cannot report: UNSUPP, and nothing changes.
    vm.ok(&attach(2, 2, 0));
    vm.ok(&attach(2, 9, 0));
    assert_eq!(vm.status(&set_tracking(2, ENABLE)), S_UNSUPP);
    assert_eq!(vm.bitmap(2, 0, P, P, 0).0, S_INVAL, "still not tracking");
    vm.ok(&set_tracking(2, 0));
    vm.ok(&detach(2, 9));
    vm.ok(&set_tracking(2, ENABLE));
}

#[test]
fn get_dirty_bitmap_follows_dirty_tracking_md() {
    let vm = Vm::new(&[(1, true)]);
    assert_eq!(vm.bitmap(1, 0, P, P, 0).0, S_NOENT);
    vm.ok(&attach(1, 1, 0));
    // IOVA [0, 1 MiB) -> GPA [2 MiB, 3 MiB).
    vm.ok(&map(1, 0, 0xf_ffff, 0x20_0000, RW));
    assert_eq!(vm.bitmap(1, 0, P, P, 0).0, S_INVAL, "not tracking");
    vm.ok(&set_tracking(1, ENABLE));
    for at in 12..16 {
        let mut r = get_bitmap(1, 0, 0, P, P);
        r[at] = 1;
        assert_eq!(vm.status(&r), S_INVAL, "reserved byte {at}");
    }
    for flags in [2, 1 << 31] {
        assert_eq!(vm.bitmap(1, 0, P, P, flags).0, S_INVAL, "flags {flags:#x}");
    }
    assert_eq!(vm.bitmap(2, 0, P, P, 0).0, S_NOENT);
    for (iova, length, page_size) in [
        (0, 3 * P, 3 * P),
        (0, P, P / 2),
        (0, P, 0),
        (P / 2, P, P),
        (P, 2 * P, 2 * P),
        (0, P + 1, P),
        (0, 0, P),
        (u64::MAX - P + 1, 2 * P, P),
        (0, ((1 << 24) + 1) * P, P),
    ] {
        assert_eq!(
            vm.bitmap(1, iova, length, page_size, 0).0,
            S_RANGE,
            "{iova:#x}+{length:#x} in {page_size:#x}"
        );
    }
    // 2^63 bytes in one page of 2^63: one word, clean.
    assert_eq!(vm.bitmap(1, 0, 1 << 63, 1 << 63, 0), (S_OK, vec![0]));
    // 2^24 pages at most.
    let (status, words) = vm.bitmap(1, 0, (1 << 24) * P, P, NO_CLEAR);
    assert_eq!((status, words.len()), (S_OK, 1 << 18));
    // The writable part must hold the bitmap and the tail.
    let r = get_bitmap(1, 0, 0, 65 * P, P);
    for writable in [4, 8 + 4, 16 + 3] {
        let reply = vm.reply(&r, writable).unwrap();
        assert_eq!(reply.status, S_INVAL, "{writable} bytes");
        assert!(reply.payload.is_empty());
    }
    assert_eq!(vm.reply(&r, 16 + 4).unwrap().payload.len(), 16);

    let dev = vm.endpoint(1);
    for page in [0u64, 5, 63, 64, 200] {
        dev.write(page * P + 7, &[1]).unwrap();
    }
    dev.write(11 * P - 2, &[1; 4]).unwrap(); // pages 10 and 11
    let mut b = [0u8; 64];
    dev.read(100 * P, &mut b).unwrap(); // reads set nothing
    let disk = temp_disk(16);
    assert_eq!(
        dev.read_file_at(150 * P - 512, 1024, &disk, 0).unwrap(),
        1024
    ); // 149, 150
    assert_eq!(
        dev.read_file_at(254 * P, 2 * P as usize, &disk, 16 * 512 - 100)
            .unwrap(),
        100,
        "past the end of the file: only page 254 is written"
    );
    let all = BTreeSet::from([0, 5, 10, 11, 63, 64, 149, 150, 200, 254]);
    assert_eq!(vm.bits(1, 256), all);
    let (_, w) = vm.bitmap(1, 0, 256 * P, P, NO_CLEAR);
    assert_eq!(w.len(), 4);
    assert_eq!(w[0], 1 | 1 << 5 | 1 << 10 | 1 << 11 | 1 << 63);
    // Larger pages: 64 pages a bit.
    assert_eq!(
        vm.bitmap(1, 0, 256 * P, 64 * P, NO_CLEAR),
        (S_OK, vec![0b1111])
    );
    assert_eq!(
        vm.bitmap(1, 128 * P, 64 * P, 64 * P, NO_CLEAR),
        (S_OK, vec![1])
    );
    // Bits past the last page are zero; a window starting at page 4.
    assert_eq!(vm.bitmap(1, 0, 3 * P, P, NO_CLEAR), (S_OK, vec![1]));
    assert_eq!(
        vm.bitmap(1, 4 * P, 8 * P, P, NO_CLEAR),
        (S_OK, vec![1 << 1 | 1 << 6 | 1 << 7])
    );
    // Unmapped IOVAs read clean.
    assert_eq!(
        vm.bitmap(1, 0x4000_0000, 64 * P, P, NO_CLEAR),
        (S_OK, vec![0])
    );
    // A read without NO_CLEAR clears what it reports, and only that.
    assert_eq!(vm.bitmap(1, 0, 8 * P, P, 0), (S_OK, vec![1 | 1 << 5]));
    assert_eq!(vm.bitmap(1, 0, 8 * P, P, 0), (S_OK, vec![0]));
    let rest: BTreeSet<u64> = all.iter().copied().filter(|p| *p >= 8).collect();
    assert_eq!(vm.bits(1, 256), rest);
    // A refused UNMAP keeps them; an UNMAP forgets them with the mapping.
    assert_eq!(vm.status(&unmap(1, 0, 0x7_ffff)), S_RANGE);
    assert_eq!(vm.bits(1, 256), rest);
    vm.ok(&unmap(1, 0, 0xf_ffff));
    vm.ok(&map(1, 0, 0xf_ffff, 0x20_0000, RW));
    assert_eq!(vm.bits(1, 256), BTreeSet::new(), "forgotten at UNMAP");
    // The domain's end forgets them too.
    dev.write(3 * P, &[1]).unwrap();
    assert_eq!(vm.bits(1, 256), BTreeSet::from([3]));
    vm.ok(&detach(1, 1));
    assert_eq!(vm.bitmap(1, 0, P, P, 0).0, S_NOENT);
    vm.ok(&attach(1, 1, 0));
    assert_eq!(
        vm.bitmap(1, 0, P, P, 0).0,
        S_INVAL,
        "a new domain does not track"
    );
    vm.ok(&set_tracking(1, ENABLE));
    assert_eq!(vm.bits(1, 256), BTreeSet::new());
}

/// Rule 6, done exactly for emulated devices: a DMA racing the UNMAP of its own mapping
/// lands whole before it (its bytes there, its pages in the migration's log, its IOVA
/// bits set) or faults whole after it (nothing written, a fault record). The DMA crosses
/// from the racing mapping (IOVA page 1) into one that stays (page 2), so its IOVA bit
/// outlives the UNMAP that forgets page 1's; page 1's guest-physical bytes are the
/// guest's again once the UNMAP is answered, and nothing may land there after.
#[test]
fn a_dma_racing_the_unmap_of_its_mapping_lands_whole_or_faults_whole() {
    const A: u64 = 0x5_1000;
    const B: u64 = 0x4_2000;
    let vm = Vm::new(&[(1, true)]);
    vm.table.set_migration_tracking(true);
    vm.ok(&attach(1, 1, 0));
    vm.ok(&set_tracking(1, ENABLE));
    vm.ok(&map(1, 2 * P, 3 * P - 1, B, RW));
    let disk = temp_disk(8);
    let dev = vm.endpoint(1);
    // Rounds of four: the UNMAP leads, the DMA leads (each side waiting until the other
    // has started, then a varying time), then both start together off the same flag,
    // with a little jitter on one side or the other.
    let spin = |n: u32| (0..n).for_each(|_| std::hint::spin_loop());
    let wait = |flag: &AtomicBool| {
        while !flag.load(Ordering::Acquire) {
            std::thread::yield_now();
        }
    };
    let (mut landed, mut faulted) = (0, 0);
    for i in 0..4000u32 {
        vm.ok(&map(1, P, 2 * P - 1, A, RW));
        vm.ram.write(A, &[0; 0x1000]).unwrap();
        vm.ram.write(B, &[0; 0x1000]).unwrap();
        vm.clean();
        assert_eq!(vm.bitmap(1, 0, 4 * P, P, 0).0, S_OK);
        let file = i % 3 == 0;
        let (iova, len) = if file { (0x1e00, 0x400) } else { (0x1ffc, 8) };
        let pattern = [(i % 251) as u8 + 1; 8];
        // The DMA's bytes in page A (then page B's).
        let a_len = if file { 0x200 } else { 4 };
        let mode = i % 4;
        let spins = (i * 7919) % if mode < 2 { 400 } else { 256 };
        let (dma_started, unmap_started, go) = (
            AtomicBool::new(false),
            AtomicBool::new(false),
            AtomicBool::new(false),
        );
        let (dma, status) = std::thread::scope(|s| {
            let dma = s.spawn(|| {
                match mode {
                    0 => {
                        wait(&unmap_started);
                        spin(spins);
                    }
                    1 => {}
                    _ => {
                        dma_started.store(true, Ordering::Release);
                        // Spin (for a close start), yielding if the other side
                        // is not running.
                        let mut n = 0u32;
                        while !go.load(Ordering::Acquire) {
                            n += 1;
                            if n.is_multiple_of(4096) {
                                std::thread::yield_now();
                            }
                            std::hint::spin_loop();
                        }
                        if mode == 2 {
                            spin(spins);
                        }
                    }
                }
                dma_started.store(true, Ordering::Release);
                if file {
                    dev.read_file_at(iova, len, &disk, 3 * 512)
                        .map(|n| assert_eq!(n, len))
                } else {
                    dev.write(iova, &pattern)
                }
            });
            match mode {
                0 => {}
                1 => {
                    wait(&dma_started);
                    spin(spins);
                }
                _ => {
                    wait(&dma_started);
                    go.store(true, Ordering::Release);
                    if mode == 3 {
                        spin(spins);
                    }
                }
            }
            unmap_started.store(true, Ordering::Release);
            let status = vm.status(&unmap(1, P, 2 * P - 1));
            // The page is the guest's again: a DMA landing after this is the third
            // outcome.
            vm.ram
                .write(A + (iova & 0xfff), &[0x5a; 0x200][..a_len])
                .unwrap();
            (dma.join().unwrap(), status)
        });
        assert_eq!(status, S_OK);
        let want_b = if file {
            vec![4; 0x200]
        } else {
            pattern[4..].to_vec()
        };
        let got_a = vm.bytes(A + (iova & 0xfff), a_len);
        let got_b = vm.bytes(B, want_b.len());
        assert_eq!(
            got_a,
            vec![0x5a; a_len],
            "round {i}: a DMA landed in page A after its UNMAP ({:?})",
            dma
        );
        let bits = vm.bits(1, 4);
        let faults = vm.faults();
        match dma {
            Ok(()) => {
                landed += 1;
                assert_eq!(got_b, want_b, "round {i}: the bytes");
                assert_eq!(vm.dirty(), vec![B, A], "round {i}: both pages logged");
                assert_eq!(bits, BTreeSet::from([2]), "round {i}: page 2's bit");
                assert_eq!(faults, vec![], "round {i}");
            }
            Err(DmaError::Fault {
                iova: at,
                endpoint: 1,
                fault: DmaFault::Unmapped { iova: f },
                ..
            }) => {
                faulted += 1;
                assert_eq!((at, f), (iova, iova));
                assert!(
                    got_b.iter().all(|b| *b == 0),
                    "round {i}: a faulted DMA wrote"
                );
                assert_eq!(
                    vm.dirty(),
                    Vec::<u64>::new(),
                    "round {i}: a faulted DMA was logged"
                );
                assert_eq!(bits, BTreeSet::new(), "round {i}");
                assert_eq!(
                    faults,
                    vec![record(
                        FAULT_R_MAPPING,
                        FAULT_F_WRITE | FAULT_F_ADDRESS,
                        1,
                        iova
                    )],
                    "round {i}: one record for the fault"
                );
            }
            Err(e) => panic!("round {i}: a third outcome: {e}"),
        }
    }
    assert!(
        landed > 100 && faulted > 100,
        "{landed} landed, {faulted} faulted: both sides of the race are run"
    );
}

/// Seed 001: an UNMAP over whole mappings and holes, or one that would split a mapping:
/// the mappings, the dirty bits, the writable footprint and what rule 6 marks agree with
/// what was removed, every time (against a model of the spec, over random requests).
#[test]
fn unmaps_leave_the_state_agreeing_with_what_was_removed() {
    for untrackable in [false, true] {
        let vm = Vm::new(&[(1, !untrackable)]);
        vm.table.set_migration_tracking(true);
        vm.ok(&attach(1, 1, 0));
        if !untrackable {
            vm.ok(&set_tracking(1, ENABLE));
        }
        let dev = vm.endpoint(1);
        let mut model: Vec<Mapping> = vec![];
        let mut bits = BTreeSet::new();
        let mut r = Prng::new(0x001 + u64::from(untrackable));
        let (mut removed, mut split, mut holes) = (0, 0, 0);
        let writable = |ms: &[Mapping]| -> Vec<(u64, u64)> {
            ms.iter()
                .filter(|m| m.flags & MAP_F_WRITE != 0)
                .map(|m| (m.phys_start, m.len()))
                .collect()
        };
        for _ in 0..3000 {
            match r.below(3) {
                0 => {
                    let (a, n) = (r.below(64), 1 + r.below(6));
                    let m = Mapping {
                        virt_start: a * P,
                        virt_end: (a + n) * P - 1,
                        phys_start: 0x1_0000 + r.below(128) * P,
                        flags: r.pick(&[RW, RW, MAP_F_READ, MAP_F_WRITE]),
                    };
                    let overlaps = model
                        .iter()
                        .any(|o| o.virt_start <= m.virt_end && m.virt_start <= o.virt_end);
                    let status =
                        vm.status(&map(1, m.virt_start, m.virt_end, m.phys_start, m.flags));
                    if overlaps {
                        assert_eq!(status, S_INVAL);
                    } else {
                        assert_eq!(status, S_OK);
                        model.push(m);
                        model.sort_by_key(|m| m.virt_start);
                    }
                }
                1 => {
                    let page = r.below(72);
                    let result = dev.write(page * P + r.below(P), &[1]);
                    let m = model
                        .iter()
                        .find(|m| m.virt_start <= page * P && page * P <= m.virt_end);
                    match m {
                        Some(m) if m.flags & MAP_F_WRITE != 0 => {
                            result.unwrap();
                            bits.insert(page);
                        }
                        _ => assert!(matches!(result, Err(DmaError::Fault { .. }))),
                    }
                    vm.faults();
                }
                _ => {
                    let (a, n) = (r.below(70), 1 + r.below(12));
                    let (s, e) = (a * P, (a + n) * P - 1);
                    let hit: Vec<Mapping> = model
                        .iter()
                        .filter(|m| m.virt_start <= e && s <= m.virt_end)
                        .copied()
                        .collect();
                    let splits = hit.iter().any(|m| m.virt_start < s || m.virt_end > e);
                    vm.marked();
                    let status = vm.status(&unmap(1, s, e));
                    let marked = vm.marked();
                    if splits {
                        assert_eq!(status, S_RANGE);
                        assert_eq!(marked, vec![], "a refused UNMAP marks nothing");
                        split += 1;
                    } else {
                        assert_eq!(status, S_OK);
                        model.retain(|m| !hit.contains(m));
                        for m in &hit {
                            for p in m.virt_start / P..=m.virt_end / P {
                                bits.remove(&p);
                            }
                        }
                        let covered: u64 = hit.iter().map(|m| m.len() / P).sum();
                        if covered < n && !hit.is_empty() {
                            holes += 1;
                        }
                        let want = if untrackable { writable(&hit) } else { vec![] };
                        assert_eq!(marked, want, "rule 6 marks what was removed");
                        removed += usize::from(!hit.is_empty());
                    }
                }
            }
            assert_eq!(vm.mappings(1), model);
            let footprint = writable(&model);
            assert_eq!(IommuTable::footprint(&vm.table.read(), 1), footprint);
            if untrackable {
                assert_eq!(vm.table.harvest_untrackable(), footprint, "rule 4");
                vm.marked();
            } else {
                assert_eq!(vm.bits(1, 128), bits);
            }
        }
        assert!(
            removed > 100 && split > 100 && holes > 50,
            "{removed} removed, {split} split, {holes} over holes"
        );
    }
}

/// Rule 5: an endpoint leaving its domain while a migration tracks (DETACH, ATTACH
/// elsewhere, its device's reset, the vIOMMU's reset) makes the domain's whole writable
/// footprint dirty; with no migration tracking, nothing is marked.
#[test]
fn leaving_a_domain_while_a_migration_tracks_marks_its_writable_footprint() {
    let vm = Vm::new(&[(1, true), (2, true)]);
    let setup = |d: u32, ep: u32| {
        vm.ok(&attach(d, ep, 0));
        vm.ok(&map(d, 0x10_0000, 0x10_3fff, 0x4_0000, RW));
        vm.ok(&map(d, 0x20_0000, 0x20_0fff, 0x5_0000, MAP_F_READ));
        vm.ok(&map(d, 0x30_0000, 0x30_0fff, 0x6_0000, MAP_F_WRITE));
        vm.marked();
        vm.clean();
    };
    let footprint = [(0x4_0000, 0x4000), (0x6_0000, 0x1000)];
    let pages = vec![0x4_0000, 0x4_1000, 0x4_2000, 0x4_3000, 0x6_0000];
    for tracking in [true, false] {
        vm.table.set_migration_tracking(tracking);
        let check = |what: &str, times: usize| {
            let (want, want_pages) = if tracking {
                (footprint.repeat(times), pages.clone())
            } else {
                (vec![], vec![])
            };
            assert_eq!(vm.marked(), want, "{what} (tracking {tracking})");
            assert_eq!(vm.dirty(), want_pages, "{what} (tracking {tracking})");
            vm.clean();
        };
        let footprint_pages = vm.table.footprint_pages();
        setup(1, 1);
        vm.ok(&detach(1, 1));
        check("DETACH", 1);
        setup(1, 1);
        vm.ok(&attach(2, 1, 0));
        check("ATTACH elsewhere", 1);
        vm.ok(&detach(2, 1));
        assert_eq!(
            vm.marked(),
            vec![],
            "a domain without mappings has no footprint"
        );
        setup(1, 1);
        vm.endpoint(1).device_reset();
        check("the device's reset", 1);
        assert_eq!(vm.domain_of(1), Some(1));
        vm.ok(&attach(1, 2, 0));
        vm.ok(&detach(1, 2));
        check("one of two endpoints leaving", 1);
        setup(3, 2);
        let mut dev = VirtioIommu::new(vm.table.clone());
        dev.reset();
        check("the vIOMMU's reset (two domains)", 2);
        assert!(vm.table.read().domains.is_empty());
        assert_eq!((vm.domain_of(1), vm.domain_of(2)), (None, None));
        let want = if tracking { 5 * 6 } else { 0 };
        assert_eq!(vm.table.footprint_pages() - footprint_pages, want);
    }
}

/// Rules 4 and 7: an endpoint that cannot report its writes is refused by a tracking
/// domain and keeps its domain from tracking; every harvest marks its domain's writable
/// footprint; an UNMAP while a migration tracks marks the writable ranges it removed.
#[test]
fn an_endpoint_that_cannot_report_its_writes() {
    let vm = Vm::new(&[(1, true), (2, true), (9, false)]);
    vm.ok(&attach(1, 1, 0));
    vm.ok(&set_tracking(1, ENABLE));
    assert_eq!(vm.status(&attach(1, 9, 0)), S_UNSUPP);
    assert_eq!(vm.domain_of(9), None, "left as it was");
    vm.ok(&attach(3, 9, 0));
    vm.ok(&map(3, 0x10_0000, 0x10_1fff, 0x4_0000, RW));
    vm.ok(&map(3, 0x20_0000, 0x20_0fff, 0x5_0000, MAP_F_READ));
    vm.ok(&map(3, 0x30_0000, 0x30_0fff, 0x6_0000, MAP_F_WRITE));
    assert_eq!(vm.status(&attach(1, 9, 0)), S_UNSUPP);
    assert_eq!(vm.domain_of(9), Some(3), "left in its domain");
    assert_eq!(vm.mappings(3).len(), 3);
    vm.ok(&attach(3, 2, 0));
    assert_eq!(vm.status(&set_tracking(3, ENABLE)), S_UNSUPP);
    assert_eq!(vm.bitmap(3, 0, P, P, 0).0, S_INVAL, "not tracking");
    vm.ok(&map(1, 0, P - 1, 0x7_0000, RW));
    let footprint = vec![(0x4_0000, 0x2000), (0x6_0000, 0x1000)];
    for _ in 0..3 {
        assert_eq!(vm.table.harvest_untrackable(), footprint);
        assert_eq!(vm.marked(), footprint, "every harvest");
        assert_eq!(vm.dirty(), vec![0x4_0000, 0x4_1000, 0x6_0000]);
        vm.clean();
    }
    // UNMAP: nothing marked unless a migration tracks; then the writable ranges removed.
    vm.ok(&unmap(3, 0x20_0000, 0x20_0fff));
    assert_eq!(vm.marked(), vec![]);
    vm.table.set_migration_tracking(true);
    vm.ok(&map(3, 0x20_0000, 0x20_0fff, 0x5_0000, MAP_F_READ));
    assert_eq!(vm.status(&unmap(3, 0x10_1000, 0x10_1fff)), S_RANGE);
    assert_eq!(vm.marked(), vec![]);
    vm.ok(&unmap(3, 0x10_0000, 0x20_0fff));
    assert_eq!(
        vm.marked(),
        vec![(0x4_0000, 0x2000)],
        "the read-only one is not"
    );
    assert_eq!(vm.dirty(), vec![0x4_0000, 0x4_1000]);
    // Gone from the domain (rule 5 on the way out): no longer harvested, and the domain
    // may track.
    vm.ok(&detach(3, 9));
    assert_eq!(vm.marked(), vec![(0x6_0000, 0x1000)]);
    assert_eq!(vm.table.harvest_untrackable(), vec![]);
    vm.ok(&set_tracking(3, ENABLE));
    // Unattached in bypass it reaches all of RAM: the VMM marks it all.
    assert!(vm.table.untrackable_in_bypass());
    vm.table.write().bypass = false;
    assert!(!vm.table.untrackable_in_bypass());
    // So does it in a bypass domain.
    vm.ok(&attach(5, 9, ATTACH_F_BYPASS));
    vm.endpoint(9).write(0x8_0000, &[1]).unwrap();
    assert!(
        vm.table.untrackable_in_bypass(),
        "an untrackable endpoint in a bypass domain writes anywhere"
    );
}

/// What a migration carries: mappings, tracking, the bits the guest has not read, the
/// bypass byte, the fault records waiting, through serde.
#[test]
fn the_state_keeps_mappings_tracking_and_unread_bits() {
    let endpoints = [(1, true), (2, true), (9, false)];
    let a = Vm::new(&endpoints);
    a.table.write().bypass = false;
    a.ok(&attach(1, 1, 0));
    a.ok(&set_tracking(1, ENABLE));
    a.ok(&map(1, 0, 0xf_ffff, 0x20_0000, RW));
    a.ok(&map(1, 0x4000_0000, 0x4000_0fff, 0x1000, MAP_F_READ));
    a.ok(&attach(2, 2, ATTACH_F_BYPASS));
    a.ok(&attach(3, 9, 0));
    a.ok(&map(3, 0, P - 1, 0x3000, RW));
    let dev = a.endpoint(1);
    for page in [0, 7, 8, 200, 255] {
        dev.write(page * P, &[1]).unwrap();
    }
    assert_eq!(a.bitmap(1, 0, 8 * P, P, 0), (S_OK, vec![1 | 1 << 7]));
    dev.write(0x9000_0000, &[1]).unwrap_err();
    let state = a.table.state();
    let json = serde_json::to_string(&state).unwrap();
    let back: ViommuState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, state);

    let b = Vm::new(&endpoints);
    b.table.restore(&back).unwrap();
    assert_eq!(b.table.state(), state);
    assert!(!b.table.read().bypass);
    assert_eq!(
        b.bits(1, 256),
        BTreeSet::from([8, 200, 255]),
        "the unread bits"
    );
    let dev = b.endpoint(1);
    dev.write(3 * P, &[1]).unwrap();
    assert_eq!(
        b.bits(1, 256),
        BTreeSet::from([3, 8, 200, 255]),
        "still tracking"
    );
    assert!(matches!(
        dev.write(0x4000_0000, &[1]),
        Err(DmaError::Fault {
            fault: DmaFault::Permission { .. },
            ..
        })
    ));
    let mut x = [0u8; 1];
    dev.read(0x4000_0000, &mut x).unwrap();
    assert_eq!(
        b.faults(),
        vec![
            record(
                FAULT_R_MAPPING,
                FAULT_F_WRITE | FAULT_F_ADDRESS,
                1,
                0x9000_0000
            ),
            record(
                FAULT_R_MAPPING,
                FAULT_F_WRITE | FAULT_F_ADDRESS,
                1,
                0x4000_0000
            ),
        ]
    );
    assert_eq!(b.status(&attach(1, 9, 0)), S_UNSUPP, "the rules go on");
    b.endpoint(2).write(0x8000, &[5]).unwrap();
    assert_eq!(b.bytes(0x8000, 1), vec![5], "bypass domain");
}

#[test]
fn a_state_that_does_not_fit_is_refused_naming_why_and_changes_nothing() {
    let endpoints = [(1, true), (2, true), (9, false)];
    let a = Vm::new(&endpoints);
    a.ok(&attach(1, 1, 0));
    a.ok(&set_tracking(1, ENABLE));
    a.ok(&map(1, 0, 4 * P - 1, 0x20_0000, RW));
    a.endpoint(1).write(P, &[1]).unwrap();
    let state = a.table.state();

    let b = Vm::new(&endpoints);
    b.ok(&attach(4, 2, 0));
    b.ok(&map(4, 0, P - 1, 0x2000, RW));
    b.ok(&set_tracking(4, ENABLE));
    b.endpoint(2).write(0, &[1]).unwrap();
    let before = b.table.state();
    let refused = |table: &IommuTable, s: &ViommuState, names: &[&str]| {
        let was = table.state();
        let e = table.restore(s).unwrap_err();
        for n in names {
            assert!(e.contains(n), "{e:?} names {n:?}");
        }
        assert_eq!(table.state(), was, "{e}: the table changed");
    };
    let c = Vm::new(&[(1, true), (2, true), (0x18, true)]);
    refused(&c.table, &state, &["endpoints differ", "18"]);
    let mut bad = state.clone();
    bad.version = VIOMMU_STATE_VERSION + 1;
    refused(&b.table, &bad, &["version 2"]);
    let mut bad = state.clone();
    let m = bad.domains[0].mappings[0];
    bad.domains[0].mappings.push(Mapping {
        virt_start: m.virt_start + 2 * P,
        virt_end: m.virt_end + 2 * P,
        ..m
    });
    refused(&b.table, &bad, &["domain 1", "overlaps"]);
    let mut bad = state.clone();
    bad.domains[0].mappings[0].virt_start += 1;
    refused(&b.table, &bad, &["domain 1", "aligned"]);
    let mut bad = state.clone();
    bad.endpoints[0].domain = Some(77);
    refused(&b.table, &bad, &["77"]);
    let mut bad = state.clone();
    bad.domains[0].dirty.as_mut().unwrap().chunks[0].1.pop();
    refused(&b.table, &bad, &["domain 1", "chunk"]);
    // A domain lives while it holds an endpoint.
    let mut bad = state.clone();
    bad.endpoints[0].domain = None;
    refused(&b.table, &bad, &["domain 1 has no endpoint"]);
    // A tracking domain holding an endpoint that cannot report its writes here.
    let mut bad = state.clone();
    bad.endpoints[2].domain = Some(1);
    refused(&b.table, &bad, &["domain 1", "endpoint 0x9"]);
    // What ATTACH or MAP would have refused.
    let mut bad = state.clone();
    bad.domains[0].id = 0;
    bad.endpoints[0].domain = Some(0);
    refused(&b.table, &bad, &["domain 0", "outside the domain range"]);
    let mut bad = state.clone();
    bad.domains.push(bad.domains[0].clone());
    refused(&b.table, &bad, &["domain 1 appears twice"]);
    let mut bad = state.clone();
    bad.domains[0].bypass = true;
    bad.domains[0].dirty = None;
    refused(
        &b.table,
        &bad,
        &["domain 1", "bypass domain with 1 mapping"],
    );
    let mut bad = state.clone();
    bad.domains[0].mappings[0] = Mapping {
        virt_start: 1 << 48,
        virt_end: (1 << 48) + P - 1,
        ..m
    };
    refused(&b.table, &bad, &["domain 1", "input range"]);
    let mut bad = state.clone();
    bad.domains[0].mappings[0] = Mapping {
        virt_start: 0xfee0_0000,
        virt_end: 0xfee0_0000 + P - 1,
        ..m
    };
    refused(&b.table, &bad, &["domain 1", "MSI window"]);
    let mut bad = state.clone();
    bad.pending_faults = vec![
        FaultRecord {
            reason: 1,
            flags: 0,
            endpoint: 1,
            address: 0,
        };
        257
    ];
    refused(&b.table, &bad, &["257 pending faults"]);
    assert_eq!(b.table.state(), before);
    assert_eq!(b.bits(4, 1), BTreeSet::from([0]));
}

#[test]
fn a_refused_dma_writes_nothing_and_leaves_a_fault_record() {
    let vm = Vm::new(&[(1, true), (2, true), (3, true)]);
    vm.ok(&attach(1, 1, 0));
    vm.ok(&map(1, P, 2 * P - 1, 0x4_0000, RW));
    vm.ok(&map(1, 2 * P, 3 * P - 1, 0x5_0000, MAP_F_READ));
    vm.ok(&map(1, 3 * P, 4 * P - 1, 0x6_0000, MAP_F_WRITE));
    for gpa in [0x3_0000, 0x4_0000, 0x5_0000, 0x6_0000] {
        vm.ram.write(gpa, &[0xee; 0x1000]).unwrap();
    }
    let dev = vm.endpoint(1);
    let (w, r) = (
        FAULT_F_WRITE | FAULT_F_ADDRESS,
        FAULT_F_READ | FAULT_F_ADDRESS,
    );
    let e = dev.write(0x9000, &[1; 8]).unwrap_err();
    assert!(
        matches!(
            e,
            DmaError::Fault {
                iova: 0x9000,
                len: 8,
                endpoint: 1,
                fault: DmaFault::Unmapped { iova: 0x9000 }
            }
        ),
        "{e}"
    );
    assert_eq!(vm.faults(), vec![record(FAULT_R_MAPPING, w, 1, 0x9000)]);
    let mut b = [0u8; 4];
    dev.read(0x9004, &mut b).unwrap_err();
    assert_eq!(vm.faults(), vec![record(FAULT_R_MAPPING, r, 1, 0x9004)]);
    let e = dev.write(2 * P + 0x10, &[1; 8]).unwrap_err();
    assert!(matches!(
        e,
        DmaError::Fault {
            fault: DmaFault::Permission {
                iova: 0x2010,
                write: true
            },
            ..
        }
    ));
    assert_eq!(vm.faults(), vec![record(FAULT_R_MAPPING, w, 1, 0x2010)]);
    dev.read(3 * P, &mut b).unwrap_err();
    assert_eq!(vm.faults(), vec![record(FAULT_R_MAPPING, r, 1, 3 * P)]);
    // Starting in the writable mapping, running into the read-only one: nothing at all.
    dev.write(2 * P - 4, &[1; 8]).unwrap_err();
    assert_eq!(vm.faults(), vec![record(FAULT_R_MAPPING, w, 1, 2 * P)]);
    let disk = temp_disk(16);
    dev.read_file_at(2 * P - 0x100, 0x200, &disk, 0)
        .unwrap_err();
    assert_eq!(vm.faults(), vec![record(FAULT_R_MAPPING, w, 1, 2 * P)]);
    for gpa in [0x4_0000, 0x5_0000, 0x6_0000] {
        assert_eq!(
            vm.bytes(gpa, 0x1000),
            vec![0xee; 0x1000],
            "{gpa:#x} written"
        );
    }
    assert_eq!(vm.dirty(), Vec::<u64>::new(), "a refused DMA was logged");
    // The record as the event queue carries it.
    let rec = record(FAULT_R_MAPPING, w, 0x0102_0304, 0x1122_3344_5566_7788);
    assert_eq!(
        rec.bytes(),
        [
            2, 0, 0, 0, 2, 1, 0, 0, 4, 3, 2, 1, 0, 0, 0, 0, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33,
            0x22, 0x11
        ]
    );
    // Unattached with bypass off: DOMAIN.
    vm.table.write().bypass = false;
    let dev2 = vm.endpoint(2);
    dev2.write(0x3_0000, &[1; 8]).unwrap_err();
    assert_eq!(vm.faults(), vec![record(FAULT_R_DOMAIN, w, 2, 0x3_0000)]);
    assert_eq!(vm.bytes(0x3_0000, 8), vec![0xee; 8]);
    assert_eq!(vm.dirty(), Vec::<u64>::new());
    // With bypass on: straight to the guest-physical address, logged.
    vm.table.write().bypass = true;
    dev2.write(0x3_0000, &[7; 8]).unwrap();
    assert_eq!(vm.bytes(0x3_0000, 8), vec![7; 8]);
    assert_eq!(vm.dirty(), vec![0x3_0000]);
    assert_eq!(vm.faults(), vec![]);
    // A bypass domain too, whatever the bypass byte says.
    vm.table.write().bypass = false;
    vm.ok(&attach(5, 3, ATTACH_F_BYPASS));
    vm.endpoint(3).write(0x3_1000, &[8]).unwrap();
    assert_eq!(vm.bytes(0x3_1000, 1), vec![8]);
    // Records wait up to a bound; later ones are counted and dropped.
    for _ in 0..300 {
        dev.write(0x9000, &[1]).unwrap_err();
    }
    assert_eq!(vm.table.pending_faults().len(), 256);
    assert_eq!(vm.table.faults_dropped(), 44);
}

// The device through its queues.

/// Request bytes go here, the device-writable parts there (pieces 0x100 apart).
const REQ: u64 = 0x1_0000;
const OUT: u64 = 0x1_8000;
const EVENTS: u64 = 0x2_0000;

struct Device {
    vm: Vm,
    dev: VirtioIommu,
    reqq: Ring,
    eventq: Ring,
}

impl Device {
    fn new(endpoints: &[(u32, bool)]) -> Device {
        let vm = Vm::new(endpoints);
        let mut dev = VirtioIommu::new(vm.table.clone());
        dev.activate(dev.features()).unwrap();
        Device {
            vm,
            dev,
            reqq: Ring::new(0, 0x1000, 0x2000, 16),
            eventq: Ring::new(0x3000, 0x4000, 0x5000, 16),
        }
    }

    /// Puts `req` in the request queue cut into pieces of `readable` bytes, with
    /// device-writable pieces of `writable` bytes (filled with 0xee), and lets the device
    /// serve it. Returns the used length and the writable bytes, pieces joined.
    fn send(&mut self, req: &[u8], readable: &[usize], writable: &[usize]) -> (u32, Vec<u8>) {
        let ram = &self.vm.ram;
        let mut descs = vec![];
        let (mut at, mut addr) = (0, REQ);
        for &n in readable {
            ram.write(addr, &req[at..at + n]).unwrap();
            descs.push((addr, n as u32, false));
            at += n;
            addr += n as u64 + 0x100;
        }
        assert_eq!(at, req.len());
        let mut addr = OUT;
        for &n in writable {
            ram.write(addr, &vec![0xee; n]).unwrap();
            descs.push((addr, n as u32, true));
            addr += n as u64 + 0x100;
        }
        let head = self.reqq.chain(ram, &descs);
        assert_eq!(self.dev.process_queue(0, &mut self.reqq.q, ram), 1);
        let used = self.reqq.used(ram);
        assert_eq!(used.len(), 1);
        assert_eq!(used[0].0, u32::from(head));
        let mut out = vec![];
        let mut addr = OUT;
        for &n in writable {
            out.extend(self.vm.bytes(addr, n));
            addr += n as u64 + 0x100;
        }
        (used[0].1, out)
    }

    fn events(&mut self) -> Vec<(u32, u32)> {
        let n = self.dev.process_queue(1, &mut self.eventq.q, &self.vm.ram);
        let used = self.eventq.used(&self.vm.ram);
        assert_eq!(used.len(), n);
        used
    }
}

#[test]
fn requests_are_read_and_answered_across_descriptors() {
    let mut d = Device::new(&[(1, true), (2, true)]);
    // ATTACH in three readable pieces, its tail in two.
    let (len, out) = d.send(&attach(1, 1, 0), &[4, 7, 9], &[1, 3]);
    assert_eq!((len, out), (4, vec![S_OK, 0, 0, 0]));
    assert_eq!(d.vm.domain_of(1), Some(1));
    let (len, out) = d.send(&map(1, 0, P - 1, 0x4_0000, RW), &[36], &[4]);
    assert_eq!((len, out), (4, vec![S_OK, 0, 0, 0]));
    // Refused, cut anyhow: the status where the driver looks, at the very end.
    let (len, out) = d.send(&map(1, 0, P - 1, 0x4_0000, RW), &[10, 0, 26], &[2, 2]);
    assert_eq!((len, out), (4, vec![S_INVAL, 0, 0, 0]));
    // More writable room than the tail: the tail is its last 4 bytes.
    let (len, out) = d.send(&attach(1, 2, 0), &[20], &[8, 4]);
    assert_eq!(len, 12);
    assert_eq!(out[8..], [S_OK, 0, 0, 0]);
    // A short request: INVAL.
    let (_, out) = d.send(&unmap(1, 0, P - 1)[..20], &[20], &[4]);
    assert_eq!(out, vec![S_INVAL, 0, 0, 0]);
    assert_eq!(d.vm.mappings(1).len(), 1);
    // Unknown types and chains without room for a tail: used length 0, nothing written.
    let (len, out) = d.send(&head(0x42, 20), &[20], &[4]);
    assert_eq!((len, out), (0, vec![0xee; 4]));
    let (len, out) = d.send(&[], &[0], &[8]);
    assert_eq!((len, out), (0, vec![0xee; 8]), "no head");
    let no_room: [&[usize]; 3] = [&[3], &[1, 1, 1], &[]];
    for writable in no_room {
        let (len, out) = d.send(&detach(1, 1), &[20], writable);
        assert_eq!(len, 0);
        assert!(out.iter().all(|b| *b == 0xee));
    }
    assert_eq!(
        d.vm.domain_of(1),
        Some(1),
        "the unanswered DETACH was not done"
    );
    // The extension's requests are unknown without its feature.
    d.dev
        .activate(d.dev.features() & !(1 << F_DIRTY_TRACKING))
        .unwrap();
    let (len, _) = d.send(&set_tracking(1, ENABLE), &[16], &[4]);
    assert_eq!(len, 0);
    assert!(d.dev.errors() >= 6);
}

#[test]
fn probe_through_the_queue_puts_its_tail_after_probe_size() {
    let mut d = Device::new(&[(1, true)]);
    let want = d.vm.reply(&probe(1), 68).unwrap().payload;
    // Exactly probe_size + tail, in two pieces.
    let (len, out) = d.send(&probe(1), &[40, 32], &[30, 38]);
    assert_eq!(len, 68);
    assert_eq!(out[..64], want[..]);
    assert_eq!(out[64..], [S_OK, 0, 0, 0]);
    // More room: zeros up to the tail at the end.
    let (len, out) = d.send(&probe(1), &[72], &[100]);
    assert_eq!(len, 100);
    assert_eq!(out[..64], want[..]);
    assert_eq!(out[64..96], [0; 32]);
    assert_eq!(out[96..], [S_OK, 0, 0, 0]);
    // Too little: INVAL, the properties' room untouched.
    let (len, out) = d.send(&probe(1), &[72], &[60]);
    assert_eq!(len, 60);
    assert_eq!(out[56..], [S_INVAL, 0, 0, 0]);
    assert_eq!(out[..56], [0xee; 56]);
    let (_, out) = d.send(&probe(7), &[72], &[68]);
    assert_eq!(out[64..], [S_NOENT, 0, 0, 0]);
    assert_eq!(
        out[..64],
        [0xee; 64],
        "a refused request writes nothing but its tail"
    );
}

#[test]
fn dirty_bitmaps_through_the_queue() {
    let mut d = Device::new(&[(1, true)]);
    d.send(&attach(1, 1, 0), &[20], &[4]);
    d.send(&map(1, 0, 0xf_ffff, 0x20_0000, RW), &[36], &[4]);
    d.send(&set_tracking(1, ENABLE), &[16], &[4]);
    for page in [1, 64, 129] {
        d.vm.endpoint(1).write(page * P, &[1]).unwrap();
    }
    clean(&d.vm.ram);
    let (len, out) = d.send(&get_bitmap(1, 0, 0, 130 * P, P), &[16, 24], &[10, 14, 4]);
    assert_eq!(len, 28);
    let mut want = vec![];
    for w in [2u64, 1, 2] {
        want.extend(w.to_le_bytes());
    }
    assert_eq!(out[..24], want[..]);
    assert_eq!(out[24..], [S_OK, 0, 0, 0]);
    // The device's writes are in the VM's dirty log like any other device's.
    let pages = dirty_pages(&d.vm.ram);
    assert!(pages.contains(&OUT), "{pages:x?}");
    // Read with clear: clean now.
    let (_, out) = d.send(&get_bitmap(1, 0, 0, 130 * P, P), &[40], &[28]);
    assert_eq!(out, [vec![0; 24], vec![S_OK, 0, 0, 0]].concat());
    // DIRTY_TRACKING.md: a writable part too short for the bitmap is INVAL "and writes
    // nothing but the tail".
    let (len, out) = d.send(&get_bitmap(1, 0, 0, 130 * P, P), &[40], &[20]);
    assert_eq!(len, 20);
    assert_eq!(out[16..], [S_INVAL, 0, 0, 0]);
    assert_eq!(out[..16], [0xee; 16], "nothing but the tail");
}

/// A reply buffer that is not RAM: the request is not served at all (used length 0), so
/// a GET_DIRTY_BITMAP cannot clear bits it could not report.
#[test]
fn a_bitmap_reply_that_cannot_be_written_clears_nothing() {
    let mut d = Device::new(&[(1, true)]);
    d.send(&attach(1, 1, 0), &[20], &[4]);
    d.send(&map(1, 0, 0xf_ffff, 0x20_0000, RW), &[36], &[4]);
    d.send(&set_tracking(1, ENABLE), &[16], &[4]);
    d.vm.endpoint(1).write(P, &[1]).unwrap();
    let req = get_bitmap(1, 0, 0, 64 * P, P);
    let ram = d.vm.ram.clone();
    ram.write(REQ, &req).unwrap();
    // The bitmap's buffer past the end of RAM, the tail in RAM.
    let nowhere = 0xffff_f000_0000;
    let descs = [
        (REQ, req.len() as u32, false),
        (nowhere, 8, true),
        (OUT, 4, true),
    ];
    d.reqq.chain(&ram, &descs);
    assert_eq!(d.dev.process_queue(0, &mut d.reqq.q, &ram), 1);
    assert_eq!(d.reqq.used(&ram)[0].1, 0, "not answered");
    assert_eq!(
        d.vm.bits(1, 64),
        BTreeSet::from([1]),
        "the bit is still there"
    );
}

#[test]
fn fault_records_go_into_posted_event_buffers_in_order() {
    let mut d = Device::new(&[(1, true)]);
    let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    d.dev.queue_notifiers(vec![
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        kick.try_clone().unwrap(),
    ]);
    d.send(&attach(1, 1, 0), &[20], &[4]);
    let ram = d.vm.ram.clone();
    let ep = d.vm.endpoint(1);
    let w = FAULT_F_WRITE | FAULT_F_ADDRESS;
    // A buffer and no fault: it waits.
    let first = d.eventq.chain(&ram, &[(EVENTS, 24, true)]);
    assert_eq!(d.events(), vec![]);
    assert!(kick.read().is_err(), "no kick without a fault");
    ep.write(0x7000, &[1]).unwrap_err();
    assert_eq!(kick.read().unwrap(), 1, "a fault wakes the event queue");
    assert_eq!(d.events(), vec![(u32::from(first), 24)]);
    assert_eq!(
        d.vm.bytes(EVENTS, 24),
        record(FAULT_R_MAPPING, w, 1, 0x7000).bytes().to_vec()
    );
    assert_eq!(d.vm.table.pending_faults(), vec![]);
    // Faults and no buffer: they wait.
    ep.write(0x8000, &[1]).unwrap_err();
    ep.read(0x9000, &mut [0]).unwrap_err();
    assert_eq!(d.events(), vec![]);
    assert_eq!(d.vm.table.pending_faults().len(), 2);
    // A buffer too small is given back empty, the record kept for the next one; a
    // buffer with a readable part first.
    let small = d.eventq.chain(&ram, &[(EVENTS + 0x40, 16, true)]);
    let good = d.eventq.chain(&ram, &[(EVENTS + 0x80, 24, true)]);
    let mixed = d.eventq.chain(
        &ram,
        &[(EVENTS + 0xc0, 8, false), (EVENTS + 0x100, 32, true)],
    );
    assert_eq!(
        d.events(),
        vec![
            (u32::from(small), 0),
            (u32::from(good), 24),
            (u32::from(mixed), 24)
        ]
    );
    assert_eq!(
        d.vm.bytes(EVENTS + 0x80, 24),
        record(FAULT_R_MAPPING, w, 1, 0x8000).bytes().to_vec()
    );
    let r = FAULT_F_READ | FAULT_F_ADDRESS;
    assert_eq!(
        d.vm.bytes(EVENTS + 0x100, 24),
        record(FAULT_R_MAPPING, r, 1, 0x9000).bytes().to_vec()
    );
    assert_eq!(d.vm.table.pending_faults(), vec![]);
    // A head that is no descriptor does not lose the record waiting.
    ep.write(0xa000, &[1]).unwrap_err();
    d.eventq.publish(&ram, 99);
    let next = d.eventq.chain(&ram, &[(EVENTS + 0x140, 24, true)]);
    assert_eq!(d.events(), vec![(u32::from(next), 24)]);
    assert_eq!(
        d.vm.bytes(EVENTS + 0x140, 24),
        record(FAULT_R_MAPPING, w, 1, 0xa000).bytes().to_vec()
    );
}

#[test]
fn config_space_features_and_reset() {
    let table = Arc::new(IommuTable::new());
    let mut dev = VirtioIommu::new(table.clone());
    assert_eq!(dev.device_type(), 23);
    assert_eq!(dev.pci_class(), 0x08_06_00);
    assert_eq!(dev.queue_max_sizes(), vec![256, 256]);
    let f = dev.features();
    for bit in [
        32,
        F_INPUT_RANGE,
        F_DOMAIN_RANGE,
        F_MAP_UNMAP,
        F_PROBE,
        F_BYPASS_CONFIG,
        F_DIRTY_TRACKING,
    ] {
        assert_ne!(f & 1 << bit, 0, "feature {bit}");
    }
    assert_eq!(
        f & 1 << F_BYPASS,
        0,
        "BYPASS is not offered with BYPASS_CONFIG"
    );
    let mut c = [0xeeu8; 40];
    dev.read_config(0, &mut c);
    let mut want = vec![];
    want.extend(0xffff_ffff_ffff_f000u64.to_le_bytes());
    want.extend(0u64.to_le_bytes());
    want.extend(((1u64 << 48) - 1).to_le_bytes());
    want.extend(1u32.to_le_bytes());
    want.extend(0xffffu32.to_le_bytes());
    want.extend(64u32.to_le_bytes());
    want.extend([1, 0, 0, 0]);
    assert_eq!(c[..], want[..]);
    let mut b = [0xee; 8];
    dev.read_config(38, &mut b);
    assert_eq!(b, [0; 8], "past the end reads 0");
    dev.write_config(36, &[0]);
    assert!(!table.read().bypass);
    dev.read_config(36, &mut b[..1]);
    assert_eq!(b[0], 0);
    dev.write_config(36, &[2]);
    dev.write_config(32, &[1, 0, 0, 0]);
    dev.write_config(36, &[1, 0]);
    assert!(!table.read().bypass);
    assert_eq!(dev.errors(), 3);
    dev.read_config(32, &mut b[..4]);
    assert_eq!(b[..4], [64, 0, 0, 0]);
    dev.reset();
    assert!(!table.read().bypass, "the device's reset keeps bypass");
    dev.write_config(36, &[1]);
    assert!(table.read().bypass);
}

// The fuzz harness.

#[test]
fn the_committed_fuzz_seeds_are_these() {
    for (name, input) in fuzzing::build::seeds() {
        let run = fuzzing::requests(&input);
        assert_eq!(run.unanswered, 0, "{name}: {run:?}");
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/seeds/viommu_requests")
            .join(name);
        if std::env::var_os("FERRY_WRITE_SEEDS").is_some() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &input).unwrap();
        }
        assert_eq!(
            std::fs::read(&path).ok(),
            Some(input),
            "{} (FERRY_WRITE_SEEDS=1 writes it)",
            path.display()
        );
    }
    let run = |name: &str| {
        let (_, input) = fuzzing::build::seeds()
            .into_iter()
            .find(|(n, _)| *n == name)
            .unwrap();
        fuzzing::requests(&input)
    };
    let r = run("map_dma_unmap");
    assert_eq!(
        (r.dma_ok, r.dma_faults, r.events_delivered),
        (1, 2, 2),
        "{r:?}"
    );
    let r = run("tracking");
    assert_eq!(r.statuses[usize::from(S_OK)], 7, "{r:?}");
    let r = run("untrackable_and_reset");
    assert_eq!(r.statuses[usize::from(S_UNSUPP)], 1, "{r:?}");
    assert_eq!(r.marks, 3, "harvest, DETACH, reset: {r:?}");
}

#[test]
fn thousands_of_generated_request_sequences_keep_the_invariants() {
    let mut r = Prng::new(0x1077);
    let seeds = fuzzing::build::seeds();
    let mut total = fuzzing::Run::default();
    for i in 0..3000 {
        let mut input = if i % 2 == 0 {
            seeds[i / 2 % seeds.len()].1.clone()
        } else {
            vec![r.below(8) as u8]
        };
        let n = r.below(600) as usize;
        input.extend((0..n).map(|_| r.next_u64() as u8));
        let run = fuzzing::requests(&input);
        total.ops += run.ops;
        for (t, s) in total.statuses.iter_mut().zip(run.statuses) {
            *t += s;
        }
        total.unanswered += run.unanswered;
        total.dma_ok += run.dma_ok;
        total.dma_faults += run.dma_faults;
        total.events_delivered += run.events_delivered;
        total.marks += run.marks;
    }
    // The generator reaches every answer, the DMA and the event queue.
    for s in [S_OK, S_UNSUPP, S_INVAL, S_RANGE, S_NOENT] {
        assert!(
            total.statuses[usize::from(s)] > 100,
            "status {s}: {total:?}"
        );
    }
    assert!(total.unanswered > 100, "{total:?}");
    assert!(total.dma_ok > 1000 && total.dma_faults > 1000, "{total:?}");
    assert!(
        total.events_delivered > 100 && total.marks > 10,
        "{total:?}"
    );
}

/// Rule 5 for a device that cannot report its writes and bypasses the vIOMMU: nothing but
/// all of RAM bounds what it wrote, so leaving bypass while a migration tracks (attached
/// from bypass, detached from a bypass domain, the bypass byte going to 0, a reset) marks
/// all of RAM; a trackable endpoint, or no migration, marks nothing.
#[test]
fn an_untrackable_endpoint_leaving_bypass_makes_all_ram_dirty() {
    const ALL: (u64, u64) = (0, u64::MAX);
    let vm = Vm::new(&[(1, true), (9, false)]);
    let mut dev = VirtioIommu::new(vm.table.clone());
    // Not tracking: nothing.
    vm.ok(&attach(2, 9, 0));
    vm.ok(&detach(2, 9));
    assert_eq!(vm.marked(), vec![]);
    vm.table.set_migration_tracking(true);
    // Unattached with bypass on, then attached.
    vm.ok(&attach(2, 9, 0));
    assert_eq!(vm.marked(), vec![ALL]);
    // Into a bypass domain (from a translated one: its footprint is empty) and out.
    vm.ok(&attach(3, 9, ATTACH_F_BYPASS));
    assert_eq!(vm.marked(), vec![]);
    vm.ok(&detach(3, 9));
    assert_eq!(vm.marked(), vec![ALL]);
    // The bypass byte going to 0 with it unattached; going to 1 marks nothing.
    dev.write_config(36, &[0]);
    assert_eq!(vm.marked(), vec![ALL]);
    dev.write_config(36, &[1]);
    assert_eq!(vm.marked(), vec![]);
    // Its device's reset while it bypasses.
    vm.endpoint(9).device_reset();
    assert_eq!(vm.marked(), vec![ALL]);
    // The trackable one never does.
    vm.ok(&attach(4, 1, 0));
    vm.ok(&detach(4, 1));
    assert_eq!(vm.marked(), vec![]);
    // All of RAM is in the DMA log.
    assert_eq!(vm.dirty().len(), 2 * 0x10_0000 / 4096);
    // Tracking on a bypass domain: it has no IOVA pages to report.
    vm.ok(&attach(5, 1, ATTACH_F_BYPASS));
    assert_eq!(vm.status(&set_tracking(5, ENABLE)), S_UNSUPP);
}

/// The writes a device makes through the unlogged view behind the vIOMMU (virtio-queue's
/// used ring, blk's status byte) are marked when they are made, under their translation:
/// an UNMAP or a remap before the round's end cannot make their page go unmarked (it did:
/// the round's mark translated the IOVA again and found nothing).
#[test]
fn ring_and_status_writes_are_marked_before_their_mapping_can_go() {
    use vm_memory::Bytes;
    let vm = Vm::new(&[(1, true)]);
    vm.table.set_migration_tracking(true);
    vm.ok(&attach(1, 1, 0));
    vm.ok(&map(1, 0x10_0000, 0x10_0000 + P - 1, 0x2000, RW));
    vm.ok(&map(1, 0x20_0000, 0x20_0000 + P - 1, 0x3000, RW));
    vm.ok(&set_tracking(1, ENABLE));
    let ram = vm.endpoint(1);
    // A used-ring write, as virtio-queue makes it (through `queue_memory`).
    ram.queue_memory()
        .write_obj(7u16, vm_memory::GuestAddress(0x10_0002))
        .unwrap();
    // A status byte, left to the round's mark on a device without the vIOMMU.
    ram.write_marked_by_round(0x20_0010, &[0]).unwrap();
    // The guest unmaps both before the round ends.
    vm.ok(&unmap(1, 0x10_0000, 0x10_0000 + P - 1));
    vm.ok(&unmap(1, 0x20_0000, 0x20_0000 + P - 1));
    ram.mark_pages(&[0x20_0010]);
    assert_eq!(
        vm.dirty(),
        vec![0x2000, 0x3000],
        "both pages in the DMA log"
    );
    assert_eq!(vm.bytes(0x2002, 2), vec![7, 0]);
    // And the IOVA bits were set before the UNMAP forgot them: mapped again, clean.
    vm.ok(&map(1, 0x10_0000, 0x10_0000 + P - 1, 0x2000, RW));
    let (status, words) = vm.bitmap(1, 0x10_0000, P, P, 0);
    assert_eq!((status, words[0]), (S_OK, 0));
}

/// One thing an external endpoint was told: (gained, iova, len, gpa, writable).
type Tell = (bool, u64, u64, u64, bool);

/// What an external endpoint (a vfio-user device) was told, in order.
#[derive(Default)]
struct Told(Mutex<Vec<Tell>>);

impl ExternalEndpoint for Told {
    fn map(&self, iova: u64, len: u64, gpa: u64, writable: bool) {
        self.0
            .lock()
            .unwrap()
            .push((true, iova, len, gpa, writable));
    }
    fn unmap(&self, iova: u64, len: u64, gpa: u64, writable: bool) {
        self.0
            .lock()
            .unwrap()
            .push((false, iova, len, gpa, writable));
    }
}

impl Told {
    fn take(&self) -> Vec<Tell> {
        std::mem::take(&mut self.0.lock().unwrap())
    }
}

/// A device in another process is told of every mapping its domain gains or loses, while
/// the mapping still translates (rule 6: its log is read before the mapping goes): on
/// ATTACH the domain's existing mappings, on MAP, on UNMAP (nothing when the UNMAP fails),
/// on DETACH everything; a mapping of another domain never; after a restore, all again.
/// Its writes cannot appear in the guest's nested bitmaps, so tracking is refused.
#[test]
fn an_external_endpoint_follows_its_domains_mappings() {
    let vm = Vm::new(&[(8, true)]);
    let told = Arc::new(Told::default());
    vm.table.add_external_endpoint(16, told.clone());
    vm.ok(&attach(1, 8, 0));
    vm.ok(&map(1, 0x10_0000, 0x10_0000 + P - 1, 0x20_0000, RW));
    vm.ok(&map(1, 0x30_0000, 0x30_0000 + P - 1, 0x3000, MAP_F_READ));
    // Joining a domain: its mappings, as they are.
    vm.ok(&attach(1, 16, 0));
    assert_eq!(
        told.take(),
        vec![
            (true, 0x10_0000, P, 0x20_0000, true),
            (true, 0x30_0000, P, 0x3000, false)
        ]
    );
    vm.ok(&map(1, 0x40_0000, 0x40_0000 + 2 * P - 1, 0x5000, RW));
    assert_eq!(told.take(), vec![(true, 0x40_0000, 2 * P, 0x5000, true)]);
    // An UNMAP that would split a mapping fails and removes nothing: nobody is told.
    assert_eq!(vm.status(&unmap(1, 0x40_0000, 0x40_0000 + P - 1)), S_RANGE);
    assert_eq!(told.take(), vec![]);
    // The device hears of the unmap while the table still holds the mapping.
    vm.ok(&unmap(1, 0x40_0000, 0x40_0000 + 2 * P - 1));
    assert_eq!(told.take(), vec![(false, 0x40_0000, 2 * P, 0x5000, true)]);
    // Another domain's mappings are none of its business.
    vm.ok(&attach(3, 8, 0));
    vm.ok(&map(3, 0x50_0000, 0x50_0000 + P - 1, 0x6000, RW));
    assert_eq!(told.take(), vec![]);
    // Nested dirty tracking cannot show its writes: refused while it is in the domain.
    assert_eq!(vm.status(&set_tracking(1, ENABLE)), S_UNSUPP);
    // Leaving: everything it was given goes.
    vm.ok(&detach(1, 16));
    assert_eq!(
        told.take(),
        vec![
            (false, 0x10_0000, P, 0x20_0000, true),
            (false, 0x30_0000, P, 0x3000, false)
        ]
    );
    // A domain that tracks dirty pages does not take it.
    vm.ok(&set_tracking(3, ENABLE));
    assert_eq!(vm.status(&attach(3, 16, 0)), S_UNSUPP);
    // (Domain 1 went with its last endpoint.) After a restore, the device is given its
    // domain's mappings again.
    vm.ok(&attach(1, 16, 0));
    vm.ok(&map(1, 0x10_0000, 0x10_0000 + P - 1, 0x20_0000, RW));
    vm.ok(&map(1, 0x30_0000, 0x30_0000 + P - 1, 0x3000, MAP_F_READ));
    told.take();
    let state = vm.table.state();
    let other = Vm::new(&[(8, true)]);
    let told2 = Arc::new(Told::default());
    other.table.add_external_endpoint(16, told2.clone());
    other.table.restore(&state).unwrap();
    other.table.replay_externals();
    assert_eq!(
        told2.take(),
        vec![
            (true, 0x10_0000, P, 0x20_0000, true),
            (true, 0x30_0000, P, 0x3000, false)
        ]
    );
    // The vIOMMU's reset empties every domain: the device drops what it was given (else
    // it would go on writing pages the guest has reused, and IOVA reuse would be refused).
    let mut dev = VirtioIommu::new(other.table.clone());
    dev.reset();
    assert_eq!(
        told2.take(),
        vec![
            (false, 0x10_0000, P, 0x20_0000, true),
            (false, 0x30_0000, P, 0x3000, false)
        ]
    );
}
