// Copyright 2026 Ferry authors
// SPDX-License-Identifier: Apache-2.0

//! One vfio-user message on a UNIX stream socket: the header (with any file descriptors
//! passed alongside it), then exactly the payload the header announces.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use thiserror::Error;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::wire::{Header, WireError, HEADER_BYTES};

/// Most file descriptors one message may carry (DMA_MAP: one; SET_IRQS: one per vector).
pub const MAX_MESSAGE_FDS: usize = 8;

#[derive(Debug, Error)]
pub enum ConnError {
    #[error("the peer closed the connection")]
    Closed,
    #[error("no answer within the time limit")]
    TimedOut,
    #[error("socket: {0}")]
    Io(#[source] io::Error),
    #[error("{0}")]
    Wire(#[from] WireError),
}

fn io_err(e: io::Error) -> ConnError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ConnError::TimedOut,
        io::ErrorKind::UnexpectedEof => ConnError::Closed,
        _ => ConnError::Io(e),
    }
}

/// A received message: header, payload and the files passed with it.
#[derive(Debug)]
pub struct Message {
    pub header: Header,
    pub payload: Vec<u8>,
    pub files: Vec<File>,
}

/// Waits until `fd` is ready for `events` or `deadline` passes (`None`: no wait, the
/// blocking call that follows waits). Signals do not stretch the deadline: it is absolute.
fn ready(fd: RawFd, events: libc::c_short, deadline: Option<Instant>) -> Result<(), ConnError> {
    let Some(deadline) = deadline else {
        return Ok(());
    };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ConnError::TimedOut);
        }
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
        let mut p = libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        // SAFETY: `p` is one valid pollfd for the duration of the call.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        match r {
            0 => continue,
            r if r > 0 => return Ok(()),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(ConnError::Io(e));
                }
            }
        }
    }
}

fn read_exact_by(
    stream: &mut UnixStream,
    buf: &mut [u8],
    deadline: Option<Instant>,
) -> Result<(), ConnError> {
    let mut at = 0;
    while at < buf.len() {
        ready(stream.as_raw_fd(), libc::POLLIN, deadline)?;
        match stream.read(&mut buf[at..]) {
            Ok(0) => return Err(ConnError::Closed),
            Ok(n) => at += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // The socket's own timeout: the deadline above decides.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && deadline.is_some() => {}
            Err(e) => return Err(io_err(e)),
        }
    }
    Ok(())
}

fn write_all_by(
    stream: &mut UnixStream,
    buf: &[u8],
    deadline: Option<Instant>,
) -> Result<(), ConnError> {
    let mut at = 0;
    while at < buf.len() {
        ready(stream.as_raw_fd(), libc::POLLOUT, deadline)?;
        match stream.write(&buf[at..]) {
            Ok(0) => return Err(ConnError::Closed),
            Ok(n) => at += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && deadline.is_some() => {}
            Err(e) => return Err(io_err(e)),
        }
    }
    Ok(())
}

/// Sends one message: `header.size` is set from the payload.
pub fn send(
    stream: &mut UnixStream,
    header: Header,
    payload: &[u8],
    fds: &[RawFd],
) -> Result<(), ConnError> {
    send_by(stream, header, payload, fds, None)
}

/// [`send`], all of it done by `deadline` (a peer that stops reading cannot hold us).
pub fn send_by(
    stream: &mut UnixStream,
    mut header: Header,
    payload: &[u8],
    fds: &[RawFd],
    deadline: Option<Instant>,
) -> Result<(), ConnError> {
    header.size = (HEADER_BYTES + payload.len()) as u32;
    let h = header.encode();
    if fds.is_empty() {
        let mut all = Vec::with_capacity(HEADER_BYTES + payload.len());
        all.extend_from_slice(&h);
        all.extend_from_slice(payload);
        return write_all_by(stream, &all, deadline);
    }
    // The descriptors travel with the header's bytes; the rest follows as plain data.
    // A signal (a vCPU kicked out of KVM_RUN) may interrupt the call before anything went.
    let sent = loop {
        ready(stream.as_raw_fd(), libc::POLLOUT, deadline)?;
        match stream.send_with_fds(&[&h[..]], fds) {
            Err(e) if e.errno() == libc::EINTR => continue,
            r => break r.map_err(|e| io_err(io::Error::from_raw_os_error(e.errno())))?,
        }
    };
    write_all_by(stream, &h[sent..], deadline)?;
    write_all_by(stream, payload, deadline)
}

/// Receives one message, refusing a size outside the protocol's limits before reading it.
pub fn recv(stream: &mut UnixStream) -> Result<Message, ConnError> {
    recv_by(stream, None)
}

/// [`recv`], the whole message in by `deadline` (a peer that dribbles a byte at a time
/// cannot hold us either).
pub fn recv_by(stream: &mut UnixStream, deadline: Option<Instant>) -> Result<Message, ConnError> {
    let mut h = [0u8; HEADER_BYTES];
    let mut raw = [-1 as RawFd; MAX_MESSAGE_FDS];
    let mut iov = [libc::iovec {
        iov_base: h.as_mut_ptr().cast(),
        iov_len: h.len(),
    }];
    let (n, nfds) = loop {
        ready(stream.as_raw_fd(), libc::POLLIN, deadline)?;
        // SAFETY: the iovec points at `h`, a live buffer of its stated length that may take
        // any bytes; `raw` has room for MAX_MESSAGE_FDS descriptors.
        match unsafe { stream.recv_with_fds(&mut iov, &mut raw) } {
            // A signal (a vCPU kicked out of KVM_RUN) before any byte came: wait on.
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) if e.errno() == libc::EAGAIN && deadline.is_some() => continue,
            r => break r.map_err(|e| io_err(io::Error::from_raw_os_error(e.errno())))?,
        }
    };
    // SAFETY: the first `nfds` entries are descriptors the kernel just gave this process,
    // owned by nobody else; wrapping them closes them on every path below.
    let files: Vec<File> = raw[..nfds]
        .iter()
        .map(|&fd| unsafe { File::from_raw_fd(fd) })
        .collect();
    if n == 0 {
        return Err(ConnError::Closed);
    }
    read_exact_by(stream, &mut h[n..], deadline)?;
    let header = Header::parse(&h)?;
    let mut payload = vec![0u8; header.size as usize - HEADER_BYTES];
    read_exact_by(stream, &mut payload, deadline)?;
    Ok(Message {
        header,
        payload,
        files,
    })
}

/// The raw descriptor of a file to pass.
pub fn fd_of(f: &impl AsRawFd) -> RawFd {
    f.as_raw_fd()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A peer that sends a byte now and then cannot stretch the wait past the deadline,
    /// and signals do not restart it.
    #[test]
    fn a_dribbling_peer_cannot_stretch_the_deadline() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            for _ in 0..20 {
                if b.write_all(&[0]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let start = Instant::now();
        let r = recv_by(&mut a, Some(start + Duration::from_millis(300)));
        let took = start.elapsed();
        assert!(matches!(r, Err(ConnError::TimedOut)), "{r:?}");
        assert!(took < Duration::from_millis(1500), "waited {took:?}");
        drop(a);
        t.join().unwrap();
    }
}
