//! The sending side: handshake, precopy passes, stop-and-copy, confirmation.

use std::io::{self, Write};
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{
    HookResult, SourceVm, TimeoutStrategy, DEFAULT_CHUNK_PAGES, DEFAULT_CONFIRM_TIMEOUT,
    DEFAULT_IO_TIMEOUT,
};
use crate::page_set::PageSet;
use crate::priority::ThreadNice;
use crate::protocol::{
    check_ram_layout, encode, encode_memory_chunk, encode_sparse_chunk_known, features,
    finish_page_chunk_at, page_chunk_pages, write_message, ChunkCounts, Complete, Config, Header,
    Hello, MemoryFd, Message, MessageReader, MessageType, ProtocolError, RamRange, HEADER_LEN,
    MAX_CHANNELS, MAX_CHUNK_PAGES, MIN_PROTOCOL_VERSION, PAGE_SIZE, PROTOCOL_VERSION,
};
use crate::stats::{IterationStats, MigrationInfo, MigrationProgress, MigrationStatus};
use crate::transport::{is_cancelled, MigrationStream, Watched};

/// Encoded frames are written once this many bytes are queued: few, large writes.
const FLUSH_BYTES: usize = 1 << 20;
/// ... or once they waited this long: zero pages encode to a bit each, and a long run of
/// them must not leave the destination without a byte until its idle limit.
const FLUSH_INTERVAL: Duration = Duration::from_millis(200);
/// During a precopy pass the dirty log is read this often, so that pages the guest wrote
/// again before their turn wait for the next pass instead of travelling twice.
const RECOLLECT_INTERVAL: Duration = Duration::from_millis(50);
/// A pass of fewer pages (1 MiB of RAM) gives no reliable rate.
const MIN_PAGES_FOR_RATE: u64 = 256;
/// Wire bytes a dirty page is assumed to cost (as data, the worst case), when the
/// destination does not acknowledge passes.
const BYTES_PER_DIRTY_PAGE: f64 = PAGE_SIZE as f64 + 1.0;

/// A pass of fewer pages goes on the main connection alone, the extra ones carrying just
/// their end of pass, written from the same thread: starting a sending thread (and its
/// filter) costs about as much as sending this many pages, and in the final pass that
/// time is the guest's downtime (an idle guest's final pass is empty).
const LANE_THREAD_MIN_PAGES: u64 = 256;

/// How long the source busy-waits for `Resumed` after `Complete` before it sleeps in the
/// read. The guest runs nowhere until it arrives, and on a local link it comes within
/// 0.1-0.5 ms; a thread asleep in the read took tens of µs more to wake on these hosts,
/// of an idle guest's ~0.6 ms downtime. Over a longer link the wait simply goes on asleep.
const SPIN_FOR_RESUMED: Duration = Duration::from_micros(400);

/// How long the source stays awake for a pass's ack where its state goes at the pause
/// (`STATE_AT_PAUSE`; the destination then spins for what comes next, see its
/// `SPIN_AFTER_ACK`). Woken by the ack, this thread was put on the destination's CPU
/// (a socket's wake-up expects the waker to sleep next), which then waited behind it
/// into the pause, while the other CPU stayed idle. Bounded; yields between looks.
const SPIN_FOR_ACK: Duration = Duration::from_millis(1);

/// How a migration is sent.
#[derive(Clone, Debug)]
pub struct SendOptions {
    /// Longest pause of the guest aimed for (`downtime_ms`).
    pub downtime: Duration,
    /// Longest precopy before `timeout_strategy` applies (`timeout_s`).
    pub timeout: Duration,
    pub timeout_strategy: TimeoutStrategy,
    /// A read or write that makes no progress this long means the peer or link is gone.
    pub io_timeout: Duration,
    /// How long to wait for `ConfigAccepted` and for `Resumed`.
    pub confirm_timeout: Duration,
    /// Pages per memory chunk, 1 to [`MAX_CHUNK_PAGES`].
    pub chunk_pages: u32,
    /// Hand guest RAM over as files instead of copying it (`MemFDs`, one host only).
    pub local_memory: bool,
    /// Throttle the vCPUs, more each pass, while the dirty set stops shrinking before it
    /// fits the downtime (or, after the first pass, grew faster than it was sent); each
    /// step aimed from the measured rates (`aimed_throttle`).
    pub auto_converge: bool,
    /// When to pause the guest for the last pass.
    pub switch_over: SwitchOver,
    /// Switch to postcopy after this many precopy passes (0: before the first) when the
    /// migration has not converged by then (`None`: only when asked, see
    /// [`MigrationProgress::request_postcopy`]). Needs a destination that can.
    pub postcopy_after_passes: Option<u32>,
}

impl SendOptions {
    /// The API's parameters, with the default I/O limits.
    pub fn new(downtime_ms: u64, timeout_s: u64, timeout_strategy: TimeoutStrategy) -> Self {
        SendOptions {
            downtime: Duration::from_millis(downtime_ms),
            timeout: Duration::from_secs(timeout_s),
            timeout_strategy,
            io_timeout: DEFAULT_IO_TIMEOUT,
            confirm_timeout: DEFAULT_CONFIRM_TIMEOUT,
            chunk_pages: DEFAULT_CHUNK_PAGES,
            local_memory: false,
            auto_converge: true,
            switch_over: SwitchOver::default(),
            postcopy_after_passes: None,
        }
    }
}

/// Why a migration failed on the source. The source VM runs again in every case except
/// [`SendError::ResumeFailed`].
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("the destination refused the VM: {0}")]
    Refused(String),
    #[error("the destination aborted the migration: {0}")]
    PeerAborted(String),
    #[error("the destination speaks protocol version {peer}; this side needs {min} to {max}")]
    PeerVersion { peer: u16, min: u16, max: u16 },
    #[error("unexpected {found} message from the destination while {during}")]
    Unexpected {
        found: MessageType,
        during: &'static str,
    },
    #[error("migration cancelled; the VM keeps running on the source")]
    Cancelled,
    #[error(
        "migration timed out: after {timeout_s} s, {remaining_pages} dirty pages still could not \
         be sent within the {downtime_ms} ms downtime; the VM keeps running on the source"
    )]
    TimedOut {
        timeout_s: u64,
        downtime_ms: u64,
        remaining_pages: u64,
    },
    #[error("source VM: {op} failed: {reason}")]
    Vm { op: &'static str, reason: String },
    #[error("cannot use the migration stream: {0}")]
    Stream(io::Error),
    #[error(
        "the destination cannot take guest RAM as files (memory_mode MemFDs): it needs a \
         unix: socket and a ferry that supports it"
    )]
    NoLocalMemory,
    #[error("{0} connections asked for; at most {MAX_CHANNELS}")]
    TooManyConnections(usize),
    #[error(
        "postcopy lost the destination ({0}): the VM is paused there and this side keeps \
         the pages it still misses; neither copy may run on its own"
    )]
    PostcopyLinkLost(String),
    #[error("postcopy was asked for, but the destination cannot take it ({0})")]
    NoPostcopy(&'static str),
    #[error("{cause}; resuming the source VM then failed too: {reason}")]
    ResumeFailed {
        cause: Box<SendError>,
        reason: String,
    },
}

fn vm_err(op: &'static str) -> impl FnOnce(String) -> SendError {
    move |reason| SendError::Vm { op, reason }
}

pub(super) fn hook<T>(op: &'static str, r: HookResult<T>) -> Result<T, SendError> {
    r.map_err(vm_err(op))
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// The guest runs; timeout and cancellation apply.
    Precopy,
    /// The guest is paused: send everything, as fast as possible.
    Downtime,
}

#[derive(Default)]
pub(super) struct PassResult {
    pages: u64,
    bytes: u64,
    /// Pages left for the next pass because the guest wrote them again first.
    skipped: u64,
    /// Pages sent as zero without being read: never touched.
    untouched: u64,
    /// The timeout passed mid-pass under [`TimeoutStrategy::Ignore`].
    timed_out: bool,
}

/// One connection's outgoing frames.
#[derive(Default)]
pub(super) struct LaneBuf {
    /// Frames queued for the next write.
    pub(super) out: Vec<u8>,
    /// Pages read from the guest, before encoding.
    pub(super) scratch: Vec<u8>,
    /// Which pages of `scratch` the VM knows to be zero (and left unread).
    pub(super) known_zero: Vec<bool>,
    /// A page chunk, built in place around the pages read into it, then written from
    /// here. It keeps its largest size, so it is zeroed once, not for every chunk.
    frame: Vec<u8>,
    /// A write failed part-way: the stream is no longer at a frame boundary.
    broken: bool,
}

