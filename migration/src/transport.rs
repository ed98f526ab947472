//! The byte stream a migration runs over, and the watchdog that bounds every wait on it.
//!
//! A silent peer (a cut link drops packets without RST) would block a plain `read` or
//! `write` forever. So the engine sets a short OS timeout on the socket and retries in
//! [`Watched`], which gives up once no byte moved for the idle limit, or at once when the
//! migration is cancelled. Retrying inside `read`/`write` loses no data: a timed-out call
//! transferred nothing.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
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

    /// Whether file descriptors can travel with the data (a UNIX socket that keeps them).
    fn can_pass_fds(&self) -> bool {
        false
    }

    /// Writes all of `buf` with `fds` attached to its first byte (SCM_RIGHTS).
    fn write_with_fds(&mut self, _buf: &[u8], _fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this connection cannot pass file descriptors (memory_mode MemFDs needs unix:)",
        ))
    }

    /// The file descriptors received with the data read so far, oldest first.
    fn take_fds(&mut self) -> Vec<OwnedFd> {
        Vec::new()
    }

    /// A second handle on the same connection, so that one thread may read while another
    /// writes (postcopy's page requests travel against the page stream).
    fn try_clone_stream(&self) -> io::Result<Self>
    where
        Self: Sized,
    {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this connection cannot be shared between a reader and a writer",
        ))
    }

    /// Busy-waits, at most `at_most`, until the connection has bytes to read (or has
    /// ended), rather than sleeping in the read that follows; it yields the CPU to any
    /// other runnable thread between looks. Returns whether it saw them. A stream that
    /// keeps bytes of its own (TLS's records) cannot tell, and returns false at once.
    fn spin_until_readable(&self, _at_most: Duration) -> bool {
        false
    }
}

/// [`MigrationStream::spin_until_readable`] for a socket that keeps no bytes of its own.
fn spin_until_readable_fd(fd: BorrowedFd<'_>, at_most: Duration) -> bool {
    let end = Instant::now() + at_most;
    loop {
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd on an fd `fd` keeps open, and a zero timeout: poll only looks.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        if n > 0 {
            // Bytes, or the end or an error, which the read will report.
            return true;
        }
        if n < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return false;
        }
        if Instant::now() >= end {
            return false;
        }
        // Polite: a thread of the peer (or of this process) that wakes on this CPU
        // runs at once. On a host with as many busy threads as CPUs (a local peer
        // resuming its vCPUs), a plain spin at the switch-over's raised priority held
        // them off for milliseconds.
        // SAFETY: no arguments, no memory touched.
        unsafe { libc::sched_yield() };
    }
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

    fn try_clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }

    fn spin_until_readable(&self, at_most: Duration) -> bool {
        spin_until_readable_fd(self.as_fd(), at_most)
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

    fn try_clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }

    fn spin_until_readable(&self, at_most: Duration) -> bool {
        spin_until_readable_fd(self.as_fd(), at_most)
    }
}

impl<S: MigrationStream + ?Sized> MigrationStream for Box<S> {
    fn set_io_timeouts(&self, timeout: Option<Duration>) -> io::Result<()> {
        (**self).set_io_timeouts(timeout)
    }

    fn shutdown_both(&self) {
        (**self).shutdown_both()
    }

    fn can_pass_fds(&self) -> bool {
        (**self).can_pass_fds()
    }

    fn write_with_fds(&mut self, buf: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        (**self).write_with_fds(buf, fds)
    }

    fn take_fds(&mut self) -> Vec<OwnedFd> {
        (**self).take_fds()
    }

    fn spin_until_readable(&self, at_most: Duration) -> bool {
        (**self).spin_until_readable(at_most)
    }
}

/// Why a wait on the stream ended early: the cause inside the I/O error it returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WaitEnded {
    /// The migration was cancelled.
    Cancelled,
    /// Another connection of the migration ended or failed ([`Watched::with_halt`]).
    Halted,
}

impl std::fmt::Display for WaitEnded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WaitEnded::Cancelled => "migration cancelled",
            WaitEnded::Halted => "stopped: another connection of this migration ended or failed",
        })
    }
}

impl std::error::Error for WaitEnded {}

/// The error of a wait ended early. Its kind must not be `Interrupted`:
/// `Write::write_all`, `Read::read_exact` and the protocol reader retry `Interrupted` at
/// once, and the flag stays set, so they would spin forever.
fn wait_ended(why: WaitEnded) -> io::Error {
    io::Error::other(why)
}

fn ended_by(e: &io::Error, why: WaitEnded) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<WaitEnded>())
        .is_some_and(|w| *w == why)
}

/// Whether `e` is the error of a wait ended by cancellation.
pub(crate) fn is_cancelled(e: &io::Error) -> bool {
    ended_by(e, WaitEnded::Cancelled)
}

/// Whether `e` is the error of a wait ended by the halt flag.
pub(crate) fn is_halted(e: &io::Error) -> bool {
    ended_by(e, WaitEnded::Halted)
}

