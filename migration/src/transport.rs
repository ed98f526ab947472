//! The byte stream a migration runs over, and the watchdog that bounds every wait on it.
//!
//! A silent peer (a cut link drops packets without RST) would block a plain `read` or
//! `write` forever. So the engine sets a short OS timeout on the socket and retries in
//! [`Watched`], which gives up once no byte moved for the idle limit, or at once when the
//! migration is cancelled. Retrying inside `read`/`write` loses no data: a timed-out call
//! transferred nothing.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use crate::stats::MigrationProgress;

/// How often a blocked read or write wakes up to check for cancellation.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// A connected, bidirectional migration stream.
pub trait MigrationStream: Read + Write + Send {
    /// Sets the OS-level read and write timeouts (`None`: block).
    fn set_io_timeouts(&self, timeout: Option<Duration>) -> io::Result<()>;
    /// Closes both directions, so that the peer sees the end at once.
    fn shutdown_both(&self);
}

impl MigrationStream for TcpStream {
    fn set_io_timeouts(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(timeout)?;
        self.set_write_timeout(timeout)?;
        // Pages go out in large writes already; don't let Nagle hold back small replies.
        self.set_nodelay(true)
    }

    fn shutdown_both(&self) {
        let _ = self.shutdown(Shutdown::Both);
    }
}

impl MigrationStream for UnixStream {
    fn set_io_timeouts(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(timeout)?;
        self.set_write_timeout(timeout)
    }

    fn shutdown_both(&self) {
        let _ = self.shutdown(Shutdown::Both);
    }
}

impl<S: MigrationStream + ?Sized> MigrationStream for Box<S> {
    fn set_io_timeouts(&self, timeout: Option<Duration>) -> io::Result<()> {
        (**self).set_io_timeouts(timeout)
    }

    fn shutdown_both(&self) {
        (**self).shutdown_both()
    }
}

/// The cause inside the I/O error a cancelled wait returns (see [`cancelled_error`]).
#[derive(Debug)]
struct Cancelled;

impl std::fmt::Display for Cancelled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("migration cancelled")
    }
}

impl std::error::Error for Cancelled {}

/// The error a read or write returns once the migration is cancelled. Its kind must not be
/// `Interrupted`: `Write::write_all`, `Read::read_exact` and the protocol reader retry
/// `Interrupted` at once, and the flag stays set, so they would spin forever.
fn cancelled_error() -> io::Error {
    io::Error::other(Cancelled)
}

/// Whether `e` is the error of a wait ended by cancellation.
pub(crate) fn is_cancelled(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<Cancelled>())
}

/// A stream whose reads and writes fail after `idle` without progress or on cancellation.
pub(crate) struct Watched<S> {
    inner: S,
    idle: Duration,
    progress: MigrationProgress,
}

impl<S: MigrationStream> Watched<S> {
    pub(crate) fn new(inner: S, idle: Duration, progress: MigrationProgress) -> io::Result<Self> {
        inner.set_io_timeouts(Some(POLL_INTERVAL))?;
        Ok(Watched {
            inner,
            idle,
            progress,
        })
    }

    pub(crate) fn set_idle(&mut self, idle: Duration) {
        self.idle = idle;
    }

    /// Writes `buf` ignoring cancellation, giving up after about half a second: for a
    /// last `Abort` on the way out.
    pub(crate) fn write_best_effort(&mut self, buf: &[u8]) -> io::Result<()> {
        let deadline = Instant::now() + Duration::from_millis(500);
        let mut rest = buf;
        while !rest.is_empty() {
            match self.inner.write(rest) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => rest = &rest[n..],
                Err(e)
                    if (is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted)
                        && Instant::now() < deadline => {}
                Err(e) => return Err(e),
            }
        }
        self.inner.flush()
    }

    pub(crate) fn shutdown(&self) {
        self.inner.shutdown_both();
    }

    /// Retries `op` while it times out, until progress, error, idle limit or cancellation.
    fn retry<T>(
        &mut self,
        what: &str,
        mut op: impl FnMut(&mut S) -> io::Result<T>,
    ) -> io::Result<T> {
        let start = Instant::now();
        loop {
            if self.progress.is_cancelled() {
                return Err(cancelled_error());
            }
            match op(&mut self.inner) {
                Err(e) if is_timeout(&e) => {
                    if start.elapsed() >= self.idle {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!(
                                "{what} for {} ms: the peer or the link is gone",
                                self.idle.as_millis()
                            ),
                        ));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

impl<S: MigrationStream> Read for Watched<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.retry("no data from the peer", |s| s.read(buf))
    }
}

impl<S: MigrationStream> Write for Watched<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.retry("the peer accepted no data", |s| s.write(buf))
    }

    fn flush(&mut self) -> io::Result<()> {
        self.retry("the peer accepted no data", |s| s.flush())
    }
}
