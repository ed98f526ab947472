//! A VFIO device's PCI function on Ferry's bus.
//!
//! What Ferry owns and what it forwards:
//! - The type 0 header (bytes 0x00-0x3f) is Ferry's, built once from the device's config
//!   region: identity, and BARs sized from the region info with the kinds the device's BAR
//!   flags give. The VMM places the BARs; guest BAR writes stay in Ferry's header and never
//!   reach the device. I/O BARs are refused (an error naming the BAR); the expansion ROM is
//!   not offered (its BAR reads 0); INTx is not offered (interrupt pin 0).
//! - The command register is kept in Ferry's header and forwarded to the device whenever
//!   the guest writes it (memory and bus-master enable matter to the device).
//! - Bytes 0x40-0xff (the capability list) are the device's, read and written through, with
//!   two exceptions: the MSI capability is hidden (unlinked from the chain, its writes
//!   dropped), so drivers use MSI-X; the MSI-X capability is Ferry's, like a virtio
//!   function's: the table and PBA live in [`Msix`], the guest's enable and function mask
//!   stay here, and vectors reach the device as SET_IRQS eventfds that the VMM wires to
//!   KVM (see [`VfioInterrupts`]). Extended config space (0x100 on) reads as zeros.
//! - BAR accesses are forwarded to the device's region (read/write at an offset: there is
//!   no mmap fast path), except the MSI-X table and PBA ranges, served by [`Msix`].
//!
//! A device operation that fails makes the function unusable, with one error logged:
//! reads return all ones from then on and writes are dropped (the guest sees a dead
//! device, never a VMM panic).

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::ops::{VfioOps, VfioOpsError, CONFIG_REGION, MSIX_IRQ};
use crate::pci::{
    declare_device_bars, DeviceBarError, MsiMessage, Msix, MsixEffect, MsixState, PciConfig,
    PciConfigState, PciDevice, PciIds, CONFIG_SIZE, MSIX_CAP_ID, MSIX_ENTRY_SIZE,
};

/// Capability id of MSI (hidden from the guest).
pub const MSI_CAP_ID: u8 = 0x05;
/// Where the header Ferry owns ends.
const HEADER_END: usize = 0x40;
const COMMAND: usize = 0x04;
const STATUS: usize = 0x06;
const CAPABILITIES_POINTER: usize = 0x34;
const STATUS_CAPABILITIES_LIST: u8 = 1 << 4;
/// Bytes of an MSI-X capability: id, next, control, table, PBA.
const MSIX_CAP_LEN: usize = 12;
const MSIX_CTL_ENABLE: u16 = 1 << 15;
const MSIX_CTL_FUNCTION_MASK: u16 = 1 << 14;
/// More capabilities than fit in 192 bytes means the list loops or is garbage.
const MAX_CAPABILITIES: usize = 48;

/// Why a device cannot be a Ferry PCI function.
#[derive(Debug, thiserror::Error)]
pub enum VfioFunctionError {
    #[error("{name}: {op}: {source}")]
    Ops {
        name: String,
        op: &'static str,
        source: VfioOpsError,
    },
    #[error("{name}: BAR {index} of {size:#x} bytes: {reason}")]
    Bar {
        name: String,
        index: usize,
        size: u64,
        reason: String,
    },
    #[error("{name}: capability list: {reason}")]
    Capabilities { name: String, reason: String },
    #[error("{name}: MSI-X capability at {offset:#x}: {reason}")]
    Msix {
        name: String,
        offset: usize,
        reason: String,
    },
    #[error("{name}: restoring the function: {reason}")]
    Restore { name: String, reason: String },
}

/// Where a function's MSI-X vectors go. The VMM implements it: per vector, one eventfd
/// that raises the guest interrupt (a KVM irqfd on the vector's GSI) and one where the
/// device's signals wait while the vector is masked.
pub trait VfioInterrupts: Send + Sync {
    /// The eventfd the device should signal vector `vector` on: the delivering one when
    /// `deliver`, else the parking one (-1 for none).
    fn eventfd(&self, vector: u16, deliver: bool) -> RawFd;
    /// The guest programmed vector `vector` with `message` (update its KVM route).
    fn route(&self, vector: u16, message: MsiMessage);
    /// Vector `vector` was unmasked: deliver what the device signalled while it was
    /// parked (the pending bit's meaning).
    fn unparked(&self, vector: u16);
}

