//! The receiving side: handshake and configuration check, pages into guest RAM, state,
//! resume, confirmation. Nothing is resumed unless every page of RAM arrived with a good
//! checksum and the state was restored.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{DestinationVm, DEFAULT_RECEIVE_IDLE_TIMEOUT, TEST_SPARSE_NEVER_CLEARED_ENV};
use crate::page_set::PageSet;
use crate::priority::ThreadNice;
use crate::protocol::{
    encode, features, Hello, MemoryChunk, Message, MessageReader, MessageType, PageChunkDone,
    PageRun, PageSink, ProtocolError, RamRange, SparseChunk, PAGE_SIZE, PROTOCOL_VERSION,
};
use crate::stats::{IterationStats, MigrationInfo, MigrationProgress, MigrationStatus};
use crate::transport::{is_cancelled, is_halted, MigrationStream, Watched};

const PAGE: u64 = PAGE_SIZE as u64;

/// How long the main connection's reader stays awake after a pass's ack where the source
/// sends its state at the pause (`STATE_AT_PAUSE`): a source that pauses after reading the
/// ack sends `State` 0.2-0.4 ms later here, and a reader asleep by then is woken by it,
/// in the downtime (an interrupt to another CPU, then that CPU's wake-up: ~20-40 µs of
/// an idle guest's ~0.45 ms pause on this host). It yields to any thread runnable on its
/// CPU between looks and ends as soon as the next pass's bytes arrive; at most this much
/// CPU a pass where the source takes longer to go on (a slow collection, a throttle).
/// It spins at the switch-over thread's raised priority: at its own, the source's raised
/// threads (the pause's) held it off its CPU past the state's arrival (marks: 20-200 µs).
const SPIN_AFTER_ACK: Duration = Duration::from_millis(1);

/// How a migration is received.
#[derive(Clone, Debug)]
pub struct ReceiveOptions {
    /// The source counts as gone when no byte arrives for this long.
    pub idle_timeout: Duration,
    /// The optional protocol features this side may offer (default: all it implements;
    /// fewer: behave as an older destination, e.g. to test a source's older encodings).
    pub features: u64,
}

impl Default for ReceiveOptions {
    fn default() -> Self {
        ReceiveOptions {
            idle_timeout: DEFAULT_RECEIVE_IDLE_TIMEOUT,
            features: features::ALL,
        }
    }
}

/// Why an incoming migration failed. The VM was not resumed, except after
/// [`ReceiveError::ConfirmationFailed`] and [`ReceiveError::SourceResumed`].
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("this host cannot run the source's VM: {0}")]
    ConfigRefused(String),
    #[error("the source aborted the migration: {0}")]
    PeerAborted(String),
    #[error("unexpected {found} message from the source while {during}")]
    Unexpected {
        found: MessageType,
        during: &'static str,
    },
    #[error("memory chunk of {pages} pages at gpa {gpa:#x} is not inside one guest RAM range")]
    OutsideRam { gpa: u64, pages: u32 },
    #[error("the source completed without sending page {first_gpa:#x} ({missing} of {total} RAM pages never arrived)")]
    MissingPages {
        first_gpa: u64,
        missing: u64,
        total: u64,
    },
    #[error("the source completed without sending the machine state")]
    MissingState,
    #[error("the source sent {0} twice")]
    Duplicate(MessageType),
    #[error("postcopy: the source sent the page at {gpa:#x} a second time")]
    PostcopyPageTwice { gpa: u64 },
    #[error(
        "postcopy stopped ({reason}): the VM is paused here with {missing} pages still at \
         the source; neither side may run it alone"
    )]
    PostcopyPaused { missing: u64, reason: String },
    #[error("extra connection {index}: {reason}")]
    Channel { index: u16, reason: String },
    #[error("the source's memory files: {0}")]
    MemoryFiles(String),
    #[error("destination VM: {op} failed: {reason}")]
    Vm { op: &'static str, reason: String },
    #[error("migration cancelled")]
    Cancelled,
    #[error("cannot use the migration stream: {0}")]
    Stream(io::Error),
    #[error(
        "the VM was resumed here but the confirmation could not be sent ({0}); the source will \
         resume its own copy, so this one must be stopped"
    )]
    ConfirmationFailed(ProtocolError),
    #[error(
        "the VM was resumed here, but the source gave up before the confirmation reached it \
         ({0}) and runs its own copy, so this one must be stopped"
    )]
    SourceResumed(String),
}

pub(super) fn vm_err(op: &'static str) -> impl FnOnce(String) -> ReceiveError {
    move |reason| ReceiveError::Vm { op, reason }
}

/// Accepts the next connection of this migration within the given time (extra
/// connections, see [`receive_migration_from`]).
pub type AcceptChannel<'a, S> = &'a mut dyn FnMut(Duration) -> io::Result<S>;

/// Receives a migration from `stream` (accepted from a source running
/// [`super::send_migration`]) into `vm`, keeping `progress` current. Returns once the VM runs
/// here and the source was told; the statistics are then the source's, with the downtime
/// the source measured from its pause to `Resumed` (or, from an older source, the sum of
/// its pause before `Complete` and the time to resume here). On error nothing was resumed
/// (see [`ReceiveError::ConfirmationFailed`] and [`ReceiveError::SourceResumed`] for the
/// exceptions), the source was told when possible, and the vmm should discard the
/// half-built VM.
pub fn receive_migration<V: DestinationVm + Sync + ?Sized, S: MigrationStream>(
    vm: &mut V,
    stream: S,
    opts: &ReceiveOptions,
    progress: &MigrationProgress,
) -> Result<MigrationInfo, ReceiveError> {
    receive_migration_from(vm, stream, None, opts, progress)
}

