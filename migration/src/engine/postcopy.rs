//! Postcopy: after some precopy passes (or when asked), the source pauses, sends the
//! machine state and the list of pages the destination does not hold valid, and the VM
//! runs on the destination at once. Pages the guest (or a device) touches before they
//! arrived are asked for on the main connection's return direction and sent first; the
//! rest streams behind them. Every page the destination lacks is sent exactly once, in a
//! checksummed chunk checked before it is placed.
//!
//! Once the destination runs the VM, neither side may run it alone: the destination
//! misses pages only the source has, and the source's copy is out of date. A broken link
//! therefore leaves both sides paused (`postcopy-paused`), never one running a half-VM.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::destination::{chunk_wire_bytes, vm_err, ReceiveError};
use super::source::{hook, unexpected, SendError, Sender};
use super::{DestinationVm, PostcopyRam, SourceVm, TEST_STALE_PAGE_ENV};
use crate::page_set::PageSet;
use crate::protocol::{
    encode, encode_memory_chunk, encode_sparse_chunk_known, features, MemoryChunk, Message,
    MessageReader, MessageType, PageRun, ProtocolError, MAX_DISCARD_RANGES, PAGE_SIZE,
};
use crate::stats::MigrationStatus;
use crate::transport::{is_halted, MigrationStream, Watched};
use crate::MigrationProgress;

const PAGE: u64 = PAGE_SIZE as u64;
/// Pages sent for one request: the asked page and the missing ones right after it (a
/// guest often goes on to the next page). Few: the faulting vCPU waits until the whole
/// run is placed (one `UFFDIO_COPY` wakes it at its end).
const REQUEST_RUN_PAGES: u32 = 16;
/// Most pages in one background chunk (1 MiB): one `UFFDIO_COPY` places it, a few
/// microseconds a page where 64-page calls took nearly twice as long on this host.
const BACKGROUND_CHUNK_PAGES: u32 = 256;
/// Background chunks are written at least this often, so that a request waits behind at
/// most this much queued data on this side, besides the chunk being read.
const BACKGROUND_FLUSH_BYTES: usize = 256 << 10;
/// How long a reader or the fault loop waits before looking at its stop flag again.
const POLL: Duration = Duration::from_millis(100);
/// A reader waiting for requests may hear nothing for this long: the guest may simply
/// have touched no missing page (the link's health shows in the page stream's writes).
const REQUEST_IDLE: Duration = Duration::from_secs(24 * 3600);

/// The stale-page seam's gpa, when set (tests only; see [`TEST_STALE_PAGE_ENV`]).
fn test_stale_from() -> Option<u64> {
    let v = std::env::var(TEST_STALE_PAGE_ENV).ok()?;
    let v = v.trim();
    match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => v.parse().ok(),
    }
}

/// What the source's reader thread hears from the destination.
enum FromDestination {
    Request(u64),
    Complete,
    Failed(String),
}

