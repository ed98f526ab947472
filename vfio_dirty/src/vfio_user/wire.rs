// Copyright 2026 Ferry authors
// SPDX-License-Identifier: Apache-2.0

//! vfio-user messages as bytes, both directions, with every length checked before it is
//! trusted: a peer's message is untrusted input (the device process may be broken or
//! hostile, and so may a client). Written from the protocol's specification (version 0.9:
//! commands 1–13, DEVICE_FEATURE 16, MIG_DATA_READ 17, MIG_DATA_WRITE 18); the `vfio_user`
//! crate stops at command 14, keeps its socket private and does not read error replies,
//! so Ferry frames the messages itself.
//!
//! Every message is a 16-byte header (`id`, `command`, `size` of the whole message, `flags`,
//! `error`) and a payload. Integers are little-endian.

use std::fmt;

use thiserror::Error;

use crate::uapi::{
    VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT, VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
    VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP, VFIO_DEVICE_FEATURE_GET, VFIO_DEVICE_FEATURE_MASK,
    VFIO_DEVICE_FEATURE_MIGRATION, VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, VFIO_DEVICE_FEATURE_PROBE,
    VFIO_DEVICE_FEATURE_SET,
};

pub const HEADER_BYTES: usize = 16;
/// Largest data transfer either side offers (region access, migration data, a bitmap).
pub const MAX_DATA_BYTES: u32 = 1 << 20;
/// Largest message accepted: a data transfer plus its fixed part.
pub const MAX_MESSAGE_BYTES: u32 = MAX_DATA_BYTES + 64;
/// Most ranges a DMA_LOGGING_START may name.
pub const MAX_LOG_RANGES: u32 = 1024;

/// Message type (`flags & 0xf`).
pub const FLAG_TYPE_MASK: u32 = 0xf;
pub const FLAG_COMMAND: u32 = 0;
pub const FLAG_REPLY: u32 = 1;
pub const FLAG_NO_REPLY: u32 = 1 << 4;
pub const FLAG_ERROR: u32 = 1 << 5;

/// `vfio_device_info.flags`: a PCI device.
pub const DEVICE_FLAGS_PCI: u32 = 1 << 1;
/// `vfio_region_info.flags`.
pub const REGION_FLAG_READ: u32 = 1 << 0;
pub const REGION_FLAG_WRITE: u32 = 1 << 1;
/// DMA_MAP flags.
pub const DMA_MAP_READ: u32 = 1 << 0;
pub const DMA_MAP_WRITE: u32 = 1 << 1;
/// The PCI configuration space region's index (VFIO_PCI_CONFIG_REGION_INDEX).
pub const PCI_CONFIG_REGION: u32 = 7;
/// Regions a PCI device has (BAR 0–5, ROM, config, VGA).
pub const PCI_NUM_REGIONS: u32 = 9;

/// The commands, numbered as the specification numbers them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Command {
    Version = 1,
    DmaMap = 2,
    DmaUnmap = 3,
    DeviceGetInfo = 4,
    DeviceGetRegionInfo = 5,
    GetRegionIoFds = 6,
    GetIrqInfo = 7,
    SetIrqs = 8,
    RegionRead = 9,
    RegionWrite = 10,
    DmaRead = 11,
    DmaWrite = 12,
    DeviceReset = 13,
    RegionWriteMulti = 15,
    DeviceFeature = 16,
    MigDataRead = 17,
    MigDataWrite = 18,
}

impl Command {
    pub fn from_u16(v: u16) -> Option<Command> {
        use Command::*;
        Some(match v {
            1 => Version,
            2 => DmaMap,
            3 => DmaUnmap,
            4 => DeviceGetInfo,
            5 => DeviceGetRegionInfo,
            6 => GetRegionIoFds,
            7 => GetIrqInfo,
            8 => SetIrqs,
            9 => RegionRead,
            10 => RegionWrite,
            11 => DmaRead,
            12 => DmaWrite,
            13 => DeviceReset,
            15 => RegionWriteMulti,
            16 => DeviceFeature,
            17 => MigDataRead,
            18 => MigDataWrite,
            _ => return None,
        })
    }
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum WireError {
    #[error("message size {0} is outside 16..={MAX_MESSAGE_BYTES} bytes")]
    Size(u32),
    #[error("unknown command {0}")]
    UnknownCommand(u16),
    #[error("{command:?}: payload of {got} bytes, need {need}")]
    Short {
        command: Command,
        got: usize,
        need: usize,
    },
    #[error("{command:?}: payload of {got} bytes, at most {max} expected")]
    Long {
        command: Command,
        got: usize,
        max: usize,
    },
    #[error("{command:?}: argsz {argsz} does not match the {len} bytes sent")]
    Argsz {
        command: Command,
        argsz: u32,
        len: usize,
    },
    #[error("{command:?}: count {count} does not match the {len} data bytes sent")]
    Count {
        command: Command,
        count: u32,
        len: usize,
    },
    #[error("{command:?}: {what} {value} is over the limit {max}")]
    TooMany {
        command: Command,
        what: &'static str,
        value: u64,
        max: u64,
    },
    #[error("VERSION capabilities are not NUL-terminated UTF-8 JSON")]
    Capabilities,
    #[error("DEVICE_FEATURE: feature {feature} with flags {flags:#x} is not one Ferry speaks")]
    Feature { feature: u32, flags: u32 },
    #[error("reply to command {sent:?} carries command {got}")]
    WrongCommand { sent: Command, got: u16 },
    #[error("reply id {got} to message {sent}")]
    WrongId { sent: u16, got: u16 },
    #[error("message of type {0} where a reply was expected")]
    NotReply(u32),
    #[error("message of type {0} where a command was expected")]
    NotCommand(u32),
}

/// The fixed part of every message.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub id: u16,
    pub command: u16,
    /// Bytes in the whole message, this header included.
    pub size: u32,
    pub flags: u32,
    pub error: u32,
}

