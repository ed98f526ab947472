//! The virtio-iommu device: its configuration space, the request queue (each request
//! answered by `requests::serve`) and the event queue (fault records).

use std::sync::Arc;

use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::requests::{serve, S_OK};
use super::table::IommuTable;
use super::{
    DOMAIN_RANGE, F_BYPASS_CONFIG, F_DIRTY_TRACKING, F_DOMAIN_RANGE, F_INPUT_RANGE, F_MAP_UNMAP,
    F_MMIO, F_PROBE, GRANULE, INPUT_RANGE, PROBE_SIZE,
};
use crate::guest_ram::GuestRam;
use crate::virtio::chains::{serve_chains, serve_chains_while, GuestErrorLog, Walked};
use crate::virtio::VirtioDevice;

/// virtio device type of an IOMMU.
pub const IOMMU_DEVICE_TYPE: u16 = 23;
/// PCI class: system peripheral, IOMMU (0x08, 0x06), as QEMU and Linux expect.
pub const IOMMU_PCI_CLASS: u32 = 0x08_06_00;
const QUEUE_SIZE: u16 = 256;
const REQUEST_Q: u16 = 0;
const EVENT_Q: u16 = 1;
/// Bytes of a fault record.
const FAULT_SIZE: usize = 24;
/// Readable bytes read of a request at most (the largest request reads 72).
const MAX_READABLE: usize = 128;
/// Device-writable bytes beyond the payload that are zero-filled at most; a larger gap
/// before the tail is left as it is.
const MAX_FILL: usize = 64 << 10;

/// The virtio-iommu device model.
pub struct VirtioIommu {
    table: Arc<IommuTable>,
    features: u64,
    errors: GuestErrorLog,
}

impl VirtioIommu {
    pub fn new(table: Arc<IommuTable>) -> VirtioIommu {
        VirtioIommu {
            table,
            features: 0,
            errors: GuestErrorLog::new("virtio-iommu"),
        }
    }

    pub fn table(&self) -> &Arc<IommuTable> {
        &self.table
    }

    /// The features the driver accepted (0 before DRIVER_OK).
    pub fn acked_features(&self) -> u64 {
        self.features
    }

    pub fn set_acked_features(&mut self, features: u64) {
        self.features = features;
    }

    /// Bad requests seen so far.
    pub fn errors(&self) -> u64 {
        self.errors.total()
    }

    fn config_bytes(&self) -> [u8; 40] {
        let mut c = [0u8; 40];
        c[0..8].copy_from_slice(&(!(GRANULE - 1)).to_le_bytes());
        c[8..16].copy_from_slice(&INPUT_RANGE.start().to_le_bytes());
        c[16..24].copy_from_slice(&INPUT_RANGE.end().to_le_bytes());
        c[24..28].copy_from_slice(&DOMAIN_RANGE.start().to_le_bytes());
        c[28..32].copy_from_slice(&DOMAIN_RANGE.end().to_le_bytes());
        c[32..36].copy_from_slice(&PROBE_SIZE.to_le_bytes());
        c[36] = u8::from(self.table.read().bypass);
        c
    }
}

/// Writes `bytes` at offset `at` of the chain's device-writable buffers, in order.
fn write_at(
    ram: &GuestRam,
    writable: &[Descriptor],
    mut at: usize,
    mut bytes: &[u8],
) -> Result<(), String> {
    for d in writable {
        let len = d.len() as usize;
        if at >= len {
            at -= len;
            continue;
        }
        let n = (len - at).min(bytes.len());
        let addr = d
            .addr()
            .0
            .checked_add(at as u64)
            .ok_or_else(|| format!("buffer at {:#x} wraps", d.addr().0))?;
        ram.write(addr, &bytes[..n]).map_err(|e| e.to_string())?;
        bytes = &bytes[n..];
        at = 0;
        if bytes.is_empty() {
            break;
        }
    }
    Ok(())
}