/// [`receive_migration`], taking extra connections for memory from `accept` when the
/// source offers them (without `accept`, the source is told to use one connection).
pub fn receive_migration_from<V: DestinationVm + Sync + ?Sized, S: MigrationStream>(
    vm: &mut V,
    stream: S,
    accept: Option<AcceptChannel<'_, S>>,
    opts: &ReceiveOptions,
    progress: &MigrationProgress,
) -> Result<MigrationInfo, ReceiveError> {
    let halt = Arc::new(AtomicBool::new(false));
    let watched = match Watched::new(stream, opts.idle_timeout, progress.clone()) {
        Ok(w) => w.with_halt(halt.clone()),
        Err(e) => {
            let e = ReceiveError::Stream(e);
            progress.fail(MigrationStatus::Failed, &e.to_string());
            return Err(e);
        }
    };
    let mut conn = MessageReader::new(watched);
    let session = Session {
        opts,
        progress,
        halt,
        lane_error: Mutex::new(None),
    };
    let result = session.receive(vm, &mut conn, accept);
    if let Err(e) = result {
        let cancelled = progress.is_cancelled() || is_cancel_io(&e);
        let e = if cancelled {
            ReceiveError::Cancelled
        } else {
            e
        };
        if let ReceiveError::PostcopyPaused { .. } = e {
            // The source's pages are still needed: leave the link to it as it is (it is
            // broken anyway) and say so.
            conn.get_ref().shutdown();
            log::error!("incoming migration: {e}");
            progress.fail(MigrationStatus::PostcopyPaused, &e.to_string());
            return Err(e);
        }
        let peer_knows = matches!(
            e,
            ReceiveError::PeerAborted(_) | ReceiveError::SourceResumed(_)
        );
        let told = matches!(
            e,
            ReceiveError::ConfirmationFailed(_) | ReceiveError::ConfigRefused(_)
        );
        if !peer_knows && !told {
            let reason = e.to_string();
            let mut frame = Vec::new();
            if encode(&Message::Abort { reason: &reason }, &mut frame).is_ok() {
                let _ = conn.get_mut().write_best_effort(&frame);
            }
        }
        conn.get_ref().shutdown();
        log::warn!("incoming migration failed: {e}");
        let status = if cancelled {
            MigrationStatus::Cancelled
        } else {
            MigrationStatus::Failed
        };
        progress.fail(status, &e.to_string());
        return Err(e);
    }
    Ok(progress.snapshot())
}

fn send<S: MigrationStream>(
    conn: &mut MessageReader<Watched<S>>,
    msg: &Message<'_>,
) -> Result<(), ProtocolError> {
    crate::protocol::write_message(conn.get_mut(), msg)
}

/// [`send`] for the postcopy module.
pub(super) fn send_plain<S: MigrationStream>(
    conn: &mut MessageReader<Watched<S>>,
    msg: &Message<'_>,
) -> Result<(), ProtocolError> {
    send(conn, msg)
}

/// Tells the source the VM runs here.
pub(super) fn send_resumed<S: MigrationStream>(
    conn: &mut MessageReader<Watched<S>>,
    downtime_us: u64,
) -> Result<(), ReceiveError> {
    send(conn, &Message::Resumed { downtime_us }).map_err(ReceiveError::ConfirmationFailed)?;
    let _ = conn.get_mut().flush();
    Ok(())
}

/// Sends `msg` during the session. When that fails, the source may have closed the stream
/// right after an `Abort` (it was cancelled, or gave up): that reason is the error then.
fn send_step<S: MigrationStream>(
    conn: &mut MessageReader<Watched<S>>,
    msg: &Message<'_>,
) -> Result<(), ReceiveError> {
    send(conn, msg).map_err(|e| {
        let cancelled_here = matches!(&e, ProtocolError::Io { source, .. } if is_cancelled(source));
        let reason = if cancelled_here {
            None
        } else {
            peer_abort(conn)
        };
        reason.unwrap_or(ReceiveError::Protocol(e))
    })
}

/// After a failed write: the `Abort` the source may have sent before closing.
fn peer_abort<S: MigrationStream>(conn: &mut MessageReader<Watched<S>>) -> Option<ReceiveError> {
    conn.get_mut().set_idle(Duration::from_millis(300));
    let deadline = Instant::now() + Duration::from_millis(500);
    while Instant::now() < deadline {
        match conn.read_message() {
            Ok(Message::Abort { reason }) => {
                return Some(ReceiveError::PeerAborted(reason.to_string()))
            }
            Ok(_) => {}
            Err(_) => return None,
        }
    }
    None
}

/// [`peer_abort`] on a connection whose halt flag is set: reads without it.
fn peer_abort_unhalted<S: MigrationStream>(
    conn: &mut MessageReader<Watched<S>>,
) -> Option<ReceiveError> {
    conn.get_mut().set_halt_ignored(true);
    let r = peer_abort(conn);
    conn.get_mut().set_halt_ignored(false);
    r
}

fn unexpected(msg: Message<'_>, during: &'static str) -> ReceiveError {
    match msg {
        Message::Abort { reason } => ReceiveError::PeerAborted(reason.to_string()),
        other => ReceiveError::Unexpected {
            found: other.kind(),
            during,
        },
    }
}

/// One incoming migration: its options and what its connections share.
struct Session<'a> {
    opts: &'a ReceiveOptions,
    progress: &'a MigrationProgress,
    /// Set when any connection failed (or the migration ended): the others stop waiting.
    halt: Arc<AtomicBool>,
    /// The first failure of an extra connection: the cause, where the main connection
    /// only saw the halt.
    lane_error: Mutex<Option<ReceiveError>>,
}

/// What the main connection received by `Complete`.
struct Received {
    /// The source switched to postcopy (`PostcopyRun`) instead of `Complete`.
    postcopy: bool,
    paused_us: u64,
    source_info: Vec<u8>,
    state: Option<(Vec<u8>, Vec<u8>)>,
    /// Raised from the pause's `State` until `Resumed` is sent.
    priority: Option<ThreadNice>,
    /// When `State` was read and when it was loaded (`prepare_state`), for the log:
    /// whether loading it held up `Complete`.
    state_loaded: Option<(Instant, Instant)>,
}

