// Copyright 2026 Ferry authors
// SPDX-License-Identifier: Apache-2.0

//! Harness for the `vfio_user_messages` fuzz target (`fuzz/fuzz_targets/vfio_user_messages.rs`)
//! and for the tests that run it over pseudo-random inputs without cargo-fuzz. Only built
//! with the `fuzzing` feature.
//!
//! Both directions of a vfio-user connection are untrusted input:
//!
//! - [`client_side`]: what a broken or hostile device answers Ferry. The input's first
//!   bytes build the request Ferry sent (every [`Request`] variant, fields from the input:
//!   see [`request`]); the rest is the device's reply, a 16-byte header and its payload,
//!   read by [`Header::parse`] and [`Reply::decode`], and then the same bytes once more
//!   through the real framing ([`conn::recv`] on a socket pair).
//! - [`server_side`]: what a hostile client sends a device. The input is a sequence of
//!   messages, each a command (u16) a payload length (u16) and that many bytes (fewer at
//!   the end of the input), decoded by [`Request::decode`] and, when they decode, answered
//!   by [`server::handle`] with the device given.
//!
//! What must hold (a broken property panics, naming it): nothing panics; a request that
//! decodes encodes to bytes that decode to the same request, and a reply likewise against
//! its request; a reply answers the request it is read against (its variant); a decoded
//! REGION_READ or MIG_DATA_READ reply carries no more bytes than were asked for; a
//! DMA_LOGGING_REPORT bitmap is exactly [`report_bitmap_bytes`] long; a framed message is
//! exactly as long as its header says, within [`MAX_MESSAGE_BYTES`]; a reply the server
//! gives decodes with [`Reply::decode`] against the request it answers (the server only
//! says what the client can read).
//!
//! The fuzz target's input: byte 0 even ([`CLIENT`]) for [`client_side`] with the rest,
//! odd ([`SERVER`]) for [`server_side`] with the rest and a `ferry-dma-device` model.

use std::io::Write;
use std::os::unix::net::UnixStream;

use super::conn;
use super::server::{self, UserDevice};
use super::wire::{
    report_bitmap_bytes, Feature, Header, Reply, Request, HEADER_BYTES, MAX_DATA_BYTES,
    MAX_MESSAGE_BYTES,
};
use crate::uapi::{VFIO_DEVICE_FEATURE_GET, VFIO_DEVICE_FEATURE_MASK, VFIO_DEVICE_FEATURE_SET};

/// Byte 0 of a fuzz input for the client side (any even byte).
pub const CLIENT: u8 = 0;
/// Byte 0 of a fuzz input for the server side (any odd byte).
pub const SERVER: u8 = 1;
/// Messages one server-side input sends at most.
pub const MAX_MESSAGES: usize = 64;
/// The [`Request`] variants [`request`] picks from (DEVICE_FEATURE counted per feature).
pub const REQUEST_KINDS: u8 = 19;
/// The capabilities of a VERSION request built from the input (Ferry's own).
pub const CAPABILITIES: &str = super::client::CLIENT_CAPABILITIES;

/// Little-endian reader over the input; bytes past the end read as 0.
pub struct Input<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Input<'a> {
    pub fn new(b: &'a [u8]) -> Self {
        Input { b, at: 0 }
    }

    pub fn is_empty(&self) -> bool {
        self.at >= self.b.len()
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let start = self.at.min(self.b.len());
        let end = start.saturating_add(n).min(self.b.len());
        self.at = end;
        &self.b[start..end]
    }

    fn fixed<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        let s = self.bytes(N);
        a[..s.len()].copy_from_slice(s);
        a
    }

    pub fn u8(&mut self) -> u8 {
        self.fixed::<1>()[0]
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.fixed())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.fixed())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.fixed())
    }

    /// Everything not read yet.
    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(usize::MAX)
    }
}

const PROBE_OPS: [u32; 4] = [
    0,
    VFIO_DEVICE_FEATURE_GET,
    VFIO_DEVICE_FEATURE_SET,
    VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_SET,
];

