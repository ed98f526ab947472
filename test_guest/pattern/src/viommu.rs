//! virtio-iommu (virtio 1.2 §5.13) with Ferry's dirty-tracking extension
//! (`devices/src/viommu/DIRTY_TRACKING.md`), as `dma-verify iommu=on` uses it: the wire
//! constants, where the region and the driver memory sit in IOVA space ([`Windows`],
//! [`REGION_IOVA`], [`MEMORY_IOVA`]), and readers for what the device writes (PROBE
//! properties, fault records). Shared by the guest and host-side tests.
//!
//! IOVA layout: the `dma-verify` region is cut into windows of [`WINDOW_PAGES`] pages,
//! each mapped by a MAP of its own, in **reverse order**: window `k` of `n` at
//! `REGION_IOVA + (n - 1 - k) * WINDOW_BYTES` (bank 0). `remap=on` moves a window between
//! bank 0 and bank 1 (the same layout from [`ALT_REGION_IOVA`]) or maps it again where it
//! was. The driver memory the device touches (rings, request headers and status bytes,
//! staging buffers) is one mapping at `MEMORY_IOVA + (gpa - driver memory base)`.

use core::fmt;
use core::ops::Range;

use crate::PAGE_SIZE;

const PAGE: u64 = PAGE_SIZE as u64;

/// PCI device id of a virtio-iommu (0x1040 + device type 23).
pub const DEVICE_ID: u16 = 0x1057;
/// Queue indices.
pub const REQUESTQ: u16 = 0;
pub const EVENTQ: u16 = 1;

// Feature bits.
pub const F_INPUT_RANGE: u64 = 1 << 0;
pub const F_DOMAIN_RANGE: u64 = 1 << 1;
pub const F_MAP_UNMAP: u64 = 1 << 2;
pub const F_BYPASS: u64 = 1 << 3;
pub const F_PROBE: u64 = 1 << 4;
pub const F_MMIO: u64 = 1 << 5;
pub const F_BYPASS_CONFIG: u64 = 1 << 6;
/// Ferry's extension: dirty tracking of domains.
pub const F_DIRTY_TRACKING: u64 = 1 << 10;
pub const F_VERSION_1: u64 = 1 << 32;
/// VIRTIO_F_ACCESS_PLATFORM: the device's DMA goes through the platform's IOMMU (QEMU
/// offers it with `iommu_platform=on`).
pub const F_ACCESS_PLATFORM: u64 = 1 << 33;

// Device configuration (40 bytes).
pub const CFG_PAGE_SIZE_MASK: u64 = 0;
pub const CFG_INPUT_START: u64 = 8;
pub const CFG_INPUT_END: u64 = 16;
pub const CFG_DOMAIN_START: u64 = 24;
pub const CFG_DOMAIN_END: u64 = 28;
pub const CFG_PROBE_SIZE: u64 = 32;
pub const CFG_BYPASS: u64 = 36;
/// Bytes of the configuration the driver reads (up to and with `bypass`).
pub const CFG_LEN: u64 = 37;

// Request types.
pub const T_ATTACH: u8 = 1;
pub const T_DETACH: u8 = 2;
pub const T_MAP: u8 = 3;
pub const T_UNMAP: u8 = 4;
pub const T_PROBE: u8 = 5;
pub const T_SET_DIRTY_TRACKING: u8 = 0x10;
pub const T_GET_DIRTY_BITMAP: u8 = 0x11;

// Device-readable bytes of each request (the device-writable part follows).
pub const ATTACH_LEN: u32 = 20;
pub const DETACH_LEN: u32 = 20;
pub const MAP_LEN: u32 = 36;
pub const UNMAP_LEN: u32 = 28;
pub const PROBE_LEN: u32 = 72;
pub const SET_DIRTY_TRACKING_LEN: u32 = 16;
pub const GET_DIRTY_BITMAP_LEN: u32 = 40;
/// The tail: status, 3 reserved bytes.
pub const TAIL_LEN: u32 = 4;

// Flags.
pub const MAP_F_READ: u32 = 1 << 0;
pub const MAP_F_WRITE: u32 = 1 << 1;
pub const DIRTY_TRACKING_F_ENABLE: u32 = 1 << 0;
pub const DIRTY_BITMAP_F_NO_CLEAR: u32 = 1 << 0;

