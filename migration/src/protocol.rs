//! The migration wire protocol: framed, versioned, length-prefixed messages.
//!
//! Every message is a 12-byte [`Header`] (magic, protocol version, message type, payload
//! length, all little-endian) followed by its payload. `PROTOCOL.md` next to this crate
//! documents the byte layout; this module is the one implementation of it.
//!
//! Decoding is defensive: the payload length is capped per message type before anything is
//! allocated, every field is bounds-checked, and no input makes the decoder panic (the fuzz
//! target `migration_stream` and the tests below feed it arbitrary bytes).

use std::fmt;
use std::io::{self, Read, Write};

/// First four bytes of every message.
pub const MAGIC: [u8; 4] = *b"FRRY";
/// The protocol version this build speaks (and writes in every header).
pub const PROTOCOL_VERSION: u16 = 1;
/// The oldest version this build still accepts.
pub const MIN_PROTOCOL_VERSION: u16 = 1;
/// Bytes in a [`Header`].
pub const HEADER_LEN: usize = 12;
/// Guest page size on the wire; the only one supported.
pub const PAGE_SIZE: usize = 4096;
/// Largest page count in one memory chunk (4 MiB of data).
pub const MAX_CHUNK_PAGES: u32 = 1024;
/// Largest text (build string, refusal and abort reasons) in bytes.
pub const MAX_TEXT_LEN: usize = 4096;
/// Largest number of RAM ranges in a [`Config`].
pub const MAX_RAM_RANGES: usize = 1024;
/// Largest `Config` payload: the VM configuration is small JSON.
pub const MAX_CONFIG_LEN: u32 = 16 << 20;
/// Largest `State` payload (vCPU registers, XSAVE, device state).
pub const MAX_STATE_LEN: u32 = 64 << 20;
/// Bytes before the page bitmap in a memory chunk: crc32c, gpa, page count.
const CHUNK_FIXED_LEN: usize = 4 + 8 + 4;
/// Largest memory chunk payload: fixed part, page bitmap, all pages with data.
pub const MAX_CHUNK_LEN: u32 =
    (CHUNK_FIXED_LEN + MAX_CHUNK_PAGES as usize / 8 + MAX_CHUNK_PAGES as usize * PAGE_SIZE) as u32;
/// Most segments one page of a sparse chunk may have; a page with more data runs is sent
/// as one segment of the whole page.
pub const MAX_PAGE_SEGMENTS: usize = 64;
/// Largest sparse chunk payload: fixed part, then every page as one whole-page segment.
pub const MAX_SPARSE_CHUNK_LEN: u32 =
    (CHUNK_FIXED_LEN + MAX_CHUNK_PAGES as usize * (2 + 4 + PAGE_SIZE)) as u32;
/// Page kinds in a [`PageChunk`]: a zero page, or a page sent whole (other values:
/// the number of segments of a sparse page).
pub const PAGE_KIND_ZERO: u16 = 0;
pub const PAGE_KIND_WHOLE: u16 = 0xffff;
/// Largest page chunk payload: fixed part, a kind per page, every page whole (a sparse page
/// is only sent as segments when that is shorter than the page).
pub const MAX_PAGE_CHUNK_LEN: u32 =
    (CHUNK_FIXED_LEN + MAX_CHUNK_PAGES as usize * (2 + PAGE_SIZE)) as u32;
/// Most page runs in one [`Message::PostcopyDiscard`].
pub const MAX_DISCARD_RANGES: usize = 65536;
/// Largest payload of any message type.
pub const MAX_PAYLOAD_LEN: u32 = MAX_STATE_LEN;

/// Message type numbers on the wire. Never renumber: add new types at the end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum MessageType {
    Hello = 1,
    Config = 2,
    ConfigAccepted = 3,
    Refused = 4,
    MemoryChunk = 5,
    IterationDone = 6,
    State = 7,
    Complete = 8,
    Resumed = 9,
    Abort = 10,
    Channels = 11,
    ChannelHello = 12,
    ChannelsReady = 13,
    MemoryFds = 14,
    SparseChunk = 15,
    PassReceived = 16,
    Measured = 17,
    PageChunk = 18,
    PostcopyDiscard = 19,
    PostcopyRun = 20,
    PageRequest = 21,
    PostcopyDone = 22,
    PostcopyComplete = 23,
    PostcopyResume = 24,
    PostcopyMissing = 25,
}

impl MessageType {
    pub fn from_u16(v: u16) -> Option<MessageType> {
        use MessageType::*;
        Some(match v {
            1 => Hello,
            2 => Config,
            3 => ConfigAccepted,
            4 => Refused,
            5 => MemoryChunk,
            6 => IterationDone,
            7 => State,
            8 => Complete,
            9 => Resumed,
            10 => Abort,
            11 => Channels,
            12 => ChannelHello,
            13 => ChannelsReady,
            14 => MemoryFds,
            15 => SparseChunk,
            16 => PassReceived,
            17 => Measured,
            18 => PageChunk,
            19 => PostcopyDiscard,
            20 => PostcopyRun,
            21 => PageRequest,
            22 => PostcopyDone,
            23 => PostcopyComplete,
            24 => PostcopyResume,
            25 => PostcopyMissing,
            _ => return None,
        })
    }

    /// The cap on this type's payload length, checked before reading the payload.
    pub fn max_payload_len(self) -> u32 {
        use MessageType::*;
        match self {
            Hello => (2 + 8 + MAX_TEXT_LEN) as u32,
            Config => MAX_CONFIG_LEN,
            ConfigAccepted => 0,
            Refused | Abort => MAX_TEXT_LEN as u32,
            MemoryChunk => MAX_CHUNK_LEN,
            IterationDone => 4 + 8 + 8,
            State => MAX_STATE_LEN,
            Complete => 8 + MAX_CONFIG_LEN,
            Resumed => 8,
            Channels | ChannelHello => 2 + 8,
            ChannelsReady => 0,
            MemoryFds => (4 + MAX_RAM_RANGES * 24) as u32,
            SparseChunk => MAX_SPARSE_CHUNK_LEN,
            PassReceived => 4,
            Measured => 8 + 8,
            PageChunk => MAX_PAGE_CHUNK_LEN,
            PostcopyDiscard | PostcopyMissing => (4 + MAX_DISCARD_RANGES * 12) as u32,
            PostcopyRun => 8,
            PageRequest => 8,
            PostcopyDone => MAX_CONFIG_LEN,
            PostcopyComplete | PostcopyResume => 0,
        }
    }
}

impl fmt::Display for MessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self:?}")
    }
}

/// Everything that can go wrong reading or writing the stream.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("the peer closed the connection")]
    Closed,
    #[error(
        "bad magic {found:02x?} (expected {MAGIC:02x?}, \"FRRY\"): not a Ferry migration stream"
    )]
    BadMagic { found: [u8; 4] },
    #[error("unsupported protocol version {found} (this side speaks {min} to {max})")]
    UnsupportedVersion { found: u16, min: u16, max: u16 },
    #[error("unknown message type {0}")]
    UnknownType(u16),
    #[error("{kind} payload of {len} bytes exceeds its cap of {cap} bytes")]
    PayloadTooLarge {
        kind: MessageType,
        len: u32,
        cap: u32,
    },
    #[error("stream truncated in the {what}: got {got} of {expected} bytes")]
    Truncated {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("memory chunk at gpa {gpa:#x}: checksum mismatch (expected crc32c {expected:#010x}, found {found:#010x})")]
    ChecksumMismatch { gpa: u64, expected: u32, found: u32 },
    #[error("malformed {kind} payload: {detail}")]
    Malformed { kind: MessageType, detail: String },
    #[error("I/O error while {op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

impl ProtocolError {
    fn malformed(kind: MessageType, detail: impl Into<String>) -> Self {
        ProtocolError::Malformed {
            kind,
            detail: detail.into(),
        }
    }
}

/// The fixed header in front of every payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: u16,
    pub kind: MessageType,
    pub payload_len: u32,
}

impl Header {
    pub fn to_bytes(self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&self.version.to_le_bytes());
        b[6..8].copy_from_slice(&(self.kind as u16).to_le_bytes());
        b[8..12].copy_from_slice(&self.payload_len.to_le_bytes());
        b
    }

    /// Checks magic, version, type and the type's length cap.
    pub fn parse(b: &[u8; HEADER_LEN]) -> Result<Header, ProtocolError> {
        let found = [b[0], b[1], b[2], b[3]];
        if found != MAGIC {
            return Err(ProtocolError::BadMagic { found });
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version) {
            return Err(ProtocolError::UnsupportedVersion {
                found: version,
                min: MIN_PROTOCOL_VERSION,
                max: PROTOCOL_VERSION,
            });
        }
        let raw_kind = u16::from_le_bytes([b[6], b[7]]);
        let kind = MessageType::from_u16(raw_kind).ok_or(ProtocolError::UnknownType(raw_kind))?;
        let payload_len = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        let cap = kind.max_payload_len();
        if payload_len > cap {
            return Err(ProtocolError::PayloadTooLarge {
                kind,
                len: payload_len,
                cap,
            });
        }
        Ok(Header {
            version,
            kind,
            payload_len,
        })
    }
}

/// A guest-physical range of RAM: page-aligned start and size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct RamRange {
    pub gpa: u64,
    pub size: u64,
}

impl RamRange {
    pub fn end(&self) -> u64 {
        self.gpa + self.size
    }

    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE as u64
    }
}

/// Checks a RAM layout: page-aligned, non-empty, sorted, non-overlapping, no overflow.
pub fn check_ram_layout(ram: &[RamRange]) -> Result<(), String> {
    let page = PAGE_SIZE as u64;
    let mut prev_end = 0u64;
    for (i, r) in ram.iter().enumerate() {
        if r.gpa % page != 0 || r.size % page != 0 || r.size == 0 {
            return Err(format!(
                "RAM range {i} (gpa {:#x}, size {:#x}) is empty or not page-aligned",
                r.gpa, r.size
            ));
        }
        let Some(end) = r.gpa.checked_add(r.size) else {
            return Err(format!(
                "RAM range {i} (gpa {:#x}, size {:#x}) overflows",
                r.gpa, r.size
            ));
        };
        if i > 0 && r.gpa < prev_end {
            return Err(format!(
                "RAM range {i} at gpa {:#x} overlaps or precedes the previous one ending at {prev_end:#x}",
                r.gpa
            ));
        }
        prev_end = end;
    }
    Ok(())
}

/// `Hello`: the first message each side sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello<'a> {
    /// Highest protocol version the sender speaks.
    pub version: u16,
    /// Optional capabilities, a bit set ([`features`]).
    pub features: u64,
    /// Free text naming the sender's build (e.g. "ferry 0.1.0").
    pub build: &'a str,
}

/// Bits of [`Hello::features`]: optional behaviour, used only when both sides set the bit.
/// Unknown bits are ignored.
pub mod features {
    /// Memory may travel over extra connections ([`super::Message::Channels`]).
    pub const PARALLEL_CHANNELS: u64 = 1 << 0;
    /// On one host, guest RAM may be handed over as file descriptors
    /// ([`super::Message::MemoryFds`]) instead of being copied.
    pub const LOCAL_MEMORY: u64 = 1 << 1;
    /// Memory may come as [`super::Message::SparseChunk`]s.
    pub const SPARSE_PAGES: u64 = 1 << 2;
    /// The destination answers every `IterationDone` before the pause's `State` with
    /// [`super::Message::PassReceived`] once the pass is in guest RAM, and the source waits
    /// for it before it looks at the dirty set: it never pauses the guest while pages
    /// still queue on their way to the destination.
    pub const PASS_ACKS: u64 = 1 << 3;
    /// After `Resumed` the source sends [`super::Message::Measured`]: the downtime and
    /// total time on its own clock, which the destination then reports.
    pub const SOURCE_MEASURES: u64 = 1 << 4;
    /// Memory may come as [`super::Message::PageChunk`]s, whose page kinds come before
    /// the page data, so the destination can read whole pages straight into guest RAM.
    pub const PAGE_CHUNKS: u64 = 1 << 5;
    /// The source may switch to postcopy: the VM then runs on the destination before all
    /// of its RAM is there, and the destination asks for the pages it misses
    /// ([`super::Message::PageRequest`]) on the main connection's return direction.
    pub const POSTCOPY: u64 = 1 << 6;
    /// The destination reads the `State` blobs in the VM's binary encoding as well as in
    /// JSON (the vmm's `MachineState`; the protocol still does not look inside). Without
    /// it the source writes JSON, which every destination reads.
    pub const BINARY_STATE: u64 = 1 << 7;
    /// The destination takes an extra connection the source closes between two passes
    /// as retired: the passes after it travel on the connections left. The source then
    /// closes them before it pauses the guest for a small final pass, so that the pass's
    /// end does not wait for their threads on either side (the destination's read the
    /// close while the source pauses; an idle 4 GiB guest paused ~0.85 ms with one
    /// connection, ~1.0 with two).
    pub const LANES_RETIRE: u64 = 1 << 8;
    /// The source sends `State` at the pause, before the final pass's pages (its VM's
    /// state is final there), so every `IterationDone` before `State` ends a pass made
    /// while its guest ran: with `PASS_ACKS`, a destination may get ready for the state
    /// before its ack (`DestinationVm::warm_up`) without holding up a pause. A source
    /// whose state comes after the final pass leaves it out.
    pub const STATE_AT_PAUSE: u64 = 1 << 9;
    /// Every feature this build implements.
    pub const ALL: u64 = PARALLEL_CHANNELS
        | LOCAL_MEMORY
        | SPARSE_PAGES
        | PASS_ACKS
        | SOURCE_MEASURES
        | PAGE_CHUNKS
        | POSTCOPY
        | BINARY_STATE
        | LANES_RETIRE
        | STATE_AT_PAUSE;
}