/// The request Ferry sent, from the input: a kind byte (modulo [`REQUEST_KINDS`]: VERSION,
/// DMA_MAP, DMA_UNMAP, GET_INFO, REGION_INFO, IRQ_INFO, SET_IRQS, REGION_READ,
/// REGION_WRITE, RESET, then the features PROBE, MIGRATION, SET_STATE, GET_STATE,
/// LOG_START, LOG_STOP, LOG_REPORT, then MIG_DATA_READ, MIG_DATA_WRITE) and its fields in
/// order, integers little-endian at their own width; a data length is one byte, a count
/// or size is reduced modulo `MAX_DATA_BYTES + 1`, a PROBE's feature is 2 bytes and its
/// GET/SET one byte (low 2 bits), LOG_START's range count one byte (low 2 bits). Every
/// request built is one a client can send ([`input_of`] is the inverse).
pub fn request(inp: &mut Input) -> Request {
    let data_limit = MAX_DATA_BYTES + 1;
    match inp.u8() % REQUEST_KINDS {
        0 => Request::Version {
            major: inp.u16(),
            minor: inp.u16(),
            capabilities: CAPABILITIES.to_string(),
        },
        1 => Request::DmaMap {
            flags: inp.u32(),
            offset: inp.u64(),
            address: inp.u64(),
            size: inp.u64(),
        },
        2 => Request::DmaUnmap {
            flags: inp.u32(),
            address: inp.u64(),
            size: inp.u64(),
        },
        3 => Request::DeviceGetInfo,
        4 => Request::RegionInfo { index: inp.u32() },
        5 => Request::GetIrqInfo { index: inp.u32() },
        6 => Request::SetIrqs {
            flags: inp.u32(),
            index: inp.u32(),
            start: inp.u32(),
            count: inp.u32(),
        },
        7 => Request::RegionRead {
            region: inp.u32(),
            offset: inp.u64(),
            count: inp.u32() % data_limit,
        },
        8 => {
            let region = inp.u32();
            let offset = inp.u64();
            let n = usize::from(inp.u8());
            Request::RegionWrite {
                region,
                offset,
                data: inp.bytes(n).to_vec(),
            }
        }
        9 => Request::DeviceReset,
        10 => Request::Feature(Feature::Probe {
            feature: u32::from(inp.u16()) & VFIO_DEVICE_FEATURE_MASK,
            flags: PROBE_OPS[usize::from(inp.u8() & 3)],
        }),
        11 => Request::Feature(Feature::MigrationFlags),
        12 => Request::Feature(Feature::SetState(inp.u32())),
        13 => Request::Feature(Feature::GetState),
        14 => {
            let page_size = inp.u64();
            let n = inp.u8() & 3;
            let ranges = (0..n).map(|_| (inp.u64(), inp.u64())).collect();
            Request::Feature(Feature::LogStart { page_size, ranges })
        }
        15 => Request::Feature(Feature::LogStop),
        16 => Request::Feature(Feature::LogReport {
            iova: inp.u64(),
            length: inp.u64(),
            page_size: inp.u64(),
        }),
        17 => Request::MigDataRead {
            size: inp.u32() % data_limit,
        },
        _ => {
            let n = usize::from(inp.u8());
            Request::MigDataWrite {
                data: inp.bytes(n).to_vec(),
            }
        }
    }
}

/// The input bytes [`request`] reads as `req`, or `None` for one it cannot build (other
/// capabilities, a count or data length over its limits, more than 3 ranges).
pub fn input_of(req: &Request) -> Option<Vec<u8>> {
    let mut v = Vec::new();
    let mut put = |b: &[u8]| v.extend_from_slice(b);
    let short = |n: usize| u8::try_from(n).ok();
    match req {
        Request::Version {
            major,
            minor,
            capabilities,
        } => {
            if capabilities != CAPABILITIES {
                return None;
            }
            put(&[0]);
            put(&major.to_le_bytes());
            put(&minor.to_le_bytes());
        }
        Request::DmaMap {
            flags,
            offset,
            address,
            size,
        } => {
            put(&[1]);
            put(&flags.to_le_bytes());
            put(&offset.to_le_bytes());
            put(&address.to_le_bytes());
            put(&size.to_le_bytes());
        }
        Request::DmaUnmap {
            flags,
            address,
            size,
        } => {
            put(&[2]);
            put(&flags.to_le_bytes());
            put(&address.to_le_bytes());
            put(&size.to_le_bytes());
        }
        Request::DeviceGetInfo => put(&[3]),
        Request::RegionInfo { index } => {
            put(&[4]);
            put(&index.to_le_bytes());
        }
        Request::GetIrqInfo { index } => {
            put(&[5]);
            put(&index.to_le_bytes());
        }
        Request::SetIrqs {
            flags,
            index,
            start,
            count,
        } => {
            put(&[6]);
            for x in [flags, index, start, count] {
                put(&x.to_le_bytes());
            }
        }
        Request::RegionRead {
            region,
            offset,
            count,
        } => {
            if *count > MAX_DATA_BYTES {
                return None;
            }
            put(&[7]);
            put(&region.to_le_bytes());
            put(&offset.to_le_bytes());
            put(&count.to_le_bytes());
        }
        Request::RegionWrite {
            region,
            offset,
            data,
        } => {
            put(&[8]);
            put(&region.to_le_bytes());
            put(&offset.to_le_bytes());
            put(&[short(data.len())?]);
            put(data);
        }
        Request::DeviceReset => put(&[9]),
        Request::Feature(f) => match f {
            Feature::Probe { feature, flags } => {
                let op = PROBE_OPS.iter().position(|o| o == flags)?;
                put(&[10]);
                put(&u16::try_from(*feature).ok()?.to_le_bytes());
                put(&[op as u8]);
            }
            Feature::MigrationFlags => put(&[11]),
            Feature::SetState(s) => {
                put(&[12]);
                put(&s.to_le_bytes());
            }
            Feature::GetState => put(&[13]),
            Feature::LogStart { page_size, ranges } => {
                if ranges.len() > 3 {
                    return None;
                }
                put(&[14]);
                put(&page_size.to_le_bytes());
                put(&[ranges.len() as u8]);
                for (iova, len) in ranges {
                    put(&iova.to_le_bytes());
                    put(&len.to_le_bytes());
                }
            }
            Feature::LogStop => put(&[15]),
            Feature::LogReport {
                iova,
                length,
                page_size,
            } => {
                put(&[16]);
                for x in [iova, length, page_size] {
                    put(&x.to_le_bytes());
                }
            }
        },
        Request::MigDataRead { size } => {
            if *size > MAX_DATA_BYTES {
                return None;
            }
            put(&[17]);
            put(&size.to_le_bytes());
        }
        Request::MigDataWrite { data } => {
            put(&[18]);
            put(&[short(data.len())?]);
            put(data);
        }
    }
    Some(v)
}

