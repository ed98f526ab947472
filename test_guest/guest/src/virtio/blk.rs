//! virtio-blk requests (virtio 1.2 §5.2.6) as the workloads make them: a 16-byte header
//! (type, reserved, sector), the data, a status byte: three descriptors. Each vCPU has a
//! request page in the driver memory (`guest_pattern::dma::DriverMemory::requests`) with
//! [`BATCH`] header slots and [`BATCH`] status bytes; request `j` of a batch (or slot `j`
//! of a stream) uses header `j` and status byte `j`. Addresses reach the device through
//! `dma_iommu::device_address` (IOVAs with `iommu=on`).

use guest_pattern::dma::{DriverMemory, BATCH, HEADER_BYTES, STATUS_OFFSET};

use super::queue::{Buf, Chain};
use crate::dma_iommu::device_address;

/// Request types.
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
/// Status: done.
pub const S_OK: u8 = 0;
/// What a status byte holds until the device writes it.
pub const S_UNSET: u8 = 0xff;
/// Bytes of a sector, the unit of the header's `sector`.
pub const SECTOR: u64 = 512;

/// The status byte's name, for failure lines.
pub fn status_name(s: u8) -> &'static str {
    match s {
        0 => "OK",
        1 => "IOERR",
        2 => "UNSUPP",
        S_UNSET => "not written by the device",
        _ => "unknown",
    }
}

/// A vCPU's request page.
#[derive(Clone, Copy)]
pub struct Requests(u64);

impl Requests {
    /// vCPU `cpu`'s page in `mem`.
    pub fn of(mem: &DriverMemory, cpu: u32) -> Requests {
        Requests(mem.requests(cpu))
    }

    /// Header `j` and status byte `j`.
    pub fn slot(&self, j: usize) -> (u64, u64) {
        assert!(j < BATCH);
        (
            self.0 + HEADER_BYTES * j as u64,
            self.0 + STATUS_OFFSET + j as u64,
        )
    }

    /// Writes header `j` (`kind`, `sector`) and presets status `j`; returns their
    /// addresses.
    pub fn prepare(&self, j: usize, kind: u32, sector: u64) -> (u64, u64) {
        let (header, status) = self.slot(j);
        // SAFETY: header j and status byte j (j < BATCH, asserted by `slot`) of a vCPU's
        // own request page in the driver memory (RAM checked at boot), used only by that
        // vCPU; the device touches them only while the request is in flight, which starts
        // after these writes.
        unsafe {
            core::ptr::write_volatile(header as *mut u32, kind);
            core::ptr::write_volatile((header + 4) as *mut u32, 0);
            core::ptr::write_volatile((header + 8) as *mut u64, sector);
            core::ptr::write_volatile(status as *mut u8, S_UNSET);
        }
        (header, status)
    }

    /// Status byte `j`, once its request is back.
    pub fn status(&self, j: usize) -> u8 {
        // SAFETY: a status byte of the request page (see `prepare`); its request has
        // completed, so the device no longer writes it.
        unsafe { core::ptr::read_volatile(self.slot(j).1 as *const u8) }
    }

    /// Prepares request `j`, an IN (`T_IN`, into `data`) or OUT (from `data`) of `len`
    /// bytes at `sector`, and returns its chain: header, data, status.
    pub fn data(&self, j: usize, kind: u32, sector: u64, data: u64, len: u32) -> Chain {
        let at = device_address(data, u64::from(len));
        self.data_at(j, kind, sector, at, len)
    }

    /// [`Requests::data`] with the data at device address `at` as it is (`fault=on`: an
    /// IOVA nothing maps).
    pub fn data_at(&self, j: usize, kind: u32, sector: u64, at: u64, len: u32) -> Chain {
        let (header, status) = self.prepare(j, kind, sector);
        Chain::new(&[
            Buf {
                addr: device_address(header, HEADER_BYTES),
                len: HEADER_BYTES as u32,
                device_writes: false,
            },
            Buf {
                addr: at,
                len,
                device_writes: kind == T_IN,
            },
            Buf {
                addr: device_address(status, 1),
                len: 1,
                device_writes: true,
            },
        ])
    }

    /// Prepares request `j` as a FLUSH and returns its chain: header, status.
    pub fn flush(&self, j: usize) -> Chain {
        let (header, status) = self.prepare(j, T_FLUSH, 0);
        Chain::new(&[
            Buf {
                addr: device_address(header, HEADER_BYTES),
                len: HEADER_BYTES as u32,
                device_writes: false,
            },
            Buf {
                addr: device_address(status, 1),
                len: 1,
                device_writes: true,
            },
        ])
    }
}
