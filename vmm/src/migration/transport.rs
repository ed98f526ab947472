//! Where a migration stream goes: `tcp:HOST:PORT` or `unix:PATH`, with socket options
//! that make a dead peer or a silent link an error within seconds rather than hours.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use vm_migration::transport::FdUnixStream;

use super::tls::{CancelCheck, ClientTls, ServerTls, TlsError, TlsStream};

/// How long unacknowledged data may sit on a TCP connection before the kernel gives up
/// (TCP_USER_TIMEOUT), and how long a blocking read may wait for the peer.
pub const PEER_SILENCE_LIMIT: Duration = Duration::from_secs(6);

/// How often a wait for the source's connection checks whether to give up.
const ACCEPT_CHECK_EVERY: Duration = Duration::from_millis(50);

/// Waits until `fd` has something to read or `limit` passed: `Ok(true)` when readable,
/// `Ok(false)` on the time limit or a signal (the caller looks again).
pub(super) fn wait_readable(fd: RawFd, limit: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = limit.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: `pfd` is one valid pollfd for the call's duration; `fd` is the caller's and
    // only polled.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(false)
        } else {
            Err(e)
        };
    }
    Ok(n > 0)
}

/// A migration endpoint address, in cloud-hypervisor's syntax.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub enum MigrationUrl {
    /// `tcp:HOST:PORT` (`tcp:[::1]:6000` for IPv6).
    Tcp { host: String, port: u16 },
    /// `unix:/path/to/socket`.
    Unix(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{url:?} is not a migration URL ({why}); use tcp:HOST:PORT or unix:/path")]
pub struct UrlError {
    pub url: String,
    pub why: &'static str,
}

impl FromStr for MigrationUrl {
    type Err = UrlError;

    fn from_str(url: &str) -> Result<Self, UrlError> {
        let bad = |why| UrlError {
            url: url.chars().take(200).collect(),
            why,
        };
        if let Some(path) = url.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad("empty socket path"));
            }
            if path.contains('\0') {
                return Err(bad("NUL in the socket path"));
            }
            return Ok(MigrationUrl::Unix(PathBuf::from(path)));
        }
        let Some(rest) = url.strip_prefix("tcp:") else {
            return Err(bad("unknown scheme"));
        };
        let (host, port) = rest.rsplit_once(':').ok_or_else(|| bad("no port"))?;
        let host = match host.strip_prefix('[') {
            Some(h) => h.strip_suffix(']').ok_or_else(|| bad("unclosed '['"))?,
            None => host,
        };
        if host.is_empty() {
            return Err(bad("empty host"));
        }
        if host
            .chars()
            .any(|c| !(c.is_ascii_alphanumeric() || ".-_:".contains(c)))
        {
            return Err(bad("invalid character in the host"));
        }
        let port: u16 = port
            .parse()
            .map_err(|_| bad("the port is not 0 to 65535"))?;
        Ok(MigrationUrl::Tcp {
            host: host.to_string(),
            port,
        })
    }
}

impl std::fmt::Display for MigrationUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MigrationUrl::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
            MigrationUrl::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// One connection of a migration.
pub enum Stream {
    Tcp(TcpStream),
    /// Keeps file descriptors that arrive with the data (`MemFDs`).
    Unix(FdUnixStream),
    /// A TLS session over TCP (`tls_dir`), its handshake done.
    Tls(Box<TlsStream>),
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stream::Tcp(s) => f.debug_tuple("Tcp").field(s).finish(),
            Stream::Unix(s) => f.debug_tuple("Unix").field(s).finish(),
            Stream::Tls(s) => f.debug_tuple("Tls").field(s.tcp()).finish(),
        }
    }
}

fn set_int_opt(fd: i32, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: setsockopt with a pointer to a live i32 and its exact size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn tune_tcp(s: &TcpStream) -> io::Result<()> {
    s.set_nodelay(true)?;
    let fd = s.as_raw_fd();
    // Large buffers keep a 10+ Gbit/s stream from stalling on the socket.
    set_int_opt(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, 8 << 20)?;
    set_int_opt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, 8 << 20)?;
    // A silent link (cable cut, peer frozen) fails writes after this long.
    set_int_opt(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_USER_TIMEOUT,
        PEER_SILENCE_LIMIT.as_millis() as i32,
    )?;
    set_int_opt(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    set_int_opt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 2)?;
    set_int_opt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 1)?;
    set_int_opt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3)?;
    Ok(())
}