/// Whether `reply` is of the kind that answers `req`.
fn answers(req: &Request, reply: &Reply) -> bool {
    match (req, reply) {
        (Request::Version { .. }, Reply::Version { .. }) => true,
        (
            Request::DmaMap { .. }
            | Request::SetIrqs { .. }
            | Request::DeviceReset
            | Request::MigDataWrite { .. },
            Reply::Empty,
        ) => true,
        (Request::DmaUnmap { .. }, Reply::DmaUnmap { .. }) => true,
        (Request::DeviceGetInfo, Reply::DeviceInfo { .. }) => true,
        (Request::RegionInfo { .. }, Reply::RegionInfo { .. }) => true,
        (Request::GetIrqInfo { .. }, Reply::IrqInfo { .. }) => true,
        (Request::RegionRead { .. }, Reply::RegionRead { .. }) => true,
        (Request::RegionWrite { .. }, Reply::RegionWrite { .. }) => true,
        (Request::MigDataRead { .. }, Reply::MigData { .. }) => true,
        (Request::Feature(f), r) => matches!(
            (f, r),
            (Feature::Probe { .. }, Reply::Probed)
                | (Feature::MigrationFlags, Reply::MigrationFlags(_))
                | (
                    Feature::SetState(_) | Feature::LogStart { .. } | Feature::LogStop,
                    Reply::Empty
                )
                | (Feature::GetState, Reply::State(_))
                | (Feature::LogReport { .. }, Reply::LogReport { .. })
        ),
        _ => false,
    }
}

/// A request encodes to bytes that decode to it.
fn check_request_round_trip(req: &Request) {
    let p = req.encode_payload();
    let back = Request::decode(req.command() as u16, &p);
    assert_eq!(
        back.as_ref(),
        Ok(req),
        "request {req:?} encoded as {p:02x?} decodes differently"
    );
}

/// Reads `payload` as the reply to `req` and checks what a decoded reply promises.
fn check_reply(req: &Request, payload: &[u8]) -> Option<Reply> {
    let reply = Reply::decode(req, payload).ok()?;
    assert!(
        answers(req, &reply),
        "{reply:?} decoded as the answer to {req:?}"
    );
    let again = reply.encode_payload(req);
    assert_eq!(
        Reply::decode(req, &again).as_ref(),
        Ok(&reply),
        "reply {reply:?} to {req:?} re-encoded as {again:02x?} decodes differently"
    );
    match (req, &reply) {
        (Request::RegionRead { count, .. }, Reply::RegionRead { data, .. }) => assert!(
            data.len() <= *count as usize,
            "REGION_READ of {count} bytes answered with {}",
            data.len()
        ),
        (Request::MigDataRead { size }, Reply::MigData { data }) => assert!(
            data.len() <= *size as usize,
            "MIG_DATA_READ of {size} bytes answered with {}",
            data.len()
        ),
        (
            Request::Feature(Feature::LogReport {
                length, page_size, ..
            }),
            Reply::LogReport { bitmap, .. },
        ) => assert_eq!(
            Some(bitmap.len()),
            report_bitmap_bytes(*length, *page_size),
            "DMA_LOGGING_REPORT of {length:#x} bytes at page size {page_size:#x}: bitmap of {} bytes",
            bitmap.len()
        ),
        _ => {}
    }
    Some(reply)
}

/// A broken or hostile device's reply to a request built from the input: see the module.
pub fn client_side(data: &[u8]) {
    let mut inp = Input::new(data);
    let req = request(&mut inp);
    check_request_round_trip(&req);
    let reply = inp.rest();
    if let Some((h, payload)) = reply.split_first_chunk::<HEADER_BYTES>() {
        if let Ok(header) = Header::parse(h) {
            assert_eq!(&header.encode(), h, "header {header:?}");
            assert!((HEADER_BYTES as u32..=MAX_MESSAGE_BYTES).contains(&header.size));
        }
        check_reply(&req, payload);
    }
    framed(&req, reply);
}

