//! The API's migration endpoints, served by the `vm-migration` engine over a
//! [`Machine`](crate::vm::Machine).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_migration::{
    receive_migration_from, send_migration_parallel, MigrationProgress, ReceiveError,
    ReceiveOptions, SendOptions,
};

use super::tls::{ClientTls, ServerTls};
use super::transport::{LaneAcceptor, Listener, Stream};
use super::{MachineDestination, MachineSource};
use crate::api::migration::{
    MemoryMode, ReceiveMigration, SendMigration, SwitchOver, TimeoutStrategy,
};
use crate::api::{ApiError, MigrationHandler, Vmm};
use crate::events;

/// How long the source tries to reach the destination.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The source process ends this long after its migration's success was told (the answer
/// of a request that waited, or a `vm.migration-info` saying `completed`), so that the
/// answer reaches the client first.
const EXIT_DELAY: Duration = Duration::from_millis(300);
/// Longest wait of a source whose success nobody waited for, for a `vm.migration-info`
/// to report it, before it ends anyway.
const OUTCOME_KEPT: Duration = Duration::from_secs(30);
/// How often that wait looks.
const OUTCOME_POLL: Duration = Duration::from_millis(20);

/// Live migration for the API: at most one migration at a time (the API layer ensures
/// it), whose progress stays readable after it ended.
#[derive(Default)]
pub struct LiveMigration {
    progress: Mutex<Option<MigrationProgress>>,
    /// The send `prepare_send` started, for `send` to go on with.
    prepared: Mutex<Option<MigrationProgress>>,
    /// `info` has reported the current migration `completed`.
    completion_told: Arc<AtomicBool>,
}

impl LiveMigration {
    fn start(&self) -> MigrationProgress {
        let p = MigrationProgress::new();
        self.completion_told.store(false, Ordering::SeqCst);
        *self.progress.lock().unwrap_or_else(|e| e.into_inner()) = Some(p.clone());
        p
    }

    /// The checks of a send that need no connection (also made by `prepare_send`).
    fn check_send(vmm: &Vmm, req: &SendMigration) -> Result<bool, ApiError> {
        const ACTION: &str = "vm.send-migration";
        let local_memory = match req.memory_mode {
            MemoryMode::Precopy | MemoryMode::Postcopy => false,
            MemoryMode::MemFDs => true,
        };
        let machine = vmm.machine(ACTION)?;
        if local_memory && !machine.config.shared_memory() {
            return Err(ApiError::BadRequest(
                "memory_mode MemFDs hands guest RAM over as files, but this VM's RAM is not \
                 shared memory: start it with --memory shared=on"
                    .into(),
            ));
        }
        Ok(local_memory)
    }

    /// Ends the process once the VM has moved: soon after a waited-for success, else once
    /// `vm.migration-info` has reported it (a client polling it learns the outcome before
    /// the socket goes), or after [`OUTCOME_KEPT`] at the latest.
    fn exit_after_success(&self, vmm: &Arc<Vmm>, waited: bool) {
        let vmm = vmm.clone();
        let told = self.completion_told.clone();
        std::thread::spawn(move || {
            let end = Instant::now() + OUTCOME_KEPT;
            while !waited && !told.load(Ordering::SeqCst) && Instant::now() < end {
                std::thread::sleep(OUTCOME_POLL);
            }
            std::thread::sleep(EXIT_DELAY);
            vmm.request_exit(0);
        });
    }

    /// `resume: true` takes up a postcopy migration whose link broke, and nothing else.
    fn check_resume(&self, req: &SendMigration) -> Result<(), ApiError> {
        let paused = self
            .current()
            .is_some_and(|p| p.status() == vm_migration::MigrationStatus::PostcopyPaused);
        match (req.resume, paused) {
            (true, false) => Err(ApiError::BadRequest(
                "resume=true: no postcopy migration of this VM is paused (migration-info \
                 says postcopy-paused when one is)"
                    .into(),
            )),
            (false, true) => Err(ApiError::BadRequest(
                "this VM's postcopy migration lost its link: only resume=true (to the same \
                 destination) may move it now"
                    .into(),
            )),
            _ => Ok(()),
        }
    }