impl LaneBuf {
    pub(super) fn new() -> Self {
        LaneBuf {
            out: Vec::with_capacity(FLUSH_BYTES + MAX_CHUNK_PAGES as usize * PAGE_SIZE),
            ..LaneBuf::default()
        }
    }

    /// Writes the queued frames to `io`.
    pub(super) fn flush<S: MigrationStream>(
        &mut self,
        io: &mut Watched<S>,
    ) -> Result<(), SendError> {
        if self.out.is_empty() {
            return Ok(());
        }
        let r = write_frames(io, &self.out, &mut self.broken);
        self.out.clear();
        r
    }

    /// Writes the queued frames, then the first `len` bytes of `frame` (one whole frame).
    fn flush_with_frame<S: MigrationStream>(
        &mut self,
        io: &mut Watched<S>,
        len: usize,
    ) -> Result<(), SendError> {
        self.flush(io)?;
        write_frames(io, &self.frame[..len], &mut self.broken)
    }
}

/// Writes `frames` (whole frames) to `io`. On failure `broken` says whether the stream is
/// no longer at a frame boundary.
fn write_frames<S: MigrationStream>(
    io: &mut Watched<S>,
    frames: &[u8],
    broken: &mut bool,
) -> Result<(), SendError> {
    // Not `write_all`: a cancelled write must say how far it got. (`Watched` retries
    // `Interrupted` itself, checking for cancellation each time.)
    let mut written = 0;
    let r = loop {
        match io.write(&frames[written..]) {
            Ok(0) => break Err(io::Error::from(io::ErrorKind::WriteZero)),
            Ok(n) => {
                written += n;
                if written == frames.len() {
                    break Ok(());
                }
            }
            Err(e) => break Err(e),
        }
    };
    r.map_err(|source| {
        // Cancelled: the link works, so end the frame cut short (if any) to leave the
        // stream at a frame boundary, where the destination can still read an `Abort`.
        let at_boundary = is_cancelled(&source)
            && io
                .write_best_effort(&frames[written..frame_end(frames, written)])
                .is_ok();
        *broken = !at_boundary;
        ProtocolError::Io {
            op: "sending to the destination",
            source,
        }
        .into()
    })
}

/// An extra connection, carrying memory only.
pub(super) struct Lane<S> {
    pub(super) io: Watched<S>,
    buf: LaneBuf,
}

/// What every connection needs while it sends its share of a pass.
struct PassCtx<'a, V: ?Sized> {
    vm: &'a V,
    opts: &'a SendOptions,
    progress: &'a MigrationProgress,
    started: Instant,
    phase: Phase,
    iteration: u32,
    /// Pages of this pass not sent yet, over all connections.
    left: AtomicU64,
    /// Another connection failed: stop too.
    stop: AtomicBool,
    /// How chunks are encoded: what the destination takes.
    encoding: Encoding,
    /// Precopy only: pages dirtied again since the pass began, collected while it runs.
    /// They go into the next pass; this one skips those it has not sent yet.
    redirtied: Option<Mutex<Redirtied>>,
}

/// The dirty log read in the middle of a pass.
struct Redirtied {
    pages: PageSet,
    collected_at: Instant,
}

/// One connection's share of a pass.
#[derive(Default)]
struct LaneResult {
    pages: u64,
    bytes: u64,
    /// Runs not sent because the timeout passed (under `Ignore`).
    unsent: Vec<(u64, u32)>,
    /// Pages left for the next pass because the guest wrote them again first.
    skipped: u64,
    /// Pages sent as zero because the VM knew them never touched (nearly free).
    untouched: u64,
}

impl<V: SourceVm + ?Sized> PassCtx<'_, V> {
    /// Sends runs taken from `runs` on one connection until none is left, then
    /// `IterationDone` with its share.
    fn send_runs<S: MigrationStream>(
        &self,
        io: &mut Watched<S>,
        buf: &mut LaneBuf,
        runs: &RunQueue<'_>,
    ) -> Result<LaneResult, SendError> {
        let mut res = LaneResult::default();
        let mut last_flush = Instant::now();
        while let Some((gpa, pages)) = runs.take() {
            if self.progress.is_cancelled() {
                return Err(SendError::Cancelled);
            }
            if self.stop.load(Ordering::Relaxed) {
                return Ok(res);
            }
            if self.phase == Phase::Precopy && self.started.elapsed() >= self.opts.timeout {
                match self.opts.timeout_strategy {
                    TimeoutStrategy::Cancel => {
                        return Err(SendError::TimedOut {
                            timeout_s: self.opts.timeout.as_secs(),
                            downtime_ms: self.opts.downtime.as_millis() as u64,
                            remaining_pages: self.left.load(Ordering::Relaxed),
                        })
                    }
                    TimeoutStrategy::Ignore => {
                        // Switch over now; the unsent pages go into the final pass.
                        res.unsent = vec![(gpa, pages)];
                        res.unsent.extend(runs.take_rest());
                        break;
                    }
                }
            }
            for (gpa, pages) in self.still_clean(gpa, pages, &mut res)? {
                self.send_run(gpa, pages, io, buf, &mut res)?;
            }
            if buf.out.len() >= FLUSH_BYTES || last_flush.elapsed() >= FLUSH_INTERVAL {
                buf.flush(io)?;
                last_flush = Instant::now();
            }
        }
        encode(
            &Message::IterationDone {
                iteration: self.iteration,
                pages: res.pages,
                bytes: res.bytes,
            },
            &mut buf.out,
        )?;
        buf.flush(io)?;
        Ok(res)
    }

    /// The parts of the run `(gpa, pages)` the guest has not written again since the pass
    /// began (reading the dirty log first when it is due). The rest is already in the next
    /// pass: sending it now would only send it twice.
    fn still_clean(
        &self,
        gpa: u64,
        pages: u32,
        res: &mut LaneResult,
    ) -> Result<Vec<(u64, u32)>, SendError> {
        let Some(redirtied) = &self.redirtied else {
            return Ok(vec![(gpa, pages)]);
        };
        let mut r = redirtied.lock().unwrap_or_else(|p| p.into_inner());
        if r.collected_at.elapsed() >= RECOLLECT_INTERVAL {
            for (g, len) in hook("collect_dirty", self.vm.collect_dirty(false))? {
                r.pages.insert_range(g, len);
            }
            r.collected_at = Instant::now();
        }
        if r.pages.is_empty() {
            return Ok(vec![(gpa, pages)]);
        }
        let mut parts = Vec::new();
        let mut i = 0u32;
        while i < pages {
            let at = |i: u32| gpa + u64::from(i) * PAGE_SIZE as u64;
            let dirty = r.pages.contains(at(i));
            let start = i;
            while i < pages && r.pages.contains(at(i)) == dirty {
                i += 1;
            }
            if dirty {
                res.skipped += u64::from(i - start);
            } else {
                parts.push((at(start), i - start));
            }
        }
        let skipped = pages - parts.iter().map(|p| p.1).sum::<u32>();
        if skipped > 0 {
            self.left.fetch_sub(u64::from(skipped), Ordering::Relaxed);
        }
        Ok(parts)
    }

    /// Reads, encodes and queues (or, a page chunk, writes) one run of pages.
    fn send_run<S: MigrationStream>(
        &self,
        gpa: u64,
        pages: u32,
        io: &mut Watched<S>,
        buf: &mut LaneBuf,
        res: &mut LaneResult,
    ) -> Result<(), SendError> {
        let len = pages as usize * PAGE_SIZE;
        let before = buf.out.len();
        let (counts, bytes) = if self.encoding == Encoding::Pages {
            // Guest RAM is copied once, straight into the frame, and encoded there.
            let place = page_chunk_pages(pages as usize);
            if buf.frame.len() < place.end {
                buf.frame.resize(place.end, 0);
            }
            hook(
                "read_pages",
                self.vm
                    .read_pages_known_zero(gpa, &mut buf.frame[place], &mut buf.known_zero),
            )?;
            let (frame_len, counts) =
                finish_page_chunk_at(&mut buf.frame, gpa, pages as usize, &buf.known_zero)?;
            buf.flush_with_frame(io, frame_len)?;
            (counts, frame_len as u64)
        } else {
            if buf.scratch.len() < len {
                buf.scratch.resize(len, 0);
            }
            hook(
                "read_pages",
                self.vm
                    .read_pages_known_zero(gpa, &mut buf.scratch[..len], &mut buf.known_zero),
            )?;
            let counts = self.encode_copied(gpa, len, buf)?;
            (counts, (buf.out.len() - before) as u64)
        };
        res.pages += u64::from(pages);
        res.untouched += buf
            .known_zero
            .iter()
            .take(pages as usize)
            .filter(|&&z| z)
            .count() as u64;
        res.bytes += bytes;
        let left = self.left.fetch_sub(u64::from(pages), Ordering::Relaxed) - u64::from(pages);
        let phase = self.phase;
        self.progress.update(|i| {
            i.ram.duplicate += u64::from(counts.zero_pages);
            i.ram.normal += u64::from(counts.data_pages);
            i.ram.normal_bytes += u64::from(counts.data_pages) * PAGE_SIZE as u64;
            i.ram.transferred += bytes;
            match phase {
                Phase::Precopy => i.ram.precopy_bytes += bytes,
                Phase::Downtime => i.ram.downtime_bytes += bytes,
            }
            i.ram.remaining = left * PAGE_SIZE as u64;
        });
        Ok(())
    }
}

