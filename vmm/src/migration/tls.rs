//! Migration over TLS 1.3 with mutual authentication (rustls, ring provider).
//!
//! cloud-hypervisor's interface: `tls_dir` names a directory. The receiver's holds
//! `ca-cert.pem`, `server-cert.pem` and `server-key.pem`; the sender's holds `ca-cert.pem`,
//! `client-cert.pem` and `client-key.pem`. Each side accepts only a peer certificate that
//! chains to its own `ca-cert.pem`; the receiver requires one from every connection. The
//! sender checks the receiver's certificate against the host of the `tcp:HOST:PORT` URL
//! it was given: an IP address must be in an IP subjectAltName, a name in a DNS one.
//!
//! A missing file is an error naming it (the sender needs its certificate and key too: a
//! Ferry receiver refuses a sender without one). A private key readable or writable by
//! group or others is refused, naming the file and its mode. Each file is opened once,
//! without blocking, and checked (regular file, the key's mode) on the descriptor it is
//! then read from.
//!
//! Every connection of a migration (`connections` > 1) is its own TLS session with its
//! own handshake and checks. [`TlsStream`] carries the engine's bytes; the engine does not
//! know it runs over TLS.
//!
//! In TLS 1.3 a client's handshake is over before the server has checked the client's
//! certificate: a refusal would arrive only with the server's next record, by then
//! racing the client's first writes against the server's close. So right after its
//! handshake the receiver sends one byte ([`ACCEPTED`]) inside the session, and the
//! sender's handshake waits for it: a sender whose certificate was refused learns it,
//! with the receiver's alert, before any migration data moves.

use std::io::{self, IoSlice, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{AlertDescription, CertificateError, ClientConfig, Connection, RootCertStore};
use rustls::{ServerConfig, ServerConnection};

pub const CA_CERT: &str = "ca-cert.pem";
pub const SERVER_CERT: &str = "server-cert.pem";
pub const SERVER_KEY: &str = "server-key.pem";
pub const CLIENT_CERT: &str = "client-cert.pem";
pub const CLIENT_KEY: &str = "client-key.pem";

/// How long a TLS handshake (with the receiver's [`ACCEPTED`] byte) may take in all,
/// from its start, however the peer trickles its bytes.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The byte the receiver sends once it accepted the sender's certificate.
const ACCEPTED: u8 = 0x01;
/// Plaintext taken per `write` call: 16 TLS records, sent with one `writev`.
const WRITE_CHUNK: usize = 256 << 10;
/// Bytes read from the socket at once (rustls alone would read 4 KiB at a time).
const READ_BUFFER: usize = 256 << 10;
/// Plaintext encrypted at once: one TLS record's worth, so that what a `write` reports
/// taken is known to be in the socket record by record.
const RECORD_PLAIN: usize = 16 << 10;
/// The first byte of a TLS record carrying a handshake message (a ClientHello).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// A migration's cancel check, kept by a stream whose handshake runs later.
pub type CancelCheck = Arc<dyn Fn() -> bool + Send + Sync>;

/// Why TLS could not be set up: files of the `tls_dir`, or a handshake.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls_dir {0}: not a directory")]
    NotADirectory(PathBuf),
    #[error("{path} is missing (tls_dir must hold {needs})")]
    Missing { path: PathBuf, needs: &'static str },
    #[error("cannot read {path}: {source}")]
    Unreadable { path: PathBuf, source: io::Error },
    #[error("{0} is not a regular file")]
    NotAFile(PathBuf),
    #[error("{0} is a symbolic link to a file that does not exist")]
    DanglingLink(PathBuf),
    #[error(
        "{path} has mode {mode:04o}: a private key must be readable by its owner only \
         (chmod 600 {path})"
    )]
    KeyExposed { path: PathBuf, mode: u32 },
    #[error("{path}: not valid PEM: {reason}")]
    BadPem { path: PathBuf, reason: String },
    #[error("{0} holds no certificate (no PEM \"BEGIN CERTIFICATE\" block)")]
    NoCertificate(PathBuf),
    #[error("{0} holds no private key (PEM PKCS#8, PKCS#1 or SEC1)")]
    NoKey(PathBuf),
    #[error("{path}: the CA certificate is not usable: {reason}")]
    BadCa { path: PathBuf, reason: String },
    #[error("{key} and {cert} are not a usable certificate and key: {reason}")]
    BadIdentity {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error(
        "the host {host:?} of the migration URL cannot be checked against the \
         destination's certificate: {reason}"
    )]
    BadServerName { host: String, reason: String },
    #[error(
        "the peer {peer} did not start a TLS handshake (plain TCP?): this side has tls_dir \
         and takes TLS only"
    )]
    PeerNotTls { peer: String },
    #[error(
        "the destination {peer} answered in Ferry's plain protocol, not TLS: it was asked to \
         receive without tls_dir"
    )]
    PeerPlain { peer: String },
    #[error("TLS handshake with {peer} failed: {reason}")]
    Handshake { peer: String, reason: String },
    #[error("TLS handshake with {peer}: not done within {} s", HANDSHAKE_TIMEOUT.as_secs())]
    HandshakeTimeout { peer: String },
    #[error("TLS handshake with {peer} cancelled")]
    Cancelled { peer: String },
}