// Status.
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;
pub const S_DEVERR: u8 = 3;
pub const S_INVAL: u8 = 4;
pub const S_RANGE: u8 = 5;
pub const S_NOENT: u8 = 6;
pub const S_FAULT: u8 = 7;
pub const S_NOMEM: u8 = 8;

/// A status byte's name.
pub fn status_name(s: u8) -> &'static str {
    match s {
        S_OK => "OK",
        S_IOERR => "IOERR",
        S_UNSUPP => "UNSUPP",
        S_DEVERR => "DEVERR",
        S_INVAL => "INVAL",
        S_RANGE => "RANGE",
        S_NOENT => "NOENT",
        S_FAULT => "FAULT",
        S_NOMEM => "NOMEM",
        _ => "unknown",
    }
}

/// A request type's name.
pub fn request_name(t: u8) -> &'static str {
    match t {
        T_ATTACH => "ATTACH",
        T_DETACH => "DETACH",
        T_MAP => "MAP",
        T_UNMAP => "UNMAP",
        T_PROBE => "PROBE",
        T_SET_DIRTY_TRACKING => "SET_DIRTY_TRACKING",
        T_GET_DIRTY_BITMAP => "GET_DIRTY_BITMAP",
        _ => "unknown",
    }
}

// PROBE properties.
pub const PROBE_T_NONE: u16 = 0;
pub const PROBE_T_RESV_MEM: u16 = 1;
pub const PROBE_T_DIRTY_TRACKING: u16 = 0x10;
/// Bits 0-11 of a property's `type` are the type.
pub const PROBE_T_MASK: u16 = 0xfff;
pub const RESV_MEM_T_RESERVED: u8 = 0;
pub const RESV_MEM_T_MSI: u8 = 1;
pub const PROBE_DIRTY_F_TRACKABLE: u32 = 1 << 0;

/// One PROBE property.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Property {
    /// RESV_MEM: `[start, end]` (inclusive) must not be mapped; `subtype` 1 = MSI doorbell.
    ResvMem { subtype: u8, start: u64, end: u64 },
    /// Ferry's dirty-tracking property.
    DirtyTracking { flags: u32 },
    /// A type the driver does not know: its type and payload length.
    Other { kind: u16, len: u16 },
}

impl fmt::Display for Property {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Property::ResvMem {
                subtype,
                start,
                end,
            } => {
                write!(f, "resv_mem subtype=")?;
                match subtype {
                    RESV_MEM_T_RESERVED => write!(f, "reserved")?,
                    RESV_MEM_T_MSI => write!(f, "msi")?,
                    s => write!(f, "{s}")?,
                }
                write!(f, " start={start:#x} end={end:#x}")
            }
            Property::DirtyTracking { flags } => write!(
                f,
                "dirty-tracking flags={flags:#x} trackable={}",
                if flags & PROBE_DIRTY_F_TRACKABLE != 0 {
                    "yes"
                } else {
                    "no"
                }
            ),
            Property::Other { kind, len } => write!(f, "property type={kind:#x} length={len}"),
        }
    }
}

/// A PROBE answer that cannot be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeError {
    /// The property at `at` (type `kind`, payload `len`) runs past the `probe_size` bytes.
    Truncated { at: usize, kind: u16, len: u16 },
    /// A property of a known type with the wrong payload length.
    BadLength { at: usize, kind: u16, len: u16 },
}

impl fmt::Display for ProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ProbeError::Truncated { at, kind, len } => write!(
                f,
                "property at byte {at} (type {kind:#x}, length {len}) runs past probe_size"
            ),
            ProbeError::BadLength { at, kind, len } => {
                write!(f, "property at byte {at} (type {kind:#x}) has length {len}")
            }
        }
    }
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from(le32(b, at)) | u64::from(le32(b, at + 4)) << 32
}

/// The properties of a PROBE answer (`buf` = the `probe_size` bytes before the tail), in
/// order; the list ends at a property of type NONE or at the end of `buf`.
pub fn properties(buf: &[u8]) -> Properties<'_> {
    Properties { buf, at: 0 }
}