/// One request: its readable bytes in, the reply and the tail out. Returns the used
/// length (0 when nothing could be written).
fn serve_request(
    table: &IommuTable,
    features: u64,
    w: &Walked,
    ram: &GuestRam,
    log: &mut GuestErrorLog,
) -> u32 {
    if !w.usable(log, "a request has", "not answered") {
        return 0;
    }
    // The readable part, then the writable part (a readable buffer after a writable one
    // breaks the framing: it is not read).
    let split = w
        .descs
        .iter()
        .position(|d| d.is_write_only())
        .unwrap_or(w.descs.len());
    let (readable, writable) = w.descs.split_at(split);
    let writable: Vec<Descriptor> = writable
        .iter()
        .copied()
        .filter(|d| d.is_write_only())
        .collect();
    let writable_len: usize = writable.iter().map(|d| d.len() as usize).sum();
    if writable_len < 4 {
        log.report(format_args!(
            "head {}: {writable_len} device-writable bytes, no room for the status; not answered",
            w.head
        ));
        return 0;
    }
    // Every writable buffer must be RAM before the request is served: a GET_DIRTY_BITMAP
    // clears what it reports, which a reply that cannot be written would lose.
    if let Some(bad) = writable
        .iter()
        .find_map(|d| ram.check_ram(d.addr().0, d.len() as usize).err())
    {
        log.report(format_args!(
            "head {}: reply buffer: {bad}; not answered",
            w.head
        ));
        return 0;
    }
    let mut req = Vec::with_capacity(MAX_READABLE);
    for d in readable {
        let want = (MAX_READABLE - req.len()).min(d.len() as usize);
        let mut buf = vec![0u8; want];
        if let Err(e) = ram.read(d.addr().0, &mut buf) {
            log.report(format_args!("head {}: request unreadable: {e}", w.head));
            return 0;
        }
        req.extend_from_slice(&buf);
        if req.len() == MAX_READABLE {
            break;
        }
    }
    let reply = serve(table, &req, writable_len, features);
    let Some(reply) = reply else {
        // No head, or a type the device does not know: the spec's answer is a used
        // length of 0 and nothing written.
        log.report(format_args!(
            "head {}: unknown request type {:?}; not answered",
            w.head,
            req.first()
        ));
        return 0;
    };
    // The status goes at the end of the writable part (where drivers look for it), the
    // payload at its start. A refused request writes nothing but its tail
    // (DIRTY_TRACKING.md, GET_DIRTY_BITMAP).
    let tail_at = writable_len - 4;
    let payload = &reply.payload[..reply.payload.len().min(tail_at)];
    let mut out = payload.to_vec();
    let gap = tail_at - payload.len();
    if reply.status == S_OK && gap <= MAX_FILL {
        out.resize(tail_at, 0);
    }
    let tail = [reply.status, 0, 0, 0];
    let written =
        write_at(ram, &writable, 0, &out).and_then(|()| write_at(ram, &writable, tail_at, &tail));
    if let Err(e) = written {
        log.report(format_args!("head {}: reply not written: {e}", w.head));
        return 0;
    }
    u32::try_from(writable_len).unwrap_or(u32::MAX)
}

impl VirtioDevice for VirtioIommu {
    fn device_type(&self) -> u16 {
        IOMMU_DEVICE_TYPE
    }

