//! The API socket: a UNIX stream listener and one thread per connection, so a long
//! request (a migration) never delays another connection's `vm.info`.
//!
//! A connection serves requests one after the other (keep-alive, pipelining) until the
//! client closes it, asks to close, sends something that is not HTTP (answered with its
//! 4xx, then closed), or stays silent: an idle connection is closed after
//! [`IDLE_TIMEOUT`], a request that takes longer than [`REQUEST_TIMEOUT`] to arrive gets
//! 408. At most [`MAX_CLIENTS`] connections are served at once; more get 503.
//!
//! Requests are parsed and answers written by [`super::http`] (micro_http inside). The
//! connections are Ferry's own rather than micro_http's `HttpServer`, which serves every
//! connection from one thread: there a migration request would hold up every other client.

use std::io::{self, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::http::{self, ParseError, Response};
use super::Vmm;

/// A connection without a request in progress is closed after this long.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// A request must arrive completely within this long after its first byte.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at the same time.
pub const MAX_CLIENTS: usize = 64;
/// Bytes read from the socket at once.
const READ_CHUNK: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("API socket {path}: another process is listening on it")]
    InUse { path: PathBuf },
    #[error("API socket {path}: exists and is not a socket")]
    NotSocket { path: PathBuf },
    #[error("API socket {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Binds `path`, replacing a stale socket nobody listens on.
pub fn bind(path: &Path) -> Result<UnixListener, ServerError> {
    let io_err = |source| ServerError::Io {
        path: path.to_path_buf(),
        source,
    };
    match listen_owner_only(path) {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            let meta = std::fs::symlink_metadata(path).map_err(io_err)?;
            if !meta.file_type().is_socket() {
                return Err(ServerError::NotSocket {
                    path: path.to_path_buf(),
                });
            }
            if UnixStream::connect(path).is_ok() {
                return Err(ServerError::InUse {
                    path: path.to_path_buf(),
                });
            }
            log::info!("removing stale API socket {}", path.display());
            std::fs::remove_file(path).map_err(io_err)?;
            listen_owner_only(path).map_err(io_err)
        }
        Err(e) => Err(io_err(e)),
    }
}

/// Binds a UNIX socket at `path` readable and writable by its owner only (0600), and
/// only then listens: a connection attempt before the mode is set is refused, so no
/// other user ever reaches the API (whoever can connect can run and move the VM).
fn listen_owner_only(path: &Path) -> io::Result<UnixListener> {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::PermissionsExt;

    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "a socket path must be shorter than {} bytes and hold no NUL (it has {})",
                addr.sun_path.len(),
                bytes.len()
            ),
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket this function owns from here on.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: addr is a valid sockaddr_un and len does not exceed its size (checked).
    let r = unsafe {
        libc::bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            (&addr as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    // SAFETY: fd is a bound socket this function owns.
    if unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&fd), 128) } != 0 {
        let e = io::Error::last_os_error();
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(UnixListener::from(fd))
}

/// A running API server. Dropping it removes the socket file (connections being served
/// go on until they end).
pub struct ApiServer {
    path: PathBuf,
    _accept: JoinHandle<()>,
}

