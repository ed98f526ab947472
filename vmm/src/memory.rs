//! Guest RAM: `vm-memory` regions with a dirty log, so every write the VMM's own code
//! makes through `GuestMemory` is logged for migration.

/// Guest RAM as the VMM sees it. Writes through this type set bits in the per-region
/// `DirtyLog` (one bit per 4 KiB page); devices reach it through
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

/// Guest RAM's ranges as the migration protocol names them.
pub fn ram_layout(mem: &GuestMemoryMmap) -> Vec<vm_migration::RamRange> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    mem.iter()
        .map(|r| vm_migration::RamRange {
            gpa: r.start_addr().0,
            size: r.len(),
        })
        .collect()
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

/// Which guest pages a migration destination has already faulted in, so that
/// [`prefault`] runs once per page, not once per pass: on pages already there it walks
/// the page table for nothing, ~0.14 µs a page here, half what copying the page in costs.
pub struct PrefaultedPages(std::sync::Mutex<vm_migration::page_set::PageSet>);

impl PrefaultedPages {
    /// No page faulted in yet, for guest RAM laid out as `ram`.
    pub fn new(ram: &[vm_migration::RamRange]) -> Self {
        PrefaultedPages(std::sync::Mutex::new(vm_migration::page_set::PageSet::new(
            ram,
        )))
    }

    /// Faults in the pages of `len` bytes at `gpa` unless every one of them was already
    /// (see [`prefault`]); returns whether it did. A range outside RAM is left to the
    /// write that follows, which reports it.
    pub fn prefault(&self, mem: &GuestMemoryMmap, gpa: u64, len: usize) -> bool {
        if !self.mark(gpa, len) {
            return false;
        }
        prefault(mem, gpa, len);
        true
    }