impl<V: SourceVm + Sync + ?Sized, S: MigrationStream> Sender<'_, V, S> {
    /// A second handle on the main connection, from which the destination's page
    /// requests are read while this one streams pages.
    fn request_reader(&self) -> Result<S, SendError> {
        self.conn
            .get_ref()
            .get_ref()
            .try_clone_stream()
            .map_err(SendError::Stream)
    }

    /// Refuses, right after the handshake, a migration told to switch to postcopy after
    /// some passes when the destination cannot take it. Checked only when due, it would
    /// fail after passes that may take minutes, or never when the guest happens to
    /// converge first: the user's choice would hold on one run and not the next.
    pub(super) fn require_planned_postcopy(&self) -> Result<(), SendError> {
        if self.opts.postcopy_after_passes.is_some() {
            self.require_peer_postcopy()?;
        }
        Ok(())
    }

    fn require_peer_postcopy(&self) -> Result<(), SendError> {
        if self.peer_features & features::POSTCOPY == 0 {
            return Err(SendError::NoPostcopy(
                "it offers no postcopy: an older ferry, a TLS or file-passing connection, or \
                 RAM it cannot watch",
            ));
        }
        Ok(())
    }

    /// Whether to switch to postcopy after `iteration` passes.
    pub(super) fn postcopy_due(&mut self, iteration: u32) -> Result<bool, SendError> {
        let due = self.progress.postcopy_requested()
            || self
                .opts
                .postcopy_after_passes
                .is_some_and(|n| iteration >= n);
        if due {
            self.require_peer_postcopy()?;
        }
        Ok(due)
    }

    /// Pauses here, hands the VM over with the pages the destination misses still here,
    /// then serves them: asked-for pages first, the rest in address order.
    pub(super) fn postcopy(
        &mut self,
        iteration: u32,
        mut pending: PageSet,
    ) -> Result<(), SendError> {
        // The reader of requests needs its own handle; without one, stay in precopy terms
        // (nothing has happened yet).
        let reader = self.request_reader()?;
        self.progress.set_status(MigrationStatus::Device);
        let paused_at = Instant::now();
        hook("pause", self.vm.pause())?;
        self.paused = true;
        self.unthrottle();
        for (gpa, len) in hook("collect_dirty", self.vm.collect_dirty(true))? {
            pending.insert_range(gpa, len);
        }
        // The extra connections carried precopy passes only; the destination holds all
        // of them (each pass was acknowledged).
        for lane in self.lanes.drain(..) {
            lane.io.shutdown();
        }
        if let Some(from) = test_stale_from() {
            let stale = pending
                .clone()
                .take_runs(1)
                .into_iter()
                .map(|(g, _)| g)
                .find(|&g| g >= from);
            if let Some(g) = stale {
                pending.remove_range(g, 1);
                log::warn!(
                    "{TEST_STALE_PAGE_ENV}: the page at {g:#x} is left stale on the destination"
                );
            }
        }
        let missing = pending.count();
        log::info!(
            "switching to postcopy after {iteration} precopy pass(es): {missing} pages stay \
             here until the destination asks for them or they stream"
        );
        let runs = pending.clone().take_runs(u32::MAX);
        for group in runs.chunks(MAX_DISCARD_RANGES) {
            self.send(&Message::PostcopyDiscard(group.to_vec()))?;
            self.flush()?;
        }
        let (vcpus, devices) = hook("save_state", self.vm.save_state())?;
        self.send(&Message::State {
            vcpus: &vcpus,
            devices: &devices,
        })?;
        self.send(&Message::PostcopyRun {
            paused_us: paused_at.elapsed().as_micros() as u64,
        })?;
        self.flush()?;
        self.conn.get_mut().set_idle(self.opts.confirm_timeout);
        loop {
            match self.conn.read_message()? {
                Message::Resumed { .. } => break,
                Message::PassReceived { .. } => {}
                other => return Err(unexpected(other, "waiting for Resumed (postcopy)")),
            }
        }
        // From here on the destination's copy is the VM.
        self.postcopy_started = true;
        let downtime_us = paused_at.elapsed().as_micros() as u64;
        log::info!(
            "the VM runs on the destination after a {:.1} ms pause; {missing} pages to go",
            downtime_us as f64 / 1000.0
        );
        self.progress.update(|i| {
            i.set_downtime_us(downtime_us);
            i.ram.remaining = missing * PAGE;
        });
        self.progress.set_status(MigrationStatus::PostcopyActive);
        self.conn.get_mut().set_idle(self.opts.io_timeout);
        self.stream_rest(pending, reader)?;
        if self.peer_features & features::SOURCE_MEASURES != 0 {
            let measured = Message::Measured {
                downtime_us,
                total_us: self.started.elapsed().as_micros() as u64,
            };
            // The migration is over either way: a destination that misses this keeps the
            // figure of `PostcopyDone`.
            if let Err(e) = self.send(&measured).and_then(|()| self.flush()) {
                log::warn!("could not send the measured times to the destination: {e}");
            }
        }
        Ok(())
    }

    /// With the VM running on the destination: reads its requests on `reader` (a second
    /// handle on the connection) and sends what it misses, until it holds every page.
    fn stream_rest(&mut self, pending: PageSet, reader: S) -> Result<(), SendError> {
        let halt = Arc::new(AtomicBool::new(false));
        let watched = Watched::new(reader, REQUEST_IDLE, self.progress.clone())
            .map_err(|e| SendError::PostcopyLinkLost(e.to_string()))?
            .with_halt(halt.clone());
        let (tx, rx) = mpsc::channel();
        let r = std::thread::scope(|s| {
            let reader = std::thread::Builder::new()
                .name("mig-postcopy-rq".into())
                .spawn_scoped(s, move || read_requests(MessageReader::new(watched), tx))
                .map_err(|e| SendError::PostcopyLinkLost(format!("starting its reader: {e}")))?;
            let r = self.serve(pending, &rx);
            halt.store(true, Ordering::Relaxed);
            let _ = reader.join();
            r
        });
        let total_us = self.started.elapsed().as_micros() as u64;
        r.map_err(|e| match e {
            SendError::Protocol(p) => SendError::PostcopyLinkLost(p.to_string()),
            e => e,
        })?;
        log::info!(
            "postcopy done: the destination holds every page, {:.1} ms after the migration \
             started",
            total_us as f64 / 1000.0
        );
        self.progress
            .update(|i| i.total_time = Some(total_us / 1000));
        Ok(())
    }

    /// Sends every page of `pending`, requested ones first; then `PostcopyDone`, and waits
    /// for the destination's `PostcopyComplete`.
    fn serve(
        &mut self,
        mut pending: PageSet,
        rx: &mpsc::Receiver<FromDestination>,
    ) -> Result<(), SendError> {
        // Small background chunks: an asked-for page waits for the one being read.
        let chunk_pages = self.opts.chunk_pages.clamp(1, BACKGROUND_CHUNK_PAGES);
        let mut background: VecDeque<(u64, u32)> = pending.clone().take_runs(chunk_pages).into();
        let sparse = self.peer_features & features::SPARSE_PAGES != 0;
        let mut requests = 0u64;
        while !pending.is_empty() {
            let mut asked = false;
            loop {
                match rx.try_recv() {
                    Ok(FromDestination::Request(gpa)) => {
                        requests += 1;
                        let mut n = 0;
                        while n < REQUEST_RUN_PAGES && pending.contains(gpa + u64::from(n) * PAGE) {
                            n += 1;
                        }
                        if n > 0 {
                            self.send_postcopy_run(&mut pending, gpa, n, sparse)?;
                            asked = true;
                        }
                    }
                    Ok(FromDestination::Complete) => {
                        return Err(SendError::Unexpected {
                            found: MessageType::PostcopyComplete,
                            during: "postcopy (pages were still to send)",
                        })
                    }
                    Ok(FromDestination::Failed(e)) => return Err(SendError::PostcopyLinkLost(e)),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        return Err(SendError::PostcopyLinkLost(
                            "the request reader ended".into(),
                        ))
                    }
                }
            }
            if asked {
                self.progress.update(|i| i.ram.postcopy_requests = requests);
                self.flush()?;
            }
            let Some((gpa, pages)) = background.pop_front() else {
                break;
            };
            // The parts of this run not sent on request already.
            let mut i = 0;
            while i < pages {
                let at = |i: u32| gpa + u64::from(i) * PAGE;
                if !pending.contains(at(i)) {
                    i += 1;
                    continue;
                }
                let start = i;
                while i < pages && pending.contains(at(i)) {
                    i += 1;
                }
                self.send_postcopy_run(&mut pending, at(start), i - start, sparse)?;
            }
            if self.main.out.len() >= BACKGROUND_FLUSH_BYTES {
                self.flush()?;
            }
        }
        let mut info = self.progress.snapshot();
        info.total_time = Some(self.started.elapsed().as_millis() as u64);
        info.ram.remaining = 0;
        let source_info = serde_json::to_vec(&info).unwrap_or_default();
        self.send(&Message::PostcopyDone {
            source_info: &source_info,
        })?;
        self.flush()?;
        let end = Instant::now() + self.opts.confirm_timeout;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(FromDestination::Request(_)) => requests += 1,
                Ok(FromDestination::Complete) => break,
                Ok(FromDestination::Failed(e)) => return Err(SendError::PostcopyLinkLost(e)),
                Err(_) => {
                    return Err(SendError::PostcopyLinkLost(format!(
                        "no PostcopyComplete within {} ms of the last page",
                        self.opts.confirm_timeout.as_millis()
                    )))
                }
            }
        }
        self.progress.update(|i| {
            i.ram.postcopy_requests = requests;
            i.ram.remaining = 0;
        });
        Ok(())
    }

    /// Reads `pages` pages at `gpa` (all in `pending`), takes them out of it and queues
    /// their chunk.
    fn send_postcopy_run(
        &mut self,
        pending: &mut PageSet,
        gpa: u64,
        pages: u32,
        sparse: bool,
    ) -> Result<(), SendError> {
        let len = pages as usize * PAGE_SIZE;
        let buf = &mut self.main;
        if buf.scratch.len() < len {
            buf.scratch.resize(len, 0);
        }
        hook(
            "read_pages",
            self.vm
                .read_pages_known_zero(gpa, &mut buf.scratch[..len], &mut buf.known_zero),
        )?;
        let before = buf.out.len();
        let counts = if sparse {
            encode_sparse_chunk_known(gpa, &buf.scratch[..len], &buf.known_zero, &mut buf.out)?
        } else {
            for (page, _) in buf.scratch[..len]
                .chunks_exact_mut(PAGE_SIZE)
                .zip(&buf.known_zero)
                .filter(|(_, &z)| z)
            {
                page.fill(0);
            }
            encode_memory_chunk(gpa, &buf.scratch[..len], &mut buf.out)?
        };
        let bytes = (buf.out.len() - before) as u64;
        pending.remove_range(gpa, u64::from(pages));
        let left = pending.count();
        self.progress.update(|i| {
            i.ram.duplicate += u64::from(counts.zero_pages);
            i.ram.normal += u64::from(counts.data_pages);
            i.ram.normal_bytes += u64::from(counts.data_pages) * PAGE;
            i.ram.transferred += bytes;
            i.ram.remaining = left * PAGE;
        });
        Ok(())
    }
}