impl Stream {
    /// Connects to `url`, giving up after `timeout`.
    pub fn connect(url: &MigrationUrl, timeout: Duration) -> io::Result<Stream> {
        let s = match url {
            MigrationUrl::Tcp { host, port } => {
                let mut last =
                    io::Error::new(io::ErrorKind::NotFound, format!("{host} has no address"));
                let mut found = None;
                for addr in (host.as_str(), *port).to_socket_addrs()? {
                    match TcpStream::connect_timeout(&addr, timeout) {
                        Ok(s) => {
                            found = Some(s);
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                let s = found.ok_or(last)?;
                tune_tcp(&s)?;
                Stream::Tcp(s)
            }
            MigrationUrl::Unix(p) => Stream::Unix(FdUnixStream::new(UnixStream::connect(p)?)),
        };
        s.set_read_timeout(Some(PEER_SILENCE_LIMIT))?;
        Ok(s)
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.get_ref().set_read_timeout(t),
            Stream::Tls(s) => s.tcp().set_read_timeout(t),
        }
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(t),
            Stream::Unix(s) => s.get_ref().set_write_timeout(t),
            Stream::Tls(s) => s.set_write_timeout(t),
        }
    }

    /// A second handle on the same connection (not for a TLS session, whose state
    /// cannot be shared).
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(FdUnixStream::new(s.get_ref().try_clone()?)),
            Stream::Tls(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "a TLS session cannot be cloned",
                ))
            }
        })
    }

    /// Ends both directions (wakes a thread blocked on this stream).
    pub fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.get_ref().shutdown(Shutdown::Both),
            Stream::Tls(s) => s.tcp().shutdown(Shutdown::Both),
        };
    }

    pub fn unix(&self) -> Option<&UnixStream> {
        match self {
            Stream::Unix(s) => Some(s.get_ref()),
            Stream::Tcp(_) | Stream::Tls(_) => None,
        }
    }

    /// Connects to `url` and, with `tls`, runs the TLS handshake on the connection
    /// (`later`: on its first read or write, see [`ClientTls::connect_later`]), checking
    /// the destination's certificate against the URL's host; `cancel` (the migration's
    /// cancel check) ends the handshake early, the deferred one too. TLS needs a `tcp:`
    /// URL (the API refuses `tls_dir` with `unix:`).
    pub fn connect_tls(
        url: &MigrationUrl,
        timeout: Duration,
        tls: Option<&ClientTls>,
        later: bool,
        cancel: CancelCheck,
    ) -> io::Result<Stream> {
        let s = Stream::connect(url, timeout)?;
        match (s, tls, url) {
            (s, None, _) => Ok(s),
            (Stream::Tcp(t), Some(tls), MigrationUrl::Tcp { host, .. }) => {
                let t = if later {
                    tls.connect_later(t, host, cancel)
                } else {
                    tls.connect(t, host, cancel)
                }
                .map_err(tls_io_error)?;
                Ok(Stream::Tls(Box::new(t)))
            }
            (_, Some(_), _) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "TLS needs a tcp: migration URL",
            )),
        }
    }

    /// With `tls`, runs the server side of the TLS handshake on an accepted connection
    /// (`stop`: give up, checked every 100 ms).
    pub fn accept_tls(
        self,
        tls: Option<&ServerTls>,
        stop: &dyn Fn() -> bool,
    ) -> io::Result<Stream> {
        match (self, tls) {
            (s, None) => Ok(s),
            (Stream::Tcp(t), Some(tls)) => {
                let t = tls.accept(t, stop).map_err(tls_io_error)?;
                Ok(Stream::Tls(Box::new(t)))
            }
            (_, Some(_)) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "TLS needs a tcp: migration URL",
            )),
        }
    }
}

impl Stream {
    /// On a plain TCP connection just accepted: whether the peer began with a TLS
    /// handshake record (a source given a `tls_dir`, sending to a receiver without one).
    /// Waits up to 2 s for its first bytes (until `stop`), consuming none.
    pub fn peer_starts_tls(&self, stop: &dyn Fn() -> bool) -> bool {
        let Stream::Tcp(t) = self else {
            return false;
        };
        let _ = t.set_read_timeout(Some(vm_migration::transport::POLL_INTERVAL));
        let end = std::time::Instant::now() + Duration::from_secs(2);
        let mut b = [0u8; 2];
        let found = loop {
            match t.peek(&mut b) {
                // A TLS record: content type 22 (handshake), then version major 3.
                Ok(n) if n >= 1 => break b[0] == 0x16 && (n < 2 || b[1] == 0x03),
                Ok(_) => break false,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) && std::time::Instant::now() < end
                        && !stop() => {}
                Err(_) => break false,
            }
        };
        let _ = t.set_read_timeout(Some(PEER_SILENCE_LIMIT));
        found
    }

    /// Refuses the peer with `reason` in the plain protocol (see [`super::tls::refuse_in_plain`]).
    pub fn refuse_in_plain(self, reason: &str) {
        if let Stream::Tcp(mut t) = self {
            super::tls::refuse_in_plain(&mut t, reason);
        }
    }
}