    /// Marks the pages of `len` bytes at `gpa` (page-aligned, inside one RAM range)
    /// faulted in; returns whether any was not.
    fn mark(&self, gpa: u64, len: usize) -> bool {
        let mut set = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if !set.contains_range(gpa, (len as u64).div_ceil(4096)) {
            return false;
        }
        let before = set.count();
        set.insert_range(gpa, len as u64);
        set.count() > before
    }
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

/// For each of the `pages` 4 KiB pages of `file` from byte `offset` (page-aligned), true
/// when it is a hole: never written by anybody, so it reads as zeros. For shared guest RAM
/// (a memfd, maybe mapped by a vfio-user device process too), where this process's page
/// table cannot tell (a page another process wrote is not mapped here) and reading a hole
/// would allocate it. Asks the file (`SEEK_DATA`/`SEEK_HOLE`), which knows every writer.
pub fn file_holes(
    file: &std::fs::File,
    offset: u64,
    pages: usize,
    out: &mut Vec<bool>,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    const PAGE: u64 = 4096;
    let end = offset + pages as u64 * PAGE;
    out.clear();
    out.resize(pages, true);
    let seek = |at: u64, whence: libc::c_int| -> std::io::Result<Option<u64>> {
        let at = libc::off_t::try_from(at)
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        // SAFETY: lseek on a descriptor this process owns; it moves only the file position,
        // which nothing else of Ferry's uses (reads and writes are pread/pwrite and mmap).
        let r = unsafe { libc::lseek(file.as_raw_fd(), at, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = std::io::Error::last_os_error();
        // ENXIO: no data at or after `at` (SEEK_DATA past the last data, or past the end).
        if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        }
    };
    let mut at = offset;
    while at < end {
        let Some(data) = seek(at, libc::SEEK_DATA)? else {
            break;
        };
        if data >= end {
            break;
        }
        let hole = seek(data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
        // Pages touching [data, hole) hold data.
        let first = ((data - offset) / PAGE) as usize;
        let last = (hole - offset).div_ceil(PAGE) as usize;
        for z in &mut out[first..last.min(pages)] {
            *z = false;
        }
        at = hole.max(data + 1);
    }
    Ok(())
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

/// A transparent huge page on x86-64: [`advise_huge_pages_within`] asks for them on
/// stretches aligned to it, so guest RAM's mapping may be split at its multiples.
pub const HUGE_PAGE: usize = 2 << 20;

/// The 2 MiB-aligned stretch `[start, end)` of host addresses wholly inside `len` bytes at
/// `host`, if there is one: where a transparent huge page can back memory.
fn huge_page_stretch(host: usize, len: usize) -> Option<(usize, usize)> {
    let start = host.checked_add(HUGE_PAGE - 1)? & !(HUGE_PAGE - 1);
    let end = host.checked_add(len)? & !(HUGE_PAGE - 1);
    (end > start).then_some((start, end))
}

/// Asks for transparent huge pages (`MADV_HUGEPAGE`) on the 2 MiB-aligned stretches
/// wholly inside the guest RAM of `len` bytes at `gpa`; returns the bytes asked for.
/// For RAM nothing touched yet and that is about to be filled: one fault per 2 MiB
/// instead of 512. Whether that is cheaper depends on the host and on how much of each
/// 2 MiB gets written (`docs/benchmarks/first-touch.md`): the caller decides where.
/// Best effort.
pub fn advise_huge_pages_within(mem: &GuestMemoryMmap, gpa: u64, len: usize) -> usize {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    // Shared RAM stays in 4 KiB pages, as `create_memory` leaves it: postcopy punches
    // single pages out of its file, which a huge page there may not allow.
    let shared = mem
        .find_region(vm_memory::GuestAddress(gpa))
        .is_none_or(|r| r.file_offset().is_some());
    if shared {
        return 0;
    }
    let Ok(slice) = mem.get_slice(vm_memory::GuestAddress(gpa), len) else {
        return 0;
    };
    let host = slice.ptr_guard_mut().as_ptr() as usize;
    let Some((start, end)) = huge_page_stretch(host, len) else {
        return 0;
    };
    // SAFETY: [start, end) lies within [host, host + len), one live guest RAM mapping
    // (`get_slice` checked the range against its region); MADV_HUGEPAGE only changes how
    // the kernel backs it, never its contents.
    let rc = unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
    if rc == 0 {
        end - start
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn huge_page_stretch_is_the_aligned_part_inside() {
        const M2: usize = 2 << 20;
        let f = super::huge_page_stretch;
        assert_eq!(
            f(4 * M2, 3 * M2),
            Some((4 * M2, 7 * M2)),
            "aligned both ends"
        );
        assert_eq!(
            f(4 * M2 + 4096, 3 * M2),
            Some((5 * M2, 7 * M2)),
            "start rounds up"
        );
        assert_eq!(
            f(4 * M2, 3 * M2 - 4096),
            Some((4 * M2, 6 * M2)),
            "end rounds down"
        );
        assert_eq!(
            f(4 * M2 + 4096, M2),
            None,
            "2 MiB, not aligned: no huge page fits"
        );
        assert_eq!(f(4 * M2, M2 - 4096), None);
        assert_eq!(f(usize::MAX - 4096, 8192), None, "no overflow at the top");
    }

    /// The stretch asked for is marked for huge pages (`hg` in smaps' VmFlags), what is
    /// around it is not: the helper never widens a caller's range.
    #[test]
    fn advise_huge_pages_within_marks_only_the_aligned_stretch() {
        use vm_memory::{GuestAddress, GuestMemoryBackend};
        const M2: usize = 2 << 20;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 * M2)]).unwrap();
        let base = mem.get_host_address(GuestAddress(0)).unwrap() as usize;
        // From 1 MiB in, 9 MiB long: whatever the mapping's alignment, some 2 MiB-aligned
        // stretch lies inside, and some of the range around it does not.
        let (gpa, len) = (M2 / 2, 9 * M2 / 2);
        let (start, end) = super::huge_page_stretch(base + gpa, len).unwrap();
        assert_eq!(
            super::advise_huge_pages_within(&mem, gpa as u64, len),
            end - start
        );
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let flags_at = |addr: usize| -> String {
            let mut lines = smaps.lines();
            while let Some(l) = lines.next() {
                let range = l.split(' ').next().unwrap_or("");
                let Some((a, b)) = range.split_once('-') else {
                    continue;
                };
                let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                else {
                    continue;
                };
                if (a..b).contains(&addr) {
                    return lines
                        .find_map(|l| l.strip_prefix("VmFlags:").map(str::to_string))
                        .unwrap_or_default();
                }
            }
            panic!("no mapping holds {addr:#x}");
        };
        let huge = |addr| flags_at(addr).split_whitespace().any(|f| f == "hg");
        assert!(huge(start) && huge(end - 1), "{:?}", flags_at(start));
        assert!(
            !huge(start - 1),
            "below the stretch: {:?}",
            flags_at(start - 1)
        );
        assert!(!huge(end), "above the stretch: {:?}", flags_at(end));
        // Outside RAM: nothing asked, nothing marked.
        assert_eq!(
            super::advise_huge_pages_within(&mem, (40 * M2) as u64, M2),
            0
        );
        // Shared RAM (a memfd another process may map) is left alone.
        let file = super::memfd("shared", 8 * M2 as u64).unwrap();
        let shared = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            8 * M2,
            Some(vm_memory::FileOffset::new(file, 0)),
        )])
        .unwrap();
        assert_eq!(super::advise_huge_pages_within(&shared, 0, 8 * M2), 0);
    }

    #[test]
    fn prefaulted_pages_fault_each_page_in_once() {
        // Two ranges with a hole between them, neither a multiple of 64 pages: the first
        // has 260 pages, so the second's bits start at 260, inside a word.
        let ram = |gpa, size| vm_migration::RamRange { gpa, size };
        let p = super::PrefaultedPages::new(&[ram(0, 260 * 4096), ram(4 << 20, 70 * 4096)]);
        assert!(p.mark(8192, 3 * 4096), "first time: pages 2-4 are new");
        assert!(!p.mark(8192, 3 * 4096), "second time: nothing new");
        assert!(!p.mark(12288, 4096), "a page inside the marked run");
        assert!(p.mark(0, 5 * 4096), "pages 0-1 are new, 2-4 not");
        assert!(!p.mark(0, 5 * 4096));
        // Across a word boundary in the second range (its bits 60-67 are 320-327).
        let g = 4 << 20;
        assert!(p.mark(g + 60 * 4096, 8 * 4096));
        assert!(!p.mark(g + 62 * 4096, 6 * 4096));
        assert!(p.mark(g, 70 * 4096), "the rest of the range is new");
        assert!(!p.mark(g, 70 * 4096));
        assert!(!p.mark(g + 69 * 4096, 4096), "its last page");
        // The first range's last pages share a word with the second's first: untouched
        // by the second's marks.
        assert!(p.mark(256 * 4096, 4 * 4096));
        assert!(!p.mark(259 * 4096, 4096));
        // Outside RAM or across the hole: nothing to do here.
        assert!(!p.mark(2 << 20, 4096));
        assert!(!p.mark(259 * 4096, 2 * 4096));
    }

    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

    /// Holes are what nobody wrote, whoever the writer (a write through the file, as a
    /// device process's would land, or through a mapping); a page written with zeros is
    /// data all the same (it must be read, and it reads as zeros).
    #[test]
    fn file_holes_are_the_pages_nobody_wrote() {
        use std::os::unix::fs::FileExt;
        let f = memfd("holes", 64 << 12).unwrap();
        f.write_all_at(&[1], 3 << 12).unwrap();
        f.write_all_at(&[0; 4096], 10 << 12).unwrap();
        f.write_all_at(&[7; 8192], 62 << 12).unwrap();
        let mut holes = Vec::new();
        file_holes(&f, 0, 64, &mut holes).unwrap();
        let data: Vec<usize> = (0..64).filter(|&i| !holes[i]).collect();
        assert_eq!(data, vec![3, 10, 62, 63]);
        // A window of the file, as one region of guest RAM is.
        file_holes(&f, 8 << 12, 4, &mut holes).unwrap();
        assert_eq!(holes, vec![true, true, false, true]);
        // Nothing written at all.
        let g = memfd("empty", 16 << 12).unwrap();
        file_holes(&g, 0, 16, &mut holes).unwrap();
        assert!(holes.iter().all(|&h| h));
    }

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
