//! The migration endpoints' bodies, checked here, and the seam where the migration engine
//! plugs in: [`MigrationHandler`].
//!
//! The API layer parses and validates `vm.send-migration` / `vm.receive-migration` bodies
//! (400 on any problem), checks the VM's state (404/405), then calls the handler: a
//! receive on the request's own thread, a send on a thread of its own ([`start_send`],
//! shared with QMP's `migrate`), which the request waits for only with
//! `wait_for_completion`. A handler may run for as long as the migration lasts, while
//! other connections (info, counters, cancel) are served by their own threads. Until the
//! engine exists, [`NotImplemented`] answers 500.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{ApiError, Vmm};

/// Largest `connections` value (what the wire protocol allows).
pub const MAX_CONNECTIONS: u32 = vm_migration::protocol::MAX_CHANNELS as u32;
pub const DEFAULT_DOWNTIME_MS: u64 = 300;
pub const DEFAULT_TIMEOUT_S: u64 = 3600;
/// Precopy passes before `memory_mode: Postcopy` switches (unless the migration
/// converged first): the first pass moves most of RAM while the guest runs, a second one
/// what it dirtied meanwhile, so few pages are left to fetch on demand.
pub const DEFAULT_POSTCOPY_AFTER_PASSES: u32 = 2;

/// What to do when `timeout_s` passes before the migration could finish within
/// `downtime_ms`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TimeoutStrategy {
    /// Abort; the VM keeps running on the source.
    #[default]
    Cancel,
    /// Stop the VM and finish, whatever the downtime.
    Ignore,
}

/// When the source pauses the guest for the last pass (Ferry's `switch_over`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SwitchOver {
    /// As soon as the dirty pages left fit `downtime_ms` (QEMU's rule).
    Fits,
    /// Once they fit, go on while each pass leaves clearly fewer (a pause of a few ms).
    #[default]
    MinDowntime,
}

/// How guest memory moves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryMode {
    /// Copy all memory, then what was dirtied, until the rest fits in the downtime.
    #[default]
    Precopy,
    /// Pass the guest memory file descriptors over a UNIX socket (same host).
    MemFDs,
    /// Precopy passes first (`postcopy_after_passes`), then the VM runs on the
    /// destination while the rest of its RAM streams in, touched pages fetched first.
    Postcopy,
}

pub use crate::migration::transport::{MigrationUrl, UrlError};

/// Most `connections` a request may name: cloud-hypervisor's limit, so its clients' values
/// are taken; Ferry uses at most [`MAX_CONNECTIONS`] of them (the wire protocol's).
pub const MAX_REQUESTED_CONNECTIONS: u64 = 128;

/// Fields of a body this Ferry does not know: ignored, as cloud-hypervisor ignores them
/// (a newer client may send more), and named in the log.
pub(crate) type UnknownFields = std::collections::BTreeMap<String, serde_json::Value>;

pub(crate) fn log_unknown(endpoint: &str, unknown: &UnknownFields) {
    if !unknown.is_empty() {
        let names: Vec<&str> = unknown.keys().map(String::as_str).collect();
        log::warn!("{endpoint}: ignoring unknown field(s) {names:?}");
    }
}