fn needs(server: bool) -> &'static str {
    if server {
        "ca-cert.pem, server-cert.pem and server-key.pem"
    } else {
        "ca-cert.pem, client-cert.pem and client-key.pem"
    }
}

/// Opens a file of the tls_dir once, saying which one when it cannot: without blocking
/// (a FIFO put in its place opens at once and is refused as not a regular file), and a
/// regular file by `fstat` on the descriptor read next, so what is checked is what is
/// read.
fn open_file(path: &Path, server: bool) -> Result<(std::fs::File, std::fs::Metadata), TlsError> {
    use std::os::unix::fs::OpenOptionsExt;
    let unreadable = |source| TlsError::Unreadable {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.kind() {
            // A symbolic link to nothing is not "missing": say where it points.
            io::ErrorKind::NotFound
                if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) =>
            {
                TlsError::DanglingLink(path.to_path_buf())
            }
            io::ErrorKind::NotFound => TlsError::Missing {
                path: path.to_path_buf(),
                needs: needs(server),
            },
            _ => unreadable(e),
        })?;
    let meta = file.metadata().map_err(unreadable)?;
    // Not a FIFO or a device: a read must end.
    if !meta.is_file() {
        return Err(TlsError::NotAFile(path.to_path_buf()));
    }
    Ok((file, meta))
}

/// Reads all of a file [`open_file`] opened.
fn read_open(mut file: std::fs::File, path: &Path) -> Result<Vec<u8>, TlsError> {
    let mut out = Vec::new();
    file.read_to_end(&mut out)
        .map_err(|source| TlsError::Unreadable {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(out)
}

fn certificates(path: &Path, server: bool) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let (file, _) = open_file(path, server)?;
    let pem = read_open(file, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadPem {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_path_buf()));
    }
    Ok(certs)
}

fn private_key(path: &Path, server: bool) -> Result<PrivateKeyDer<'static>, TlsError> {
    // The mode is checked on the descriptor the key is then read from: a key others
    // could read is refused whatever it holds, and no rename in between changes that.
    let (file, meta) = open_file(path, server)?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(TlsError::KeyExposed {
            path: path.to_path_buf(),
            mode,
        });
    }
    let pem = read_open(file, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey(path.to_path_buf()),
        e => TlsError::BadPem {
            path: path.to_path_buf(),
            reason: e.to_string(),
        },
    })
}

fn roots(dir: &Path, server: bool) -> Result<RootCertStore, TlsError> {
    let path = dir.join(CA_CERT);
    let mut store = RootCertStore::empty();
    for cert in certificates(&path, server)? {
        store.add(cert).map_err(|e| TlsError::BadCa {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    }
    Ok(store)
}

fn check_dir(dir: &Path) -> Result<(), TlsError> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(TlsError::NotADirectory(dir.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(TlsError::Missing {
            path: dir.to_path_buf(),
            needs: "the certificates",
        }),
        Err(source) => Err(TlsError::Unreadable {
            path: dir.to_path_buf(),
            source,
        }),
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The sender's side: `dir` holds ca-cert.pem, client-cert.pem and client-key.pem.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<ClientConfig>,
    dir: PathBuf,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClientTls({})", self.dir.display())
    }
}

impl ClientTls {
    pub fn load(dir: &Path) -> Result<ClientTls, TlsError> {
        check_dir(dir)?;
        let roots = roots(dir, false)?;
        let (cert, key) = (dir.join(CLIENT_CERT), dir.join(CLIENT_KEY));
        let builder = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::BadCa {
                path: dir.join(CA_CERT),
                reason: e.to_string(),
            })?
            .with_root_certificates(roots);
        // Both files are required: without a certificate a Ferry destination refuses
        // the connection anyway, so that is said here, naming the file, before connecting.
        let chain = certificates(&cert, false)?;
        let key_der = private_key(&key, false)?;
        let config =
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| TlsError::BadIdentity {
                    cert,
                    key,
                    reason: e.to_string(),
                })?;
        Ok(ClientTls {
            config: Arc::new(config),
            dir: dir.to_path_buf(),
        })
    }

    /// Starts TLS on `sock` (connected to `host`, the URL's) and completes the handshake,
    /// including the receiver's word that it accepted this side's certificate; `cancel`
    /// (the migration's cancel check) ends it early.
    pub fn connect(
        &self,
        sock: TcpStream,
        host: &str,
        cancel: CancelCheck,
    ) -> Result<TlsStream, TlsError> {
        let mut s = self.connect_later(sock, host, cancel)?;
        s.finish_handshake()?;
        Ok(s)
    }

    /// As [`Self::connect`], with the handshake run by the stream's first read or write
    /// (which keeps `cancel` for it). For a migration's extra connections: the receiver
    /// accepts them (and so answers their handshakes) only once the first connection
    /// announced them, so the sender cannot wait for their handshakes before it starts.
    pub fn connect_later(
        &self,
        sock: TcpStream,
        host: &str,
        cancel: CancelCheck,
    ) -> Result<TlsStream, TlsError> {
        let peer = peer_name(&sock);
        let name = ServerName::try_from(host.to_string()).map_err(|e| TlsError::BadServerName {
            host: host.to_string(),
            reason: e.to_string(),
        })?;
        let conn = rustls::ClientConnection::new(self.config.clone(), name).map_err(|e| {
            TlsError::Handshake {
                peer: peer.clone(),
                reason: e.to_string(),
            }
        })?;
        let mut s = TlsStream::new(Connection::Client(conn), sock, peer, self.dir.join(CA_CERT));
        s.pending = Some((self.clone(), cancel));
        Ok(s)
    }
}

