// Copyright 2026 Ferry authors
// SPDX-License-Identifier: Apache-2.0

//! The device's DMA address space: the client's memory, mapped from the files it passed
//! with DMA_MAP, and the DMA log of the pages the device wrote.
//!
//! Every write into client memory goes through [`DmaSpace::write_page`], which also marks
//! the log: no write can bypass it.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;

use guest_pattern::PAGE_SIZE;
use vfio_dirty::vfio_user::server::Errno;
use vfio_dirty::vfio_user::wire::DMA_MAP_WRITE;

/// The DMA page: the unit of mappings, jobs and the log.
pub const PAGE: u64 = PAGE_SIZE as u64;
/// Most mappings at once.
pub const MAX_MAPPINGS: usize = 4096;

/// One DMA_MAP: `size` bytes of a file mapped MAP_SHARED at `ptr`.
struct Mapping {
    ptr: NonNull<u8>,
    size: u64,
    writable: bool,
    /// One bit per page written since the last report, while logging (`None` otherwise).
    dirty: Option<Vec<u64>>,
}

// SAFETY: a `Mapping` owns its mmap alone (the pointer is never shared outside it), and
// the memory it points to is a MAP_SHARED file mapping that any thread of this process may
// access; `Drop` unmaps it from whichever thread drops it. Moving it to another thread (a
// job's worker reaches it through the device's mutex) is therefore sound.
unsafe impl Send for Mapping {}

impl Mapping {
    fn pages(&self) -> u64 {
        self.size / PAGE
    }

    fn empty_log(&self) -> Vec<u64> {
        vec![0; self.pages().div_ceil(64) as usize]
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`size` are exactly what mmap returned for this mapping, which this
        // struct owns alone; no reference into it outlives the struct (writes copy through
        // raw pointers while `&mut DmaSpace` is held, which the device's mutex serialises).
        let r = unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.size as usize) };
        if r != 0 {
            log::warn!(
                "munmap of a {:#x}-byte DMA mapping failed: {}",
                self.size,
                std::io::Error::last_os_error()
            );
        }
    }
}

/// Dirty logging while started.
#[derive(Debug)]
struct Log {
    page_size: u64,
    /// The ranges to log (`(iova, length)`); empty: everything mapped.
    ranges: Vec<(u64, u64)>,
}

impl Log {
    fn covers(&self, addr: u64) -> bool {
        self.ranges.is_empty()
            || self
                .ranges
                .iter()
                .any(|&(iova, len)| addr >= iova && addr - iova < len)
    }
}

/// The mappings by DMA address (never overlapping) and the DMA log.
#[derive(Default)]
pub struct DmaSpace {
    maps: BTreeMap<u64, Mapping>,
    log: Option<Log>,
}