impl Session<'_> {
    fn receive<V: DestinationVm + Sync + ?Sized, S: MigrationStream>(
        &self,
        vm: &mut V,
        conn: &mut MessageReader<Watched<S>>,
        mut accept: Option<AcceptChannel<'_, S>>,
    ) -> Result<(), ReceiveError> {
        let progress = self.progress;
        progress.set_status(MigrationStatus::Setup);
        let local = conn.get_ref().get_ref().can_pass_fds();
        let source_features = match conn.read_message()? {
            Message::Hello(h) => {
                log::info!("migration source: {} (protocol {})", h.build, h.version);
                h.features
            }
            other => return Err(unexpected(other, "waiting for Hello")),
        };
        let build = super::build_string();
        let mut offered = 0;
        if accept.is_some() {
            offered |= features::PARALLEL_CHANNELS | features::LANES_RETIRE;
        }
        if local {
            offered |= features::LOCAL_MEMORY;
        }
        offered |= features::SPARSE_PAGES
            | features::PASS_ACKS
            | features::SOURCE_MEASURES
            | features::PAGE_CHUNKS
            | features::BINARY_STATE
            | features::STATE_AT_PAUSE;
        offered &= self.opts.features;
        // Postcopy asks for pages on a second handle of this connection, while this one
        // reads the page stream; RAM handed over as files needs none of it.
        let mut postcopy_writer = None;
        if vm.supports_postcopy()
            && !local
            && source_features & self.opts.features & features::POSTCOPY != 0
        {
            match conn.get_ref().get_ref().try_clone_stream() {
                Ok(w) => {
                    postcopy_writer = Some(w);
                    offered |= features::POSTCOPY;
                }
                Err(e) => log::info!("no postcopy on this connection: {e}"),
            }
        }
        let both = |f: u64| source_features & offered & f != 0;
        let acks = both(features::PASS_ACKS);
        // What this side offered is all it takes: a source must not send the others.
        let takes = offered;
        let source_measures = both(features::SOURCE_MEASURES);
        send_step(
            conn,
            &Message::Hello(Hello {
                version: PROTOCOL_VERSION,
                features: offered,
                build: &build,
            }),
        )?;

        // On one host the RAM may come as files, before the configuration.
        let mut files_layout = None;
        let config_msg = match conn.read_message()? {
            Message::MemoryFds(entries) if local => {
                let entries = entries.clone();
                let fds = conn.get_mut().get_mut().take_fds();
                if fds.len() != entries.len() {
                    return Err(ReceiveError::MemoryFiles(format!(
                        "{} files announced, {} file descriptors arrived",
                        entries.len(),
                        fds.len()
                    )));
                }
                files_layout = Some(
                    entries
                        .iter()
                        .map(|e| RamRange {
                            gpa: e.gpa,
                            size: e.size,
                        })
                        .collect::<Vec<_>>(),
                );
                vm.adopt_memory(entries.into_iter().zip(fds).collect())
                    .map_err(ReceiveError::MemoryFiles)?;
                conn.read_message()?
            }
            other => other,
        };
        let ram = match config_msg {
            Message::Config(c) => {
                let checked = vm.check_config(c.vm_config, &c.ram).and_then(|built| {
                    if built != c.ram {
                        Err(format!(
                            "the RAM layout built here {built:x?} differs from the source's {:x?}",
                            c.ram
                        ))
                    } else if files_layout.as_ref().is_some_and(|f| *f != c.ram) {
                        Err(format!(
                            "the memory files {files_layout:x?} do not cover the RAM layout {:x?}",
                            c.ram
                        ))
                    } else {
                        Ok(c.ram)
                    }
                });
                match checked {
                    Ok(ram) => ram,
                    Err(reason) => {
                        send_step(conn, &Message::Refused { reason: &reason })?;
                        return Err(ReceiveError::ConfigRefused(reason));
                    }
                }
            }
            other => return Err(unexpected(other, "waiting for Config")),
        };
        send_step(conn, &Message::ConfigAccepted)?;
        let total: u64 = ram.iter().map(|r| r.size).sum();
        progress.update(|i| i.ram.total = total);
        progress.set_status(MigrationStatus::Active);

        let mut pages = Pages {
            received: PageSet::new(&ram),
            written: PageSet::new(&ram),
        };
        if files_layout.is_some() {
            // The RAM is the source's own memory: every page is here already.
            pages.received.insert_all();
        }
        let shared = Shared {
            vm: &*vm,
            pages: Mutex::new(pages),
            barrier: PassBarrier::default(),
            progress,
            copy_allowed: files_layout.is_none(),
            takes,
            lanes_retire: both(features::LANES_RETIRE),
            sparse_never_cleared: sparse_never_cleared(),
            warm_ups: acks && both(features::STATE_AT_PAUSE),
        };
        let received = std::thread::scope(|s| {
            let r = self.main_loop(
                s,
                &shared,
                conn,
                &mut accept,
                acks,
                postcopy_writer.is_some(),
            );
            // Success or not, the extra connections are done: end their threads, those
            // reading (the halt flag) and those waiting at a pass barrier the main
            // connection will never reach (it failed, or completed without that pass's
            // `IterationDone`), or the scope would wait for them forever.
            self.halt.store(true, Ordering::Relaxed);
            shared.barrier.fail();
            r
        });
        // The main connection goes on (`Resumed`, or the peer's `Abort`).
        conn.get_mut().set_halt_ignored(true);
        let received = match received {
            Ok(r) => r,
            Err(e) => {
                let lane = self
                    .lane_error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take();
                return Err(lane.unwrap_or(e));
            }
        };
        let complete_at = Instant::now();
        let pages = shared.pages.into_inner().unwrap_or_else(|p| p.into_inner());
        if received.postcopy {
            let (Some(writer), Some(state)) = (postcopy_writer, received.state) else {
                return Err(ReceiveError::MissingState);
            };
            let start = super::postcopy::PostcopyStart {
                writer,
                received: pages.received,
                state,
                paused_us: received.paused_us,
                idle_timeout: self.opts.idle_timeout,
                source_measures,
            };
            super::postcopy::run_destination(vm, conn, start, accept, progress)?;
            // Not `set_status`: `total-time` is the source's (from its start to its last
            // page), not this side's wait since the receive began.
            progress.update(|i| i.status = MigrationStatus::Completed);
            return Ok(());
        }

        // Everything arrived and every checksum matched: only now may the VM run.
        let missing = pages.received.total_pages() - pages.received.count();
        if let Some(first_gpa) = pages.received.first_missing() {
            return Err(ReceiveError::MissingPages {
                first_gpa,
                missing,
                total: pages.received.total_pages(),
            });
        }
        let (vcpus, devices) = received.state.ok_or(ReceiveError::MissingState)?;
        vm.restore_state(&vcpus, &devices)
            .map_err(vm_err("restore_state"))?;
        let restored_at = Instant::now();
        vm.resume().map_err(vm_err("resume"))?;
        let resumed_at = Instant::now();
        let downtime_us = received
            .paused_us
            .saturating_add(complete_at.elapsed().as_micros() as u64);
        // The source's downtime ends when this arrives: sent before the log line and the
        // report below (~0.05 ms here, parsing the source's figures).
        let confirmed = send(conn, &Message::Resumed { downtime_us });
        let _ = conn.get_mut().flush();
        drop(received.priority);
        let ms = |a: Instant, b: Instant| b.duration_since(a).as_secs_f64() * 1000.0;
        // Loaded ahead of `Complete`, the state took no downtime of its own; loaded as
        // `Complete` was read, it held it up.
        let early = received
            .state_loaded
            .map(|(read, loaded)| {
                format!(
                    "; read {:.2} ms before Complete, loaded in {:.2} ms",
                    ms(read, complete_at),
                    ms(read, loaded)
                )
            })
            .unwrap_or_default();
        log::info!(
            "resumed {:.1} ms after Complete (the source had been paused {:.1} ms by then; \
             state {:.2} ms{early}, VM started in {:.2} ms, Resumed sent in {:.2} ms)",
            complete_at.elapsed().as_secs_f64() * 1000.0,
            received.paused_us as f64 / 1000.0,
            ms(complete_at, restored_at),
            ms(restored_at, resumed_at),
            resumed_at.elapsed().as_secs_f64() * 1000.0
        );

        // Report the source's figures (the source exits), with the downtime measured here.
        let mut info = serde_json::from_slice::<MigrationInfo>(&received.source_info)
            .unwrap_or_else(|_| progress.snapshot());
        info.set_downtime_us(downtime_us);
        info.ram.remaining = 0;
        info.expected_downtime = None;
        info.error_desc = None;
        // The source's total time ran to `Complete`; the rest is the resume here. (Not this
        // side's own clock: it started when the destination began to wait for a source.)
        info.total_time = info
            .total_time
            .map(|t| t + complete_at.elapsed().as_millis() as u64);
        info.status = MigrationStatus::Completed;
        progress.replace(info);
        confirmed.map_err(ReceiveError::ConfirmationFailed)?;
        if source_measures {
            self.take_measures(conn)?;
        }
        Ok(())
    }

    /// Reads the source's `Measured` and reports its figures. An `Abort` instead means
    /// the source gave up before `Resumed` reached it and runs the VM itself.
    fn take_measures<S: MigrationStream>(
        &self,
        conn: &mut MessageReader<Watched<S>>,
    ) -> Result<(), ReceiveError> {
        match conn.read_message() {
            Ok(Message::Measured {
                downtime_us,
                total_us,
            }) => {
                log::info!(
                    "the source measured the pause at {:.1} ms (pause to Resumed) and the \
                     migration at {:.1} ms",
                    downtime_us as f64 / 1000.0,
                    total_us as f64 / 1000.0
                );
                self.progress
                    .update(|i| i.take_measured(downtime_us, total_us));
                Ok(())
            }
            Ok(Message::Abort { reason }) => Err(ReceiveError::SourceResumed(reason.to_string())),
            Ok(other) => {
                log::warn!(
                    "expected the source's Measured after Resumed, got {}: keeping this \
                     side's downtime estimate",
                    other.kind()
                );
                Ok(())
            }
            Err(e) => {
                log::warn!(
                    "the source's Measured did not arrive ({e}): keeping this side's downtime \
                     estimate"
                );
                Ok(())
            }
        }
    }

    /// The main connection from `ConfigAccepted` to `Complete`; starts a thread per extra
    /// connection in `scope` when the source announces them.
    fn main_loop<'scope, 'env, V: DestinationVm + Sync + ?Sized, S: MigrationStream + 'env>(
        &'env self,
        scope: &'scope std::thread::Scope<'scope, 'env>,
        shared: &'env Shared<'env, V>,
        conn: &mut MessageReader<Watched<S>>,
        accept: &mut Option<AcceptChannel<'_, S>>,
        acks: bool,
        postcopy: bool,
    ) -> Result<Received, ReceiveError> {
        let progress = self.progress;
        let mut state: Option<(Vec<u8>, Vec<u8>)> = None;
        let mut state_loaded = None;
        let mut priority = None;
        let mut awake: Option<ThreadNice> = None;
        let mut last_iteration = Instant::now();
        let mut lanes_open = false;
        let mut anything_received = false;
        let mut sparse = SparseScratch::default();
        let mut warm_ups = WarmUps::default();
        loop {
            let mut sink = ChunkSink { shared };
            let msg = match conn.read_message_with(&mut sink) {
                Ok(Some(m)) => m,
                Ok(None) => {
                    // A page chunk, stored.
                    anything_received = true;
                    awake = None;
                    continue;
                }
                Err(e @ ReceiveError::Protocol(_)) => {
                    return Err(self.peer_reason(conn).unwrap_or(e))
                }
                Err(e) => return Err(e),
            };
            if !matches!(msg, Message::State { .. }) {
                awake = None;
            }
            match msg {
                Message::Channels { count, token } if !lanes_open && !anything_received => {
                    let lanes = self.accept_lanes(accept, count, token)?;
                    shared.barrier.set_lanes(usize::from(count) + 1);
                    for (i, lane) in lanes.into_iter().enumerate() {
                        let index = i as u16 + 1;
                        let spawned = std::thread::Builder::new()
                            .name(format!("mig-recv-{index}"))
                            .spawn_scoped(scope, move || {
                                ferry_seccomp::install_or_exit(
                                    ferry_seccomp::ThreadKind::MigrationReceiver,
                                );
                                if let Err(reason) = lane_loop(shared, lane) {
                                    let e = ReceiveError::Channel { index, reason };
                                    self.lane_failed(shared, e);
                                }
                            });
                        if let Err(e) = spawned {
                            let reason = format!("starting its receiving thread: {e}");
                            return Err(ReceiveError::Channel { index, reason });
                        }
                    }
                    lanes_open = true;
                    send_step(conn, &Message::ChannelsReady)?;
                    log::info!("receiving memory over {} connections", count + 1);
                }
                Message::MemoryChunk(chunk) => {
                    anything_received = true;
                    shared.store(&chunk, chunk_wire_bytes(&chunk))?;
                }
                Message::SparseChunk(chunk) => {
                    anything_received = true;
                    shared.store_sparse(&chunk, &mut sparse)?;
                }
                Message::PageChunk(chunk) => {
                    anything_received = true;
                    chunk.apply(&mut ChunkSink { shared })?;
                }
                Message::IterationDone {
                    iteration,
                    pages: n,
                    bytes,
                } => {
                    anything_received = true;
                    let (n, bytes) = match shared.barrier.arrive(iteration, n, bytes) {
                        Ok(totals) => totals,
                        Err(reason) => {
                            let e = ReceiveError::Channel { index: 0, reason };
                            return Err(self.peer_reason(conn).unwrap_or(e));
                        }
                    };
                    // Every connection's share of pass 0 is stored: what is missing now
                    // comes later. Taken before the ack, after which pass 1 may arrive.
                    let missing = (iteration == 0)
                        .then(|| shared.pages().received.missing_runs(u32::MAX))
                        .filter(|m| !m.is_empty());
                    if state.is_none() {
                        // Before the ack (also so that the ack's wake-up of the source
                        // does not take this thread's CPU in the middle of it).
                        if shared.warm_ups {
                            warm_ups.after_pass(shared.vm);
                        }
                        // Not for the pass after the pause's `State` (the final one, which
                        // the source does not wait for): its send would be downtime.
                        if acks {
                            send_step(conn, &Message::PassReceived { iteration })?;
                        }
                    }
                    if let Some(missing) = missing {
                        shared.vm.expect_pages(missing);
                    }
                    let ms = last_iteration.elapsed().as_millis() as u64;
                    last_iteration = Instant::now();
                    progress.update(|i| {
                        i.iterations.push(IterationStats {
                            iteration,
                            pages: n,
                            bytes,
                            duration_ms: ms,
                            dirty_pages: 0,
                        });
                        i.ram.dirty_sync_count += 1;
                    });
                    if shared.warm_ups && state.is_none() {
                        awake = ThreadNice::raise_current(
                            "the migration destination's reader, awake for the state",
                        );
                        if !conn.get_ref().get_ref().spin_until_readable(SPIN_AFTER_ACK) {
                            awake = None;
                        }
                    }
                }
                Message::State { vcpus, devices } => {
                    if state.is_some() {
                        return Err(ReceiveError::Duplicate(MessageType::State));
                    }
                    let read_at = Instant::now();
                    progress.set_status(MigrationStatus::Device);
                    // The source is paused: from here on this thread's work is downtime.
                    priority = awake.take().or_else(|| {
                        ThreadNice::raise_current("the migration destination's switch-over thread")
                    });
                    shared
                        .vm
                        .prepare_state(vcpus, devices)
                        .map_err(vm_err("prepare_state"))?;
                    state = Some((vcpus.to_vec(), devices.to_vec()));
                    state_loaded = Some((read_at, Instant::now()));
                }
                Message::PostcopyDiscard(runs) if postcopy => {
                    anything_received = true;
                    let mut p = shared.pages();
                    for (gpa, pages) in runs {
                        if !p.received.contains_range(gpa, u64::from(pages)) {
                            return Err(ReceiveError::OutsideRam { gpa, pages });
                        }
                        p.received.remove_range(gpa, u64::from(pages));
                    }
                }
                Message::PostcopyRun { paused_us } if postcopy => {
                    return Ok(Received {
                        postcopy: true,
                        paused_us,
                        source_info: Vec::new(),
                        state,
                        // Postcopy runs long after: at the usual priority.
                        priority: None,
                        state_loaded,
                    });
                }
                Message::Complete(c) => {
                    return Ok(Received {
                        postcopy: false,
                        paused_us: c.paused_us,
                        source_info: c.source_info.to_vec(),
                        state,
                        priority: priority.or_else(|| {
                            ThreadNice::raise_current(
                                "the migration destination's switch-over thread",
                            )
                        }),
                        state_loaded,
                    })
                }
                other => return Err(unexpected(other, "receiving memory")),
            }
        }
    }

    /// After the main connection failed: an `Abort` the source sent, when that is why.
    fn peer_reason<S: MigrationStream>(
        &self,
        conn: &mut MessageReader<Watched<S>>,
    ) -> Option<ReceiveError> {
        if self.progress.is_cancelled() {
            return None;
        }
        if self.halt.load(Ordering::Relaxed) {
            // An extra connection failed first (that error is reported), or the source
            // gave up: its `Abort` on the main connection says why.
            return peer_abort_unhalted(conn);
        }
        None
    }

    /// Records the first failure of an extra connection and stops the others.
    fn lane_failed<V: ?Sized>(&self, shared: &Shared<'_, V>, e: ReceiveError) {
        let mut first = self.lane_error.lock().unwrap_or_else(|p| p.into_inner());
        if first.is_none() && !self.halt.load(Ordering::Relaxed) {
            log::warn!("{e}");
            *first = Some(e);
        }
        self.halt.store(true, Ordering::Relaxed);
        shared.barrier.fail();
    }

    /// Accepts the `count` extra connections the source announced, in any order, each
    /// introduced by a `ChannelHello` with this migration's `token`.
    fn accept_lanes<S: MigrationStream>(
        &self,
        accept: &mut Option<AcceptChannel<'_, S>>,
        count: u16,
        token: u64,
    ) -> Result<Vec<MessageReader<Watched<S>>>, ReceiveError> {
        let Some(accept) = accept.as_mut() else {
            return Err(ReceiveError::Unexpected {
                found: MessageType::Channels,
                during: "receiving memory (extra connections were not offered)",
            });
        };
        let mut lanes: Vec<Option<MessageReader<Watched<S>>>> = (0..count).map(|_| None).collect();
        for _ in 0..count {
            let chan_err = |index, reason: String| ReceiveError::Channel { index, reason };
            let stream = accept(self.opts.idle_timeout)
                .map_err(|e| chan_err(0, format!("accepting it: {e}")))?;
            let watched = Watched::new(stream, self.opts.idle_timeout, self.progress.clone())
                .map_err(|e| chan_err(0, e.to_string()))?
                .with_halt(self.halt.clone());
            let mut lane = MessageReader::new(watched);
            let (index, got) = match lane.read_message() {
                Ok(Message::ChannelHello { index, token: t }) => (index, t),
                Ok(other) => {
                    return Err(chan_err(
                        0,
                        format!("opened with {} instead of ChannelHello", other.kind()),
                    ))
                }
                Err(e) => return Err(chan_err(0, e.to_string())),
            };
            if got != token {
                return Err(chan_err(
                    index,
                    format!("token {got:#x} is not this migration's ({token:#x})"),
                ));
            }
            match lanes.get_mut(usize::from(index) - 1) {
                Some(slot @ None) => *slot = Some(lane),
                Some(Some(_)) => return Err(chan_err(index, "opened twice".into())),
                None => return Err(chan_err(index, format!("only {count} were announced"))),
            }
        }
        Ok(lanes.into_iter().flatten().collect())
    }
}