/// Most connections one migration may use (the main one included).
pub const MAX_CHANNELS: u16 = 16;

/// One RAM range handed over as a file: the descriptor travels beside the message
/// (SCM_RIGHTS), in the same order as these entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryFd {
    pub gpa: u64,
    pub size: u64,
    /// Where the range starts in its file.
    pub file_offset: u64,
}

/// `Config`: the source's VM configuration and RAM layout, checked before any page moves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config<'a> {
    pub ram: Vec<RamRange>,
    /// Opaque to this crate: the vmm's JSON.
    pub vm_config: &'a [u8],
}

/// One memory chunk as received: a run of `page_count` consecutive pages from `gpa`.
/// Page `i` carries 4 KiB of data when bit `i` of `data_map` is set and is all zeros
/// otherwise; the data of the data pages is concatenated in `data`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryChunk<'a> {
    pub gpa: u64,
    pub page_count: u32,
    pub data_map: &'a [u8],
    pub data: &'a [u8],
}

/// A run of pages in a chunk that are all zero or all carry data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageRun<'a> {
    Zero { gpa: u64, pages: u32 },
    Data { gpa: u64, data: &'a [u8] },
}

impl<'a> MemoryChunk<'a> {
    fn has_data(&self, i: u32) -> bool {
        self.data_map[(i / 8) as usize] & (1 << (i % 8)) != 0
    }

    pub fn data_pages(&self) -> u32 {
        (self.data.len() / PAGE_SIZE) as u32
    }

    pub fn zero_pages(&self) -> u32 {
        self.page_count - self.data_pages()
    }

    /// The chunk's pages grouped into maximal zero and data runs, in address order.
    pub fn runs(&self) -> impl Iterator<Item = PageRun<'a>> + '_ {
        let mut i = 0u32;
        let mut data_off = 0usize;
        std::iter::from_fn(move || {
            if i >= self.page_count {
                return None;
            }
            let start = i;
            let data = self.has_data(i);
            while i < self.page_count && self.has_data(i) == data {
                i += 1;
            }
            let gpa = self.gpa + u64::from(start) * PAGE_SIZE as u64;
            let n = i - start;
            if data {
                let len = n as usize * PAGE_SIZE;
                let run = &self.data[data_off..data_off + len];
                data_off += len;
                Some(PageRun::Data { gpa, data: run })
            } else {
                Some(PageRun::Zero { gpa, pages: n })
            }
        })
    }
}

/// The source's end-of-migration message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Complete<'a> {
    /// Microseconds the source VM has been paused when it sent this.
    pub paused_us: u64,
    /// The source's migration statistics (JSON of [`crate::stats::MigrationInfo`]), so the
    /// destination can report them; opaque on the wire, may be empty.
    pub source_info: &'a [u8],
}

/// One protocol message. Borrowed fields point into the decoder's buffer (or the caller's
/// data when encoding), so a large chunk is never copied on its way through.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message<'a> {
    Hello(Hello<'a>),
    Config(Config<'a>),
    ConfigAccepted,
    Refused {
        reason: &'a str,
    },
    MemoryChunk(MemoryChunk<'a>),
    IterationDone {
        iteration: u32,
        pages: u64,
        bytes: u64,
    },
    State {
        vcpus: &'a [u8],
        devices: &'a [u8],
    },
    Complete(Complete<'a>),
    /// The destination's vCPUs run; `downtime_us` is its measure of the guest's pause.
    Resumed {
        downtime_us: u64,
    },
    Abort {
        reason: &'a str,
    },
    /// Source → destination on the main connection, after `ConfigAccepted`: `count` more
    /// connections follow, each opening with `ChannelHello` carrying `token`.
    Channels {
        count: u16,
        token: u64,
    },
    /// First message on an extra connection: which one it is (1..=count) and the token.
    ChannelHello {
        index: u16,
        token: u64,
    },
    /// Destination → source: every extra connection was accepted.
    ChannelsReady,
    /// Source → destination, before `Config`: guest RAM as files, whose descriptors
    /// travel with this message's bytes (SCM_RIGHTS, UNIX sockets only).
    MemoryFds(Vec<MemoryFd>),
    /// A memory chunk whose pages carry only their non-zero stretches.
    SparseChunk(SparseChunk<'a>),
    /// Destination → source: every page of pass `iteration` is in guest RAM.
    PassReceived {
        iteration: u32,
    },
    /// Source → destination, after `Resumed`: from the pause to `Resumed` and from the
    /// start to `Resumed`, on the source's clock.
    Measured {
        downtime_us: u64,
        total_us: u64,
    },
    /// A memory chunk with a kind per page ahead of the data (see [`PageChunk`]).
    PageChunk(PageChunk<'a>),
    /// Source → destination at the switch to postcopy (the source is paused): these runs
    /// `(gpa, pages)` are not valid on the destination (never sent, or written again since
    /// they were); it drops what it holds of them. Several may follow one another.
    PostcopyDiscard(Vec<(u64, u32)>),
    /// Source → destination after the discards and the `State`: run the VM now;
    /// `paused_us` is how long the source had been paused.
    PostcopyRun {
        paused_us: u64,
    },
    /// Destination → source during postcopy: the guest (or a device) waits for this page.
    PageRequest {
        gpa: u64,
    },
    /// Source → destination: every page not valid at the switch has been sent once;
    /// `source_info` as in [`Complete`].
    PostcopyDone {
        source_info: &'a [u8],
    },
    /// Destination → source: every page of RAM is here; the source may go.
    PostcopyComplete,
    /// Source → destination, first on a new connection after postcopy lost its link:
    /// take the migration up again.
    PostcopyResume,
    /// Destination → source, the answer to `PostcopyResume`: runs of pages still missing
    /// here; an empty list ends the answer.
    PostcopyMissing(Vec<(u64, u32)>),
}

impl Message<'_> {
    pub fn kind(&self) -> MessageType {
        match self {
            Message::Hello(_) => MessageType::Hello,
            Message::Config(_) => MessageType::Config,
            Message::ConfigAccepted => MessageType::ConfigAccepted,
            Message::Refused { .. } => MessageType::Refused,
            Message::MemoryChunk(_) => MessageType::MemoryChunk,
            Message::IterationDone { .. } => MessageType::IterationDone,
            Message::State { .. } => MessageType::State,
            Message::Complete(_) => MessageType::Complete,
            Message::Resumed { .. } => MessageType::Resumed,
            Message::Abort { .. } => MessageType::Abort,
            Message::Channels { .. } => MessageType::Channels,
            Message::ChannelHello { .. } => MessageType::ChannelHello,
            Message::ChannelsReady => MessageType::ChannelsReady,
            Message::MemoryFds(_) => MessageType::MemoryFds,
            Message::SparseChunk(_) => MessageType::SparseChunk,
            Message::PassReceived { .. } => MessageType::PassReceived,
            Message::Measured { .. } => MessageType::Measured,
            Message::PageChunk(_) => MessageType::PageChunk,
            Message::PostcopyDiscard(_) => MessageType::PostcopyDiscard,
            Message::PostcopyRun { .. } => MessageType::PostcopyRun,
            Message::PageRequest { .. } => MessageType::PageRequest,
            Message::PostcopyDone { .. } => MessageType::PostcopyDone,
            Message::PostcopyComplete => MessageType::PostcopyComplete,
            Message::PostcopyResume => MessageType::PostcopyResume,
            Message::PostcopyMissing(_) => MessageType::PostcopyMissing,
        }
    }
}

/// Cuts text to [`MAX_TEXT_LEN`] bytes on a character boundary, so that any reason fits.
pub fn clip_text(s: &str) -> &str {
    if s.len() <= MAX_TEXT_LEN {
        return s;
    }
    let mut end = MAX_TEXT_LEN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Appends a whole frame (header and payload) for `msg` to `out`.
///
/// Text longer than [`MAX_TEXT_LEN`] is clipped; a payload over its type's cap (a `State`
/// or `Config` too big, a malformed chunk) is an error rather than a frame the peer refuses.
pub fn encode(msg: &Message<'_>, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
    let kind = msg.kind();
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER_LEN]);
    match msg {
        Message::Hello(h) => {
            out.extend_from_slice(&h.version.to_le_bytes());
            out.extend_from_slice(&h.features.to_le_bytes());
            out.extend_from_slice(clip_text(h.build).as_bytes());
        }
        Message::Config(c) => {
            if c.ram.len() > MAX_RAM_RANGES {
                out.truncate(start);
                return Err(ProtocolError::malformed(
                    kind,
                    format!("{} RAM ranges, at most {MAX_RAM_RANGES}", c.ram.len()),
                ));
            }
            out.extend_from_slice(&(c.ram.len() as u32).to_le_bytes());
            for r in &c.ram {
                out.extend_from_slice(&r.gpa.to_le_bytes());
                out.extend_from_slice(&r.size.to_le_bytes());
            }
            out.extend_from_slice(c.vm_config);
        }
        Message::ConfigAccepted => {}
        Message::Refused { reason } | Message::Abort { reason } => {
            out.extend_from_slice(clip_text(reason).as_bytes())
        }
        Message::MemoryChunk(c) => {
            let payload_start = out.len();
            out.extend_from_slice(&[0u8; 4]);
            out.extend_from_slice(&c.gpa.to_le_bytes());
            out.extend_from_slice(&c.page_count.to_le_bytes());
            out.extend_from_slice(c.data_map);
            out.extend_from_slice(c.data);
            let crc = crate::crc::crc32c(&out[payload_start + 4..]);
            out[payload_start..payload_start + 4].copy_from_slice(&crc.to_le_bytes());
        }
        Message::IterationDone {
            iteration,
            pages,
            bytes,
        } => {
            out.extend_from_slice(&iteration.to_le_bytes());
            out.extend_from_slice(&pages.to_le_bytes());
            out.extend_from_slice(&bytes.to_le_bytes());
        }
        Message::State { vcpus, devices } => {
            let Ok(vcpus_len) = u32::try_from(vcpus.len()) else {
                out.truncate(start);
                return Err(ProtocolError::PayloadTooLarge {
                    kind,
                    len: u32::MAX,
                    cap: kind.max_payload_len(),
                });
            };
            out.extend_from_slice(&vcpus_len.to_le_bytes());
            out.extend_from_slice(vcpus);
            out.extend_from_slice(devices);
        }
        Message::Complete(c) => {
            out.extend_from_slice(&c.paused_us.to_le_bytes());
            out.extend_from_slice(c.source_info);
        }
        Message::Resumed { downtime_us } => out.extend_from_slice(&downtime_us.to_le_bytes()),
        Message::PassReceived { iteration } => out.extend_from_slice(&iteration.to_le_bytes()),
        Message::Measured {
            downtime_us,
            total_us,
        } => {
            out.extend_from_slice(&downtime_us.to_le_bytes());
            out.extend_from_slice(&total_us.to_le_bytes());
        }
        Message::Channels { count, token } => {
            out.extend_from_slice(&count.to_le_bytes());
            out.extend_from_slice(&token.to_le_bytes());
        }
        Message::ChannelHello { index, token } => {
            out.extend_from_slice(&index.to_le_bytes());
            out.extend_from_slice(&token.to_le_bytes());
        }
        Message::PageChunk(c) => {
            let payload_start = out.len();
            out.extend_from_slice(&[0u8; 4]);
            out.extend_from_slice(&c.gpa.to_le_bytes());
            out.extend_from_slice(&c.page_count.to_le_bytes());
            out.extend_from_slice(c.body);
            let crc = crate::crc::crc32c(&out[payload_start + 4..]);
            out[payload_start..payload_start + 4].copy_from_slice(&crc.to_le_bytes());
        }
        Message::ChannelsReady | Message::PostcopyComplete | Message::PostcopyResume => {}
        Message::PostcopyDone { source_info } => out.extend_from_slice(source_info),
        Message::PostcopyRun { paused_us } => out.extend_from_slice(&paused_us.to_le_bytes()),
        Message::PageRequest { gpa } => out.extend_from_slice(&gpa.to_le_bytes()),
        Message::PostcopyDiscard(runs) | Message::PostcopyMissing(runs) => {
            if runs.len() > MAX_DISCARD_RANGES {
                out.truncate(start);
                return Err(ProtocolError::malformed(
                    kind,
                    format!("{} runs, at most {MAX_DISCARD_RANGES}", runs.len()),
                ));
            }
            out.extend_from_slice(&(runs.len() as u32).to_le_bytes());
            for (gpa, pages) in runs {
                out.extend_from_slice(&gpa.to_le_bytes());
                out.extend_from_slice(&pages.to_le_bytes());
            }
        }
        Message::SparseChunk(c) => {
            let payload_start = out.len();
            out.extend_from_slice(&[0u8; 4]);
            out.extend_from_slice(&c.gpa.to_le_bytes());
            out.extend_from_slice(&c.page_count.to_le_bytes());
            out.extend_from_slice(c.body);
            let crc = crate::crc::crc32c(&out[payload_start + 4..]);
            out[payload_start..payload_start + 4].copy_from_slice(&crc.to_le_bytes());
        }
        Message::MemoryFds(fds) => {
            if fds.len() > MAX_RAM_RANGES {
                out.truncate(start);
                return Err(ProtocolError::malformed(
                    kind,
                    format!("{} memory files, at most {MAX_RAM_RANGES}", fds.len()),
                ));
            }
            out.extend_from_slice(&(fds.len() as u32).to_le_bytes());
            for f in fds {
                out.extend_from_slice(&f.gpa.to_le_bytes());
                out.extend_from_slice(&f.size.to_le_bytes());
                out.extend_from_slice(&f.file_offset.to_le_bytes());
            }
        }
    }
    finish_frame(out, start, kind)
}

/// Fills in the header of the frame starting at `start`, checking the length cap.
fn finish_frame(out: &mut Vec<u8>, start: usize, kind: MessageType) -> Result<(), ProtocolError> {
    let len = out.len() - start - HEADER_LEN;
    let cap = kind.max_payload_len();
    if len > cap as usize {
        out.truncate(start);
        return Err(ProtocolError::PayloadTooLarge {
            kind,
            len: u32::try_from(len).unwrap_or(u32::MAX),
            cap,
        });
    }
    let header = Header {
        version: PROTOCOL_VERSION,
        kind,
        payload_len: len as u32,
    };
    out[start..start + HEADER_LEN].copy_from_slice(&header.to_bytes());
    Ok(())
}

/// Pages of one encoded chunk, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChunkCounts {
    pub zero_pages: u32,
    pub data_pages: u32,
}

/// Appends a `MemoryChunk` frame for the pages in `pages` (a whole number of pages read
/// from guest RAM at `gpa`): zero pages become a bit in the map, the others are copied once.
pub fn encode_memory_chunk(
    gpa: u64,
    pages: &[u8],
    out: &mut Vec<u8>,
) -> Result<ChunkCounts, ProtocolError> {
    let kind = MessageType::MemoryChunk;
    let page_count = pages.len() / PAGE_SIZE;
    if !pages.len().is_multiple_of(PAGE_SIZE)
        || page_count == 0
        || page_count > MAX_CHUNK_PAGES as usize
    {
        return Err(ProtocolError::malformed(
            kind,
            format!(
                "{} bytes is not 1 to {MAX_CHUNK_PAGES} whole pages",
                pages.len()
            ),
        ));
    }
    if !gpa.is_multiple_of(PAGE_SIZE as u64) {
        return Err(ProtocolError::malformed(
            kind,
            format!("gpa {gpa:#x} is not page-aligned"),
        ));
    }
    let map_len = page_count.div_ceil(8);
    let start = out.len();
    out.reserve(HEADER_LEN + CHUNK_FIXED_LEN + map_len + pages.len());
    out.extend_from_slice(&[0u8; HEADER_LEN]);
    let payload_start = out.len();
    out.extend_from_slice(&[0u8; 4]);
    out.extend_from_slice(&gpa.to_le_bytes());
    out.extend_from_slice(&(page_count as u32).to_le_bytes());
    let map_start = out.len();
    out.resize(map_start + map_len, 0);
    let mut counts = ChunkCounts::default();
    for (i, page) in pages.chunks_exact(PAGE_SIZE).enumerate() {
        if is_zero_page(page) {
            counts.zero_pages += 1;
        } else {
            counts.data_pages += 1;
            out[map_start + i / 8] |= 1 << (i % 8);
            out.extend_from_slice(page);
        }
    }
    let crc = crate::crc::crc32c(&out[payload_start + 4..]);
    out[payload_start..payload_start + 4].copy_from_slice(&crc.to_le_bytes());
    finish_frame(out, start, kind)?;
    Ok(counts)
}

/// True when every byte of `page` is zero. Compares 16-byte words, 128 bytes per step,
/// so that a data page usually exits on its first step and a zero page runs at memory speed.
pub fn is_zero_page(page: &[u8]) -> bool {
    let mut blocks = page.chunks_exact(128);
    for block in &mut blocks {
        let mut acc = 0u128;
        for w in block.chunks_exact(16) {
            // chunks_exact(16) yields exactly 16 bytes.
            acc |= u128::from_ne_bytes(w.try_into().unwrap_or([0xff; 16]));
        }
        if acc != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

/// Writes one message with a single `write_all` of header and payload.
pub fn write_message<W: Write + ?Sized>(w: &mut W, msg: &Message<'_>) -> Result<(), ProtocolError> {
    let mut buf = Vec::new();
    encode(msg, &mut buf)?;
    w.write_all(&buf).map_err(|source| ProtocolError::Io {
        op: "sending a message",
        source,
    })?;
    w.flush().map_err(|source| ProtocolError::Io {
        op: "sending a message",
        source,
    })
}

/// Reads messages one at a time from a byte stream, reusing one payload buffer.
pub struct MessageReader<R> {
    inner: R,
    buf: Vec<u8>,
    /// A `PageChunk`'s read-ahead (see [`PayloadReader`]).
    ahead: Vec<u8>,
}

/// Payload bytes read per step while the buffer grows: a header claiming a big payload
/// costs memory only as the bytes actually arrive.
const READ_STEP: usize = 1 << 20;

impl<R: Read> MessageReader<R> {
    pub fn new(inner: R) -> Self {
        MessageReader {
            inner,
            buf: Vec::new(),
            ahead: Vec::new(),
        }
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    pub fn into_inner(self) -> R {
        self.inner
    }

    /// Reads and decodes the next message. `Err(Closed)` when the stream ends cleanly
    /// between messages; every other failure names what was wrong.
    pub fn read_message(&mut self) -> Result<Message<'_>, ProtocolError> {
        let header = self.read_header()?;
        self.read_payload(header)
    }

    /// [`MessageReader::read_message`], except that a `PageChunk` is not buffered: its
    /// pages go to `sink` as they arrive (whole pages read straight into the place the sink
    /// gives), and `Ok(None)` says one was stored.
    pub fn read_message_with<P: PageSink>(
        &mut self,
        sink: &mut P,
    ) -> Result<Option<Message<'_>>, P::Error> {
        let header = self.read_header()?;
        if header.kind == MessageType::PageChunk {
            let len = header.payload_len as usize;
            if self.ahead.is_empty() {
                self.ahead.resize(READ_AHEAD, 0);
            }
            stream_page_chunk(&mut self.inner, len, sink, &mut self.buf, &mut self.ahead)?;
            return Ok(None);
        }
        Ok(Some(self.read_payload(header)?))
    }

    fn read_header(&mut self) -> Result<Header, ProtocolError> {
        let mut hb = [0u8; HEADER_LEN];
        let got = read_full(&mut self.inner, &mut hb)?;
        if got == 0 {
            return Err(ProtocolError::Closed);
        }
        if got < HEADER_LEN {
            return Err(ProtocolError::Truncated {
                what: "message header",
                expected: HEADER_LEN,
                got,
            });
        }
        Header::parse(&hb)
    }

    fn read_payload(&mut self, header: Header) -> Result<Message<'_>, ProtocolError> {
        let len = header.payload_len as usize;
        let mut filled = 0;
        while filled < len {
            let want = len.min(filled + READ_STEP);
            if self.buf.len() < want {
                self.buf.resize(want, 0);
            }
            let n = read_full(&mut self.inner, &mut self.buf[filled..want])?;
            filled += n;
            if filled < want {
                return Err(ProtocolError::Truncated {
                    what: "message payload",
                    expected: len,
                    got: filled,
                });
            }
        }
        decode_payload(header.kind, &self.buf[..len])
    }
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
fn read_full<R: Read + ?Sized>(r: &mut R, buf: &mut [u8]) -> Result<usize, ProtocolError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(ProtocolError::Io {
                    op: "receiving a message",
                    source,
                })
            }
        }
    }
    Ok(got)
}