impl<V: ?Sized> PassCtx<'_, V> {
    /// Encodes the `len` bytes of pages read into `buf.scratch` at `gpa` as a sparse or a
    /// plain chunk (a destination that takes no page chunks).
    fn encode_copied(
        &self,
        gpa: u64,
        len: usize,
        buf: &mut LaneBuf,
    ) -> Result<ChunkCounts, ProtocolError> {
        if self.encoding == Encoding::Sparse {
            return encode_sparse_chunk_known(
                gpa,
                &buf.scratch[..len],
                &buf.known_zero,
                &mut buf.out,
            );
        }
        // The plain encoder looks at every byte: give it the zeros.
        for (page, _) in buf.scratch[..len]
            .chunks_exact_mut(PAGE_SIZE)
            .zip(&buf.known_zero)
            .filter(|(_, &z)| z)
        {
            page.fill(0);
        }
        encode_memory_chunk(gpa, &buf.scratch[..len], &mut buf.out)
    }
}

/// How memory chunks go on the wire, by what the destination takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Encoding {
    /// `MemoryChunk`: a page map and whole pages.
    Plain,
    /// `SparseChunk`: each page as its non-zero stretches.
    Sparse,
    /// `PageChunk`: page kinds first, then whole pages or stretches; encoded in place.
    Pages,
}

impl Encoding {
    fn for_peer(peer_features: u64) -> Encoding {
        if peer_features & features::PAGE_CHUNKS != 0 {
            Encoding::Pages
        } else if peer_features & features::SPARSE_PAGES != 0 {
            Encoding::Sparse
        } else {
            Encoding::Plain
        }
    }
}

/// A pass's runs, shared by the connections' sending threads: each takes the next run
/// when it is ready for one. Split by address instead, a connection could get all of a
/// region that holds data while another skips never-touched RAM (the 2 GiB guest whose
/// data is its first GiB went over one connection in its first pass).
struct RunQueue<'a> {
    runs: &'a [(u64, u32)],
    next: AtomicUsize,
}

impl<'a> RunQueue<'a> {
    fn new(runs: &'a [(u64, u32)]) -> Self {
        RunQueue {
            runs,
            next: AtomicUsize::new(0),
        }
    }

    /// The next run nobody took yet.
    fn take(&self) -> Option<(u64, u32)> {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        self.runs.get(i).copied()
    }

    /// Every run nobody took yet; the queue is empty afterwards.
    fn take_rest(&self) -> Vec<(u64, u32)> {
        let i = self.next.swap(self.runs.len(), Ordering::Relaxed);
        self.runs.get(i..).map(<[_]>::to_vec).unwrap_or_default()
    }
}

/// First throttle step and each further one, in percent of vCPU time (QEMU's defaults).
const THROTTLE_INITIAL: u8 = 20;
const THROTTLE_STEP: u8 = 10;
const THROTTLE_MAX: u8 = 99;
/// The most the throttle starts at after the first pass: one pass is little evidence (a
/// guest filling fresh memory once looks like one that outdirties the link).
const OUTDIRTIED_THROTTLE_MAX: u8 = 50;

/// Auto-converge's next throttle, from `current` (percent), when the dirty set stopped
/// shrinking: one that would hold the guest, which dirtied `dirty_rate` pages a second
/// while running `100 - current` percent of the time, to [`SHRINK_NUM`]/[`SHRINK_DEN`] of
/// the `page_rate` the link carries, so that the next pass leaves clearly fewer pages;
/// never less than QEMU's ramp ([`THROTTLE_INITIAL`], then [`THROTTLE_STEP`] more a step).
/// QEMU's ramp alone takes a pass per step: on a guest that outdirties the link 1.5×,
/// four passes of the whole working set before it bites.
fn aimed_throttle(current: u8, dirty_rate: f64, page_rate: f64) -> u8 {
    let ramp = match current {
        0 => THROTTLE_INITIAL,
        t => t.saturating_add(THROTTLE_STEP),
    }
    .min(THROTTLE_MAX);
    if !(dirty_rate > 0.0 && page_rate > 0.0) {
        return ramp;
    }
    let running = 1.0 - f64::from(current) / 100.0;
    let wanted = running * page_rate * SHRINK_NUM as f64 / SHRINK_DEN as f64 / dirty_rate;
    let aimed = ((1.0 - wanted) * 100.0).ceil();
    if aimed.is_nan() || aimed <= f64::from(ramp) {
        ramp
    } else {
        aimed.min(f64::from(THROTTLE_MAX)) as u8
    }
}

/// When the source pauses the guest for the last pass (`switch_over`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SwitchOver {
    /// As soon as the dirty pages left fit `downtime_ms` (QEMU's rule): the fewest passes
    /// and bytes, a pause of up to `downtime_ms`.
    Fits,
    /// Once they fit, go on while each pass still leaves clearly fewer (see
    /// [`Convergence`]): a pause of a few milliseconds for a few more passes and bytes.
    /// The default: what Ferry is for is a guest that barely notices the move, and on the
    /// side-by-side benchmark (`docs/benchmarks/switch-over.md`) the extra passes cost
    /// little total time where the dirty set shrinks, while no pass is added where it
    /// does not.
    #[default]
    MinDowntime,
}

/// When to stop iterating. Fitting in `downtime_ms` is necessary, not sufficient: while
/// each pass still leaves clearly fewer dirty pages than the one before (a guest whose
/// dirty rate is below the link's), another short pass shrinks the downtime further, down
/// to [`TINY_DOWNTIME`]. Once the set stops shrinking, more passes only cost time.
#[derive(Default)]
struct Convergence {
    rule: SwitchOver,
    /// Dirty pages left after the previous pass.
    previous: Option<u64>,
    /// Passes made since the dirty set first fitted the downtime.
    passes_fitting: u32,
    /// The last pass left clearly fewer dirty pages than the one before.
    shrank: bool,
    /// Passes added to throttle a dirty set down that fitted but stopped shrinking.
    settling_steps: u32,
}

/// A downtime this short is not worth another pass: about what a pause costs with
/// nothing left to send (pause, final collection, state, the destination's start: an idle
/// guest's pause to `Resumed` took 0.45-0.6 ms on the 2-core test host). At 5 ms a guest
/// rewriting 64 MiB paused with 3-4k pages left, 3-6 ms; one more pass of ~3 ms halves
/// that. At 2 ms (when a pause with nothing left cost 1.1-1.8 ms), the 8 GiB guest with
/// 64 MiB hot paused after its first pass with ~600 pages left, their send 0.7 of its
/// 1.3 ms downtime; one more pass of ~1 ms leaves a few dozen.
const TINY_DOWNTIME: Duration = Duration::from_micros(500);
/// A pass must leave at most this share of the previous pass's dirty pages (3/4) to
/// count as converging.
const SHRINK_NUM: u64 = 3;
const SHRINK_DEN: u64 = 4;
/// Passes at most after the dirty set first fitted the downtime.
const MAX_PASSES_FITTING: u32 = 8;
/// With auto-converge, a dirty set that fits but stopped shrinking is not final while it
/// would still pause the guest longer than this: the throttle goes up one more step
/// instead (a guest rewriting its working set as fast as the link carries it otherwise
/// ends on whatever share of it the last pass left, up to the whole `downtime_ms`).
const SETTLED_DOWNTIME: Duration = Duration::from_millis(20);
/// At most this many such extra throttle steps: a dirty set that then no longer fits
/// would otherwise keep the migration going where it could have stopped.
const MAX_SETTLING_STEPS: u32 = 3;