/// The receiver's side: `dir` holds ca-cert.pem, server-cert.pem and server-key.pem.
#[derive(Clone)]
pub struct ServerTls {
    config: Arc<ServerConfig>,
    dir: PathBuf,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ServerTls({})", self.dir.display())
    }
}

impl ServerTls {
    pub fn load(dir: &Path) -> Result<ServerTls, TlsError> {
        check_dir(dir)?;
        let ca = dir.join(CA_CERT);
        let roots = roots(dir, true)?;
        let (cert, key) = (dir.join(SERVER_CERT), dir.join(SERVER_KEY));
        let key_der = private_key(&key, true)?;
        let chain = certificates(&cert, true)?;
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| TlsError::BadCa {
                path: ca.clone(),
                reason: e.to_string(),
            })?;
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::BadCa {
                path: ca,
                reason: e.to_string(),
            })?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key_der)
            .map_err(|e| TlsError::BadIdentity {
                cert,
                key,
                reason: e.to_string(),
            })?;
        // One session per connection, never resumed: no tickets to send.
        config.send_tls13_tickets = 0;
        Ok(ServerTls {
            config: Arc::new(config),
            dir: dir.to_path_buf(),
        })
    }

    /// Runs the server side of the handshake on an accepted `sock`; `stop` cancels it.
    /// A peer that sends something other than a TLS handshake is told so in Ferry's
    /// plain protocol (an `Abort` its engine shows) and refused.
    pub fn accept(&self, sock: TcpStream, stop: &dyn Fn() -> bool) -> Result<TlsStream, TlsError> {
        let peer = peer_name(&sock);
        let conn = ServerConnection::new(self.config.clone()).map_err(|e| TlsError::Handshake {
            peer: peer.clone(),
            reason: e.to_string(),
        })?;
        let mut s = TlsStream::new(Connection::Server(conn), sock, peer, self.dir.join(CA_CERT));
        s.run_handshake(stop, None)?;
        Ok(s)
    }
}

fn peer_name(sock: &TcpStream) -> String {
    sock.peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "(unknown peer)".into())
}

/// The socket under a TLS session: reads go through a large buffer (rustls reads 4 KiB
/// at a time); the handshake writes straight to the socket.
struct BufSock {
    sock: TcpStream,
    buf: Box<[u8]>,
    pos: usize,
    end: usize,
    /// The first bytes the peer sent (what it speaks, for error messages).
    first: Vec<u8>,
}

impl BufSock {
    /// Waits for at least one byte from the peer, without consuming it.
    fn fill(&mut self) -> io::Result<usize> {
        if self.pos < self.end {
            return Ok(self.end - self.pos);
        }
        let n = self.sock.read(&mut self.buf)?;
        self.pos = 0;
        self.end = n;
        if self.first.len() < 4 {
            let take = n.min(4 - self.first.len());
            self.first.extend_from_slice(&self.buf[..take]);
        }
        Ok(n)
    }
}