/// A TLS failure as the I/O error the engine reports (its text is the error's).
fn tls_io_error(e: TlsError) -> io::Error {
    io::Error::other(e)
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Unix(s) => s.get_ref().write_vectored(bufs),
            Stream::Tls(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tls(s) => s.flush(),
            Stream::Tcp(_) | Stream::Unix(_) => Ok(()),
        }
    }
}

/// A bound migration endpoint waiting for the source.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l, _) => l.as_raw_fd(),
        }
    }
}

impl Listener {
    pub fn bind(url: &MigrationUrl) -> io::Result<Listener> {
        Ok(match url {
            MigrationUrl::Tcp { host, port } => {
                Listener::Tcp(TcpListener::bind((host.as_str(), *port))?)
            }
            MigrationUrl::Unix(p) => {
                // A stale socket file from an earlier run would make bind fail.
                if std::fs::symlink_metadata(p).is_ok_and(|m| {
                    use std::os::unix::fs::FileTypeExt;
                    m.file_type().is_socket()
                }) {
                    let _ = std::fs::remove_file(p);
                }
                Listener::Unix(UnixListener::bind(p)?, p.clone())
            }
        })
    }

    /// Waits for the next connection.
    pub fn accept(&self) -> io::Result<Stream> {
        let s = match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                tune_tcp(&s)?;
                Stream::Tcp(s)
            }
            Listener::Unix(l, _) => Stream::Unix(FdUnixStream::new(l.accept()?.0)),
        };
        s.set_read_timeout(Some(PEER_SILENCE_LIMIT))?;
        Ok(s)
    }

    /// Waits for a connection until `stop` says to give up (checked every 50 ms). The
    /// wait is a `poll` on the listener, so a connection is taken the moment it arrives
    /// (a nap between tries added up to 50 ms to every migration's total time).
    pub fn accept_until(&self, stop: impl Fn() -> bool) -> io::Result<Stream> {
        self.set_nonblocking(true)?;
        loop {
            let r = match self {
                Listener::Tcp(l) => l.accept().map(|(s, _)| Stream::Tcp(s)),
                Listener::Unix(l, _) => l.accept().map(|(s, _)| Stream::Unix(FdUnixStream::new(s))),
            };
            match r {
                Ok(s) => {
                    match &s {
                        Stream::Tcp(t) => {
                            t.set_nonblocking(false)?;
                            tune_tcp(t)?;
                        }
                        Stream::Unix(u) => u.get_ref().set_nonblocking(false)?,
                        Stream::Tls(_) => unreachable!("accepted connections are plain"),
                    }
                    s.set_read_timeout(Some(PEER_SILENCE_LIMIT))?;
                    return Ok(s);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if stop() {
                        return Err(io::Error::new(
                            io::ErrorKind::Interrupted,
                            "cancelled while waiting for the source",
                        ));
                    }
                    wait_readable(self.as_raw_fd(), ACCEPT_CHECK_EVERY)?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => l.set_nonblocking(on),
            Listener::Unix(l, _) => l.set_nonblocking(on),
        }
    }

    /// The local port (TCP), e.g. when bound to port 0.
    pub fn port(&self) -> Option<u16> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok().map(|a| a.port()),
            Listener::Unix(..) => None,
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl vm_migration::MigrationStream for Stream {
    fn set_io_timeouts(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(timeout)?;
        self.set_write_timeout(timeout)
    }

    fn shutdown_both(&self) {
        self.shutdown();
    }

    fn can_pass_fds(&self) -> bool {
        matches!(self, Stream::Unix(_))
    }

    fn write_with_fds(&mut self, buf: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.write_with_fds(buf, fds),
            Stream::Tcp(_) | Stream::Tls(_) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a TCP connection cannot pass file descriptors",
            )),
        }
    }

    fn take_fds(&mut self) -> Vec<OwnedFd> {
        match self {
            Stream::Unix(s) => s.take_fds(),
            Stream::Tcp(_) | Stream::Tls(_) => Vec::new(),
        }
    }

    fn spin_until_readable(&self, at_most: Duration) -> bool {
        match self {
            Stream::Tcp(s) => s.spin_until_readable(at_most),
            Stream::Unix(s) => s.spin_until_readable(at_most),
            // Its records may hold bytes already read from the socket.
            Stream::Tls(_) => false,
        }
    }

    fn try_clone_stream(&self) -> io::Result<Self> {
        match self {
            Stream::Tcp(s) => s.try_clone().map(Stream::Tcp),
            Stream::Unix(s) => s.try_clone_stream().map(Stream::Unix),
            // One TLS session's records cannot be read and written from two handles.
            Stream::Tls(_) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a TLS connection cannot be shared between a reader and a writer",
            )),
        }
    }
}