impl Convergence {
    /// Whether to pause now, with `dirty` pages left that would take `expected` to send.
    /// `can_throttle`: auto-converge is on and could hold the vCPUs back more.
    fn stop_now(
        &mut self,
        expected: Duration,
        downtime: Duration,
        dirty: u64,
        can_throttle: bool,
    ) -> bool {
        let shrinking = self
            .previous
            .is_none_or(|p| dirty * SHRINK_DEN < p * SHRINK_NUM);
        self.previous = Some(dirty);
        self.shrank = shrinking;
        if expected > downtime {
            return false;
        }
        if self.rule == SwitchOver::Fits {
            log::debug!("{dirty} dirty pages fit the downtime ({expected:?}): switching over");
            return true;
        }
        self.passes_fitting += 1;
        let settled = shrinking
            || !can_throttle
            || expected <= SETTLED_DOWNTIME
            || self.settling_steps >= MAX_SETTLING_STEPS;
        let stop = expected <= TINY_DOWNTIME
            || (!shrinking && settled)
            || self.passes_fitting > MAX_PASSES_FITTING;
        if !stop && shrinking {
            log::debug!("{dirty} dirty pages fit the downtime ({expected:?}) but still shrink: one more pass");
        } else if !stop {
            self.settling_steps += 1;
            log::debug!(
                "{dirty} dirty pages fit the downtime ({expected:?}) and no longer shrink: one \
                 more pass, throttled harder"
            );
        }
        stop
    }
}

pub(super) struct Sender<'a, V: ?Sized, S: MigrationStream> {
    pub(super) vm: &'a V,
    pub(super) opts: &'a SendOptions,
    pub(super) progress: &'a MigrationProgress,
    pub(super) conn: MessageReader<Watched<S>>,
    /// The main connection's outgoing frames.
    pub(super) main: LaneBuf,
    /// Extra connections for memory (empty: everything goes over `conn`).
    pub(super) lanes: Vec<Lane<S>>,
    pub(super) started: Instant,
    pub(super) dirty_log_on: bool,
    pub(super) paused: bool,
    /// Pages per second, from the last pass big enough to measure.
    pub(super) page_rate: Option<f64>,
    /// Pages the guest dirtied per second during the last pass (distinct pages: a guest
    /// rewriting all it has within one pass dirties faster than this says).
    pub(super) dirty_rate: f64,
    /// Auto-converge's current hold on the vCPUs, in percent.
    pub(super) throttle: u8,
    /// What the destination's `Hello` offered.
    pub(super) peer_features: u64,
    /// The destination has run the VM (postcopy): never resume it here.
    pub(super) postcopy_started: bool,
}

/// Migrates `vm` over `stream` (connected to a destination running
/// [`super::receive_migration`]), keeping `progress` current. Returns the final statistics
/// once the destination confirmed that the VM runs there; the source VM is then left
/// paused, for the vmm to tear down. On any error the source VM is resumed (if it had been
/// paused), dirty logging is stopped, the destination is told (`Abort`) when the stream
/// still works, and the error says what happened.
pub fn send_migration<V: SourceVm + Sync + ?Sized, S: MigrationStream>(
    vm: &V,
    stream: S,
    opts: &SendOptions,
    progress: &MigrationProgress,
) -> Result<MigrationInfo, SendError> {
    send_migration_parallel(vm, stream, Vec::new(), opts, progress)
}

/// [`send_migration`] with `extra` connections to the same destination (opened after
/// `stream`): each pass is split between all of them. When the destination cannot take
/// extra connections they are closed and `stream` carries everything.
pub fn send_migration_parallel<V: SourceVm + Sync + ?Sized, S: MigrationStream>(
    vm: &V,
    stream: S,
    extra: Vec<S>,
    opts: &SendOptions,
    progress: &MigrationProgress,
) -> Result<MigrationInfo, SendError> {
    let fail_early = |e: SendError| {
        progress.fail(MigrationStatus::Failed, &e.to_string());
        Err(e)
    };
    if extra.len() >= usize::from(MAX_CHANNELS) {
        return fail_early(SendError::TooManyConnections(extra.len() + 1));
    }
    let watch = |s| Watched::new(s, opts.io_timeout, progress.clone());
    let watched = match watch(stream) {
        Ok(w) => w,
        Err(e) => return fail_early(SendError::Stream(e)),
    };
    let mut lanes = Vec::with_capacity(extra.len());
    for s in extra {
        match watch(s) {
            Ok(io) => lanes.push(Lane {
                io,
                buf: LaneBuf::new(),
            }),
            Err(e) => return fail_early(SendError::Stream(e)),
        }
    }
    let mut sender = Sender::new(vm, opts, progress, watched, lanes);
    match sender.run() {
        Ok(()) => {
            vm.stop_dirty_log();
            progress.set_status(MigrationStatus::Completed);
            Ok(progress.snapshot())
        }
        Err(e) => Err(sender.fail(e)),
    }
}

impl<'a, V: SourceVm + Sync + ?Sized, S: MigrationStream> Sender<'a, V, S> {
    /// A sender at the start of a migration over `conn` (and `lanes`): nothing sent, the
    /// VM running, no peer features known yet.
    pub(super) fn new(
        vm: &'a V,
        opts: &'a SendOptions,
        progress: &'a MigrationProgress,
        conn: Watched<S>,
        lanes: Vec<Lane<S>>,
    ) -> Self {
        Sender {
            vm,
            opts,
            progress,
            conn: MessageReader::new(conn),
            main: LaneBuf::new(),
            lanes,
            started: Instant::now(),
            dirty_log_on: false,
            paused: false,
            page_rate: None,
            dirty_rate: 0.0,
            throttle: 0,
            peer_features: 0,
            postcopy_started: false,
        }
    }

    fn run(&mut self) -> Result<(), SendError> {
        self.progress.set_status(MigrationStatus::Setup);
        let ram = self.vm.ram_layout();
        check_ram_layout(&ram).map_err(vm_err("ram_layout"))?;
        let vm_config = hook("config", self.vm.config())?;
        let total: u64 = ram.iter().map(|r| r.size).sum();
        self.progress.update(|i| {
            i.ram.total = total;
            i.ram.remaining = total;
        });

        if self.opts.local_memory {
            return self.run_local(&ram, &vm_config);
        }
        self.handshake(&ram, &vm_config, None)?;
        self.require_planned_postcopy()?;
        hook("start_dirty_log", self.vm.start_dirty_log())?;
        self.dirty_log_on = true;
        let setup_ms = self.started.elapsed().as_millis() as u64;
        // The tracking is known from here: `migration-info` says which while pass 0
        // runs, not only once it is done (a small guest's whole migration may be pass 0).
        let tracking = self.vm.dirty_tracking_stats();
        self.progress.update(|i| {
            i.setup_time = Some(setup_ms);
            i.dirty_tracking = tracking;
        });
        self.progress.set_status(MigrationStatus::Active);

        let mut pending = PageSet::new(&ram);
        pending.insert_all();
        let mut iteration = 0u32;
        let mut convergence = Convergence {
            rule: self.opts.switch_over,
            ..Convergence::default()
        };
        log::info!(
            "switch-over rule {:?}: {}",
            self.opts.switch_over,
            match self.opts.switch_over {
                SwitchOver::Fits => "pause as soon as the dirty pages left fit the downtime",
                SwitchOver::MinDowntime =>
                    "once the dirty pages left fit the downtime, go on while they shrink",
            }
        );
        // Postcopy from the start: every page is fetched or streamed once, nothing twice.
        if self.postcopy_due(0)? {
            return self.postcopy(0, pending);
        }
        loop {
            let pass_start = Instant::now();
            let pass = self.send_pass(iteration, &mut pending, Phase::Precopy)?;
            // The dirty set is read once the destination holds the pass: pages still
            // queued on their way would otherwise land inside the downtime.
            self.await_pass_received(iteration)?;
            let dirty = hook("collect_dirty", self.vm.collect_dirty(false))?;
            for (gpa, len) in dirty {
                pending.insert_range(gpa, len);
            }
            let expected = self.record_pass(iteration, &pass, pass_start, pending.count());
            iteration += 1;
            if pass.timed_out
                || pending.is_empty()
                || convergence.stop_now(
                    expected,
                    self.opts.downtime,
                    pending.count(),
                    self.opts.auto_converge && self.throttle < THROTTLE_MAX,
                )
            {
                break;
            }
            if self.postcopy_due(iteration)? {
                return self.postcopy(iteration, pending);
            }
            // From the second pass on, a dirty set that stopped shrinking; after the first,
            // one that cannot shrink: the guest dirtied pages faster than they went out.
            let outdirtied = iteration == 1
                && expected > self.opts.downtime
                && self.page_rate.is_some_and(|r| self.dirty_rate > r);
            if self.opts.auto_converge && (outdirtied || iteration >= 2 && !convergence.shrank) {
                let (why, most) = if outdirtied {
                    (
                        "were dirtied faster than they went out",
                        OUTDIRTIED_THROTTLE_MAX,
                    )
                } else {
                    ("no longer shrink", THROTTLE_MAX)
                };
                self.throttle_more(pending.count(), why, most)?;
            }
            if self.started.elapsed() >= self.opts.timeout {
                match self.opts.timeout_strategy {
                    TimeoutStrategy::Cancel => return Err(self.timed_out(pending.count())),
                    TimeoutStrategy::Ignore => break,
                }
            }
        }
        if pending.count() < LANE_THREAD_MIN_PAGES {
            self.retire_lanes();
        }
        self.stop_and_copy(iteration, pending)
    }