fn u16_at(p: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([p[off], p[off + 1]])
}

fn u32_at(p: &[u8], off: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&p[off..off + 4]);
    u32::from_le_bytes(b)
}

fn u64_at(p: &[u8], off: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&p[off..off + 8]);
    u64::from_le_bytes(b)
}

fn text(kind: MessageType, b: &[u8]) -> Result<&str, ProtocolError> {
    std::str::from_utf8(b)
        .map_err(|e| ProtocolError::malformed(kind, format!("text is not UTF-8: {e}")))
}

fn exact_len(kind: MessageType, p: &[u8], len: usize) -> Result<(), ProtocolError> {
    if p.len() != len {
        return Err(ProtocolError::malformed(
            kind,
            format!("{} bytes, expected {len}", p.len()),
        ));
    }
    Ok(())
}

fn min_len(kind: MessageType, p: &[u8], len: usize) -> Result<(), ProtocolError> {
    if p.len() < len {
        return Err(ProtocolError::malformed(
            kind,
            format!("{} bytes, expected at least {len}", p.len()),
        ));
    }
    Ok(())
}

/// Decodes a payload whose header was already checked.
pub fn decode_payload(kind: MessageType, p: &[u8]) -> Result<Message<'_>, ProtocolError> {
    Ok(match kind {
        MessageType::Hello => {
            min_len(kind, p, 10)?;
            Message::Hello(Hello {
                version: u16_at(p, 0),
                features: u64_at(p, 2),
                build: text(kind, &p[10..])?,
            })
        }
        MessageType::Config => {
            min_len(kind, p, 4)?;
            let n = u32_at(p, 0) as usize;
            if n > MAX_RAM_RANGES {
                return Err(ProtocolError::malformed(
                    kind,
                    format!("{n} RAM ranges, at most {MAX_RAM_RANGES}"),
                ));
            }
            min_len(kind, p, 4 + n * 16)?;
            let ram: Vec<RamRange> = (0..n)
                .map(|i| RamRange {
                    gpa: u64_at(p, 4 + i * 16),
                    size: u64_at(p, 12 + i * 16),
                })
                .collect();
            check_ram_layout(&ram).map_err(|e| ProtocolError::malformed(kind, e))?;
            Message::Config(Config {
                ram,
                vm_config: &p[4 + n * 16..],
            })
        }
        MessageType::ConfigAccepted => {
            exact_len(kind, p, 0)?;
            Message::ConfigAccepted
        }
        MessageType::Refused => Message::Refused {
            reason: text(kind, p)?,
        },
        MessageType::Abort => Message::Abort {
            reason: text(kind, p)?,
        },
        MessageType::MemoryChunk => Message::MemoryChunk(decode_chunk(p)?),
        MessageType::IterationDone => {
            exact_len(kind, p, 20)?;
            Message::IterationDone {
                iteration: u32_at(p, 0),
                pages: u64_at(p, 4),
                bytes: u64_at(p, 12),
            }
        }
        MessageType::State => {
            min_len(kind, p, 4)?;
            let n = u32_at(p, 0) as usize;
            if n > p.len() - 4 {
                return Err(ProtocolError::malformed(
                    kind,
                    format!("vCPU state of {n} bytes in a {}-byte payload", p.len()),
                ));
            }
            Message::State {
                vcpus: &p[4..4 + n],
                devices: &p[4 + n..],
            }
        }
        MessageType::Complete => {
            min_len(kind, p, 8)?;
            Message::Complete(Complete {
                paused_us: u64_at(p, 0),
                source_info: &p[8..],
            })
        }
        MessageType::Resumed => {
            exact_len(kind, p, 8)?;
            Message::Resumed {
                downtime_us: u64_at(p, 0),
            }
        }
        MessageType::PassReceived => {
            exact_len(kind, p, 4)?;
            Message::PassReceived {
                iteration: u32_at(p, 0),
            }
        }
        MessageType::Measured => {
            exact_len(kind, p, 16)?;
            Message::Measured {
                downtime_us: u64_at(p, 0),
                total_us: u64_at(p, 8),
            }
        }
        MessageType::Channels | MessageType::ChannelHello => {
            exact_len(kind, p, 10)?;
            let (n, token) = (u16_at(p, 0), u64_at(p, 2));
            if kind == MessageType::Channels {
                if n == 0 || n >= MAX_CHANNELS {
                    return Err(ProtocolError::malformed(
                        kind,
                        format!("{n} extra connections (1 to {})", MAX_CHANNELS - 1),
                    ));
                }
                Message::Channels { count: n, token }
            } else {
                if n == 0 || n >= MAX_CHANNELS {
                    return Err(ProtocolError::malformed(
                        kind,
                        format!("connection index {n} (1 to {})", MAX_CHANNELS - 1),
                    ));
                }
                Message::ChannelHello { index: n, token }
            }
        }
        MessageType::ChannelsReady => {
            exact_len(kind, p, 0)?;
            Message::ChannelsReady
        }
        MessageType::PostcopyDone => Message::PostcopyDone { source_info: p },
        MessageType::PostcopyComplete => {
            exact_len(kind, p, 0)?;
            Message::PostcopyComplete
        }
        MessageType::PostcopyResume => {
            exact_len(kind, p, 0)?;
            Message::PostcopyResume
        }
        MessageType::PostcopyRun => {
            exact_len(kind, p, 8)?;
            Message::PostcopyRun {
                paused_us: u64_at(p, 0),
            }
        }
        MessageType::PageRequest => {
            exact_len(kind, p, 8)?;
            let gpa = u64_at(p, 0);
            if !gpa.is_multiple_of(PAGE_SIZE as u64) {
                return Err(ProtocolError::malformed(
                    kind,
                    format!("gpa {gpa:#x} is not page-aligned"),
                ));
            }
            Message::PageRequest { gpa }
        }
        MessageType::PostcopyDiscard | MessageType::PostcopyMissing => {
            min_len(kind, p, 4)?;
            let n = u32_at(p, 0) as usize;
            if n > MAX_DISCARD_RANGES {
                return Err(ProtocolError::malformed(
                    kind,
                    format!("{n} runs, at most {MAX_DISCARD_RANGES}"),
                ));
            }
            exact_len(kind, p, 4 + n * 12)?;
            let mut runs = Vec::with_capacity(n);
            for i in 0..n {
                let (gpa, pages) = (u64_at(p, 4 + i * 12), u32_at(p, 12 + i * 12));
                if !gpa.is_multiple_of(PAGE_SIZE as u64) || pages == 0 {
                    return Err(ProtocolError::malformed(
                        kind,
                        format!(
                            "run {i} (gpa {gpa:#x}, {pages} pages) is empty or not page-aligned"
                        ),
                    ));
                }
                runs.push((gpa, pages));
            }
            if kind == MessageType::PostcopyDiscard {
                Message::PostcopyDiscard(runs)
            } else {
                Message::PostcopyMissing(runs)
            }
        }
        MessageType::SparseChunk => Message::SparseChunk(decode_sparse_chunk(p)?),
        MessageType::PageChunk => Message::PageChunk(decode_page_chunk(p)?),
        MessageType::MemoryFds => {
            min_len(kind, p, 4)?;
            let n = u32_at(p, 0) as usize;
            if n == 0 || n > MAX_RAM_RANGES {
                return Err(ProtocolError::malformed(
                    kind,
                    format!("{n} memory files (1 to {MAX_RAM_RANGES})"),
                ));
            }
            exact_len(kind, p, 4 + n * 24)?;
            let fds: Vec<MemoryFd> = (0..n)
                .map(|i| MemoryFd {
                    gpa: u64_at(p, 4 + i * 24),
                    size: u64_at(p, 12 + i * 24),
                    file_offset: u64_at(p, 20 + i * 24),
                })
                .collect();
            let ram: Vec<RamRange> = fds
                .iter()
                .map(|f| RamRange {
                    gpa: f.gpa,
                    size: f.size,
                })
                .collect();
            check_ram_layout(&ram).map_err(|e| ProtocolError::malformed(kind, e))?;
            if let Some(f) = fds.iter().find(|f| f.file_offset % PAGE_SIZE as u64 != 0) {
                return Err(ProtocolError::malformed(
                    kind,
                    format!(
                        "file offset {:#x} of gpa {:#x} is not page-aligned",
                        f.file_offset, f.gpa
                    ),
                ));
            }
            Message::MemoryFds(fds)
        }
    })
}