/// An extra connection: memory chunks and its `IterationDone`s until the source closes it.
fn lane_loop<S: MigrationStream, V: DestinationVm + Sync + ?Sized>(
    shared: &Shared<'_, V>,
    mut lane: MessageReader<Watched<S>>,
) -> Result<(), String> {
    let mut sparse = SparseScratch::default();
    // Whether a pass's chunks came since its last `IterationDone` (or none ended yet):
    // closed then, the connection left a pass unfinished; closed between passes, it
    // retired (where both sides agreed to that, else it ends the migration's passes).
    let mut mid_pass = true;
    loop {
        let mut sink = ChunkSink { shared };
        let msg = match lane.read_message_with(&mut sink) {
            // A page chunk, stored as it came.
            Ok(None) => {
                mid_pass = true;
                continue;
            }
            Ok(Some(msg)) => Ok(msg),
            Err(ReceiveError::Protocol(e)) => Err(e),
            Err(e) => return Err(e.to_string()),
        };
        match msg {
            Ok(Message::PageChunk(chunk)) => {
                mid_pass = true;
                chunk
                    .apply(&mut ChunkSink { shared })
                    .map_err(|e| e.to_string())?
            }
            Ok(Message::MemoryChunk(chunk)) => {
                mid_pass = true;
                shared
                    .store(&chunk, chunk_wire_bytes(&chunk))
                    .map_err(|e| e.to_string())?
            }
            Ok(Message::SparseChunk(chunk)) => {
                mid_pass = true;
                shared
                    .store_sparse(&chunk, &mut sparse)
                    .map_err(|e| e.to_string())?
            }
            Ok(Message::IterationDone {
                iteration,
                pages,
                bytes,
            }) => {
                mid_pass = false;
                shared.barrier.arrive(iteration, pages, bytes)?;
            }
            Ok(other) => return Err(format!("unexpected {} message", other.kind())),
            // Closed between passes (after the final one, or before it when the source
            // retires its extra connections): the passes left go on without it. Every
            // page still has to arrive by `Complete`, which checks that none is missing.
            Err(ProtocolError::Closed) if !mid_pass && shared.lanes_retire => {
                shared.barrier.retire();
                return Ok(());
            }
            // Closed inside a pass, or (not agreed to retire) at all: the next pass's
            // barrier fails, unless it came after the final pass.
            Err(ProtocolError::Closed) => {
                shared.barrier.leave();
                return Ok(());
            }
            // Halted: the migration ended or failed elsewhere; that side reports it.
            Err(ProtocolError::Io { source, .. }) if is_halted(&source) => return Ok(()),
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Where a connection expands sparse chunks (reused from chunk to chunk).
#[derive(Default)]
struct SparseScratch {
    pages: Vec<u8>,
    map: Vec<u8>,
}

/// What all connections of one migration share.
struct Shared<'a, V: ?Sized> {
    vm: &'a V,
    pages: Mutex<Pages>,
    barrier: PassBarrier,
    progress: &'a MigrationProgress,
    /// False when RAM came as the source's files: no page may be written then.
    copy_allowed: bool,
    /// The features this side offered (a chunk kind it did not offer is refused).
    takes: u64,
    /// Both sides set `LANES_RETIRE`: an extra connection may close between passes.
    lanes_retire: bool,
    /// The test seam [`TEST_SPARSE_NEVER_CLEARED_ENV`] is on.
    sparse_never_cleared: bool,
    /// Both sides set `PASS_ACKS` and `STATE_AT_PAUSE`: the VM may warm up for the state
    /// before a pass's ack (see [`WarmUps`]).
    warm_ups: bool,
}

/// When the destination has its VM warm up for the state ([`DestinationVm::warm_up`]):
/// after a pass the source made while its guest ran, before the ack that the source
/// waits for before it may pause (so it never holds up the state), and not again before
/// [`WARM_UP_SPACING`] times its last run has gone by: the ack's delay counts in the
/// source's page rate, which decides when to pause.
#[derive(Default)]
struct WarmUps {
    /// When the last one ended and how long it took.
    last: Option<(Instant, Duration)>,
}

/// See [`WarmUps`]: at most one warm-up (~0.15 ms here) in this many times its length
/// (~3 ms), a 5 % delay of the acks at worst.
const WARM_UP_SPACING: u32 = 20;

impl WarmUps {
    fn after_pass<V: DestinationVm + Sync + ?Sized>(&mut self, vm: &V) {
        let start = Instant::now();
        if self.due(start) {
            vm.warm_up();
            let end = Instant::now();
            self.last = Some((end, end - start));
        }
    }

    fn due(&self, now: Instant) -> bool {
        self.last.is_none_or(|(ended, took)| {
            now.saturating_duration_since(ended) >= took * WARM_UP_SPACING
        })
    }
}

fn sparse_never_cleared() -> bool {
    let on = std::env::var_os(TEST_SPARSE_NEVER_CLEARED_ENV).is_some();
    if on {
        log::warn!(
            "{TEST_SPARSE_NEVER_CLEARED_ENV} is set: sparse pages go in over what the page \
             held, not over zeros (a test seam; a page sent twice can come out wrong)"
        );
    }
    on
}

impl<V: DestinationVm + Sync + ?Sized> Shared<'_, V> {
    fn pages(&self) -> MutexGuard<'_, Pages> {
        self.pages.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks a chunk's place, writes it to guest RAM and records it. Chunks of one pass
    /// never overlap, so connections only need the lock for the bookkeeping.
    /// A sparse chunk, expanded to whole pages in `scratch`, then as [`Shared::store`].
    fn store_sparse(
        &self,
        chunk: &SparseChunk<'_>,
        scratch: &mut SparseScratch,
    ) -> Result<(), ReceiveError> {
        self.check_offered(MessageType::SparseChunk)?;
        chunk.expand(&mut scratch.pages, &mut scratch.map);
        let plain = MemoryChunk {
            gpa: chunk.gpa,
            page_count: chunk.page_count,
            data_map: &scratch.map,
            data: &scratch.pages,
        };
        let wire = (crate::protocol::HEADER_LEN + 16 + chunk.body.len()) as u64;
        self.store(&plain, wire)
    }

    /// A chunk kind this side did not offer is a protocol violation.
    fn check_offered(&self, kind: MessageType) -> Result<(), ReceiveError> {
        let feature = match kind {
            MessageType::PageChunk => features::PAGE_CHUNKS,
            MessageType::SparseChunk => features::SPARSE_PAGES,
            _ => return Ok(()),
        };
        if self.takes & feature == 0 {
            return Err(ReceiveError::Unexpected {
                found: kind,
                during: "receiving memory (this destination did not offer that encoding)",
            });
        }
        Ok(())
    }

    /// Whether a chunk of `page_count` pages at `gpa` may be written: RAM is copied in
    /// this migration, and the pages lie inside one RAM range.
    fn check_place(
        &self,
        kind: MessageType,
        gpa: u64,
        page_count: u32,
    ) -> Result<(), ReceiveError> {
        if !self.copy_allowed {
            return Err(ReceiveError::Unexpected {
                found: kind,
                during: "a migration whose RAM came as files",
            });
        }
        if !self
            .pages()
            .received
            .contains_range(gpa, u64::from(page_count))
        {
            return Err(ReceiveError::OutsideRam {
                gpa,
                pages: page_count,
            });
        }
        Ok(())
    }

    fn store(&self, chunk: &MemoryChunk<'_>, wire: u64) -> Result<(), ReceiveError> {
        self.check_place(MessageType::MemoryChunk, chunk.gpa, chunk.page_count)?;
        for run in chunk.runs() {
            match run {
                PageRun::Data { gpa, data } => {
                    self.vm
                        .write_pages(gpa, data)
                        .map_err(vm_err("write_pages"))?;
                    self.pages().written.insert_range(gpa, data.len() as u64);
                }
                PageRun::Zero { gpa, pages } => self.zero(gpa, u64::from(pages))?,
            }
        }
        self.pages()
            .received
            .insert_range(chunk.gpa, u64::from(chunk.page_count) * PAGE);
        self.progress.update(|i| {
            i.ram.duplicate += u64::from(chunk.zero_pages());
            i.ram.normal += u64::from(chunk.data_pages());
            i.ram.normal_bytes += chunk.data.len() as u64;
            i.ram.transferred += wire;
        });
        Ok(())
    }

    /// Zeroes the pages of a zero run that hold older data; untouched pages already read
    /// as zero and stay untouched (not even faulted in).
    fn zero(&self, gpa: u64, pages: u64) -> Result<(), ReceiveError> {
        let mut runs = Vec::new();
        {
            let set = self.pages();
            let mut p = 0;
            while p < pages {
                if !set.written.contains(gpa + p * PAGE) {
                    p += 1;
                    continue;
                }
                let start = p;
                while p < pages && set.written.contains(gpa + p * PAGE) {
                    p += 1;
                }
                runs.push((gpa + start * PAGE, p - start));
            }
        }
        for (g, n) in runs {
            self.vm.zero_pages(g, n).map_err(vm_err("zero_pages"))?;
        }
        Ok(())
    }
}

/// Stores a page chunk as it streams in: every data page read straight into guest RAM. Its
/// pages count as received only at `end`, once the checksum matched.
struct ChunkSink<'s, 'a, V: ?Sized> {
    shared: &'s Shared<'a, V>,
}

impl<V: DestinationVm + Sync + ?Sized> PageSink for ChunkSink<'_, '_, V> {
    type Error = ReceiveError;

    fn begin(&mut self, gpa: u64, page_count: u32) -> Result<(), ReceiveError> {
        self.shared.check_offered(MessageType::PageChunk)?;
        self.shared
            .check_place(MessageType::PageChunk, gpa, page_count)
    }

    fn whole_pages(
        &mut self,
        gpa: u64,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]) -> Result<(), ProtocolError>,
    ) -> Result<(), ReceiveError> {
        // Written from the start: a fill that fails half-way must not leave pages that
        // `unwritten` calls zero.
        self.shared.pages().written.insert_range(gpa, len as u64);
        let mut filled = Ok(());
        self.shared
            .vm
            .fill_pages(gpa, len, &mut |buf| filled = fill(buf))
            .map_err(vm_err("fill_pages"))?;
        filled?;
        Ok(())
    }

    fn zero_pages(&mut self, gpa: u64, pages: u32) -> Result<(), ReceiveError> {
        self.shared.zero(gpa, u64::from(pages))
    }

    fn unwritten(&mut self, gpa: u64, pages: usize, out: &mut Vec<bool>) {
        out.clear();
        if self.shared.sparse_never_cleared {
            out.resize(pages, true);
            return;
        }
        let set = self.shared.pages();
        out.extend((0..pages as u64).map(|p| !set.written.contains(gpa + p * PAGE)));
    }

    fn end(&mut self, c: PageChunkDone) -> Result<(), ReceiveError> {
        self.shared
            .pages()
            .received
            .insert_range(c.gpa, u64::from(c.page_count) * PAGE);
        self.shared.progress.update(|i| {
            i.ram.duplicate += u64::from(c.zero_pages);
            i.ram.normal += u64::from(c.data_pages);
            i.ram.normal_bytes += u64::from(c.data_pages) * PAGE;
            i.ram.transferred += c.wire_bytes;
        });
        Ok(())
    }
}