impl Header {
    pub fn parse(b: &[u8; HEADER_BYTES]) -> Result<Header, WireError> {
        let h = Header {
            id: u16::from_le_bytes([b[0], b[1]]),
            command: u16::from_le_bytes([b[2], b[3]]),
            size: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            flags: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            error: u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
        };
        if h.size < HEADER_BYTES as u32 || h.size > MAX_MESSAGE_BYTES {
            return Err(WireError::Size(h.size));
        }
        Ok(h)
    }

    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[0..2].copy_from_slice(&self.id.to_le_bytes());
        b[2..4].copy_from_slice(&self.command.to_le_bytes());
        b[4..8].copy_from_slice(&self.size.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..16].copy_from_slice(&self.error.to_le_bytes());
        b
    }

    pub fn kind(&self) -> u32 {
        self.flags & FLAG_TYPE_MASK
    }

    pub fn is_error(&self) -> bool {
        self.flags & FLAG_ERROR != 0
    }
}

/// A DEVICE_FEATURE request, by feature.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Feature {
    /// PROBE of `feature` with GET and/or SET (`flags`: the GET/SET bits asked about).
    Probe { feature: u32, flags: u32 },
    /// GET VFIO_DEVICE_FEATURE_MIGRATION: the migration flags.
    MigrationFlags,
    /// SET VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE.
    SetState(u32),
    /// GET VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE.
    GetState,
    /// SET DMA_LOGGING_START: the tracking granule and the ranges (none: all mapped).
    LogStart {
        page_size: u64,
        ranges: Vec<(u64, u64)>,
    },
    /// SET DMA_LOGGING_STOP.
    LogStop,
    /// GET DMA_LOGGING_REPORT: the bits of `[iova, iova + length)`, cleared as read.
    LogReport {
        iova: u64,
        length: u64,
        page_size: u64,
    },
}

/// A command, client to server (DMA_READ/WRITE, server to client, are not used by Ferry and
/// are refused as unknown by both sides).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    Version {
        major: u16,
        minor: u16,
        capabilities: String,
    },
    DmaMap {
        flags: u32,
        offset: u64,
        address: u64,
        size: u64,
    },
    DmaUnmap {
        flags: u32,
        address: u64,
        size: u64,
    },
    DeviceGetInfo,
    RegionInfo {
        index: u32,
    },
    GetIrqInfo {
        index: u32,
    },
    SetIrqs {
        flags: u32,
        index: u32,
        start: u32,
        count: u32,
    },
    RegionRead {
        region: u32,
        offset: u64,
        count: u32,
    },
    RegionWrite {
        region: u32,
        offset: u64,
        data: Vec<u8>,
    },
    DeviceReset,
    Feature(Feature),
    MigDataRead {
        size: u32,
    },
    MigDataWrite {
        data: Vec<u8>,
    },
}

/// A successful reply's payload, by the command it answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Version {
        major: u16,
        minor: u16,
        capabilities: String,
    },
    /// Replies with no payload (DMA_MAP, SET_IRQS, DEVICE_RESET, SET features,
    /// MIG_DATA_WRITE).
    Empty,
    DmaUnmap {
        flags: u32,
        address: u64,
        size: u64,
    },
    DeviceInfo {
        flags: u32,
        num_regions: u32,
        num_irqs: u32,
    },
    RegionInfo {
        index: u32,
        flags: u32,
        size: u64,
        offset: u64,
    },
    IrqInfo {
        index: u32,
        flags: u32,
        count: u32,
    },
    RegionRead {
        region: u32,
        offset: u64,
        data: Vec<u8>,
    },
    RegionWrite {
        region: u32,
        offset: u64,
        count: u32,
    },
    /// PROBE answered yes (an error reply is no).
    Probed,
    MigrationFlags(u64),
    State(u32),
    LogReport {
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: Vec<u8>,
    },
    MigData {
        data: Vec<u8>,
    },
}

