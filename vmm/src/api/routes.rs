//! The route table: every endpoint the server has, its method, whether it takes a body,
//! and every status code it can answer. `docs/api/ferry.yaml` must say the same
//! (`vmm/tests/api_spec.rs` compares them).

/// Every endpoint is under this prefix.
pub const API_PREFIX: &str = "/api/v1/";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    VmmPing,
    VmmShutdown,
    VmCreate,
    VmBoot,
    VmPause,
    VmResume,
    VmShutdown,
    VmReboot,
    VmNmi,
    VmPowerButton,
    VmDelete,
    VmInfo,
    VmCounters,
    VmSendMigration,
    VmReceiveMigration,
    VmMigrationInfo,
    VmCancelMigration,
    VmStartPostcopy,
    VmCoredump,
    VmSnapshot,
    VmRestore,
    VmAddDisk,
    VmAddDevice,
    VmAddUserDevice,
    VmRemoveDevice,
    VmResize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Put,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
        }
    }
}

/// Whether a request body is expected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Body {
    /// A JSON body is required (400 without one).
    Json,
    /// Ignored if sent (GET and action endpoints), as cloud-hypervisor does.
    Ignored,
}

#[derive(Debug)]
pub struct Route {
    pub endpoint: Endpoint,
    /// The name after [`API_PREFIX`], e.g. `vm.info`.
    pub name: &'static str,
    pub method: Method,
    pub body: Body,
    /// Every status code the endpoint itself can answer (protocol-level errors such as
    /// 400 for malformed HTTP, 413 or 405 for a wrong method are not listed).
    pub statuses: &'static [u16],
    /// Ferry's own addition, not in cloud-hypervisor's API.
    pub extension: bool,
}

const fn r(
    endpoint: Endpoint,
    name: &'static str,
    method: Method,
    body: Body,
    statuses: &'static [u16],
    extension: bool,
) -> Route {
    Route {
        endpoint,
        name,
        method,
        body,
        statuses,
        extension,
    }
}

use Body as B;
use Endpoint as E;
use Method::{Get, Put};

/// The whole API.
pub static ROUTES: &[Route] = &[
    r(E::VmmPing, "vmm.ping", Get, B::Ignored, &[200], false),
    r(
        E::VmmShutdown,
        "vmm.shutdown",
        Put,
        B::Ignored,
        &[204],
        false,
    ),
    r(
        E::VmCreate,
        "vm.create",
        Put,
        B::Json,
        &[204, 400, 405],
        false,
    ),
    r(
        E::VmBoot,
        "vm.boot",
        Put,
        B::Ignored,
        &[204, 400, 404, 405, 500],
        false,
    ),
    r(
        E::VmPause,
        "vm.pause",
        Put,
        B::Ignored,
        &[204, 400, 404, 405],
        false,
    ),
    r(
        E::VmResume,
        "vm.resume",
        Put,
        B::Ignored,
        &[204, 400, 404, 405],
        false,
    ),
    r(
        E::VmShutdown,
        "vm.shutdown",
        Put,
        B::Ignored,
        &[204, 400, 404, 405],
        false,
    ),
    r(
        E::VmReboot,
        "vm.reboot",
        Put,
        B::Ignored,
        &[204, 400, 404, 405, 500],
        false,
    ),
    r(E::VmNmi, "vm.nmi", Put, B::Ignored, &[204, 404, 405], false),
    r(
        E::VmPowerButton,
        "vm.power-button",
        Put,
        B::Ignored,
        &[204, 404, 405],
        false,
    ),
    r(
        E::VmDelete,
        "vm.delete",
        Put,
        B::Ignored,
        &[204, 405],
        false,
    ),
    r(E::VmInfo, "vm.info", Get, B::Ignored, &[200, 404], false),
    r(
        E::VmCounters,
        "vm.counters",
        Get,
        B::Ignored,
        &[200, 404, 405],
        false,
    ),
    r(
        E::VmSendMigration,
        "vm.send-migration",
        Put,
        B::Json,
        &[204, 400, 404, 405, 500],
        false,
    ),
    r(
        E::VmReceiveMigration,
        "vm.receive-migration",
        Put,
        B::Json,
        &[204, 400, 405, 500],
        false,
    ),
    r(
        E::VmMigrationInfo,
        "vm.migration-info",
        Get,
        B::Ignored,
        &[200, 404, 500],
        true,
    ),
    r(
        E::VmCancelMigration,
        "vm.cancel-migration",
        Put,
        B::Ignored,
        &[204, 400, 404, 405, 500],
        true,
    ),
    r(
        E::VmStartPostcopy,
        "vm.migrate-start-postcopy",
        Put,
        B::Ignored,
        &[204, 400, 404, 405, 500],
        true,
    ),
    r(
        E::VmCoredump,
        "vm.coredump",
        Put,
        B::Json,
        &[204, 400, 404, 405, 500],
        false,
    ),
    r(
        E::VmSnapshot,
        "vm.snapshot",
        Put,
        B::Json,
        &[204, 400, 404, 405, 500],
        false,
    ),
    r(
        E::VmRestore,
        "vm.restore",
        Put,
        B::Json,
        &[204, 400, 405, 500],
        false,
    ),
    r(
        E::VmAddDisk,
        "vm.add-disk",
        Put,
        B::Json,
        &[204, 400, 404, 405],
        false,
    ),
    r(
        E::VmAddDevice,
        "vm.add-device",
        Put,
        B::Json,
        &[204, 400, 404, 405],
        false,
    ),
    r(
        E::VmAddUserDevice,
        "vm.add-user-device",
        Put,
        B::Json,
        &[204, 400, 404, 405],
        false,
    ),
    r(
        E::VmRemoveDevice,
        "vm.remove-device",
        Put,
        B::Json,
        &[204, 400, 404, 405],
        false,
    ),
    r(
        E::VmResize,
        "vm.resize",
        Put,
        B::Json,
        &[204, 400, 404, 405],
        false,
    ),
];