/// A sparse memory chunk as received: `page_count` pages from `gpa`, each as a list of
/// non-zero stretches (`body`, checked by the decoder; see [`SparseChunk::expand`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SparseChunk<'a> {
    pub gpa: u64,
    pub page_count: u32,
    /// Per page: `segments: u16`, then `segments ×` (`offset: u16`, `len: u16`, bytes).
    pub body: &'a [u8],
}

impl SparseChunk<'_> {
    /// Writes the chunk's pages, whole, into `pages` (resized to `page_count` pages) and
    /// sets bit `i` of `data_map` for each page with any data: the shape of a plain
    /// [`MemoryChunk`]. Returns the number of data pages.
    pub fn expand(&self, pages: &mut Vec<u8>, data_map: &mut Vec<u8>) -> u32 {
        let n = self.page_count as usize;
        pages.clear();
        data_map.clear();
        data_map.resize(n.div_ceil(8), 0);
        let mut data_pages = 0;
        let mut at = 0;
        let b = self.body;
        for i in 0..n {
            let segs = u16_at(b, at) as usize;
            at += 2;
            if segs == 0 {
                continue;
            }
            data_map[i / 8] |= 1 << (i % 8);
            data_pages += 1;
            let start = pages.len();
            pages.resize(start + PAGE_SIZE, 0);
            for _ in 0..segs {
                let off = u16_at(b, at) as usize;
                let len = u16_at(b, at + 2) as usize;
                pages[start + off..start + off + len].copy_from_slice(&b[at + 4..at + 4 + len]);
                at += 4 + len;
            }
        }
        data_pages
    }
}

/// Appends a `SparseChunk` frame for `pages` (whole pages read at `gpa`): each page as its
/// runs of non-zero 8-byte words, a page with too many runs as one whole-page run.
pub fn encode_sparse_chunk(
    gpa: u64,
    pages: &[u8],
    out: &mut Vec<u8>,
) -> Result<ChunkCounts, ProtocolError> {
    encode_sparse_chunk_known(gpa, pages, &[], out)
}

/// [`encode_sparse_chunk`] where page `i` is known to be zero when `known_zero[i]` is true
/// (its bytes in `pages` are then not looked at: the reader did not fill them). An empty
/// `known_zero` knows nothing.
pub fn encode_sparse_chunk_known(
    gpa: u64,
    pages: &[u8],
    known_zero: &[bool],
    out: &mut Vec<u8>,
) -> Result<ChunkCounts, ProtocolError> {
    let kind = MessageType::SparseChunk;
    let page_count = pages.len() / PAGE_SIZE;
    if !pages.len().is_multiple_of(PAGE_SIZE)
        || page_count == 0
        || page_count > MAX_CHUNK_PAGES as usize
        || !gpa.is_multiple_of(PAGE_SIZE as u64)
    {
        return Err(ProtocolError::malformed(
            kind,
            format!(
                "{} bytes at gpa {gpa:#x} is not 1 to {MAX_CHUNK_PAGES} whole, aligned pages",
                pages.len()
            ),
        ));
    }
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER_LEN]);
    let payload_start = out.len();
    out.extend_from_slice(&[0u8; 4]);
    out.extend_from_slice(&gpa.to_le_bytes());
    out.extend_from_slice(&(page_count as u32).to_le_bytes());
    let mut counts = ChunkCounts::default();
    let mut runs: Vec<(usize, usize)> = Vec::with_capacity(MAX_PAGE_SEGMENTS + 1);
    for (i, page) in pages.chunks_exact(PAGE_SIZE).enumerate() {
        if known_zero.get(i) == Some(&true) || is_zero_page(page) {
            runs.clear();
        } else {
            non_zero_runs(page, &mut runs);
        }
        if runs.is_empty() {
            counts.zero_pages += 1;
            out.extend_from_slice(&0u16.to_le_bytes());
            continue;
        }
        counts.data_pages += 1;
        if runs.len() > MAX_PAGE_SEGMENTS {
            runs.clear();
            runs.push((0, PAGE_SIZE));
        }
        out.extend_from_slice(&(runs.len() as u16).to_le_bytes());
        for &(off, len) in &runs {
            out.extend_from_slice(&(off as u16).to_le_bytes());
            out.extend_from_slice(&(len as u16).to_le_bytes());
            out.extend_from_slice(&page[off..off + len]);
        }
    }
    let crc = crate::crc::crc32c(&out[payload_start + 4..]);
    out[payload_start..payload_start + 4].copy_from_slice(&crc.to_le_bytes());
    finish_frame(out, start, kind)?;
    Ok(counts)
}

/// The runs of non-zero 8-byte words of `page` as `(offset, len)`, runs closer than 16
/// zero bytes merged (a segment header costs 4). Stops early once past the segment cap.
fn non_zero_runs(page: &[u8], runs: &mut Vec<(usize, usize)>) {
    runs.clear();
    let mut w = 0;
    let words = PAGE_SIZE / 8;
    let word = |i: usize| u64::from_ne_bytes(page[i * 8..i * 8 + 8].try_into().unwrap_or([1; 8]));
    // A page with data in all of 16 words spread over it is almost surely full: send it
    // whole without a scan (as fast as a plain chunk). Always correct, at worst a little
    // larger.
    if (0..16).all(|k| word(k * (words / 16) + 7) != 0) {
        runs.push((0, PAGE_SIZE));
        return;
    }
    // Eight words (a cache line) at a time while they are all zero: most of a sparse
    // page is, and the whole-line test is one vector compare where a word loop is eight
    // branches.
    let line_zero = |w: usize| page[w * 8..w * 8 + 64].iter().fold(0u8, |a, &b| a | b) == 0;
    while w < words {
        if w % 8 == 0 && w + 8 <= words && line_zero(w) {
            w += 8;
            continue;
        }
        if word(w) == 0 {
            w += 1;
            continue;
        }
        let first = w;
        let mut last = w;
        w += 1;
        while w < words {
            if word(w) != 0 {
                last = w;
                w += 1;
            } else if w + 2 < words && (word(w + 1) != 0 || word(w + 2) != 0) {
                w += 1;
            } else {
                break;
            }
        }
        runs.push((first * 8, (last + 1 - first) * 8));
        if runs.len() > MAX_PAGE_SEGMENTS {
            return;
        }
    }
}

/// The fixed fields every memory chunk starts with (crc32c, gpa, page count), checked:
/// `(gpa, page_count)`.
fn chunk_header(kind: MessageType, p: &[u8]) -> Result<(u64, u32), ProtocolError> {
    min_len(kind, p, CHUNK_FIXED_LEN)?;
    let gpa = u64_at(p, 4);
    let page_count = u32_at(p, 12);
    if page_count == 0 || page_count > MAX_CHUNK_PAGES {
        return Err(ProtocolError::malformed(
            kind,
            format!("page count {page_count} at gpa {gpa:#x} (1 to {MAX_CHUNK_PAGES})"),
        ));
    }
    if !gpa.is_multiple_of(PAGE_SIZE as u64) {
        return Err(ProtocolError::malformed(
            kind,
            format!("gpa {gpa:#x} is not page-aligned"),
        ));
    }
    if gpa
        .checked_add(u64::from(page_count) * PAGE_SIZE as u64)
        .is_none()
    {
        return Err(ProtocolError::malformed(
            kind,
            format!("{page_count} pages at gpa {gpa:#x} overflow the address space"),
        ));
    }
    Ok((gpa, page_count))
}

/// Checks a memory chunk's crc32c (its first field, over every payload byte after it).
fn check_chunk_crc(p: &[u8], gpa: u64) -> Result<(), ProtocolError> {
    let expected = u32_at(p, 0);
    let found = crate::crc::crc32c(&p[4..]);
    if found != expected {
        return Err(ProtocolError::ChecksumMismatch {
            gpa,
            expected,
            found,
        });
    }
    Ok(())
}

fn decode_sparse_chunk(p: &[u8]) -> Result<SparseChunk<'_>, ProtocolError> {
    let kind = MessageType::SparseChunk;
    let (gpa, page_count) = chunk_header(kind, p)?;
    // The checksum first: damage anywhere reads as damage, not as a malformed layout.
    check_chunk_crc(p, gpa)?;
    let body = &p[CHUNK_FIXED_LEN..];
    let bad = |page: u32, why: String| {
        ProtocolError::malformed(
            kind,
            format!(
                "page {:#x}: {why}",
                gpa + u64::from(page) * PAGE_SIZE as u64
            ),
        )
    };
    let mut at = 0;
    for i in 0..page_count {
        if at + 2 > body.len() {
            return Err(bad(i, "truncated segment count".into()));
        }
        let segs = u16_at(body, at) as usize;
        at += 2;
        if segs > MAX_PAGE_SEGMENTS {
            return Err(bad(
                i,
                format!("{segs} segments, at most {MAX_PAGE_SEGMENTS}"),
            ));
        }
        let mut end = 0;
        for _ in 0..segs {
            if at + 4 > body.len() {
                return Err(bad(i, "truncated segment".into()));
            }
            let off = u16_at(body, at) as usize;
            let len = u16_at(body, at + 2) as usize;
            if len == 0 || off < end || off + len > PAGE_SIZE {
                return Err(bad(
                    i,
                    format!("segment {off}+{len} is empty, out of order or past the page"),
                ));
            }
            if at + 4 + len > body.len() {
                return Err(bad(i, format!("segment {off}+{len} is truncated")));
            }
            end = off + len;
            at += 4 + len;
        }
    }
    if at != body.len() {
        return Err(ProtocolError::malformed(
            kind,
            format!(
                "{} bytes after the last page at gpa {gpa:#x}",
                body.len() - at
            ),
        ));
    }
    Ok(SparseChunk {
        gpa,
        page_count,
        body,
    })
}

fn decode_chunk(p: &[u8]) -> Result<MemoryChunk<'_>, ProtocolError> {
    let kind = MessageType::MemoryChunk;
    let (gpa, page_count) = chunk_header(kind, p)?;
    let map_len = (page_count as usize).div_ceil(8);
    min_len(kind, p, CHUNK_FIXED_LEN + map_len)?;
    let data_map = &p[CHUNK_FIXED_LEN..CHUNK_FIXED_LEN + map_len];
    // Bits past page_count must be clear, so that one chunk has exactly one encoding.
    let spare_bits = map_len * 8 - page_count as usize;
    if spare_bits > 0 && data_map[map_len - 1] >> (8 - spare_bits) != 0 {
        return Err(ProtocolError::malformed(
            kind,
            format!("page map of gpa {gpa:#x} has bits set past page {page_count}"),
        ));
    }
    let data_pages: usize = data_map.iter().map(|b| b.count_ones() as usize).sum();
    let data = &p[CHUNK_FIXED_LEN + map_len..];
    if data.len() != data_pages * PAGE_SIZE {
        return Err(ProtocolError::malformed(
            kind,
            format!(
                "chunk at gpa {gpa:#x} maps {data_pages} data pages but carries {} bytes",
                data.len()
            ),
        ));
    }
    check_chunk_crc(p, gpa)?;
    Ok(MemoryChunk {
        gpa,
        page_count,
        data_map,
        data,
    })
}