/// The `vm.send-migration` body as sent (cloud-hypervisor's field names).
#[derive(Debug, Deserialize)]
struct SendMigrationBody {
    destination_url: String,
    #[serde(default)]
    downtime_ms: Option<u64>,
    #[serde(default)]
    timeout_s: Option<u64>,
    #[serde(default)]
    timeout_strategy: Option<TimeoutStrategy>,
    #[serde(default)]
    connections: Option<u64>,
    #[serde(default)]
    memory_mode: Option<MemoryMode>,
    /// cloud-hypervisor's: guest RAM handed over as files on one host (Ferry's `MemFDs`).
    #[serde(default)]
    local: Option<bool>,
    /// cloud-hypervisor's: keep the source VM after the move (only `false` here).
    #[serde(default)]
    preserve_source: Option<bool>,
    /// Ferry's own: throttle the vCPUs when the migration does not converge (default on).
    #[serde(default)]
    auto_converge: Option<bool>,
    /// Ferry's own: when to pause for the last pass (default `MinDowntime`).
    #[serde(default)]
    switch_over: Option<SwitchOver>,
    /// Ferry's own: the guest's vCPU threads run at a lower priority until the migration
    /// pauses it (default on).
    #[serde(default)]
    yield_vcpus: Option<bool>,
    /// QEMU's `resume`: take up a postcopy migration whose link broke (Ferry's own here).
    #[serde(default)]
    resume: Option<bool>,
    /// Ferry's own: switch to postcopy after this many precopy passes (implies
    /// `memory_mode: Postcopy`; default [`DEFAULT_POSTCOPY_AFTER_PASSES`] with it).
    #[serde(default)]
    postcopy_after_passes: Option<u32>,
    /// Migrate over TLS: ca-cert.pem, client-cert.pem, client-key.pem (cloud-hypervisor's).
    #[serde(default)]
    tls_dir: Option<std::path::PathBuf>,
    /// Ferry's own: answer when the migration has ended (cloud-hypervisor 54 answers at
    /// once, and so does Ferry by default).
    #[serde(default)]
    wait_for_completion: Option<bool>,
    #[serde(flatten)]
    unknown: UnknownFields,
}

/// A checked `vm.send-migration` request, defaults filled in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SendMigration {
    /// As sent.
    pub destination_url: String,
    pub destination: MigrationUrl,
    /// Longest pause of the guest the migration aims for (>= 1).
    pub downtime_ms: u64,
    /// Longest total duration (>= 1).
    pub timeout_s: u64,
    pub timeout_strategy: TimeoutStrategy,
    /// Parallel TCP connections, 1 to [`MAX_CONNECTIONS`] (1 for a UNIX socket).
    pub connections: u32,
    /// `MemFDs` also when the deprecated `local: true` was sent.
    pub memory_mode: MemoryMode,
    /// Throttle the vCPUs while the dirty set stops shrinking (Ferry's extension).
    pub auto_converge: bool,
    /// When to pause for the last pass (Ferry's extension).
    pub switch_over: SwitchOver,
    /// The vCPU threads yield to the migration (nice +10) until its pause (Ferry's
    /// extension): on a host with no spare CPU the pages leave faster than the guest
    /// dirties them again; where CPUs are spare it changes nothing.
    pub yield_vcpus: bool,
    /// `memory_mode: Postcopy`: switch after this many precopy passes.
    pub postcopy_after_passes: Option<u32>,
    /// Take up a postcopy migration that lost its link (`postcopy-paused`).
    pub resume: bool,
    /// Over TLS with these credentials (checked loadable when the request came).
    pub tls_dir: Option<std::path::PathBuf>,
    /// Someone waits for [`MigrationHandler::send`]'s result and passes the outcome on
    /// (the request's answer; QMP's events): after a success the source may end at once.
    /// Otherwise the outcome is only in `vm.migration-info`, and the source stays until
    /// that has reported the completion (or a while at most).
    pub wait_for_completion: bool,
}

/// The `vm.receive-migration` body.
#[derive(Debug, Deserialize)]
struct ReceiveMigrationBody {
    receiver_url: String,
    #[serde(default)]
    user_devices: Vec<UserDeviceSocket>,
    /// Take the migration over TLS only: ca-cert.pem, server-cert.pem, server-key.pem.
    #[serde(default)]
    tls_dir: Option<std::path::PathBuf>,
    /// cloud-hypervisor's; the source decides how memory comes (a destination that can
    /// takes postcopy whenever the source switches), so any value is taken here.
    #[serde(default)]
    memory_mode: Option<MemoryMode>,
    /// cloud-hypervisor's: VFIO device and iommufd descriptors passed with the request,
    /// and memory zone changes; Ferry has none of them on receive, so only empty values.
    #[serde(default)]
    vfio_fds: Option<Vec<i64>>,
    #[serde(default)]
    iommufd_fd: Option<i64>,
    #[serde(default)]
    zone_updates: Option<Vec<serde_json::Value>>,
    #[serde(flatten)]
    unknown: UnknownFields,
}