impl Read for BufSock {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.fill()? == 0 {
            return Ok(0);
        }
        let n = out.len().min(self.end - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl Write for BufSock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.sock.write(buf)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.sock.write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One TLS session over one TCP connection of a migration, as a
/// [`vm_migration::MigrationStream`].
///
/// It keeps the engine's rules: a `read` or `write` that timed out moved nothing, and no
/// call waits much longer than the socket's timeout (the engine's short poll interval),
/// so the engine's own cancel and stop checks, its limit for a silent peer and its
/// bounded last words all work as over plain TCP. A `write` encrypts up to
/// [`WRITE_CHUNK`] one record at a time, tries once (for about one socket timeout) to
/// hand the records to the socket, and reports taken only the plaintext whose records
/// are all in the socket. Records encrypted but not sent in full are kept with their
/// plaintext: the caller's next `write` repeats those bytes (as `io::Write` callers do
/// with what a write did not take), and they are finished, not encrypted again. So
/// nothing the engine was told is sent waits in this stream: the engine's extra
/// connections end a pass with a `write` and no `flush`, and the destination waits for
/// that pass's end before it answers. `read` and `flush` send what is pending first (the
/// peer may wait for it); a socket timeout comes back as the socket's own error.
pub struct TlsStream {
    conn: Connection,
    sock: BufSock,
    peer: String,
    /// This side's ca-cert.pem (for error messages).
    ca: PathBuf,
    /// A client's handshake still to run, with the migration's cancel check (see
    /// [`ClientTls::connect_later`]).
    pending: Option<(ClientTls, CancelCheck)>,
    /// Why the handshake failed: every later call fails with it.
    failed: Option<String>,
    /// Records for the socket, in rustls's order; `out_pos` of them are sent.
    out: Vec<u8>,
    out_pos: usize,
    /// Plaintext encrypted into `out` but not yet reported taken, and how much of `out`
    /// (from `out_pos`) its records still are.
    owed: Vec<u8>,
    owed_cipher: usize,
    /// The socket's write timeout in ns (0: none), as last set through this stream.
    write_timeout_ns: AtomicU64,
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn rustls_error(e: &io::Error) -> Option<&rustls::Error> {
    let inner = e.get_ref()?;
    inner
        .downcast_ref::<rustls::Error>()
        .or_else(|| inner.downcast_ref::<SessionError>().map(|s| &s.err))
}

/// A TLS error in an established session, as the engine's I/O error shows it.
#[derive(Debug)]
struct SessionError {
    peer: String,
    err: rustls::Error,
}

impl std::fmt::Display for SessionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.err {
            rustls::Error::AlertReceived(a) => {
                write!(
                    f,
                    "the peer {} ended the TLS session (alert {a:?})",
                    self.peer
                )
            }
            other => write!(f, "TLS session with {}: {other}", self.peer),
        }
    }
}

impl std::error::Error for SessionError {}

impl TlsStream {
    fn new(mut conn: Connection, sock: TcpStream, peer: String, ca: PathBuf) -> TlsStream {
        // What one `write` takes must fit at once (see `write`).
        conn.set_buffer_limit(Some(2 * WRITE_CHUNK));
        TlsStream {
            conn,
            sock: BufSock {
                sock,
                buf: vec![0; READ_BUFFER].into_boxed_slice(),
                pos: 0,
                end: 0,
                first: Vec::new(),
            },
            peer,
            ca,
            pending: None,
            failed: None,
            out: Vec::new(),
            out_pos: 0,
            owed: Vec::new(),
            owed_cipher: 0,
            write_timeout_ns: AtomicU64::new(0),
        }
    }

    /// Runs the handshake, remembering a failure (see [`Self::ready`]).
    fn run_handshake(
        &mut self,
        stop: &dyn Fn() -> bool,
        client: Option<&ClientTls>,
    ) -> Result<(), TlsError> {
        let r = self.handshake(stop, client);
        if let Err(e) = &r {
            self.failed = Some(e.to_string());
        }
        r
    }

    /// Runs the client's handshake if it has not run yet.
    fn finish_handshake(&mut self) -> Result<(), TlsError> {
        if let Some((client, cancel)) = self.pending.take() {
            self.run_handshake(&*cancel, Some(&client))?;
        }
        Ok(())
    }

    /// Before any read or write: the handshake done (running a deferred one), and not
    /// failed (a failed session is not used half set up).
    fn ready(&mut self) -> io::Result<()> {
        if let Some(reason) = &self.failed {
            return Err(io::Error::other(format!(
                "TLS session with {} is unusable: its handshake failed ({reason})",
                self.peer
            )));
        }
        self.finish_handshake().map_err(io::Error::other)
    }

    pub fn tcp(&self) -> &TcpStream {
        &self.sock.sock
    }

    /// Sets the socket's write timeout, which also bounds how long one `write` pushes.
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.sock.sock.set_write_timeout(t)?;
        let ns = t.map_or(0, |t| t.as_nanos().min(u64::MAX as u128) as u64);
        self.write_timeout_ns.store(ns, Ordering::Relaxed);
        Ok(())
    }

    fn write_timeout(&self) -> Option<Duration> {
        match self.write_timeout_ns.load(Ordering::Relaxed) {
            0 => None,
            ns => Some(Duration::from_nanos(ns)),
        }
    }

    fn is_server(&self) -> bool {
        matches!(self.conn, Connection::Server(_))
    }