impl ApiServer {
    /// Binds `path` and serves `vmm` on it from a new thread.
    pub fn start(path: &Path, vmm: Arc<Vmm>) -> Result<ApiServer, ServerError> {
        let listener = bind(path)?;
        let accept = std::thread::Builder::new()
            .name("api-accept".into())
            .spawn(move || accept_loop(listener, vmm))
            .map_err(|source| ServerError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        log::info!("API server listening on {}", path.display());
        Ok(ApiServer {
            path: path.to_path_buf(),
            _accept: accept,
        })
    }

    pub fn socket_path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop(listener: UnixListener, vmm: Arc<Vmm>) {
    accept_connections(
        listener,
        "API",
        "api-conn",
        MAX_CLIENTS,
        |mut stream| {
            let mut r = Response::error(
                503,
                format!("too many API connections (at most {MAX_CLIENTS}); try again"),
            );
            r.close = true;
            let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
            let _ = stream.write_all(&r.to_bytes());
        },
        move |stream| serve(stream, &vmm),
    )
}

/// Accepts connections on `listener` for ever, each served by `serve` on a thread of its
/// own named `thread_name` (inheriting the caller's seccomp filter); past `max` at once,
/// `refuse` answers the extra one on the accepting thread. `what` names the socket in
/// the log. The API and QMP servers share it.
pub fn accept_connections<S, R>(
    listener: UnixListener,
    what: &'static str,
    thread_name: &'static str,
    max: usize,
    refuse: R,
    serve: S,
) where
    S: Fn(UnixStream) + Send + Sync + 'static,
    R: Fn(UnixStream),
{
    let serve = Arc::new(serve);
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                // EMFILE and the like: wait for connections to end rather than spin.
                log::warn!("{what} socket accept: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if active.fetch_add(1, Ordering::SeqCst) >= max {
            active.fetch_sub(1, Ordering::SeqCst);
            refuse(stream);
            continue;
        }
        let (serve, active2) = (serve.clone(), active.clone());
        let spawned = std::thread::Builder::new()
            .name(thread_name.into())
            .spawn(move || {
                serve(stream);
                active2.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            active.fetch_sub(1, Ordering::SeqCst);
            log::warn!("{what} connection thread: {e}");
        }
    }
}

/// Sends an error answer, then closes gracefully: stop writing, read and drop what the
/// client still sends for a moment, so it sees the answer rather than a reset.
fn refuse(stream: &mut UnixStream, status: u16, message: &str) {
    let mut r = Response::error(status, message);
    r.close = true;
    if stream.write_all(&r.to_bytes()).is_err() {
        return;
    }
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
    let end = Instant::now() + Duration::from_secs(1);
    let mut sink = [0u8; 8192];
    let mut drained = 0usize;
    while Instant::now() < end && drained < 4 * http::MAX_BODY {
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
}

/// Serves one connection until it ends.
fn serve(mut stream: UnixStream, vmm: &Arc<Vmm>) {
    let _ = stream.set_write_timeout(Some(REQUEST_TIMEOUT));
    let mut buf: Vec<u8> = Vec::new();
    let mut sent_continue = false;
    // When the first byte of the request in progress arrived.
    let mut started: Option<Instant> = None;
    loop {
        match http::parse_request(&buf) {
            Ok((req, used)) => {
                buf.drain(..used);
                sent_continue = false;
                started = (!buf.is_empty()).then(Instant::now);
                let handled = super::handle(vmm, &req);
                let mut resp = handled.response;
                // A HEAD request must not get a body; closing keeps the framing honest.
                resp.close |= !req.keep_alive || req.method == "HEAD";
                let sent = stream.write_all(&resp.to_bytes()).is_ok();
                if let Some(code) = handled.exit {
                    let _ = stream.shutdown(std::net::Shutdown::Both);
                    vmm.request_exit(code);
                    return;
                }
                if !sent || resp.close {
                    let _ = stream.shutdown(std::net::Shutdown::Both);
                    return;
                }
            }
            Err(ParseError::Incomplete(p)) => {
                if p.expect_continue && !sent_continue {
                    sent_continue = true;
                    if stream.write_all(&Response::proceed().to_bytes()).is_err() {
                        return;
                    }
                }
                let timeout = match started {
                    None => IDLE_TIMEOUT,
                    Some(t) => match REQUEST_TIMEOUT.checked_sub(t.elapsed()) {
                        Some(left) if !left.is_zero() => left,
                        _ => {
                            refuse(
                                &mut stream,
                                408,
                                &format!(
                                    "the request did not arrive within {}s",
                                    REQUEST_TIMEOUT.as_secs()
                                ),
                            );
                            return;
                        }
                    },
                };
                let _ = stream.set_read_timeout(Some(timeout));
                let want = p
                    .needed
                    .map_or(READ_CHUNK, |n| n.saturating_sub(buf.len()))
                    .clamp(1, READ_CHUNK);
                let old = buf.len();
                buf.resize(old + want, 0);
                let r = stream.read(&mut buf[old..]);
                buf.truncate(old + *r.as_ref().unwrap_or(&0));
                match r {
                    Ok(0) => {
                        // Client done writing: answer a cut request if it still reads.
                        if buf.iter().any(|b| !b.is_ascii_whitespace()) {
                            let e = ParseError::Incomplete(p);
                            refuse(&mut stream, e.status(), &e.to_string());
                        }
                        return;
                    }
                    Ok(_) => {
                        started.get_or_insert_with(Instant::now);
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) =>
                    {
                        if started.is_some() {
                            continue; // the loop answers 408 once the deadline passed
                        }
                        return; // idle keep-alive connection
                    }
                    Err(_) => return,
                }
            }
            Err(e) => {
                refuse(&mut stream, e.status(), &e.to_string());
                return;
            }
        }
    }
}