    fn pci_class(&self) -> u32 {
        IOMMU_PCI_CLASS
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        1u64 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << F_INPUT_RANGE
            | 1 << F_DOMAIN_RANGE
            | 1 << F_MAP_UNMAP
            | 1 << F_PROBE
            | 1 << F_MMIO
            | 1 << F_BYPASS_CONFIG
            | 1 << F_DIRTY_TRACKING
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let c = self.config_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| c.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    /// Only `bypass` (byte 36) is writable, with 0 or 1.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if offset == 36 && data.len() == 1 && data[0] <= 1 {
            let mut t = self.table.write();
            if data[0] == 0 {
                let ids: Vec<u32> = t.endpoints.keys().copied().collect();
                for id in ids {
                    self.table.bypass_ends(&t, id);
                }
            }
            t.bypass = data[0] == 1;
        } else {
            self.errors.report(format_args!(
                "config write of {} bytes at {offset} refused (only bypass, byte 36, takes 0 or 1)",
                data.len()
            ));
        }
    }

    fn activate(&mut self, features: u64) -> Result<(), String> {
        self.features = features;
        Ok(())
    }

    fn queue_notifiers(&mut self, notifiers: Vec<EventFd>) {
        // Faults arrive from other devices' threads: they wake the event queue.
        self.table
            .set_fault_kick(notifiers.into_iter().nth(usize::from(EVENT_Q)));
    }

    fn buffers_wait_for_events(&self, index: u16) -> bool {
        index == EVENT_Q
    }

    fn process_queue(&mut self, index: u16, queue: &mut Queue, ram: &GuestRam) -> usize {
        let table = self.table.clone();
        match index {
            REQUEST_Q => {
                let features = self.features;
                serve_chains(queue, ram, 64, &mut self.errors, |w, ram, log| {
                    serve_request(&table, features, w, ram, log)
                })
            }
            EVENT_Q => {
                let mut pending = table.pop_fault();
                let taken = std::cell::Cell::new(None);
                let done = serve_chains_while(
                    queue,
                    ram,
                    8,
                    &mut self.errors,
                    || {
                        // A record taken for a chain that was not served (its head is
                        // past the table) waits for the next chain.
                        if taken.get().is_some() {
                            return true;
                        }
                        if pending.is_none() {
                            pending = table.pop_fault();
                        }
                        let p = pending.take();
                        taken.set(p);
                        p.is_some()
                    },
                    |w, ram, log| {
                        let Some(record) = taken.take() else {
                            return 0;
                        };
                        let buf = w
                            .descs
                            .iter()
                            .find(|d| d.is_write_only() && d.len() as usize >= FAULT_SIZE);
                        let Some(buf) = buf.filter(|_| w.broken().is_none()) else {
                            log.report(format_args!(
                                "event buffer head {} has no device-writable {FAULT_SIZE} bytes; fault record kept",
                                w.head
                            ));
                            table.unpop_fault(record);
                            return 0;
                        };
                        match ram.write(buf.addr().0, &record.bytes()) {
                            Ok(()) => FAULT_SIZE as u32,
                            Err(e) => {
                                log.report(format_args!("fault record not written: {e}"));
                                table.unpop_fault(record);
                                0
                            }
                        }
                    },
                );
                // The one looked at but not given a buffer goes back first in line.
                if let Some(p) = pending.or(taken.take()) {
                    table.unpop_fault(p);
                }
                done
            }
            _ => 0,
        }
    }

    /// Every endpoint leaves its domain (their footprints dirty if a migration tracks);
    /// `bypass` stays as it is (the spec: it changes on a system reset only).
    fn reset(&mut self) {
        self.features = 0;
        // Fault records were for the driver that is gone.
        self.table.set_pending_faults(Vec::new());
        let mut t = self.table.write();
        let ids: Vec<u32> = t.domains.keys().copied().collect();
        for id in ids {
            // Devices in other processes drop the domain's mappings (their logs read first).
            let maps: Vec<_> = t.domains[&id].mappings.mappings().cloned().collect();
            self.table.tell_externals(&t, id, None, &maps, false);
            self.table.endpoint_leaves(&t, id);
        }
        let endpoints: Vec<u32> = t.endpoints.keys().copied().collect();
        for id in endpoints {
            self.table.bypass_ends(&t, id);
        }
        t.domains.clear();
        for e in t.endpoints.values_mut() {
            e.domain = None;
        }
    }
}