/// Ferry's MSI-X of the function.
struct MsixCap {
    /// Offset of the capability in config space.
    offset: usize,
    model: Msix,
    /// The device's own capability bytes (table and PBA locations are reported as is).
    device_bytes: [u8; MSIX_CAP_LEN],
    /// Enable and function mask as the guest wrote them.
    control: u16,
    table_bar: usize,
    table_offset: u64,
    pba_bar: usize,
    pba_offset: u64,
    /// Vectors the device's MSI-X index has (at most the table's size is used).
    irq_count: u32,
    /// MSI-X is enabled on the device (SET_IRQS done).
    on_device: bool,
    /// Per vector: the device signals the delivering eventfd (not masked).
    delivering: Vec<bool>,
}

impl MsixCap {
    fn table_size(&self) -> u64 {
        self.model.table_size()
    }

    fn in_table(&self, bar: usize, offset: u64, len: usize) -> bool {
        bar == self.table_bar
            && offset >= self.table_offset
            && offset + len as u64 <= self.table_offset + self.table_size()
    }

    fn in_pba(&self, bar: usize, offset: u64, len: usize) -> bool {
        bar == self.pba_bar
            && offset >= self.pba_offset
            && offset + len as u64 <= self.pba_offset + self.model.pba_size()
    }

    fn function_masked(&self) -> bool {
        self.control & MSIX_CTL_FUNCTION_MASK != 0
    }

    fn vector_masked(&self, v: u16) -> bool {
        let mut ctl = [0u8; 4];
        self.model
            .read_table(u64::from(v) * MSIX_ENTRY_SIZE + 12, &mut ctl);
        u32::from_le_bytes(ctl) & 1 != 0
    }

    fn deliver(&self, v: u16) -> bool {
        !self.function_masked() && !self.vector_masked(v)
    }

    /// Vectors enabled on the device: the table's size, or fewer if the device's MSI-X
    /// index has fewer.
    fn device_vectors(&self) -> u16 {
        self.model
            .vectors()
            .min(u16::try_from(self.irq_count).unwrap_or(u16::MAX))
    }

    /// The capability as the guest sees it (`next` is the visible chain's).
    fn bytes(&self, next: u8) -> [u8; MSIX_CAP_LEN] {
        let mut b = self.device_bytes;
        b[1] = next;
        let size_bits = u16::from_le_bytes([b[2], b[3]]) & 0x07ff;
        b[2..4].copy_from_slice(&(size_bits | self.control).to_le_bytes());
        b
    }
}

/// A capability of the device's list: offset and id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Capability {
    offset: usize,
    id: u8,
    /// Bytes it spans (only known, and only needed, for hidden ones).
    len: usize,
}

/// The function's state as migrated: Ferry's header and MSI-X (the device's own state
/// travels in its migration data).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VfioFunctionState {
    pub config: PciConfigState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub msix: Option<MsixState>,
    #[serde(default)]
    pub msix_control: u16,
}

/// A VFIO device as a PCI function on Ferry's bus.
pub struct VfioPciFunction {
    name: String,
    ops: Arc<dyn VfioOps>,
    config: PciConfig,
    /// (BAR index, size) the device declared, in index order.
    bars: Vec<(usize, u64)>,
    /// The capabilities the guest sees, in chain order.
    visible: Vec<Capability>,
    /// Hidden ones (MSI): their bytes are never written.
    hidden: Vec<Capability>,
    msix: Option<MsixCap>,
    irqs: Option<Arc<dyn VfioInterrupts>>,
    /// Set at the first failed device operation.
    broken: AtomicBool,
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl VfioPciFunction {
    /// Reads the device's header, BARs and capability list; `name` is how errors and logs
    /// call it (its sysfs path).
    pub fn new(name: String, ops: Arc<dyn VfioOps>) -> Result<Self, VfioFunctionError> {
        let op_err = |op: &'static str| {
            let name = name.clone();
            move |source| VfioFunctionError::Ops { name, op, source }
        };
        let mut cfg = [0u8; CONFIG_SIZE];
        ops.region_read(CONFIG_REGION, 0, &mut cfg)
            .map_err(op_err("reading config space"))?;
        let ids = PciIds {
            vendor: le16(&cfg, 0),
            device: le16(&cfg, 2),
            class: le32(&cfg, 8) >> 8,
            revision: cfg[8],
            subsystem_vendor: le16(&cfg, 0x2c),
            subsystem: le16(&cfg, 0x2e),
            interrupt_pin: 0,
        };
        let mut config = PciConfig::new(ids);
        let bars = Self::declare_bars(&name, &*ops, &cfg, &mut config)?;
        let (visible, hidden) = Self::walk_capabilities(&name, &cfg)?;
        let msix = match visible.iter().find(|c| c.id == MSIX_CAP_ID) {
            Some(c) => Some(Self::msix_cap(&name, &*ops, &cfg, c.offset, &bars)?),
            None => {
                log::warn!(
                    "{name}: no MSI-X capability: the device has no interrupts in the guest \
                     (INTx and MSI are not offered)"
                );
                None
            }
        };
        if let Some(first) = visible.first() {
            config.set_bytes(CAPABILITIES_POINTER, &[first.offset as u8]);
            config.set_bytes(STATUS, &[STATUS_CAPABILITIES_LIST]);
        }
        Ok(VfioPciFunction {
            name,
            ops,
            config,
            bars,
            visible,
            hidden,
            msix,
            irqs: None,
            broken: AtomicBool::new(false),
        })
    }