/// The source's reader: the destination's requests and its final `PostcopyComplete`.
fn read_requests<S: MigrationStream>(
    mut conn: MessageReader<Watched<S>>,
    tx: mpsc::Sender<FromDestination>,
) {
    loop {
        let event = match conn.read_message() {
            Ok(Message::PageRequest { gpa }) => FromDestination::Request(gpa),
            Ok(Message::PostcopyComplete) => {
                let _ = tx.send(FromDestination::Complete);
                return;
            }
            Ok(Message::Abort { reason }) => {
                FromDestination::Failed(format!("the destination aborted: {reason}"))
            }
            Ok(other) => FromDestination::Failed(format!(
                "unexpected {} message from the destination during postcopy",
                other.kind()
            )),
            Err(ProtocolError::Io { source, .. }) if is_halted(&source) => return,
            Err(e) => FromDestination::Failed(e.to_string()),
        };
        let failed = matches!(event, FromDestination::Failed(_));
        if tx.send(event).is_err() || failed {
            return;
        }
    }
}

/// What the destination's postcopy needs from the precopy part of the session.
pub(super) struct PostcopyStart<S> {
    /// A second handle on the main connection: page requests go out on it.
    pub(super) writer: S,
    /// Pages valid here (already with the discards applied).
    pub(super) received: PageSet,
    pub(super) state: (Vec<u8>, Vec<u8>),
    pub(super) paused_us: u64,
    pub(super) idle_timeout: Duration,
    /// The source sends `Measured` after `PostcopyComplete`.
    pub(super) source_measures: bool,
}

