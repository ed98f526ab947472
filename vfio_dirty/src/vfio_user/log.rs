// Copyright 2026 Ferry authors
// SPDX-License-Identifier: Apache-2.0

//! A vfio-user device's DMA log behind [`DirtyBackend`]: the device is its own single
//! "domain", capable when it answers the DMA_LOGGING_START probe. Mapping hands the device
//! the guest RAM file behind the range; reading asks for a report, one message-sized piece
//! at a time.
//!
//! The protocol's report clears what it returns and has no NO_CLEAR: the read just before
//! an unmap ([`crate::DmaTracker::unmap`]) clears bits of a range that is going away anyway,
//! so nothing is lost by it.

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard};

use super::client::{Client, ClientError};
use super::wire::{report_bitmap_bytes, DMA_MAP_READ, DMA_MAP_WRITE, MAX_DATA_BYTES};
use crate::bitmap::DirtyBitmap;
use crate::policy::{BackendError, DeviceId, DirtyBackend, DomainId};

/// Where guest-physical memory lives: the file and offset behind `[gpa, gpa + length)`,
/// or `None` when the range is not inside one piece of guest RAM.
pub trait GuestRamFiles: Send {
    fn file_of(&self, gpa: u64, length: u64) -> Option<(RawFd, u64)>;
}

/// A test-only seam: drop every report (the device's writes are then lost unless caught).
pub const DROP_REPORTS_ENV: &str = "FERRY_TEST_DROP_USER_DEVICE_LOG";
/// A test-only seam: skip only the read before an unmap (rule 6), so the bits of a range
/// the guest unmaps go with it.
pub const SKIP_UNMAP_READ_ENV: &str = "FERRY_TEST_SKIP_UNMAP_LOG_READ";

pub struct UserDeviceLog {
    client: Arc<Mutex<Client>>,
    ram: Box<dyn GuestRamFiles>,
    can_log: Option<bool>,
    drop_reports: bool,
    skip_unmap_read: bool,
}

fn backend_err(op: &'static str, e: &ClientError) -> BackendError {
    BackendError {
        op,
        errno: e.errno().map_or(libc::EIO, |e| e as i32),
    }
}

impl UserDeviceLog {
    pub fn new(client: Arc<Mutex<Client>>, ram: Box<dyn GuestRamFiles>) -> Self {
        let drop_reports = std::env::var_os(DROP_REPORTS_ENV).is_some();
        if drop_reports {
            log::warn!(
                "{DROP_REPORTS_ENV} is set: every DMA log report of this vfio-user device is \
                 thrown away (a test seam; a migration then loses the pages it wrote)"
            );
        }
        let skip_unmap_read = std::env::var_os(SKIP_UNMAP_READ_ENV).is_some();
        if skip_unmap_read {
            log::warn!(
                "{SKIP_UNMAP_READ_ENV} is set: a vfio-user device's DMA log is not read before \
                 a mapping goes (a test seam; a migration then loses what it wrote there)"
            );
        }
        UserDeviceLog {
            client,
            ram,
            can_log: None,
            drop_reports,
            skip_unmap_read,
        }
    }

    fn client(&self) -> MutexGuard<'_, Client> {
        // A panic while holding the client leaves it mid-message at worst; the next answer
        // check catches that.
        self.client.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn capable(&mut self) -> Result<bool, BackendError> {
        if let Some(c) = self.can_log {
            return Ok(c);
        }
        let c = self
            .client()
            .can_log_dma()
            .map_err(|e| backend_err("DMA_LOGGING probe", &e))?;
        self.can_log = Some(c);
        Ok(c)
    }

    /// The test seam of [`SKIP_UNMAP_READ_ENV`], for tests that cannot set the environment.
    #[doc(hidden)]
    pub fn set_skip_unmap_read(&mut self, on: bool) {
        self.skip_unmap_read = on;
    }

