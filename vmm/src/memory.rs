//! Guest RAM: `vm-memory` regions with an atomic dirty bitmap, so every write the VMM's
//! own code makes through `GuestMemory` is logged for migration.

use vm_memory::bitmap::AtomicBitmap;

/// Guest RAM as the VMM sees it. Writes through this type set bits in the per-region
/// `AtomicBitmap` (one bit per 4 KiB page).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;
/// One RAM region of [`GuestMemoryMmap`].
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<AtomicBitmap>;

/// A new memfd of `size` bytes (zeros), for guest RAM that another process may map too.
pub fn memfd(name: &str, size: u64) -> std::io::Result<std::fs::File> {
    use std::os::fd::FromRawFd;
    let cname = std::ffi::CString::new(name).map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in a memfd name")
    })?;
    // SAFETY: memfd_create reads the NUL-terminated name and returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(size)?;
    Ok(file)
}

/// `MADV_POPULATE_WRITE` (Linux 5.14), not yet in every libc.
const MADV_POPULATE_WRITE: libc::c_int = 23;

/// Faults in the guest pages of `len` bytes at `gpa` with one system call, before a
/// migration writes them: on a nested host every page fault taken by a plain copy is an
/// exit to the outer hypervisor, and one madvise per chunk is far cheaper. Only pages that
/// are about to be written are touched (zero pages are never sent, so they stay
/// unallocated), and faulting a page in never changes its contents. Best effort: on a
/// kernel without it, or outside RAM, the copy faults the pages in itself.
pub fn prefault(mem: &GuestMemoryMmap, gpa: u64, len: usize) {
    use vm_memory::GuestMemoryBackend;
    let Ok(slice) = mem.get_slice(vm_memory::GuestAddress(gpa), len) else {
        return;
    };
    let host = slice.ptr_guard_mut().as_ptr() as usize;
    let page = 4096usize;
    let start = host & !(page - 1);
    let end = (host + len).div_ceil(page) * page;
    // SAFETY: [start, end) lies within one live guest RAM mapping (`get_slice` checked the
    // range against the region, and mappings are page-aligned); MADV_POPULATE_WRITE only
    // faults pages in and changes no contents.
    let _ = unsafe { libc::madvise(start as *mut libc::c_void, end - start, MADV_POPULATE_WRITE) };
}