/// Where the destination's own process for one of the source's vfio-user devices listens.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserDeviceSocket {
    pub socket: std::path::PathBuf,
}

/// A checked `vm.receive-migration` request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ReceiveMigration {
    pub receiver_url: String,
    pub receiver: MigrationUrl,
    /// Sockets of this host's device processes for the source's vfio-user devices, in the
    /// source's order; empty: the source's paths.
    pub user_devices: Vec<UserDeviceSocket>,
    /// Over TLS only, with these credentials (checked loadable when the request came).
    pub tls_dir: Option<std::path::PathBuf>,
}

fn bad(msg: String) -> ApiError {
    ApiError::BadRequest(msg)
}

/// Checks a request's `tls_dir`: a `tcp:` URL, and files that load (400 naming the file
/// or the reason otherwise; the handler loads them again when it starts).
///
/// `tls_dir` with a `unix:` URL is refused: a UNIX socket never leaves this host, its
/// peer is whoever the socket file's permissions let in (already authenticated by the
/// kernel), and `MemFDs` passes file descriptors, which a TLS session cannot carry.
fn check_tls_dir(
    dir: Option<&std::path::Path>,
    url: &MigrationUrl,
    field: &str,
    server: bool,
) -> Result<(), ApiError> {
    let Some(dir) = dir else {
        return Ok(());
    };
    if dir.as_os_str().is_empty() {
        return Err(bad("tls_dir is empty".into()));
    }
    if let MigrationUrl::Unix(_) = url {
        return Err(bad(format!(
            "tls_dir needs a tcp: {field}: a unix: socket stays on this host (its file's \
             permissions say who may connect) and TLS cannot carry memory_mode MemFDs's \
             file descriptors"
        )));
    }
    let loaded = if server {
        crate::migration::tls::ServerTls::load(dir).map(drop)
    } else {
        crate::migration::tls::ClientTls::load(dir).map(drop)
    };
    loaded.map_err(|e| bad(format!("tls_dir: {e}")))
}

