//! QMP commands on the [`Vmm`], with QEMU's names, arguments and answers (QEMU 7.2's
//! schema), and the lifecycle events turned into QMP's `STOP`, `RESUME`, `MIGRATION`,
//! `SHUTDOWN`.
//!
//! `migrate` and `migrate-incoming` answer `{}` at once, as QEMU does, and run on a thread
//! of their own; `query-migrate` and the `MIGRATION` events follow them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};

use serde_json::{json, Map, Value};

use super::protocol::{self, Command, Failure};
use super::server::{no_data, Clients, Conn};
use crate::api::migration::{
    parse_receive_migration, parse_send_migration, MigrationUrl, SwitchOver,
};
use crate::api::{ApiError, VmState, Vmm};

/// The commands served, in `query-commands`' order.
pub const COMMANDS: &[&str] = &[
    "qmp_capabilities",
    "query-status",
    "stop",
    "cont",
    "system_powerdown",
    "migrate",
    "migrate-incoming",
    "migrate-set-parameters",
    "query-migrate-parameters",
    "query-migrate",
    "migrate_cancel",
    "migrate-start-postcopy",
    "calc-dirty-rate",
    "query-dirty-rate",
    "set-vcpu-dirty-limit",
    "query-vcpu-dirty-limit",
    "cancel-vcpu-dirty-limit",
    "query-version",
    "query-commands",
    "quit",
];

/// QEMU's `migrate-set-parameters` parameters Ferry knows but does not honour: refused,
/// saying so (others are "unexpected", as QEMU says).
const UNSUPPORTED_PARAMETERS: &[&str] = &[
    "announce-initial",
    "announce-max",
    "announce-rounds",
    "announce-step",
    "compress-level",
    "compress-threads",
    "compress-wait-thread",
    "decompress-threads",
    "throttle-trigger-threshold",
    "cpu-throttle-initial",
    "cpu-throttle-increment",
    "cpu-throttle-tailslow",
    "tls-creds",
    "tls-hostname",
    "tls-authz",
    "max-postcopy-bandwidth",
    "max-cpu-throttle",
    "multifd-compression",
    "multifd-zlib-level",
    "multifd-zstd-level",
    "xbzrle-cache-size",
    "block-incremental",
    "block-bitmap-mapping",
    "x-checkpoint-delay",
];

/// Longest wait of `migrate-incoming` for its listener before answering anyway.
const LISTEN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// QEMU's largest `downtime-limit`: 2000 s, in ms.
const MAX_DOWNTIME_MS: u64 = 2_000_000;
/// QEMU's default `max-bandwidth`: 128 MiB/s (reported, not enforced by Ferry).
const DEFAULT_MAX_BANDWIDTH: u64 = 128 << 20;

/// Lets a started background job go on (see [`Shared::in_background`]).
type Go = std::sync::mpsc::Sender<()>;

/// What `migrate-set-parameters` set, used by the next `migrate`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parameters {
    pub downtime_limit: u64,
    pub max_bandwidth: u64,
    /// Used as the number of TCP connections (Ferry's `connections`); 1 by default.
    pub multifd_channels: u64,
    /// Ferry's `x-ferry-switch-over`: when to pause for the last pass.
    pub switch_over: SwitchOver,
}

impl Default for Parameters {
    fn default() -> Self {
        Parameters {
            downtime_limit: crate::api::migration::DEFAULT_DOWNTIME_MS,
            max_bandwidth: DEFAULT_MAX_BANDWIDTH,
            multifd_channels: 1,
            switch_over: SwitchOver::default(),
        }
    }
}

impl Parameters {
    fn to_json(&self) -> Value {
        json!({
            "downtime-limit": self.downtime_limit,
            "max-bandwidth": self.max_bandwidth,
            "multifd-channels": self.multifd_channels,
            "x-ferry-switch-over": match self.switch_over {
                SwitchOver::Fits => "fits",
                SwitchOver::MinDowntime => "min-downtime",
            },
        })
    }