    fn declare_bars(
        name: &str,
        ops: &dyn VfioOps,
        cfg: &[u8; CONFIG_SIZE],
        config: &mut PciConfig,
    ) -> Result<Vec<(usize, u64)>, VfioFunctionError> {
        declare_device_bars(config, cfg, |index| {
            ops.region_info(index as u32).map(|r| r.size)
        })
        .map_err(|e| match e {
            DeviceBarError::Size(source) => VfioFunctionError::Ops {
                name: name.to_string(),
                op: "VFIO_DEVICE_GET_REGION_INFO",
                source,
            },
            DeviceBarError::Bar {
                index,
                size,
                reason,
            } => VfioFunctionError::Bar {
                name: name.to_string(),
                index,
                size,
                reason,
            },
        })
    }

    /// The device's capability list, split into what the guest sees and what is hidden.
    fn walk_capabilities(
        name: &str,
        cfg: &[u8; CONFIG_SIZE],
    ) -> Result<(Vec<Capability>, Vec<Capability>), VfioFunctionError> {
        let bad = |reason: String| VfioFunctionError::Capabilities {
            name: name.to_string(),
            reason,
        };
        let (mut visible, mut hidden) = (Vec::new(), Vec::new());
        if cfg[STATUS] & STATUS_CAPABILITIES_LIST == 0 {
            return Ok((visible, hidden));
        }
        let mut at = usize::from(cfg[CAPABILITIES_POINTER] & 0xfc);
        while at != 0 {
            if !(HEADER_END..CONFIG_SIZE - 1).contains(&at) {
                return Err(bad(format!("a capability at {at:#x} is outside 0x40-0xff")));
            }
            if visible.len() + hidden.len() >= MAX_CAPABILITIES
                || visible
                    .iter()
                    .chain(hidden.iter())
                    .any(|c: &Capability| c.offset == at)
            {
                return Err(bad(format!("the list loops at {at:#x}")));
            }
            let id = cfg[at];
            let len = if id == MSI_CAP_ID {
                // 32- or 64-bit address, then mask and pending bits with per-vector masking.
                let ctl = le16(cfg, at + 2);
                let base = if ctl & (1 << 7) != 0 { 14 } else { 10 };
                if ctl & (1 << 8) != 0 {
                    base + 10
                } else {
                    base
                }
            } else {
                2
            };
            let c = Capability {
                offset: at,
                id,
                len: len.min(CONFIG_SIZE - at),
            };
            if c.id == MSI_CAP_ID {
                hidden.push(c);
            } else {
                visible.push(c);
            }
            at = usize::from(cfg[at + 1] & 0xfc);
        }
        Ok((visible, hidden))
    }