/// Little-endian reader over a payload that names the command in its errors.
struct Reader<'a> {
    command: Command,
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn new(command: Command, b: &'a [u8]) -> Self {
        Reader { command, b, at: 0 }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.b.len());
        let Some(end) = end else {
            return Err(WireError::Short {
                command: self.command,
                got: self.b.len(),
                need: self.at.saturating_add(n),
            });
        };
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        let s = self.take(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes(s.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        let s = self.take(8)?;
        Ok(u64::from_le_bytes(s.try_into().expect("8 bytes")))
    }
    fn rest(&mut self) -> &'a [u8] {
        let s = &self.b[self.at..];
        self.at = self.b.len();
        s
    }
    /// Nothing may follow the fixed part.
    fn end(&self) -> Result<(), WireError> {
        if self.at != self.b.len() {
            return Err(WireError::Long {
                command: self.command,
                got: self.b.len(),
                max: self.at,
            });
        }
        Ok(())
    }
    /// `argsz` counts the bytes from itself to the end of the payload.
    fn argsz(&mut self) -> Result<u32, WireError> {
        let start = self.at;
        let argsz = self.u32()?;
        if argsz as usize != self.b.len() - start {
            return Err(WireError::Argsz {
                command: self.command,
                argsz,
                len: self.b.len() - start,
            });
        }
        Ok(argsz)
    }
}

#[derive(Default)]
struct Writer(Vec<u8>);

impl Writer {
    fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.0.extend_from_slice(v);
        self
    }
}

/// An `argsz`-led structure whose body `fill` writes.
fn argsz_struct(fill: impl FnOnce(&mut Writer)) -> Vec<u8> {
    let mut b = Writer::default();
    fill(&mut b);
    with_argsz(&b.0)
}

/// An `argsz`-led structure: argsz counts itself and everything after it.
fn with_argsz(body: &[u8]) -> Vec<u8> {
    let mut w = Writer::default();
    w.u32(4 + body.len() as u32).bytes(body);
    w.0
}

/// The capabilities are JSON; Ferry reads only the numbers it needs (see
/// [`capability_u64`]), so here only the shape is checked: NUL-terminated text of an object.
fn capabilities(r: &mut Reader) -> Result<String, WireError> {
    let rest = r.rest();
    let Some((0, text)) = rest.split_last() else {
        return Err(WireError::Capabilities);
    };
    let s = std::str::from_utf8(text).map_err(|_| WireError::Capabilities)?;
    let t = s.trim();
    if !(t.starts_with('{') && t.ends_with('}')) {
        return Err(WireError::Capabilities);
    }
    Ok(s.to_string())
}

/// A numeric capability `"key": N` anywhere in the capabilities JSON, without a JSON
/// library: the keys Ferry reads are unique and their values plain integers.
pub fn capability_u64(capabilities: &str, key: &str) -> Option<u64> {
    let quoted = format!("\"{key}\"");
    let at = capabilities.find(&quoted)? + quoted.len();
    let rest = capabilities[at..]
        .trim_start()
        .strip_prefix(':')?
        .trim_start();
    let digits: &str = &rest[..rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len())];
    digits.parse().ok()
}

fn check_data(command: Command, len: usize) -> Result<(), WireError> {
    if len > MAX_DATA_BYTES as usize {
        return Err(WireError::TooMany {
            command,
            what: "data bytes",
            value: len as u64,
            max: u64::from(MAX_DATA_BYTES),
        });
    }
    Ok(())
}

fn feature_flags(feature: u32, op: u32) -> u32 {
    (feature & VFIO_DEVICE_FEATURE_MASK) | op
}

impl Request {
    pub fn command(&self) -> Command {
        match self {
            Request::Version { .. } => Command::Version,
            Request::DmaMap { .. } => Command::DmaMap,
            Request::DmaUnmap { .. } => Command::DmaUnmap,
            Request::DeviceGetInfo => Command::DeviceGetInfo,
            Request::RegionInfo { .. } => Command::DeviceGetRegionInfo,
            Request::GetIrqInfo { .. } => Command::GetIrqInfo,
            Request::SetIrqs { .. } => Command::SetIrqs,
            Request::RegionRead { .. } => Command::RegionRead,
            Request::RegionWrite { .. } => Command::RegionWrite,
            Request::DeviceReset => Command::DeviceReset,
            Request::Feature(_) => Command::DeviceFeature,
            Request::MigDataRead { .. } => Command::MigDataRead,
            Request::MigDataWrite { .. } => Command::MigDataWrite,
        }
    }