/// The destination's pages: which are valid here, which were asked for.
struct DestPages {
    received: PageSet,
    requested: PageSet,
}

/// Runs the VM here with pages missing, asks for those touched, places what comes, and
/// returns once every page is here. On a broken link the VM is left paused
/// ([`ReceiveError::PostcopyPaused`]).
pub(super) fn run_destination<V: DestinationVm + ?Sized, S: MigrationStream>(
    vm: &mut V,
    conn: &mut MessageReader<Watched<S>>,
    start: PostcopyStart<S>,
    mut accept: Option<super::AcceptChannel<'_, S>>,
    progress: &MigrationProgress,
) -> Result<(), ReceiveError> {
    let began = Instant::now();
    let ram = vm.postcopy_ram().map_err(vm_err("postcopy_ram"))?;
    let missing_runs = start.received.missing_runs(u32::MAX);
    let missing: u64 = missing_runs.iter().map(|r| u64::from(r.1)).sum();
    for &(gpa, pages) in &missing_runs {
        ram.discard(gpa, u64::from(pages))
            .map_err(vm_err("postcopy discard"))?;
    }
    ram.arm().map_err(vm_err("postcopy arm"))?;
    let (vcpus, devices) = &start.state;
    vm.restore_state(vcpus, devices)
        .map_err(vm_err("restore_state"))?;
    vm.resume().map_err(vm_err("resume"))?;
    let downtime_us = start
        .paused_us
        .saturating_add(began.elapsed().as_micros() as u64);
    log::info!(
        "postcopy: the VM runs here with {missing} pages still at the source ({:.1} ms \
         after PostcopyRun)",
        began.elapsed().as_secs_f64() * 1000.0
    );
    progress.update(|i| {
        i.set_downtime_us(downtime_us);
        i.ram.remaining = missing * PAGE;
    });
    progress.set_status(MigrationStatus::PostcopyActive);
    // Written before the request writer exists: the two never write at once.
    super::destination::send_resumed(conn, downtime_us)?;

    let ram_layout_pages = DestPages {
        requested: PageSet::new(start.received.ram()),
        received: start.received,
    };
    let pages = Mutex::new(ram_layout_pages);
    let mut writer = start.writer;
    // After a broken link: the source's new connection.
    let mut recovered: Option<MessageReader<Watched<S>>> = None;
    loop {
        let again = recovered.is_some();
        let conn_now = match recovered.as_mut() {
            Some(c) => c,
            None => &mut *conn,
        };
        match serve_session(
            &*ram,
            conn_now,
            writer,
            &pages,
            progress,
            start.idle_timeout,
            again,
        ) {
            Ok(source_info) => {
                ram.disarm().map_err(vm_err("postcopy disarm"))?;
                // Report the source's figures (it exits), with what only this side knows.
                if let Ok(mut info) = serde_json::from_slice::<crate::MigrationInfo>(&source_info) {
                    let here = progress.snapshot();
                    info.status = here.status;
                    info.downtime = here.downtime;
                    info.downtime_us = here.downtime_us;
                    info.ram.postcopy_requests = here.ram.postcopy_requests;
                    info.ram.remaining = 0;
                    info.expected_downtime = None;
                    info.error_desc = None;
                    progress.replace(info);
                }
                super::destination::send_plain(conn_now, &Message::PostcopyComplete)
                    .map_err(ReceiveError::ConfirmationFailed)?;
                // The source's clock to the end: the last pages were still on their way
                // when it sent `PostcopyDone`. (Not after a resume: that connection had
                // no `Hello` to agree on it.)
                if start.source_measures && !again {
                    conn_now.get_mut().set_idle(Duration::from_secs(2));
                    match conn_now.read_message() {
                        Ok(Message::Measured {
                            total_us,
                            downtime_us,
                        }) => {
                            // Its pause until `Resumed` reached it, as after a precopy.
                            progress.update(|i| i.take_measured(downtime_us, total_us));
                        }
                        Ok(other) => log::warn!(
                            "expected the source's Measured after PostcopyComplete, got {}",
                            other.kind()
                        ),
                        Err(e) => log::warn!("the source's Measured did not arrive: {e}"),
                    }
                }
                log::info!(
                    "postcopy complete: every page is here, {:.1} ms after the VM started here",
                    began.elapsed().as_secs_f64() * 1000.0
                );
                return Ok(());
            }
            Err(why) => {
                let left = {
                    let p = lock(&pages);
                    p.received.total_pages() - p.received.count()
                };
                if let Err(p) = vm.pause_postcopy() {
                    log::error!("postcopy: pausing the VM failed: {p}");
                }
                let paused = ReceiveError::PostcopyPaused {
                    missing: left,
                    reason: why,
                };
                log::error!("incoming migration: {paused}");
                progress.fail(MigrationStatus::PostcopyPaused, &paused.to_string());
                let Some(accept) = accept.as_mut() else {
                    return Err(paused);
                };
                log::info!(
                    "postcopy: waiting for the source to connect again (ferry-remote \
                     send-migration --resume; vm.cancel-migration stops waiting)"
                );
                let Some((c, w)) = wait_for_source(&mut **accept, progress, start.idle_timeout)
                else {
                    return Err(paused);
                };
                let mut c = c;
                let missing_runs = lock(&pages).received.missing_runs(u32::MAX);
                for group in missing_runs.chunks(MAX_DISCARD_RANGES) {
                    super::destination::send_plain(
                        &mut c,
                        &Message::PostcopyMissing(group.to_vec()),
                    )?;
                }
                super::destination::send_plain(&mut c, &Message::PostcopyMissing(Vec::new()))?;
                vm.resume_postcopy()
                    .map_err(vm_err("resume after postcopy recovery"))?;
                progress.update(|i| i.error_desc = None);
                progress.set_status(MigrationStatus::PostcopyActive);
                log::info!("postcopy taken up again: {left} pages still at the source");
                recovered = Some(c);
                writer = w;
            }
        }
    }
}

