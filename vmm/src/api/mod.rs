//! The REST API: cloud-hypervisor's HTTP/1.1-on-a-UNIX-socket API under `/api/v1/`,
//! plus Ferry's migration extensions. `docs/api/ferry.yaml` documents it.
//!
//! Layers, each usable alone:
//! - [`http`]: Ferry's framing, limits and checks around `micro_http` (cloud-hypervisor's
//!   HTTP library, vendored), which parses each request and writes each response
//!   ([`http::parse_request`] is pure);
//! - [`routes`]: the route table ([`routes::ROUTES`]) every request is matched against;
//! - [`handle`]: one parsed request -> one response, acting on a [`Vmm`];
//! - [`server`]: the socket, one thread per connection;
//! - [`state`]: the VM lifecycle behind a briefly held mutex ([`Vmm`]);
//! - [`migration`]: migration request bodies and the [`MigrationHandler`] seam;
//! - [`client`]: the client side, used by `ferry-remote` and the tests.

pub mod client;
pub mod devices;
pub mod http;
pub mod migration;
pub mod routes;
pub mod server;
pub mod snapshot;
pub mod state;

use std::sync::Arc;

pub use migration::{MigrationHandler, NotImplemented};
pub use server::{ApiServer, ServerError};
pub use state::{Counters, Operation, Vm, VmInfo, VmState, Vmm, VmmPing};

use crate::config::VmConfig;
use http::{Request, Response};
use routes::{Body, Endpoint, API_PREFIX};

/// Why an API request failed; [`ApiError::status`] is its status code.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request (its body) is wrong.
    #[error("{0}")]
    BadRequest(String),
    #[error("no VM has been created (PUT {API_PREFIX}vm.create first)")]
    NoVm,
    /// Something named is absent (e.g. no migration to report on).
    #[error("{0}")]
    NotFound(String),
    #[error("{action} is not possible while the VM is {state}")]
    WrongState {
        action: &'static str,
        state: VmState,
    },
    #[error("{action} is not possible while {busy} is in progress")]
    Busy {
        action: &'static str,
        busy: &'static str,
    },
    #[error("{action} is not possible while the VM is {state}: {why}")]
    NotWhileRunning {
        action: &'static str,
        state: VmState,
        why: &'static str,
    },
    #[error("{action}: a VM already exists (state {state}); delete it first")]
    VmExists {
        action: &'static str,
        state: VmState,
    },
    #[error("{action} failed: {reason}")]
    Failed {
        action: &'static str,
        reason: String,
    },
    #[error("{0}: live migration is not implemented yet")]
    MigrationNotImplemented(&'static str),
}

impl ApiError {
    pub fn status(&self) -> u16 {
        match self {
            ApiError::BadRequest(_) => 400,
            ApiError::NoVm | ApiError::NotFound(_) => 404,
            ApiError::WrongState { .. }
            | ApiError::NotWhileRunning { .. }
            | ApiError::Busy { .. }
            | ApiError::VmExists { .. } => 405,
            ApiError::Failed { .. } | ApiError::MigrationNotImplemented(_) => 500,
        }
    }
}

/// One line: an error and its causes (each cause once).
pub fn describe(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let cs = c.to_string();
        if !s.contains(&cs) {
            s.push_str(": ");
            s.push_str(&cs);
        }
        cur = c.source();
    }
    s
}

/// A request body that must be a JSON object (the API document says so for every body):
/// serde would also take a struct's fields from an array, in order.
pub fn json_object<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let kind = match &v {
        serde_json::Value::Object(_) => return T::deserialize(v).map_err(|e| e.to_string()),
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Null => "null",
    };
    Err(format!("the body must be a JSON object, not {kind}"))
}

/// A request body that must be a JSON object of type `T`; an error is a 400 naming
/// `action` (every endpoint with a body reads it through here).
pub(crate) fn json_body<T: serde::de::DeserializeOwned>(
    action: &str,
    body: &[u8],
) -> Result<T, ApiError> {
    json_object(body).map_err(|e| ApiError::BadRequest(format!("{action}: invalid JSON body: {e}")))
}

/// Parses and checks a `vm.create` body.
pub fn parse_vm_config(body: &[u8]) -> Result<VmConfig, ApiError> {
    let mut config: VmConfig = json_object(body)
        .map_err(|e| ApiError::BadRequest(format!("vm.create: invalid VmConfig JSON: {e}")))?;
    if config.payload.kernel.is_none() {
        return Err(ApiError::BadRequest(
            "vm.create: payload.kernel is required (Ferry boots a kernel directly)".into(),
        ));
    }
    config
        .validate()
        .map_err(|e| ApiError::BadRequest(format!("vm.create: {e}")))?;
    Ok(config)
}

