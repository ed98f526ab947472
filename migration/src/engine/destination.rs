//! The receiving side: handshake and configuration check, pages into guest RAM, state,
//! resume, confirmation. Nothing is resumed unless every page of RAM arrived with a good
//! checksum and the state was restored.

use std::io::{self, Write};
use std::time::{Duration, Instant};

use super::{DestinationVm, DEFAULT_RECEIVE_IDLE_TIMEOUT};
use crate::page_set::PageSet;
use crate::protocol::{
    encode, Hello, MemoryChunk, Message, MessageReader, MessageType, PageRun, ProtocolError,
    PAGE_SIZE, PROTOCOL_VERSION,
};
use crate::stats::{IterationStats, MigrationInfo, MigrationProgress, MigrationStatus};
use crate::transport::{is_cancelled, MigrationStream, Watched};

const PAGE: u64 = PAGE_SIZE as u64;

/// How a migration is received.
#[derive(Clone, Debug)]
pub struct ReceiveOptions {
    /// The source counts as gone when no byte arrives for this long.
    pub idle_timeout: Duration,
}

impl Default for ReceiveOptions {
    fn default() -> Self {
        ReceiveOptions {
            idle_timeout: DEFAULT_RECEIVE_IDLE_TIMEOUT,
        }
    }
}

/// Why an incoming migration failed. The VM was not resumed, except after
/// [`ReceiveError::ConfirmationFailed`].
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
}

fn vm_err(op: &'static str) -> impl FnOnce(String) -> ReceiveError {
    move |reason| ReceiveError::Vm { op, reason }
}