/// `bytes` as they would come off the device's socket: every message [`conn::recv`] frames
/// from them is exactly as long as its header says, and its payload is read as the reply.
fn framed(req: &Request, bytes: &[u8]) {
    let (mut tx, mut rx) = UnixStream::pair().expect("a socket pair");
    // Neither end may block: what does not fit the socket's buffer is dropped, and the
    // reader sees the end of the stream (or nothing yet) instead of waiting.
    tx.set_nonblocking(true).expect("non-blocking writer");
    rx.set_nonblocking(true).expect("non-blocking reader");
    let _ = tx.write_all(bytes);
    drop(tx);
    let mut left = bytes.len();
    while let Ok(msg) = conn::recv(&mut rx) {
        let size = msg.header.size as usize;
        assert!(
            size <= MAX_MESSAGE_BYTES as usize && size <= left,
            "a message of {size} bytes framed from {left} bytes"
        );
        assert_eq!(msg.payload.len() + HEADER_BYTES, size, "{:?}", msg.header);
        assert!(msg.files.is_empty(), "descriptors from nowhere");
        left -= size;
        check_reply(req, &msg.payload);
    }
}

/// A hostile client's messages to `dev`: see the module.
pub fn server_side(data: &[u8], dev: &mut dyn UserDevice) {
    let mut inp = Input::new(data);
    for _ in 0..MAX_MESSAGES {
        if inp.is_empty() {
            break;
        }
        let command = inp.u16();
        let len = usize::from(inp.u16());
        let payload = inp.bytes(len);
        let Ok(req) = Request::decode(command, payload) else {
            continue;
        };
        assert_eq!(req.command() as u16, command, "{req:?}");
        check_request_round_trip(&req);
        if let Ok(reply) = server::handle(dev, &req, Vec::new()) {
            let p = reply.encode_payload(&req);
            let back = check_reply(&req, &p);
            assert_eq!(
                back.as_ref(),
                Some(&reply),
                "the server's answer {reply:?} to {req:?}, encoded as {p:02x?}, does not decode"
            );
        }
    }
}

/// Inputs in the harness's format, built with the encoders: the seeds committed under
/// `fuzz/seeds/vfio_user_messages/` and the start of the tests' runs.
pub mod build {
    use super::super::wire::{
        Feature, Header, Reply, Request, DEVICE_FLAGS_PCI, FLAG_ERROR, FLAG_REPLY, HEADER_BYTES,
        PCI_CONFIG_REGION, REGION_FLAG_READ, REGION_FLAG_WRITE,
    };
    use super::{input_of, CAPABILITIES, CLIENT, SERVER};
    use crate::uapi::{
        VFIO_DEVICE_FEATURE_DMA_LOGGING_START, VFIO_DEVICE_FEATURE_SET, VFIO_DEVICE_STATE_RESUMING,
        VFIO_DEVICE_STATE_RUNNING, VFIO_DEVICE_STATE_STOP, VFIO_DEVICE_STATE_STOP_COPY,
        VFIO_MIGRATION_STOP_COPY,
    };

    /// ferry-dma-device's BAR 0 registers (`guest_pattern::user_device`).
    pub const REG_MAGIC: u64 = 0x00;
    pub const REG_ADDR: u64 = 0x08;
    pub const REG_LEN: u64 = 0x10;
    pub const REG_SEED: u64 = 0x18;
    pub const REG_DOORBELL: u64 = 0x20;
    pub const REG_STATUS: u64 = 0x24;