/// One connection's share of postcopy: a fault thread asks for pages on `writer` while
/// this thread places what comes on `conn`. `again`: a connection after a broken one,
/// on which the pages asked for before and not yet here are asked for again (whoever
/// waits for them will not fault a second time). The source's figures on success; why
/// it stopped otherwise.
fn serve_session<S: MigrationStream>(
    ram: &dyn PostcopyRam,
    conn: &mut MessageReader<Watched<S>>,
    writer: S,
    pages: &Mutex<DestPages>,
    progress: &MigrationProgress,
    idle: Duration,
    again: bool,
) -> Result<Vec<u8>, String> {
    let stop = AtomicBool::new(false);
    let fault_error: Mutex<Option<String>> = Mutex::new(None);
    let writer = Watched::new(writer, idle, progress.clone()).map_err(|e| e.to_string())?;
    let result = std::thread::scope(|s| {
        let faults = std::thread::Builder::new()
            .name("mig-postcopy-fault".into())
            .spawn_scoped(s, || {
                if let Err(e) = fault_loop(ram, pages, &stop, writer, progress, again) {
                    log::warn!("postcopy fault thread: {e}");
                    *fault_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    // The page stream notices through its own reads, within its idle time.
                }
            });
        let r = match faults {
            Ok(_) => receive_pages(ram, conn, pages, progress),
            Err(e) => Err(ReceiveError::Vm {
                op: "postcopy",
                reason: format!("starting the fault thread: {e}"),
            }),
        };
        stop.store(true, Ordering::Relaxed);
        r
    });
    result.map_err(|e| {
        fault_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .map_or_else(|| e.to_string(), |f| format!("{e} (page requests: {f})"))
    })
}