    /// The payload (everything after the header).
    pub fn encode_payload(&self) -> Vec<u8> {
        let mut w = Writer::default();
        match self {
            Request::Version {
                major,
                minor,
                capabilities,
            } => {
                w.u16(*major)
                    .u16(*minor)
                    .bytes(capabilities.as_bytes())
                    .bytes(&[0]);
            }
            Request::DmaMap {
                flags,
                offset,
                address,
                size,
            } => {
                return argsz_struct(|b| {
                    b.u32(*flags).u64(*offset).u64(*address).u64(*size);
                });
            }
            Request::DmaUnmap {
                flags,
                address,
                size,
            } => {
                return argsz_struct(|b| {
                    b.u32(*flags).u64(*address).u64(*size);
                });
            }
            Request::DeviceGetInfo => {
                return argsz_struct(|b| {
                    b.u32(0).u32(0).u32(0);
                });
            }
            Request::RegionInfo { index } => {
                return argsz_struct(|b| {
                    b.u32(0).u32(*index).u32(0).u64(0).u64(0);
                });
            }
            Request::GetIrqInfo { index } => {
                return argsz_struct(|b| {
                    b.u32(0).u32(*index).u32(0);
                });
            }
            Request::SetIrqs {
                flags,
                index,
                start,
                count,
            } => {
                return argsz_struct(|b| {
                    b.u32(*flags).u32(*index).u32(*start).u32(*count);
                });
            }
            Request::RegionRead {
                region,
                offset,
                count,
            } => {
                w.u64(*offset).u32(*region).u32(*count);
            }
            Request::RegionWrite {
                region,
                offset,
                data,
            } => {
                w.u64(*offset)
                    .u32(*region)
                    .u32(data.len() as u32)
                    .bytes(data);
            }
            Request::DeviceReset => {}
            Request::Feature(f) => return encode_feature_request(f),
            Request::MigDataRead { size } => {
                w.u32(8).u32(*size);
            }
            Request::MigDataWrite { data } => {
                w.u32(8 + data.len() as u32)
                    .u32(data.len() as u32)
                    .bytes(data);
            }
        }
        w.0
    }

    /// A command's payload as it came off the wire.
    pub fn decode(command: u16, payload: &[u8]) -> Result<Request, WireError> {
        let command = Command::from_u16(command).ok_or(WireError::UnknownCommand(command))?;
        let mut r = Reader::new(command, payload);
        let req = match command {
            Command::Version => {
                let major = r.u16()?;
                let minor = r.u16()?;
                let capabilities = capabilities(&mut r)?;
                Request::Version {
                    major,
                    minor,
                    capabilities,
                }
            }
            Command::DmaMap => {
                r.argsz()?;
                Request::DmaMap {
                    flags: r.u32()?,
                    offset: r.u64()?,
                    address: r.u64()?,
                    size: r.u64()?,
                }
            }
            Command::DmaUnmap => {
                r.argsz()?;
                Request::DmaUnmap {
                    flags: r.u32()?,
                    address: r.u64()?,
                    size: r.u64()?,
                }
            }
            Command::DeviceGetInfo => {
                r.argsz()?;
                r.take(12)?;
                Request::DeviceGetInfo
            }
            Command::DeviceGetRegionInfo => {
                r.argsz()?;
                r.u32()?;
                let index = r.u32()?;
                r.take(20)?;
                Request::RegionInfo { index }
            }
            Command::GetIrqInfo => {
                r.argsz()?;
                r.u32()?;
                let index = r.u32()?;
                r.u32()?;
                Request::GetIrqInfo { index }
            }
            Command::SetIrqs => {
                r.argsz()?;
                Request::SetIrqs {
                    flags: r.u32()?,
                    index: r.u32()?,
                    start: r.u32()?,
                    count: r.u32()?,
                }
            }
            Command::RegionRead => {
                let offset = r.u64()?;
                let region = r.u32()?;
                let count = r.u32()?;
                check_data(command, count as usize)?;
                Request::RegionRead {
                    region,
                    offset,
                    count,
                }
            }
            Command::RegionWrite => {
                let offset = r.u64()?;
                let region = r.u32()?;
                let count = r.u32()?;
                let data = r.rest();
                if count as usize != data.len() {
                    return Err(WireError::Count {
                        command,
                        count,
                        len: data.len(),
                    });
                }
                check_data(command, data.len())?;
                Request::RegionWrite {
                    region,
                    offset,
                    data: data.to_vec(),
                }
            }
            Command::DeviceReset => Request::DeviceReset,
            Command::DeviceFeature => Request::Feature(decode_feature_request(&mut r)?),
            Command::MigDataRead => {
                r.argsz()?;
                let size = r.u32()?;
                check_data(command, size as usize)?;
                Request::MigDataRead { size }
            }
            Command::MigDataWrite => {
                r.argsz()?;
                let size = r.u32()?;
                let data = r.rest();
                if size as usize != data.len() {
                    return Err(WireError::Count {
                        command,
                        count: size,
                        len: data.len(),
                    });
                }
                check_data(command, data.len())?;
                Request::MigDataWrite {
                    data: data.to_vec(),
                }
            }
            Command::GetRegionIoFds
            | Command::DmaRead
            | Command::DmaWrite
            | Command::RegionWriteMulti => return Err(WireError::UnknownCommand(command as u16)),
        };
        r.end()?;
        Ok(req)
    }
}

