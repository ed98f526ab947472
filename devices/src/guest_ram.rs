//! The one way devices reach guest RAM.
//!
//! Every byte a device writes into the guest (a disk read, random bytes, a used-ring entry
//! written by `virtio-queue`) goes through [`GuestRam`], which marks the written pages in
//! the per-region dirty bitmap the migration unions with KVM's log. Devices get a
//! `GuestRam`, never a host pointer: the only raw pointers into guest RAM in this crate are
//! in this file, each followed by the dirty mark. Addresses are guest-physical; a range
//! outside RAM is an error naming it, never a panic (it comes from the guest).

// The one module allowed to take host pointers into guest RAM (devices/clippy.toml).
#![allow(clippy::disallowed_methods)]

use std::fs::File;
use std::os::fd::AsRawFd;

use vm_memory::bitmap::{Bitmap, BS};
use vm_memory::guest_memory::{GuestMemoryBackendSliceIterator, GuestMemorySliceIterator};
use vm_memory::{
    ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, Permissions,
    VolatileSlice,
};

pub use crate::dirty_log::DirtyLog;
use crate::viommu::{DmaFault, DmaWindow, IommuEndpoint};

/// Guest RAM as the VMM maps it: each region carries a [`DirtyLog`] (one bit per 4 KiB
/// page) that every write through `vm-memory` sets.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<DirtyLog>;
/// One RAM region of [`GuestMemoryMmap`].
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<DirtyLog>;
/// The same RAM without the bitmap: what virtio-queue walks the rings through. Its writes
/// (the used ring only) are marked by [`GuestRam::mark_used_ring`], once per round of
/// requests rather than once per write (each mark is a locked instruction, which waits
/// for the store before it: a store into a line the guest is polling).
pub type QueueMemory = vm_memory::GuestMemoryMmap<()>;

/// Why a device access to guest RAM failed.
#[derive(Debug, thiserror::Error)]
pub enum DmaError {
    #[error("guest range {gpa:#x}+{len:#x} is not all RAM")]
    OutOfRam { gpa: u64, len: u64 },
    #[error("DMA of {len:#x} bytes at IOVA {iova:#x} (endpoint {endpoint:#x}) refused by the vIOMMU: {fault:?}")]
    Fault {
        iova: u64,
        len: u64,
        endpoint: u32,
        fault: DmaFault,
    },
    #[error("I/O on {len:#x} bytes at guest {gpa:#x}: {source}")]
    Io {
        gpa: u64,
        len: u64,
        #[source]
        source: std::io::Error,
    },
}

/// Guest memory as `virtio-queue` walks it (rings, descriptors, indirect tables): the
/// unlogged view of guest RAM, and behind the vIOMMU every address translated through the
/// endpoint's domain first. Its writes (the used ring) are marked by
/// [`GuestRam::mark_used_ring`].
#[derive(Clone, Debug)]
pub struct RingMemory {
    phys: QueueMemory,
    iommu: Option<IommuEndpoint>,
    /// Behind the vIOMMU: the log its writes are marked in at once, while the translation
    /// still holds (a mark made later, by translating again, could miss a page the guest
    /// unmapped or remapped meanwhile). None for a benchmark's unlogged RAM.
    log: Option<GuestMemoryMmap>,
}

/// Marks `[gpa, gpa + len)` in `log`, region by region (a range may cover holes).
fn mark_gpa(log: &GuestMemoryMmap, gpa: u64, len: u64) {
    let end = gpa.saturating_add(len);
    for r in log.iter() {
        let (start, r_end) = (r.start_addr().0, r.start_addr().0 + r.len());
        let (lo, hi) = (gpa.max(start), end.min(r_end));
        if lo < hi {
            r.bitmap()
                .mark_dirty((lo - start) as usize, (hi - lo) as usize);
        }
    }
}

/// The slices [`RingMemory`] hands out. Behind the vIOMMU it holds the translation (the
/// table's read lock) until the access is done, like every other DMA.
pub struct RingSlices<'a> {
    direct: Option<GuestMemoryBackendSliceIterator<'a, QueueMemory>>,
    translated: std::vec::IntoIter<vm_memory::guest_memory::Result<VolatileSlice<'a, ()>>>,
    window: Option<DmaWindow<'a>>,
    /// A write behind the vIOMMU: marked when the access is done (the slices dropped),
    /// before the translation is let go.
    mark: Option<(&'a GuestMemoryMmap, u64, u64)>,
}