    fn msix_cap(
        name: &str,
        ops: &dyn VfioOps,
        cfg: &[u8; CONFIG_SIZE],
        offset: usize,
        bars: &[(usize, u64)],
    ) -> Result<MsixCap, VfioFunctionError> {
        let bad = |reason: String| VfioFunctionError::Msix {
            name: name.to_string(),
            offset,
            reason,
        };
        if offset + MSIX_CAP_LEN > CONFIG_SIZE {
            return Err(bad("it does not fit in config space".into()));
        }
        let mut device_bytes = [0u8; MSIX_CAP_LEN];
        device_bytes.copy_from_slice(&cfg[offset..offset + MSIX_CAP_LEN]);
        let vectors = (le16(&device_bytes, 2) & 0x07ff) + 1;
        let table = le32(&device_bytes, 4);
        let pba = le32(&device_bytes, 8);
        let model = Msix::new(vectors).map_err(|e| bad(e.to_string()))?;
        let (table_bar, table_offset) = ((table & 7) as usize, u64::from(table & !7));
        let (pba_bar, pba_offset) = ((pba & 7) as usize, u64::from(pba & !7));
        let fits = |bar: usize, off: u64, len: u64| {
            bars.iter()
                .any(|&(i, size)| i == bar && off.checked_add(len).is_some_and(|e| e <= size))
        };
        if !fits(table_bar, table_offset, model.table_size()) {
            return Err(bad(format!(
                "its table ({vectors} vectors at {table_offset:#x} in BAR {table_bar}) is \
                 not inside a BAR"
            )));
        }
        if !fits(pba_bar, pba_offset, model.pba_size()) {
            return Err(bad(format!(
                "its PBA (at {pba_offset:#x} in BAR {pba_bar}) is not inside a BAR"
            )));
        }
        let info = ops
            .irq_info(MSIX_IRQ)
            .map_err(|source| VfioFunctionError::Ops {
                name: name.to_string(),
                op: "VFIO_DEVICE_GET_IRQ_INFO",
                source,
            })?;
        if info.count == 0 {
            return Err(bad(
                "the device's MSI-X interrupt index has no vectors".into()
            ));
        }
        if info.count < u32::from(vectors) {
            log::warn!(
                "{name}: MSI-X table has {vectors} vectors, the device signals {}: the rest \
                 never fire",
                info.count
            );
        }
        Ok(MsixCap {
            offset,
            model,
            device_bytes,
            control: 0,
            table_bar,
            table_offset,
            pba_bar,
            pba_offset,
            irq_count: info.count,
            on_device: false,
            delivering: vec![false; usize::from(vectors)],
        })
    }

    /// Where the vectors go (before the guest runs).
    pub fn set_interrupts(&mut self, irqs: Arc<dyn VfioInterrupts>) {
        self.irqs = Some(irqs);
    }

    /// MSI-X vectors the function has (0: no MSI-X).
    pub fn msix_vectors(&self) -> u16 {
        self.msix.as_ref().map_or(0, |m| m.model.vectors())
    }