/// Every body the API takes is JSON: a request whose `Content-Type` names another media
/// type (a form, multipart, text) is refused with 415 whatever its endpoint, with or
/// without a body, so that it acts on nothing (a `vmm.shutdown` labelled as a form would
/// otherwise end the VMM). No `Content-Type`, or `application/json` with any parameters
/// (`; charset=utf-8`), is accepted.
pub fn media_type_error(req: &Request) -> Option<String> {
    req.headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("content-type"))
        .map(|(_, v)| v)
        .find(|v| {
            let media = v.split(';').next().unwrap_or_default();
            !media.trim().eq_ignore_ascii_case("application/json")
        })
        .map(|v| {
            let shown: String = v.chars().take(100).collect();
            format!("Content-Type {shown:?} is not supported: the API takes application/json")
        })
}

/// What to do with a request's answer.
#[derive(Debug)]
pub struct Handled {
    pub response: Response,
    /// End the VMM with this status once the response is sent (`vmm.shutdown`).
    pub exit: Option<i32>,
}

fn answer(r: Result<Response, ApiError>) -> Response {
    r.unwrap_or_else(|e| Response::error(e.status(), e))
}

fn done(r: Result<(), ApiError>) -> Response {
    answer(r.map(|()| Response::no_content()))
}

/// Answers one request. Long operations (boot, reboot, a receive, a send with
/// `wait_for_completion`) run on the calling thread without holding the VM lock.
pub fn handle(vmm: &Arc<Vmm>, req: &Request) -> Handled {
    let route = match routes::route(&req.method, &req.path) {
        Ok(r) => r,
        Err(e) => {
            let mut resp = Response::error(e.status(), &e);
            if let routes::RouteError::MethodNotAllowed { allowed, .. } = e {
                resp.allow = Some(allowed);
            }
            return Handled {
                response: resp,
                exit: None,
            };
        }
    };
    if let Some(msg) = media_type_error(req) {
        return Handled {
            response: Response::error(415, msg),
            exit: None,
        };
    }
    match (route.body, req.body.is_empty()) {
        (Body::Json, true) => {
            return Handled {
                response: Response::error(400, format!("{} needs a JSON request body", route.name)),
                exit: None,
            }
        }
        (Body::Ignored, false) => log::debug!(
            "{}: ignoring a {}-byte request body (it takes none)",
            route.name,
            req.body.len()
        ),
        _ => {}
    }
    let mut exit = None;
    let response = match route.endpoint {
        Endpoint::VmmPing => Response::json(&vmm.ping()),
        Endpoint::VmmShutdown => {
            vmm.shutdown_vmm();
            exit = Some(0);
            Response::no_content()
        }
        Endpoint::VmCreate => done(parse_vm_config(&req.body).and_then(|c| vmm.create(c))),
        Endpoint::VmBoot => done(vmm.boot()),
        Endpoint::VmPause => done(vmm.pause()),
        Endpoint::VmResume => done(vmm.resume()),
        Endpoint::VmShutdown => done(vmm.shutdown()),
        Endpoint::VmReboot => done(vmm.reboot()),
        Endpoint::VmNmi => done(vmm.nmi()),
        Endpoint::VmPowerButton => done(vmm.power_button()),
        Endpoint::VmDelete => done(vmm.delete()),
        Endpoint::VmInfo => answer(vmm.info().map(|i| Response::json(&i))),
        Endpoint::VmCounters => answer(vmm.counters().map(|c| Response::json(&c))),
        Endpoint::VmSendMigration => done(send_migration(vmm, &req.body)),
        Endpoint::VmReceiveMigration => done(receive_migration(vmm, &req.body)),
        Endpoint::VmMigrationInfo => answer(vmm.migration().info(vmm).map(|v| Response::json(&v))),
        Endpoint::VmCancelMigration => done(vmm.migration().cancel(vmm)),
        Endpoint::VmStartPostcopy => done(vmm.migration().start_postcopy(vmm)),
        Endpoint::VmCoredump => done(coredump(vmm, &req.body)),
        Endpoint::VmAddDisk => done(devices::add_disk(vmm, &req.body)),
        Endpoint::VmAddDevice => done(devices::add_device(vmm, &req.body)),
        Endpoint::VmAddUserDevice => done(devices::add_user_device(vmm, &req.body)),
        Endpoint::VmRemoveDevice => done(devices::remove_device(vmm, &req.body)),
        Endpoint::VmResize => done(devices::resize(vmm, &req.body)),
        Endpoint::VmSnapshot => done(snapshot::snapshot(vmm, &req.body)),
        Endpoint::VmRestore => done(snapshot::restore(vmm, &req.body)),
    };
    Handled { response, exit }
}