/// A page chunk as received whole: `page_count` pages from `gpa`; `body` holds a kind per
/// page (`u16`: [`PAGE_KIND_ZERO`], [`PAGE_KIND_WHOLE`] or a sparse page's segment count,
/// 1 to [`MAX_PAGE_SEGMENTS`]), then the data of the non-zero pages in page order: 4096
/// bytes for a whole page, `segments ×` (`offset: u16`, `len: u16`, bytes) for a sparse
/// one. Checked by the decoder; [`PageChunk::apply`] stores it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageChunk<'a> {
    pub gpa: u64,
    pub page_count: u32,
    pub body: &'a [u8],
}

impl PageChunk<'_> {
    /// Hands the chunk's pages to `sink`, as [`MessageReader::read_message_with`] does with a
    /// chunk it streams.
    pub fn apply<P: PageSink>(&self, sink: &mut P) -> Result<(), P::Error> {
        let mut payload = Vec::with_capacity(CHUNK_FIXED_LEN + self.body.len());
        payload.extend_from_slice(&[0u8; 4]);
        payload.extend_from_slice(&self.gpa.to_le_bytes());
        payload.extend_from_slice(&self.page_count.to_le_bytes());
        payload.extend_from_slice(self.body);
        let crc = crate::crc::crc32c(&payload[4..]);
        payload[..4].copy_from_slice(&crc.to_le_bytes());
        stream_page_chunk(
            &mut &payload[..],
            payload.len(),
            sink,
            &mut Vec::new(),
            &mut Vec::new(),
        )
    }
}

/// Where a page chunk's pages go as they are read (the destination's guest RAM).
pub trait PageSink {
    type Error: From<ProtocolError>;

    /// A chunk of `page_count` pages at `gpa` (aligned, not past the address space)
    /// begins; an error refuses it before any of its pages is read.
    fn begin(&mut self, gpa: u64, page_count: u32) -> Result<(), Self::Error>;

    /// `len` bytes of whole pages at `gpa` (sent whole, or sparse and made whole): calls
    /// `fill` once with the place they go, which `fill` overwrites entirely (or fails,
    /// then the chunk fails).
    fn whole_pages(
        &mut self,
        gpa: u64,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]) -> Result<(), ProtocolError>,
    ) -> Result<(), Self::Error>;

    /// `pages` pages at `gpa` are zero.
    fn zero_pages(&mut self, gpa: u64, pages: u32) -> Result<(), Self::Error>;

    /// Sets `out` to one entry per page of the `pages` at `gpa`: true where
    /// [`PageSink::whole_pages`] will hand the page out as zeros (nothing was written there
    /// yet). A sparse page there takes its stretches without being cleared first: on a
    /// destination's fresh memory that clearing is a second write of every page, after
    /// the kernel's own. The default knows of none.
    fn unwritten(&mut self, gpa: u64, pages: usize, out: &mut Vec<bool>) {
        let _ = gpa;
        out.clear();
        out.resize(pages, false);
    }

    /// Every byte of the chunk arrived and its checksum matched: only now do its pages
    /// count as received. `wire_bytes` includes the frame header.
    fn end(&mut self, chunk: PageChunkDone) -> Result<(), Self::Error>;
}

/// What [`PageSink::end`] learns about a checked chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageChunkDone {
    pub gpa: u64,
    pub page_count: u32,
    pub zero_pages: u32,
    pub data_pages: u32,
    pub wire_bytes: u64,
}

/// Reads exactly `buf.len()` bytes of a payload with `left` bytes to go, adding them to
/// the running checksum. Reading past the payload is a malformed chunk, not a read.
fn take<R: Read + ?Sized>(
    r: &mut R,
    buf: &mut [u8],
    left: &mut usize,
    crc: &mut u32,
    what: &str,
) -> Result<(), ProtocolError> {
    if buf.len() > *left {
        return Err(ProtocolError::malformed(
            MessageType::PageChunk,
            format!(
                "{what} needs {} bytes, the payload has {} left",
                buf.len(),
                *left
            ),
        ));
    }
    // The checksum takes each piece as it arrives, while the copy that brought it is
    // still in the cache.
    let mut got = 0;
    while got < buf.len() {
        let want = buf.len().min(got + CRC_PIECE);
        match r.read(&mut buf[got..want]) {
            Ok(0) => {
                return Err(ProtocolError::Truncated {
                    what: "page chunk",
                    expected: buf.len(),
                    got,
                })
            }
            Ok(n) => {
                *crc = crate::crc::crc32c_append(*crc, &buf[got..got + n]);
                got += n;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(ProtocolError::Io {
                    op: "receiving a message",
                    source,
                })
            }
        }
    }
    *left -= buf.len();
    Ok(())
}

/// Most bytes [`take`] reads before it checksums them: small enough to be still cached.
const CRC_PIECE: usize = 256 << 10;

/// Reads a sparse page's `segments` stretches into `page` (zeroed). `Err(Ok(why))`: the
/// layout is wrong; `Err(Err(e))`: the stream failed.
fn stream_segments<R: Read + ?Sized>(
    r: &mut R,
    segments: u16,
    page: &mut [u8],
    left: &mut usize,
    crc: &mut u32,
) -> Result<(), Result<String, ProtocolError>> {
    let mut end = 0;
    for _ in 0..segments {
        let mut seg = [0u8; 4];
        take(r, &mut seg, left, crc, "a segment header").map_err(Err)?;
        let off = usize::from(u16_at(&seg, 0));
        let len = usize::from(u16_at(&seg, 2));
        if len == 0 || off < end || off + len > PAGE_SIZE {
            return Err(Ok(format!(
                "segment {off}+{len} is empty, out of order or past the page"
            )));
        }
        take(r, &mut page[off..off + len], left, crc, "a segment").map_err(Err)?;
        end = off + len;
    }
    Ok(())
}

/// Streams a `PageChunk` payload of `len` bytes from `r` into `sink`: the page kinds into
/// `kinds`, whole pages straight to where the sink puts them, sparse pages made whole
/// there too, the checksum over every byte as it passes. Never reads past the payload; on
/// any error the sink was not told `end`, so nothing of the chunk counts as received.
fn stream_page_chunk<R: Read + ?Sized, P: PageSink>(
    r: &mut R,
    len: usize,
    sink: &mut P,
    kinds: &mut Vec<u8>,
    ahead: &mut [u8],
) -> Result<(), P::Error> {
    let r = &mut PayloadReader::new(r, len, ahead);
    let kind = MessageType::PageChunk;
    let mut left = len;
    let mut crc = 0u32;
    let mut fixed = [0u8; CHUNK_FIXED_LEN];
    if len < CHUNK_FIXED_LEN {
        return Err(ProtocolError::malformed(
            kind,
            format!("{len} bytes, expected at least {CHUNK_FIXED_LEN}"),
        )
        .into());
    }
    let got = read_full(r, &mut fixed)?;
    if got < CHUNK_FIXED_LEN {
        return Err(ProtocolError::Truncated {
            what: "page chunk",
            expected: CHUNK_FIXED_LEN,
            got,
        }
        .into());
    }
    left -= CHUNK_FIXED_LEN;
    crc = crate::crc::crc32c_append(crc, &fixed[4..]);
    let expected = u32_at(&fixed, 0);
    let (gpa, page_count) = chunk_header(kind, &fixed)?;
    let n = page_count as usize;
    kinds.clear();
    kinds.resize(2 * n, 0);
    take(r, kinds, &mut left, &mut crc, "the page kinds")?;
    let kinds = &kinds[..];
    let page_gpa = |i: usize| gpa + (i * PAGE_SIZE) as u64;
    let kind_of = |kinds: &[u8], i: usize| u16_at(kinds, 2 * i);
    for i in 0..n {
        let k = kind_of(kinds, i);
        if k != PAGE_KIND_ZERO && k != PAGE_KIND_WHOLE && usize::from(k) > MAX_PAGE_SEGMENTS {
            return Err(ProtocolError::malformed(
                kind,
                format!(
                    "page {:#x}: kind {k:#x} (0, {PAGE_KIND_WHOLE:#x} or 1 to \
                     {MAX_PAGE_SEGMENTS} segments)",
                    page_gpa(i)
                ),
            )
            .into());
        }
    }
    sink.begin(gpa, page_count)?;
    let (mut zero_pages, mut data_pages) = (0u32, 0u32);
    let mut unwritten = Vec::new();
    let mut i = 0;
    while i < n {
        let k = kind_of(kinds, i);
        let start = i;
        match k {
            PAGE_KIND_ZERO | PAGE_KIND_WHOLE => {
                while i < n && kind_of(kinds, i) == k {
                    i += 1;
                }
                let pages = i - start;
                if k == PAGE_KIND_ZERO {
                    zero_pages += pages as u32;
                    sink.zero_pages(page_gpa(start), pages as u32)?;
                } else {
                    data_pages += pages as u32;
                    let mut fill =
                        |buf: &mut [u8]| take(r, buf, &mut left, &mut crc, "the whole pages");
                    sink.whole_pages(page_gpa(start), pages * PAGE_SIZE, &mut fill)?;
                }
            }
            _ => {
                while i < n && !matches!(kind_of(kinds, i), PAGE_KIND_ZERO | PAGE_KIND_WHOLE) {
                    i += 1;
                }
                data_pages += (i - start) as u32;
                sink.unwritten(page_gpa(start), i - start, &mut unwritten);
                // Made whole where they go: zeros (unless they are zero already), then
                // the stretches read into place.
                let mut fill = |buf: &mut [u8]| {
                    for (p, page) in buf.chunks_exact_mut(PAGE_SIZE).enumerate() {
                        if unwritten.get(p) != Some(&true) {
                            page.fill(0);
                        }
                        let at = page_gpa(start + p);
                        stream_segments(r, kind_of(kinds, start + p), page, &mut left, &mut crc)
                            .map_err(|why| match why {
                                Ok(why) => {
                                    ProtocolError::malformed(kind, format!("page {at:#x}: {why}"))
                                }
                                Err(e) => e,
                            })?;
                    }
                    Ok(())
                };
                sink.whole_pages(page_gpa(start), (i - start) * PAGE_SIZE, &mut fill)?;
            }
        }
    }
    if left != 0 {
        return Err(ProtocolError::malformed(
            kind,
            format!("{left} bytes after the last page at gpa {gpa:#x}"),
        )
        .into());
    }
    if crc != expected {
        return Err(ProtocolError::ChecksumMismatch {
            gpa,
            expected,
            found: crc,
        }
        .into());
    }
    sink.end(PageChunkDone {
        gpa,
        page_count,
        zero_pages,
        data_pages,
        wire_bytes: (HEADER_LEN + len) as u64,
    })
}

/// Read-ahead for a streamed `PageChunk`'s small pieces.
const READ_AHEAD: usize = 64 << 10;

/// Reads of at least this many bytes skip the read-ahead (whole pages go straight to
/// guest RAM).
const DIRECT_READ: usize = 16 << 10;

/// A `PageChunk` payload of a known length, read from the stream: small pieces (the page
/// kinds, a sparse page's stretches) come out of a read-ahead buffer, big ones (runs of
/// whole pages) are read straight into where they go. It never reads past the payload, so
/// the stream is left at the next message. Without it every stretch of a sparse page cost
/// two `recv` calls, about 2 µs a page on this host, paid inside the downtime for the
/// final pass. An empty buffer reads everything straight (in-memory payloads).
struct PayloadReader<'a, R: ?Sized> {
    inner: &'a mut R,
    buf: &'a mut [u8],
    pos: usize,
    filled: usize,
    /// Payload bytes not yet taken from `inner`.
    unread: usize,
}

impl<'a, R: Read + ?Sized> PayloadReader<'a, R> {
    fn new(inner: &'a mut R, len: usize, buf: &'a mut [u8]) -> Self {
        PayloadReader {
            inner,
            buf,
            pos: 0,
            filled: 0,
            unread: len,
        }
    }
}

impl<R: Read + ?Sized> Read for PayloadReader<'_, R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        if self.pos == self.filled {
            if self.unread == 0 {
                return Ok(0);
            }
            if out.len() >= DIRECT_READ || self.buf.is_empty() {
                let want = out.len().min(self.unread);
                let n = self.inner.read(&mut out[..want])?;
                self.unread -= n;
                return Ok(n);
            }
            let want = self.buf.len().min(self.unread);
            let n = self.inner.read(&mut self.buf[..want])?;
            self.unread -= n;
            self.pos = 0;
            self.filled = n;
            if n == 0 {
                return Ok(0);
            }
        }
        let n = out.len().min(self.filled - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// A sink that only checks: what decoding a buffered `PageChunk` needs.
struct CheckOnly;

impl PageSink for CheckOnly {
    type Error = ProtocolError;
    fn begin(&mut self, _: u64, _: u32) -> Result<(), ProtocolError> {
        Ok(())
    }
    fn whole_pages(
        &mut self,
        _: u64,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]) -> Result<(), ProtocolError>,
    ) -> Result<(), ProtocolError> {
        // At most one chunk's worth: `take` refuses more than the payload holds first.
        let mut buf = vec![0u8; len.min(MAX_CHUNK_PAGES as usize * PAGE_SIZE)];
        fill(&mut buf)
    }
    fn zero_pages(&mut self, _: u64, _: u32) -> Result<(), ProtocolError> {
        Ok(())
    }
    fn end(&mut self, _: PageChunkDone) -> Result<(), ProtocolError> {
        Ok(())
    }
}

