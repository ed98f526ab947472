// Copyright 2026 Ferry authors
// SPDX-License-Identifier: Apache-2.0

//! The device side of a vfio-user connection: messages are read, checked and handed to a
//! [`UserDevice`]; its answer, or its errno, goes back. A message that cannot be parsed is
//! answered with EINVAL and the connection goes on; one whose framing is broken ends it.

use std::fs::File;
use std::os::unix::net::UnixStream;

use log::{debug, warn};

use super::conn::{self, ConnError};
use super::wire::{
    Feature, Header, Reply, Request, FLAG_COMMAND, FLAG_ERROR, FLAG_NO_REPLY, FLAG_REPLY,
    HEADER_BYTES,
};
use crate::uapi::{
    VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT, VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
    VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP, VFIO_DEVICE_FEATURE_GET, VFIO_DEVICE_FEATURE_MIGRATION,
    VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, VFIO_DEVICE_FEATURE_SET,
};

/// An errno to answer with.
pub type Errno = i32;

/// What a device served over vfio-user does. Each method answers one request; an `Err`
/// goes back as an error reply with that errno.
pub trait UserDevice {
    /// (flags, regions, irqs) for DEVICE_GET_INFO.
    fn info(&self) -> (u32, u32, u32);
    /// (flags, size) of region `index`.
    fn region(&self, index: u32) -> Result<(u32, u64), Errno>;
    /// (flags, count) of interrupt `index`.
    fn irq(&self, index: u32) -> Result<(u32, u32), Errno>;
    fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        files: Vec<File>,
    ) -> Result<(), Errno>;
    fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> Result<(), Errno>;
    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), Errno>;
    fn dma_map(
        &mut self,
        flags: u32,
        address: u64,
        size: u64,
        file: File,
        offset: u64,
    ) -> Result<(), Errno>;
    fn dma_unmap(&mut self, address: u64, size: u64) -> Result<(), Errno>;
    fn reset(&mut self) -> Result<(), Errno>;
    /// Migration flags (VFIO_MIGRATION_*), or `None`: no migration.
    fn migration_flags(&self) -> Option<u64>;
    fn set_state(&mut self, state: u32) -> Result<(), Errno>;
    fn state(&self) -> u32;
    /// Up to `max` bytes of migration data; empty at the end.
    fn mig_data_read(&mut self, max: usize) -> Result<Vec<u8>, Errno>;
    fn mig_data_write(&mut self, data: &[u8]) -> Result<(), Errno>;
    /// Whether DMA logging is offered at all.
    fn can_log(&self) -> bool;
    fn log_start(&mut self, page_size: u64, ranges: &[(u64, u64)]) -> Result<(), Errno>;
    fn log_stop(&mut self) -> Result<(), Errno>;
    /// Set the bits of the pages of `[iova, iova + length)` written since the last report
    /// into `bitmap` (zeroed, `report_bitmap_bytes` long), and forget them.
    fn log_report(
        &mut self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u8],
    ) -> Result<(), Errno>;
    /// The client's capabilities, when it sent VERSION.
    fn client_capabilities(&mut self, _capabilities: &str) {}
}

/// The server's capabilities.
pub fn server_capabilities(migration: bool) -> String {
    if migration {
        r#"{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":1048576,"migration":{"pgsize":4096}}}"#
            .to_string()
    } else {
        r#"{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":1048576}}"#.to_string()
    }
}

/// Answers one request.
pub fn handle(dev: &mut dyn UserDevice, req: &Request, files: Vec<File>) -> Result<Reply, Errno> {
    match req {
        Request::Version { capabilities, .. } => {
            dev.client_capabilities(capabilities);
            Ok(Reply::Version {
                major: 0,
                minor: 1,
                capabilities: server_capabilities(dev.migration_flags().is_some()),
            })
        }
        Request::DmaMap {
            flags,
            offset,
            address,
            size,
        } => {
            let file = files.into_iter().next().ok_or(libc::EINVAL)?;
            dev.dma_map(*flags, *address, *size, file, *offset)
                .map(|()| Reply::Empty)
        }
        Request::DmaUnmap {
            flags,
            address,
            size,
        } => {
            if *flags != 0 {
                return Err(libc::EINVAL);
            }
            dev.dma_unmap(*address, *size).map(|()| Reply::DmaUnmap {
                flags: 0,
                address: *address,
                size: *size,
            })
        }
        Request::DeviceGetInfo => {
            let (flags, num_regions, num_irqs) = dev.info();
            Ok(Reply::DeviceInfo {
                flags,
                num_regions,
                num_irqs,
            })
        }
        Request::RegionInfo { index } => {
            dev.region(*index).map(|(flags, size)| Reply::RegionInfo {
                index: *index,
                flags,
                size,
                offset: 0,
            })
        }
        Request::GetIrqInfo { index } => dev.irq(*index).map(|(flags, count)| Reply::IrqInfo {
            index: *index,
            flags,
            count,
        }),
        Request::SetIrqs {
            flags,
            index,
            start,
            count,
        } => dev
            .set_irqs(*index, *flags, *start, *count, files)
            .map(|()| Reply::Empty),
        Request::RegionRead {
            region,
            offset,
            count,
        } => {
            let mut data = vec![0u8; *count as usize];
            dev.region_read(*region, *offset, &mut data)?;
            Ok(Reply::RegionRead {
                region: *region,
                offset: *offset,
                data,
            })
        }
        Request::RegionWrite {
            region,
            offset,
            data,
        } => {
            dev.region_write(*region, *offset, data)?;
            Ok(Reply::RegionWrite {
                region: *region,
                offset: *offset,
                count: data.len() as u32,
            })
        }
        Request::DeviceReset => dev.reset().map(|()| Reply::Empty),
        Request::Feature(f) => feature(dev, f),
        Request::MigDataRead { size } => dev
            .mig_data_read(*size as usize)
            .map(|data| Reply::MigData { data }),
        Request::MigDataWrite { data } => dev.mig_data_write(data).map(|()| Reply::Empty),
    }
}