/// Accepts a migration's extra connections on the receiver, each TLS handshake on its
/// own thread (in `scope`).
///
/// Why here and not on the sender: the sender runs each extra connection's handshake
/// when it first writes to it, one connection after another in its own lane order,
/// while connections are accepted in the order they reach this side. Handshaking them
/// one by one here would wait on one the sender does not serve yet while the sender
/// waits on another (both until the handshake timeout). With a thread each, whatever
/// order the sender takes is served, whoever it is (a stray or slow peer holds only its
/// own thread), and the sender stays simple.
pub struct LaneAcceptor<'a, 'scope, 'env> {
    listener: &'a Listener,
    tls: Option<ServerTls>,
    scope: &'scope std::thread::Scope<'scope, 'env>,
    cancel: CancelCheck,
    /// Set when the migration no longer takes connections: handshakes still running end.
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Handshakes finished (accepted or failed), in the order they finished.
    ready: std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<io::Result<Stream>>>>,
}

impl<'a, 'scope, 'env> LaneAcceptor<'a, 'scope, 'env> {
    pub fn new(
        listener: &'a Listener,
        tls: Option<ServerTls>,
        scope: &'scope std::thread::Scope<'scope, 'env>,
        cancel: CancelCheck,
    ) -> Self {
        LaneAcceptor {
            listener,
            tls,
            scope,
            cancel,
            done: Default::default(),
            ready: Default::default(),
        }
    }

    fn take_ready(&self) -> Option<io::Result<Stream>> {
        self.ready
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front()
    }

    /// The next connection whose handshake completed (or failed), accepting and starting
    /// handshakes meanwhile, for up to `timeout` or until cancelled.
    pub fn accept(&mut self, timeout: Duration) -> io::Result<Stream> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(r) = self.take_ready() {
                return r;
            }
            let ready = &self.ready;
            let cancel = &self.cancel;
            let got = self.listener.accept_until(|| {
                cancel()
                    || std::time::Instant::now() >= deadline
                    || !ready.lock().unwrap_or_else(|e| e.into_inner()).is_empty()
            });
            let s = match got {
                Ok(s) => s,
                Err(e) => match self.take_ready() {
                    Some(r) => return r,
                    None => return Err(e),
                },
            };
            let Some(tls) = self.tls.clone() else {
                return Ok(s);
            };
            let (cancel, done, ready) =
                (self.cancel.clone(), self.done.clone(), self.ready.clone());
            std::thread::Builder::new()
                .name("mig-tls-accept".into())
                .spawn_scoped(self.scope, move || {
                    let stop = || cancel() || done.load(std::sync::atomic::Ordering::Relaxed);
                    let r = s.accept_tls(Some(&tls), &stop);
                    ready.lock().unwrap_or_else(|e| e.into_inner()).push_back(r);
                })?;
        }
    }
}

impl Drop for LaneAcceptor<'_, '_, '_> {
    /// Handshakes still running end at their next check (within 100 ms).
    fn drop(&mut self) {
        self.done.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            "tcp:127.0.0.1:6000".parse(),
            Ok(MigrationUrl::Tcp {
                host: "127.0.0.1".into(),
                port: 6000
            })
        );
        assert_eq!(
            "tcp:[::1]:6000"
                .parse::<MigrationUrl>()
                .unwrap()
                .to_string(),
            "tcp:::1:6000"
        );
        assert_eq!(
            "unix:/tmp/m.sock".parse(),
            Ok(MigrationUrl::Unix("/tmp/m.sock".into()))
        );
        for bad in [
            "http://x",
            "tcp:host",
            "tcp:host:port",
            "tcp::80",
            "unix:",
            "",
        ] {
            let e = bad.parse::<MigrationUrl>().unwrap_err().to_string();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn tcp_and_unix_round_trip() {
        let l = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
        let url: MigrationUrl = format!("tcp:127.0.0.1:{}", l.port().unwrap())
            .parse()
            .unwrap();
        let t = std::thread::spawn(move || {
            let mut s = l.accept().unwrap();
            let mut b = [0u8; 5];
            s.read_exact(&mut b).unwrap();
            b
        });
        let mut c = Stream::connect(&url, Duration::from_secs(5)).unwrap();
        c.write_all(b"hello").unwrap();
        assert_eq!(&t.join().unwrap(), b"hello");

        let path = std::env::temp_dir().join(format!("ferry-t-{}.sock", std::process::id()));
        let url = MigrationUrl::Unix(path.clone());
        let l = Listener::bind(&url).unwrap();
        let t = std::thread::spawn(move || {
            let mut s = l.accept().unwrap();
            let mut b = [0u8; 2];
            s.read_exact(&mut b).unwrap();
            b
        });
        Stream::connect(&url, Duration::from_secs(5))
            .unwrap()
            .write_all(b"ok")
            .unwrap();
        assert_eq!(&t.join().unwrap(), b"ok");
        assert!(!path.exists(), "the listener removes its socket file");
    }
}