fn decode_page_chunk(p: &[u8]) -> Result<PageChunk<'_>, ProtocolError> {
    let kind = MessageType::PageChunk;
    let (gpa, page_count) = chunk_header(kind, p)?;
    // The checksum first: damage anywhere reads as damage, not as a malformed layout.
    check_chunk_crc(p, gpa)?;
    stream_page_chunk(
        &mut &p[..],
        p.len(),
        &mut CheckOnly,
        &mut Vec::new(),
        &mut Vec::new(),
    )?;
    Ok(PageChunk {
        gpa,
        page_count,
        body: &p[CHUNK_FIXED_LEN..],
    })
}

/// Where the pages go in a buffer that holds one `PageChunk` frame of `page_count` pages
/// from its first byte (see [`finish_page_chunk_at`]): after the header, the fixed part
/// and a kind per page.
pub fn page_chunk_pages(page_count: usize) -> std::ops::Range<usize> {
    let data = HEADER_LEN + CHUNK_FIXED_LEN + 2 * page_count;
    data..data + page_count * PAGE_SIZE
}

/// Encodes a `PageChunk` for the `page_count` pages at `gpa` that the caller put in
/// `frame` at [`page_chunk_pages`], in place: page `i` is zero when `known_zero[i]` is
/// true (its bytes are not looked at) or when all its bytes are; a page with few non-zero
/// stretches goes as those; any other page whole. Zero and sparse pages are squeezed out
/// in place, so a chunk of data pages is not moved at all. Returns the frame's length
/// (it starts at `frame[0]`).
pub fn finish_page_chunk_at(
    frame: &mut [u8],
    gpa: u64,
    page_count: usize,
    known_zero: &[bool],
) -> Result<(usize, ChunkCounts), ProtocolError> {
    let kind = MessageType::PageChunk;
    if page_count == 0
        || page_count > MAX_CHUNK_PAGES as usize
        || !gpa.is_multiple_of(PAGE_SIZE as u64)
        || frame.len() < page_chunk_pages(page_count).end
    {
        return Err(ProtocolError::malformed(
            kind,
            format!(
                "{page_count} pages at gpa {gpa:#x} in a {}-byte frame (1 to \
                 {MAX_CHUNK_PAGES} aligned pages, all in the frame)",
                frame.len()
            ),
        ));
    }
    let fixed = HEADER_LEN;
    frame[fixed + 4..fixed + 12].copy_from_slice(&gpa.to_le_bytes());
    frame[fixed + 12..fixed + 16].copy_from_slice(&(page_count as u32).to_le_bytes());
    let kinds = fixed + CHUNK_FIXED_LEN;
    let data = page_chunk_pages(page_count).start;
    let mut counts = ChunkCounts::default();
    let mut runs: Vec<(usize, usize)> = Vec::with_capacity(MAX_PAGE_SEGMENTS + 1);
    let mut copy = [0u8; PAGE_SIZE];
    // Where the next page's bytes go; never past where that page now is.
    let mut w = data;
    for i in 0..page_count {
        let at = data + i * PAGE_SIZE;
        let page = &frame[at..at + PAGE_SIZE];
        if known_zero.get(i) == Some(&true) || is_zero_page(page) {
            runs.clear();
        } else {
            non_zero_runs(page, &mut runs);
        }
        let sparse_len: usize = runs.iter().map(|&(_, len)| 4 + len).sum();
        let k = if runs.is_empty() {
            counts.zero_pages += 1;
            PAGE_KIND_ZERO
        } else if runs.len() > MAX_PAGE_SEGMENTS || sparse_len >= PAGE_SIZE {
            counts.data_pages += 1;
            if w != at {
                frame.copy_within(at..at + PAGE_SIZE, w);
            }
            w += PAGE_SIZE;
            PAGE_KIND_WHOLE
        } else {
            counts.data_pages += 1;
            // Shorter than the page, so it ends before the next page starts; a copy, as
            // its first segment header may land on its own first bytes.
            copy.copy_from_slice(page);
            for &(off, len) in &runs {
                frame[w..w + 2].copy_from_slice(&(off as u16).to_le_bytes());
                frame[w + 2..w + 4].copy_from_slice(&(len as u16).to_le_bytes());
                frame[w + 4..w + 4 + len].copy_from_slice(&copy[off..off + len]);
                w += 4 + len;
            }
            runs.len() as u16
        };
        frame[kinds + 2 * i..kinds + 2 * i + 2].copy_from_slice(&k.to_le_bytes());
    }
    let crc = crate::crc::crc32c(&frame[fixed + 4..w]);
    frame[fixed..fixed + 4].copy_from_slice(&crc.to_le_bytes());
    let header = Header {
        version: PROTOCOL_VERSION,
        kind,
        payload_len: (w - HEADER_LEN) as u32,
    };
    frame[..HEADER_LEN].copy_from_slice(&header.to_bytes());
    Ok((w, counts))
}

/// Starts a `PageChunk` frame for `page_count` pages at `gpa` at the end of `out`; returns
/// where it starts and where in `out` the caller puts the pages; then
/// [`finish_page_chunk`] with that start.
pub fn begin_page_chunk(
    gpa: u64,
    page_count: usize,
    out: &mut Vec<u8>,
) -> Result<(usize, std::ops::Range<usize>), ProtocolError> {
    if page_count == 0
        || page_count > MAX_CHUNK_PAGES as usize
        || !gpa.is_multiple_of(PAGE_SIZE as u64)
    {
        return Err(ProtocolError::malformed(
            MessageType::PageChunk,
            format!("{page_count} pages at gpa {gpa:#x} (1 to {MAX_CHUNK_PAGES}, aligned)"),
        ));
    }
    let start = out.len();
    let place = page_chunk_pages(page_count);
    out.resize(start + place.end, 0);
    out[start + HEADER_LEN + 4..start + HEADER_LEN + 12].copy_from_slice(&gpa.to_le_bytes());
    out[start + HEADER_LEN + 12..start + HEADER_LEN + 16]
        .copy_from_slice(&(page_count as u32).to_le_bytes());
    Ok((start, start + place.start..start + place.end))
}

/// Ends the frame [`begin_page_chunk`] started at `start`, as [`finish_page_chunk_at`].
pub fn finish_page_chunk(
    out: &mut Vec<u8>,
    start: usize,
    known_zero: &[bool],
) -> Result<ChunkCounts, ProtocolError> {
    let fixed = start + HEADER_LEN;
    let begun = out.get(fixed + 4..fixed + CHUNK_FIXED_LEN).and_then(|b| {
        let (gpa, n) = (u64_at(b, 0), u32_at(b, 8) as usize);
        (out.len() == start + page_chunk_pages(n).end).then_some((gpa, n))
    });
    let Some((gpa, n)) = begun else {
        return Err(ProtocolError::malformed(
            MessageType::PageChunk,
            "not a frame begun by begin_page_chunk",
        ));
    };
    let (len, counts) = finish_page_chunk_at(&mut out[start..], gpa, n, known_zero)?;
    out.truncate(start + len);
    Ok(counts)
}