impl Drop for RingSlices<'_> {
    fn drop(&mut self) {
        if let (Some(w), Some((log, iova, len))) = (&self.window, self.mark) {
            for &(gpa, n) in &w.runs {
                mark_gpa(log, gpa, n);
            }
            w.written(iova, len);
        }
    }
}

impl<'a> Iterator for RingSlices<'a> {
    type Item = vm_memory::guest_memory::Result<VolatileSlice<'a, ()>>;
    fn next(&mut self) -> Option<Self::Item> {
        match &mut self.direct {
            Some(d) => d.next(),
            None => self.translated.next(),
        }
    }
}

impl std::iter::FusedIterator for RingSlices<'_> {}
impl<'a> GuestMemorySliceIterator<'a, ()> for RingSlices<'a> {}

impl RingMemory {
    fn window(
        &self,
        addr: GuestAddress,
        count: usize,
        access: Permissions,
    ) -> Option<DmaWindow<'_>> {
        let ep = self.iommu.as_ref()?;
        // A ring access the mapping refuses is a fault like any DMA.
        ep.table
            .translate(ep.id, addr.0, count as u64, access.has_write())
            .ok()
    }
}

impl vm_memory::GuestMemory for RingMemory {
    type PhysicalMemory = QueueMemory;
    type Bitmap = ();

    fn check_range(&self, addr: GuestAddress, count: usize, access: Permissions) -> bool {
        if self.iommu.is_none() {
            return GuestMemoryBackend::check_range(&self.phys, addr, count);
        }
        self.window(addr, count, access).is_some_and(|w| {
            w.runs.iter().all(|&(gpa, n)| {
                usize::try_from(n).is_ok_and(|n| {
                    GuestMemoryBackend::check_range(&self.phys, GuestAddress(gpa), n)
                })
            })
        })
    }

    fn get_slices<'a>(
        &'a self,
        addr: GuestAddress,
        count: usize,
        access: Permissions,
    ) -> vm_memory::guest_memory::Result<impl GuestMemorySliceIterator<'a, BS<'a, ()>>> {
        if self.iommu.is_none() {
            return Ok(RingSlices {
                direct: Some(GuestMemoryBackend::get_slices(&self.phys, addr, count)),
                translated: Vec::new().into_iter(),
                window: None,
                mark: None,
            });
        }
        let w = self
            .window(addr, count, access)
            .ok_or(vm_memory::GuestMemoryError::InvalidGuestAddress(addr))?;
        let mut slices = Vec::new();
        for &(gpa, n) in &w.runs {
            slices.extend(GuestMemoryBackend::get_slices(
                &self.phys,
                GuestAddress(gpa),
                n as usize,
            ));
        }
        let mark = self
            .log
            .as_ref()
            .filter(|_| access.has_write())
            .map(|log| (log, addr.0, count as u64));
        Ok(RingSlices {
            direct: None,
            translated: slices.into_iter(),
            window: Some(w),
            mark,
        })
    }

    fn physical_memory(&self) -> Option<&QueueMemory> {
        match self.iommu {
            None => Some(&self.phys),
            Some(_) => None,
        }
    }
}

/// Which way a file transfer moves bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dma {
    IntoRam,
    OutOfRam,
}

/// Test seam: while closed, every DMA into the guest waits at its start. A migration
/// test closes it, waits until a device is held, pauses the vCPUs and takes the final
/// dirty collection, then opens it: the held write lands after that collection, every
/// time (a timed delay alone lands there only when the scheduler agrees).
#[derive(Debug, Default)]
pub struct DmaHold {
    state: std::sync::Mutex<HoldState>,
    changed: std::sync::Condvar,
}

#[derive(Debug, Default)]
struct HoldState {
    closed: bool,
    held: usize,
}

