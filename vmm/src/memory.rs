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
/// Bytes faulted in per madvise call, so a stop request is seen quickly.
const POPULATE_STEP: usize = 64 << 20;

/// Faults guest RAM in on a thread of its own, while a migration fills it: a fault per
/// page taken while receiving costs an exit to the outer hypervisor on a nested host,
/// and one madvise per 64 MiB is far cheaper. Faulting a page in never changes its
/// contents, so racing the receiver's writes is harmless.
pub struct Populator {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Populator {
    /// Starts faulting in every region of `mem`. `mem` must outlive the populator (the
    /// owner drops the populator first; its Drop joins the thread).
    pub fn start(mem: &GuestMemoryMmap) -> Populator {
        use std::sync::atomic::{AtomicBool, Ordering};
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        let ranges: Vec<(usize, usize)> = mem
            .iter()
            .map(|r| (r.as_ptr() as usize, r.len() as usize))
            .collect();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("populate".into())
            .spawn(move || {
                let t = std::time::Instant::now();
                for (base, len) in ranges {
                    let mut off = 0;
                    while off < len && !flag.load(Ordering::Relaxed) {
                        let n = POPULATE_STEP.min(len - off);
                        // SAFETY: a sub-range of a live guest RAM mapping (the owner joins
                        // this thread before unmapping); MADV_POPULATE_WRITE only faults
                        // pages in and changes no contents.
                        let rc = unsafe {
                            libc::madvise((base + off) as *mut libc::c_void, n, MADV_POPULATE_WRITE)
                        };
                        if rc != 0 {
                            // Older kernels lack it: pages fault in on first write.
                            return;
                        }
                        off += n;
                    }
                }
                log::info!("guest RAM faulted in after {:?}", t.elapsed());
            })
            .ok();
        Populator { stop, thread }
    }
}

impl Drop for Populator {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