fn encode_feature_request(f: &Feature) -> Vec<u8> {
    let mut b = Writer::default();
    match f {
        Feature::Probe { feature, flags } => {
            b.u32(feature_flags(*feature, VFIO_DEVICE_FEATURE_PROBE | flags));
        }
        Feature::MigrationFlags => {
            b.u32(feature_flags(
                VFIO_DEVICE_FEATURE_MIGRATION,
                VFIO_DEVICE_FEATURE_GET,
            ));
        }
        Feature::SetState(s) => {
            b.u32(feature_flags(
                VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
                VFIO_DEVICE_FEATURE_SET,
            ))
            .u32(*s)
            .u32(u32::MAX); // data_fd -1: the data travels over the socket
        }
        Feature::GetState => {
            b.u32(feature_flags(
                VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
                VFIO_DEVICE_FEATURE_GET,
            ))
            .u32(0)
            .u32(u32::MAX);
        }
        Feature::LogStart { page_size, ranges } => {
            b.u32(feature_flags(
                VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
                VFIO_DEVICE_FEATURE_SET,
            ))
            .u64(*page_size)
            .u32(ranges.len() as u32)
            .u32(0);
            for &(iova, length) in ranges {
                b.u64(iova).u64(length);
            }
        }
        Feature::LogStop => {
            b.u32(feature_flags(
                VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP,
                VFIO_DEVICE_FEATURE_SET,
            ));
        }
        Feature::LogReport {
            iova,
            length,
            page_size,
        } => {
            b.u32(feature_flags(
                VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT,
                VFIO_DEVICE_FEATURE_GET,
            ))
            .u64(*iova)
            .u64(*length)
            .u64(*page_size);
        }
    }
    with_argsz(&b.0)
}

fn decode_feature_request(r: &mut Reader) -> Result<Feature, WireError> {
    r.argsz()?;
    let flags = r.u32()?;
    let feature = flags & VFIO_DEVICE_FEATURE_MASK;
    let op = flags & !VFIO_DEVICE_FEATURE_MASK;
    let bad = WireError::Feature { feature, flags };
    if op & VFIO_DEVICE_FEATURE_PROBE != 0 {
        let asked = op & !VFIO_DEVICE_FEATURE_PROBE;
        if asked & !(VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_SET) != 0 {
            return Err(bad);
        }
        return Ok(Feature::Probe {
            feature,
            flags: asked,
        });
    }
    Ok(match (feature, op) {
        (VFIO_DEVICE_FEATURE_MIGRATION, VFIO_DEVICE_FEATURE_GET) => Feature::MigrationFlags,
        (VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, VFIO_DEVICE_FEATURE_SET) => {
            let s = r.u32()?;
            r.u32()?;
            Feature::SetState(s)
        }
        (VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, VFIO_DEVICE_FEATURE_GET) => {
            r.u32()?;
            r.u32()?;
            Feature::GetState
        }
        (VFIO_DEVICE_FEATURE_DMA_LOGGING_START, VFIO_DEVICE_FEATURE_SET) => {
            let page_size = r.u64()?;
            let n = r.u32()?;
            r.u32()?;
            if n > MAX_LOG_RANGES {
                return Err(WireError::TooMany {
                    command: Command::DeviceFeature,
                    what: "DMA logging ranges",
                    value: u64::from(n),
                    max: u64::from(MAX_LOG_RANGES),
                });
            }
            let mut ranges = Vec::with_capacity(n as usize);
            for _ in 0..n {
                ranges.push((r.u64()?, r.u64()?));
            }
            Feature::LogStart { page_size, ranges }
        }
        (VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP, VFIO_DEVICE_FEATURE_SET) => Feature::LogStop,
        (VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT, VFIO_DEVICE_FEATURE_GET) => Feature::LogReport {
            iova: r.u64()?,
            length: r.u64()?,
            page_size: r.u64()?,
        },
        _ => return Err(bad),
    })
}

/// Bytes of the bitmap of `length` bytes at `page_size` granules (whole u64 words, as the
/// kernel's report), or `None` when it does not fit a message.
pub fn report_bitmap_bytes(length: u64, page_size: u64) -> Option<usize> {
    if page_size == 0 || !page_size.is_power_of_two() || length == 0 {
        return None;
    }
    let bits = length.div_ceil(page_size);
    let bytes = bits.div_ceil(64).checked_mul(8)?;
    (bytes <= u64::from(MAX_DATA_BYTES)).then_some(bytes as usize)
}