/// Receives a migration from `stream` (accepted from a source running
/// [`super::send_migration`]) into `vm`, keeping `progress` current. Returns once the VM runs
/// here and the source was told; the statistics are then the source's, with the downtime
/// measured here. On error nothing was resumed (see [`ReceiveError::ConfirmationFailed`]
/// for the one exception), the source was told when possible, and the vmm should discard
/// the half-built VM.
pub fn receive_migration<V: DestinationVm + ?Sized, S: MigrationStream>(
    vm: &mut V,
    stream: S,
    opts: &ReceiveOptions,
    progress: &MigrationProgress,
) -> Result<MigrationInfo, ReceiveError> {
    let watched = match Watched::new(stream, opts.idle_timeout, progress.clone()) {
        Ok(w) => w,
        Err(e) => {
            let e = ReceiveError::Stream(e);
            progress.fail(MigrationStatus::Failed, &e.to_string());
            return Err(e);
        }
    };
    let mut conn = MessageReader::new(watched);
    let result = receive(vm, &mut conn, progress);
    if let Err(e) = result {
        let cancelled = progress.is_cancelled() || is_cancel_io(&e);
        let e = if cancelled {
            ReceiveError::Cancelled
        } else {
            e
        };
        let peer_knows = matches!(e, ReceiveError::PeerAborted(_));
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

fn unexpected(msg: Message<'_>, during: &'static str) -> ReceiveError {
    match msg {
        Message::Abort { reason } => ReceiveError::PeerAborted(reason.to_string()),
        other => ReceiveError::Unexpected {
            found: other.kind(),
            during,
        },
    }
}

fn receive<V: DestinationVm + ?Sized, S: MigrationStream>(
    vm: &mut V,
    conn: &mut MessageReader<Watched<S>>,
    progress: &MigrationProgress,
) -> Result<(), ReceiveError> {
    progress.set_status(MigrationStatus::Setup);
    match conn.read_message()? {
        Message::Hello(h) => log::info!("migration source: {} (protocol {})", h.build, h.version),
        other => return Err(unexpected(other, "waiting for Hello")),
    }
    let build = super::build_string();
    send_step(
        conn,
        &Message::Hello(Hello {
            version: PROTOCOL_VERSION,
            features: 0,
            build: &build,
        }),
    )?;

    let ram = match conn.read_message()? {
        Message::Config(c) => {
            let checked = vm.check_config(c.vm_config, &c.ram).and_then(|built| {
                if built == c.ram {
                    Ok(c.ram)
                } else {
                    Err(format!(
                        "the RAM layout built here {built:x?} differs from the source's {:x?}",
                        c.ram
                    ))
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
    let mut state: Option<(Vec<u8>, Vec<u8>)> = None;
    let mut last_iteration = Instant::now();
    let (paused_us, source_info) = loop {
        match conn.read_message()? {
            Message::MemoryChunk(chunk) => {
                pages.store(vm, &chunk)?;
                let wire = chunk_wire_bytes(&chunk);
                progress.update(|i| {
                    i.ram.duplicate += u64::from(chunk.zero_pages());
                    i.ram.normal += u64::from(chunk.data_pages());
                    i.ram.normal_bytes += chunk.data.len() as u64;
                    i.ram.transferred += wire;
                });
            }
            Message::IterationDone {
                iteration,
                pages: n,
                bytes,
            } => {
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
            }
            Message::State { vcpus, devices } => {
                if state.is_some() {
                    return Err(ReceiveError::Duplicate(MessageType::State));
                }
                progress.set_status(MigrationStatus::Device);
                state = Some((vcpus.to_vec(), devices.to_vec()));
            }
            Message::Complete(c) => break (c.paused_us, c.source_info.to_vec()),
            other => return Err(unexpected(other, "receiving memory")),
        }
    };
    let complete_at = Instant::now();

    // Everything arrived and every checksum matched: only now may the VM run.
    let missing = pages.received.total_pages() - pages.received.count();
    if let Some(first_gpa) = pages.received.first_missing() {
        return Err(ReceiveError::MissingPages {
            first_gpa,
            missing,
            total: pages.received.total_pages(),
        });
    }
    let (vcpus, devices) = state.ok_or(ReceiveError::MissingState)?;
    vm.restore_state(&vcpus, &devices)
        .map_err(vm_err("restore_state"))?;
    vm.resume().map_err(vm_err("resume"))?;
    let downtime_us = paused_us.saturating_add(complete_at.elapsed().as_micros() as u64);

    // Report the source's figures (the source exits), with the downtime measured here.
    let mut info = serde_json::from_slice::<MigrationInfo>(&source_info)
        .unwrap_or_else(|_| progress.snapshot());
    info.downtime = Some(downtime_us.div_ceil(1000));
    info.ram.remaining = 0;
    info.expected_downtime = None;
    info.error_desc = None;
    progress.replace(info);
    progress.set_status(MigrationStatus::Completed);

    send(conn, &Message::Resumed { downtime_us }).map_err(ReceiveError::ConfirmationFailed)?;
    let _ = conn.get_mut().flush();
    Ok(())
}

/// Wire bytes of a chunk frame (header, fixed fields, page map, data).
fn chunk_wire_bytes(c: &MemoryChunk<'_>) -> u64 {
    (crate::protocol::HEADER_LEN + 16 + c.data_map.len() + c.data.len()) as u64
}

/// Which pages arrived, and which hold data written here (the rest still read as zero).
struct Pages {
    received: PageSet,
    written: PageSet,
}

impl Pages {
    fn store<V: DestinationVm + ?Sized>(
        &mut self,
        vm: &mut V,
        chunk: &MemoryChunk<'_>,
    ) -> Result<(), ReceiveError> {
        if !self
            .received
            .contains_range(chunk.gpa, u64::from(chunk.page_count))
        {
            return Err(ReceiveError::OutsideRam {
                gpa: chunk.gpa,
                pages: chunk.page_count,
            });
        }
        for run in chunk.runs() {
            match run {
                PageRun::Data { gpa, data } => {
                    vm.write_pages(gpa, data).map_err(vm_err("write_pages"))?;
                    self.written.insert_range(gpa, data.len() as u64);
                }
                PageRun::Zero { gpa, pages } => self.zero(vm, gpa, u64::from(pages))?,
            }
        }
        self.received
            .insert_range(chunk.gpa, u64::from(chunk.page_count) * PAGE);
        Ok(())
    }

    /// Zeroes the pages of a zero run that hold older data; untouched pages already read
    /// as zero and stay untouched (not even faulted in).
    fn zero<V: DestinationVm + ?Sized>(
        &mut self,
        vm: &mut V,
        gpa: u64,
        pages: u64,
    ) -> Result<(), ReceiveError> {
        let mut p = 0;
        while p < pages {
            if !self.written.contains(gpa + p * PAGE) {
                p += 1;
                continue;
            }
            let start = p;
            while p < pages && self.written.contains(gpa + p * PAGE) {
                p += 1;
            }
            vm.zero_pages(gpa + start * PAGE, p - start)
                .map_err(vm_err("zero_pages"))?;
        }
        Ok(())
    }
}

fn is_cancel_io(e: &ReceiveError) -> bool {
    matches!(e, ReceiveError::Protocol(ProtocolError::Io { source, .. }) if is_cancelled(source))
}