    /// Closes the extra connections before the pause, where the destination takes that
    /// ([`features::LANES_RETIRE`]): a final pass this small goes on the main connection
    /// anyway, and its end then does not wait for their threads on either side.
    fn retire_lanes(&mut self) {
        if self.lanes.is_empty() || self.peer_features & features::LANES_RETIRE == 0 {
            return;
        }
        log::debug!(
            "the {} extra connection(s) close before the pause: the final pass is small",
            self.lanes.len()
        );
        for lane in self.lanes.drain(..) {
            lane.io.shutdown();
        }
    }

    /// `MemFDs` on one host: the destination maps the guest RAM's own files, so only the
    /// state moves, while the guest is paused.
    fn run_local(&mut self, ram: &[RamRange], vm_config: &[u8]) -> Result<(), SendError> {
        let files = hook("memory_files", self.vm.memory_files())?;
        let layout: Vec<RamRange> = files
            .iter()
            .map(|(f, _)| RamRange {
                gpa: f.gpa,
                size: f.size,
            })
            .collect();
        if layout != ram {
            return Err(SendError::Vm {
                op: "memory_files",
                reason: format!("the files cover {layout:x?}, not the RAM layout {ram:x?}"),
            });
        }
        self.handshake(ram, vm_config, Some(&files))?;
        let setup_ms = self.started.elapsed().as_millis() as u64;
        self.progress.update(|i| {
            i.setup_time = Some(setup_ms);
            i.ram.remaining = 0;
        });
        self.progress.set_status(MigrationStatus::Device);
        log::info!("pausing the VM: its RAM stays in the files the destination maps");
        let paused_at = Instant::now();
        hook("pause", self.vm.pause())?;
        self.paused = true;
        self.finish(paused_at, None, None)
    }