    /// The guest RAM file and offset behind `[gpa, gpa + length)`.
    pub fn ram_file(&self, gpa: u64, length: u64) -> Option<(RawFd, u64)> {
        self.ram.file_of(gpa, length)
    }

    /// The largest range one report can cover at `page_size`.
    pub fn report_span(page_size: u64) -> u64 {
        u64::from(MAX_DATA_BYTES) * 8 * page_size
    }
}

impl DirtyBackend for UserDeviceLog {
    fn device_dirty_capable(&mut self, _dev: DeviceId) -> Result<bool, BackendError> {
        self.capable()
    }

    fn alloc_domain(&mut self, _dev: DeviceId, _dirty: bool) -> Result<DomainId, BackendError> {
        Ok(0)
    }

    fn free_domain(&mut self, _domain: DomainId) -> Result<(), BackendError> {
        Ok(())
    }

    fn attach(&mut self, _dev: DeviceId, _domain: DomainId) -> Result<(), BackendError> {
        Ok(())
    }

    fn detach(&mut self, _dev: DeviceId, _domain: DomainId) -> Result<(), BackendError> {
        Ok(())
    }

    fn domain_dirty_capable(&mut self, _domain: DomainId) -> Result<bool, BackendError> {
        self.capable()
    }

    fn set_tracking(&mut self, _domain: DomainId, enable: bool) -> Result<(), BackendError> {
        let mut c = self.client();
        if enable {
            // No ranges: everything mapped, now and later (mappings follow the guest).
            c.log_start(4096, &[])
                .map_err(|e| backend_err("DMA_LOGGING_START", &e))
        } else {
            c.log_stop()
                .map_err(|e| backend_err("DMA_LOGGING_STOP", &e))
        }
    }

    fn read_dirty(
        &mut self,
        _domain: DomainId,
        bitmap: &mut DirtyBitmap,
        no_clear: bool,
    ) -> Result<(), BackendError> {
        // (no_clear: the read before an unmap; the report clears, which is what the unmap
        // would do anyway.)
        if no_clear && self.skip_unmap_read {
            return Ok(());
        }
        let (iova, length, ps) = (bitmap.iova(), bitmap.length(), bitmap.page_size());
        let span = Self::report_span(ps);
        let drop_reports = self.drop_reports;
        let mut c = self.client();
        let mut at = 0u64;
        while at < length {
            let len = (length - at).min(span);
            let bytes = c
                .log_report(iova + at, len, ps)
                .map_err(|e| backend_err("DMA_LOGGING_REPORT", &e))?;
            debug_assert_eq!(Some(bytes.len()), report_bitmap_bytes(len, ps));
            if !drop_reports {
                let first_page = at / ps;
                for (w, word) in bytes.chunks_exact(8).enumerate() {
                    let word = u64::from_le_bytes(word.try_into().expect("8 bytes"));
                    let mut bits = word;
                    while bits != 0 {
                        let b = bits.trailing_zeros() as u64;
                        bits &= bits - 1;
                        let page = first_page + w as u64 * 64 + b;
                        if page * ps < length {
                            bitmap.set(iova + page * ps);
                        }
                    }
                }
            }
            at += len;
        }
        Ok(())
    }

    fn map(&mut self, iova: u64, length: u64, gpa: u64) -> Result<(), BackendError> {
        let (fd, offset) = self.ram.file_of(gpa, length).ok_or(BackendError {
            op: "DMA_MAP (no guest RAM file behind the range)",
            errno: libc::EFAULT,
        })?;
        self.client()
            .dma_map(iova, length, fd, offset, DMA_MAP_READ | DMA_MAP_WRITE)
            .map_err(|e| backend_err("DMA_MAP", &e))
    }

    fn unmap(&mut self, iova: u64, length: u64) -> Result<u64, BackendError> {
        self.client()
            .dma_unmap(iova, length)
            .map(|()| length)
            .map_err(|e| backend_err("DMA_UNMAP", &e))
    }
}