    fn current(&self) -> Option<MigrationProgress> {
        self.progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The event monitor's `failed` event for a migration that returns early (a `?`) once
/// its `started` event is out; [`Outcome::completed`] and [`Outcome::failed`] say how it
/// ended otherwise, with detail.
struct Outcome(&'static str);

impl Outcome {
    fn started(started: &'static str, failed: &'static str, peer: &str) -> Outcome {
        events::emit("vm", started, &[("url", peer)]);
        Outcome(failed)
    }

    fn completed(self, event: &'static str, properties: &[(&str, &str)]) {
        events::emit("vm", event, properties);
        std::mem::forget(self);
    }

    fn failed(self, error: &str) {
        events::emit("vm", self.0, &[("error", error)]);
        std::mem::forget(self);
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        events::emit("vm", self.0, &[]);
    }
}

fn failed(action: &'static str, reason: impl ToString) -> ApiError {
    ApiError::Failed {
        action,
        reason: reason.to_string(),
    }
}

impl LiveMigration {
    /// The send of [`MigrationHandler::send`], its progress in `progress`.
    fn send_with(
        &self,
        vmm: &Arc<Vmm>,
        req: SendMigration,
        progress: &MigrationProgress,
    ) -> Result<(), ApiError> {
        const ACTION: &str = "vm.send-migration";
        // Again: the VM may have changed since prepare_send (not while the operation
        // holds it, but a caller may skip prepare_send).
        let local_memory = Self::check_send(vmm, &req)?;
        // Loaded again (the API checked them): they may have changed since.
        let tls = req
            .tls_dir
            .as_deref()
            .map(ClientTls::load)
            .transpose()
            .map_err(|e| failed(ACTION, format!("tls_dir: {e}")))?;
        let machine = vmm.machine(ACTION)?;
        let destination = req.destination.to_string();
        let outcome = Outcome::started("migration-started", "migration-failed", &destination);
        log::info!(
            "migrating to {} ({}{})",
            req.destination,
            if local_memory {
                "RAM handed over as files".to_string()
            } else {
                format!("{} connection(s)", req.connections)
            },
            if tls.is_some() { ", TLS" } else { "" }
        );
        // Each connection is its own TLS session. The first one's handshake is done here;
        // the extra ones' run when the engine first uses them, after announcing them (the
        // destination accepts them only then).
        // vm.cancel-migration reaches the handshakes, the deferred ones too.
        let cancel: super::tls::CancelCheck = {
            let progress = progress.clone();
            Arc::new(move || progress.is_cancelled())
        };
        let connect = |later: bool| {
            let url = &req.destination;
            Stream::connect_tls(url, CONNECT_TIMEOUT, tls.as_ref(), later, cancel.clone()).map_err(
                |e| {
                    progress.set_status(vm_migration::MigrationStatus::Failed);
                    failed(ACTION, format!("cannot connect to {url}: {e}"))
                },
            )
        };
        let stream = connect(false)?;
        let extra = if local_memory {
            Vec::new()
        } else {
            (1..req.connections)
                .map(|_| connect(true))
                .collect::<Result<Vec<_>, _>>()?
        };
        let strategy = match req.timeout_strategy {
            TimeoutStrategy::Cancel => vm_migration::TimeoutStrategy::Cancel,
            TimeoutStrategy::Ignore => vm_migration::TimeoutStrategy::Ignore,
        };
        let opts = SendOptions {
            local_memory,
            auto_converge: req.auto_converge,
            switch_over: match req.switch_over {
                SwitchOver::Fits => vm_migration::SwitchOver::Fits,
                SwitchOver::MinDowntime => vm_migration::SwitchOver::MinDowntime,
            },
            postcopy_after_passes: req.postcopy_after_passes,
            ..SendOptions::new(req.downtime_ms, req.timeout_s, strategy)
        };
        let source = MachineSource::new(machine.clone());
        // The guest yields to its own migration: on a host with no spare CPU its vCPUs
        // otherwise take the CPU its pages need to leave, and dirty them again meanwhile.
        let source = if req.yield_vcpus {
            source.yielding_vcpus()
        } else {
            source
        };
        let result = if req.resume {
            drop(extra);
            vm_migration::engine::resume_postcopy(&source, stream, &opts, progress)
        } else {
            send_migration_parallel(&source, stream, extra, &opts, progress)
        };
        // Before the machine goes (its vCPUs at their own priority again, where they still
        // yielded: a thread id is reused once its thread ended).
        drop(source);
        drop(machine);
        match result {
            Ok(info) => {
                log::info!(
                    "migration to {} completed: {:?} ms total, {:?} ms downtime, {} bytes",
                    req.destination,
                    info.total_time,
                    info.downtime,
                    info.ram.transferred
                );
                outcome.completed(
                    "migration-completed",
                    &[
                        ("url", &destination),
                        ("downtime_ms", &info.downtime.unwrap_or(0).to_string()),
                        ("total_ms", &info.total_time.unwrap_or(0).to_string()),
                    ],
                );
                // The VM runs on the destination now: this one is gone (torn down here,
                // before answering), and so is the process, once the outcome is out.
                let gone = vmm.with_vm(|vm| vm.and_then(|vm| vm.take_machine()));
                drop(gone);
                self.exit_after_success(vmm, req.wait_for_completion);
                Ok(())
            }
            Err(e) => {
                log::error!("migration to {} failed: {e}", req.destination);
                outcome.failed(&e.to_string());
                Err(failed(ACTION, e))
            }
        }
    }
}

impl MigrationHandler for LiveMigration {
    fn prepare_send(&self, vmm: &Arc<Vmm>, req: &SendMigration) -> Result<(), ApiError> {
        Self::check_send(vmm, req)?;
        self.check_resume(req)?;
        *self.prepared.lock().unwrap_or_else(|e| e.into_inner()) = Some(self.start());
        Ok(())
    }

    fn send(&self, vmm: &Arc<Vmm>, req: SendMigration) -> Result<(), ApiError> {
        let prepared = self
            .prepared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if prepared.is_none() {
            self.check_resume(&req)?;
        }
        let progress = prepared.unwrap_or_else(|| self.start());
        let r = self.send_with(vmm, req, &progress);
        if let Err(e) = &r {
            // Whatever failed, early or in the engine, `vm.migration-info` says why with
            // the words of the error (the engine's own failures are already there so).
            let reason = match e {
                ApiError::Failed { reason, .. } => reason.clone(),
                e => e.to_string(),
            };
            use vm_migration::MigrationStatus as S;
            let status = match progress.status() {
                S::Cancelled => S::Cancelled,
                S::Failed => S::Failed,
                // The VM moved: saying "failed" would invite resuming this stale copy.
                S::PostcopyPaused => S::PostcopyPaused,
                _ if progress.is_cancelled() => S::Cancelled,
                _ => S::Failed,
            };
            progress.fail(status, &reason);
        }
        r
    }

    fn receive(&self, vmm: &Arc<Vmm>, req: ReceiveMigration) -> Result<(), ApiError> {
        const ACTION: &str = "vm.receive-migration";
        let tls = req
            .tls_dir
            .as_deref()
            .map(ServerTls::load)
            .transpose()
            .map_err(|e| failed(ACTION, format!("tls_dir: {e}")))?;
        let listener = Listener::bind(&req.receiver)
            .map_err(|e| failed(ACTION, format!("cannot listen on {}: {e}", req.receiver)))?;
        let progress = self.start();
        let receiver = req.receiver.to_string();
        let outcome = Outcome::started(
            "migration-receive-started",
            "migration-receive-failed",
            &receiver,
        );
        log::info!(
            "waiting for a migration on {}{}",
            req.receiver,
            if tls.is_some() { " (TLS only)" } else { "" }
        );
        // A connection that fails its TLS handshake fails this receive, saying why (as
        // any other broken first connection does); another vm.receive-migration may follow.
        let stream = listener
            .accept_until(|| progress.is_cancelled())
            .and_then(|s| s.accept_tls(tls.as_ref(), &|| progress.is_cancelled()))
            .map_err(|e| {
                let reason = format!("on {}: {e}", req.receiver);
                if tls.is_some() && !progress.is_cancelled() {
                    log::error!("incoming migration failed: {reason}");
                    progress.fail(vm_migration::MigrationStatus::Failed, &reason);
                }
                failed(ACTION, reason)
            })?;
        // A source that starts TLS against this plain receiver: say so on both sides (the
        // engine would only see a bad magic number).
        if tls.is_none() && stream.peer_starts_tls(&|| progress.is_cancelled()) {
            stream.refuse_in_plain(
                "this destination was asked to receive without tls_dir: plain TCP only",
            );
            let reason = format!(
                "on {}: the source started a TLS handshake, but this receiver has no tls_dir \
                 (give vm.receive-migration one, or the source none)",
                req.receiver
            );
            log::error!("incoming migration failed: {reason}");
            progress.fail(vm_migration::MigrationStatus::Failed, &reason);
            return Err(failed(ACTION, reason));
        }
        // The listener stays open for the extra connections the source may announce; each
        // is its own TLS session, checked as the first, handshaken on its own thread (see
        // LaneAcceptor).
        let cancel: super::tls::CancelCheck = {
            let progress = progress.clone();
            Arc::new(move || progress.is_cancelled())
        };
        let mut dest = MachineDestination::default();
        dest.user_device_sockets = req.user_devices.iter().map(|u| u.socket.clone()).collect();
        let result = std::thread::scope(|scope| {
            let mut lanes = LaneAcceptor::new(&listener, tls.clone(), scope, cancel);
            let mut accept = |timeout: Duration| lanes.accept(timeout);
            receive_migration_from(
                &mut dest,
                stream,
                Some(&mut accept),
                &ReceiveOptions::default(),
                &progress,
            )
        });
        drop(listener);
        match result {
            Ok(info) => {
                // Past `Resumed`: the source has stopped its copy. A vCPU thread that
                // failed to start now leaves no VM anywhere (it cannot happen short of a
                // panic at the thread's start).
                let machine = match dest.take_started() {
                    Ok(m) => m,
                    Err(e) => {
                        let e =
                            format!("the VM could not run here after the source let it go: {e}");
                        log::error!("{e}");
                        progress.fail(vm_migration::MigrationStatus::Failed, &e);
                        outcome.failed(&e);
                        return Err(failed(ACTION, e));
                    }
                };
                log::info!(
                    "incoming migration completed: {:?} ms total, {} bytes; the VM runs here",
                    info.total_time,
                    info.ram.transferred
                );
                vmm.install(machine.config.clone(), Arc::new(machine));
                outcome.completed(
                    "migration-receive-completed",
                    &[
                        ("url", &receiver),
                        ("total_ms", &info.total_time.unwrap_or(0).to_string()),
                    ],
                );
                Ok(())
            }
            Err(e @ ReceiveError::PostcopyPaused { .. }) => {
                // The VM ran here and its missing pages are still at the source: keep it,
                // paused, rather than lose the only up-to-date copy of its other pages.
                log::error!("incoming migration: {e}");
                match dest.take_started() {
                    Ok(machine) => vmm.install(machine.config.clone(), Arc::new(machine)),
                    Err(e) => log::error!("the paused VM could not be kept: {e}"),
                }
                outcome.failed(&e.to_string());
                Err(failed(ACTION, e))
            }
            Err(e) => {
                // Nothing half-received runs: the built VM (if any) is dropped here. After
                // a lost confirmation it was running already, and is stopped the same way.
                if matches!(
                    e,
                    ReceiveError::ConfirmationFailed(_) | ReceiveError::SourceResumed(_)
                ) {
                    log::error!("the VM started but the source did not learn it: stopping it");
                }
                drop(dest);
                log::error!("incoming migration failed: {e}");
                outcome.failed(&e.to_string());
                Err(failed(ACTION, e))
            }
        }
    }

    fn info(&self, _vmm: &Arc<Vmm>) -> Result<serde_json::Value, ApiError> {
        let p = self
            .current()
            .ok_or_else(|| ApiError::NotFound("no migration has run in this VMM".into()))?;
        let info = p.to_json();
        if info["status"] == "completed" {
            self.completion_told.store(true, Ordering::SeqCst);
        }
        Ok(info)
    }

    fn start_postcopy(&self, _vmm: &Arc<Vmm>) -> Result<(), ApiError> {
        use vm_migration::MigrationStatus as S;
        match self.current() {
            Some(p) if matches!(p.status(), S::Setup | S::Active) => {
                p.request_postcopy();
                log::info!("postcopy asked for: switching after the current pass");
                Ok(())
            }
            Some(p) if p.status() == S::PostcopyActive => Ok(()),
            _ => Err(ApiError::NotFound(
                "no migration in precopy to switch to postcopy".into(),
            )),
        }
    }

    fn postcopy_paused(&self) -> bool {
        self.current()
            .is_some_and(|p| p.status() == vm_migration::MigrationStatus::PostcopyPaused)
    }

    fn cancel(&self, _vmm: &Arc<Vmm>) -> Result<(), ApiError> {
        use vm_migration::MigrationStatus as S;
        match self.current() {
            // On the destination this ends the wait for the source (the VM stays paused).
            Some(p) if p.status() == S::PostcopyPaused => {
                p.cancel();
                Ok(())
            }
            Some(p) if p.status() == S::PostcopyActive => Err(ApiError::BadRequest(
                "the migration is in postcopy: the VM runs on the destination and misses \
                     pages only the source has, so it cannot be cancelled"
                    .into(),
            )),
            Some(p) if !p.status().is_finished() => {
                p.cancel();
                Ok(())
            }
            _ => Err(ApiError::NotFound("no migration is in progress".into())),
        }
    }
}