impl DmaHold {
    fn lock(&self) -> std::sync::MutexGuard<'_, HoldState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Closes the hold and waits until a device write is held by it; false if none came
    /// within `timeout` (the hold stays closed either way).
    pub fn close_and_wait_held(&self, timeout: std::time::Duration) -> bool {
        let mut st = self.lock();
        st.closed = true;
        let (st, _) = self
            .changed
            .wait_timeout_while(st, timeout, |st| st.held == 0)
            .unwrap_or_else(|p| p.into_inner());
        st.held > 0
    }

    /// Lets every held write go, and every later one.
    pub fn open(&self) {
        self.lock().closed = false;
        self.changed.notify_all();
    }

    fn pass(&self) {
        let mut st = self.lock();
        if !st.closed {
            return;
        }
        st.held += 1;
        self.changed.notify_all();
        let mut st = self
            .changed
            .wait_while(st, |st| st.closed)
            .unwrap_or_else(|p| p.into_inner());
        st.held -= 1;
    }
}

/// Guest RAM as devices see it: reads, and writes that are always dirty-logged.
#[derive(Clone, Debug)]
pub struct GuestRam {
    /// Guest RAM with the dirty log this RAM's writes go to.
    mem: GuestMemoryMmap,
    /// The VM's own guest RAM when `mem` is a second view of it with a log of its own
    /// (the vIOMMU's DMA log): it keeps the mappings alive.
    owner: Option<GuestMemoryMmap>,
    /// `mem`'s mappings again, without bitmaps (not owned: `mem` or `owner` unmaps them,
    /// and all live and die together in this struct), and the vIOMMU endpoint addresses
    /// go through, if the device sits behind one.
    view: RingMemory,
    /// Test seam: every DMA into the guest waits this long first, as with a slow disk,
    /// so a migration's pause lands while a request is in flight.
    dma_delay: Option<std::time::Duration>,
    /// Test seam: a gate every DMA into the guest passes first ([`DmaHold`]).
    dma_hold: Option<std::sync::Arc<DmaHold>>,
    /// Benchmark seam: no device write is marked in the dirty log, to measure what the
    /// marking costs. Never for a VM that may migrate.
    unlogged: bool,
}

impl GuestRam {
    pub fn new(mem: GuestMemoryMmap) -> Self {
        let regions = mem
            .iter()
            .map(|r| {
                // SAFETY: the range is exactly one live mapping of `mem`, which this
                // struct keeps alive for as long as the view (the view owns nothing and
                // unmaps nothing).
                let raw = unsafe {
                    vm_memory::MmapRegion::<()>::build_raw(
                        r.as_ptr(),
                        r.len() as usize,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_SHARED,
                    )
                }
                .expect("a view of a live guest RAM mapping");
                vm_memory::GuestRegionMmap::new(raw, r.start_addr())
                    .expect("the region's own address range")
            })
            .collect::<Vec<_>>();
        let view = QueueMemory::from_regions(regions).expect("the regions of a valid memory");
        GuestRam {
            mem,
            owner: None,
            view: RingMemory {
                phys: view,
                iommu: None,
                log: None,
            },
            dma_delay: None,
            dma_hold: None,
            unlogged: false,
        }
    }

    /// The same RAM with a dirty log of its own (empty now): what the devices behind the
    /// vIOMMU write is counted apart from the other devices' writes.
    pub fn with_own_log(&self) -> GuestRam {
        let regions = self
            .mem
            .iter()
            .map(|r| {
                // SAFETY: the range is exactly one live mapping of `self.mem`, which the
                // new struct keeps alive (`owner`) for as long as the new view.
                let raw = unsafe {
                    vm_memory::MmapRegion::<DirtyLog>::build_raw(
                        r.as_ptr(),
                        r.len() as usize,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_SHARED,
                    )
                }
                .expect("a view of a live guest RAM mapping");
                GuestRegionMmap::new(raw, r.start_addr()).expect("the region's own address range")
            })
            .collect::<Vec<_>>();
        let mem = GuestMemoryMmap::from_regions(regions).expect("the regions of a valid memory");
        GuestRam {
            owner: Some(self.owner.clone().unwrap_or_else(|| self.mem.clone())),
            mem,
            ..self.clone()
        }
    }

    /// The same RAM as the device behind vIOMMU endpoint `endpoint` sees it: every
    /// address is an IOVA of the endpoint's domain.
    pub fn behind_iommu(&self, endpoint: IommuEndpoint) -> GuestRam {
        let mut r = self.clone();
        r.view.iommu = Some(endpoint);
        r.view.log = (!r.unlogged).then(|| r.mem.clone());
        r
    }