/// Parses and checks a `vm.send-migration` body.
pub fn parse_send_migration(body: &[u8]) -> Result<SendMigration, ApiError> {
    let b: SendMigrationBody = super::json_body("vm.send-migration", body)?;
    let destination: MigrationUrl = b
        .destination_url
        .parse()
        .map_err(|e: UrlError| bad(format!("destination_url: {e}")))?;
    let downtime_ms = b.downtime_ms.unwrap_or(DEFAULT_DOWNTIME_MS);
    if downtime_ms == 0 {
        return Err(bad("downtime_ms=0 is out of range (at least 1)".into()));
    }
    let timeout_s = b.timeout_s.unwrap_or(DEFAULT_TIMEOUT_S);
    if timeout_s == 0 {
        return Err(bad("timeout_s=0 is out of range (at least 1)".into()));
    }
    log_unknown("vm.send-migration", &b.unknown);
    let asked = b.connections.unwrap_or(1);
    if !(1..=MAX_REQUESTED_CONNECTIONS).contains(&asked) {
        return Err(bad(format!(
            "connections={asked} is out of range (1 to {MAX_REQUESTED_CONNECTIONS})"
        )));
    }
    let connections = asked.min(u64::from(MAX_CONNECTIONS)) as u32;
    if u64::from(connections) < asked {
        log::info!(
            "vm.send-migration: connections={asked}: using {connections}, the most one \
             migration of this Ferry opens"
        );
    }
    if b.preserve_source == Some(true) {
        return Err(bad(
            "preserve_source=true is not supported: once the destination runs the VM, \
             Ferry ends it here (omit the field or send false)"
                .into(),
        ));
    }
    // cloud-hypervisor's `local` says how memory travels, `memory_mode` when: Precopy
    // with local=true is RAM as files; Ferry's own `MemFDs` value means the same.
    let memory_mode = match (b.local, b.memory_mode) {
        (Some(true), None | Some(MemoryMode::Precopy | MemoryMode::MemFDs)) => MemoryMode::MemFDs,
        (Some(true), Some(m)) => {
            return Err(bad(format!(
                "local=true hands guest RAM over as files, which memory_mode {m:?} cannot use"
            )))
        }
        (_, None) if b.postcopy_after_passes.is_some() => MemoryMode::Postcopy,
        (_, m) => m.unwrap_or_default(),
    };
    let postcopy_after_passes = match (memory_mode, b.postcopy_after_passes) {
        (MemoryMode::Postcopy, n) => Some(n.unwrap_or(DEFAULT_POSTCOPY_AFTER_PASSES)),
        (m, Some(n)) => {
            return Err(bad(format!(
                "postcopy_after_passes={n} needs memory_mode Postcopy, not {m:?}"
            )))
        }
        (_, None) => None,
    };
    if let MigrationUrl::Unix(_) = destination {
        if connections > 1 {
            return Err(bad(format!(
                "connections={connections}: several connections need a tcp: destination_url"
            )));
        }
    } else if memory_mode == MemoryMode::MemFDs {
        return Err(bad(format!(
            "memory_mode MemFDs passes file descriptors and needs a unix: destination_url, not {:?}",
            b.destination_url
        )));
    }
    check_tls_dir(b.tls_dir.as_deref(), &destination, "destination_url", false)?;
    Ok(SendMigration {
        destination_url: b.destination_url,
        destination,
        downtime_ms,
        timeout_s,
        timeout_strategy: b.timeout_strategy.unwrap_or_default(),
        connections,
        memory_mode,
        auto_converge: b.auto_converge.unwrap_or(true),
        switch_over: b.switch_over.unwrap_or_default(),
        yield_vcpus: b.yield_vcpus.unwrap_or(true),
        postcopy_after_passes,
        resume: b.resume.unwrap_or(false),
        tls_dir: b.tls_dir,
        wait_for_completion: b.wait_for_completion.unwrap_or(false),
    })
}

/// Parses and checks a `vm.receive-migration` body.
pub fn parse_receive_migration(body: &[u8]) -> Result<ReceiveMigration, ApiError> {
    let b: ReceiveMigrationBody = super::json_body("vm.receive-migration", body)?;
    log_unknown("vm.receive-migration", &b.unknown);
    if b.memory_mode == Some(MemoryMode::Postcopy) && !crate::migration::postcopy::available() {
        return Err(bad(
            "memory_mode Postcopy: this host gives Ferry no userfaultfd (see the log)".into(),
        ));
    }
    if let Some(fds) = b.vfio_fds.as_ref().filter(|f| !f.is_empty()) {
        return Err(bad(format!(
            "vfio_fds {fds:?}: Ferry opens a VFIO device from its configuration on receive \
             and takes no descriptors"
        )));
    }
    if let Some(fd) = b.iommufd_fd {
        return Err(bad(format!(
            "iommufd_fd {fd}: Ferry takes no iommufd descriptor on receive"
        )));
    }
    if let Some(z) = b.zone_updates.as_ref().filter(|z| !z.is_empty()) {
        return Err(bad(format!(
            "zone_updates ({} given): Ferry has no memory zones",
            z.len()
        )));
    }
    let receiver = b
        .receiver_url
        .parse()
        .map_err(|e: UrlError| bad(format!("receiver_url: {e}")))?;
    if let Some(i) = b
        .user_devices
        .iter()
        .position(|u| u.socket.as_os_str().is_empty())
    {
        return Err(bad(format!("user_devices[{i}].socket is empty")));
    }
    check_tls_dir(b.tls_dir.as_deref(), &receiver, "receiver_url", true)?;
    Ok(ReceiveMigration {
        receiver_url: b.receiver_url,
        receiver,
        user_devices: b.user_devices,
        tls_dir: b.tls_dir,
    })
}