    /// Applies `migrate-set-parameters`' arguments, all or none.
    pub fn set(&mut self, args: &Map<String, Value>) -> Result<(), Failure> {
        let mut next = self.clone();
        for (k, v) in args {
            let int = || {
                v.as_u64().ok_or_else(|| {
                    Failure::generic(format!(
                        "Invalid parameter type for '{k}', expected: integer (got {v})"
                    ))
                })
            };
            match k.as_str() {
                "downtime-limit" => {
                    let ms = int()?;
                    if ms > MAX_DOWNTIME_MS {
                        return Err(Failure::generic(format!(
                            "Parameter 'downtime_limit' expects an integer in the range of 0 \
                             to 2000 seconds (got {ms} ms)"
                        )));
                    }
                    if ms == 0 {
                        return Err(Failure::generic(
                            "Parameter 'downtime_limit' is 0: Ferry needs at least 1 ms",
                        ));
                    }
                    next.downtime_limit = ms;
                }
                "max-bandwidth" => {
                    next.max_bandwidth = int()?;
                    log::info!(
                        "QMP: max-bandwidth {} bytes/s stored; Ferry does not cap a \
                         migration's bandwidth",
                        next.max_bandwidth
                    );
                }
                "multifd-channels" => {
                    let n = int()?;
                    if !(1..=255).contains(&n) {
                        return Err(Failure::generic(format!(
                            "Parameter 'multifd-channels' expects a value between 1 and 255 \
                             (got {n})"
                        )));
                    }
                    next.multifd_channels = n;
                }
                "x-ferry-switch-over" => {
                    next.switch_over = match v.as_str() {
                        Some("fits") => SwitchOver::Fits,
                        Some("min-downtime") => SwitchOver::MinDowntime,
                        _ => {
                            return Err(Failure::generic(format!(
                                "Parameter 'x-ferry-switch-over' expects 'fits' or \
                                 'min-downtime' (got {v})"
                            )))
                        }
                    };
                }
                k if UNSUPPORTED_PARAMETERS.contains(&k) => {
                    return Err(Failure::generic(format!(
                        "Parameter '{k}' is not supported by Ferry (it takes downtime-limit, \
                         max-bandwidth, multifd-channels, x-ferry-switch-over)"
                    )))
                }
                k => return Err(Failure::generic(format!("Parameter '{k}' is unexpected"))),
            }
        }
        *self = next;
        Ok(())
    }
}

/// What to do after answering.
pub enum Next {
    Serve,
    /// Run this once the answer is written (a background migration waits for it, so
    /// that its `MIGRATION` events follow the `{}` answer, as in QEMU).
    Then(Box<dyn FnOnce() + Send>),
    /// `quit`: end the process.
    Quit,
}

/// State shared by the connections.
pub struct Shared {
    pub vmm: Arc<Vmm>,
    pub(super) clients: Clients,
    params: Mutex<Parameters>,
    /// A `migrate-incoming` waits or receives.
    incoming: AtomicBool,
    /// A `migrate` runs.
    sending: AtomicBool,
    /// The VM left by a completed migration (`postmigrate`).
    migrated_out: AtomicBool,
    /// Told when a `migrate-incoming` listens (or failed before).
    listening: Mutex<Option<std::sync::mpsc::Sender<Result<(), Failure>>>>,
    /// Migration end events sent so far (a failure before the engine's first event is
    /// reported by the migration thread).
    migration_ends: AtomicU64,
    /// The last `calc-dirty-rate`.
    pub(super) rates: super::dirty::Rates,
}

/// A failure of the [`Vmm`], in QMP's words.
pub(super) fn api_failure(e: ApiError) -> Failure {
    match e {
        ApiError::NoVm => {
            Failure::generic("there is no VM (start ferry with --kernel, or migrate-incoming)")
        }
        e => Failure::generic(e.to_string()),
    }
}

/// Checks arguments against `(name, type, required)`; QEMU's messages.
pub(super) fn check_args(
    args: &Map<String, Value>,
    spec: &[(&str, &str, bool)],
) -> Result<(), Failure> {
    for k in args.keys() {
        if !spec.iter().any(|(n, _, _)| n == k) {
            return Err(Failure::generic(format!("Parameter '{k}' is unexpected")));
        }
    }
    for (name, ty, required) in spec {
        match args.get(*name) {
            None if *required => {
                return Err(Failure::generic(format!("Parameter '{name}' is missing")))
            }
            None => {}
            Some(v) => {
                let ok = match *ty {
                    "string" => v.is_string(),
                    "boolean" => v.is_boolean(),
                    "array" => v.is_array(),
                    _ => true,
                };
                if !ok {
                    return Err(Failure::generic(format!(
                        "Invalid parameter type for '{name}', expected: {ty}"
                    )));
                }
            }
        }
    }
    Ok(())
}