/// Makes every connection finish pass *k* before any goes on with pass *k + 1*, so that a
/// page sent again in a later pass (on another connection) always lands last. Also sums
/// the connections' `IterationDone` figures.
#[derive(Default)]
struct PassBarrier {
    state: Mutex<BarrierState>,
    cv: Condvar,
}

#[derive(Default)]
struct BarrierState {
    /// Connections taking part (0 until set: the main one alone).
    lanes: usize,
    arrived: usize,
    /// Connections closed by the source inside a pass, or at all where it may not retire
    /// them (after its final pass that is how they end; earlier it fails the next pass).
    departed: usize,
    generation: u64,
    iteration: u32,
    pages: u64,
    bytes: u64,
    /// The totals of the last completed pass.
    done: (u64, u64),
    failed: bool,
}

impl PassBarrier {
    fn lock(&self) -> MutexGuard<'_, BarrierState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_lanes(&self, n: usize) {
        self.lock().lanes = n;
    }

    /// Ends the pass: every connection taking part arrived.
    fn complete(&self, st: &mut BarrierState) -> (u64, u64) {
        st.done = (st.pages, st.bytes);
        st.arrived = 0;
        st.pages = 0;
        st.bytes = 0;
        st.generation += 1;
        self.cv.notify_all();
        st.done
    }

    /// A connection the source closed between two passes ([`features::LANES_RETIRE`]):
    /// the passes after it go without it, and one that waits for it alone ends now.
    fn retire(&self) {
        let mut st = self.lock();
        st.lanes = st.lanes.saturating_sub(1).max(1);
        if st.arrived > 0 && st.arrived >= st.lanes {
            self.complete(&mut st);
        }
    }

    /// One connection finished `iteration` with `pages`/`bytes`; waits for the others.
    /// Returns the pass's totals.
    fn arrive(&self, iteration: u32, pages: u64, bytes: u64) -> Result<(u64, u64), String> {
        let mut st = self.lock();
        let closed = |iteration| format!("a connection closed before pass {iteration} ended");
        if st.failed {
            return Err("another connection failed".into());
        }
        if st.departed > 0 {
            return Err(closed(iteration));
        }
        if st.arrived == 0 {
            st.iteration = iteration;
        } else if st.iteration != iteration {
            st.failed = true;
            self.cv.notify_all();
            return Err(format!(
                "connections disagree on the pass: {} and {iteration}",
                st.iteration
            ));
        }
        st.arrived += 1;
        // The figures come from the source: a hostile one must not overflow them.
        st.pages = st.pages.saturating_add(pages);
        st.bytes = st.bytes.saturating_add(bytes);
        if st.arrived >= st.lanes.max(1) {
            return Ok(self.complete(&mut st));
        }
        let generation = st.generation;
        while st.generation == generation && !st.failed && st.departed == 0 {
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        if st.generation != generation {
            Ok(st.done)
        } else if st.failed {
            Err("another connection failed".into())
        } else {
            Err(closed(iteration))
        }
    }

    fn leave(&self) {
        self.lock().departed += 1;
        self.cv.notify_all();
    }

    fn fail(&self) {
        self.lock().failed = true;
        self.cv.notify_all();
    }
}