/// Why a request matches no route.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("no such endpoint {0:?} (the API is under {API_PREFIX}, e.g. {API_PREFIX}vmm.ping)")]
    NotFound(String),
    #[error("{path} does not accept {method} (use {allowed})")]
    MethodNotAllowed {
        path: String,
        method: String,
        allowed: &'static str,
    },
}

impl RouteError {
    pub fn status(&self) -> u16 {
        match self {
            RouteError::NotFound(_) => 404,
            RouteError::MethodNotAllowed { .. } => 405,
        }
    }
}

/// The route of `method` on `path`.
pub fn route(method: &str, path: &str) -> Result<&'static Route, RouteError> {
    let found = path
        .strip_prefix(API_PREFIX)
        .and_then(|name| ROUTES.iter().find(|r| r.name == name))
        .ok_or_else(|| RouteError::NotFound(path.chars().take(200).collect()))?;
    if found.method.as_str() == method {
        Ok(found)
    } else {
        Err(RouteError::MethodNotAllowed {
            path: path.to_string(),
            method: method.chars().take(100).collect(),
            allowed: found.method.as_str(),
        })
    }
}

/// The route of an endpoint.
pub fn route_of(endpoint: Endpoint) -> &'static Route {
    ROUTES
        .iter()
        .find(|r| r.endpoint == endpoint)
        .expect("every Endpoint has a route in ROUTES")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing() {
        assert_eq!(route("GET", "/api/v1/vm.info").unwrap().endpoint, E::VmInfo);
        assert_eq!(route("PUT", "/api/v1/vm.info").unwrap_err().status(), 405);
        assert_eq!(route("GET", "/api/v1/vm.nope").unwrap_err().status(), 404);
        assert_eq!(route("GET", "/api/v2/vm.info").unwrap_err().status(), 404);
        assert_eq!(route("GET", "/api/v1/vm.info/").unwrap_err().status(), 404);
    }

    #[test]
    fn table_is_consistent() {
        let all = [
            E::VmmPing,
            E::VmmShutdown,
            E::VmCreate,
            E::VmBoot,
            E::VmPause,
            E::VmResume,
            E::VmShutdown,
            E::VmReboot,
            E::VmNmi,
            E::VmPowerButton,
            E::VmDelete,
            E::VmInfo,
            E::VmCounters,
            E::VmSendMigration,
            E::VmReceiveMigration,
            E::VmMigrationInfo,
            E::VmCancelMigration,
            E::VmStartPostcopy,
            E::VmCoredump,
            E::VmSnapshot,
            E::VmRestore,
            E::VmAddDisk,
            E::VmAddDevice,
            E::VmAddUserDevice,
            E::VmRemoveDevice,
            E::VmResize,
        ];
        assert_eq!(all.len(), ROUTES.len());
        for e in all {
            let r = route_of(e);
            assert_eq!(ROUTES.iter().filter(|x| x.name == r.name).count(), 1);
            assert!(
                r.statuses.iter().any(|s| (200..300).contains(s)),
                "{}",
                r.name
            );
            if r.method == Get {
                assert_eq!(r.body, B::Ignored, "{}", r.name);
            }
        }
    }
}