    /// BARs the device declared: (index, size).
    pub fn bars(&self) -> &[(usize, u64)] {
        &self.bars
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A device operation failed: the function is unusable from now on.
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Relaxed)
    }

    fn failed(&self, what: &str, e: &VfioOpsError) {
        if !self.broken.swap(true, Ordering::Relaxed) {
            log::error!(
                "{}: {what}: {e}; the device is unusable until the VM is restarted",
                self.name
            );
        }
    }

    /// The visible capability after `c` (0 at the end).
    fn next_visible(&self, i: usize) -> u8 {
        self.visible.get(i + 1).map_or(0, |c| c.offset as u8)
    }

    /// What Ferry says at config byte `at` (>= 0x40), if not the device.
    fn own_byte(&self, at: usize) -> Option<u8> {
        if let Some(m) = &self.msix {
            if (m.offset..m.offset + MSIX_CAP_LEN).contains(&at) {
                let i = self.visible.iter().position(|c| c.offset == m.offset)?;
                return Some(m.bytes(self.next_visible(i))[at - m.offset]);
            }
        }
        self.visible
            .iter()
            .position(|c| c.offset + 1 == at)
            .map(|i| self.next_visible(i))
    }

    fn in_hidden(&self, at: usize) -> bool {
        self.hidden
            .iter()
            .any(|c| (c.offset..c.offset + c.len).contains(&at) && !self.is_visible_byte(at))
    }

    fn is_visible_byte(&self, at: usize) -> bool {
        self.visible
            .iter()
            .any(|c| c.offset <= at && at < c.offset + 2)
            || self
                .msix
                .as_ref()
                .is_some_and(|m| (m.offset..m.offset + MSIX_CAP_LEN).contains(&at))
    }

    /// MSI-X on the device follows the guest's enable and masks: enabled with an eventfd
    /// per vector, one vector's eventfd swapped when its mask changes, disabled.
    fn sync_msix(&mut self) {
        if self.is_broken() {
            return;
        }
        let Some(m) = self.msix.as_mut() else {
            return;
        };
        let irqs = self.irqs.clone();
        let fd = |v: u16, deliver: bool| irqs.as_ref().map_or(-1, |s| s.eventfd(v, deliver));
        let enabled = m.model.enabled();
        let mut failure = None;
        if enabled && !m.on_device {
            let n = m.device_vectors();
            let want: Vec<bool> = (0..n).map(|v| m.deliver(v)).collect();
            let fds: Vec<RawFd> = want
                .iter()
                .enumerate()
                .map(|(v, &d)| fd(v as u16, d))
                .collect();
            match self.ops.set_irq_eventfds(MSIX_IRQ, 0, &fds) {
                Ok(()) => {
                    m.on_device = true;
                    m.delivering[..usize::from(n)].copy_from_slice(&want);
                }
                Err(e) => failure = Some(("enabling MSI-X", e)),
            }
        } else if !enabled && m.on_device {
            match self.ops.disable_irqs(MSIX_IRQ) {
                Ok(()) => {
                    m.on_device = false;
                    m.delivering.fill(false);
                }
                Err(e) => failure = Some(("disabling MSI-X", e)),
            }
        } else if enabled {
            for v in 0..m.device_vectors() {
                let want = m.deliver(v);
                if want == m.delivering[usize::from(v)] {
                    continue;
                }
                if let Err(e) = self
                    .ops
                    .set_irq_eventfds(MSIX_IRQ, u32::from(v), &[fd(v, want)])
                {
                    failure = Some(("changing an MSI-X vector's eventfd", e));
                    break;
                }
                m.delivering[usize::from(v)] = want;
                if want {
                    if let Some(s) = &irqs {
                        s.unparked(v);
                    }
                }
            }
        }
        if let Some((what, e)) = failure {
            self.failed(what, &e);
        }
    }

    fn effects(&self, fx: Vec<MsixEffect>) {
        let Some(irqs) = &self.irqs else {
            return;
        };
        for e in fx {
            // `Send` needs a pending bit in Ferry's PBA, which the device never sets (its
            // signals wait in the parking eventfd instead): only routes come here.
            if let MsixEffect::Route { vector, message } = e {
                irqs.route(vector, message);
            }
        }
    }

    /// The guest wrote bytes of the MSI-X capability: only message control's enable and
    /// function mask change.
    fn write_msix_cap(&mut self, at: usize, v: u8) {
        let Some(m) = self.msix.as_mut() else {
            return;
        };
        let ctl_hi = m.offset + 3;
        if at != ctl_hi {
            return;
        }
        let mask = MSIX_CTL_ENABLE | MSIX_CTL_FUNCTION_MASK;
        m.control = (u16::from(v) << 8) & mask;
        let fx = m.model.control_written(m.control);
        self.effects(fx);
        self.sync_msix();
    }

    /// Forwards guest bytes `[at, at + data.len())` (>= 0x40) to the device.
    fn forward_config(&self, at: usize, data: &[u8]) {
        if data.is_empty() || self.is_broken() {
            return;
        }
        if let Err(e) = self.ops.region_write(CONFIG_REGION, at as u64, data) {
            self.failed(&format!("writing config space at {at:#x}"), &e);
        }
    }

    /// Ferry's state of the function (the device paused).
    pub fn state(&self) -> VfioFunctionState {
        VfioFunctionState {
            config: self.config.state(),
            msix: self.msix.as_ref().map(|m| m.model.state()),
            msix_control: self.msix.as_ref().map_or(0, |m| m.control),
        }
    }

    /// Takes a migrated function's state: header, MSI-X table and enable, and tells the
    /// device its command register and vectors again.
    pub fn restore(&mut self, s: &VfioFunctionState) -> Result<(), VfioFunctionError> {
        let name = self.name.clone();
        let bad = |reason: String| VfioFunctionError::Restore {
            name: name.clone(),
            reason,
        };
        let mut config = self.config.clone();
        config.restore(&s.config).map_err(|e| bad(e.to_string()))?;
        let fx = match (self.msix.as_mut(), &s.msix) {
            (Some(m), Some(ms)) => {
                let fx = m.model.restore(ms).map_err(|e| bad(e.to_string()))?;
                m.control = s.msix_control & (MSIX_CTL_ENABLE | MSIX_CTL_FUNCTION_MASK);
                fx
            }
            (None, None) => Vec::new(),
            (mine, _) => {
                return Err(bad(format!(
                    "the source's function {} MSI-X, this device {}",
                    if s.msix.is_some() { "has" } else { "has no" },
                    if mine.is_some() { "has" } else { "has none" }
                )))
            }
        };
        self.config = config;
        self.effects(fx);
        let command = self.config.command().to_le_bytes();
        if let Err(e) = self
            .ops
            .region_write(CONFIG_REGION, COMMAND as u64, &command)
        {
            self.failed("writing the command register", &e);
        }
        self.sync_msix();
        Ok(())
    }
}