/// [`begin_page_chunk`] and [`finish_page_chunk`] for pages already in a buffer.
pub fn encode_page_chunk(
    gpa: u64,
    pages: &[u8],
    out: &mut Vec<u8>,
) -> Result<ChunkCounts, ProtocolError> {
    if !pages.len().is_multiple_of(PAGE_SIZE) {
        return Err(ProtocolError::malformed(
            MessageType::PageChunk,
            format!("{} bytes is not whole pages", pages.len()),
        ));
    }
    let (start, place) = begin_page_chunk(gpa, pages.len() / PAGE_SIZE, out)?;
    out[place].copy_from_slice(pages);
    finish_page_chunk(out, start, &[])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(msg: &Message<'_>) {
        let mut buf = Vec::new();
        encode(msg, &mut buf).unwrap();
        let mut r = MessageReader::new(&buf[..]);
        assert_eq!(&r.read_message().unwrap(), msg);
        assert!(matches!(r.read_message(), Err(ProtocolError::Closed)));
    }

    fn decode_all(bytes: &[u8]) -> Result<usize, ProtocolError> {
        let mut r = MessageReader::new(bytes);
        let mut n = 0;
        loop {
            match r.read_message() {
                Ok(_) => n += 1,
                Err(ProtocolError::Closed) => return Ok(n),
                Err(e) => return Err(e),
            }
        }
    }

    fn sample_pages() -> Vec<u8> {
        // 10 pages: zero, data, data, zero, zero, data, ..., last byte of page 9 set.
        let mut pages = vec![0u8; 10 * PAGE_SIZE];
        for i in [1usize, 2, 5, 7] {
            pages[i * PAGE_SIZE + i] = i as u8;
        }
        pages[10 * PAGE_SIZE - 1] = 0xaa;
        pages
    }

    #[test]
    fn every_message_roundtrips() {
        let ram = vec![
            RamRange {
                gpa: 0,
                size: 0xa0000,
            },
            RamRange {
                gpa: 0x100000,
                size: 0x1000_0000,
            },
        ];
        let data = vec![7u8; 2 * PAGE_SIZE];
        for msg in [
            Message::Hello(Hello {
                version: 1,
                features: 0xdead,
                build: "ferry 0.1.0",
            }),
            Message::Config(Config {
                ram,
                vm_config: br#"{"cpus":2}"#,
            }),
            Message::ConfigAccepted,
            Message::Refused { reason: "too big" },
            Message::MemoryChunk(MemoryChunk {
                gpa: 0x5000,
                page_count: 3,
                data_map: &[0b101],
                data: &data,
            }),
            Message::IterationDone {
                iteration: 3,
                pages: 77,
                bytes: 1 << 40,
            },
            Message::State {
                vcpus: b"v",
                devices: b"dev",
            },
            Message::Complete(Complete {
                paused_us: 12,
                source_info: b"{}",
            }),
            Message::Resumed { downtime_us: 42 },
            Message::PassReceived { iteration: 7 },
            Message::Measured {
                downtime_us: 1234,
                total_us: u64::MAX - 1,
            },
            Message::Abort { reason: "é" },
            Message::PostcopyDiscard(vec![(0x1000, 3), (0x100000, u32::MAX)]),
            Message::PostcopyDiscard(Vec::new()),
            Message::PostcopyRun { paused_us: 99 },
            Message::PageRequest { gpa: 0x10_0000 },
            Message::PostcopyDone { source_info: b"{}" },
            Message::PostcopyComplete,
            Message::PostcopyResume,
            Message::PostcopyMissing(vec![(0x2000, 1)]),
            Message::PostcopyMissing(Vec::new()),
            Message::Channels {
                count: 3,
                token: u64::MAX - 5,
            },
            Message::ChannelHello { index: 2, token: 9 },
            Message::ChannelsReady,
            Message::MemoryFds(vec![
                MemoryFd {
                    gpa: 0,
                    size: 0xa0000,
                    file_offset: 0,
                },
                MemoryFd {
                    gpa: 0x100000,
                    size: 0x1000_0000,
                    file_offset: 0xa0000,
                },
            ]),
        ] {
            roundtrip(&msg);
        }
    }

    #[test]
    fn chunk_encoding_marks_zero_pages_and_runs_cover_the_range() {
        let pages = sample_pages();
        let mut buf = Vec::new();
        let counts = encode_memory_chunk(0x10_0000, &pages, &mut buf).unwrap();
        assert_eq!(
            counts,
            ChunkCounts {
                zero_pages: 5,
                data_pages: 5
            }
        );
        assert_eq!(buf.len(), HEADER_LEN + CHUNK_FIXED_LEN + 2 + 5 * PAGE_SIZE);
        let mut r = MessageReader::new(&buf[..]);
        let Message::MemoryChunk(c) = r.read_message().unwrap() else {
            panic!("not a chunk")
        };
        let mut rebuilt = vec![0xffu8; pages.len()];
        let mut next = 0x10_0000u64;
        for run in c.runs() {
            match run {
                PageRun::Zero { gpa, pages: n } => {
                    assert_eq!(gpa, next);
                    let off = (gpa - 0x10_0000) as usize;
                    rebuilt[off..off + n as usize * PAGE_SIZE].fill(0);
                    next += u64::from(n) * PAGE_SIZE as u64;
                }
                PageRun::Data { gpa, data } => {
                    assert_eq!(gpa, next);
                    let off = (gpa - 0x10_0000) as usize;
                    rebuilt[off..off + data.len()].copy_from_slice(data);
                    next += data.len() as u64;
                }
            }
        }
        assert_eq!(next, 0x10_0000 + pages.len() as u64);
        assert_eq!(rebuilt, pages);
    }

    #[test]
    fn zero_page_detection() {
        let mut page = vec![0u8; PAGE_SIZE];
        assert!(is_zero_page(&page));
        for pos in [0, 15, 16, 127, 128, 2049, PAGE_SIZE - 1] {
            page[pos] = 1;
            assert!(!is_zero_page(&page), "byte {pos}");
            page[pos] = 0;
        }
        assert!(is_zero_page(&[0u8; 100]));
        assert!(!is_zero_page(&[0, 0, 0, 9]));
    }

    #[test]
    fn header_errors_name_the_value() {
        let mut buf = Vec::new();
        encode(&Message::ConfigAccepted, &mut buf).unwrap();

        let mut bad = buf.clone();
        bad[0] = b'X';
        let e = decode_all(&bad).unwrap_err();
        assert!(
            matches!(e, ProtocolError::BadMagic { found } if found == *b"XRRY"),
            "{e}"
        );

        let mut bad = buf.clone();
        bad[4..6].copy_from_slice(&7u16.to_le_bytes());
        let e = decode_all(&bad).unwrap_err();
        assert!(e.to_string().contains("version 7"), "{e}");
        assert!(e.to_string().contains("1 to 1"), "{e}");

        let mut bad = buf.clone();
        bad[6..8].copy_from_slice(&99u16.to_le_bytes());
        let e = decode_all(&bad).unwrap_err();
        assert!(e.to_string().contains("type 99"), "{e}");

        let mut bad = buf.clone();
        bad[6..8].copy_from_slice(&(MessageType::State as u16).to_le_bytes());
        bad[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        let e = decode_all(&bad).unwrap_err();
        assert!(e.to_string().contains(&format!("{}", u32::MAX)), "{e}");
        assert!(e.to_string().contains(&format!("{MAX_STATE_LEN}")), "{e}");

        let e = decode_all(&buf[..5]).unwrap_err();
        assert!(e.to_string().contains("got 5 of 12"), "{e}");
    }

    #[test]
    fn sparse_chunks_carry_only_non_zero_stretches_and_expand_to_the_same_pages() {
        let mut pages = vec![0u8; 5 * PAGE_SIZE];
        pages[0] = 1; // a counter in the first byte (QEMU's dirty workload)
        pages[PAGE_SIZE + 100] = 7; // two stretches far apart
        pages[PAGE_SIZE + 3000] = 9;
        // page 2 stays zero; page 3 is full of data; page 4 has a stretch at its very end
        for (i, b) in pages[3 * PAGE_SIZE..4 * PAGE_SIZE].iter_mut().enumerate() {
            *b = (i % 251) as u8 | 1;
        }
        pages[5 * PAGE_SIZE - 1] = 0xff;
        let mut buf = Vec::new();
        let counts = encode_sparse_chunk(0x10000, &pages, &mut buf).unwrap();
        assert_eq!((counts.zero_pages, counts.data_pages), (1, 4));
        // Far smaller than the plain chunk (which carries 4 whole data pages).
        let mut plain = Vec::new();
        encode_memory_chunk(0x10000, &pages, &mut plain).unwrap();
        assert!(
            buf.len() < plain.len() / 3 * 2,
            "{} vs {}",
            buf.len(),
            plain.len()
        );
        let mut r = MessageReader::new(&buf[..]);
        let Message::SparseChunk(c) = r.read_message().unwrap() else {
            panic!("not a sparse chunk")
        };
        let (mut data, mut map) = (Vec::new(), Vec::new());
        assert_eq!(c.expand(&mut data, &mut map), 4);
        assert_eq!(map, vec![0b11011]);
        let data_pages: Vec<&[u8]> = pages
            .chunks_exact(PAGE_SIZE)
            .filter(|p| p.iter().any(|&b| b != 0))
            .collect();
        assert_eq!(data, data_pages.concat());
        // A dirty-workload page costs a handful of bytes, not 4 KiB.
        let mut one = vec![0u8; 1024 * PAGE_SIZE];
        for p in one.chunks_exact_mut(PAGE_SIZE) {
            p[0] = 3;
        }
        buf.clear();
        encode_sparse_chunk(0, &one, &mut buf).unwrap();
        assert!(buf.len() < 1024 * 16, "{}", buf.len());
        roundtrip(&Message::SparseChunk(SparseChunk {
            gpa: 0,
            page_count: 1024,
            body: &buf[HEADER_LEN + CHUNK_FIXED_LEN..],
        }));
    }

    #[test]
    fn pages_known_to_be_zero_are_sent_as_zero_whatever_the_buffer_holds() {
        // The reader left pages 1 and 3 unread (stale bytes from an earlier chunk).
        let mut pages = vec![0xabu8; 4 * PAGE_SIZE];
        let known_zero = [false, true, false, true];
        let mut with_zeros = pages.clone();
        with_zeros[PAGE_SIZE..2 * PAGE_SIZE].fill(0);
        with_zeros[3 * PAGE_SIZE..].fill(0);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let counts = encode_sparse_chunk_known(0x2000, &pages, &known_zero, &mut a).unwrap();
        encode_sparse_chunk(0x2000, &with_zeros, &mut b).unwrap();
        assert_eq!((counts.zero_pages, counts.data_pages), (2, 2));
        assert_eq!(a, b);
        // Knowing nothing is the plain encoder.
        pages[0] = 0;
        a.clear();
        b.clear();
        encode_sparse_chunk_known(0x2000, &pages, &[], &mut a).unwrap();
        encode_sparse_chunk(0x2000, &pages, &mut b).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn malformed_sparse_chunks_are_refused_naming_the_page() {
        let frame = |gpa: u64, page_count: u32, body: &[u8]| {
            let mut payload = vec![0u8; 4];
            payload.extend_from_slice(&gpa.to_le_bytes());
            payload.extend_from_slice(&page_count.to_le_bytes());
            payload.extend_from_slice(body);
            let crc = crate::crc::crc32c(&payload[4..]);
            payload[..4].copy_from_slice(&crc.to_le_bytes());
            let mut b = Header {
                version: PROTOCOL_VERSION,
                kind: MessageType::SparseChunk,
                payload_len: payload.len() as u32,
            }
            .to_bytes()
            .to_vec();
            b.extend_from_slice(&payload);
            b
        };
        let seg = |off: u16, len: u16| [off.to_le_bytes(), len.to_le_bytes()].concat();
        for (body, pages, needle) in [
            (vec![0u8], 1, "truncated segment count"),
            (
                [1u16.to_le_bytes().to_vec(), seg(4090, 8), vec![1; 8]].concat(),
                1,
                "past the page",
            ),
            (
                [1u16.to_le_bytes().to_vec(), seg(0, 0)].concat(),
                1,
                "is empty",
            ),
            (
                [
                    2u16.to_le_bytes().to_vec(),
                    seg(8, 8),
                    vec![1; 8],
                    seg(0, 8),
                    vec![1; 8],
                ]
                .concat(),
                1,
                "out of order",
            ),
            (
                [1u16.to_le_bytes().to_vec(), seg(0, 8), vec![1; 3]].concat(),
                1,
                "truncated",
            ),
            (
                [0u16.to_le_bytes().to_vec(), vec![5]].concat(),
                1,
                "1 bytes after the last page",
            ),
            (65u16.to_le_bytes().to_vec(), 1, "65 segments"),
            (vec![0, 0, 0], 2, "page 0x3000: truncated segment count"),
        ] {
            let e = decode_all(&frame(0x2000, pages, &body)).unwrap_err();
            assert!(
                matches!(e, ProtocolError::Malformed { .. }) && e.to_string().contains(needle),
                "{needle}: {e}"
            );
        }
        let mut good = frame(
            0x2000,
            1,
            &[1u16.to_le_bytes().to_vec(), seg(16, 8), vec![4; 8]].concat(),
        );
        assert_eq!(decode_all(&good).unwrap(), 1);
        let last = good.len() - 1;
        good[last] ^= 1;
        assert!(matches!(
            decode_all(&good),
            Err(ProtocolError::ChecksumMismatch { gpa: 0x2000, .. })
        ));
    }

    #[test]
    fn corrupted_chunk_is_a_checksum_mismatch_naming_the_gpa() {
        let mut buf = Vec::new();
        encode_memory_chunk(0x7000, &sample_pages(), &mut buf).unwrap();
        let last = buf.len() - 1;
        buf[last] ^= 0x40;
        let e = decode_all(&buf).unwrap_err();
        assert!(
            matches!(e, ProtocolError::ChecksumMismatch { gpa: 0x7000, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("0x7000"), "{e}");
    }

    #[test]
    fn truncated_payload() {
        let mut buf = Vec::new();
        encode_memory_chunk(0, &sample_pages(), &mut buf).unwrap();
        let cut = buf.len() - 100;
        let e = decode_all(&buf[..cut]).unwrap_err();
        assert!(
            matches!(e, ProtocolError::Truncated { what: "message payload", got, expected }
                if got == cut - HEADER_LEN && expected == buf.len() - HEADER_LEN),
            "{e}"
        );
    }

    #[test]
    fn malformed_payloads() {
        let frame = |kind: MessageType, payload: &[u8]| {
            let mut b = Header {
                version: PROTOCOL_VERSION,
                kind,
                payload_len: payload.len() as u32,
            }
            .to_bytes()
            .to_vec();
            b.extend_from_slice(payload);
            b
        };
        for (kind, payload, needle) in [
            (MessageType::Hello, vec![1u8], "expected at least 10"),
            (MessageType::Refused, vec![0xff, 0xfe], "UTF-8"),
            (MessageType::IterationDone, vec![0; 19], "expected 20"),
            (MessageType::PassReceived, vec![0; 3], "expected 4"),
            (MessageType::Measured, vec![0; 15], "expected 16"),
            (
                MessageType::State,
                vec![9, 0, 0, 0, 1],
                "vCPU state of 9 bytes",
            ),
            (
                MessageType::Config,
                [
                    1u32.to_le_bytes().to_vec(),
                    vec![0; 8],
                    5u64.to_le_bytes().to_vec(),
                ]
                .concat(),
                "not page-aligned",
            ),
            (
                MessageType::MemoryChunk,
                [
                    vec![0; 4],
                    0u64.to_le_bytes().to_vec(),
                    0u32.to_le_bytes().to_vec(),
                ]
                .concat(),
                "page count 0",
            ),
            (
                MessageType::MemoryChunk,
                [
                    vec![0; 4],
                    0u64.to_le_bytes().to_vec(),
                    2u32.to_le_bytes().to_vec(),
                    vec![4],
                ]
                .concat(),
                "bits set past page 2",
            ),
            (
                MessageType::MemoryChunk,
                [
                    vec![0; 4],
                    0u64.to_le_bytes().to_vec(),
                    2u32.to_le_bytes().to_vec(),
                    vec![1],
                ]
                .concat(),
                "maps 1 data pages but carries 0 bytes",
            ),
            (
                MessageType::Channels,
                [0u16.to_le_bytes().to_vec(), vec![0; 8]].concat(),
                "0 extra connections",
            ),
            (
                MessageType::ChannelHello,
                [16u16.to_le_bytes().to_vec(), vec![0; 8]].concat(),
                "connection index 16",
            ),
            (
                MessageType::MemoryFds,
                [
                    1u32.to_le_bytes().to_vec(),
                    0u64.to_le_bytes().to_vec(),
                    0x1000u64.to_le_bytes().to_vec(),
                    0x10u64.to_le_bytes().to_vec(),
                ]
                .concat(),
                "file offset 0x10",
            ),
            (
                MessageType::MemoryFds,
                0u32.to_le_bytes().to_vec(),
                "0 memory files",
            ),
        ] {
            let e = decode_all(&frame(kind, &payload)).unwrap_err();
            assert!(
                matches!(e, ProtocolError::Malformed { .. }) && e.to_string().contains(needle),
                "{kind}: {e}"
            );
        }
    }

    #[test]
    fn encoder_refuses_what_the_decoder_would() {
        let mut buf = Vec::new();
        assert!(encode_memory_chunk(1, &[1u8; PAGE_SIZE], &mut buf).is_err());
        assert!(encode_memory_chunk(0, &[1u8; 100], &mut buf).is_err());
        let big = vec![1u8; (MAX_CHUNK_PAGES as usize + 1) * PAGE_SIZE];
        assert!(encode_memory_chunk(0, &big, &mut buf).is_err());
        assert!(buf.is_empty());
        let long = "x".repeat(MAX_TEXT_LEN * 2);
        encode(&Message::Abort { reason: &long }, &mut buf).unwrap();
        assert_eq!(buf.len(), HEADER_LEN + MAX_TEXT_LEN);
    }

    /// A page sink over a RAM of `pages` pages from gpa 0 that records what it was told;
    /// refuses pages outside it as the destination does.
    struct RamSink {
        ram: Vec<u8>,
        ended: Vec<PageChunkDone>,
    }

    impl RamSink {
        fn new(pages: usize) -> Self {
            RamSink {
                ram: vec![0xeeu8; pages * PAGE_SIZE],
                ended: Vec::new(),
            }
        }

        fn place(&mut self, gpa: u64, len: usize) -> Result<&mut [u8], ProtocolError> {
            let at = usize::try_from(gpa).unwrap_or(usize::MAX);
            match at.checked_add(len) {
                Some(end) if end <= self.ram.len() => Ok(&mut self.ram[at..end]),
                _ => Err(ProtocolError::malformed(
                    MessageType::PageChunk,
                    "outside RAM",
                )),
            }
        }
    }

    impl PageSink for RamSink {
        type Error = ProtocolError;
        fn begin(&mut self, gpa: u64, page_count: u32) -> Result<(), ProtocolError> {
            self.place(gpa, page_count as usize * PAGE_SIZE).map(|_| ())
        }
        fn whole_pages(
            &mut self,
            gpa: u64,
            len: usize,
            fill: &mut dyn FnMut(&mut [u8]) -> Result<(), ProtocolError>,
        ) -> Result<(), ProtocolError> {
            fill(self.place(gpa, len)?)
        }
        fn zero_pages(&mut self, gpa: u64, pages: u32) -> Result<(), ProtocolError> {
            self.place(gpa, pages as usize * PAGE_SIZE)?.fill(0);
            Ok(())
        }
        fn end(&mut self, done: PageChunkDone) -> Result<(), ProtocolError> {
            self.ended.push(done);
            Ok(())
        }
    }

    /// Pages of every kind: zero, full, a counter, two stretches, many stretches, data
    /// only at the end.
    fn mixed_pages() -> Vec<u8> {
        let mut pages = vec![0u8; 8 * PAGE_SIZE];
        for (j, b) in pages[PAGE_SIZE..2 * PAGE_SIZE].iter_mut().enumerate() {
            *b = (j % 251) as u8 | 1;
        }
        pages[2 * PAGE_SIZE] = 1;
        pages[3 * PAGE_SIZE + 100] = 7;
        pages[3 * PAGE_SIZE + 3000] = 9;
        for k in 0..100 {
            pages[4 * PAGE_SIZE + k * 40] = 3; // more stretches than a page may have
        }
        pages[7 * PAGE_SIZE - 1] = 0xff;
        // page 5 and 7 zero; page 6 ends with one byte
        pages
    }

    #[test]
    fn page_chunks_stream_into_place_and_roundtrip() {
        let pages = mixed_pages();
        let mut buf = Vec::new();
        let counts = encode_page_chunk(0x3000, &pages, &mut buf).unwrap();
        assert_eq!((counts.zero_pages, counts.data_pages), (3, 5));
        // Sparse pages cost their stretches: far less than 5 whole pages.
        assert!(buf.len() < 3 * PAGE_SIZE, "{}", buf.len());
        let mut sink = RamSink::new(16);
        let mut r = MessageReader::new(&buf[..]);
        assert!(r.read_message_with(&mut sink).unwrap().is_none());
        assert_eq!(&sink.ram[0x3000..0x3000 + pages.len()], &pages[..]);
        assert_eq!(
            sink.ended,
            vec![PageChunkDone {
                gpa: 0x3000,
                page_count: 8,
                zero_pages: 3,
                data_pages: 5,
                wire_bytes: buf.len() as u64,
            }]
        );
        // Other messages pass through read_message_with unchanged.
        let mut two = frame_of(&Message::ConfigAccepted);
        two.extend_from_slice(&buf);
        let mut r = MessageReader::new(&two[..]);
        assert_eq!(
            r.read_message_with(&mut RamSink::new(16)).unwrap(),
            Some(Message::ConfigAccepted)
        );
        // Buffered, the same chunk decodes, re-encodes to the same bytes, and applies
        // to the same pages.
        let mut r = MessageReader::new(&buf[..]);
        let msg = r.read_message().unwrap();
        let Message::PageChunk(c) = msg else {
            panic!("not a page chunk: {msg:?}")
        };
        assert_eq!((c.gpa, c.page_count), (0x3000, 8));
        roundtrip(&Message::PageChunk(c));
        let mut sink = RamSink::new(16);
        c.apply(&mut sink).unwrap();
        assert_eq!(&sink.ram[0x3000..0x3000 + pages.len()], &pages[..]);
    }

    /// A stream handing out at most `step` bytes a read, counting the reads (a socket
    /// that delivers a frame in pieces).
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
        reads: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            self.reads += 1;
            let n = out.len().min(self.step).min(self.data.len());
            out[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    #[test]
    fn a_streamed_page_chunk_reads_ahead_within_its_payload_only() {
        // Many sparse pages (a byte each) and whole ones, then the next message.
        let mut pages = vec![0u8; 64 * PAGE_SIZE];
        for p in 0..48 {
            pages[p * PAGE_SIZE + 8 * p] = p as u8 + 1;
        }
        for b in &mut pages[48 * PAGE_SIZE..] {
            *b = 0x5a;
        }
        let mut two = Vec::new();
        encode_page_chunk(0, &pages, &mut two).unwrap();
        let chunk_len = two.len();
        two.extend_from_slice(&frame_of(&Message::ConfigAccepted));
        for step in [1, 7, 4096, usize::MAX] {
            let mut r = MessageReader::new(Trickle {
                data: &two,
                step,
                reads: 0,
            });
            let mut sink = RamSink::new(64);
            assert!(
                r.read_message_with(&mut sink).unwrap().is_none(),
                "step {step}"
            );
            assert_eq!(sink.ram, pages, "step {step}");
            // The chunk's bytes were all taken, and not one byte of the next message.
            assert_eq!(r.get_ref().data.len(), two.len() - chunk_len, "step {step}");
            if step == usize::MAX {
                // Header, then the payload in a few reads: not two reads per sparse page.
                assert!(r.get_ref().reads < 10, "{} reads", r.get_ref().reads);
            }
            assert_eq!(
                r.read_message().unwrap(),
                Message::ConfigAccepted,
                "step {step}"
            );
        }
    }

    fn frame_of(msg: &Message<'_>) -> Vec<u8> {
        let mut v = Vec::new();
        encode(msg, &mut v).unwrap();
        v
    }

    #[test]
    fn page_chunk_encoding_in_place_skips_pages_known_zero() {
        // The reader left pages 1 and 3 unread: whatever they hold, they go as zero.
        let mut out = vec![9u8; 5]; // frames already queued stay as they are
        let (start, place) = begin_page_chunk(0x1000, 4, &mut out).unwrap();
        assert_eq!(start, 5);
        assert_eq!(place.len(), 4 * PAGE_SIZE);
        out[place.clone()].fill(0xab);
        let counts = finish_page_chunk(&mut out, start, &[false, true, false, true]).unwrap();
        assert_eq!((counts.zero_pages, counts.data_pages), (2, 2));
        assert_eq!(&out[..5], &[9u8; 5]);
        let mut sink = RamSink::new(8);
        MessageReader::new(&out[5..])
            .read_message_with(&mut sink)
            .unwrap();
        let mut expected = vec![0xabu8; 4 * PAGE_SIZE];
        expected[PAGE_SIZE..2 * PAGE_SIZE].fill(0);
        expected[3 * PAGE_SIZE..].fill(0);
        assert_eq!(&sink.ram[0x1000..0x5000], &expected[..]);
        // Whole data pages cost their 4 KiB and a 2-byte kind, nothing more.
        assert_eq!(
            out.len() - 5,
            HEADER_LEN + CHUNK_FIXED_LEN + 4 * 2 + 2 * PAGE_SIZE
        );
        // Refused: no pages, too many, unaligned; and a frame not begun here.
        let mut v = Vec::new();
        assert!(begin_page_chunk(0, 0, &mut v).is_err());
        assert!(begin_page_chunk(0, MAX_CHUNK_PAGES as usize + 1, &mut v).is_err());
        assert!(begin_page_chunk(1, 1, &mut v).is_err());
        assert!(v.is_empty());
        assert!(finish_page_chunk(&mut vec![0u8; 100], 0, &[]).is_err());
        assert!(encode_page_chunk(0, &[1u8; 100], &mut v).is_err());
    }

    #[test]
    fn hostile_page_chunks_are_refused_naming_what_is_wrong() {
        // A payload: crc, gpa, count, then `rest`; the crc made right unless `bad_crc`.
        let frame = |gpa: u64, count: u32, rest: &[u8], bad_crc: bool| {
            let mut p = vec![0u8; 4];
            p.extend_from_slice(&gpa.to_le_bytes());
            p.extend_from_slice(&count.to_le_bytes());
            p.extend_from_slice(rest);
            let crc = crate::crc::crc32c(&p[4..]) ^ u32::from(bad_crc);
            p[..4].copy_from_slice(&crc.to_le_bytes());
            let mut f = Header {
                version: PROTOCOL_VERSION,
                kind: MessageType::PageChunk,
                payload_len: p.len() as u32,
            }
            .to_bytes()
            .to_vec();
            f.extend(p);
            f
        };
        let kinds = |k: &[u16]| k.iter().flat_map(|k| k.to_le_bytes()).collect::<Vec<u8>>();
        let seg = |off: u16, len: u16| {
            let mut v = off.to_le_bytes().to_vec();
            v.extend_from_slice(&len.to_le_bytes());
            v.extend(std::iter::repeat_n(1u8, len as usize));
            v
        };
        let cat = |parts: &[Vec<u8>]| parts.concat();
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("no pages", frame(0, 0, &[], false), "page count 0"),
            (
                "too many pages",
                frame(0, 1025, &[], false),
                "page count 1025",
            ),
            (
                "unaligned",
                frame(5, 1, &kinds(&[0]), false),
                "not page-aligned",
            ),
            (
                "past the address space",
                frame(!4095u64, 2, &kinds(&[0, 0]), false),
                "overflow",
            ),
            (
                "kinds cut short",
                frame(0, 4, &kinds(&[0]), false),
                "the page kinds needs 8 bytes",
            ),
            ("bad kind", frame(0, 1, &kinds(&[65]), false), "kind 0x41"),
            (
                "whole page missing",
                frame(0, 1, &kinds(&[0xffff]), false),
                "needs 4096 bytes",
            ),
            (
                "segment past the page",
                frame(0, 1, &cat(&[kinds(&[1]), seg(4000, 100)]), false),
                "past the page",
            ),
            (
                "empty segment",
                frame(0, 1, &cat(&[kinds(&[1]), seg(0, 0)]), false),
                "empty",
            ),
            (
                "segments out of order",
                frame(0, 1, &cat(&[kinds(&[2]), seg(100, 8), seg(50, 8)]), false),
                "out of order",
            ),
            (
                "segment cut short",
                frame(0, 1, &cat(&[kinds(&[1]), seg(0, 8)[..8].to_vec()]), false),
                "a segment needs 8 bytes",
            ),
            (
                "bytes after the pages",
                frame(0, 1, &cat(&[kinds(&[0]), vec![0u8; 3]]), false),
                "3 bytes after",
            ),
            (
                "bad checksum",
                frame(0, 1, &cat(&[kinds(&[1]), seg(8, 8)]), true),
                "checksum mismatch",
            ),
            (
                "outside the sink",
                frame(64 * PAGE_SIZE as u64, 1, &kinds(&[0]), false),
                "outside RAM",
            ),
        ];
        for (name, bytes, needle) in cases {
            let mut sink = RamSink::new(4);
            let e = MessageReader::new(&bytes[..])
                .read_message_with(&mut sink)
                .expect_err(name);
            assert!(e.to_string().contains(needle), "{name}: {e}");
            assert!(sink.ended.is_empty(), "{name}: counted as received");
            // Buffered, the same bytes are refused as well (except where only the sink
            // knows: the RAM size).
            if name != "outside the sink" {
                assert!(
                    MessageReader::new(&bytes[..]).read_message().is_err(),
                    "{name}"
                );
            }
        }
        // A stream cut in the middle of the pages is truncated, not a hang or a panic.
        let mut good = Vec::new();
        encode_page_chunk(0, &mixed_pages(), &mut good).unwrap();
        for cut in [13, 30, 40, HEADER_LEN + 20 + PAGE_SIZE, good.len() - 1] {
            let e = MessageReader::new(&good[..cut])
                .read_message_with(&mut RamSink::new(16))
                .expect_err("cut");
            assert!(
                matches!(e, ProtocolError::Truncated { .. }),
                "cut at {cut}: {e}"
            );
        }
    }

    /// A tiny deterministic generator, so the test needs no extra crate.
    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Thousands of random and mutated streams: the decoder returns, never panics, and a
    /// damaged memory chunk is never accepted with different contents.
    #[test]
    fn random_and_mutated_streams_never_panic() {
        let mut valid = Vec::new();
        encode(
            &Message::Hello(Hello {
                version: 1,
                features: 0,
                build: "t",
            }),
            &mut valid,
        )
        .unwrap();
        encode(
            &Message::Config(Config {
                ram: vec![RamRange {
                    gpa: 0,
                    size: 1 << 20,
                }],
                vm_config: b"{}",
            }),
            &mut valid,
        )
        .unwrap();
        encode_memory_chunk(0x2000, &sample_pages(), &mut valid).unwrap();
        encode_page_chunk(0x4000, &mixed_pages(), &mut valid).unwrap();
        encode(
            &Message::State {
                vcpus: b"abc",
                devices: b"d",
            },
            &mut valid,
        )
        .unwrap();
        encode(
            &Message::Complete(Complete {
                paused_us: 1,
                source_info: b"",
            }),
            &mut valid,
        )
        .unwrap();
        assert_eq!(decode_all(&valid).unwrap(), 6);

        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        for round in 0..4000 {
            let input = if round % 4 == 0 {
                let len = rng.below(300);
                let mut v: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                if len >= HEADER_LEN && rng.below(2) == 0 {
                    // A valid header prefix, so the payload decoders are reached too.
                    v[..4].copy_from_slice(&MAGIC);
                    v[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
                    v[6..8].copy_from_slice(&(1 + rng.below(18) as u16).to_le_bytes());
                    v[8..12].copy_from_slice(&((len - HEADER_LEN) as u32).to_le_bytes());
                }
                v
            } else {
                let mut v = valid.clone();
                for _ in 0..1 + rng.below(4) {
                    match rng.below(3) {
                        0 => {
                            let i = rng.below(v.len());
                            v[i] ^= 1 << rng.below(8);
                        }
                        1 => v.truncate(rng.below(v.len() + 1)),
                        _ => {
                            let i = rng.below(v.len() + 1);
                            v.insert(i, rng.next() as u8);
                        }
                    }
                }
                v
            };
            // Streamed into a RAM sink: returns, never panics, never writes outside it.
            let mut sink = RamSink::new(64);
            let mut r = MessageReader::new(&input[..]);
            for _ in 0..16 {
                if r.read_message_with(&mut sink).is_err() {
                    break;
                }
            }
            assert_eq!(sink.ram.len(), 64 * PAGE_SIZE);
            let mut r = MessageReader::new(&input[..]);
            for _ in 0..16 {
                match r.read_message() {
                    Ok(Message::MemoryChunk(c)) => {
                        // Accepted chunks decode to exactly what was sent or to a frame
                        // whose checksum matches its own bytes: never silently altered data
                        // at the original address (a 1-bit flip always changes crc32c).
                        let _ = c.runs().count();
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        }
    }
}