/// The `vm.coredump` body (cloud-hypervisor's `VmCoredumpData`).
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CoredumpBody {
    destination_url: String,
}

/// Parses and checks a `vm.coredump` body: the file its `file://` URL names.
pub fn parse_coredump(body: &[u8]) -> Result<std::path::PathBuf, ApiError> {
    let b: CoredumpBody = json_body("vm.coredump", body)?;
    crate::coredump::destination_path(&b.destination_url)
        .map_err(|e| ApiError::BadRequest(e.to_string()))
}

/// Begins `action` on the VM, which must be Paused (`vm.coredump`, `vm.snapshot`: what
/// they read must not change meanwhile); lifecycle requests answer 405 until it ends.
pub(crate) fn begin_on_paused<'a>(
    vmm: &'a Vmm,
    action: &'static str,
) -> Result<Operation<'a>, ApiError> {
    vmm.begin(action, |vm| {
        let vm = vm.ok_or(ApiError::NoVm)?;
        match vm.state() {
            VmState::Paused => Ok(()),
            state => Err(ApiError::WrongState { action, state }),
        }
    })
}

/// `vm.coredump`: the paused VM's RAM and registers to an ELF core file. The VM stays
/// paused; lifecycle requests (vm.resume, ...) answer 405 while the file is written.
fn coredump(vmm: &Arc<Vmm>, body: &[u8]) -> Result<(), ApiError> {
    const ACTION: &str = "vm.coredump";
    let path = parse_coredump(body)?;
    let _op = begin_on_paused(vmm, ACTION)?;
    let machine = vmm.machine(ACTION)?;
    let t = std::time::Instant::now();
    let summary = machine.coredump(&path).map_err(|e| ApiError::Failed {
        action: ACTION,
        reason: describe(&e),
    })?;
    log::info!(
        "core file {} written: {} MiB of guest RAM in {} region(s), {} vCPU(s), {:?}",
        path.display(),
        summary.ram_bytes >> 20,
        summary.regions,
        summary.vcpus,
        t.elapsed()
    );
    Ok(())
}

/// `vm.send-migration`: answered once the migration has started (cloud-hypervisor 54's
/// way; its outcome is then in `vm.migration-info`), or once it has ended with
/// `wait_for_completion`.
fn send_migration(vmm: &Arc<Vmm>, body: &[u8]) -> Result<(), ApiError> {
    const ACTION: &str = "vm.send-migration";
    let request = migration::parse_send_migration(body)?;
    let wait = request.wait_for_completion;
    let (tx, ended) = std::sync::mpsc::channel();
    let go = migration::start_send(
        vmm,
        ACTION,
        request,
        || (),
        move |(), r| {
            // Nobody waits for this answer: the log and `vm.migration-info` tell it.
            if let (false, Err(e)) = (wait, &r) {
                log::error!("{e}");
            }
            let _ = tx.send(r);
        },
    )?;
    // The answer is written after this returns; nothing here needs to follow it.
    drop(go);
    if !wait {
        return Ok(());
    }
    ended.recv().unwrap_or_else(|_| {
        Err(ApiError::Failed {
            action: ACTION,
            reason: "the migration's thread ended without an outcome".into(),
        })
    })
}

fn receive_migration(vmm: &Arc<Vmm>, body: &[u8]) -> Result<(), ApiError> {
    const ACTION: &str = "vm.receive-migration";
    let request = migration::parse_receive_migration(body)?;
    let _op = begin_without_vm(vmm, ACTION)?;
    vmm.migration().receive(vmm, request)
}

/// Begins `action`, which brings a VM (`vm.receive-migration`, `vm.restore`): there must
/// be none yet; lifecycle requests answer 405 until it ends.
pub(crate) fn begin_without_vm<'a>(
    vmm: &'a Vmm,
    action: &'static str,
) -> Result<Operation<'a>, ApiError> {
    vmm.begin(action, |vm| match vm {
        Some(vm) => Err(ApiError::VmExists {
            action,
            state: vm.state(),
        }),
        None => Ok(()),
    })
}