impl PciDevice for VfioPciFunction {
    fn config(&self) -> &PciConfig {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }

    fn read_config(&self, offset: usize, data: &mut [u8]) {
        let end = offset.saturating_add(data.len());
        // Ferry's header.
        if offset < HEADER_END {
            let n = (HEADER_END.min(end)) - offset;
            self.config.read(offset, &mut data[..n]);
        }
        // The device's capability space, with Ferry's bytes over it.
        let lo = offset.max(HEADER_END);
        let hi = end.min(CONFIG_SIZE);
        if lo < hi {
            let part = &mut data[lo - offset..hi - offset];
            part.fill(0xff);
            if !self.is_broken() {
                if let Err(e) = self.ops.region_read(CONFIG_REGION, lo as u64, part) {
                    part.fill(0xff);
                    self.failed(&format!("reading config space at {lo:#x}"), &e);
                }
            }
            for (i, b) in part.iter_mut().enumerate() {
                if let Some(v) = self.own_byte(lo + i) {
                    *b = v;
                }
            }
        }
        // No extended configuration space.
        if end > CONFIG_SIZE {
            let from = offset.max(CONFIG_SIZE) - offset;
            data[from..].fill(0);
        }
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) {
        let end = offset.saturating_add(data.len());
        if offset < HEADER_END {
            let n = HEADER_END.min(end) - offset;
            self.config.write(offset, &data[..n]);
            // The device learns of memory and bus-master enable; its BARs are Ferry's.
            if offset < COMMAND + 2 && offset + n > COMMAND && !self.is_broken() {
                let command = self.config.command().to_le_bytes();
                if let Err(e) = self
                    .ops
                    .region_write(CONFIG_REGION, COMMAND as u64, &command)
                {
                    self.failed("writing the command register", &e);
                }
            }
        }
        // Bytes 0x40-0xff: runs of device bytes forwarded, MSI-X handled here, hidden and
        // chain bytes dropped.
        let lo = offset.max(HEADER_END);
        let hi = end.min(CONFIG_SIZE);
        let mut run_start = lo;
        for at in lo..hi {
            let v = data[at - offset];
            let in_msix = self
                .msix
                .as_ref()
                .is_some_and(|m| (m.offset..m.offset + MSIX_CAP_LEN).contains(&at));
            let ours = in_msix || self.own_byte(at).is_some() || self.in_hidden(at);
            if ours {
                self.forward_config(run_start, &data[run_start - offset..at - offset]);
                run_start = at + 1;
                if in_msix {
                    self.write_msix_cap(at, v);
                }
            }
        }
        if run_start < hi {
            self.forward_config(run_start, &data[run_start - offset..hi - offset]);
        }
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if let Some(m) = &self.msix {
            if m.in_table(bar, offset, data.len()) {
                m.model.read_table(offset - m.table_offset, data);
                return;
            }
            if m.in_pba(bar, offset, data.len()) {
                m.model.read_pba(offset - m.pba_offset, data);
                return;
            }
        }
        if self.is_broken() {
            return;
        }
        if let Err(e) = self.ops.region_read(bar as u32, offset, data) {
            data.fill(0xff);
            self.failed(&format!("reading BAR {bar} at {offset:#x}"), &e);
        }
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if let Some(m) = self.msix.as_mut() {
            if m.in_table(bar, offset, data.len()) {
                let fx = m.model.write_table(offset - m.table_offset, data);
                self.effects(fx);
                self.sync_msix();
                return;
            }
            if m.in_pba(bar, offset, data.len()) {
                // The PBA is read-only.
                return;
            }
        }
        if self.is_broken() {
            return;
        }
        if let Err(e) = self.ops.region_write(bar as u32, offset, data) {
            self.failed(&format!("writing BAR {bar} at {offset:#x}"), &e);
        }
    }
}