    /// Moves what rustls has to send (records, alerts, key updates) to `out`.
    fn collect(&mut self) {
        while self.conn.wants_write() {
            // Into a Vec: it cannot fail.
            if self.conn.write_tls(&mut self.out).is_err() {
                break;
            }
        }
    }

    /// Sends `out` to the socket while the socket takes it, stopping (Ok, some left)
    /// after `until`; a socket error, its timeout included, returns as it is.
    fn send_out(&mut self, until: Option<Instant>) -> io::Result<()> {
        while self.out_pos < self.out.len() {
            match self.sock.sock.write(&self.out[self.out_pos..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.out_pos += n;
                    self.owed_cipher = self.owed_cipher.saturating_sub(n);
                    if until.is_some_and(|u| Instant::now() >= u) {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Drops the sent part of `out`.
    fn compact(&mut self) {
        if self.out_pos == self.out.len() {
            self.out.clear();
        } else {
            self.out.drain(..self.out_pos);
        }
        self.out_pos = 0;
    }

    /// Sends everything pending (before this side waits for the peer, or on `flush`):
    /// Ok once all is in the socket; the socket's error if it took nothing for one of
    /// its timeouts.
    fn send_pending(&mut self) -> io::Result<()> {
        self.collect();
        let r = self.send_out(None);
        self.compact();
        r
    }

    /// Hands the handshake's records to the socket until `deadline`.
    fn push_handshake(&mut self, deadline: Instant) -> io::Result<()> {
        while self.conn.wants_write() {
            if Instant::now() >= deadline {
                return Err(io::ErrorKind::TimedOut.into());
            }
            match self.conn.write_tls(&mut self.sock) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Explains a failed handshake from what rustls said and what the peer sent.
    fn handshake_error(&self, e: &io::Error, client: Option<&ClientTls>) -> TlsError {
        let peer = self.peer.clone();
        let plain = self.sock.first.starts_with(&vm_migration::protocol::MAGIC);
        if client.is_some() && plain {
            return TlsError::PeerPlain { peer };
        }
        let Some(err) = rustls_error(e) else {
            let reason = if e.kind() == io::ErrorKind::UnexpectedEof
                || e.kind() == io::ErrorKind::ConnectionReset
            {
                "the peer closed the connection".to_string()
            } else {
                e.to_string()
            };
            return TlsError::Handshake { peer, reason };
        };
        TlsError::Handshake {
            peer,
            reason: explain(err, self.is_server(), &self.ca),
        }
    }

    /// Completes the handshake within [`HANDSHAKE_TIMEOUT`] from now in all (a peer
    /// sending a byte now and then does not keep it going), ended early by `stop`. The
    /// server first checks that the peer speaks TLS at all; the client (`client` given)
    /// then waits for the server's [`ACCEPTED`].
    fn handshake(
        &mut self,
        stop: &dyn Fn() -> bool,
        client: Option<&ClientTls>,
    ) -> Result<(), TlsError> {
        let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
        let poll = Some(vm_migration::transport::POLL_INTERVAL);
        let _ = self.sock.sock.set_read_timeout(poll);
        let _ = self.set_write_timeout(poll);
        let check = |peer: &str| -> Result<(), TlsError> {
            if stop() {
                return Err(TlsError::Cancelled { peer: peer.into() });
            }
            if Instant::now() >= deadline {
                return Err(TlsError::HandshakeTimeout { peer: peer.into() });
            }
            Ok(())
        };
        let retry = |e: &io::Error| is_timeout(e) || e.kind() == io::ErrorKind::Interrupted;
        if self.is_server() {
            loop {
                check(&self.peer)?;
                match self.sock.fill() {
                    Ok(0) => {
                        return Err(TlsError::Handshake {
                            peer: self.peer.clone(),
                            reason: "the peer closed the connection before sending anything".into(),
                        })
                    }
                    Ok(_) => break,
                    Err(e) if retry(&e) => {}
                    Err(e) => return Err(self.handshake_error(&e, None)),
                }
            }
            if self.sock.buf[self.sock.pos] != TLS_HANDSHAKE_RECORD {
                self.refuse_plain_peer();
                return Err(TlsError::PeerNotTls {
                    peer: self.peer.clone(),
                });
            }
        }
        while self.conn.is_handshaking() {
            check(&self.peer)?;
            if self.conn.wants_write() {
                match self.conn.write_tls(&mut self.sock) {
                    Ok(_) => {}
                    Err(e) if retry(&e) => {}
                    Err(e) => return Err(self.handshake_error(&e, client)),
                }
                continue;
            }
            match self.conn.read_tls(&mut self.sock) {
                Ok(0) => {
                    let e = io::Error::from(io::ErrorKind::UnexpectedEof);
                    return Err(self.handshake_error(&e, client));
                }
                Ok(_) => {}
                Err(e) if retry(&e) => continue,
                Err(e) => return Err(self.handshake_error(&e, client)),
            }
            self.process_in_handshake(client)?;
        }
        if client.is_none() {
            // The client's certificate is checked: say so (see the module's comment).
            let sent = self.conn.writer().write_all(&[ACCEPTED]);
            sent.map_err(|e| self.handshake_error(&e, client))?;
        }
        if let Err(e) = self.push_handshake(deadline) {
            check(&self.peer)?;
            return Err(self.handshake_error(&e, client));
        }
        if client.is_some() {
            let mut b = [0u8; 1];
            loop {
                check(&self.peer)?;
                match self.conn.reader().read(&mut b) {
                    Ok(1) if b[0] == ACCEPTED => break,
                    Ok(1) => {
                        return Err(TlsError::Handshake {
                            peer: self.peer.clone(),
                            reason: format!(
                                "the peer sent {:#04x} instead of accepting this side's \
                                 certificate: not a Ferry destination?",
                                b[0]
                            ),
                        })
                    }
                    Ok(_) => {
                        let e = io::Error::from(io::ErrorKind::UnexpectedEof);
                        return Err(self.handshake_error(&e, client));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(self.handshake_error(&e, client)),
                }
                match self.conn.read_tls(&mut self.sock) {
                    Ok(0) => {
                        let e = io::Error::from(io::ErrorKind::UnexpectedEof);
                        return Err(self.handshake_error(&e, client));
                    }
                    Ok(_) => self.process_in_handshake(client)?,
                    Err(e) if retry(&e) => {}
                    Err(e) => return Err(self.handshake_error(&e, client)),
                }
            }
        }
        Ok(())
    }

    /// Processes records read during the handshake; on a TLS error, tells the peer why
    /// (the alert rustls queued, best effort for a second) and explains it.
    fn process_in_handshake(&mut self, client: Option<&ClientTls>) -> Result<(), TlsError> {
        if let Err(e) = self.conn.process_new_packets() {
            let _ = self.push_handshake(Instant::now() + Duration::from_secs(1));
            let e = io::Error::new(io::ErrorKind::InvalidData, e);
            return Err(self.handshake_error(&e, client));
        }
        Ok(())
    }

    /// Tells a peer that does not speak TLS, in Ferry's plain protocol, why it is refused
    /// (best effort: it may not be Ferry at all).
    fn refuse_plain_peer(&mut self) {
        refuse_in_plain(
            &mut self.sock.sock,
            "this destination takes migrations over TLS only: give vm.send-migration a \
             tls_dir",
        );
    }

    /// A TLS error in an established session, with the alert (if any) sent to the peer.
    fn session_error(&mut self, e: rustls::Error) -> io::Error {
        self.collect();
        let until = Instant::now() + Duration::from_secs(1);
        let _ = self.send_out(Some(until));
        self.compact();
        io::Error::new(
            io::ErrorKind::InvalidData,
            SessionError {
                peer: self.peer.clone(),
                err: e,
            },
        )
    }
}

/// Sends `reason` as a plain-protocol `Abort` on `sock` and closes its sending side,
/// then reads what the peer still sends for a moment: closing with unread data would
/// reset the connection, which can throw the `Abort` away before the peer reads it.
pub fn refuse_in_plain(sock: &mut TcpStream, reason: &str) {
    use vm_migration::protocol::{encode, Message};
    let mut out = Vec::new();
    if encode(&Message::Abort { reason }, &mut out).is_ok() {
        let _ = sock.write_all(&out);
    }
    let _ = sock.shutdown(std::net::Shutdown::Write);
    let _ = sock.set_read_timeout(Some(vm_migration::transport::POLL_INTERVAL));
    let end = Instant::now() + Duration::from_millis(300);
    let mut sink = [0u8; 4096];
    while Instant::now() < end {
        match sock.read(&mut sink) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
}

/// What a failed handshake means, for the side that saw `err`; `ca`: this side's
/// ca-cert.pem.
fn explain(err: &rustls::Error, server: bool, ca: &Path) -> String {
    use rustls::Error as E;
    let mine = if server { "destination" } else { "source" };
    let theirs = if server { "source" } else { "destination" };
    match err {
        E::InvalidCertificate(CertificateError::UnknownIssuer) => format!(
            "the {theirs}'s certificate does not chain to this side's CA certificate {} (a \
             different CA?)",
            ca.display()
        ),
        E::InvalidCertificate(
            c @ (CertificateError::NotValidForName
            | CertificateError::NotValidForNameContext { .. }),
        ) => format!(
            "the {theirs}'s certificate is not for the address this side connected to (its \
             subjectAltName must hold the tcp: URL's host, as an IP or a DNS name): {c:?}"
        ),
        E::InvalidCertificate(c) => format!("the {theirs}'s certificate is refused: {c:?}"),
        E::NoCertificatesPresented => format!(
            "the {theirs} presented no client certificate (its tls_dir needs {CLIENT_CERT} \
             and {CLIENT_KEY})"
        ),
        E::AlertReceived(a) => {
            let refused_mine = matches!(
                a,
                AlertDescription::UnknownCA
                    | AlertDescription::BadCertificate
                    | AlertDescription::CertificateRequired
                    | AlertDescription::CertificateUnknown
                    | AlertDescription::AccessDenied
                    | AlertDescription::UnsupportedCertificate
            );
            if refused_mine && server {
                format!(
                    "the source refused this side's certificate (TLS alert {a:?}); the \
                     source's error says why: this certificate does not chain to its \
                     ca-cert.pem, or is not for the address it connected to"
                )
            } else if refused_mine {
                format!(
                    "the destination refused this side's certificate (TLS alert {a:?}): it \
                     does not chain to the destination's ca-cert.pem"
                )
            } else {
                format!("the {theirs} ended the handshake with TLS alert {a:?}")
            }
        }
        E::InvalidMessage(_) | E::InappropriateMessage { .. } => format!(
            "the {theirs} does not speak TLS ({err}): is it set up without tls_dir? (this \
             {mine} has one)"
        ),
        other => other.to_string(),
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.ready()?;
        loop {
            match self.conn.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The peer closed without close_notify: the migration protocol frames its
                // own messages and notices a cut, as over plain TCP.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            // Before waiting for the peer: what this side still has to send (the peer may
            // be waiting for it), alerts and key updates rustls answers included.
            self.send_pending()?;
            // A timeout here moved no plaintext: bytes read stay in rustls's buffer.
            if self.conn.read_tls(&mut self.sock)? == 0 {
                // EOF: what is buffered, then Ok(0).
                self.conn
                    .process_new_packets()
                    .map_err(|e| self.session_error(e))?;
                return match self.conn.reader().read(buf) {
                    Ok(n) => Ok(n),
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::UnexpectedEof | io::ErrorKind::WouldBlock
                        ) =>
                    {
                        Ok(0)
                    }
                    Err(e) => Err(e),
                };
            }
            self.conn
                .process_new_packets()
                .map_err(|e| self.session_error(e))?;
        }
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.ready()?;
        let until = self.write_timeout().map(|t| Instant::now() + t);
        if !self.owed.is_empty() {
            // A write that timed out left records of these bytes unsent; the caller
            // repeats them now, and they are finished (encrypting them again would send
            // them twice).
            if !buf.starts_with(&self.owed) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "TLS to {}: after a write that timed out, the next one must repeat \
                         the {} bytes it did not take",
                        self.peer,
                        self.owed.len()
                    ),
                ));
            }
            let r = self.send_out(until);
            self.compact();
            r?;
            if self.owed_cipher > 0 {
                return Err(io::ErrorKind::TimedOut.into());
            }
            let n = self.owed.len();
            self.owed.clear();
            return Ok(n);
        }
        // Alerts or key updates rustls has to send go first; a timeout here took nothing.
        self.collect();
        let r = self.send_out(until);
        self.compact();
        r?;
        if !self.out.is_empty() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        let take = &buf[..buf.len().min(WRITE_CHUNK)];
        if take.is_empty() {
            return Ok(0);
        }
        // Record by record, noting where each one's bytes end in `out` and in `take`.
        let mut ends = [(0usize, 0usize); WRITE_CHUNK / RECORD_PLAIN];
        let mut records = 0;
        let mut taken = 0;
        for piece in take.chunks(RECORD_PLAIN) {
            let n = self.conn.writer().write(piece)?;
            self.collect();
            taken += n;
            ends[records] = (self.out.len(), taken);
            records += 1;
            if n < piece.len() {
                break;
            }
        }
        let r = self.send_out(until);
        let sent = self.out_pos;
        let done = ends[..records]
            .iter()
            .take_while(|&&(end, _)| end <= sent)
            .last()
            .map_or(0, |&(_, plain)| plain);
        if done < taken {
            self.owed = take[done..taken].to_vec();
            self.owed_cipher = self.out.len() - sent;
        }
        self.compact();
        match r {
            _ if done > 0 => Ok(done),
            Err(e) => Err(e),
            Ok(()) => Err(io::ErrorKind::TimedOut.into()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.ready()?;
        self.send_pending()
    }
}

impl vm_migration::MigrationStream for TlsStream {
    fn set_io_timeouts(&self, timeout: Option<Duration>) -> io::Result<()> {
        vm_migration::MigrationStream::set_io_timeouts(&self.sock.sock, timeout)?;
        let ns = timeout.map_or(0, |t| t.as_nanos().min(u64::MAX as u128) as u64);
        self.write_timeout_ns.store(ns, Ordering::Relaxed);
        Ok(())
    }

    fn shutdown_both(&self) {
        vm_migration::MigrationStream::shutdown_both(&self.sock.sock)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ferry-tls-unit-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn write(path: &Path, text: &str, mode: u32) {
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn a_missing_directory_or_file_is_named() {
        let d = dir("missing");
        let e = ServerTls::load(&d.join("nope")).unwrap_err().to_string();
        assert!(e.contains(&format!("{}", d.join("nope").display())), "{e}");
        let e = ServerTls::load(&d).unwrap_err().to_string();
        assert!(
            e.contains(&format!("{} is missing", d.join(CA_CERT).display()))
                && e.contains("server-key.pem"),
            "{e}"
        );
        let e = ClientTls::load(&d).unwrap_err().to_string();
        assert!(
            e.contains("ca-cert.pem is missing") && e.contains("client-key.pem"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn garbage_and_empty_files_are_named() {
        let d = dir("garbage");
        write(&d.join(CA_CERT), "hello\n", 0o644);
        let e = ClientTls::load(&d).unwrap_err().to_string();
        assert!(
            e.contains(&d.join(CA_CERT).display().to_string()) && e.contains("no certificate"),
            "{e}"
        );
        write(
            &d.join(CA_CERT),
            "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n",
            0o644,
        );
        let e = ClientTls::load(&d).unwrap_err().to_string();
        assert!(e.contains(&d.join(CA_CERT).display().to_string()), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_key_others_can_read_is_refused_with_its_mode() {
        let d = dir("mode");
        let key = d.join(SERVER_KEY);
        write(&key, "whatever", 0o644);
        let e = private_key(&key, true).unwrap_err().to_string();
        assert!(
            e.contains(&key.display().to_string()) && e.contains("mode 0644"),
            "{e}"
        );
        write(&key, "whatever", 0o640);
        let e = private_key(&key, true).unwrap_err().to_string();
        assert!(e.contains("mode 0640"), "{e}");
        write(&key, "no key here", 0o600);
        let e = private_key(&key, true).unwrap_err().to_string();
        assert!(e.contains("holds no private key"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_client_without_certificate_or_key_names_the_missing_file() {
        let d = dir("half");
        // Any CA that parses gets this far; a self-signed one made here by openssl.
        let st = std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ])
            .args(["-nodes", "-days", "1", "-subj", "/CN=unit CA", "-keyout"])
            .arg(d.join("ca-key.pem"))
            .arg("-out")
            .arg(d.join(CA_CERT))
            .stderr(std::process::Stdio::null())
            .status()
            .expect("run openssl");
        assert!(st.success());
        // Neither: an error naming the certificate (no connecting without one).
        let e = ClientTls::load(&d).unwrap_err().to_string();
        assert!(
            e.contains(&format!("{} is missing", d.join(CLIENT_CERT).display()))
                && e.contains("client-key.pem"),
            "{e}"
        );
        // The certificate without the key: the key is named.
        std::fs::copy(d.join(CA_CERT), d.join(CLIENT_CERT)).unwrap();
        let e = ClientTls::load(&d).unwrap_err().to_string();
        assert!(
            e.contains(&format!("{} is missing", d.join(CLIENT_KEY).display())),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_dangling_link_and_an_unreadable_file_are_told_apart_from_missing() {
        let d = dir("links");
        let ca = d.join(CA_CERT);
        std::os::unix::fs::symlink(d.join("gone.pem"), &ca).unwrap();
        let e = ClientTls::load(&d).unwrap_err().to_string();
        assert!(
            e.contains(&format!("{} is a symbolic link", ca.display())) && !e.contains("missing"),
            "{e}"
        );
        std::fs::remove_file(&ca).unwrap();
        // A file its owner cannot read (root reads anything: then nothing to see).
        write(&ca, "x", 0o000);
        if std::fs::File::open(&ca).is_err() {
            let e = ClientTls::load(&d).unwrap_err().to_string();
            assert!(
                e.contains(&format!("cannot read {}", ca.display())) && !e.contains("missing"),
                "{e}"
            );
        }
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_key_is_checked_and_read_through_one_descriptor() {
        let d = dir("keyfifo");
        let key = d.join(SERVER_KEY);
        // A FIFO in the key's place: refused at once (opening it does not wait for a
        // writer), not read.
        let st = std::process::Command::new("mkfifo")
            .arg(&key)
            .status()
            .unwrap();
        assert!(st.success());
        let start = Instant::now();
        let e = private_key(&key, true).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_fifo_is_not_read() {
        let d = dir("fifo");
        let p = d.join(CA_CERT);
        let st = std::process::Command::new("mkfifo")
            .arg(&p)
            .status()
            .unwrap();
        assert!(st.success());
        let e = ClientTls::load(&d).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