    /// The endpoint this device's addresses go through, if any.
    pub fn iommu(&self) -> Option<&IommuEndpoint> {
        self.view.iommu.as_ref()
    }

    /// The device's driver reset it: a device behind the vIOMMU leaves its footprint dirty
    /// if a migration tracks (DESIGN.md rule 5).
    pub fn device_reset(&self) {
        if let Some(ep) = &self.view.iommu {
            ep.table.endpoint_reset(ep.id);
        }
    }

    /// Marks guest-physical `[gpa, gpa + len)` dirty in this RAM's log (the parts that
    /// are RAM): the round's marks and the vIOMMU's footprint rules.
    pub fn mark_gpa_range(&self, gpa: u64, len: u64) {
        if !self.unlogged {
            mark_gpa(&self.mem, gpa, len);
        }
    }

    /// The same RAM with no device write marked in the dirty log (a benchmark seam
    /// measuring the cost of the device log: such writes are lost to a migration).
    pub fn without_log(mut self) -> Self {
        self.unlogged = true;
        self.view.log = None;
        self
    }

    fn mark(&self, slice: &VolatileSlice<'_, BS<'_, DirtyLog>>, len: usize) {
        if !self.unlogged {
            slice.bitmap().mark_dirty(0, len);
        }
    }

    /// Marks the used ring of `queue` dirty: call after the writes virtio-queue made
    /// through [`Self::queue_memory`] (used elements, index, `avail_event`) and before the
    /// worker lets go of its queues, so a paused device has nothing left unmarked.
    pub fn mark_used_ring(&self, queue: &virtio_queue::Queue) {
        use virtio_queue::QueueT;
        // flags, idx, ring[size], avail_event.
        // Behind the vIOMMU each ring write was marked as it was made (RingSlices).
        if self.view.iommu.is_none() {
            let len = 6 + 8 * u64::from(queue.size());
            self.mark_gpa_range(queue.used_ring(), len);
        }
    }

    /// The same RAM, with every DMA into the guest ([`Self::read_file_at`],
    /// [`Self::read_from`]) delayed by `delay` (a test seam standing for a slow device).
    pub fn with_dma_delay(mut self, delay: std::time::Duration) -> Self {
        self.dma_delay = Some(delay);
        self
    }

    /// The same RAM, with every DMA into the guest passing `hold` first (a test seam).
    pub fn with_dma_hold(mut self, hold: std::sync::Arc<DmaHold>) -> Self {
        self.dma_hold = Some(hold);
        self
    }

    fn slow_device(&self) {
        if let Some(h) = &self.dma_hold {
            h.pass();
        }
        if let Some(d) = self.dma_delay {
            std::thread::sleep(d);
        }
    }

    /// The memory `virtio-queue` walks rings and descriptors through. Its writes are not
    /// logged: virtio-queue writes only the used ring, which [`Self::mark_used_ring`]
    /// marks. Write nothing else through it.
    pub fn queue_memory(&self) -> &RingMemory {
        &self.view
    }

    /// The memory with its dirty bitmaps (tests look at them).
    pub fn logged_memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    fn out_of_ram(gpa: u64, len: usize) -> DmaError {
        DmaError::OutOfRam {
            gpa,
            len: len as u64,
        }
    }

    /// Runs `f` on the guest-physical runs `[addr, addr + len)` stands for: itself, or
    /// behind the vIOMMU its translation, held (the table's read lock) until `f` is done.
    /// `f` returns its result and how many bytes it wrote from `addr` on, which the
    /// endpoint's domain then records in its dirty bits.
    fn dma<R>(
        &self,
        addr: u64,
        len: usize,
        write: bool,
        f: impl FnOnce(&[(u64, u64)]) -> Result<(R, usize), DmaError>,
    ) -> Result<R, DmaError> {
        addr.checked_add(len as u64)
            .ok_or_else(|| Self::out_of_ram(addr, len))?;
        match &self.view.iommu {
            None => f(&[(addr, len as u64)]).map(|(r, _)| r),
            Some(ep) => {
                let w = ep
                    .table
                    .translate(ep.id, addr, len as u64, write)
                    .map_err(|fault| DmaError::Fault {
                        iova: addr,
                        len: len as u64,
                        endpoint: ep.id,
                        fault,
                    })?;
                let (r, written) = f(&w.runs)?;
                if write && written > 0 {
                    w.written(addr, written as u64);
                }
                Ok(r)
            }
        }
    }

