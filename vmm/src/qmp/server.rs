//! The QMP socket: a UNIX stream listener (owner-only, as the API's), one thread per
//! connection. A connection lives as long as its client keeps it: QMP clients stay
//! connected to hear events, so there is no idle timeout. At most [`MAX_CLIENTS`] at once.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{json, Value};

use super::commands::{Next, Shared};
use super::protocol::{self, Failure, Frame};
use super::QmpError;
use crate::api::{ServerError, Vmm};

/// Connections served at the same time.
pub const MAX_CLIENTS: usize = 16;
/// A client that reads nothing for this long while an answer or event waits is dropped
/// from that write (events are written from lifecycle paths: they must not hang there).
const WRITE_TIMEOUT: Duration = Duration::from_secs(1);
const READ_CHUNK: usize = 16 * 1024;

/// One client's connection.
pub(super) struct Conn {
    out: Mutex<UnixStream>,
    /// `qmp_capabilities` done: commands served, events sent.
    pub negotiated: AtomicBool,
}

impl Conn {
    /// Writes one message whole (answers and events never interleave).
    pub fn send(&self, v: &Value) -> bool {
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        out.write_all(&protocol::to_wire(v)).is_ok()
    }
}

/// The connections, for events.
#[derive(Default)]
pub(super) struct Clients {
    conns: Mutex<Vec<Weak<Conn>>>,
}

impl Clients {
    fn add(&self, c: &Arc<Conn>) {
        let mut v = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        v.retain(|w| w.strong_count() > 0);
        v.push(Arc::downgrade(c));
    }

    /// Sends event `name` to every negotiated connection, written before returning (a
    /// source's `completed` must be out before its process ends).
    pub fn broadcast(&self, name: &str, data: Value) {
        let ev = protocol::event(name, data);
        let conns: Vec<Arc<Conn>> = self
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for c in conns.iter().filter(|c| c.negotiated.load(Ordering::SeqCst)) {
            c.send(&ev);
        }
    }
}

/// The process's QMP server (the events listener is process-wide, so only one).
static SERVER: OnceLock<(PathBuf, Arc<Shared>)> = OnceLock::new();

/// The lifecycle event listener: turns [`crate::events`] into QMP events.
fn on_event(source: &str, event: &str, properties: &[(&str, &str)]) {
    if let Some((_, shared)) = SERVER.get() {
        shared.on_event(source, event, properties);
    }
}

/// A running QMP server. Dropping it removes the socket file.
pub struct QmpServer {
    path: PathBuf,
    _accept: JoinHandle<()>,
}

impl QmpServer {
    /// Binds `path` (0600) and serves `vmm` on it from a new thread.
    pub fn start(path: &Path, vmm: Arc<Vmm>) -> Result<QmpServer, QmpError> {
        if let Some((p, _)) = SERVER.get() {
            return Err(QmpError::AlreadyStarted(p.clone()));
        }
        // The API's binding: owner-only, a stale socket replaced. Its errors name the API
        // socket, so only their reason is kept.
        let listener = crate::api::server::bind(path).map_err(|e| QmpError::Bind {
            path: path.to_path_buf(),
            reason: match e {
                ServerError::InUse { .. } => "another process is listening on it".into(),
                ServerError::NotSocket { .. } => "exists and is not a socket".into(),
                ServerError::Io { source, .. } => source.to_string(),
            },
        })?;
        let shared = Arc::new(Shared::new(vmm));
        if SERVER.set((path.to_path_buf(), shared.clone())).is_err() {
            return Err(QmpError::AlreadyStarted(path.to_path_buf()));
        }
        crate::events::set_listener(on_event);
        // Spawned from the main thread after the seccomp init: it and its connection
        // threads run under the VMM filter, as the API's do.
        let accept = std::thread::Builder::new()
            .name("qmp-accept".into())
            .spawn(move || accept_loop(listener, shared))
            .map_err(|source| QmpError::Thread {
                path: path.to_path_buf(),
                source,
            })?;
        log::info!("QMP server listening on {}", path.display());
        Ok(QmpServer {
            path: path.to_path_buf(),
            _accept: accept,
        })
    }

    pub fn socket_path(&self) -> &Path {
        &self.path
    }
}

impl Drop for QmpServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop(listener: UnixListener, shared: Arc<Shared>) {
    // Answers and events are written with a bound: a client that stops reading must not
    // hold up the lifecycle path an event comes from.
    crate::api::server::accept_connections(
        listener,
        "QMP",
        "qmp-conn",
        MAX_CLIENTS,
        |mut stream| {
            let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
            let f = Failure::generic(format!(
                "too many QMP connections (at most {MAX_CLIENTS}); try again"
            ));
            let _ = stream.write_all(&protocol::to_wire(&protocol::error(&f, None)));
        },
        move |stream| {
            let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
            serve(stream, &shared);
        },
    )
}

/// Serves one connection until the client leaves (or `quit`).
fn serve(stream: UnixStream, shared: &Arc<Shared>) {
    let mut input = match stream.try_clone() {
        Ok(s) => s,
        Err(e) => {
            log::warn!("QMP connection: {e}");
            return;
        }
    };
    let conn = Arc::new(Conn {
        out: Mutex::new(stream),
        negotiated: AtomicBool::new(false),
    });
    if !conn.send(&protocol::greeting()) {
        return;
    }
    shared.clients.add(&conn);
    let mut framer = protocol::Framer::default();
    let mut chunk = vec![0u8; READ_CHUNK];
    loop {
        while let Some(frame) = framer.next_frame() {
            let reply = match frame {
                Frame::Value(v) => match protocol::parse_command(v) {
                    Ok(cmd) => {
                        let id = cmd.id.clone();
                        match shared.execute(&conn, cmd) {
                            (Ok(ret), next) => (protocol::success(ret, id), next),
                            (Err(f), next) => (protocol::error(&f, id), next),
                        }
                    }
                    Err((f, id)) => (protocol::error(&f, id), Next::Serve),
                },
                other => {
                    let f = other.failure().unwrap_or_else(|| Failure::generic("?"));
                    (protocol::error(&f, None), Next::Serve)
                }
            };
            let sent = conn.send(&reply.0);
            match reply.1 {
                Next::Serve => {}
                Next::Then(f) => f(),
                Next::Quit => {
                    shared.quit();
                    return;
                }
            }
            if !sent {
                return;
            }
        }
        match input.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => framer.push(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// An event with no data.
pub(super) fn no_data() -> Value {
    json!({})
}