/// A stream whose reads and writes fail after `idle` without progress or on cancellation.
pub(crate) struct Watched<S> {
    inner: S,
    idle: Duration,
    progress: MigrationProgress,
    /// Set when a sibling connection failed: give up too.
    halt: Option<Arc<AtomicBool>>,
    /// Read on despite `halt` (to pick up the peer's last words).
    halt_ignored: bool,
}

impl<S: MigrationStream> Watched<S> {
    pub(crate) fn new(inner: S, idle: Duration, progress: MigrationProgress) -> io::Result<Self> {
        inner.set_io_timeouts(Some(POLL_INTERVAL))?;
        Ok(Watched {
            inner,
            idle,
            progress,
            halt: None,
            halt_ignored: false,
        })
    }

    pub(crate) fn set_halt_ignored(&mut self, ignored: bool) {
        self.halt_ignored = ignored;
    }

    pub(crate) fn get_ref(&self) -> &S {
        &self.inner
    }

    pub(crate) fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Also gives up (within [`POLL_INTERVAL`]) once `halt` is set.
    pub(crate) fn with_halt(mut self, halt: Arc<AtomicBool>) -> Self {
        self.halt = Some(halt);
        self
    }

    pub(crate) fn set_idle(&mut self, idle: Duration) {
        self.idle = idle;
    }