fn errno_now() -> Errno {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

impl DmaSpace {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of mappings.
    pub fn len(&self) -> usize {
        self.maps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.maps.is_empty()
    }

    /// Whether DMA logging is started.
    pub fn logging(&self) -> bool {
        self.log.is_some()
    }

    /// Maps `[address, address + size)` to `file` at `offset`: writable if `flags` has
    /// DMA_MAP_WRITE. EINVAL: a zero or unaligned size, address or offset, a range past the
    /// end of a regular file; EEXIST: it overlaps a mapping; ENOSPC: too many mappings.
    pub fn map(
        &mut self,
        flags: u32,
        address: u64,
        size: u64,
        file: &File,
        offset: u64,
    ) -> Result<(), Errno> {
        if size == 0
            || !address.is_multiple_of(PAGE)
            || !size.is_multiple_of(PAGE)
            || !offset.is_multiple_of(PAGE)
        {
            return Err(libc::EINVAL);
        }
        let end = address.checked_add(size).ok_or(libc::EINVAL)?;
        let len = usize::try_from(size).map_err(|_| libc::EINVAL)?;
        let file_end = offset.checked_add(size).ok_or(libc::EINVAL)?;
        let off = libc::off_t::try_from(offset).map_err(|_| libc::EINVAL)?;
        if self.overlaps(address, end) {
            return Err(libc::EEXIST);
        }
        if self.maps.len() >= MAX_MAPPINGS {
            return Err(libc::ENOSPC);
        }
        // A write past the end of a regular file would be SIGBUS, not an error: refuse it
        // here. (Other files, e.g. devices, have no meaningful length.)
        let meta = file
            .metadata()
            .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
        if meta.file_type().is_file() && meta.len() < file_end {
            return Err(libc::EINVAL);
        }
        let writable = flags & DMA_MAP_WRITE != 0;
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a new mapping at an address of the kernel's choosing (null hint, no
        // MAP_FIXED), so no existing memory of this process is affected; the result is
        // checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(errno_now());
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or(libc::EIO)?;
        let mut m = Mapping {
            ptr,
            size,
            writable,
            dirty: None,
        };
        if self.log.is_some() {
            m.dirty = Some(m.empty_log());
        }
        self.maps.insert(address, m);
        Ok(())
    }

    fn overlaps(&self, start: u64, end: u64) -> bool {
        let before = self
            .maps
            .range(..=start)
            .next_back()
            .is_some_and(|(&a, m)| a + m.size > start);
        let after = self
            .maps
            .range(start..)
            .next()
            .is_some_and(|(&a, _)| a < end);
        before || after
    }

    /// Unmaps the mapping `[address, address + size)` exactly, or every mapping inside that
    /// range. ENOENT: nothing to unmap; EINVAL: a zero size, or a mapping only partly in
    /// the range (nothing is unmapped then). Returns how many mappings went.
    pub fn unmap(&mut self, address: u64, size: u64) -> Result<usize, Errno> {
        if size == 0 {
            return Err(libc::EINVAL);
        }
        let end = address.checked_add(size).ok_or(libc::EINVAL)?;
        if self.maps.get(&address).is_some_and(|m| m.size == size) {
            self.maps.remove(&address);
            return Ok(1);
        }
        let partly_before = self
            .maps
            .range(..address)
            .next_back()
            .is_some_and(|(&a, m)| a + m.size > address);
        let inside: Vec<u64> = self.maps.range(address..end).map(|(&a, _)| a).collect();
        let partly_after = inside.last().is_some_and(|a| self.maps[a].size > end - a);
        if partly_before || partly_after {
            return Err(libc::EINVAL);
        }
        if inside.is_empty() {
            return Err(libc::ENOENT);
        }
        for a in &inside {
            self.maps.remove(a);
        }
        Ok(inside.len())
    }

    /// Unmaps everything (the client went away: its memory is not ours to keep).
    pub fn unmap_all(&mut self) {
        self.maps.clear();
    }

    /// The mapping holding `addr`.
    fn find(&self, addr: u64) -> Option<(u64, &Mapping)> {
        let (&a, m) = self.maps.range(..=addr).next_back()?;
        (addr - a < m.size).then_some((a, m))
    }

    /// Whether every byte of `[addr, addr + len)` is in writable mappings.
    pub fn writable(&self, addr: u64, len: u64) -> bool {
        let Some(end) = addr.checked_add(len) else {
            return false;
        };
        let mut at = addr;
        while at < end {
            match self.find(at) {
                Some((a, m)) if m.writable => at = a + m.size,
                _ => return false,
            }
        }
        true
    }

    /// Writes one page at DMA address `addr` (page aligned, inside a writable mapping, else
    /// EFAULT) and marks it in the log if logging covers it. The only way the device writes
    /// client memory.
    pub fn write_page(&mut self, addr: u64, data: &[u8; PAGE_SIZE]) -> Result<(), Errno> {
        if !addr.is_multiple_of(PAGE) {
            return Err(libc::EFAULT);
        }
        let log = &self.log;
        let (&start, m) = self
            .maps
            .range_mut(..=addr)
            .next_back()
            .ok_or(libc::EFAULT)?;
        let off = addr - start;
        if off >= m.size || !m.writable {
            return Err(libc::EFAULT);
        }
        // SAFETY: `off + PAGE <= m.size` (both page multiples, `off < size`), so the
        // destination is inside the live PROT_WRITE mapping `m` owns; `data` is a separate
        // buffer of PAGE bytes in this process, so the ranges do not overlap. The memory is
        // shared with the client, which may access it concurrently: that is DMA, and a raw
        // byte copy (no Rust reference into it) is the right access for it.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                m.ptr.as_ptr().add(off as usize),
                PAGE_SIZE,
            )
        };
        if let (Some(log), Some(bits)) = (log, m.dirty.as_mut()) {
            if log.covers(addr) {
                let page = (off / PAGE) as usize;
                bits[page / 64] |= 1 << (page % 64);
            }
        }
        Ok(())
    }

    /// Starts logging at `page_size` (only [`PAGE`]: else EINVAL) for `ranges` (empty: all
    /// mapped, now and later). Already started at that page size: nothing changes.
    pub fn log_start(&mut self, page_size: u64, ranges: &[(u64, u64)]) -> Result<(), Errno> {
        if page_size != PAGE {
            return Err(libc::EINVAL);
        }
        if self.log.is_some() {
            return Ok(());
        }
        for &(iova, len) in ranges {
            if len == 0 || iova.checked_add(len).is_none() {
                return Err(libc::EINVAL);
            }
        }
        for m in self.maps.values_mut() {
            m.dirty = Some(m.empty_log());
        }
        self.log = Some(Log {
            page_size,
            ranges: ranges.to_vec(),
        });
        Ok(())
    }

    /// Stops logging and forgets what it held.
    pub fn log_stop(&mut self) {
        self.log = None;
        for m in self.maps.values_mut() {
            m.dirty = None;
        }
    }

    /// Sets bit `i` (little-endian u64 words) of `bitmap` for every page `iova + i *
    /// page_size` written since the last report, and forgets those pages. EINVAL: not
    /// logging, another page size, an unaligned or empty range, or a bitmap too short.
    pub fn log_report(
        &mut self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u8],
    ) -> Result<(), Errno> {
        let log = self.log.as_ref().ok_or(libc::EINVAL)?;
        if page_size != log.page_size || !iova.is_multiple_of(page_size) || length == 0 {
            return Err(libc::EINVAL);
        }
        let end = iova.checked_add(length).ok_or(libc::EINVAL)?;
        let pages = length.div_ceil(page_size);
        if (bitmap.len() as u64) * 8 < pages {
            return Err(libc::EINVAL);
        }
        // Mappings are sorted and disjoint, so their ends are sorted too: walk back from the
        // last one starting below `end` until one ends at or before `iova`.
        for (&start, m) in self.maps.range_mut(..end).rev() {
            let m_end = start + m.size;
            if m_end <= iova {
                break;
            }
            let Some(bits) = m.dirty.as_mut() else {
                continue;
            };
            // Pages of this mapping inside the range: [lo, hi).
            let lo = (iova.max(start) - start) / PAGE;
            let hi = (end.min(m_end) - start).div_ceil(PAGE);
            for w in (lo / 64)..hi.div_ceil(64) {
                let first = w * 64;
                let mut mask = u64::MAX;
                if lo > first {
                    mask &= u64::MAX << (lo - first);
                }
                if hi < first + 64 {
                    mask &= u64::MAX >> (first + 64 - hi);
                }
                let word = &mut bits[w as usize];
                let mut set = *word & mask;
                *word &= !mask;
                while set != 0 {
                    let b = u64::from(set.trailing_zeros());
                    set &= set - 1;
                    let out = (start + (first + b) * PAGE - iova) / page_size;
                    bitmap[(out / 8) as usize] |= 1 << (out % 8);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    pub(crate) fn memfd(bytes: u64) -> File {
        // SAFETY: the name is a NUL-terminated string literal; the call only creates a file.
        let fd = unsafe { libc::memfd_create(c"dma-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` was just created and is owned by nothing else.
        let f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        f.set_len(bytes).unwrap();
        f
    }

    fn page(b: u8) -> [u8; PAGE_SIZE] {
        [b; PAGE_SIZE]
    }

    const RW: u32 = vfio_dirty::vfio_user::wire::DMA_MAP_READ | DMA_MAP_WRITE;

    #[test]
    fn maps_are_checked() {
        let f = memfd(16 * PAGE);
        let mut d = DmaSpace::new();
        assert_eq!(d.map(RW, 0x10_0000, 0, &f, 0), Err(libc::EINVAL));
        assert_eq!(d.map(RW, 0x10_0800, PAGE, &f, 0), Err(libc::EINVAL));
        assert_eq!(d.map(RW, 0x10_0000, 100, &f, 0), Err(libc::EINVAL));
        assert_eq!(d.map(RW, 0x10_0000, PAGE, &f, 12), Err(libc::EINVAL));
        // Past the end of the file.
        assert_eq!(d.map(RW, 0x10_0000, 17 * PAGE, &f, 0), Err(libc::EINVAL));
        assert_eq!(
            d.map(RW, u64::MAX - PAGE + 1, PAGE, &f, 0),
            Err(libc::EINVAL)
        );
        d.map(RW, 0x10_0000, 4 * PAGE, &f, 0).unwrap();
        assert_eq!(d.map(RW, 0x10_3000, PAGE, &f, 0), Err(libc::EEXIST));
        assert_eq!(d.map(RW, 0x0f_f000, 2 * PAGE, &f, 0), Err(libc::EEXIST));
        assert_eq!(d.map(RW, 0x0f_0000, 0x10_0000, &f, 0), Err(libc::EEXIST));
        d.map(RW, 0x10_4000, PAGE, &f, 4 * PAGE).unwrap();
        d.map(RW, 0x0f_f000, PAGE, &f, 5 * PAGE).unwrap();
        assert_eq!(d.len(), 3);
    }

    #[test]
    fn too_many_maps_are_refused() {
        let f = memfd(PAGE);
        let mut d = DmaSpace::new();
        for i in 0..MAX_MAPPINGS as u64 {
            d.map(RW, i * 2 * PAGE, PAGE, &f, 0).unwrap();
        }
        assert_eq!(
            d.map(RW, 2 * PAGE * MAX_MAPPINGS as u64, PAGE, &f, 0),
            Err(libc::ENOSPC)
        );
    }

    #[test]
    fn unmaps_exact_or_whole_mappings() {
        let f = memfd(16 * PAGE);
        let mut d = DmaSpace::new();
        d.map(RW, 0x1000, PAGE, &f, 0).unwrap();
        d.map(RW, 0x2000, 2 * PAGE, &f, 0).unwrap();
        d.map(RW, 0x8000, PAGE, &f, 0).unwrap();
        assert_eq!(d.unmap(0x1000, 0), Err(libc::EINVAL));
        assert_eq!(d.unmap(0x10_0000, PAGE), Err(libc::ENOENT));
        // Cuts the mapping at 0x2000.
        assert_eq!(d.unmap(0x3000, PAGE), Err(libc::EINVAL));
        assert_eq!(d.unmap(0x1000, 2 * PAGE), Err(libc::EINVAL));
        assert_eq!(d.len(), 3);
        assert_eq!(d.unmap(0x8000, PAGE), Ok(1));
        assert_eq!(d.unmap(0x8000, PAGE), Err(libc::ENOENT));
        assert_eq!(d.unmap(0, 0x10_0000), Ok(2));
        assert!(d.is_empty());
    }

    #[test]
    fn writes_land_in_the_file_and_only_in_writable_maps() {
        let f = memfd(4 * PAGE);
        let mut d = DmaSpace::new();
        d.map(RW, 0x10_0000, 2 * PAGE, &f, PAGE).unwrap();
        d.map(
            vfio_dirty::vfio_user::wire::DMA_MAP_READ,
            0x20_0000,
            PAGE,
            &f,
            0,
        )
        .unwrap();
        assert!(d.writable(0x10_0000, 2 * PAGE));
        assert!(!d.writable(0x10_0000, 3 * PAGE));
        assert!(!d.writable(0x20_0000, PAGE));
        d.write_page(0x10_1000, &page(7)).unwrap();
        assert_eq!(d.write_page(0x20_0000, &page(9)), Err(libc::EFAULT));
        assert_eq!(d.write_page(0x10_2000, &page(9)), Err(libc::EFAULT));
        assert_eq!(d.write_page(0x10_0800, &page(9)), Err(libc::EFAULT));
        let mut buf = vec![0u8; 4 * PAGE_SIZE];
        f.read_exact_at(&mut buf, 0).unwrap();
        assert!(buf[..2 * PAGE_SIZE].iter().all(|&b| b == 0));
        assert!(buf[2 * PAGE_SIZE..3 * PAGE_SIZE].iter().all(|&b| b == 7));
        assert!(buf[3 * PAGE_SIZE..].iter().all(|&b| b == 0));
    }

    fn report(d: &mut DmaSpace, iova: u64, length: u64) -> Vec<u64> {
        let n = vfio_dirty::vfio_user::wire::report_bitmap_bytes(length, PAGE).unwrap();
        let mut b = vec![0u8; n];
        d.log_report(iova, length, PAGE, &mut b).unwrap();
        b.chunks_exact(8)
            .enumerate()
            .flat_map(|(w, c)| {
                let v = u64::from_le_bytes(c.try_into().unwrap());
                (0..64)
                    .filter(move |i| v & (1 << i) != 0)
                    .map(move |i| iova + (w as u64 * 64 + i) * PAGE)
            })
            .collect()
    }

    #[test]
    fn log_reports_written_pages_once() {
        let f = memfd(300 * PAGE);
        let mut d = DmaSpace::new();
        d.map(RW, 0x100_0000, 200 * PAGE, &f, 0).unwrap();
        let mut b = [0u8; 8];
        assert_eq!(
            d.log_report(0x100_0000, PAGE, PAGE, &mut b),
            Err(libc::EINVAL)
        );
        assert_eq!(d.log_start(8192, &[]), Err(libc::EINVAL));
        // Not logged: before the start.
        d.write_page(0x100_0000, &page(1)).unwrap();
        d.log_start(PAGE, &[]).unwrap();
        d.log_start(PAGE, &[]).unwrap();
        // A mapping made while logging is logged too.
        d.map(RW, 0x200_0000, 100 * PAGE, &f, 200 * PAGE).unwrap();
        let written = [
            0x100_0000 + PAGE,
            0x100_0000 + 63 * PAGE,
            0x100_0000 + 64 * PAGE,
            0x100_0000 + 199 * PAGE,
            0x200_0000,
            0x200_0000 + 99 * PAGE,
        ];
        for &a in &written {
            d.write_page(a, &page(2)).unwrap();
        }
        assert_eq!(
            d.log_report(0x100_0000, PAGE, 2 * PAGE, &mut b),
            Err(libc::EINVAL)
        );
        assert_eq!(
            d.log_report(0x100_0800, PAGE, PAGE, &mut b),
            Err(libc::EINVAL)
        );
        // A part of the range first: only its pages, and only they are cleared.
        assert_eq!(
            report(&mut d, 0x100_0000 + 64 * PAGE, 64 * PAGE),
            vec![0x100_0000 + 64 * PAGE]
        );
        assert_eq!(
            report(&mut d, 0x100_0000, 0x200_0000),
            written
                .iter()
                .copied()
                .filter(|&a| a != 0x100_0000 + 64 * PAGE)
                .collect::<Vec<_>>()
        );
        assert_eq!(report(&mut d, 0, 0x400_0000), Vec::<u64>::new());
        // A range that does not start at a mapping, at a page offset not a multiple of 64.
        d.write_page(0x200_0000 + 70 * PAGE, &page(3)).unwrap();
        assert_eq!(
            report(&mut d, 0x200_0000 + 3 * PAGE, 80 * PAGE),
            vec![0x200_0000 + 70 * PAGE]
        );
        // An unmapped mapping keeps nothing; stop forgets everything.
        d.write_page(0x200_0000, &page(4)).unwrap();
        d.unmap(0x200_0000, 100 * PAGE).unwrap();
        d.map(RW, 0x200_0000, 100 * PAGE, &f, 200 * PAGE).unwrap();
        assert_eq!(report(&mut d, 0x200_0000, 100 * PAGE), Vec::<u64>::new());
        d.write_page(0x200_0000, &page(4)).unwrap();
        d.log_stop();
        assert_eq!(
            d.log_report(0x200_0000, PAGE, PAGE, &mut b),
            Err(libc::EINVAL)
        );
        d.log_start(PAGE, &[]).unwrap();
        assert_eq!(report(&mut d, 0x200_0000, 100 * PAGE), Vec::<u64>::new());
    }

    #[test]
    fn log_ranges_limit_what_is_logged() {
        let f = memfd(10 * PAGE);
        let mut d = DmaSpace::new();
        d.map(RW, 0x10_0000, 10 * PAGE, &f, 0).unwrap();
        assert_eq!(d.log_start(PAGE, &[(0, 0)]), Err(libc::EINVAL));
        assert_eq!(d.log_start(PAGE, &[(u64::MAX, 2)]), Err(libc::EINVAL));
        assert!(!d.logging());
        d.log_start(PAGE, &[(0x10_2000, 2 * PAGE)]).unwrap();
        for p in 0..10 {
            d.write_page(0x10_0000 + p * PAGE, &page(1)).unwrap();
        }
        assert_eq!(
            report(&mut d, 0x10_0000, 10 * PAGE),
            vec![0x10_2000, 0x10_3000]
        );
    }
}