    /// The host slices covering the runs, or an error if any part is not RAM.
    fn slices(
        &self,
        runs: &[(u64, u64)],
    ) -> Result<Vec<VolatileSlice<'_, BS<'_, DirtyLog>>>, DmaError> {
        let mut out = Vec::new();
        for &(gpa, len) in runs {
            let len = len as usize;
            for s in GuestMemoryBackend::get_slices(&self.mem, GuestAddress(gpa), len) {
                out.push(s.map_err(|_| Self::out_of_ram(gpa, len))?);
            }
        }
        Ok(out)
    }

    /// Refuses runs that are not all RAM before anything is touched (a write that failed
    /// half-way would leave the guest half-written).
    fn check(&self, runs: &[(u64, u64)]) -> Result<(), DmaError> {
        for &(gpa, len) in runs {
            let ok = gpa.checked_add(len).is_some()
                && usize::try_from(len).is_ok_and(|n| {
                    GuestMemoryBackend::check_range(&self.mem, GuestAddress(gpa), n)
                });
            if !ok {
                return Err(Self::out_of_ram(gpa, len as usize));
            }
        }
        Ok(())
    }

    /// Whether guest-physical `[gpa, gpa + len)` is all RAM (a device that must not do
    /// half a job checks first; not for addresses behind the vIOMMU).
    pub(crate) fn check_ram(&self, gpa: u64, len: usize) -> Result<(), DmaError> {
        gpa.checked_add(len as u64)
            .ok_or_else(|| Self::out_of_ram(gpa, len))?;
        self.check(&[(gpa, len as u64)])
    }

    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        self.dma(addr, buf.len(), false, |runs| {
            self.check(runs)?;
            let mut at = 0usize;
            for &(gpa, n) in runs {
                let n = n as usize;
                self.mem
                    .read_slice(&mut buf[at..at + n], GuestAddress(gpa))
                    .map_err(|_| Self::out_of_ram(gpa, n))?;
                at += n;
            }
            Ok(((), 0))
        })
    }

    /// Writes `buf` at `addr` and marks the pages dirty.
    pub fn write(&self, addr: u64, buf: &[u8]) -> Result<(), DmaError> {
        self.dma(addr, buf.len(), true, |runs| {
            self.check(runs)?;
            let mut at = 0usize;
            for &(gpa, n) in runs {
                let n = n as usize;
                let part = &buf[at..at + n];
                let done = if self.unlogged {
                    self.view.phys.write_slice(part, GuestAddress(gpa))
                } else {
                    self.mem.write_slice(part, GuestAddress(gpa))
                };
                done.map_err(|_| Self::out_of_ram(gpa, n))?;
                at += n;
            }
            Ok(((), buf.len()))
        })
    }

    /// Writes `buf` at `addr` without marking it now: for the last byte of a chain's last
    /// descriptor (a virtio-blk status byte), whose page `virtio::chains::serve_chains`
    /// marks once for the whole round, with the used ring. Nothing else may use it.
    pub(crate) fn write_marked_by_round(&self, addr: u64, buf: &[u8]) -> Result<(), DmaError> {
        // Behind the vIOMMU it is marked now, under its translation, like any other write.
        if self.view.iommu.is_some() {
            return self.write(addr, buf);
        }
        self.dma(addr, buf.len(), true, |runs| {
            self.check(runs)?;
            let mut at = 0usize;
            for &(gpa, n) in runs {
                let n = n as usize;
                self.view
                    .phys
                    .write_slice(&buf[at..at + n], GuestAddress(gpa))
                    .map_err(|_| Self::out_of_ram(gpa, n))?;
                at += n;
            }
            Ok(((), buf.len()))
        })
    }

    /// Marks the pages holding `addrs` (the chains' last bytes of a round), each once.
    pub(crate) fn mark_pages(&self, addrs: &[u64]) {
        // Behind the vIOMMU those bytes were marked as they were written.
        if self.view.iommu.is_some() {
            return;
        }
        let mut pages: Vec<u64> = addrs.iter().map(|g| g & !0xfff).collect();
        pages.sort_unstable();
        pages.dedup();
        for p in pages {
            self.mark_gpa_range(p, 1);
        }
    }

    pub fn read_obj<T: ByteValued>(&self, addr: u64) -> Result<T, DmaError> {
        let v = std::mem::MaybeUninit::<T>::zeroed();
        // SAFETY: `T: ByteValued` is valid for any bytes, all zeros included.
        let mut v = unsafe { v.assume_init() };
        self.read(addr, v.as_mut_slice())?;
        Ok(v)
    }

    /// Writes `v` at `addr` and marks the pages dirty.
    pub fn write_obj<T: ByteValued>(&self, v: T, addr: u64) -> Result<(), DmaError> {
        self.write(addr, v.as_slice())
    }

    /// DMA into the guest: reads `len` bytes of `file` at `offset` straight into RAM at
    /// `gpa` (no bounce buffer) and marks what was written dirty. Returns the bytes read
    /// (less than `len` at the end of the file).
    pub fn read_file_at(
        &self,
        gpa: u64,
        len: usize,
        file: &File,
        offset: u64,
    ) -> Result<usize, DmaError> {
        self.file_io(Dma::IntoRam, gpa, len, file, offset)
    }

    /// DMA out of the guest: writes `len` bytes of RAM at `gpa` to `file` at `offset`.
    /// Returns the bytes written.
    pub fn write_file_at(
        &self,
        gpa: u64,
        len: usize,
        file: &File,
        offset: u64,
    ) -> Result<usize, DmaError> {
        self.file_io(Dma::OutOfRam, gpa, len, file, offset)
    }

    /// `pread` into RAM or `pwrite` out of it, slice by slice, retrying short transfers;
    /// what landed in RAM is marked dirty, even when the transfer then fails.
    fn file_io(
        &self,
        dir: Dma,
        gpa: u64,
        len: usize,
        file: &File,
        offset: u64,
    ) -> Result<usize, DmaError> {
        // The test seams wait before the translation, not holding the table's lock.
        if dir == Dma::IntoRam {
            self.slow_device();
        }
        self.dma(gpa, len, dir == Dma::IntoRam, |runs| {
            let slices = self.slices(runs)?;
            let (done, result) = self.file_io_slices(dir, gpa, len, slices, file, offset);
            // What landed is in the domain's bits even when the transfer then failed.
            let landed = if dir == Dma::IntoRam { done } else { 0 };
            Ok((result.map(|()| done), landed))
        })?
    }

    fn file_io_slices(
        &self,
        dir: Dma,
        gpa: u64,
        len: usize,
        slices: Vec<VolatileSlice<'_, BS<'_, DirtyLog>>>,
        file: &File,
        offset: u64,
    ) -> (usize, Result<(), DmaError>) {
        let mut done = 0usize;
        for slice in slices {
            let mut at = 0usize;
            let mut result = Ok(());
            while at < slice.len() {
                let want = slice.len() - at;
                let pos = (offset + (done + at) as u64) as libc::off64_t;
                let n = match dir {
                    Dma::IntoRam => {
                        let guard = slice.ptr_guard_mut();
                        // SAFETY: `slice` is a live mapping of guest RAM of `slice.len()`
                        // bytes (get_slices checked the range), so [at, at + want) lies
                        // inside it; pread writes at most `want` bytes there. Guest RAM
                        // may change under us (the guest runs): fine for plain bytes.
                        unsafe {
                            libc::pread64(
                                file.as_raw_fd(),
                                guard.as_ptr().add(at).cast(),
                                want,
                                pos,
                            )
                        }
                    }
                    Dma::OutOfRam => {
                        let guard = slice.ptr_guard();
                        // SAFETY: as above; pwrite only reads the `want` bytes at `at`
                        // inside the live slice.
                        unsafe {
                            libc::pwrite64(
                                file.as_raw_fd(),
                                guard.as_ptr().add(at).cast(),
                                want,
                                pos,
                            )
                        }
                    }
                };
                if n < 0 {
                    let source = std::io::Error::last_os_error();
                    if source.kind() == std::io::ErrorKind::Interrupted {
                        continue;
                    }
                    result = Err(DmaError::Io {
                        gpa,
                        len: len as u64,
                        source,
                    });
                    break;
                }
                if n == 0 {
                    break;
                }
                at += n as usize;
            }
            // Marked after the bytes landed: a collection racing this write sees the page
            // now or at the next collection, never a clean page holding new bytes.
            if dir == Dma::IntoRam {
                self.mark(&slice, at);
            }
            done += at;
            if result.is_err() || at < slice.len() {
                return (done, result);
            }
        }
        (done, Ok(()))
    }

    /// DMA into the guest from a stream (`/dev/urandom`): reads up to `len` bytes of `src`
    /// into RAM at `gpa`, marks them dirty, returns how many.
    pub fn read_from(
        &self,
        gpa: u64,
        len: usize,
        src: &mut impl std::io::Read,
    ) -> Result<usize, DmaError> {
        // Small (entropy requests): a bounce buffer keeps the raw pointer code in one
        // function above.
        let mut buf = vec![0u8; len];
        let n = loop {
            match src.read(&mut buf) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(DmaError::Io {
                        gpa,
                        len: len as u64,
                        source,
                    })
                }
            }
        };
        self.slow_device();
        self.write(gpa, &buf[..n])?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// The seam holds a DMA into the guest until it is opened: nothing lands meanwhile,
    /// and `close_and_wait_held` returns only once a write is held.
    #[test]
    fn a_closed_dma_hold_keeps_the_write_out_until_it_opens() {
        let hold = std::sync::Arc::new(DmaHold::default());
        let r = ram().with_dma_hold(hold.clone());
        assert!(!hold.close_and_wait_held(std::time::Duration::from_millis(10)));
        let writer = {
            let r = r.clone();
            std::thread::spawn(move || r.read_from(0x1000, 16, &mut &[7u8; 16][..]).unwrap())
        };
        assert!(hold.close_and_wait_held(std::time::Duration::from_secs(10)));
        let mut b = [0u8; 16];
        r.read(0x1000, &mut b).unwrap();
        assert_eq!(b, [0; 16], "the held write landed before the hold opened");
        hold.open();
        assert_eq!(writer.join().unwrap(), 16);
        r.read(0x1000, &mut b).unwrap();
        assert_eq!(b, [7; 16]);
    }

    fn ram() -> GuestRam {
        // Two regions with a hole, like the platform's RAM below and above the PCI hole.
        GuestRam::new(
            GuestMemoryMmap::from_ranges(&[
                (GuestAddress(0), 16 << 12),
                (GuestAddress(32 << 12), 16 << 12),
            ])
            .unwrap(),
        )
    }

    fn dirty_pages(ram: &GuestRam) -> Vec<u64> {
        let mut out = vec![];
        for r in ram.logged_memory().iter() {
            let base = r.start_addr().0;
            for p in 0..r.len() / 4096 {
                if r.bitmap().dirty_at((p * 4096) as usize) {
                    out.push(base + p * 4096);
                }
            }
        }
        out
    }

    fn temp_file(bytes: &[u8]) -> File {
        let path = std::env::temp_dir().join(format!(
            "ferry-guest-ram-{}-{}",
            std::process::id(),
            bytes.len()
        ));
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    #[test]
    fn writes_are_logged_page_by_page() {
        let r = ram();
        r.write(0x1ff0, &[1; 0x20]).unwrap();
        r.write_obj(7u32, 0x20_000).unwrap();
        assert_eq!(dirty_pages(&r), vec![0x1000, 0x2000, 0x20_000]);
        let mut b = [0u8; 2];
        r.read(0x1fff, &mut b).unwrap();
        assert_eq!(b, [1, 1]);
        assert_eq!(r.read_obj::<u32>(0x20_000).unwrap(), 7);
    }

    #[test]
    fn file_reads_land_in_ram_and_are_logged() {
        let data: Vec<u8> = (0..3 * 4096).map(|i| (i % 251) as u8).collect();
        let f = temp_file(&data);
        let r = ram();
        assert_eq!(r.read_file_at(0x3000, 8192, &f, 4096).unwrap(), 8192);
        let mut back = vec![0u8; 8192];
        r.read(0x3000, &mut back).unwrap();
        assert_eq!(back, data[4096..]);
        assert_eq!(dirty_pages(&r), vec![0x3000, 0x4000]);
        // Past the end of the file: a short read, only what landed is logged.
        assert_eq!(r.read_file_at(0x8000, 8192, &f, 2 * 4096).unwrap(), 4096);
        assert_eq!(dirty_pages(&r), vec![0x3000, 0x4000, 0x8000]);
    }

    #[test]
    fn the_benchmark_seam_leaves_every_device_write_out_of_the_log() {
        let f = temp_file(&[3; 4096]);
        let r = ram().without_log();
        assert_eq!(r.read_file_at(0x3000, 4096, &f, 0).unwrap(), 4096);
        assert_eq!(r.read_obj::<u8>(0x3fff).unwrap(), 3);
        r.write(0x1000, &[1]).unwrap();
        r.write_obj(2u32, 0x2000).unwrap();
        assert_eq!(r.read_obj::<u32>(0x2000).unwrap(), 2);
        assert_eq!(dirty_pages(&r), Vec::<u64>::new());
    }

    #[test]
    fn used_ring_writes_are_marked_once_per_round() {
        use virtio_queue::{Queue, QueueT};
        let r = ram();
        // virtio-queue's writes through the view are not marked by themselves...
        r.queue_memory()
            .write_obj(5u16, GuestAddress(0x4002))
            .unwrap();
        assert_eq!(dirty_pages(&r), Vec::<u64>::new());
        // ...the round's mark covers the whole used ring: 6 + 8 * 512 bytes from 0x4ffc
        // reach into the second page after it.
        let mut q = Queue::new(512).unwrap();
        q.try_set_used_ring_address(GuestAddress(0x4ffc)).unwrap();
        r.mark_used_ring(&q);
        assert_eq!(dirty_pages(&r), vec![0x4000, 0x5000, 0x6000]);
        // A used ring partly outside RAM: the RAM part is marked, nothing breaks.
        let r = ram();
        q.try_set_used_ring_address(GuestAddress(0xf000)).unwrap();
        r.mark_used_ring(&q);
        assert_eq!(dirty_pages(&r), vec![0xf000]);
    }

    #[test]
    fn ram_goes_to_files_and_nothing_is_logged() {
        let f = temp_file(&[0; 8192]);
        let r = ram();
        r.logged_memory()
            .write_slice(&[9; 4096], GuestAddress(0x5000))
            .unwrap();
        r.logged_memory()
            .iter()
            .for_each(|g| std::ops::Deref::deref(g).bitmap().reset());
        assert_eq!(r.write_file_at(0x5000, 4096, &f, 4096).unwrap(), 4096);
        let mut back = vec![0u8; 4096];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut back, 4096).unwrap();
        assert_eq!(back, vec![9; 4096]);
        assert_eq!(dirty_pages(&r), Vec::<u64>::new());
    }

    #[test]
    fn ranges_outside_ram_are_errors_naming_them() {
        let f = temp_file(&[0; 4096]);
        let r = ram();
        // Into the hole, across the hole, past the end, wrapping.
        for (gpa, len) in [
            (16u64 << 12, 1usize),
            (15 << 12, 2 << 12),
            (48 << 12, 1),
            (u64::MAX - 1, 4),
        ] {
            let e = r.read_file_at(gpa, len, &f, 0).unwrap_err();
            assert!(
                e.to_string().contains(&format!("{gpa:#x}")),
                "{e} names the address"
            );
            assert!(r.write(gpa, &vec![0; len]).is_err());
            assert!(r.write_file_at(gpa, len, &f, 0).is_err());
        }
        assert_eq!(dirty_pages(&r), Vec::<u64>::new(), "nothing half-written");
    }

    #[test]
    fn stream_reads_are_logged() {
        let r = ram();
        let mut src: &[u8] = &[5; 100];
        assert_eq!(r.read_from(0x6000, 4096, &mut src).unwrap(), 100);
        assert_eq!(dirty_pages(&r), vec![0x6000]);
    }
}
