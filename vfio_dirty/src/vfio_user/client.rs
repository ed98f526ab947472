// Copyright 2026 Ferry authors
// SPDX-License-Identifier: Apache-2.0

//! Ferry's side of a vfio-user connection: one request at a time, each answer checked
//! against its question (id, command, error flag, sizes), and a time limit on every answer
//! so a device process that hangs cannot hang the VMM.

use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;

use super::conn::{self, ConnError};
use super::wire::{
    capability_u64, Feature, Header, Reply, Request, WireError, DEVICE_FLAGS_PCI, FLAG_COMMAND,
    FLAG_REPLY, MAX_DATA_BYTES, PCI_NUM_REGIONS,
};
use crate::uapi::{VFIO_DEVICE_FEATURE_DMA_LOGGING_START, VFIO_DEVICE_FEATURE_SET};

/// What Ferry tells the server it can take.
pub const CLIENT_CAPABILITIES: &str = r#"{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":1048576,"migration":{"pgsize":4096}}}"#;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("device socket {path}: cannot connect: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("device {path}: {command}: {source}")]
    Conn {
        path: PathBuf,
        command: super::wire::Command,
        #[source]
        source: ConnError,
    },
    #[error("device {path}: {command} failed with errno {errno} ({})", std::io::Error::from_raw_os_error(*errno as i32))]
    Device {
        path: PathBuf,
        command: super::wire::Command,
        errno: u32,
    },
    #[error("device {path}: {what}")]
    Unusable { path: PathBuf, what: String },
}