pub struct Properties<'a> {
    buf: &'a [u8],
    at: usize,
}

impl Iterator for Properties<'_> {
    type Item = Result<Property, ProbeError>;

    fn next(&mut self) -> Option<Self::Item> {
        let at = self.at;
        if at + 4 > self.buf.len() {
            return None;
        }
        let kind = le16(self.buf, at) & PROBE_T_MASK;
        let len = le16(self.buf, at + 2);
        if kind == PROBE_T_NONE {
            return None;
        }
        let payload = at + 4;
        let end = payload + usize::from(len);
        if end > self.buf.len() {
            self.at = self.buf.len();
            return Some(Err(ProbeError::Truncated { at, kind, len }));
        }
        self.at = end;
        let p = &self.buf[payload..end];
        Some(match kind {
            PROBE_T_RESV_MEM if len >= 20 => Ok(Property::ResvMem {
                subtype: p[0],
                start: le64(p, 4),
                end: le64(p, 12),
            }),
            PROBE_T_DIRTY_TRACKING if len >= 8 => Ok(Property::DirtyTracking { flags: le32(p, 0) }),
            PROBE_T_RESV_MEM | PROBE_T_DIRTY_TRACKING => {
                Err(ProbeError::BadLength { at, kind, len })
            }
            _ => Ok(Property::Other { kind, len }),
        })
    }
}

// Fault records (eventq).
pub const FAULT_BYTES: usize = 24;
pub const FAULT_R_UNKNOWN: u8 = 0;
pub const FAULT_R_DOMAIN: u8 = 1;
pub const FAULT_R_MAPPING: u8 = 2;
pub const FAULT_F_READ: u32 = 1 << 0;
pub const FAULT_F_WRITE: u32 = 1 << 1;
pub const FAULT_F_ADDRESS: u32 = 1 << 8;

/// A fault record from the eventq.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    pub reason: u8,
    pub flags: u32,
    pub endpoint: u32,
    pub address: u64,
}

impl Fault {
    pub fn parse(b: &[u8; FAULT_BYTES]) -> Fault {
        Fault {
            reason: b[0],
            flags: le32(b, 4),
            endpoint: le32(b, 8),
            address: le64(b, 16),
        }
    }

    /// Whether `address` is meaningful (`VIRTIO_IOMMU_FAULT_F_ADDRESS`).
    pub fn has_address(&self) -> bool {
        self.flags & FAULT_F_ADDRESS != 0
    }
}

/// `reason=mapping flags=0x100 endpoint=0x18 address=0x...`
impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "reason=")?;
        match self.reason {
            FAULT_R_UNKNOWN => write!(f, "unknown")?,
            FAULT_R_DOMAIN => write!(f, "domain")?,
            FAULT_R_MAPPING => write!(f, "mapping")?,
            r => write!(f, "{r}")?,
        }
        write!(
            f,
            " flags={:#x} endpoint={:#x} address={:#x}",
            self.flags, self.endpoint, self.address
        )
    }
}

/// The endpoint ID of PCI function `bus:dev.func`: its BDF.
pub const fn endpoint(bus: u8, dev: u8, func: u8) -> u32 {
    (bus as u32) << 8 | ((dev as u32) & 31) << 3 | (func as u32) & 7
}

/// Pages in a window of the region (2 MiB).
pub const WINDOW_PAGES: u64 = 512;
pub const WINDOW_BYTES: u64 = WINDOW_PAGES * PAGE;
/// Bank 0 of the region's IOVAs (1 TiB): windows in reverse order from here.
pub const REGION_IOVA: u64 = 1 << 40;
/// Bank 1 (2 TiB), where `remap=on` moves windows to and from.
pub const ALT_REGION_IOVA: u64 = 2 << 40;
/// The driver memory the device touches (3 TiB): `MEMORY_IOVA + (gpa - base)`.
pub const MEMORY_IOVA: u64 = 3 << 40;
/// Largest region the layout holds (each bank is 1 TiB).
pub const MAX_REGION_BYTES: u64 = 1 << 40;

/// The region's windows: `pages` pages, window `k` = pages `[k * WINDOW_PAGES, ...)`, the
/// last one possibly shorter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Windows {
    pub pages: u64,
}

