//! The sending side: handshake, precopy passes, stop-and-copy, confirmation.

use std::io::{self, Write};
use std::time::{Duration, Instant};

use super::{
    HookResult, SourceVm, TimeoutStrategy, DEFAULT_CHUNK_PAGES, DEFAULT_CONFIRM_TIMEOUT,
    DEFAULT_IO_TIMEOUT,
};
use crate::page_set::PageSet;
use crate::protocol::{
    check_ram_layout, encode, encode_memory_chunk, Complete, Config, Header, Hello, Message,
    MessageReader, MessageType, ProtocolError, RamRange, HEADER_LEN, MAX_CHUNK_PAGES,
    MIN_PROTOCOL_VERSION, PAGE_SIZE, PROTOCOL_VERSION,
};
use crate::stats::{IterationStats, MigrationInfo, MigrationProgress, MigrationStatus};
use crate::transport::{is_cancelled, MigrationStream, Watched};

/// Encoded frames are written once this many bytes are queued: few, large writes.
const FLUSH_BYTES: usize = 1 << 20;
/// A pass shorter than this many bytes gives no reliable bandwidth figure.
const MIN_BYTES_FOR_BANDWIDTH: u64 = 1 << 20;
/// Wire bytes a dirty page is assumed to cost (as data, the worst case).
const BYTES_PER_DIRTY_PAGE: f64 = PAGE_SIZE as f64 + 1.0;

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
    #[error("{cause}; resuming the source VM then failed too: {reason}")]
    ResumeFailed {
        cause: Box<SendError>,
        reason: String,
    },
}

fn vm_err(op: &'static str) -> impl FnOnce(String) -> SendError {
    move |reason| SendError::Vm { op, reason }
}

fn hook<T>(op: &'static str, r: HookResult<T>) -> Result<T, SendError> {
    r.map_err(vm_err(op))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The guest runs; timeout and cancellation apply.
    Precopy,
    /// The guest is paused: send everything, as fast as possible.
    Downtime,
}

#[derive(Default)]
struct PassResult {
    pages: u64,
    bytes: u64,
    /// The timeout passed mid-pass under [`TimeoutStrategy::Ignore`].
    timed_out: bool,
}

struct Sender<'a, V: ?Sized, S: MigrationStream> {
    vm: &'a V,
    opts: &'a SendOptions,
    progress: &'a MigrationProgress,
    conn: MessageReader<Watched<S>>,
    /// Frames queued for the next write.
    out: Vec<u8>,
    /// Pages read from the guest, before encoding.
    scratch: Vec<u8>,
    started: Instant,
    dirty_log_on: bool,
    paused: bool,
    /// A write failed part-way: the stream is no longer at a frame boundary.
    broken: bool,
    /// Bytes per second, from the last pass big enough to measure.
    bandwidth: Option<f64>,
}

/// Migrates `vm` over `stream` (connected to a destination running
/// [`super::receive_migration`]), keeping `progress` current. Returns the final statistics
/// once the destination confirmed that the VM runs there; the source VM is then left
/// paused, for the vmm to tear down. On any error the source VM is resumed (if it had been
/// paused), dirty logging is stopped, the destination is told (`Abort`) when the stream
/// still works, and the error says what happened.
pub fn send_migration<V: SourceVm + ?Sized, S: MigrationStream>(
    vm: &V,
    stream: S,
    opts: &SendOptions,
    progress: &MigrationProgress,
) -> Result<MigrationInfo, SendError> {
    let watched = match Watched::new(stream, opts.io_timeout, progress.clone()) {
        Ok(w) => w,
        Err(e) => {
            let e = SendError::Stream(e);
            progress.fail(MigrationStatus::Failed, &e.to_string());
            return Err(e);
        }
    };
    let mut sender = Sender {
        vm,
        opts,
        progress,
        conn: MessageReader::new(watched),
        out: Vec::with_capacity(FLUSH_BYTES + MAX_CHUNK_PAGES as usize * PAGE_SIZE),
        scratch: Vec::new(),
        started: Instant::now(),
        dirty_log_on: false,
        paused: false,
        broken: false,
        bandwidth: None,
    };
    match sender.run() {
        Ok(()) => {
            vm.stop_dirty_log();
            progress.set_status(MigrationStatus::Completed);
            Ok(progress.snapshot())
        }
        Err(e) => Err(sender.fail(e)),
    }
}