impl ClientError {
    /// The errno the device answered with, if it answered with one.
    pub fn errno(&self) -> Option<u32> {
        match self {
            ClientError::Device { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// One region as the device describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionInfo {
    pub index: u32,
    pub flags: u32,
    pub size: u64,
}

/// A connected, version-negotiated vfio-user device.
pub struct Client {
    stream: UnixStream,
    path: PathBuf,
    next_id: u16,
    /// How long one request and its whole answer may take.
    timeout: Duration,
    /// Set by the first broken exchange: the stream is out of step from then on.
    broken: Option<String>,
    /// The server's migration page size, if it offered migration.
    pub migration_page_size: Option<u64>,
    pub num_regions: u32,
    pub num_irqs: u32,
}

impl Client {
    /// Connects, negotiates the version and reads the device's info. `timeout` bounds
    /// every answer from now on.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        let set = stream
            .set_read_timeout(Some(timeout))
            .and_then(|()| stream.set_write_timeout(Some(timeout)));
        set.map_err(|source| ClientError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        let mut c = Client {
            stream,
            path: path.to_path_buf(),
            next_id: 0,
            timeout,
            broken: None,
            migration_page_size: None,
            num_regions: 0,
            num_irqs: 0,
        };
        let reply = c.call(
            Request::Version {
                major: 0,
                minor: 1,
                capabilities: CLIENT_CAPABILITIES.into(),
            },
            &[],
        )?;
        if let Reply::Version {
            major,
            capabilities,
            ..
        } = reply
        {
            if major != 0 {
                return Err(c.unusable(format!("protocol major version {major}, Ferry speaks 0")));
            }
            c.migration_page_size = capability_u64(&capabilities, "pgsize");
        }
        if let Reply::DeviceInfo {
            flags,
            num_regions,
            num_irqs,
        } = c.call(Request::DeviceGetInfo, &[])?
        {
            if flags & DEVICE_FLAGS_PCI == 0 {
                return Err(c.unusable(format!("not a PCI device (flags {flags:#x})")));
            }
            if num_regions < PCI_NUM_REGIONS - 1 {
                return Err(c.unusable(format!(
                    "{num_regions} regions, a PCI device has at least {}",
                    PCI_NUM_REGIONS - 1
                )));
            }
            c.num_regions = num_regions;
            c.num_irqs = num_irqs;
        }
        Ok(c)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn unusable(&self, what: String) -> ClientError {
        ClientError::Unusable {
            path: self.path.clone(),
            what,
        }
    }

    /// Sends `req` (with `fds`) and returns the checked answer, all within the time limit.
    /// An exchange that breaks (no answer in time, a closed socket, an answer that does not
    /// fit the question) leaves the stream out of step: the connection is shut and every
    /// later call fails at once, naming the first failure.
    pub fn call(&mut self, req: Request, fds: &[RawFd]) -> Result<Reply, ClientError> {
        if let Some(why) = &self.broken {
            return Err(self.unusable(format!("the connection broke earlier: {why}")));
        }
        let r = self.exchange(req, fds);
        if let Err(e @ ClientError::Conn { .. }) = &r {
            self.broken = Some(e.to_string());
            let _ = self.stream.shutdown(std::net::Shutdown::Both);
        }
        r
    }

    fn exchange(&mut self, req: Request, fds: &[RawFd]) -> Result<Reply, ClientError> {
        let deadline = Some(std::time::Instant::now() + self.timeout);
        let command = req.command();
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let conn_err = |path: &Path, source| ClientError::Conn {
            path: path.to_path_buf(),
            command,
            source,
        };
        let header = Header {
            id,
            command: command as u16,
            size: 0,
            flags: FLAG_COMMAND,
            error: 0,
        };
        conn::send_by(
            &mut self.stream,
            header,
            &req.encode_payload(),
            fds,
            deadline,
        )
        .map_err(|e| conn_err(&self.path, e))?;
        let msg = conn::recv_by(&mut self.stream, deadline).map_err(|e| conn_err(&self.path, e))?;
        let h = msg.header;
        let wire = |e: WireError| conn_err(&self.path, ConnError::Wire(e));
        if h.kind() != FLAG_REPLY {
            return Err(wire(WireError::NotReply(h.kind())));
        }
        if h.id != id {
            return Err(wire(WireError::WrongId {
                sent: id,
                got: h.id,
            }));
        }
        if h.command != command as u16 {
            return Err(wire(WireError::WrongCommand {
                sent: command,
                got: h.command,
            }));
        }
        if h.is_error() {
            return Err(ClientError::Device {
                path: self.path.clone(),
                command,
                errno: h.error,
            });
        }
        Reply::decode(&req, &msg.payload).map_err(wire)
    }

    fn unexpected(&self, reply: Reply) -> ClientError {
        self.unusable(format!("unexpected answer {reply:?}"))
    }

    pub fn region_info(&mut self, index: u32) -> Result<RegionInfo, ClientError> {
        match self.call(Request::RegionInfo { index }, &[])? {
            Reply::RegionInfo {
                index: i,
                flags,
                size,
                ..
            } if i == index => Ok(RegionInfo { index, flags, size }),
            r => Err(self.unexpected(r)),
        }
    }

    pub fn region_read(
        &mut self,
        region: u32,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), ClientError> {
        let count = data.len().min(MAX_DATA_BYTES as usize) as u32;
        match self.call(
            Request::RegionRead {
                region,
                offset,
                count,
            },
            &[],
        )? {
            Reply::RegionRead { data: got, .. } => {
                data[..got.len()].copy_from_slice(&got);
                Ok(())
            }
            r => Err(self.unexpected(r)),
        }
    }

    pub fn region_write(
        &mut self,
        region: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), ClientError> {
        self.call(
            Request::RegionWrite {
                region,
                offset,
                data: data.to_vec(),
            },
            &[],
        )
        .map(|_| ())
    }

    /// Maps `[address, address + size)` of the device's DMA space to `fd` at `offset`.
    pub fn dma_map(
        &mut self,
        address: u64,
        size: u64,
        fd: RawFd,
        offset: u64,
        flags: u32,
    ) -> Result<(), ClientError> {
        self.call(
            Request::DmaMap {
                flags,
                offset,
                address,
                size,
            },
            &[fd],
        )
        .map(|_| ())
    }

    pub fn dma_unmap(&mut self, address: u64, size: u64) -> Result<(), ClientError> {
        self.call(
            Request::DmaUnmap {
                flags: 0,
                address,
                size,
            },
            &[],
        )
        .map(|_| ())
    }

    pub fn reset(&mut self) -> Result<(), ClientError> {
        self.call(Request::DeviceReset, &[]).map(|_| ())
    }

    /// Whether the device does DMA logging (a PROBE of DMA_LOGGING_START with SET).
    pub fn can_log_dma(&mut self) -> Result<bool, ClientError> {
        match self.call(
            Request::Feature(Feature::Probe {
                feature: VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
                flags: VFIO_DEVICE_FEATURE_SET,
            }),
            &[],
        ) {
            Ok(_) => Ok(true),
            Err(ClientError::Device { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub fn migration_flags(&mut self) -> Result<u64, ClientError> {
        match self.call(Request::Feature(Feature::MigrationFlags), &[])? {
            Reply::MigrationFlags(f) => Ok(f),
            r => Err(self.unexpected(r)),
        }
    }

    pub fn set_state(&mut self, state: u32) -> Result<(), ClientError> {
        self.call(Request::Feature(Feature::SetState(state)), &[])
            .map(|_| ())
    }

    pub fn state(&mut self) -> Result<u32, ClientError> {
        match self.call(Request::Feature(Feature::GetState), &[])? {
            Reply::State(s) => Ok(s),
            r => Err(self.unexpected(r)),
        }
    }

    pub fn log_start(&mut self, page_size: u64, ranges: &[(u64, u64)]) -> Result<(), ClientError> {
        self.call(
            Request::Feature(Feature::LogStart {
                page_size,
                ranges: ranges.to_vec(),
            }),
            &[],
        )
        .map(|_| ())
    }

    pub fn log_stop(&mut self) -> Result<(), ClientError> {
        self.call(Request::Feature(Feature::LogStop), &[])
            .map(|_| ())
    }

    /// The device's dirty bits for `[iova, iova + length)` (cleared on the device as read).
    /// `length` must keep the bitmap within one message: see
    /// [`super::wire::report_bitmap_bytes`].
    pub fn log_report(
        &mut self,
        iova: u64,
        length: u64,
        page_size: u64,
    ) -> Result<Vec<u8>, ClientError> {
        match self.call(
            Request::Feature(Feature::LogReport {
                iova,
                length,
                page_size,
            }),
            &[],
        )? {
            Reply::LogReport { bitmap, .. } => Ok(bitmap),
            r => Err(self.unexpected(r)),
        }
    }

    /// Up to `size` bytes of the device's migration data; empty when it has no more.
    pub fn mig_data_read(&mut self, size: u32) -> Result<Vec<u8>, ClientError> {
        match self.call(Request::MigDataRead { size }, &[])? {
            Reply::MigData { data } => Ok(data),
            r => Err(self.unexpected(r)),
        }
    }

    pub fn mig_data_write(&mut self, data: &[u8]) -> Result<(), ClientError> {
        for part in data.chunks(MAX_DATA_BYTES as usize) {
            self.call(
                Request::MigDataWrite {
                    data: part.to_vec(),
                },
                &[],
            )?;
        }
        Ok(())
    }

    /// Closes the connection both ways (the device sees the client go).
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}