/// The migration engine, as the API sees it; give yours to [`Vmm::new`] (in `main.rs`).
///
/// No method holds the VM lock on entry, so `send` and `receive` may take as long as the
/// migration does while other connections (`vm.info`, `vm.counters`,
/// `vm.migration-info`, `vm.cancel-migration`) are answered. `receive` runs on the thread
/// of its request; `prepare_send` and then `send` on the thread [`start_send`] started.
/// `prepare_send`, `send` and `receive` run inside an [`Operation`](super::Operation) the
/// API layer started: meanwhile `vm.boot`/`pause`/`resume`/`shutdown`/`reboot`/`delete`/`create` and a
/// second migration answer 405. So the engine does not call those `Vmm` methods itself:
/// it takes the machine with [`Vmm::machine`] (an `Arc`, used without the lock: its
/// `pause`, `collect_dirty`, `save_state`...), changes the VM with [`Vmm::with_vm`] for
/// short moments (e.g. [`Vm::take_machine`](super::Vm::take_machine) once the VM has
/// left: it is then Shutdown), installs an arrived VM with [`Vmm::install`], and may end
/// the process with [`Vmm::request_exit`].
///
/// Errors become the response: [`ApiError::status`] gives the code, its text the message
/// (e.g. [`ApiError::Failed`] for 500, [`ApiError::NotFound`] for 404).
pub trait MigrationHandler: Send + Sync {
    /// `PUT vm.send-migration`, before it is answered: the VM exists and is Running or
    /// Paused (checked). Refuse what can be refused now (the error is the answer), and
    /// start the migration's progress: from here on `info` reports this migration (in
    /// `setup`), not the last one, so a client that polls it after the answer follows
    /// the right migration.
    fn prepare_send(&self, vmm: &Arc<Vmm>, request: &SendMigration) -> Result<(), ApiError> {
        let _ = (vmm, request);
        Ok(())
    }

    /// The migration `prepare_send` accepted, on a thread of its own: return when it has
    /// finished or failed. Every failure is also in `info` (status `failed` or
    /// `cancelled`, `error-desc` the error's reason), for the clients that did not wait.
    fn send(&self, vmm: &Arc<Vmm>, request: SendMigration) -> Result<(), ApiError>;

    /// `PUT vm.receive-migration`: no VM exists (checked). Return once the VM has arrived
    /// and runs here (install it with [`Vmm::install`]).
    fn receive(&self, vmm: &Arc<Vmm>, request: ReceiveMigration) -> Result<(), ApiError>;

    /// `GET vm.migration-info`: progress of the running or last migration (JSON object).
    fn info(&self, vmm: &Arc<Vmm>) -> Result<serde_json::Value, ApiError>;

    /// `PUT vm.cancel-migration`: stop the running migration; its `send`/`receive` call
    /// then returns an error.
    fn cancel(&self, vmm: &Arc<Vmm>) -> Result<(), ApiError>;

    /// `PUT vm.migrate-start-postcopy` (QMP's `migrate-start-postcopy`): the running
    /// outgoing migration switches to postcopy after its current pass.
    fn start_postcopy(&self, vmm: &Arc<Vmm>) -> Result<(), ApiError> {
        let _ = vmm;
        Err(ApiError::MigrationNotImplemented(
            "vm.migrate-start-postcopy",
        ))
    }

    /// A postcopy migration lost its link: this side's VM must not be resumed (the source's
    /// copy is stale, the destination's misses pages only the source has).
    fn postcopy_paused(&self) -> bool {
        false
    }
}

/// The handler until the migration engine lands: every call answers 500.
pub struct NotImplemented;

impl MigrationHandler for NotImplemented {
    fn prepare_send(&self, _: &Arc<Vmm>, _: &SendMigration) -> Result<(), ApiError> {
        Err(ApiError::MigrationNotImplemented("vm.send-migration"))
    }

    fn send(&self, _: &Arc<Vmm>, _: SendMigration) -> Result<(), ApiError> {
        Err(ApiError::MigrationNotImplemented("vm.send-migration"))
    }

