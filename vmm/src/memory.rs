//! Guest RAM: `vm-memory` regions with an atomic dirty bitmap, so every write the VMM's
//! own code makes through `GuestMemory` is logged for migration.

/// Guest RAM as the VMM sees it. Writes through this type set bits in the per-region
/// `AtomicBitmap` (one bit per 4 KiB page); devices reach it through
/// `devices::guest_ram::GuestRam` only.
pub use devices::guest_ram::{GuestMemoryMmap, GuestRegionMmap};

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

/// This process's page table, read through `/proc/self/pagemap`: which pages of a private
/// anonymous mapping were never touched. Such a page reads as zeros, so a migration can
/// send it as zero without faulting it in (on a nested host every fault is an exit).
pub struct PageMap(std::fs::File);

/// pagemap entry bits: page present in RAM, page swapped out.
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;

impl PageMap {
    pub fn open() -> std::io::Result<PageMap> {
        std::fs::File::open("/proc/self/pagemap").map(PageMap)
    }

    /// For each of the `pages` 4 KiB pages from host address `host` (page-aligned), true
    /// when it was never touched: neither in RAM nor swapped out. Only meaningful for
    /// private anonymous memory (a shared page may sit in the page cache unmapped here).
    pub fn untouched(&self, host: usize, pages: usize, out: &mut Vec<bool>) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let mut raw = vec![0u8; pages * 8];
        self.0.read_exact_at(&mut raw, (host / 4096) as u64 * 8)?;
        out.clear();
        out.extend(raw.chunks_exact(8).map(|e| {
            let v = u64::from_ne_bytes(e.try_into().unwrap_or([0xff; 8]));
            v & (PM_PRESENT | PM_SWAPPED) == 0
        }));
        Ok(())
    }
}

/// Asks for transparent huge pages on guest RAM (`MADV_HUGEPAGE`): fewer faults while it
/// fills, and untouched RAM is read through the huge zero page. Best effort.
pub fn advise_huge_pages(mem: &GuestMemoryMmap) {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    for r in mem.iter() {
        // SAFETY: the whole of a live guest RAM mapping; MADV_HUGEPAGE only changes how
        // the kernel backs it, never its contents.
        let rc = unsafe { libc::madvise(r.as_ptr().cast(), r.len() as usize, libc::MADV_HUGEPAGE) };
        if rc != 0 {
            log::debug!(
                "MADV_HUGEPAGE on guest RAM at {:#x}: {}",
                r.start_addr().0,
                std::io::Error::last_os_error()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

    #[test]
    fn pagemap_tells_untouched_pages_from_written_and_read_ones() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 12)]).unwrap();
        mem.write_slice(&[1], GuestAddress(3 << 12)).unwrap();
        mem.write_slice(&[0], GuestAddress(10 << 12)).unwrap();
        let host = mem.iter().next().unwrap().as_ptr() as usize;
        let map = PageMap::open().unwrap();
        let mut untouched = Vec::new();
        map.untouched(host, 64, &mut untouched).unwrap();
        assert_eq!(untouched.len(), 64);
        let touched: Vec<usize> = (0..64).filter(|&i| !untouched[i]).collect();
        assert_eq!(touched, vec![3, 10]);
    }
}
