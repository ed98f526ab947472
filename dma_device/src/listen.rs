// Copyright 2026 Ferry authors
// SPDX-License-Identifier: Apache-2.0

//! The socket: bind it (replacing only a stale socket), then serve one client at a time,
//! for ever (the VMM may reconnect).
//!
//! The test-only seam [`GARBAGE_ENV`] puts a proxy between the client and
//! [`server::serve`]: after N replies, the next reply is replaced by
//! [`GARBAGE_BYTES`] bytes of 0xff and the connection stays up.

use std::io::{self, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use log::{error, info, warn};
use thiserror::Error;
use vfio_dirty::vfio_user::conn::{self, ConnError};
use vfio_dirty::vfio_user::server;

use crate::device::Device;

/// Test-only: after this many replies (process-wide, counted across connections), one
/// reply is replaced by garbage.
pub const GARBAGE_ENV: &str = "FERRY_TEST_DMA_DEVICE_GARBAGE";
/// Bytes of 0xff sent instead of that reply.
pub const GARBAGE_BYTES: usize = 64;

#[derive(Debug, Error)]
pub enum ListenError {
    #[error("socket path {0}: exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("socket path {0}: another server is listening on it")]
    InUse(PathBuf),
    #[error("socket path {path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{GARBAGE_ENV}={0:?}: not a number of replies")]
    BadGarbage(String),
}

/// The seam's setting from the environment: `None` when unset.
pub fn garbage_from_env() -> Result<Option<u64>, ListenError> {
    match std::env::var(GARBAGE_ENV) {
        Ok(v) => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| ListenError::BadGarbage(v)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(v)) => {
            Err(ListenError::BadGarbage(v.to_string_lossy().into_owned()))
        }
    }
}

/// Binds `path`. An existing socket nobody listens on (a previous run's) is removed first;
/// anything else there is refused.
pub fn bind(path: &Path) -> Result<UnixListener, ListenError> {
    let io = |op| {
        move |source| ListenError::Io {
            path: path.to_path_buf(),
            op,
            source,
        }
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => {
            return Err(ListenError::NotASocket(path.to_path_buf()))
        }
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => return Err(ListenError::InUse(path.to_path_buf())),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                info!("removing stale socket {}", path.display());
                std::fs::remove_file(path).map_err(io("remove stale socket"))?;
            }
            Err(e) => return Err(io("probe existing socket")(e)),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("stat")(e)),
    }
    UnixListener::bind(path).map_err(io("bind"))
}

/// Serves clients of `listener` one after the other, for ever. `garbage`: the seam (see
/// [`GARBAGE_ENV`]).
pub fn run(listener: &UnixListener, dev: &mut Device, mut garbage: Option<u64>) -> io::Error {
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                error!("accept: {e}");
                return e;
            }
        };
        info!("client connected");
        match serve_client(stream, dev, &mut garbage) {
            Ok(()) => info!("client disconnected"),
            Err(e) => warn!("client connection ended: {e}"),
        }
        dev.client_gone();
    }
}

/// Serves one client until it goes away.
pub fn serve_client(
    mut stream: UnixStream,
    dev: &mut Device,
    garbage: &mut Option<u64>,
) -> Result<(), ConnError> {
    if garbage.is_none() {
        return server::serve(&mut stream, dev);
    }
    serve_through_garbage_proxy(stream, dev, garbage)
}

/// [`server::serve`] on one end of a socket pair, and two threads copying messages (with
/// their descriptors) between the client and the other end, one of which replaces a reply
/// by garbage once.
fn serve_through_garbage_proxy(
    client: UnixStream,
    dev: &mut Device,
    garbage: &mut Option<u64>,
) -> Result<(), ConnError> {
    let (mut dev_end, proxy_end) = UnixStream::pair().map_err(ConnError::Io)?;
    let clone = |s: &UnixStream| s.try_clone().map_err(ConnError::Io);
    let (mut from_client, mut to_client) = (clone(&client)?, clone(&client)?);
    let (mut to_dev, mut from_dev) = (clone(&proxy_end)?, proxy_end);
    std::thread::scope(|s| {
        s.spawn(move || {
            // Requests: until the client goes (or breaks the framing).
            while let Ok(m) = conn::recv(&mut from_client) {
                let fds: Vec<RawFd> = m.files.iter().map(AsRawFd::as_raw_fd).collect();
                if conn::send(&mut to_dev, m.header, &m.payload, &fds).is_err() {
                    break;
                }
            }
            // The server then sees the client close.
            let _ = to_dev.shutdown(Shutdown::Write);
        });
        s.spawn(move || {
            // Replies: until the server end closes. Once the client cannot take them any
            // more they are still drained, so the server never blocks on a full socket.
            let mut client_gone = false;
            while let Ok(m) = conn::recv(&mut from_dev) {
                if client_gone {
                    continue;
                }
                let sent = match garbage {
                    Some(0) => {
                        warn!(
                            "{GARBAGE_ENV}: sending {GARBAGE_BYTES} bytes of garbage instead of reply {}",
                            m.header.id
                        );
                        *garbage = None;
                        to_client
                            .write_all(&[0xff; GARBAGE_BYTES])
                            .map_err(ConnError::Io)
                    }
                    Some(n) => {
                        *n -= 1;
                        conn::send(&mut to_client, m.header, &m.payload, &[])
                    }
                    None => conn::send(&mut to_client, m.header, &m.payload, &[]),
                };
                client_gone = sent.is_err();
            }
        });
        let r = server::serve(&mut dev_end, dev);
        // Both copiers end: the reply side on this end's close, the request side when the
        // client's socket is shut down.
        let _ = dev_end.shutdown(Shutdown::Both);
        let _ = client.shutdown(Shutdown::Both);
        r
    })
}
