//! A local migration's RAM files as the destination adopts them (`MemFDs`): the source
//! sends file descriptors and, per file, the guest address, size and file offset of the
//! range it holds; `vmm::vm::memory_from_files` maps them. Sizes and offsets come from the
//! peer, and a mapping that reaches past the end of its file would fault (SIGBUS) on the
//! first touch, so whatever it accepts must lie inside its files: every byte of every
//! region is then touched (first and last of each page-sized step) and must read back.
//!
//! Input: one byte, the number of files (1..=4); then per file its length (u32, capped at
//! 2 MiB, sparse) and the peer's entry (gpa, size, file_offset as u64, little-endian).
#![no_main]

use std::os::fd::{FromRawFd, OwnedFd};

use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vm_migration::protocol::MemoryFd;

const MAX_FILE: u64 = 2 << 20;

fn take<const N: usize>(data: &mut &[u8]) -> Option<[u8; N]> {
    let (head, rest) = data.split_first_chunk::<N>()?;
    *data = rest;
    Some(*head)
}

fn memfd(len: u64) -> OwnedFd {
    // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"ferry-fuzz-ram".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just created and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    std::fs::File::from(fd.try_clone().expect("dup"))
        .set_len(len)
        .expect("ftruncate");
    fd
}

fuzz_target!(|data: &[u8]| {
    let mut data = data;
    let Some([n]) = take::<1>(&mut data) else {
        return;
    };
    let n = usize::from(n % 4) + 1;
    let mut files = Vec::with_capacity(n);
    let mut lens = Vec::with_capacity(n);
    for _ in 0..n {
        let (Some(len), Some(gpa), Some(size), Some(off)) = (
            take::<4>(&mut data),
            take::<8>(&mut data),
            take::<8>(&mut data),
            take::<8>(&mut data),
        ) else {
            return;
        };
        let len = u64::from(u32::from_le_bytes(len)) % (MAX_FILE + 1);
        let entry = MemoryFd {
            gpa: u64::from_le_bytes(gpa),
            size: u64::from_le_bytes(size),
            file_offset: u64::from_le_bytes(off),
        };
        lens.push((entry.clone(), len));
        files.push((entry, memfd(len)));
    }
    let Ok(mem) = vmm::vm::memory_from_files(files) else {
        return;
    };
    // Accepted: each region is one entry, inside its file, and every byte is usable.
    assert_eq!(mem.num_regions(), n);
    for r in mem.iter() {
        let gpa = r.start_addr().0;
        let (entry, len) = lens
            .iter()
            .find(|(e, _)| e.gpa == gpa)
            .expect("a region of an entry");
        assert_eq!(r.len(), entry.size);
        assert!(
            entry.file_offset + entry.size <= *len,
            "{entry:?} in a {len}-byte file"
        );
        let mut at = 0;
        while at < r.len() {
            let end = (at + 4096).min(r.len()) - 1;
            for a in [at, end] {
                mem.write_obj(0xa5u8, GuestAddress(gpa + a))
                    .expect("write inside a region");
                assert_eq!(mem.read_obj::<u8>(GuestAddress(gpa + a)).unwrap(), 0xa5);
            }
            at += 4096;
        }
    }
});