impl Reply {
    /// The payload answering `request` (everything after the header).
    pub fn encode_payload(&self, request: &Request) -> Vec<u8> {
        let mut w = Writer::default();
        match self {
            Reply::Version {
                major,
                minor,
                capabilities,
            } => {
                w.u16(*major)
                    .u16(*minor)
                    .bytes(capabilities.as_bytes())
                    .bytes(&[0]);
            }
            Reply::Empty | Reply::Probed => {
                if let Request::Feature(f) = request {
                    // A feature reply echoes the flags; its argsz is its own length.
                    let enc = encode_feature_request(f);
                    return with_argsz(&enc[4..8]);
                }
            }
            Reply::DmaUnmap {
                flags,
                address,
                size,
            } => {
                return argsz_struct(|b| {
                    b.u32(*flags).u64(*address).u64(*size);
                });
            }
            Reply::DeviceInfo {
                flags,
                num_regions,
                num_irqs,
            } => {
                return argsz_struct(|b| {
                    b.u32(*flags).u32(*num_regions).u32(*num_irqs);
                });
            }
            Reply::RegionInfo {
                index,
                flags,
                size,
                offset,
            } => {
                return argsz_struct(|b| {
                    b.u32(*flags).u32(*index).u32(0).u64(*size).u64(*offset);
                });
            }
            Reply::IrqInfo {
                index,
                flags,
                count,
            } => {
                return argsz_struct(|b| {
                    b.u32(*flags).u32(*index).u32(*count);
                });
            }
            Reply::RegionRead {
                region,
                offset,
                data,
            } => {
                w.u64(*offset)
                    .u32(*region)
                    .u32(data.len() as u32)
                    .bytes(data);
            }
            Reply::RegionWrite {
                region,
                offset,
                count,
            } => {
                w.u64(*offset).u32(*region).u32(*count);
            }
            Reply::MigrationFlags(flags) => {
                return argsz_struct(|b| {
                    b.u32(feature_flags(
                        VFIO_DEVICE_FEATURE_MIGRATION,
                        VFIO_DEVICE_FEATURE_GET,
                    ))
                    .u64(*flags);
                });
            }
            Reply::State(s) => {
                return argsz_struct(|b| {
                    b.u32(feature_flags(
                        VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
                        VFIO_DEVICE_FEATURE_GET,
                    ))
                    .u32(*s)
                    .u32(u32::MAX);
                });
            }
            Reply::LogReport {
                iova,
                length,
                page_size,
                bitmap,
            } => {
                return argsz_struct(|b| {
                    b.u32(feature_flags(
                        VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT,
                        VFIO_DEVICE_FEATURE_GET,
                    ))
                    .u64(*iova)
                    .u64(*length)
                    .u64(*page_size)
                    .bytes(bitmap);
                });
            }
            Reply::MigData { data } => {
                w.u32(8 + data.len() as u32)
                    .u32(data.len() as u32)
                    .bytes(data);
            }
        }
        w.0
    }

