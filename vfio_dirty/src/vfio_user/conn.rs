// Copyright 2026 Ferry authors
// SPDX-License-Identifier: Apache-2.0

//! One vfio-user message on a UNIX stream socket: the header (with any file descriptors
//! passed alongside it), then exactly the payload the header announces.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;

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

/// Sends one message: `header.size` is set from the payload.
pub fn send(
    stream: &mut UnixStream,
    mut header: Header,
    payload: &[u8],
    fds: &[RawFd],
) -> Result<(), ConnError> {
    header.size = (HEADER_BYTES + payload.len()) as u32;
    let h = header.encode();
    if fds.is_empty() {
        let mut all = Vec::with_capacity(HEADER_BYTES + payload.len());
        all.extend_from_slice(&h);
        all.extend_from_slice(payload);
        return stream.write_all(&all).map_err(io_err);
    }
    // The descriptors travel with the header's bytes; the rest follows as plain data.
    // A signal (a vCPU kicked out of KVM_RUN) may interrupt the call before anything went.
    let sent = loop {
        match stream.send_with_fds(&[&h[..]], fds) {
            Err(e) if e.errno() == libc::EINTR => continue,
            r => break r.map_err(|e| io_err(io::Error::from_raw_os_error(e.errno())))?,
        }
    };
    stream.write_all(&h[sent..]).map_err(io_err)?;
    stream.write_all(payload).map_err(io_err)
}

/// Receives one message, refusing a size outside the protocol's limits before reading it.
pub fn recv(stream: &mut UnixStream) -> Result<Message, ConnError> {
    let mut h = [0u8; HEADER_BYTES];
    let mut raw = [-1 as RawFd; MAX_MESSAGE_FDS];
    let mut iov = [libc::iovec {
        iov_base: h.as_mut_ptr().cast(),
        iov_len: h.len(),
    }];
    let (n, nfds) = loop {
        // SAFETY: the iovec points at `h`, a live buffer of its stated length that may take
        // any bytes; `raw` has room for MAX_MESSAGE_FDS descriptors.
        match unsafe { stream.recv_with_fds(&mut iov, &mut raw) } {
            // A signal (a vCPU kicked out of KVM_RUN) before any byte came: wait on.
            Err(e) if e.errno() == libc::EINTR => continue,
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
    stream.read_exact(&mut h[n..]).map_err(io_err)?;
    let header = Header::parse(&h)?;
    let mut payload = vec![0u8; header.size as usize - HEADER_BYTES];
    stream.read_exact(&mut payload).map_err(io_err)?;
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