/// Accepts connections until one opens with `PostcopyResume` (or the migration is
/// cancelled: `None`); that connection and a second handle on it.
fn wait_for_source<S: MigrationStream>(
    accept: &mut dyn FnMut(Duration) -> std::io::Result<S>,
    progress: &MigrationProgress,
    idle: Duration,
) -> Option<(MessageReader<Watched<S>>, S)> {
    while !progress.is_cancelled() {
        let stream = match accept(POLL * 5) {
            Ok(s) => s,
            Err(_) => continue,
        };
        let writer = match stream.try_clone_stream() {
            Ok(w) => w,
            Err(e) => {
                log::warn!("postcopy: a connection that cannot be shared: {e}");
                continue;
            }
        };
        let Ok(watched) = Watched::new(stream, idle, progress.clone()) else {
            continue;
        };
        let mut c = MessageReader::new(watched);
        match c.read_message() {
            Ok(Message::PostcopyResume) => return Some((c, writer)),
            Ok(other) => log::warn!(
                "postcopy: a connection opened with {} instead of PostcopyResume: closed",
                other.kind()
            ),
            Err(e) => log::warn!("postcopy: a connection that said nothing useful: {e}"),
        }
    }
    None
}

fn lock(m: &Mutex<DestPages>) -> MutexGuard<'_, DestPages> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reports touched pages: a page valid here (never written: reads as zeros) is placed at
/// once; a missing one is asked for, once.
fn fault_loop<S: MigrationStream>(
    ram: &dyn PostcopyRam,
    pages: &Mutex<DestPages>,
    stop: &AtomicBool,
    mut writer: Watched<S>,
    progress: &MigrationProgress,
    again: bool,
) -> Result<(), String> {
    let mut frame = Vec::new();
    let mut requests = progress.snapshot().ram.postcopy_requests;
    if again {
        // Asked for on the broken connection and still missing: someone waits for them.
        let waiting: Vec<u64> = {
            let p = lock(pages);
            let mut outstanding = p.requested.clone();
            for (gpa, n) in p.received.clone().take_runs(u32::MAX) {
                outstanding.remove_range(gpa, u64::from(n));
            }
            outstanding
                .take_runs(1)
                .into_iter()
                .map(|(g, _)| g)
                .collect()
        };
        for gpa in waiting {
            frame.clear();
            encode(&Message::PageRequest { gpa }, &mut frame).map_err(|e| e.to_string())?;
            std::io::Write::write_all(&mut writer, &frame)
                .map_err(|e| format!("asking again for the page at {gpa:#x}: {e}"))?;
        }
    }
    while !stop.load(Ordering::Relaxed) {
        let Some(gpa) = ram.next_fault(POLL)? else {
            continue;
        };
        let gpa = gpa & !(PAGE - 1);
        let ask = {
            let mut p = lock(pages);
            if p.received.contains(gpa) {
                false
            } else if p.requested.contains(gpa) {
                continue;
            } else {
                p.requested.insert_range(gpa, PAGE);
                true
            }
        };
        if !ask {
            // Valid and never written here: its content is zeros.
            ram.place_zero(gpa, 1)?;
            continue;
        }
        frame.clear();
        encode(&Message::PageRequest { gpa }, &mut frame).map_err(|e| e.to_string())?;
        std::io::Write::write_all(&mut writer, &frame)
            .map_err(|e| format!("asking for the page at {gpa:#x}: {e}"))?;
        requests += 1;
        progress.update(|i| i.ram.postcopy_requests = requests);
    }
    Ok(())
}

/// Threads placing received chunks while the receiving thread reads the next ones: on a
/// nested host placing a page (`UFFDIO_COPY`, its first touch here) costs several times
/// reading it, and two placers share that over both cores.
const PLACERS: usize = 2;
/// Chunks read ahead of their placing: a page asked for waits behind at most this many
/// (besides the ones being placed).
const PLACE_QUEUE: usize = 2;

/// A chunk read off the connection, owned, on its way to a placer.
#[derive(Default)]
struct PlaceJob {
    gpa: u64,
    page_count: u32,
    data_map: Vec<u8>,
    data: Vec<u8>,
    wire: u64,
}

impl PlaceJob {
    fn chunk(&self) -> MemoryChunk<'_> {
        MemoryChunk {
            gpa: self.gpa,
            page_count: self.page_count,
            data_map: &self.data_map,
            data: &self.data,
        }
    }
}