    /// Writes `buf` ignoring cancellation, giving up after about half a second: for a
    /// last `Abort` on the way out.
    pub(crate) fn write_best_effort(&mut self, buf: &[u8]) -> io::Result<()> {
        write_all_until(
            &mut self.inner,
            buf,
            Instant::now() + Duration::from_millis(500),
        )?;
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
                return Err(wait_ended(WaitEnded::Cancelled));
            }
            if !self.halt_ignored
                && self
                    .halt
                    .as_ref()
                    .is_some_and(|h| h.load(Ordering::Relaxed))
            {
                return Err(wait_ended(WaitEnded::Halted));
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

/// Writes all of `buf`, retrying socket timeouts and interruptions until `deadline`.
fn write_all_until<W: Write>(w: &mut W, mut buf: &[u8], deadline: Instant) -> io::Result<()> {
    while !buf.is_empty() {
        match w.write(buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e)
                if (is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted)
                    && Instant::now() < deadline => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
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

/// Most descriptors one message may carry (the kernel's SCM_MAX_FD).
pub const MAX_PASSED_FDS: usize = 253;

/// A UNIX stream socket that keeps the file descriptors arriving with its data
/// (SCM_RIGHTS) and can send its own: every read is a `recvmsg` with room for them.
#[derive(Debug)]
pub struct FdUnixStream {
    inner: UnixStream,
    received: Vec<OwnedFd>,
}

impl FdUnixStream {
    pub fn new(inner: UnixStream) -> Self {
        FdUnixStream {
            inner,
            received: Vec::new(),
        }
    }

    pub fn get_ref(&self) -> &UnixStream {
        &self.inner
    }
}

/// Bytes of control buffer for `n` descriptors, 8-byte aligned as cmsghdr wants.
fn cmsg_space(n: usize) -> usize {
    // SAFETY: CMSG_SPACE only computes a size from its argument.
    unsafe { libc::CMSG_SPACE((n * std::mem::size_of::<libc::c_int>()) as u32) as usize }
}

impl Read for FdUnixStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut control = vec![0u64; cmsg_space(MAX_PASSED_FDS).div_ceil(8)];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: an all-zero msghdr is valid; the pointers set below stay alive for the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = control.len() * 8;
        // SAFETY: `msg` points at `buf` (writable, `buf.len()` bytes) and at `control`
        // (writable, `msg_controllen` bytes); the socket fd is open for `self`'s lifetime.
        let n = unsafe { libc::recvmsg(self.inner.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the CMSG_* walk stays within the control buffer the kernel filled
        // (`msg_controllen` bytes); each SCM_RIGHTS entry holds descriptors now ours.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(cmsg).cast::<libc::c_int>();
                    let len = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                    for i in 0..len / std::mem::size_of::<libc::c_int>() {
                        let fd = std::ptr::read_unaligned(data.add(i));
                        self.received.push(OwnedFd::from_raw_fd(fd));
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
        }
        if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            return Err(io::Error::other(
                "file descriptors were lost: more arrived than one message may carry",
            ));
        }
        Ok(n as usize)
    }
}

impl Write for FdUnixStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl MigrationStream for FdUnixStream {
    fn set_io_timeouts(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.inner.set_io_timeouts(timeout)
    }

    fn shutdown_both(&self) {
        self.inner.shutdown_both()
    }

    fn can_pass_fds(&self) -> bool {
        true
    }

    fn try_clone_stream(&self) -> io::Result<Self> {
        Ok(FdUnixStream::new(self.inner.try_clone()?))
    }

    fn spin_until_readable(&self, at_most: Duration) -> bool {
        // Its reads keep no bytes back (the descriptors travel beside them).
        self.inner.spin_until_readable(at_most)
    }

    fn write_with_fds(&mut self, buf: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        if fds.len() > MAX_PASSED_FDS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} file descriptors, at most {MAX_PASSED_FDS} in one message",
                    fds.len()
                ),
            ));
        }
        if buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "descriptors need at least one byte to travel with",
            ));
        }
        let mut control = vec![0u64; cmsg_space(fds.len()).div_ceil(8)];
        let mut iov = libc::iovec {
            iov_base: buf.as_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // SAFETY: an all-zero msghdr is valid; the pointers set below stay alive for the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = cmsg_space(fds.len());
        // SAFETY: the control buffer has room for one cmsghdr with `fds.len()` ints
        // (CMSG_SPACE), so CMSG_FIRSTHDR is non-null and CMSG_DATA has that room.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len =
                libc::CMSG_LEN((fds.len() * std::mem::size_of::<libc::c_int>()) as u32) as _;
            let data = libc::CMSG_DATA(cmsg).cast::<libc::c_int>();
            for (i, fd) in fds.iter().enumerate() {
                std::ptr::write_unaligned(data.add(i), fd.as_raw_fd());
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let sent = loop {
            // SAFETY: `msg` points at `buf` and `control`, both alive and sized as declared;
            // the descriptors in it are open (borrowed for this call).
            let n = unsafe { libc::sendmsg(self.inner.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
            if n >= 0 {
                break n as usize;
            }
            let e = io::Error::last_os_error();
            if !(is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted)
                || Instant::now() >= deadline
            {
                return Err(e);
            }
        };
        // The descriptors went with the first byte; the rest is ordinary data.
        write_all_until(&mut self.inner, &buf[sent..], deadline)
    }

    fn take_fds(&mut self) -> Vec<OwnedFd> {
        std::mem::take(&mut self.received)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Seek;

    #[test]
    fn spinning_until_readable_sees_bytes_and_the_end_and_gives_up_in_time() {
        let (mut a, b) = UnixStream::pair().unwrap();
        // Nothing to read: it gives up after its time, not long after.
        let t = Instant::now();
        assert!(!b.spin_until_readable(Duration::from_millis(5)));
        let waited = t.elapsed();
        assert!(
            waited >= Duration::from_millis(5),
            "gave up after {waited:?}"
        );
        // A byte sent from another thread while it spins ends the spin.
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(2));
            a.write_all(b"x").unwrap();
            a
        });
        assert!(b.spin_until_readable(Duration::from_secs(10)));
        let a = sender.join().unwrap();
        let mut got = [0u8; 1];
        (&b).read_exact(&mut got).unwrap();
        // The peer's end is readable too (the read reports it).
        drop(a);
        assert!(FdUnixStream::new(b).spin_until_readable(Duration::from_secs(10)));
        // A box passes the question on (nothing to read here).
        let (c, _d) = UnixStream::pair().unwrap();
        let boxed: Box<UnixStream> = Box::new(c);
        assert!(!boxed.spin_until_readable(Duration::from_millis(1)));
    }

    #[test]
    fn descriptors_travel_with_the_data_and_plain_data_still_reads() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut a, mut b) = (FdUnixStream::new(a), FdUnixStream::new(b));
        let mut f = tempfile_with(b"ferry");
        a.write_with_fds(b"hello", &[f.as_fd_borrowed()]).unwrap();
        a.write_all(b" world").unwrap();
        let mut got = [0u8; 11];
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello world");
        let fds = b.take_fds();
        assert_eq!(fds.len(), 1);
        assert!(b.take_fds().is_empty());
        // The same open file: what was written through one is read through the other.
        let mut copy = std::fs::File::from(fds.into_iter().next().unwrap());
        copy.rewind().unwrap();
        let mut text = String::new();
        copy.read_to_string(&mut text).unwrap();
        assert_eq!(text, "ferry");
        f.rewind().unwrap();
    }

    #[test]
    fn too_many_descriptors_are_refused_with_the_count() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut a = FdUnixStream::new(a);
        let f = tempfile_with(b"x");
        let fds = vec![f.as_fd_borrowed(); MAX_PASSED_FDS + 1];
        let e = a.write_with_fds(b"x", &fds).unwrap_err();
        assert!(e.to_string().contains("254 file descriptors"), "{e}");
    }

    trait BorrowFd {
        fn as_fd_borrowed(&self) -> BorrowedFd<'_>;
    }

    impl BorrowFd for std::fs::File {
        fn as_fd_borrowed(&self) -> BorrowedFd<'_> {
            std::os::fd::AsFd::as_fd(self)
        }
    }

    fn tempfile_with(data: &[u8]) -> std::fs::File {
        let path = std::env::temp_dir().join(format!(
            "ferry-fd-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f.write_all(data).unwrap();
        f
    }
}