    /// A ferry-dma-device state blob (version 1, 66 bytes: `dma_device::state`): ADDR
    /// 0x1000, LEN 0x2000, SEED 7, STATUS UNMAPPED, GENERATION 0x42, JOBS 3, PAGES 2,
    /// command register memory | bus master, BAR 0 at 0xfebf_f000.
    pub fn device_state() -> Vec<u8> {
        let mut b = b"FDMS".to_vec();
        b.extend_from_slice(&1u32.to_le_bytes());
        for v in [0x1000u64, 0x2000, 7] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&2u32.to_le_bytes());
        for v in [0x42u64, 3, 2] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&6u16.to_le_bytes());
        b.extend_from_slice(&0xfebf_f000u32.to_le_bytes());
        b
    }

    /// One server-side message: command, payload length, payload.
    pub fn message(req: &Request) -> Vec<u8> {
        let p = req.encode_payload();
        let mut v = (req.command() as u16).to_le_bytes().to_vec();
        v.extend_from_slice(&(p.len() as u16).to_le_bytes());
        v.extend_from_slice(&p);
        v
    }

    /// A server-side input: the messages in order.
    pub fn server(reqs: &[Request]) -> Vec<u8> {
        let mut v = vec![SERVER];
        for r in reqs {
            v.extend(message(r));
        }
        v
    }

    /// A client-side input: `req`, then the device's successful `reply` to it, framed.
    pub fn client(req: &Request, reply: &Reply) -> Vec<u8> {
        let p = reply.encode_payload(req);
        client_raw(req, 0, FLAG_REPLY, 0, &p)
    }

    /// A client-side input with any header flags, error and payload.
    pub fn client_raw(req: &Request, id: u16, flags: u32, error: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![CLIENT];
        v.extend(input_of(req).expect("a request the harness builds"));
        let h = Header {
            id,
            command: req.command() as u16,
            size: (HEADER_BYTES + payload.len()) as u32,
            flags,
            error,
        };
        v.extend_from_slice(&h.encode());
        v.extend_from_slice(payload);
        v
    }

    fn write(region: u32, offset: u64, v: u64, len: usize) -> Request {
        Request::RegionWrite {
            region,
            offset,
            data: v.to_le_bytes()[..len].to_vec(),
        }
    }

    fn read(region: u32, offset: u64, count: u32) -> Request {
        Request::RegionRead {
            region,
            offset,
            count,
        }
    }

    fn set_state(s: u32) -> Request {
        Request::Feature(Feature::SetState(s))
    }

    /// The committed seeds: (file name, input).
    pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
        let version = Request::Version {
            major: 0,
            minor: 1,
            capabilities: CAPABILITIES.to_string(),
        };
        let log_start = Request::Feature(Feature::LogStart {
            page_size: 4096,
            ranges: vec![(0, 1 << 20)],
        });
        let log_report = Request::Feature(Feature::LogReport {
            iova: 0,
            length: 1 << 20,
            page_size: 4096,
        });
        let probe_log = Request::Feature(Feature::Probe {
            feature: VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
            flags: VFIO_DEVICE_FEATURE_SET,
        });
        let bar0_read = read(0, REG_STATUS, 4);
        let mig_read = Request::MigDataRead { size: 4096 };
        vec![
            (
                "server_version_info_regions",
                server(&[
                    version.clone(),
                    Request::DeviceGetInfo,
                    Request::RegionInfo { index: 0 },
                    Request::RegionInfo {
                        index: PCI_CONFIG_REGION,
                    },
                    Request::GetIrqInfo { index: 0 },
                    Request::SetIrqs {
                        flags: 0,
                        index: 0,
                        start: 0,
                        count: 0,
                    },
                    read(PCI_CONFIG_REGION, 0, 64),
                    read(0, REG_MAGIC, 8),
                ]),
            ),
            (
                "server_doorbell",
                server(&[
                    write(PCI_CONFIG_REGION, 0x10, 0xfebf_f000, 4),
                    write(PCI_CONFIG_REGION, 0x04, 6, 2),
                    write(0, REG_ADDR, 0x10_0000, 8),
                    write(0, REG_LEN, 0x2000, 8),
                    write(0, REG_SEED, 5, 8),
                    write(0, REG_DOORBELL, 1, 4),
                    bar0_read.clone(),
                ]),
            ),
            (
                "server_dma_logging",
                server(&[
                    probe_log.clone(),
                    log_start.clone(),
                    write(0, REG_DOORBELL, 1, 4),
                    log_report.clone(),
                    Request::DmaUnmap {
                        flags: 0,
                        address: 0,
                        size: 1 << 20,
                    },
                    Request::Feature(Feature::LogStop),
                ]),
            ),
            (
                "server_migration",
                server(&[
                    Request::Feature(Feature::MigrationFlags),
                    set_state(VFIO_DEVICE_STATE_STOP),
                    set_state(VFIO_DEVICE_STATE_STOP_COPY),
                    mig_read.clone(),
                    mig_read.clone(),
                    set_state(VFIO_DEVICE_STATE_STOP),
                    set_state(VFIO_DEVICE_STATE_RESUMING),
                    Request::MigDataWrite {
                        data: device_state(),
                    },
                    set_state(VFIO_DEVICE_STATE_STOP),
                    set_state(VFIO_DEVICE_STATE_RUNNING),
                    Request::Feature(Feature::GetState),
                    bar0_read.clone(),
                    Request::DeviceReset,
                ]),
            ),
            (
                "client_version",
                client(
                    &version,
                    &Reply::Version {
                        major: 0,
                        minor: 1,
                        capabilities: super::super::server::server_capabilities(true),
                    },
                ),
            ),
            (
                "client_device_info",
                client(
                    &Request::DeviceGetInfo,
                    &Reply::DeviceInfo {
                        flags: DEVICE_FLAGS_PCI,
                        num_regions: 9,
                        num_irqs: 1,
                    },
                ),
            ),
            (
                "client_region_info",
                client(
                    &Request::RegionInfo {
                        index: PCI_CONFIG_REGION,
                    },
                    &Reply::RegionInfo {
                        index: PCI_CONFIG_REGION,
                        flags: REGION_FLAG_READ | REGION_FLAG_WRITE,
                        size: 256,
                        offset: 0,
                    },
                ),
            ),
            (
                "client_region_read",
                client(
                    &read(0, REG_MAGIC, 8),
                    &Reply::RegionRead {
                        region: 0,
                        offset: REG_MAGIC,
                        data: b"FDMA\x01\0\0\0".to_vec(),
                    },
                ),
            ),
            (
                "client_region_write_doorbell",
                client(
                    &write(0, REG_DOORBELL, 1, 4),
                    &Reply::RegionWrite {
                        region: 0,
                        offset: REG_DOORBELL,
                        count: 4,
                    },
                ),
            ),
            ("client_probe_log", client(&probe_log, &Reply::Probed)),
            ("client_log_start", client(&log_start, &Reply::Empty)),
            (
                "client_log_report",
                client(
                    &log_report,
                    &Reply::LogReport {
                        iova: 0,
                        length: 1 << 20,
                        page_size: 4096,
                        bitmap: [0x0f, 0, 0, 0, 0, 0, 0, 0x80].repeat(4),
                    },
                ),
            ),
            (
                "client_migration_flags",
                client(
                    &Request::Feature(Feature::MigrationFlags),
                    &Reply::MigrationFlags(VFIO_MIGRATION_STOP_COPY),
                ),
            ),
            (
                "client_get_state",
                client(
                    &Request::Feature(Feature::GetState),
                    &Reply::State(VFIO_DEVICE_STATE_STOP_COPY),
                ),
            ),
            (
                "client_mig_data_read",
                client(
                    &mig_read,
                    &Reply::MigData {
                        data: device_state(),
                    },
                ),
            ),
            (
                "client_mig_data_write",
                client(
                    &Request::MigDataWrite {
                        data: device_state(),
                    },
                    &Reply::Empty,
                ),
            ),
            (
                "client_error_then_reply",
                [
                    client_raw(
                        &bar0_read,
                        0,
                        FLAG_REPLY | FLAG_ERROR,
                        libc::EINVAL as u32,
                        &[],
                    ),
                    client(
                        &bar0_read,
                        &Reply::RegionRead {
                            region: 0,
                            offset: REG_STATUS,
                            data: 2u32.to_le_bytes().to_vec(),
                        },
                    )[1 + input_of(&bar0_read).expect("built").len()..]
                        .to_vec(),
                ]
                .concat(),
            ),
            (
                "client_dma_unmap",
                client(
                    &Request::DmaUnmap {
                        flags: 0,
                        address: 0x10_0000,
                        size: 0x20_0000,
                    },
                    &Reply::DmaUnmap {
                        flags: 0,
                        address: 0x10_0000,
                        size: 0x20_0000,
                    },
                ),
            ),
            (
                "client_set_state",
                client(&set_state(VFIO_DEVICE_STATE_STOP), &Reply::Empty),
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;

    use super::build::{self, device_state, REG_DOORBELL};
    use super::*;
    use crate::uapi::{
        VFIO_DEVICE_STATE_RESUMING, VFIO_DEVICE_STATE_RUNNING, VFIO_DEVICE_STATE_STOP,
        VFIO_DEVICE_STATE_STOP_COPY, VFIO_MIGRATION_STOP_COPY,
    };
    use crate::vfio_user::server::Errno;
    use crate::vfio_user::wire::{DEVICE_FLAGS_PCI, PCI_CONFIG_REGION, PCI_NUM_REGIONS};

    /// A tiny device: 256 bytes of BAR 0 and of configuration space, the migration states
    /// with a blob of BAR 0, a DMA log that reports every other page.
    struct Double {
        bar0: Vec<u8>,
        config: Vec<u8>,
        state: u32,
        saved: Option<(Vec<u8>, usize)>,
        resume: Vec<u8>,
        logging: bool,
        doorbells: u32,
    }

    impl Double {
        fn new() -> Self {
            Double {
                bar0: vec![0; 256],
                config: vec![0; 256],
                state: VFIO_DEVICE_STATE_RUNNING,
                saved: None,
                resume: Vec::new(),
                logging: false,
                doorbells: 0,
            }
        }

        fn space(&mut self, region: u32, offset: u64, len: usize) -> Result<&mut [u8], Errno> {
            let s = match region {
                0 => &mut self.bar0,
                PCI_CONFIG_REGION => &mut self.config,
                _ => return Err(libc::EINVAL),
            };
            let start = usize::try_from(offset).map_err(|_| libc::EINVAL)?;
            let end = start.checked_add(len).ok_or(libc::EINVAL)?;
            s.get_mut(start..end).ok_or(libc::EINVAL)
        }
    }

    impl UserDevice for Double {
        fn info(&self) -> (u32, u32, u32) {
            (DEVICE_FLAGS_PCI, PCI_NUM_REGIONS, 1)
        }
        fn region(&self, index: u32) -> Result<(u32, u64), Errno> {
            match index {
                0 | PCI_CONFIG_REGION => Ok((3, 256)),
                i if i < PCI_NUM_REGIONS => Ok((0, 0)),
                _ => Err(libc::EINVAL),
            }
        }
        fn irq(&self, index: u32) -> Result<(u32, u32), Errno> {
            (index == 0).then_some((0, 0)).ok_or(libc::EINVAL)
        }
        fn set_irqs(
            &mut self,
            _: u32,
            _: u32,
            _: u32,
            count: u32,
            _: Vec<File>,
        ) -> Result<(), Errno> {
            (count == 0).then_some(()).ok_or(libc::EINVAL)
        }
        fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> Result<(), Errno> {
            data.copy_from_slice(self.space(region, offset, data.len())?);
            Ok(())
        }
        fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), Errno> {
            self.space(region, offset, data.len())?
                .copy_from_slice(data);
            if region == 0 && offset == REG_DOORBELL {
                self.doorbells += 1;
            }
            Ok(())
        }
        fn dma_map(&mut self, _: u32, _: u64, _: u64, _: File, _: u64) -> Result<(), Errno> {
            Ok(())
        }
        fn dma_unmap(&mut self, _: u64, size: u64) -> Result<(), Errno> {
            (size != 0).then_some(()).ok_or(libc::EINVAL)
        }
        fn reset(&mut self) -> Result<(), Errno> {
            self.bar0.fill(0);
            self.state = VFIO_DEVICE_STATE_RUNNING;
            Ok(())
        }
        fn migration_flags(&self) -> Option<u64> {
            Some(VFIO_MIGRATION_STOP_COPY)
        }
        fn set_state(&mut self, state: u32) -> Result<(), Errno> {
            match (self.state, state) {
                (
                    VFIO_DEVICE_STATE_RUNNING | VFIO_DEVICE_STATE_STOP,
                    VFIO_DEVICE_STATE_STOP_COPY,
                ) => self.saved = Some((self.bar0.clone(), 0)),
                (VFIO_DEVICE_STATE_STOP, VFIO_DEVICE_STATE_RESUMING) => self.resume.clear(),
                (VFIO_DEVICE_STATE_RESUMING, VFIO_DEVICE_STATE_STOP) => {
                    if self.resume.len() != self.bar0.len() {
                        return Err(libc::EINVAL);
                    }
                    self.bar0 = std::mem::take(&mut self.resume);
                }
                (a, b) if a == b => {}
                (_, 1..=4) => {}
                _ => return Err(libc::EINVAL),
            }
            self.state = state;
            Ok(())
        }
        fn state(&self) -> u32 {
            self.state
        }
        fn mig_data_read(&mut self, max: usize) -> Result<Vec<u8>, Errno> {
            let (blob, at) = self.saved.as_mut().ok_or(libc::EINVAL)?;
            let n = max.min(blob.len() - *at);
            *at += n;
            Ok(blob[*at - n..*at].to_vec())
        }
        fn mig_data_write(&mut self, data: &[u8]) -> Result<(), Errno> {
            if self.state != VFIO_DEVICE_STATE_RESUMING || self.resume.len() + data.len() > 4096 {
                return Err(libc::EINVAL);
            }
            self.resume.extend_from_slice(data);
            Ok(())
        }
        fn can_log(&self) -> bool {
            true
        }
        fn log_start(&mut self, page_size: u64, _: &[(u64, u64)]) -> Result<(), Errno> {
            self.logging = page_size == 4096;
            self.logging.then_some(()).ok_or(libc::EINVAL)
        }
        fn log_stop(&mut self) -> Result<(), Errno> {
            self.logging = false;
            Ok(())
        }
        fn log_report(&mut self, _: u64, _: u64, _: u64, bitmap: &mut [u8]) -> Result<(), Errno> {
            if !self.logging {
                return Err(libc::EINVAL);
            }
            bitmap.fill(0x55);
            Ok(())
        }
    }

    /// The fuzz target, with the double for the device.
    fn run(data: &[u8], dev: &mut Double) {
        match data.split_first() {
            Some((d, rest)) if d & 1 == 0 => client_side(rest),
            Some((_, rest)) => server_side(rest, dev),
            None => {}
        }
    }

    struct Xorshift(u64);

    impl Xorshift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn the_committed_fuzz_seeds_are_these() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/seeds/vfio_user_messages");
        for (name, input) in build::seeds() {
            run(&input, &mut Double::new());
            let path = dir.join(name);
            if std::env::var_os("FERRY_WRITE_SEEDS").is_some() {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, &input).unwrap();
            }
            assert_eq!(
                std::fs::read(&path).ok(),
                Some(input),
                "{} (FERRY_WRITE_SEEDS=1 writes it)",
                path.display()
            );
        }
    }

    /// The client seeds decode as the successful replies they were built from: the fuzzer
    /// starts past the parsers.
    #[test]
    fn client_seeds_decode() {
        for (name, input) in build::seeds() {
            if input[0] != CLIENT || name == "client_error_then_reply" {
                continue;
            }
            let mut inp = Input::new(&input[1..]);
            let req = request(&mut inp);
            let rest = inp.rest();
            let h = Header::parse(rest[..HEADER_BYTES].try_into().unwrap()).unwrap();
            assert_eq!(h.size as usize, rest.len(), "{name}");
            assert!(
                check_reply(&req, &rest[HEADER_BYTES..]).is_some(),
                "{name}: {req:?}"
            );
        }
    }

    /// The server seeds decode, message by message, and the double answers the ones it
    /// should (the doorbell rung, the blob taken back in RESUMING).
    #[test]
    fn server_seeds_decode_and_reach_the_device() {
        for (name, input) in build::seeds() {
            if input[0] != SERVER {
                continue;
            }
            let mut inp = Input::new(&input[1..]);
            while !inp.is_empty() {
                let c = inp.u16();
                let n = usize::from(inp.u16());
                let p = inp.bytes(n);
                assert_eq!(p.len(), n, "{name}");
                Request::decode(c, p).unwrap_or_else(|e| panic!("{name}: {e}"));
            }
            let mut d = Double::new();
            server_side(&input[1..], &mut d);
            if name == "server_doorbell" {
                assert_eq!(d.doorbells, 1);
            }
        }
        // The state blob is ferry-dma-device's layout.
        let b = device_state();
        assert_eq!((b.len(), &b[..4]), (66, &b"FDMS"[..]));
    }

    #[test]
    fn every_request_kind_is_built_and_inverted() {
        let mut seen = std::collections::HashSet::new();
        let mut r = Xorshift(0x5eed_1234_5678_9abc);
        for i in 0..4000u32 {
            let mut b: Vec<u8> = (0..64).map(|_| r.next() as u8).collect();
            b[0] = (i % u32::from(REQUEST_KINDS)) as u8;
            let req = request(&mut Input::new(&b));
            let text = format!("{req:?}");
            // "Feature(SetState(3))" -> "Feature(SetState", "DeviceReset" -> "DeviceReset".
            let kind: Vec<&str> = text.split([' ', '{', '(']).take(2).collect();
            seen.insert(kind.join("("));
            let back = input_of(&req).expect("every built request inverts");
            assert_eq!(request(&mut Input::new(&back)), req);
            check_request_round_trip(&req);
        }
        // Every kind, the features told apart by their debug text's start.
        assert_eq!(seen.len(), usize::from(REQUEST_KINDS), "{seen:?}");
    }

    #[test]
    fn pseudo_random_inputs_keep_the_properties() {
        let seeds = build::seeds();
        let mut r = Xorshift(0x0f0f_1e57_cafe_d00d);
        let mut dev = Double::new();
        for i in 0..6000usize {
            let mut input = match i % 3 {
                0 => seeds[i / 3 % seeds.len()].1.clone(),
                1 => vec![r.next() as u8],
                _ => vec![CLIENT, (i % usize::from(REQUEST_KINDS)) as u8],
            };
            // Mutate a seed or grow random bytes.
            let n = r.below(300) as usize;
            if i % 3 == 0 && r.below(2) == 0 {
                for _ in 0..=r.below(4) {
                    let at = r.below(input.len() as u64) as usize;
                    input[at] = r.next() as u8;
                }
            } else {
                input.extend((0..n).map(|_| r.next() as u8));
            }
            if i % 500 == 0 {
                dev = Double::new();
            }
            run(&input, &mut dev);
        }
    }

    /// Found by the fuzz target: a DMA_LOGGING_REPORT of a range no bitmap fits (length
    /// 0, page size 0) was answered "successfully" with an empty bitmap, and
    /// `Reply::decode` took it. It is refused now.
    #[test]
    fn a_report_of_an_unreportable_range_has_no_answer() {
        let req = Request::Feature(Feature::LogReport {
            iova: 0,
            length: 0,
            page_size: 0,
        });
        let reply = Reply::LogReport {
            iova: 0,
            length: 0,
            page_size: 0,
            bitmap: Vec::new(),
        };
        let input = build::client(&req, &reply);
        assert_eq!(input.len(), 74);
        assert!(Reply::decode(&req, &reply.encode_payload(&req)).is_err());
        run(&input, &mut Double::new());
    }

    /// A header announcing the largest message, followed by nothing: framing allocates
    /// that bounded size and fails at the end of the stream, without hanging.
    #[test]
    fn a_truncated_big_message_is_refused() {
        let req = Request::MigDataRead {
            size: MAX_DATA_BYTES,
        };
        let h = Header {
            id: 0,
            command: 17,
            size: MAX_MESSAGE_BYTES,
            flags: 1,
            error: 0,
        };
        let mut input = input_of(&req).unwrap();
        input.extend_from_slice(&h.encode());
        input.extend_from_slice(&[0; 100]);
        client_side(&input);
    }
}