fn feature(dev: &mut dyn UserDevice, f: &Feature) -> Result<Reply, Errno> {
    let migration = dev.migration_flags();
    match f {
        Feature::Probe { feature, flags } => {
            let get = flags & VFIO_DEVICE_FEATURE_GET != 0;
            let set = flags & VFIO_DEVICE_FEATURE_SET != 0;
            let ok = match *feature {
                VFIO_DEVICE_FEATURE_MIGRATION => migration.is_some() && !set,
                VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE => migration.is_some(),
                VFIO_DEVICE_FEATURE_DMA_LOGGING_START | VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP => {
                    dev.can_log() && !get
                }
                VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT => dev.can_log() && !set,
                _ => false,
            };
            if ok {
                Ok(Reply::Probed)
            } else {
                Err(libc::ENOTTY)
            }
        }
        Feature::MigrationFlags => migration.map(Reply::MigrationFlags).ok_or(libc::ENOTTY),
        Feature::SetState(s) => {
            migration.ok_or(libc::ENOTTY)?;
            dev.set_state(*s).map(|()| Reply::Empty)
        }
        Feature::GetState => {
            migration.ok_or(libc::ENOTTY)?;
            Ok(Reply::State(dev.state()))
        }
        Feature::LogStart { page_size, ranges } => {
            if !dev.can_log() {
                return Err(libc::ENOTTY);
            }
            dev.log_start(*page_size, ranges).map(|()| Reply::Empty)
        }
        Feature::LogStop => {
            if !dev.can_log() {
                return Err(libc::ENOTTY);
            }
            dev.log_stop().map(|()| Reply::Empty)
        }
        Feature::LogReport {
            iova,
            length,
            page_size,
        } => {
            if !dev.can_log() {
                return Err(libc::ENOTTY);
            }
            let n = super::wire::report_bitmap_bytes(*length, *page_size).ok_or(libc::EINVAL)?;
            let mut bitmap = vec![0u8; n];
            dev.log_report(*iova, *length, *page_size, &mut bitmap)?;
            Ok(Reply::LogReport {
                iova: *iova,
                length: *length,
                page_size: *page_size,
                bitmap,
            })
        }
    }
}

/// Serves one client until it goes away. `Ok` when it closed the connection; an error when
/// the framing broke (the connection cannot be trusted to be in step any more).
pub fn serve(stream: &mut UnixStream, dev: &mut dyn UserDevice) -> Result<(), ConnError> {
    loop {
        let msg = match conn::recv(stream) {
            Ok(m) => m,
            Err(ConnError::Closed) => return Ok(()),
            Err(e) => return Err(e),
        };
        let h = msg.header;
        if h.kind() != FLAG_COMMAND {
            return Err(ConnError::Wire(super::wire::WireError::NotCommand(
                h.kind(),
            )));
        }
        let reply = match Request::decode(h.command, &msg.payload) {
            Ok(req) => {
                debug!("vfio-user request {req:?}");
                handle(dev, &req, msg.files).map(|r| (r.encode_payload(&req), req))
            }
            Err(e) => {
                warn!("vfio-user message {} refused: {e}", h.id);
                Err(libc::EINVAL)
            }
        };
        if h.flags & FLAG_NO_REPLY != 0 && reply.is_ok() {
            continue;
        }
        let mut out = Header {
            id: h.id,
            command: h.command,
            size: HEADER_BYTES as u32,
            flags: FLAG_REPLY,
            error: 0,
        };
        let payload = match reply {
            Ok((p, _)) => p,
            Err(errno) => {
                out.flags |= FLAG_ERROR;
                out.error = errno as u32;
                Vec::new()
            }
        };
        conn::send(stream, out, &payload, &[])?;
    }
}
