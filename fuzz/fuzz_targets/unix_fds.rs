//! The UNIX transport's receive side (`vm_migration::transport::FdUnixStream`), which walks
//! the control messages of every `recvmsg` and takes the SCM_RIGHTS descriptors in them.
//! The peer decides how its bytes are split into messages, how many descriptors ride on
//! each (up to the kernel's 253) and, by this target, whether credentials ride beside them
//! (a second kind of control message the walk must step over). Whatever it sends, the
//! reader must get every byte in order and exactly the descriptors sent — or an error
//! saying descriptors were lost — and keep none it did not hand over (no leak).
//!
//! Input: byte 0: bit 0 credentials on (SO_PASSCRED), bits 1..: read buffer size seed;
//! then up to 64 messages: a length byte (1..=255 bytes of data), a descriptor count
//! byte (0..=255, capped at 253), the data.
#![no_main]

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;

use libfuzzer_sys::fuzz_target;
use vm_migration::transport::{FdUnixStream, MigrationStream, MAX_PASSED_FDS};

/// The lowest free descriptor number: unchanged before and after an input means nothing
/// leaked (the target opens nothing else that lives on).
const MAX_MESSAGES: usize = 64;
const MAX_IN_FLIGHT: usize = 512;

fn lowest_free_fd() -> i32 {
    // SAFETY: dup of stdin's number either fails or returns a new fd that we close.
    let fd = unsafe { libc::fcntl(0, libc::F_DUPFD_CLOEXEC, 0) };
    assert!(fd >= 0);
    // SAFETY: `fd` was just returned to us and is closed once.
    unsafe { libc::close(fd) };
    fd
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, mut rest)) = data.split_first() else {
        return;
    };
    let free_before = lowest_free_fd();
    {
        let (tx, rx) = UnixStream::pair().expect("socketpair");
        let passcred = flags & 1 != 0;
        if passcred {
            let on: libc::c_int = 1;
            // SAFETY: setsockopt with a pointer to a live int of the size given.
            let r = unsafe {
                libc::setsockopt(
                    rx.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_PASSCRED,
                    (&on as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as u32,
                )
            };
            assert_eq!(r, 0);
        }
        // What is sent: an eventfd to pass many times over.
        let passed = new_eventfd();
        let mut sender = FdUnixStream::new(tx);
        let mut sent = Vec::new();
        let mut fds_sent = 0usize;
        // Everything is sent before the first read, so stay well inside the socket's
        // buffer (a send would block) and the kernel's limit on descriptors in flight
        // (RLIMIT_NOFILE; past it sendmsg fails with ETOOMANYREFS).
        let mut messages = 0;
        while let [len, count, tail @ ..] = rest {
            let len = usize::from(*len).max(1).min(tail.len());
            if len == 0 || messages == MAX_MESSAGES {
                break;
            }
            messages += 1;
            let count = usize::from(*count)
                .min(MAX_PASSED_FDS)
                .min(MAX_IN_FLIGHT - fds_sent);
            let fds: Vec<BorrowedFd<'_>> = (0..count).map(|_| passed.as_fd()).collect();
            sender
                .write_with_fds(&tail[..len], &fds)
                .expect("sending to a socketpair");
            sent.extend_from_slice(&tail[..len]);
            fds_sent += count;
            rest = &tail[len..];
        }
        drop(sender);

        let mut reader = FdUnixStream::new(rx);
        let step = usize::from(flags >> 1).max(1);
        let mut got = Vec::new();
        let mut buf = vec![0u8; step];
        let mut lost = false;
        loop {
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => {
                    assert!(e.to_string().contains("lost"), "unexpected error {e}");
                    lost = true;
                    break;
                }
            }
        }
        let fds = reader.take_fds();
        if !lost {
            assert_eq!(got, sent, "bytes differ");
            assert_eq!(
                fds.len(),
                fds_sent,
                "descriptors sent {fds_sent}, received {}",
                fds.len()
            );
        } else {
            assert!(fds.len() <= fds_sent);
        }
        for fd in &fds {
            // Each is a live descriptor for the eventfd that was sent.
            // SAFETY: fstat into a zeroed stat on a descriptor we own.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            assert_eq!(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) }, 0);
        }
    }
    assert_eq!(lowest_free_fd(), free_before, "a descriptor leaked");
});

fn new_eventfd() -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: eventfd returns a new descriptor or -1 (checked).
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: `fd` is new and owned by nothing else.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }
}