/// Places the pages the source streams until its `PostcopyDone`; each page once. The
/// chunks are placed by [`PLACERS`] threads; a page counts as received (and a fault on
/// it is answered here, not asked for) only once placed.
fn receive_pages<S: MigrationStream>(
    ram: &dyn PostcopyRam,
    conn: &mut MessageReader<Watched<S>>,
    pages: &Mutex<DestPages>,
    progress: &MigrationProgress,
) -> Result<Vec<u8>, ReceiveError> {
    let (jobs, queue) = mpsc::sync_channel::<PlaceJob>(PLACE_QUEUE);
    // Shared by the placers only: once all of them ended, sending fails.
    let queue = Arc::new(Mutex::new(queue));
    let (spare_tx, spare) = mpsc::channel::<PlaceJob>();
    // A placer failed: stop reading at once (its chunk's pages would never come).
    let failed = AtomicBool::new(false);
    let source_info = std::thread::scope(|s| {
        let mut threads = Vec::with_capacity(PLACERS);
        for i in 0..PLACERS {
            let queue = queue.clone();
            let spare_tx = spare_tx.clone();
            let failed = &failed;
            let placer = std::thread::Builder::new()
                .name(format!("mig-place-{i}"))
                .spawn_scoped(s, move || {
                    ferry_seccomp::install_or_exit(ferry_seccomp::ThreadKind::MigrationReceiver);
                    loop {
                        let job = queue.lock().unwrap_or_else(|p| p.into_inner()).recv();
                        let Ok(job) = job else {
                            return Ok(());
                        };
                        if let Err(e) = place_chunk(ram, pages, progress, &job) {
                            failed.store(true, Ordering::Relaxed);
                            return Err(e);
                        }
                        let _ = spare_tx.send(job);
                    }
                });
            match placer {
                Ok(p) => threads.push(p),
                Err(e) => {
                    drop(jobs);
                    return Err(ReceiveError::Vm {
                        op: "postcopy",
                        reason: format!("starting a placing thread: {e}"),
                    });
                }
            }
        }
        drop(queue);
        let read = read_chunks(conn, pages, &jobs, &spare, &failed);
        // The placers finish what was read, then end.
        drop(jobs);
        let mut placed = Ok(());
        for p in threads {
            let r = p.join().unwrap_or_else(|_| {
                Err(ReceiveError::Vm {
                    op: "postcopy",
                    reason: "a placing thread panicked".into(),
                })
            });
            if placed.is_ok() {
                placed = r;
            }
        }
        match (read, placed) {
            // The placers' error is why the reading stopped.
            (Err(ReadStop::Placers), Err(e)) | (Ok(_), Err(e)) => Err(e),
            (Err(ReadStop::Placers), Ok(())) => Err(ReceiveError::Vm {
                op: "postcopy",
                reason: "the placing threads ended".into(),
            }),
            (Err(ReadStop::Error(e)), placed) => {
                if let Err(p) = placed {
                    log::warn!("postcopy: placing pages failed too: {p}");
                }
                Err(e)
            }
            (Ok(info), Ok(())) => Ok(info),
        }
    })?;
    let p = lock(pages);
    if let Some(first_gpa) = p.received.first_missing() {
        return Err(ReceiveError::MissingPages {
            first_gpa,
            missing: p.received.total_pages() - p.received.count(),
            total: p.received.total_pages(),
        });
    }
    Ok(source_info)
}

/// Why the receiving thread stopped reading before `PostcopyDone`.
enum ReadStop {
    Error(ReceiveError),
    /// No placer takes chunks any more (one failed: its error says why).
    Placers,
}

impl From<ReceiveError> for ReadStop {
    fn from(e: ReceiveError) -> Self {
        ReadStop::Error(e)
    }
}

impl From<ProtocolError> for ReadStop {
    fn from(e: ProtocolError) -> Self {
        ReadStop::Error(e.into())
    }
}

/// Reads chunks until `PostcopyDone` (returns its `source_info`) and queues each for a
/// placer, after checking it lies in RAM and brings no page a second time.
fn read_chunks<S: MigrationStream>(
    conn: &mut MessageReader<Watched<S>>,
    pages: &Mutex<DestPages>,
    jobs: &mpsc::SyncSender<PlaceJob>,
    spare: &mpsc::Receiver<PlaceJob>,
    failed: &AtomicBool,
) -> Result<Vec<u8>, ReadStop> {
    // Pages read so far, placed or on their way.
    let mut arrived = lock(pages).received.clone();
    loop {
        let msg = conn.read_message()?;
        let mut job = spare.try_recv().unwrap_or_default();
        match msg {
            Message::MemoryChunk(c) => {
                job.wire = chunk_wire_bytes(&c);
                job.gpa = c.gpa;
                job.page_count = c.page_count;
                job.data_map.clear();
                job.data_map.extend_from_slice(c.data_map);
                job.data.clear();
                job.data.extend_from_slice(c.data);
            }
            Message::SparseChunk(c) => {
                c.expand(&mut job.data, &mut job.data_map);
                job.wire = (crate::protocol::HEADER_LEN + 16 + c.body.len()) as u64;
                job.gpa = c.gpa;
                job.page_count = c.page_count;
            }
            Message::PostcopyDone { source_info } => return Ok(source_info.to_vec()),
            Message::Abort { reason } => {
                return Err(ReceiveError::PeerAborted(reason.to_string()).into())
            }
            other => {
                return Err(ReceiveError::Unexpected {
                    found: other.kind(),
                    during: "postcopy",
                }
                .into())
            }
        }
        let (gpa, count) = (job.gpa, u64::from(job.page_count));
        if !arrived.contains_range(gpa, count) {
            return Err(ReceiveError::OutsideRam {
                gpa,
                pages: job.page_count,
            }
            .into());
        }
        if let Some(i) = (0..count).find(|&i| arrived.contains(gpa + i * PAGE)) {
            return Err(ReceiveError::PostcopyPageTwice {
                gpa: gpa + i * PAGE,
            }
            .into());
        }
        arrived.insert_range(gpa, count * PAGE);
        if failed.load(Ordering::Relaxed) || jobs.send(job).is_err() {
            return Err(ReadStop::Placers);
        }
    }
}