    /// A successful reply's payload, read against the request it answers: what the reply
    /// may carry is bounded by what was asked (a read returns at most what was asked for, a
    /// bitmap covers exactly the range asked about).
    pub fn decode(request: &Request, payload: &[u8]) -> Result<Reply, WireError> {
        let command = request.command();
        let mut r = Reader::new(command, payload);
        let reply = match request {
            Request::Version { .. } => {
                let major = r.u16()?;
                let minor = r.u16()?;
                let capabilities = capabilities(&mut r)?;
                Reply::Version {
                    major,
                    minor,
                    capabilities,
                }
            }
            Request::DmaMap { .. }
            | Request::SetIrqs { .. }
            | Request::DeviceReset
            | Request::MigDataWrite { .. } => Reply::Empty,
            Request::DmaUnmap { .. } => {
                r.argsz()?;
                Reply::DmaUnmap {
                    flags: r.u32()?,
                    address: r.u64()?,
                    size: r.u64()?,
                }
            }
            Request::DeviceGetInfo => {
                r.argsz()?;
                Reply::DeviceInfo {
                    flags: r.u32()?,
                    num_regions: r.u32()?,
                    num_irqs: r.u32()?,
                }
            }
            Request::RegionInfo { .. } => {
                r.argsz()?;
                let flags = r.u32()?;
                let index = r.u32()?;
                r.u32()?;
                Reply::RegionInfo {
                    index,
                    flags,
                    size: r.u64()?,
                    offset: r.u64()?,
                }
            }
            Request::GetIrqInfo { .. } => {
                r.argsz()?;
                Reply::IrqInfo {
                    flags: r.u32()?,
                    index: r.u32()?,
                    count: r.u32()?,
                }
            }
            Request::RegionRead { count, .. } => {
                let offset = r.u64()?;
                let region = r.u32()?;
                let n = r.u32()?;
                let data = r.rest();
                if n != *count || data.len() != *count as usize {
                    return Err(WireError::Count {
                        command,
                        count: n,
                        len: data.len(),
                    });
                }
                Reply::RegionRead {
                    region,
                    offset,
                    data: data.to_vec(),
                }
            }
            Request::RegionWrite { .. } => Reply::RegionWrite {
                offset: r.u64()?,
                region: r.u32()?,
                count: r.u32()?,
            },
            Request::Feature(f) => {
                // Every feature reply starts with argsz and the flags asked.
                let argsz = r.u32()?;
                if argsz as usize != payload.len() {
                    return Err(WireError::Argsz {
                        command,
                        argsz,
                        len: payload.len(),
                    });
                }
                r.u32()?;
                match f {
                    Feature::Probe { .. } => Reply::Probed,
                    Feature::SetState(_) | Feature::LogStart { .. } | Feature::LogStop => {
                        Reply::Empty
                    }
                    Feature::MigrationFlags => Reply::MigrationFlags(r.u64()?),
                    Feature::GetState => {
                        let s = r.u32()?;
                        r.u32()?;
                        Reply::State(s)
                    }
                    Feature::LogReport {
                        iova,
                        length,
                        page_size,
                    } => {
                        let (i, l, p) = (r.u64()?, r.u64()?, r.u64()?);
                        let bitmap = r.rest();
                        // A range no bitmap fits (`None`) has no valid answer.
                        let need = report_bitmap_bytes(*length, *page_size);
                        if (i, l, p) != (*iova, *length, *page_size) || Some(bitmap.len()) != need {
                            return Err(WireError::Count {
                                command,
                                count: need.unwrap_or(0) as u32,
                                len: bitmap.len(),
                            });
                        }
                        Reply::LogReport {
                            iova: i,
                            length: l,
                            page_size: p,
                            bitmap: bitmap.to_vec(),
                        }
                    }
                }
            }
            Request::MigDataRead { size } => {
                r.argsz()?;
                let n = r.u32()?;
                let data = r.rest();
                if n as usize != data.len() || n > *size {
                    return Err(WireError::Count {
                        command,
                        count: n,
                        len: data.len(),
                    });
                }
                Reply::MigData {
                    data: data.to_vec(),
                }
            }
        };
        r.end()?;
        Ok(reply)
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Command::Version => "VERSION",
            Command::DmaMap => "DMA_MAP",
            Command::DmaUnmap => "DMA_UNMAP",
            Command::DeviceGetInfo => "DEVICE_GET_INFO",
            Command::DeviceGetRegionInfo => "DEVICE_GET_REGION_INFO",
            Command::GetRegionIoFds => "DEVICE_GET_REGION_IO_FDS",
            Command::GetIrqInfo => "DEVICE_GET_IRQ_INFO",
            Command::SetIrqs => "DEVICE_SET_IRQS",
            Command::RegionRead => "REGION_READ",
            Command::RegionWrite => "REGION_WRITE",
            Command::DmaRead => "DMA_READ",
            Command::DmaWrite => "DMA_WRITE",
            Command::DeviceReset => "DEVICE_RESET",
            Command::RegionWriteMulti => "REGION_WRITE_MULTI",
            Command::DeviceFeature => "DEVICE_FEATURE",
            Command::MigDataRead => "MIG_DATA_READ",
            Command::MigDataWrite => "MIG_DATA_WRITE",
        };
        f.write_str(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_requests() -> Vec<Request> {
        vec![
            Request::Version {
                major: 0,
                minor: 1,
                capabilities: r#"{"capabilities":{"max_msg_fds":8}}"#.into(),
            },
            Request::DmaMap {
                flags: DMA_MAP_READ | DMA_MAP_WRITE,
                offset: 0x1000,
                address: 0x10_0000,
                size: 0x20_0000,
            },
            Request::DmaUnmap {
                flags: 0,
                address: 0x10_0000,
                size: 0x20_0000,
            },
            Request::DeviceGetInfo,
            Request::RegionInfo { index: 7 },
            Request::GetIrqInfo { index: 2 },
            Request::SetIrqs {
                flags: 0x24,
                index: 2,
                start: 0,
                count: 1,
            },
            Request::RegionRead {
                region: 0,
                offset: 0x28,
                count: 8,
            },
            Request::RegionWrite {
                region: 0,
                offset: 0x20,
                data: vec![1, 0, 0, 0],
            },
            Request::DeviceReset,
            Request::Feature(Feature::Probe {
                feature: VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
                flags: VFIO_DEVICE_FEATURE_SET,
            }),
            Request::Feature(Feature::MigrationFlags),
            Request::Feature(Feature::SetState(3)),
            Request::Feature(Feature::GetState),
            Request::Feature(Feature::LogStart {
                page_size: 4096,
                ranges: vec![(0, 1 << 20), (1 << 32, 4096)],
            }),
            Request::Feature(Feature::LogStop),
            Request::Feature(Feature::LogReport {
                iova: 1 << 20,
                length: 1 << 22,
                page_size: 4096,
            }),
            Request::MigDataRead { size: 4096 },
            Request::MigDataWrite {
                data: b"state".to_vec(),
            },
        ]
    }

    #[test]
    fn every_request_decodes_to_what_was_encoded() {
        for req in all_requests() {
            let p = req.encode_payload();
            let back = Request::decode(req.command() as u16, &p)
                .unwrap_or_else(|e| panic!("{req:?}: {e}"));
            assert_eq!(back, req);
        }
    }

    #[test]
    fn a_truncated_or_padded_request_is_refused_naming_the_command() {
        for req in all_requests() {
            let p = req.encode_payload();
            if !p.is_empty() && !matches!(req, Request::Version { .. }) {
                let short = Request::decode(req.command() as u16, &p[..p.len() - 1]);
                // A variable tail (data) cut by one byte is a count error; anything else short.
                assert!(short.is_err(), "{req:?} cut by one byte was accepted");
            }
            let mut long = p.clone();
            long.push(0);
            if !matches!(req, Request::Version { .. }) {
                let e = Request::decode(req.command() as u16, &long);
                assert!(e.is_err(), "{req:?} with a byte more was accepted");
                let msg = e.unwrap_err().to_string();
                assert!(
                    msg.contains(&format!("{:?}", req.command())) || msg.contains("argsz"),
                    "{msg}"
                );
            }
        }
    }

    #[test]
    fn replies_decode_against_their_request() {
        let cases = vec![
            (
                Request::RegionRead {
                    region: 0,
                    offset: 8,
                    count: 4,
                },
                Reply::RegionRead {
                    region: 0,
                    offset: 8,
                    data: vec![1, 2, 3, 4],
                },
            ),
            (
                Request::Feature(Feature::LogReport {
                    iova: 0,
                    length: 64 * 4096,
                    page_size: 4096,
                }),
                Reply::LogReport {
                    iova: 0,
                    length: 64 * 4096,
                    page_size: 4096,
                    bitmap: vec![0xff; 8],
                },
            ),
            (Request::Feature(Feature::GetState), Reply::State(2)),
            (
                Request::Feature(Feature::MigrationFlags),
                Reply::MigrationFlags(1 | 4),
            ),
            (
                Request::MigDataRead { size: 16 },
                Reply::MigData { data: vec![9; 16] },
            ),
            (Request::Feature(Feature::LogStop), Reply::Empty),
            (Request::Feature(Feature::SetState(3)), Reply::Empty),
            (
                Request::Feature(Feature::LogStart {
                    page_size: 4096,
                    ranges: vec![(0, 4096)],
                }),
                Reply::Empty,
            ),
            (
                Request::DeviceGetInfo,
                Reply::DeviceInfo {
                    flags: DEVICE_FLAGS_PCI,
                    num_regions: 9,
                    num_irqs: 5,
                },
            ),
        ];
        for (req, reply) in cases {
            let p = reply.encode_payload(&req);
            assert_eq!(Reply::decode(&req, &p).unwrap(), reply, "{req:?}");
        }
    }

    #[test]
    fn a_reply_carrying_more_than_was_asked_is_refused() {
        let req = Request::RegionRead {
            region: 0,
            offset: 0,
            count: 4,
        };
        let p = Reply::RegionRead {
            region: 0,
            offset: 0,
            data: vec![0; 8],
        }
        .encode_payload(&req);
        assert!(matches!(
            Reply::decode(&req, &p),
            Err(WireError::Count { .. })
        ));
        // A bitmap for another range than the one asked about.
        let req = Request::Feature(Feature::LogReport {
            iova: 0,
            length: 64 * 4096,
            page_size: 4096,
        });
        let p = Reply::LogReport {
            iova: 4096,
            length: 64 * 4096,
            page_size: 4096,
            bitmap: vec![0; 8],
        }
        .encode_payload(&req);
        assert!(Reply::decode(&req, &p).is_err());
        let req = Request::MigDataRead { size: 4 };
        let p = Reply::MigData { data: vec![0; 5] }.encode_payload(&req);
        assert!(Reply::decode(&req, &p).is_err());
    }

    #[test]
    fn header_sizes_outside_the_limits_are_refused() {
        let mut h = Header {
            id: 1,
            command: 9,
            size: 15,
            flags: 0,
            error: 0,
        };
        assert_eq!(Header::parse(&h.encode()), Err(WireError::Size(15)));
        h.size = MAX_MESSAGE_BYTES + 1;
        assert!(Header::parse(&h.encode()).is_err());
        h.size = 24;
        assert_eq!(Header::parse(&h.encode()), Ok(h));
    }

    #[test]
    fn limits_on_counts_come_before_any_allocation() {
        // A START naming a billion ranges in a 24-byte payload.
        let mut b = Writer::default();
        b.u32(feature_flags(
            VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
            VFIO_DEVICE_FEATURE_SET,
        ))
        .u64(4096)
        .u32(1_000_000_000)
        .u32(0);
        let p = with_argsz(&b.0);
        assert!(matches!(
            Request::decode(16, &p),
            Err(WireError::TooMany { .. })
        ));
        let p = Request::RegionRead {
            region: 0,
            offset: 0,
            count: MAX_DATA_BYTES + 1,
        }
        .encode_payload();
        assert!(matches!(
            Request::decode(9, &p),
            Err(WireError::TooMany { .. })
        ));
    }

    #[test]
    fn unknown_and_server_to_client_commands_are_refused() {
        for c in [0u16, 11, 12, 14, 19, 0xffff] {
            assert!(Request::decode(c, &[]).is_err(), "command {c}");
        }
    }

    #[test]
    fn capabilities_numbers_are_read_by_key() {
        let caps = r#"{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":1048576,"migration":{"pgsize":4096}}}"#;
        assert_eq!(capability_u64(caps, "pgsize"), Some(4096));
        assert_eq!(capability_u64(caps, "max_msg_fds"), Some(8));
        assert_eq!(capability_u64(caps, "absent"), None);
    }

    #[test]
    fn report_bitmaps_are_whole_words_and_bounded() {
        assert_eq!(report_bitmap_bytes(4096, 4096), Some(8));
        assert_eq!(report_bitmap_bytes(65 * 4096, 4096), Some(16));
        assert_eq!(report_bitmap_bytes(0, 4096), None);
        assert_eq!(report_bitmap_bytes(4096, 3000), None);
        assert_eq!(report_bitmap_bytes(1 << 50, 4096), None);
    }
}