/// Wire bytes of a chunk frame (header, fixed fields, page map, data).
pub(super) fn chunk_wire_bytes(c: &MemoryChunk<'_>) -> u64 {
    (crate::protocol::HEADER_LEN + 16 + c.data_map.len() + c.data.len()) as u64
}

/// Which pages arrived, and which hold data written here (the rest still read as zero).
struct Pages {
    received: PageSet,
    written: PageSet,
}

fn is_cancel_io(e: &ReceiveError) -> bool {
    matches!(e, ReceiveError::Protocol(ProtocolError::Io { source, .. }) if is_cancelled(source))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first warm-up is due at once; the next only once `WARM_UP_SPACING` times the
    /// last one's length has gone by since it ended.
    #[test]
    fn warm_ups_are_spaced_by_their_own_length() {
        let t0 = Instant::now();
        let mut w = WarmUps::default();
        assert!(w.due(t0));
        let took = Duration::from_micros(150);
        w.last = Some((t0, took));
        assert!(!w.due(t0));
        assert!(!w.due(t0 + took * (WARM_UP_SPACING - 1)));
        assert!(w.due(t0 + took * WARM_UP_SPACING));
        // A clock read before the last end (another thread's) is not a wrap-around.
        assert!(!w.due(t0.checked_sub(Duration::from_millis(1)).unwrap_or(t0)));
    }

    /// Found by the `receive_session` fuzz target: the per-connection page and byte
    /// counts of `IterationDone` come from the source and could overflow their sum.
    #[test]
    fn pass_totals_from_a_hostile_source_saturate() {
        let barrier = PassBarrier::default();
        barrier.set_lanes(2);
        let totals = std::thread::scope(|s| {
            let other = s.spawn(|| barrier.arrive(0, u64::MAX, u64::MAX));
            // The last to arrive completes the pass (whichever of the two it is).
            let mine = barrier.arrive(0, 2, 3);
            (mine, other.join().unwrap())
        });
        assert_eq!(totals.0, Ok((u64::MAX, u64::MAX)));
        assert_eq!(totals.1, Ok((u64::MAX, u64::MAX)));
    }

    /// A connection retired between passes: the pass waiting for it alone ends, and the
    /// next needs one connection fewer. Closed inside a pass (`leave`), the pass fails.
    #[test]
    fn a_retired_connection_is_not_waited_for() {
        let barrier = PassBarrier::default();
        barrier.set_lanes(3);
        let first = std::thread::scope(|s| {
            let waiting = s.spawn(|| barrier.arrive(4, 10, 100));
            let other = s.spawn(|| barrier.arrive(4, 1, 10));
            // Both arrived (or are about to): only the third connection is missing.
            while barrier.lock().arrived < 2 {
                std::thread::yield_now();
            }
            barrier.retire();
            (waiting.join().unwrap(), other.join().unwrap())
        });
        assert_eq!(first, (Ok((11, 110)), Ok((11, 110))));
        let second = std::thread::scope(|s| {
            let other = s.spawn(|| barrier.arrive(5, 2, 20));
            let mine = barrier.arrive(5, 3, 30);
            (mine, other.join().unwrap())
        });
        assert_eq!(second, (Ok((5, 50)), Ok((5, 50))));
        // Down to the main connection alone, a pass ends with its own arrival.
        barrier.retire();
        assert_eq!(barrier.arrive(6, 7, 70), Ok((7, 70)));
        // One fewer than the main connection is never waited for: it takes part always.
        barrier.retire();
        assert_eq!(barrier.arrive(7, 1, 1), Ok((1, 1)));
        barrier.leave();
        assert!(
            barrier.arrive(8, 1, 1).is_err(),
            "a close inside a pass fails it"
        );
    }
}