/// Places one chunk, then records its pages as received. Placed first, recorded after: a
/// fault seen in between asks again, which the source ignores (the page left it already).
fn place_chunk(
    ram: &dyn PostcopyRam,
    pages: &Mutex<DestPages>,
    progress: &MigrationProgress,
    job: &PlaceJob,
) -> Result<(), ReceiveError> {
    let chunk = job.chunk();
    for run in chunk.runs() {
        match run {
            PageRun::Data { gpa, data } => ram.place(gpa, data),
            PageRun::Zero { gpa, pages } => ram.place_zero(gpa, u64::from(pages)),
        }
        .map_err(vm_err("postcopy place"))?;
    }
    let left = {
        let mut p = lock(pages);
        p.received
            .insert_range(chunk.gpa, u64::from(chunk.page_count) * PAGE);
        p.received.total_pages() - p.received.count()
    };
    progress.update(|i| {
        i.ram.duplicate += u64::from(chunk.zero_pages());
        i.ram.normal += u64::from(chunk.data_pages());
        i.ram.normal_bytes += chunk.data.len() as u64;
        i.ram.transferred += job.wire;
        i.ram.remaining = left * PAGE;
    });
    Ok(())
}

/// Takes up a postcopy migration whose link broke ([`SendError::PostcopyLinkLost`]) over a
/// new connection `stream` to the same destination, which waits for it: it says which pages
/// it still misses, and they are sent as before. `vm` is the paused source VM of that
/// migration. On failure the VM stays paused (`postcopy-paused`) for another try.
pub fn resume_postcopy<V: SourceVm + Sync + ?Sized, S: MigrationStream>(
    vm: &V,
    stream: S,
    opts: &super::SendOptions,
    progress: &MigrationProgress,
) -> Result<crate::MigrationInfo, SendError> {
    let watched = match Watched::new(stream, opts.io_timeout, progress.clone()) {
        Ok(w) => w,
        Err(e) => {
            let e = SendError::PostcopyLinkLost(format!("the new connection: {e}"));
            progress.fail(MigrationStatus::PostcopyPaused, &e.to_string());
            return Err(e);
        }
    };
    // Plain chunks (no peer features): the new connection has no `Hello` to say more.
    let mut sender = Sender {
        paused: true,
        postcopy_started: true,
        ..Sender::new(vm, opts, progress, watched, Vec::new())
    };
    match sender.recover() {
        Ok(()) => {
            progress.set_status(MigrationStatus::Completed);
            Ok(progress.snapshot())
        }
        Err(e) => Err(sender.fail(e)),
    }
}

impl<V: SourceVm + Sync + ?Sized, S: MigrationStream> Sender<'_, V, S> {
    fn recover(&mut self) -> Result<(), SendError> {
        self.progress.set_status(MigrationStatus::PostcopyActive);
        let reader = self.request_reader()?;
        self.send(&Message::PostcopyResume)?;
        self.flush()?;
        let ram = self.vm.ram_layout();
        let mut pending = PageSet::new(&ram);
        self.conn.get_mut().set_idle(self.opts.confirm_timeout);
        loop {
            match self.conn.read_message()? {
                Message::PostcopyMissing(runs) if runs.is_empty() => break,
                Message::PostcopyMissing(runs) => {
                    for (gpa, pages) in runs {
                        if !pending.contains_range(gpa, u64::from(pages)) {
                            return Err(SendError::Vm {
                                op: "postcopy resume",
                                reason: format!(
                                    "the destination misses {pages} pages at {gpa:#x}, not RAM"
                                ),
                            });
                        }
                        pending.insert_range(gpa, u64::from(pages) * PAGE);
                    }
                }
                other => return Err(unexpected(other, "waiting for PostcopyMissing")),
            }
        }
        self.conn.get_mut().set_idle(self.opts.io_timeout);
        log::info!(
            "postcopy taken up again: the destination misses {} pages",
            pending.count()
        );
        self.progress.update(|i| {
            i.ram.total = ram.iter().map(|r| r.size).sum();
            i.ram.remaining = pending.count() * PAGE;
            i.error_desc = None;
        });
        self.stream_rest(pending, reader)
    }
}