    /// `MemoryFds` with the files attached, on the main connection.
    fn send_memory_files(&mut self, files: &[(MemoryFd, BorrowedFd<'_>)]) -> Result<(), SendError> {
        let entries: Vec<MemoryFd> = files.iter().map(|(f, _)| *f).collect();
        let fds: Vec<BorrowedFd<'_>> = files.iter().map(|(_, fd)| *fd).collect();
        let mut frame = Vec::new();
        encode(&Message::MemoryFds(entries), &mut frame)?;
        self.conn
            .get_mut()
            .get_mut()
            .write_with_fds(&frame, &fds)
            .map_err(|source| {
                ProtocolError::Io {
                    op: "passing the guest RAM's files",
                    source,
                }
                .into()
            })
    }

    fn handshake(
        &mut self,
        ram: &[RamRange],
        vm_config: &[u8],
        files: Option<&[(MemoryFd, BorrowedFd<'_>)]>,
    ) -> Result<(), SendError> {
        let build = super::build_string();
        let features = if self.vm.state_ready_at_pause() {
            features::ALL
        } else {
            features::ALL & !features::STATE_AT_PAUSE
        };
        self.send(&Message::Hello(Hello {
            version: PROTOCOL_VERSION,
            features,
            build: &build,
        }))?;
        self.flush()?;
        let peer_features = match self.conn.read_message()? {
            Message::Hello(h) if h.version < MIN_PROTOCOL_VERSION => {
                return Err(SendError::PeerVersion {
                    peer: h.version,
                    min: MIN_PROTOCOL_VERSION,
                    max: PROTOCOL_VERSION,
                })
            }
            Message::Hello(h) => {
                log::info!(
                    "migration destination: {} (protocol {})",
                    h.build,
                    h.version
                );
                // A feature is used only when both sides offer it.
                self.peer_features = h.features & features::ALL;
                self.vm
                    .peer_reads_binary_state(self.peer_features & features::BINARY_STATE != 0);
                self.peer_features
            }
            other => return Err(unexpected(other, "waiting for Hello")),
        };
        if let Some(files) = files {
            if peer_features & features::LOCAL_MEMORY == 0 {
                return Err(SendError::NoLocalMemory);
            }
            self.send_memory_files(files)?;
        }
        self.send(&Message::Config(Config {
            ram: ram.to_vec(),
            vm_config,
        }))?;
        self.flush()?;
        self.read_slow_reply(|m| match m {
            Message::ConfigAccepted => Ok(()),
            Message::Refused { reason } => Err(SendError::Refused(reason.to_string())),
            other => Err(unexpected(other, "waiting for ConfigAccepted")),
        })?;
        if self.lanes.is_empty() {
            return Ok(());
        }
        if peer_features & features::PARALLEL_CHANNELS == 0 {
            log::warn!(
                "the destination takes one connection only: the {} extra ones are closed",
                self.lanes.len()
            );
            for lane in self.lanes.drain(..) {
                lane.io.shutdown();
            }
            return Ok(());
        }
        self.open_lanes()
    }

    /// Announces the extra connections, introduces each, and waits until all are taken.
    fn open_lanes(&mut self) -> Result<(), SendError> {
        use std::hash::{BuildHasher, Hasher};
        // Tells this migration's connections from stray ones; not a secret.
        let token = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        self.send(&Message::Channels {
            count: self.lanes.len() as u16,
            token,
        })?;
        self.flush()?;
        for (i, lane) in self.lanes.iter_mut().enumerate() {
            let hello = Message::ChannelHello {
                index: i as u16 + 1,
                token,
            };
            write_message(&mut lane.io, &hello)?;
        }
        let reply = self.read_slow_reply(|m| match m {
            Message::ChannelsReady => Ok(()),
            other => Err(unexpected(other, "waiting for ChannelsReady")),
        });
        log::info!("sending memory over {} connections", self.lanes.len() + 1);
        reply
    }

    /// Sends every page in `pending` (emptying it), split between the connections (below
    /// [`LANE_THREAD_MIN_PAGES`] all on the main one), each ending its share, empty or
    /// not, with `IterationDone`.
    pub(super) fn send_pass(
        &mut self,
        iteration: u32,
        pending: &mut PageSet,
        phase: Phase,
    ) -> Result<PassResult, SendError> {
        let chunk_pages = self.opts.chunk_pages.clamp(1, MAX_CHUNK_PAGES);
        let runs = pending.take_runs(chunk_pages);
        let pages: u64 = runs.iter().map(|r| u64::from(r.1)).sum();
        let ctx = PassCtx {
            vm: self.vm,
            opts: self.opts,
            progress: self.progress,
            started: self.started,
            phase,
            iteration,
            left: AtomicU64::new(pages),
            stop: AtomicBool::new(false),
            encoding: Encoding::for_peer(self.peer_features),
            // Never while paused: the final collection must see everything, and last.
            redirtied: (phase == Phase::Precopy).then(|| {
                Mutex::new(Redirtied {
                    pages: PageSet::new(&self.vm.ram_layout()),
                    collected_at: Instant::now(),
                })
            }),
        };
        let queue = RunQueue::new(&runs);
        let results = if self.lanes.is_empty() {
            vec![ctx.send_runs(self.conn.get_mut(), &mut self.main, &queue)]
        } else if pages < LANE_THREAD_MIN_PAGES {
            // The main connection takes every run; the others end an empty share.
            let mut all = vec![ctx.send_runs(self.conn.get_mut(), &mut self.main, &queue)];
            let none = RunQueue::new(&[]);
            for lane in &mut self.lanes {
                if all.iter().any(|r| r.is_err()) {
                    break;
                }
                all.push(ctx.send_runs(&mut lane.io, &mut lane.buf, &none));
            }
            all
        } else {
            let (main_io, main_buf, lanes) = (self.conn.get_mut(), &mut self.main, &mut self.lanes);
            std::thread::scope(|s| {
                let (ctx, queue) = (&ctx, &queue);
                let threads: Vec<_> = lanes
                    .iter_mut()
                    .enumerate()
                    .map(|(i, lane)| {
                        std::thread::Builder::new()
                            .name(format!("mig-send-{}", i + 1))
                            .spawn_scoped(s, move || {
                                ferry_seccomp::install_or_exit(
                                    ferry_seccomp::ThreadKind::MigrationSender,
                                );
                                let r = ctx.send_runs(&mut lane.io, &mut lane.buf, queue);
                                if r.is_err() {
                                    ctx.stop.store(true, Ordering::Relaxed);
                                }
                                r
                            })
                    })
                    .collect();
                let main = ctx.send_runs(main_io, main_buf, queue);
                if main.is_err() {
                    ctx.stop.store(true, Ordering::Relaxed);
                }
                let mut all = vec![main];
                for t in threads {
                    all.push(match t {
                        Ok(t) => t.join().unwrap_or_else(|_| {
                            Err(SendError::Vm {
                                op: "send",
                                reason: "a sending thread panicked".into(),
                            })
                        }),
                        Err(e) => Err(SendError::Vm {
                            op: "send",
                            reason: format!("starting a sending thread: {e}"),
                        }),
                    });
                }
                all
            })
        };
        let mut pass = PassResult::default();
        let mut first_err = None;
        if let Some(r) = ctx.redirtied {
            let mut redirtied = r.into_inner().unwrap_or_else(|p| p.into_inner()).pages;
            for (g, p) in redirtied.take_runs(MAX_CHUNK_PAGES) {
                pending.insert_range(g, u64::from(p) * PAGE_SIZE as u64);
            }
        }
        for r in results {
            match r {
                Ok(lane) => {
                    pass.pages += lane.pages;
                    pass.bytes += lane.bytes;
                    pass.skipped += lane.skipped;
                    pass.untouched += lane.untouched;
                    if !lane.unsent.is_empty() {
                        pass.timed_out = true;
                    }
                    for (g, p) in lane.unsent {
                        pending.insert_range(g, u64::from(p) * PAGE_SIZE as u64);
                    }
                }
                // The main connection's error first: it is the one the others stopped for.
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(pass),
        }
    }

    /// Records a finished pass; returns the downtime the dirty pages would cost now.
    pub(super) fn record_pass(
        &mut self,
        iteration: u32,
        pass: &PassResult,
        pass_start: Instant,
        dirty_pages: u64,
    ) -> Duration {
        let secs = pass_start.elapsed().as_secs_f64().max(1e-6);
        // Never-touched pages cost next to nothing, and a dirty page is never one of them:
        // the rate counts the others, once there are enough of them to measure.
        let touched = pass.pages.saturating_sub(pass.untouched);
        if touched >= MIN_PAGES_FOR_RATE || self.page_rate.is_none() {
            // With acknowledged passes, a pass lasts until the destination holds it: its
            // page rate is what a final pass will see, whatever a page costs on the wire
            // (a sparse page may be 14 bytes but is still a page write there). Without,
            // the pass ended when the bytes left, and only the wire bytes say anything:
            // dirty pages are then counted as whole pages.
            let pages = if touched >= MIN_PAGES_FOR_RATE {
                touched
            } else {
                pass.pages
            };
            let rate = if self.peer_features & features::PASS_ACKS != 0 {
                pages as f64 / secs
            } else {
                pass.bytes as f64 / secs / BYTES_PER_DIRTY_PAGE
            };
            self.page_rate = Some(rate);
        }
        let rate = self.page_rate.unwrap_or(f64::MAX).max(1.0);
        let expected = Duration::from_secs_f64(dirty_pages as f64 / rate);
        self.dirty_rate = dirty_pages as f64 / secs;
        let stats = self.vm.dirty_tracking_stats();
        self.progress.update(|i| {
            i.iterations.push(IterationStats {
                iteration,
                pages: pass.pages,
                bytes: pass.bytes,
                duration_ms: (secs * 1000.0) as u64,
                dirty_pages,
            });
            i.ram.dirty_sync_count += 1;
            i.ram.remaining = dirty_pages * PAGE_SIZE as u64;
            i.ram.dirty_pages_rate = (dirty_pages as f64 / secs) as u64;
            i.ram.mbps = pass.bytes as f64 * 8.0 / secs / 1e6;
            i.ram.pages_per_second = (pass.pages as f64 / secs) as u64;
            i.expected_downtime = Some(expected.as_millis() as u64);
            if stats.is_some() {
                i.dirty_tracking = stats;
            }
        });
        log::debug!(
            "migration pass {iteration}: {} pages ({} left for the next pass, written again \
             before their turn), {} bytes in {:.1} ms; {dirty_pages} dirty, expected downtime \
             {expected:?}",
            pass.pages,
            pass.skipped,
            pass.bytes,
            secs * 1000.0
        );
        expected
    }

    /// Reads the destination's answer to a step that may take it longer than an ordinary
    /// read (building the VM, accepting connections, writing a backlog of pages into guest
    /// RAM): the confirmation timeout is the idle limit meanwhile.
    pub(super) fn read_slow_reply(
        &mut self,
        answer: impl FnOnce(Message<'_>) -> Result<(), SendError>,
    ) -> Result<(), SendError> {
        self.conn.get_mut().set_idle(self.opts.confirm_timeout);
        let reply = match self.conn.read_message() {
            Ok(m) => answer(m),
            Err(e) => Err(e.into()),
        };
        self.conn.get_mut().set_idle(self.opts.io_timeout);
        reply
    }

    /// Waits for the destination's `PassReceived` for `iteration` (when it sends them).
    fn await_pass_received(&mut self, iteration: u32) -> Result<(), SendError> {
        if self.peer_features & features::PASS_ACKS == 0 {
            return Ok(());
        }
        let waiting = Instant::now();
        // Only where both sides said so (this side did if its state is ready at the
        // pause): otherwise the destination does not spin for the state either.
        if self.peer_features & features::STATE_AT_PAUSE != 0 && self.vm.state_ready_at_pause() {
            self.conn
                .get_ref()
                .get_ref()
                .spin_until_readable(SPIN_FOR_ACK);
        }
        self.read_slow_reply(|m| match m {
            Message::PassReceived { iteration: i } if i == iteration => Ok(()),
            other => Err(unexpected(other, "waiting for PassReceived")),
        })?;
        log::debug!(
            "the destination held pass {iteration} {:.1} ms after it was sent",
            waiting.elapsed().as_secs_f64() * 1000.0
        );
        Ok(())
    }

    /// Auto-converge: the dirty set no longer shrinks and does not fit, so hold the
    /// vCPUs back more.
    fn throttle_more(&mut self, dirty_pages: u64, why: &str, most: u8) -> Result<(), SendError> {
        let page_rate = self.page_rate.unwrap_or(0.0);
        let next = aimed_throttle(self.throttle, self.dirty_rate, page_rate).min(most);
        if next == self.throttle {
            return Ok(());
        }
        hook("set_throttle", self.vm.set_throttle(next))?;
        log::info!(
            "auto-converge: {dirty_pages} dirty pages {why} and do not fit {} ms; \
             the guest dirtied {:.0} pages/s at {}% throttle against {:.0} sent: vCPUs \
             throttled to {next}% (aimed at {SHRINK_NUM}/{SHRINK_DEN} of the pages sent, at \
             least {THROTTLE_INITIAL}% then {THROTTLE_STEP}% more a step, at most {most}% \
             this step)",
            self.opts.downtime.as_millis(),
            self.dirty_rate,
            self.throttle,
            page_rate
        );
        self.throttle = next;
        self.progress
            .update(|i| i.cpu_throttle_percentage = Some(next));
        Ok(())
    }

    /// Lets the vCPUs run freely again (best effort: on the way out).
    pub(super) fn unthrottle(&mut self) {
        if self.throttle > 0 {
            if let Err(e) = self.vm.set_throttle(0) {
                log::warn!("auto-converge: removing the throttle failed: {e}");
            }
            self.throttle = 0;
        }
    }

    fn stop_and_copy(&mut self, iteration: u32, mut pending: PageSet) -> Result<(), SendError> {
        self.progress.set_status(MigrationStatus::Device);
        // Until `Resumed` arrives, or the migration fails and the guest runs here again.
        let _priority = ThreadNice::raise_current("the migration source's switch-over thread");
        // Not part of the pause: the guest runs meanwhile.
        self.vm.prepare_pause();
        log::info!(
            "stop-and-copy: pausing the VM with {} dirty pages left after pass {}",
            pending.count(),
            iteration.saturating_sub(1)
        );
        let paused_at = Instant::now();
        hook("pause", self.vm.pause())?;
        self.paused = true;
        let pause_ms = paused_at.elapsed().as_secs_f64() * 1000.0;
        // Paused, the throttle holds nothing back; should the migration fail, the guest
        // resumes at full speed.
        self.unthrottle();
        // A state final at the pause goes first: the destination loads it while the last
        // pages are collected and sent, instead of after them.
        let early_state = if self.vm.state_ready_at_pause() {
            let sent = self.send_state()?;
            self.flush()?;
            Some(sent)
        } else {
            None
        };
        let collect_start = Instant::now();
        let dirty = hook("collect_dirty", self.vm.collect_dirty(true))?;
        let split = (pause_ms, collect_start.elapsed().as_secs_f64() * 1000.0);
        for (gpa, len) in dirty {
            pending.insert_range(gpa, len);
        }
        let pass_start = Instant::now();
        let pass = self.send_pass(iteration, &mut pending, Phase::Downtime)?;
        self.record_pass(iteration, &pass, pass_start, 0);
        // The extra connections are done: their end tells the destination so.
        for lane in self.lanes.drain(..) {
            lane.io.shutdown();
        }
        self.finish(paused_at, Some(split), early_state)
    }

    /// Saves the paused machine's state and queues it: its size in bytes, and the
    /// milliseconds saving took.
    fn send_state(&mut self) -> Result<(u64, f64), SendError> {
        let start = Instant::now();
        let (vcpus, devices) = hook("save_state", self.vm.save_state())?;
        let ms = start.elapsed().as_secs_f64() * 1000.0;
        let queued = self.main.out.len();
        self.send(&Message::State {
            vcpus: &vcpus,
            devices: &devices,
        })?;
        let bytes = self.main.out.len().saturating_sub(queued) as u64;
        self.progress.update(|i| {
            i.ram.transferred += bytes;
            i.ram.downtime_bytes += bytes;
        });
        Ok((bytes, ms))
    }

    /// With the guest paused and all RAM sent: state (unless `state_sent` says it went
    /// at the pause: its bytes and the milliseconds saving took), `Complete`, and the
    /// confirmation. `pause_split`: milliseconds the pause took (the vCPUs parked, and
    /// with them their state where the VM saves it then), and the final dirty collection
    /// after it (none where no pages were collected), for the log.
    fn finish(
        &mut self,
        paused_at: Instant,
        pause_split: Option<(f64, f64)>,
        state_sent: Option<(u64, f64)>,
    ) -> Result<(), SendError> {
        let pages_sent_ms = paused_at.elapsed().as_secs_f64() * 1000.0;
        let (when, (state_bytes, state_ms)) = match state_sent {
            Some(s) => ("at the pause", s),
            None => ("after the pages", self.send_state()?),
        };
        let mut info = self.progress.snapshot();
        info.total_time = Some(self.started.elapsed().as_millis() as u64);
        let source_info = serde_json::to_vec(&info).unwrap_or_default();
        self.send(&Message::Complete(Complete {
            paused_us: paused_at.elapsed().as_micros() as u64,
            source_info: &source_info,
        }))?;
        self.flush()?;
        // Where the downtime goes, on this side.
        let split = pause_split
            .map(|(p, c)| format!(" (vCPUs parked in {p:.2} ms, dirty pages collected in {c:.2})"))
            .unwrap_or_default();
        log::info!(
            "paused {:.1} ms: final dirty set sent after {pages_sent_ms:.1} ms{split}, state \
             ({state_bytes} bytes) sent {when}, saved in {state_ms:.2} ms",
            paused_at.elapsed().as_secs_f64() * 1000.0
        );

        self.conn.get_mut().set_idle(self.opts.confirm_timeout);
        // `Resumed` is due within a few hundred µs on a local link: waiting for it awake
        // spares the downtime one thread wake-up (see `SPIN_FOR_RESUMED`).
        let spin_until = Instant::now() + SPIN_FOR_RESUMED;
        let peer_estimate_us = loop {
            let left = spin_until.saturating_duration_since(Instant::now());
            if !left.is_zero() {
                self.conn.get_ref().get_ref().spin_until_readable(left);
            }
            match self.conn.read_message()? {
                Message::Resumed { downtime_us } => break downtime_us,
                // The final pass's, sent while this side went on to the state.
                Message::PassReceived { .. } => {}
                other => return Err(unexpected(other, "waiting for Resumed")),
            }
        };
        // Both ends of the downtime on this clock: the pause here, and `Resumed`, which the
        // destination sends once its vCPUs run (its one-way trip is counted too, so this
        // errs on the long side).
        let downtime_us = paused_at.elapsed().as_micros() as u64;
        let total_us = self.started.elapsed().as_micros() as u64;
        log::info!(
            "the VM runs on the destination: paused {:.1} ms in all (the destination's own \
             estimate: {:.1} ms), migration {:.1} ms",
            downtime_us as f64 / 1000.0,
            peer_estimate_us as f64 / 1000.0,
            total_us as f64 / 1000.0
        );
        self.progress.update(|i| i.set_downtime_us(downtime_us));
        if self.peer_features & features::SOURCE_MEASURES != 0 {
            let measured = Message::Measured {
                downtime_us,
                total_us,
            };
            // The migration is over either way: a destination that misses this keeps its
            // own estimate.
            if let Err(e) = self.send(&measured).and_then(|()| self.flush()) {
                log::warn!("could not send the measured downtime to the destination: {e}");
            }
        }
        Ok(())
    }

    /// After a failed write: the `Abort` the destination may have sent before closing.
    fn peer_reason(&mut self) -> Option<SendError> {
        // The destination sends it once all its connections stopped: allow for that.
        self.conn.get_mut().set_idle(Duration::from_millis(1000));
        loop {
            match self.conn.read_message() {
                Ok(Message::Abort { reason }) => {
                    return Some(SendError::PeerAborted(reason.to_string()))
                }
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }

    fn timed_out(&self, remaining_pages: u64) -> SendError {
        SendError::TimedOut {
            timeout_s: self.opts.timeout.as_secs(),
            downtime_ms: self.opts.downtime.as_millis() as u64,
            remaining_pages,
        }
    }

    /// Queues one message on the main connection.
    pub(super) fn send(&mut self, msg: &Message<'_>) -> Result<(), SendError> {
        encode(msg, &mut self.main.out)?;
        Ok(())
    }

    /// Writes the main connection's queued frames.
    pub(super) fn flush(&mut self) -> Result<(), SendError> {
        self.main.flush(self.conn.get_mut())
    }

    /// Cleans up after `e`: tell the peer, stop logging, resume the VM, record the failure.
    pub(super) fn fail(&mut self, e: SendError) -> SendError {
        let cancelled = self.progress.is_cancelled() || is_cancel_io(&e);
        let e = if cancelled { SendError::Cancelled } else { e };
        for lane in self.lanes.drain(..) {
            lane.io.shutdown();
        }
        let broken = self.main.broken;
        // A failed write (here or on an extra connection) may be the destination hanging
        // up after an `Abort` that says why.
        let io_failure = matches!(
            e,
            SendError::Protocol(ProtocolError::Io { .. } | ProtocolError::Closed)
        );
        let e = if (broken || io_failure) && !cancelled {
            self.peer_reason().unwrap_or(e)
        } else {
            e
        };
        let peer_knows = matches!(e, SendError::Refused(_) | SendError::PeerAborted(_));
        if !peer_knows && !broken {
            self.main.out.clear();
            let reason = e.to_string();
            if encode(&Message::Abort { reason: &reason }, &mut self.main.out).is_ok() {
                let _ = self.conn.get_mut().write_best_effort(&self.main.out);
            }
        }
        self.conn.get_ref().shutdown();
        self.unthrottle();
        if self.dirty_log_on {
            self.vm.stop_dirty_log();
        }
        if self.postcopy_started {
            // The VM ran on the destination: this copy is out of date and must stay
            // paused; only the pages the destination still misses are worth anything.
            log::error!("migration failed after the switch to postcopy: {e}");
            self.progress
                .fail(MigrationStatus::PostcopyPaused, &e.to_string());
            return e;
        }
        let e = if self.paused {
            match self.vm.resume() {
                Ok(()) => e,
                Err(reason) => SendError::ResumeFailed {
                    cause: Box::new(e),
                    reason,
                },
            }
        } else {
            e
        };
        let status = if cancelled {
            MigrationStatus::Cancelled
        } else {
            MigrationStatus::Failed
        };
        log::warn!("migration failed: {e}");
        self.progress.fail(status, &e.to_string());
        e
    }
}

pub(super) fn unexpected(msg: Message<'_>, during: &'static str) -> SendError {
    match msg {
        Message::Abort { reason } => SendError::PeerAborted(reason.to_string()),
        other => SendError::Unexpected {
            found: other.kind(),
            during,
        },
    }
}

/// End of the frame in `out` (whole frames from its start) that holds byte `at`, or `at`
/// itself when a frame starts there.
fn frame_end(out: &[u8], at: usize) -> usize {
    let mut end = 0;
    while end < at {
        let header = out
            .get(end..end + HEADER_LEN)
            .and_then(|h| Header::parse(h.try_into().ok()?).ok());
        match header {
            Some(h) => end += HEADER_LEN + h.payload_len as usize,
            // Not one of the frames queued here: cannot happen; send it all.
            None => return out.len(),
        }
    }
    end.min(out.len())
}

fn is_cancel_io(e: &SendError) -> bool {
    matches!(e, SendError::Protocol(ProtocolError::Io { source, .. }) if is_cancelled(source))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_run_of_the_queue_is_taken_once() {
        let runs: Vec<(u64, u32)> = (0..10_000u64).map(|i| (i << 12, 1)).collect();
        let queue = RunQueue::new(&runs);
        let mut taken: Vec<(u64, u32)> = std::thread::scope(|s| {
            let threads: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        let mut mine = Vec::new();
                        while let Some(r) = queue.take() {
                            mine.push(r);
                        }
                        mine
                    })
                })
                .collect();
            threads
                .into_iter()
                .flat_map(|t| t.join().unwrap())
                .collect()
        });
        taken.sort_unstable();
        assert_eq!(taken, runs);
        assert_eq!(queue.take_rest(), Vec::new());
        // What nobody took yet, once; then nothing.
        let queue = RunQueue::new(&runs[..5]);
        assert_eq!(queue.take(), Some(runs[0]));
        assert_eq!(queue.take_rest(), runs[1..5].to_vec());
        assert_eq!((queue.take(), queue.take_rest()), (None, Vec::new()));
    }

    #[test]
    fn auto_converge_aims_at_the_throttle_the_rates_call_for() {
        // No rates to go by, or a guest already well below the link: QEMU's ramp.
        assert_eq!(aimed_throttle(0, 0.0, 100_000.0), 20);
        assert_eq!(aimed_throttle(0, 50_000.0, 0.0), 20);
        assert_eq!(aimed_throttle(0, 10_000.0, 100_000.0), 20);
        assert_eq!(aimed_throttle(20, 10_000.0, 100_000.0), 30);
        assert_eq!(aimed_throttle(90, 10_000.0, 100_000.0), 99);
        assert_eq!(aimed_throttle(99, 10_000.0, 100_000.0), 99);
        // 220k pages/s dirtied against 150k sent, unthrottled: running at most
        // 0.75 * 150 / 220 = 51.1 % of the time, so 49 %.
        assert_eq!(aimed_throttle(0, 220_000.0, 150_000.0), 49);
        // The same rates measured at 40 %: 60 % of the time gave 220k, so 30.7 % is what
        // may run, 70 %.
        assert_eq!(aimed_throttle(40, 220_000.0, 150_000.0), 70);
        // Far beyond the link: the most there is.
        assert_eq!(aimed_throttle(0, 10_000_000.0, 1_000.0), 99);
        // Nonsense in, the ramp out.
        assert_eq!(aimed_throttle(30, f64::NAN, 1.0), 40);
        assert_eq!(aimed_throttle(30, f64::INFINITY, 1.0), 99);
    }

    #[test]
    fn convergence_goes_on_while_the_dirty_set_shrinks_and_fits() {
        let ms = Duration::from_millis;
        let mut c = Convergence::default();
        // Too slow to fit: go on, however it shrinks.
        assert!(!c.stop_now(ms(900), ms(300), 25_000, false));
        // Fits, and shrank to half: one more pass.
        assert!(!c.stop_now(ms(200), ms(300), 12_000, false));
        assert!(!c.stop_now(ms(60), ms(300), 4_000, false));
        // Shrinking still, 4 ms: more than a pause with nothing left costs, one more pass.
        assert!(!c.stop_now(ms(4), ms(300), 1_000, false));
        // Still more than that at 1 ms.
        assert!(!c.stop_now(ms(1), ms(300), 600, false));
        // Shrinking still, and now tiny: stop.
        assert!(c.stop_now(Duration::from_micros(400), ms(300), 300, false));

        // Fits but no longer shrinks (a steady dirty rate): stop.
        let mut c = Convergence::default();
        assert!(!c.stop_now(ms(100), ms(300), 10_000, false));
        assert!(c.stop_now(ms(90), ms(300), 9_000, false));

        // The same with auto-converge able to do more: another pass while the pause
        // would still be long, then stop once it would be short.
        let mut c = Convergence::default();
        assert!(!c.stop_now(ms(100), ms(300), 10_000, true));
        assert!(!c.stop_now(ms(90), ms(300), 9_000, true));
        assert!(c.stop_now(ms(18), ms(300), 8_900, true));

        // ... but only for a few passes: a set that throttling does not shrink ends anyway.
        let mut c = Convergence::default();
        assert!(!c.stop_now(ms(100), ms(300), 10_000, true));
        let mut extra = 0;
        while !c.stop_now(ms(90), ms(300), 9_900, true) {
            extra += 1;
        }
        assert_eq!(extra, MAX_SETTLING_STEPS);

        // Shrinking forever (slowly enough to count, never tiny) ends after the cap.
        let mut c = Convergence::default();
        let mut dirty = 1u64 << 40;
        let mut passes = 0;
        while !c.stop_now(ms(100), ms(300), dirty, true) {
            dirty /= 2;
            passes += 1;
        }
        assert_eq!(passes, MAX_PASSES_FITTING as usize);
    }

    #[test]
    fn the_fits_rule_switches_over_at_the_first_pass_that_fits() {
        let ms = Duration::from_millis;
        let mut c = Convergence {
            rule: SwitchOver::Fits,
            ..Convergence::default()
        };
        assert!(!c.stop_now(ms(900), ms(300), 25_000, true));
        assert!(!c.stop_now(ms(301), ms(300), 12_000, true));
        // Fits, though it still halves: the other rule would go on (above).
        assert!(c.stop_now(ms(200), ms(300), 6_000, true));
    }

    #[test]
    fn frame_end_finds_the_end_of_a_cut_frame() {
        let mut out = Vec::new();
        encode(&Message::ConfigAccepted, &mut out).unwrap();
        let first = out.len();
        encode_memory_chunk(0, &[7u8; 2 * PAGE_SIZE], &mut out).unwrap();
        let second = out.len();
        encode(&Message::ConfigAccepted, &mut out).unwrap();
        assert_eq!(frame_end(&out, 0), 0);
        assert_eq!(frame_end(&out, 1), first);
        assert_eq!(frame_end(&out, first), first);
        assert_eq!(frame_end(&out, first + 1), second);
        assert_eq!(frame_end(&out, second - 1), second);
        assert_eq!(frame_end(&out, second + 3), out.len());
        assert_eq!(frame_end(&out, out.len()), out.len());
    }
}