    fn receive(&self, _: &Arc<Vmm>, _: ReceiveMigration) -> Result<(), ApiError> {
        Err(ApiError::MigrationNotImplemented("vm.receive-migration"))
    }

    fn info(&self, _: &Arc<Vmm>) -> Result<serde_json::Value, ApiError> {
        Err(ApiError::MigrationNotImplemented("vm.migration-info"))
    }

    fn cancel(&self, _: &Arc<Vmm>) -> Result<(), ApiError> {
        Err(ApiError::MigrationNotImplemented("vm.cancel-migration"))
    }
}

/// Lets a migration [`start_send`] started go on: sent, or dropped.
pub type Go = std::sync::mpsc::Sender<()>;

/// Starts a migration to `request`'s destination on a thread of its own, for
/// `vm.send-migration` and QMP's `migrate` (named `action` in errors).
///
/// Returns once the checks are done: the VM exists and is Running or Paused, no other
/// long operation runs (else [`ApiError::Busy`]), and [`MigrationHandler::prepare_send`]
/// accepted the request; an error here is the caller's answer. Then `on_start` runs (its
/// value goes to `on_end`) and the migration waits for the returned [`Go`], so that the
/// caller's answer can go out before the migration's first event. Once
/// [`MigrationHandler::send`] has returned and the operation has ended, `on_end` gets its
/// result on that thread.
pub fn start_send<T: Send + 'static>(
    vmm: &Arc<Vmm>,
    action: &'static str,
    request: SendMigration,
    on_start: impl FnOnce() -> T + Send + 'static,
    on_end: impl FnOnce(T, Result<(), ApiError>) + Send + 'static,
) -> Result<Go, ApiError> {
    let (checked_tx, checked) = std::sync::mpsc::channel();
    let (go, go_rx) = std::sync::mpsc::channel::<()>();
    let vmm = vmm.clone();
    // The operation borrows the Vmm, so it is begun on the thread that keeps it.
    let job = move || {
        let op = vmm.begin(action, |vm| {
            let vm = vm.ok_or(ApiError::NoVm)?;
            match vm.state() {
                super::VmState::Running | super::VmState::Paused => Ok(()),
                state => Err(ApiError::WrongState { action, state }),
            }
        });
        let op = match op.and_then(|op| vmm.migration().prepare_send(&vmm, &request).map(|()| op)) {
            Ok(op) => op,
            Err(e) => return drop(checked_tx.send(Err(e))),
        };
        let state = on_start();
        let _ = checked_tx.send(Ok(()));
        // Err: the caller dropped its Go, which says go as well.
        let _ = go_rx.recv();
        let r = vmm.migration().send(&vmm, request);
        drop(op);
        on_end(state, r);
    };
    std::thread::Builder::new()
        .name("send-migration".into())
        .spawn(job)
        .map_err(|e| ApiError::Failed {
            action,
            reason: format!("cannot start the migration's thread: {e}"),
        })?;
    match checked.recv() {
        Ok(r) => r.map(|()| go),
        Err(_) => Err(ApiError::Failed {
            action,
            reason: "the migration's thread ended before its checks".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send(j: &str) -> Result<SendMigration, String> {
        parse_send_migration(j.as_bytes()).map_err(|e| e.to_string())
    }

    /// Every body is a JSON object (the API document's `type: object`): serde alone would
    /// take a struct's fields from an array too (the api_body fuzz target found
    /// `["unix:x"]` accepted as a send-migration body).
    #[test]
    fn bodies_that_are_not_objects_are_refused_naming_what_they_are() {
        for (body, kind) in [
            (r#"["unix:/x"]"#, "an array"),
            (r#""unix:/x""#, "a string"),
            ("7", "a number"),
            ("null", "null"),
        ] {
            let e = send(body).unwrap_err();
            assert!(
                e.contains(&format!("must be a JSON object, not {kind}")),
                "{e}"
            );
            let e = parse_receive_migration(body.as_bytes())
                .unwrap_err()
                .to_string();
            assert!(e.contains("vm.receive-migration"), "{e}");
            let e = crate::api::parse_vm_config(body.as_bytes())
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("not {kind}")), "{e}");
            let e = crate::api::parse_coredump(body.as_bytes())
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("not {kind}")), "{e}");
        }
        assert!(send(r#"{"destination_url": "unix:/x"}"#).is_ok());
    }

    #[test]
    fn urls() {
        assert_eq!(
            "tcp:10.0.0.1:6000".parse::<MigrationUrl>(),
            Ok(MigrationUrl::Tcp {
                host: "10.0.0.1".into(),
                port: 6000
            })
        );
        assert_eq!(
            "tcp:[::1]:6000".parse::<MigrationUrl>().unwrap(),
            MigrationUrl::Tcp {
                host: "::1".into(),
                port: 6000
            }
        );
        assert_eq!(
            "unix:/tmp/s".parse::<MigrationUrl>(),
            Ok(MigrationUrl::Unix("/tmp/s".into()))
        );
        for bad in [
            "",
            "tcp:",
            "tcp:host",
            "tcp::1",
            "tcp:h:99999",
            "http://x",
            "unix:",
            "tcp:a b:1",
        ] {
            let e = bad.parse::<MigrationUrl>().unwrap_err();
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn send_defaults() {
        let s = send(r#"{"destination_url":"tcp:1.2.3.4:6000"}"#).unwrap();
        assert_eq!(s.downtime_ms, 300);
        assert_eq!(s.timeout_s, 3600);
        assert_eq!(s.timeout_strategy, TimeoutStrategy::Cancel);
        assert_eq!(s.connections, 1);
        assert_eq!(s.memory_mode, MemoryMode::Precopy);
        assert_eq!(s.switch_over, SwitchOver::MinDowntime);
        assert!(s.yield_vcpus);
        let s = send(r#"{"destination_url":"tcp:h:1","switch_over":"Fits"}"#).unwrap();
        assert_eq!(s.switch_over, SwitchOver::Fits);
        let s = send(r#"{"destination_url":"tcp:h:1","yield_vcpus":false}"#).unwrap();
        assert!(!s.yield_vcpus);
        let s = send(r#"{"destination_url":"unix:/s","local":true}"#).unwrap();
        assert_eq!(s.memory_mode, MemoryMode::MemFDs);
        let s = send(
            r#"{"destination_url":"tcp:h:1","downtime_ms":50,"timeout_s":9,"timeout_strategy":"Ignore","connections":16,"memory_mode":"Postcopy","local":false}"#,
        )
        .unwrap();
        assert_eq!(
            (
                s.downtime_ms,
                s.timeout_s,
                s.timeout_strategy,
                s.connections,
                s.memory_mode
            ),
            (50, 9, TimeoutStrategy::Ignore, 16, MemoryMode::Postcopy)
        );
    }

    #[test]
    fn send_errors_name_the_value() {
        for (j, needle) in [
            (r#"{}"#, "destination_url"),
            (
                r#"{"destination_url":"tcp:h:1","connections":0}"#,
                "connections=0",
            ),
            (
                r#"{"destination_url":"tcp:h:1","connections":129}"#,
                "connections=129",
            ),
            (
                r#"{"destination_url":"tcp:h:1","downtime_ms":0}"#,
                "downtime_ms=0",
            ),
            (
                r#"{"destination_url":"tcp:h:1","timeout_s":0}"#,
                "timeout_s=0",
            ),
            (
                r#"{"destination_url":"tcp:h:1","timeout_strategy":"Later"}"#,
                "Later",
            ),
            (
                r#"{"destination_url":"tcp:h:1","memory_mode":"Fast"}"#,
                "Fast",
            ),
            (
                r#"{"destination_url":"tcp:h:1","switch_over":"Soon"}"#,
                "Soon",
            ),
            (
                r#"{"destination_url":"tcp:h:1","tls_dir":"/nonexistent-ferry-tls"}"#,
                "tls_dir: /nonexistent-ferry-tls is missing",
            ),
            (
                r#"{"destination_url":"tcp:h:1","tls_dir":"/"}"#,
                "/ca-cert.pem is missing",
            ),
            (
                r#"{"destination_url":"unix:/s","tls_dir":"/x"}"#,
                "tls_dir needs a tcp: destination_url",
            ),
            (
                r#"{"destination_url":"tcp:h:1","tls_dir":""}"#,
                "tls_dir is empty",
            ),
            (r#"{"destination_url":"tcp:h:1","local":true}"#, "unix:"),
            (
                r#"{"destination_url":"unix:/s","local":true,"memory_mode":"Postcopy"}"#,
                "Postcopy",
            ),
            (
                r#"{"destination_url":"unix:/s","preserve_source":true}"#,
                "preserve_source=true",
            ),
            (
                r#"{"destination_url":"unix:/s","connections":4}"#,
                "connections=4",
            ),
            (r#"{"destination_url":"ftp://x"}"#, "ftp://x"),
            (r#"{"destination_url":"tcp:h:1","connections":-1}"#, "-1"),
        ] {
            let e = send(j).unwrap_err();
            assert!(e.contains(needle), "{j}: {e}");
        }
    }

    /// The bodies cloud-hypervisor's `ch-remote` sends, its default fields included.
    #[test]
    fn cloud_hypervisor_bodies_are_taken() {
        let s = send(
            r#"{"destination_url":"tcp:10.0.0.2:6000","local":false,"downtime_ms":300,"timeout_s":3600,"timeout_strategy":"Cancel","connections":1,"preserve_source":false,"tls_dir":null}"#,
        )
        .unwrap();
        assert_eq!((s.memory_mode, s.connections), (MemoryMode::Precopy, 1));
        let s =
            send(r#"{"destination_url":"unix:/s","local":true,"memory_mode":"Precopy"}"#).unwrap();
        assert_eq!(s.memory_mode, MemoryMode::MemFDs);
        // cloud-hypervisor allows 128 connections: taken, Ferry opens at most 16.
        let s = send(r#"{"destination_url":"tcp:h:1","connections":128}"#).unwrap();
        assert_eq!(s.connections, MAX_CONNECTIONS);
        // A field this Ferry does not know is ignored, as cloud-hypervisor does.
        assert!(send(r#"{"destination_url":"tcp:h:1","a_newer_field":{"x":1}}"#).is_ok());
        let r = parse_receive_migration(
            br#"{"receiver_url":"unix:/s","tls_dir":null,"memory_mode":"Precopy","vfio_fds":null,"iommufd_fd":null,"zone_updates":[]}"#,
        )
        .unwrap();
        assert_eq!(r.receiver_url, "unix:/s");
        assert!(parse_receive_migration(br#"{"receiver_url":"unix:/s","extra":1}"#).is_ok());
    }

    #[test]
    fn receive() {
        let r = parse_receive_migration(br#"{"receiver_url":"tcp:0.0.0.0:6000"}"#).unwrap();
        assert_eq!(r.receiver_url, "tcp:0.0.0.0:6000");
        for (j, needle) in [
            ("{}", "receiver_url"),
            (r#"{"receiver_url":"x"}"#, "\"x\""),
            (r#"{"receiver_url":"unix:/s","vfio_fds":[7]}"#, "vfio_fds [7]"),
            (r#"{"receiver_url":"unix:/s","iommufd_fd":9}"#, "iommufd_fd 9"),
            (
                r#"{"receiver_url":"unix:/s","zone_updates":[{"id":"z"}]}"#,
                "zone_updates (1 given)",
            ),
            (
                r#"{"receiver_url":"unix:/s","tls_dir":"/x"}"#,
                "tls_dir needs a tcp: receiver_url",
            ),
            (
                r#"{"receiver_url":"tcp:0.0.0.0:1","tls_dir":"/"}"#,
                "/ca-cert.pem is missing (tls_dir must hold ca-cert.pem, server-cert.pem and server-key.pem)",
            ),
            ("not json", "JSON"),
        ] {
            let e = parse_receive_migration(j.as_bytes())
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{j}: {e}");
        }
    }
}