impl<V: SourceVm + ?Sized, S: MigrationStream> Sender<'_, V, S> {
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

        self.handshake(&ram, &vm_config)?;
        hook("start_dirty_log", self.vm.start_dirty_log())?;
        self.dirty_log_on = true;
        let setup_ms = self.started.elapsed().as_millis() as u64;
        self.progress.update(|i| i.setup_time = Some(setup_ms));
        self.progress.set_status(MigrationStatus::Active);

        let mut pending = PageSet::new(&ram);
        pending.insert_all();
        let mut iteration = 0u32;
        loop {
            let pass_start = Instant::now();
            let pass = self.send_pass(iteration, &mut pending, Phase::Precopy)?;
            let dirty = hook("collect_dirty", self.vm.collect_dirty(false))?;
            for (gpa, len) in dirty {
                pending.insert_range(gpa, len);
            }
            let expected = self.record_pass(iteration, &pass, pass_start, pending.count());
            iteration += 1;
            if pass.timed_out || pending.is_empty() || expected <= self.opts.downtime {
                break;
            }
            if self.started.elapsed() >= self.opts.timeout {
                match self.opts.timeout_strategy {
                    TimeoutStrategy::Cancel => return Err(self.timed_out(pending.count())),
                    TimeoutStrategy::Ignore => break,
                }
            }
        }
        self.stop_and_copy(iteration, pending)
    }

    fn handshake(&mut self, ram: &[RamRange], vm_config: &[u8]) -> Result<(), SendError> {
        let build = super::build_string();
        self.send(&Message::Hello(Hello {
            version: PROTOCOL_VERSION,
            features: 0,
            build: &build,
        }))?;
        self.flush()?;
        match self.conn.read_message()? {
            Message::Hello(h) if h.version < MIN_PROTOCOL_VERSION => {
                return Err(SendError::PeerVersion {
                    peer: h.version,
                    min: MIN_PROTOCOL_VERSION,
                    max: PROTOCOL_VERSION,
                })
            }
            Message::Hello(h) => log::info!(
                "migration destination: {} (protocol {})",
                h.build,
                h.version
            ),
            other => return Err(unexpected(other, "waiting for Hello")),
        }
        self.send(&Message::Config(Config {
            ram: ram.to_vec(),
            vm_config,
        }))?;
        self.flush()?;
        // Building the destination VM may take longer than an ordinary read.
        self.conn.get_mut().set_idle(self.opts.confirm_timeout);
        let reply = match self.conn.read_message()? {
            Message::ConfigAccepted => Ok(()),
            Message::Refused { reason } => Err(SendError::Refused(reason.to_string())),
            other => Err(unexpected(other, "waiting for ConfigAccepted")),
        };
        self.conn.get_mut().set_idle(self.opts.io_timeout);
        reply
    }

    /// Sends every page in `pending` (emptying it), then `IterationDone`.
    fn send_pass(
        &mut self,
        iteration: u32,
        pending: &mut PageSet,
        phase: Phase,
    ) -> Result<PassResult, SendError> {
        let chunk_pages = self.opts.chunk_pages.clamp(1, MAX_CHUNK_PAGES);
        let runs = pending.take_runs(chunk_pages);
        let mut left: u64 = runs.iter().map(|r| u64::from(r.1)).sum();
        let mut pass = PassResult::default();
        for (i, &(gpa, pages)) in runs.iter().enumerate() {
            if self.progress.is_cancelled() {
                return Err(SendError::Cancelled);
            }
            if phase == Phase::Precopy && self.started.elapsed() >= self.opts.timeout {
                match self.opts.timeout_strategy {
                    TimeoutStrategy::Cancel => return Err(self.timed_out(left)),
                    TimeoutStrategy::Ignore => {
                        // Switch over now; the unsent pages go into the final pass.
                        for &(g, p) in &runs[i..] {
                            pending.insert_range(g, u64::from(p) * PAGE_SIZE as u64);
                        }
                        pass.timed_out = true;
                        break;
                    }
                }
            }
            let len = pages as usize * PAGE_SIZE;
            if self.scratch.len() < len {
                self.scratch.resize(len, 0);
            }
            hook(
                "read_pages",
                self.vm.read_pages(gpa, &mut self.scratch[..len]),
            )?;
            let before = self.out.len();
            let counts = encode_memory_chunk(gpa, &self.scratch[..len], &mut self.out)?;
            let bytes = (self.out.len() - before) as u64;
            pass.pages += u64::from(pages);
            pass.bytes += bytes;
            left -= u64::from(pages);
            self.progress.update(|i| {
                i.ram.duplicate += u64::from(counts.zero_pages);
                i.ram.normal += u64::from(counts.data_pages);
                i.ram.normal_bytes += u64::from(counts.data_pages) * PAGE_SIZE as u64;
                i.ram.transferred += bytes;
                match phase {
                    Phase::Precopy => i.ram.precopy_bytes += bytes,
                    Phase::Downtime => i.ram.downtime_bytes += bytes,
                }
                i.ram.remaining = (left + pending.count()) * PAGE_SIZE as u64;
            });
            if self.out.len() >= FLUSH_BYTES {
                self.flush()?;
            }
        }
        self.send(&Message::IterationDone {
            iteration,
            pages: pass.pages,
            bytes: pass.bytes,
        })?;
        self.flush()?;
        Ok(pass)
    }

    /// Records a finished pass; returns the downtime the dirty pages would cost now.
    fn record_pass(
        &mut self,
        iteration: u32,
        pass: &PassResult,
        pass_start: Instant,
        dirty_pages: u64,
    ) -> Duration {
        let secs = pass_start.elapsed().as_secs_f64().max(1e-6);
        if pass.bytes >= MIN_BYTES_FOR_BANDWIDTH || self.bandwidth.is_none() {
            self.bandwidth = Some(pass.bytes as f64 / secs);
        }
        let bandwidth = self.bandwidth.unwrap_or(f64::MAX).max(1.0);
        let expected =
            Duration::from_secs_f64(dirty_pages as f64 * BYTES_PER_DIRTY_PAGE / bandwidth);
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
            "migration pass {iteration}: {} pages, {} bytes in {:.1} ms; {dirty_pages} dirty, expected downtime {expected:?}",
            pass.pages,
            pass.bytes,
            secs * 1000.0
        );
        expected
    }

    fn stop_and_copy(&mut self, iteration: u32, mut pending: PageSet) -> Result<(), SendError> {
        self.progress.set_status(MigrationStatus::Device);
        let paused_at = Instant::now();
        hook("pause", self.vm.pause())?;
        self.paused = true;
        let dirty = hook("collect_dirty", self.vm.collect_dirty(true))?;
        for (gpa, len) in dirty {
            pending.insert_range(gpa, len);
        }
        let pass_start = Instant::now();
        let pass = self.send_pass(iteration, &mut pending, Phase::Downtime)?;
        self.record_pass(iteration, &pass, pass_start, 0);
        let (vcpus, devices) = hook("save_state", self.vm.save_state())?;
        self.send(&Message::State {
            vcpus: &vcpus,
            devices: &devices,
        })?;
        let state_bytes = self.out.len() as u64;
        self.progress.update(|i| {
            i.ram.transferred += state_bytes;
            i.ram.downtime_bytes += state_bytes;
        });
        let mut info = self.progress.snapshot();
        info.total_time = Some(self.started.elapsed().as_millis() as u64);
        let source_info = serde_json::to_vec(&info).unwrap_or_default();
        self.send(&Message::Complete(Complete {
            paused_us: paused_at.elapsed().as_micros() as u64,
            source_info: &source_info,
        }))?;
        self.flush()?;

        self.conn.get_mut().set_idle(self.opts.confirm_timeout);
        match self.conn.read_message()? {
            Message::Resumed { downtime_us } => {
                self.progress
                    .update(|i| i.downtime = Some(downtime_us.div_ceil(1000)));
                Ok(())
            }
            other => Err(unexpected(other, "waiting for Resumed")),
        }
    }

    /// After a failed write: the `Abort` the destination may have sent before closing.
    fn peer_reason(&mut self) -> Option<SendError> {
        self.conn.get_mut().set_idle(Duration::from_millis(300));
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

    /// Queues one message.
    fn send(&mut self, msg: &Message<'_>) -> Result<(), SendError> {
        encode(msg, &mut self.out)?;
        Ok(())
    }

    /// Writes the queued frames.
    fn flush(&mut self) -> Result<(), SendError> {
        if self.out.is_empty() {
            return Ok(());
        }
        // Not `write_all`: a cancelled write must say how far it got. (`Watched` retries
        // `Interrupted` itself, checking for cancellation each time.)
        let mut written = 0;
        let r = loop {
            match self.conn.get_mut().write(&self.out[written..]) {
                Ok(0) => break Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => {
                    written += n;
                    if written == self.out.len() {
                        break Ok(());
                    }
                }
                Err(e) => break Err(e),
            }
        };
        let r = r.map_err(|source| {
            // Cancelled: the link works, so end the frame cut short (if any) to leave the
            // stream at a frame boundary, where the destination can still read an `Abort`.
            let at_boundary = is_cancelled(&source)
                && self
                    .conn
                    .get_mut()
                    .write_best_effort(&self.out[written..frame_end(&self.out, written)])
                    .is_ok();
            self.broken = !at_boundary;
            ProtocolError::Io {
                op: "sending to the destination",
                source,
            }
            .into()
        });
        self.out.clear();
        r
    }

    /// Cleans up after `e`: tell the peer, stop logging, resume the VM, record the failure.
    fn fail(&mut self, e: SendError) -> SendError {
        let cancelled = self.progress.is_cancelled() || is_cancel_io(&e);
        let e = if cancelled { SendError::Cancelled } else { e };
        let e = if self.broken && !cancelled {
            self.peer_reason().unwrap_or(e)
        } else {
            e
        };
        let peer_knows = matches!(e, SendError::Refused(_) | SendError::PeerAborted(_));
        if !peer_knows && !self.broken {
            self.out.clear();
            let reason = e.to_string();
            if encode(&Message::Abort { reason: &reason }, &mut self.out).is_ok() {
                let _ = self.conn.get_mut().write_best_effort(&self.out);
            }
        }
        self.conn.get_ref().shutdown();
        if self.dirty_log_on {
            self.vm.stop_dirty_log();
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

fn unexpected(msg: Message<'_>, during: &'static str) -> SendError {
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