impl Windows {
    pub fn count(&self) -> u64 {
        self.pages.div_ceil(WINDOW_PAGES)
    }

    /// The window holding region page `page`.
    pub fn of(&self, page: u64) -> u64 {
        page / WINDOW_PAGES
    }

    /// The region pages of window `k`.
    pub fn pages_of(&self, k: u64) -> Range<u64> {
        k * WINDOW_PAGES..((k + 1) * WINDOW_PAGES).min(self.pages)
    }

    /// Where window `k` is mapped in bank `bank` (0 or 1): reversed, window 0 last.
    pub fn home(&self, k: u64, bank: u64) -> u64 {
        let base = if bank == 0 {
            REGION_IOVA
        } else {
            ALT_REGION_IOVA
        };
        base + (self.count() - 1 - k) * WINDOW_BYTES
    }

    /// The bank an IOVA of a window lies in.
    pub fn bank_of(iova: u64) -> u64 {
        u64::from(iova >= ALT_REGION_IOVA)
    }

    /// The IOVAs of a bank: `[start, end)`.
    pub fn bank(&self, bank: u64) -> Range<u64> {
        let start = self.home(self.count() - 1, bank);
        start..start + self.count() * WINDOW_BYTES
    }

    /// The windows wholly inside region pages `share`.
    pub fn whole_in(&self, share: &Range<u64>) -> Range<u64> {
        let first = share.start.div_ceil(WINDOW_PAGES);
        let mut end = share.end / WINDOW_PAGES;
        // The last window, shorter than the others, ends with the region.
        if share.end == self.pages && !self.pages.is_multiple_of(WINDOW_PAGES) {
            end += 1;
        }
        first..end.max(first)
    }

    /// `pages` cut at window boundaries: (window, pages of it).
    pub fn pieces(&self, pages: Range<u64>) -> impl Iterator<Item = (u64, Range<u64>)> {
        let end = pages.end;
        let mut at = pages.start;
        core::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let k = at / WINDOW_PAGES;
            let stop = ((k + 1) * WINDOW_PAGES).min(end);
            let piece = at..stop;
            at = stop;
            Some((k, piece))
        })
    }
}