impl Shared {
    pub fn new(vmm: Arc<Vmm>) -> Shared {
        Shared {
            vmm,
            clients: Clients::default(),
            params: Mutex::new(Parameters::default()),
            incoming: AtomicBool::new(false),
            sending: AtomicBool::new(false),
            migrated_out: AtomicBool::new(false),
            migration_ends: AtomicU64::new(0),
            listening: Mutex::new(None),
            rates: Default::default(),
        }
    }

    pub fn parameters(&self) -> Parameters {
        self.params
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Runs one command of connection `conn`.
    pub(super) fn execute(
        self: &Arc<Self>,
        conn: &Conn,
        cmd: Command,
    ) -> (Result<Value, Failure>, Next) {
        let negotiated = conn.negotiated.load(Ordering::SeqCst);
        if cmd.name == "qmp_capabilities" {
            if negotiated {
                return (
                    Err(Failure::not_found(
                        "Capabilities negotiation is already complete, command ignored",
                    )),
                    Next::Serve,
                );
            }
            let r =
                check_args(&cmd.arguments, &[("enable", "array", false)]).and_then(|()| match cmd
                    .arguments
                    .get("enable")
                    .and_then(Value::as_array)
                {
                    Some(caps) if !caps.is_empty() => Err(Failure::generic(format!(
                        "Capability '{}' not available",
                        caps[0].as_str().unwrap_or("?")
                    ))),
                    _ => Ok(json!({})),
                });
            if r.is_ok() {
                conn.negotiated.store(true, Ordering::SeqCst);
            }
            return (r, Next::Serve);
        }
        if !negotiated {
            return (
                Err(Failure::not_found(
                    "Expecting capabilities negotiation with 'qmp_capabilities'",
                )),
                Next::Serve,
            );
        }
        let args = &cmd.arguments;
        let no_args = || check_args(args, &[]);
        let r = match cmd.name.as_str() {
            "query-status" => no_args().map(|()| self.status()),
            "stop" => no_args().and_then(|()| self.stop()),
            "cont" => no_args().and_then(|()| self.cont()),
            "system_powerdown" => no_args().and_then(|()| {
                self.vmm
                    .power_button()
                    .map(|()| json!({}))
                    .map_err(api_failure)
            }),
            "migrate" => return Self::started(self.migrate(args)),
            "migrate-incoming" => self.migrate_incoming(args),
            "migrate-set-parameters" => self
                .params
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .set(args)
                .map(|()| json!({})),
            "query-migrate-parameters" => no_args().map(|()| self.parameters().to_json()),
            "query-migrate" => no_args().map(|()| {
                // QEMU answers {} before any migration.
                self.vmm
                    .migration()
                    .info(&self.vmm)
                    .unwrap_or_else(|_| json!({}))
            }),
            "migrate_cancel" => no_args().map(|()| {
                // QEMU answers {} also when nothing runs.
                let _ = self.vmm.migration().cancel(&self.vmm);
                json!({})
            }),
            "migrate-start-postcopy" => no_args().and_then(|()| {
                self.vmm
                    .migration()
                    .start_postcopy(&self.vmm)
                    .map(|()| json!({}))
                    .map_err(api_failure)
            }),
            "calc-dirty-rate" => super::dirty::calc(self, args),
            "query-dirty-rate" => super::dirty::query(self, args),
            "set-vcpu-dirty-limit" => super::dirty::set_limit(self, args),
            "query-vcpu-dirty-limit" => super::dirty::query_limits(self, args),
            "cancel-vcpu-dirty-limit" => super::dirty::cancel_limit(self, args),
            "query-version" => no_args().map(|()| protocol::version()),
            "query-commands" => no_args()
                .map(|()| Value::Array(COMMANDS.iter().map(|c| json!({"name": c})).collect())),
            "quit" => {
                return match no_args() {
                    Ok(()) => (Ok(json!({})), Next::Quit),
                    Err(f) => (Err(f), Next::Serve),
                }
            }
            name => Err(Failure::not_found(format!(
                "The command {name} has not been found"
            ))),
        };
        (r, Next::Serve)
    }

    /// The answer of a command that started a background job, and the job's go-ahead.
    fn started(r: Result<Go, Failure>) -> (Result<Value, Failure>, Next) {
        match r {
            Ok(go) => (
                Ok(json!({})),
                Next::Then(Box::new(move || {
                    let _ = go.send(());
                })),
            ),
            Err(f) => (Err(f), Next::Serve),
        }
    }

    /// `query-status`: QEMU's RunState for the VM as it is.
    fn status(&self) -> Value {
        let (running, status) = match self.vmm.state() {
            Some(VmState::Running) => (true, "running"),
            Some(VmState::Paused) if self.sending.load(Ordering::SeqCst) => {
                // Paused by the migration's stop-and-copy.
                (false, "finish-migrate")
            }
            Some(VmState::Paused) => (false, "paused"),
            Some(VmState::Shutdown) if self.migrated_out.load(Ordering::SeqCst) => {
                (false, "postmigrate")
            }
            Some(VmState::Shutdown) => (false, "shutdown"),
            Some(VmState::Created) => (false, "prelaunch"),
            None if self.incoming.load(Ordering::SeqCst) => (false, "inmigrate"),
            None if self.migrated_out.load(Ordering::SeqCst) => (false, "postmigrate"),
            None => (false, "prelaunch"),
        };
        json!({"running": running, "singlestep": false, "status": status})
    }

    /// `stop`: pause; already paused is fine (as in QEMU).
    fn stop(&self) -> Result<Value, Failure> {
        match self.vmm.pause() {
            Ok(())
            | Err(ApiError::WrongState {
                state: VmState::Paused,
                ..
            }) => Ok(json!({})),
            Err(e) => Err(api_failure(e)),
        }
    }

    /// `cont`: resume; already running is fine (as in QEMU).
    fn cont(&self) -> Result<Value, Failure> {
        match self.vmm.resume() {
            Ok(())
            | Err(ApiError::WrongState {
                state: VmState::Running,
                ..
            }) => Ok(json!({})),
            Err(e) => Err(api_failure(e)),
        }
    }

    /// `migrate`: checks, then migrates on a thread of its own; `{}` once it started.
    fn migrate(self: &Arc<Self>, args: &Map<String, Value>) -> Result<Go, Failure> {
        check_args(
            args,
            &[
                ("uri", "string", true),
                ("blk", "boolean", false),
                ("inc", "boolean", false),
                ("detach", "boolean", false),
                ("resume", "boolean", false),
            ],
        )?;
        for flag in ["blk", "inc"] {
            if args.get(flag) == Some(&Value::Bool(true)) {
                return Err(Failure::generic(format!(
                    "{flag}=true: Ferry has no block migration (its disks are shared files)"
                )));
            }
        }
        let uri = args["uri"].as_str().unwrap_or_default();
        let url: MigrationUrl = uri
            .parse()
            .map_err(|e: crate::api::migration::UrlError| Failure::generic(e.to_string()))?;
        let p = self.parameters();
        let connections = match url {
            MigrationUrl::Unix(_) => 1,
            MigrationUrl::Tcp { .. } => p
                .multifd_channels
                .min(crate::api::migration::MAX_REQUESTED_CONNECTIONS),
        };
        // `resume`: take up a postcopy migration whose link broke (`postcopy-paused`), as
        // `vm.send-migration` with `"resume": true`; refused there, saying why, when none is.
        let body = json!({
            "destination_url": uri,
            "downtime_ms": p.downtime_limit,
            "connections": connections,
            "switch_over": p.switch_over,
            "resume": args.get("resume") == Some(&Value::Bool(true)),
        });
        let mut request = parse_send_migration(body.to_string().as_bytes()).map_err(api_failure)?;
        // Its end is told by QMP (the MIGRATION events): the source may end right after a
        // success, as it always did.
        request.wait_for_completion = true;
        let (me, me_too) = (self.clone(), self.clone());
        crate::api::migration::start_send(
            &self.vmm,
            "migrate",
            request,
            move || {
                me.sending.store(true, Ordering::SeqCst);
                me.migration_ends.load(Ordering::SeqCst)
            },
            move |ends, r| {
                me_too.sending.store(false, Ordering::SeqCst);
                if let Err(e) = r {
                    log::error!("QMP migrate: {e}");
                    me_too.failed_without_event(ends);
                }
            },
        )
        .map_err(api_failure)
    }

    /// `migrate-incoming`: waits for a migration on `uri` on a thread of its own.
    /// Answers once it listens (as QEMU, which binds before answering): a `migrate` sent
    /// to it right after the answer finds it; a failure to listen is the answer.
    fn migrate_incoming(self: &Arc<Self>, args: &Map<String, Value>) -> Result<Value, Failure> {
        check_args(args, &[("uri", "string", true)])?;
        let uri = args["uri"].as_str().unwrap_or_default();
        let body = json!({ "receiver_url": uri });
        let request = parse_receive_migration(body.to_string().as_bytes()).map_err(api_failure)?;
        let (ltx, lrx) = channel();
        *self.listening.lock().unwrap_or_else(|p| p.into_inner()) = Some(ltx);
        let me = self.clone();
        let go = self.in_background("qmp-incoming", move |started| {
            let vmm = &me.vmm;
            let op = vmm.begin("migrate-incoming", |vm| match vm {
                Some(vm) => Err(ApiError::VmExists {
                    action: "migrate-incoming",
                    state: vm.state(),
                }),
                None => Ok(()),
            });
            let op = match op {
                Ok(op) => op,
                Err(e) => return started(Err(api_failure(e))),
            };
            me.incoming.store(true, Ordering::SeqCst);
            started(Ok(()));
            let ends = me.migration_ends.load(Ordering::SeqCst);
            let r = vmm.migration().receive(vmm, request);
            me.incoming.store(false, Ordering::SeqCst);
            drop(op);
            if let Err(e) = r {
                log::error!("QMP migrate-incoming: {e}");
                let waiting = me
                    .listening
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take();
                match waiting {
                    // Before it listened: the answer says why.
                    Some(tx) => drop(tx.send(Err(api_failure(e)))),
                    None => me.failed_without_event(ends),
                }
            }
        });
        // Its `started` does not wait for the answer: the listening does.
        drop(go?);
        match lrx.recv_timeout(LISTEN_TIMEOUT) {
            Ok(r) => r.map(|()| json!({})),
            Err(_) => {
                log::warn!("QMP migrate-incoming: not listening after {LISTEN_TIMEOUT:?}");
                Ok(json!({}))
            }
        }
    }

    /// Runs `job` on a new thread; returns once it called `started` (its checks passed
    /// or failed). After a successful start, `started` returns when the [`Go`] is sent
    /// (or dropped): the answer is out by then.
    fn in_background(
        &self,
        name: &str,
        job: impl FnOnce(&dyn Fn(Result<(), Failure>)) + Send + 'static,
    ) -> Result<Go, Failure> {
        let (tx, rx) = channel();
        let (go, go_rx) = channel::<()>();
        let spawned = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let started = move |r: Result<(), Failure>| {
                    let ok = r.is_ok();
                    let _ = tx.send(r);
                    if ok {
                        let _ = go_rx.recv();
                    }
                };
                job(&started)
            });
        if let Err(e) = spawned {
            return Err(Failure::generic(format!("cannot start thread {name}: {e}")));
        }
        match rx.recv() {
            Ok(r) => r.map(|()| go),
            Err(_) => Err(Failure::generic(format!("{name} ended before starting"))),
        }
    }

    /// A migration that failed before the engine announced it: `MIGRATION failed`.
    fn failed_without_event(&self, ends_before: u64) {
        if self.migration_ends.load(Ordering::SeqCst) == ends_before {
            self.clients
                .broadcast("MIGRATION", json!({"status": "failed"}));
        }
    }

    /// `quit`: ends the process as `vmm.shutdown` does.
    pub(super) fn quit(&self) {
        self.clients.broadcast(
            "SHUTDOWN",
            json!({"guest": false, "reason": "host-qmp-quit"}),
        );
        self.vmm.shutdown_vmm();
        self.vmm.request_exit(0);
    }

    /// A lifecycle event ([`crate::events::emit`]) as QMP events. Called on the emitting
    /// thread, possibly with the VM lock held: touches no `Vmm` lock.
    pub(super) fn on_event(&self, source: &str, event: &str, properties: &[(&str, &str)]) {
        if source != "vm" {
            return;
        }
        let migration = |status: &str| {
            self.clients
                .broadcast("MIGRATION", json!({ "status": status }));
        };
        match event {
            "paused" => self.clients.broadcast("STOP", no_data()),
            "resumed" => self.clients.broadcast("RESUME", no_data()),
            "migration-started" | "migration-receive-started" => {
                if event == "migration-receive-started" {
                    let waiting = self
                        .listening
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .take();
                    if let Some(tx) = waiting {
                        let _ = tx.send(Ok(()));
                    }
                }
                migration("setup");
                migration("active");
            }
            "migration-completed" | "migration-receive-completed" => {
                if event == "migration-completed" {
                    self.migrated_out.store(true, Ordering::SeqCst);
                }
                self.migration_ends.fetch_add(1, Ordering::SeqCst);
                migration("completed");
                if event == "migration-receive-completed" {
                    // The arrived guest runs.
                    self.clients.broadcast("RESUME", no_data());
                }
            }
            "migration-failed" | "migration-receive-failed" => {
                self.migration_ends.fetch_add(1, Ordering::SeqCst);
                let cancelled = self
                    .vmm
                    .migration()
                    .info(&self.vmm)
                    .map(|i| i["status"] == "cancelled")
                    .unwrap_or(false);
                migration(if cancelled { "cancelled" } else { "failed" });
            }
            "shutdown" => {
                let reason = properties.iter().find(|(k, _)| *k == "reason");
                let reason = match reason.map(|(_, v)| *v) {
                    Some("power-off") => "guest-shutdown",
                    Some("reset") => "guest-reset",
                    _ => return,
                };
                self.clients
                    .broadcast("SHUTDOWN", json!({"guest": true, "reason": reason}));
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn parameters_are_checked_all_or_none() {
        let mut p = Parameters::default();
        assert_eq!(p.to_json()["x-ferry-switch-over"], "min-downtime");
        p.set(&args(json!({"downtime-limit": 50, "max-bandwidth": 1000,
                           "multifd-channels": 4, "x-ferry-switch-over": "fits"})))
            .unwrap();
        assert_eq!(
            p.to_json(),
            json!({"downtime-limit": 50, "max-bandwidth": 1000, "multifd-channels": 4,
                   "x-ferry-switch-over": "fits"})
        );
        for (a, needle) in [
            (json!({"downtime-limit": 2_000_001}), "2000001"),
            (json!({"downtime-limit": 0}), "at least 1 ms"),
            (json!({"downtime-limit": "x"}), "expected: integer"),
            (json!({"multifd-channels": 0}), "(got 0)"),
            (json!({"multifd-channels": 256}), "(got 256)"),
            (
                json!({"tls-creds": "x"}),
                "'tls-creds' is not supported by Ferry",
            ),
            (json!({"bogus": 1}), "'bogus' is unexpected"),
            (
                json!({"x-ferry-switch-over": "soon"}),
                "expects 'fits' or 'min-downtime' (got \"soon\")",
            ),
            (json!({"downtime-limit": 10, "bogus": 1}), "'bogus'"),
        ] {
            let before = p.clone();
            let e = p.set(&args(a.clone())).unwrap_err();
            assert!(e.desc.contains(needle), "{a}: {}", e.desc);
            assert_eq!(p, before, "{a} changed nothing");
        }
    }

    #[test]
    fn arguments_are_checked_with_qemus_words() {
        let spec = [("uri", "string", true), ("blk", "boolean", false)];
        assert!(check_args(&args(json!({"uri": "x"})), &spec).is_ok());
        for (a, needle) in [
            (json!({}), "Parameter 'uri' is missing"),
            (
                json!({"uri": 1}),
                "Invalid parameter type for 'uri', expected: string",
            ),
            (json!({"uri": "x", "blk": 1}), "'blk', expected: boolean"),
            (json!({"uri": "x", "z": 1}), "Parameter 'z' is unexpected"),
        ] {
            let e = check_args(&args(a.clone()), &spec).unwrap_err();
            assert!(e.desc.contains(needle), "{a}: {}", e.desc);
        }
    }
}