/// `u64`s of a GET_DIRTY_BITMAP bitmap for `pages` pages.
pub const fn bitmap_words(pages: u64) -> u64 {
    pages.div_ceil(64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::string::ToString;
    use std::vec::Vec;

    #[test]
    fn windows_are_reversed_and_cover_the_region() {
        // 1000 pages: windows of 512 and 488.
        let w = Windows { pages: 1000 };
        assert_eq!(w.count(), 2);
        assert_eq!(w.pages_of(1), 512..1000);
        assert_eq!(w.home(0, 0), REGION_IOVA + WINDOW_BYTES);
        assert_eq!(w.home(1, 0), REGION_IOVA);
        assert_eq!(w.home(1, 1), ALT_REGION_IOVA);
        assert_eq!(w.bank(0), REGION_IOVA..REGION_IOVA + 2 * WINDOW_BYTES);
        assert_eq!(Windows::bank_of(w.home(0, 1)), 1);
        assert_eq!(Windows::bank_of(w.home(0, 0)), 0);
        // Every window's pages fit its IOVA slot and no two slots overlap.
        let w = Windows { pages: 16384 };
        let mut slots: Vec<u64> = (0..w.count()).map(|k| w.home(k, 0)).collect();
        slots.sort();
        slots.dedup();
        assert_eq!(slots.len() as u64, w.count());
        assert!(w.bank(0).end <= ALT_REGION_IOVA);
        assert!(
            Windows {
                pages: MAX_REGION_BYTES / PAGE
            }
            .bank(1)
            .end <= MEMORY_IOVA
        );
    }

    #[test]
    fn pieces_and_whole_windows() {
        let w = Windows { pages: 2048 };
        let p: Vec<_> = w.pieces(500..1100).collect();
        assert_eq!(p, [(0, 500..512), (1, 512..1024), (2, 1024..1100)]);
        assert_eq!(w.whole_in(&(500..1100)), 1..2);
        assert_eq!(w.whole_in(&(0..1024)), 0..2);
        assert_eq!(w.whole_in(&(100..400)), 1..1);
        // A short last window counts when the share ends with the region.
        let w = Windows { pages: 1000 };
        assert_eq!(w.whole_in(&(500..1000)), 1..2);
        assert_eq!(w.whole_in(&(0..1000)), 0..2);
        assert_eq!(w.pieces(0..0).count(), 0);
    }

    #[test]
    fn endpoints_are_bdfs() {
        assert_eq!(endpoint(0, 3, 0), 0x18);
        assert_eq!(endpoint(0, 0x1f, 7), 0xff);
        assert_eq!(endpoint(1, 0, 1), 0x101);
    }

    #[test]
    fn probe_properties() {
        let mut b = [0u8; 64];
        // RESV_MEM MSI 0xfee00000-0xfeefffff.
        b[0..2].copy_from_slice(&1u16.to_le_bytes());
        b[2..4].copy_from_slice(&20u16.to_le_bytes());
        b[4] = RESV_MEM_T_MSI;
        b[8..16].copy_from_slice(&0xfee0_0000u64.to_le_bytes());
        b[16..24].copy_from_slice(&0xfeef_ffffu64.to_le_bytes());
        // Dirty tracking, TRACKABLE; reserved high bits of the type are ignored.
        b[24..26].copy_from_slice(&0x7010u16.to_le_bytes());
        b[26..28].copy_from_slice(&8u16.to_le_bytes());
        b[28..32].copy_from_slice(&1u32.to_le_bytes());
        let props: Vec<_> = properties(&b).collect();
        assert_eq!(
            props,
            [
                Ok(Property::ResvMem {
                    subtype: 1,
                    start: 0xfee0_0000,
                    end: 0xfeef_ffff
                }),
                Ok(Property::DirtyTracking { flags: 1 })
            ]
        );
        assert_eq!(
            props[0].unwrap().to_string(),
            "resv_mem subtype=msi start=0xfee00000 end=0xfeefffff"
        );
        assert_eq!(
            props[1].unwrap().to_string(),
            "dirty-tracking flags=0x1 trackable=yes"
        );
        // Unknown types are skipped by their length; one past the end is an error.
        let mut b = [0u8; 16];
        b[0..2].copy_from_slice(&0x22u16.to_le_bytes());
        b[2..4].copy_from_slice(&4u16.to_le_bytes());
        b[8..10].copy_from_slice(&1u16.to_le_bytes());
        b[10..12].copy_from_slice(&20u16.to_le_bytes());
        let props: Vec<_> = properties(&b).collect();
        assert_eq!(
            props,
            [
                Ok(Property::Other { kind: 0x22, len: 4 }),
                Err(ProbeError::Truncated {
                    at: 8,
                    kind: 1,
                    len: 20
                })
            ]
        );
        let mut b = [0u8; 16];
        b[0..2].copy_from_slice(&0x10u16.to_le_bytes());
        b[2..4].copy_from_slice(&4u16.to_le_bytes());
        assert_eq!(
            properties(&b).next(),
            Some(Err(ProbeError::BadLength {
                at: 0,
                kind: 0x10,
                len: 4
            }))
        );
        assert_eq!(properties(&[0u8; 64]).count(), 0);
    }

    #[test]
    fn fault_records() {
        let mut b = [0u8; FAULT_BYTES];
        b[0] = FAULT_R_MAPPING;
        b[4..8].copy_from_slice(&(FAULT_F_ADDRESS | FAULT_F_WRITE).to_le_bytes());
        b[8..12].copy_from_slice(&0x18u32.to_le_bytes());
        b[16..24].copy_from_slice(&0x100_0000_0000u64.to_le_bytes());
        let f = Fault::parse(&b);
        assert!(f.has_address());
        assert_eq!(
            f.to_string(),
            "reason=mapping flags=0x102 endpoint=0x18 address=0x10000000000"
        );
    }

    #[test]
    fn names() {
        assert_eq!(status_name(S_RANGE), "RANGE");
        assert_eq!(status_name(99), "unknown");
        assert_eq!(request_name(T_GET_DIRTY_BITMAP), "GET_DIRTY_BITMAP");
        assert_eq!(bitmap_words(512), 8);
        assert_eq!(bitmap_words(1), 1);
    }
}
