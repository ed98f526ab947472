//! Postcopy on the destination: guest RAM watched with userfaultfd (MISSING mode), so
//! that whoever touches a page not here yet waits for it — a vCPU (KVM resolves its own
//! guest-memory accesses through the same fault path), a device model writing or reading
//! guest RAM through `devices::guest_ram`, or the kernel copying to or from it for a
//! system call. Pages arrive with `UFFDIO_COPY`, which places a whole page at once and
//! wakes its waiters; nobody ever sees a half-written page.
//!
//! The descriptor comes from `/dev/userfaultfd` (or the `userfaultfd` system call), never
//! with `UFFD_USER_MODE_ONLY`: KVM's faults are kernel-mode faults, which that mode
//! refuses (a vCPU touching such a page fails KVM_RUN instead of waiting).

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vm_migration::engine::HookResult;
use vm_migration::PostcopyRam;

use crate::memory::GuestMemoryMmap;

const PAGE: u64 = 4096;

// The userfaultfd UAPI (linux/userfaultfd.h): ioctl numbers for x86-64 and the layouts
// they take.
const UFFD_API: u64 = 0xaa;
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
const UFFDIO_UNREGISTER: libc::c_ulong = 0x8010_aa01;
const UFFDIO_WAKE: libc::c_ulong = 0x8010_aa02;
const UFFDIO_COPY: libc::c_ulong = 0xc028_aa03;
const UFFDIO_ZEROPAGE: libc::c_ulong = 0xc020_aa04;
const USERFAULTFD_IOC_NEW: libc::c_ulong = 0xaa00;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// `struct uffd_msg`: 32 bytes, the event first, a page fault's address at byte 16.
#[repr(C)]
struct UffdMsg {
    event: u8,
    _reserved: [u8; 7],
    flags: u64,
    address: u64,
    _rest: u64,
}

/// Why postcopy cannot watch guest RAM here.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    #[error("no userfaultfd: /dev/userfaultfd: {dev}; userfaultfd(2): {syscall}")]
    Unavailable { dev: io::Error, syscall: io::Error },
    #[error("userfaultfd {op} failed: {source}")]
    Ioctl {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("guest range {gpa:#x}+{len:#x} is not RAM")]
    NotRam { gpa: u64, len: u64 },
}

impl From<UffdError> for String {
    fn from(e: UffdError) -> String {
        e.to_string()
    }
}

/// A new userfaultfd (non-blocking, close-on-exec) that also catches the kernel's faults.
fn open_uffd() -> Result<OwnedFd, UffdError> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    let dev = match OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
    {
        Ok(dev) => {
            // SAFETY: USERFAULTFD_IOC_NEW takes its flags by value and returns a new fd.
            let fd = unsafe {
                libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW, flags as libc::c_ulong)
            };
            if fd >= 0 {
                // SAFETY: a descriptor the kernel just created for us alone.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
            io::Error::last_os_error()
        }
        Err(e) => e,
    };
    // SAFETY: userfaultfd takes its flags by value and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags as libc::c_long) };
    if fd >= 0 {
        // SAFETY: as above.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    }
    Err(UffdError::Unavailable {
        dev,
        syscall: io::Error::last_os_error(),
    })
}

/// Watched RAM of VMs whose postcopy broke off: kept open for the life of the process.
/// Closing a userfaultfd wakes whoever waits on it into an ordinary fault, which on
/// anonymous memory maps a zero page: the guest would go on with zeros where its data
/// should be. Kept, the waiters wait (the VM stays paused) until the process ends.
static KEPT: std::sync::Mutex<Vec<std::sync::Arc<UffdRam>>> = std::sync::Mutex::new(Vec::new());

/// Keeps `ram` watched until the process ends (see [`KEPT`]).
pub fn keep_for_good(ram: std::sync::Arc<UffdRam>) {
    KEPT.lock().unwrap_or_else(|p| p.into_inner()).push(ram);
}

/// Whether this host lets postcopy watch guest RAM (a userfaultfd can be made).
pub fn available() -> bool {
    match open_uffd() {
        Ok(_) => true,
        Err(e) => {
            log::info!("postcopy unavailable: {e}");
            false
        }
    }
}

/// One guest RAM region as the fault handler sees it.
struct Region {
    gpa: u64,
    len: u64,
    host: u64,
    /// Backed by a file (shared memory): dropping pages punches holes in it.
    shared: bool,
}

/// Guest RAM under userfaultfd for postcopy (see the module comment).
pub struct UffdRam {
    uffd: OwnedFd,
    regions: Vec<Region>,
    armed: AtomicBool,
    /// Keeps the mappings `regions` points into alive.
    _mem: GuestMemoryMmap,
}

impl UffdRam {
    pub fn new(mem: &GuestMemoryMmap) -> Result<UffdRam, UffdError> {
        let uffd = open_uffd()?;
        let mut api = UffdioApi {
            api: UFFD_API,
            features: 0,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes the struct it is given, which lives here.
        let rc = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_API, &mut api) };
        if rc != 0 {
            return Err(UffdError::Ioctl {
                op: "UFFDIO_API",
                source: io::Error::last_os_error(),
            });
        }
        let regions = mem
            .iter()
            .map(|r| Region {
                gpa: r.start_addr().0,
                len: r.len(),
                host: r.as_ptr() as u64,
                shared: r.file_offset().is_some(),
            })
            .collect();
        Ok(UffdRam {
            uffd,
            regions,
            armed: AtomicBool::new(false),
            _mem: mem.clone(),
        })
    }

    /// The host address of `pages` pages at `gpa`, all inside one region.
    fn host(&self, gpa: u64, pages: u64) -> Result<(u64, &Region), UffdError> {
        let len = pages.saturating_mul(PAGE);
        self.regions
            .iter()
            .find(|r| gpa >= r.gpa && gpa.saturating_add(len) <= r.gpa + r.len)
            .map(|r| (r.host + (gpa - r.gpa), r))
            .ok_or(UffdError::NotRam { gpa, len })
    }

    fn gpa_of(&self, host: u64) -> Option<u64> {
        self.regions
            .iter()
            .find(|r| host >= r.host && host < r.host + r.len)
            .map(|r| r.gpa + (host - r.host))
    }

    /// Places `len` bytes at `host` (guest address `gpa`) with as few calls as it can:
    /// `call(offset, len)` runs `UFFDIO_COPY` or `UFFDIO_ZEROPAGE` on the rest and returns
    /// the ioctl's result, the count it wrote back (bytes done, or a negative errno) and
    /// the error. A page already there (`EEXIST`) has its waiters woken and is skipped;
    /// a partial result goes on from where it stopped. One call per run (per 2 MiB of it)
    /// rather than per page: a system call costs microseconds on this host, and 1 MiB per
    /// `UFFDIO_COPY` placed a page in 3.4-4.6 us where page by page took 9.9 us.
    fn place_run(
        &self,
        what: &str,
        gpa: u64,
        host: u64,
        len: u64,
        mut call: impl FnMut(u64, u64) -> (libc::c_int, i64, io::Error),
    ) -> HookResult<()> {
        // EAGAIN with nothing done (the address space changing under the call) is retried
        // this many times in a row before it counts as a failure.
        const MAX_RETRIES: u32 = 1000;
        let mut done = 0u64;
        let mut retries = 0;
        while done < len {
            // Never across a 2 MiB boundary of host addresses: the prefault helper's
            // huge-page stretches split RAM's mapping there, and userfaultfd places
            // nothing across a split (ENOENT).
            let step = (len - done).min(to_huge_boundary(host + done));
            let (rc, count, e) = call(done, step);
            if rc == 0 {
                done += step;
                retries = 0;
                continue;
            }
            if count > 0 {
                done += (count as u64).min(len - done);
                retries = 0;
                continue;
            }
            match e.raw_os_error() {
                Some(libc::EEXIST) => {
                    self.range_ioctl("UFFDIO_WAKE", UFFDIO_WAKE, host + done, PAGE)?;
                    done += PAGE;
                }
                Some(libc::EAGAIN) if retries < MAX_RETRIES => retries += 1,
                _ => return Err(format!("placing {what} at {:#x}: {e}", gpa + done)),
            }
        }
        Ok(())
    }

    fn range_ioctl(
        &self,
        op: &'static str,
        nr: libc::c_ulong,
        start: u64,
        len: u64,
    ) -> Result<(), UffdError> {
        let mut range = UffdioRange { start, len };
        // SAFETY: these ioctls read a range (of our own mapping) from the struct given.
        let rc = unsafe { libc::ioctl(self.uffd.as_raw_fd(), nr, &mut range) };
        if rc != 0 {
            return Err(UffdError::Ioctl {
                op,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

/// Bytes from host address `host` to the next boundary where guest RAM's mapping may be
/// split ([`crate::memory::HUGE_PAGE`]).
fn to_huge_boundary(host: u64) -> u64 {
    const HUGE: u64 = crate::memory::HUGE_PAGE as u64;
    HUGE - host % HUGE
}

impl PostcopyRam for UffdRam {
    fn discard(&self, gpa: u64, pages: u64) -> HookResult<()> {
        let (host, region) = self.host(gpa, pages)?;
        // Shared memory keeps its pages in the file: punch them out of it (MADV_REMOVE),
        // or the next touch would find the old data there and never fault.
        let advice = if region.shared {
            libc::MADV_REMOVE
        } else {
            libc::MADV_DONTNEED
        };
        // SAFETY: a page range inside guest RAM, which the VM does not run on yet; the
        // pages read as zeros (and fault under userfaultfd) afterwards.
        let rc =
            unsafe { libc::madvise(host as *mut libc::c_void, (pages * PAGE) as usize, advice) };
        if rc != 0 {
            return Err(format!(
                "dropping {pages} pages at {gpa:#x}: {}",
                io::Error::last_os_error()
            ));
        }
        Ok(())
    }

    fn arm(&self) -> HookResult<()> {
        for r in &self.regions {
            let mut reg = UffdioRegister {
                range: UffdioRange {
                    start: r.host,
                    len: r.len,
                },
                mode: UFFDIO_REGISTER_MODE_MISSING,
                ioctls: 0,
            };
            // SAFETY: registers our own guest RAM mapping; the struct lives here.
            let rc = unsafe { libc::ioctl(self.uffd.as_raw_fd(), UFFDIO_REGISTER, &mut reg) };
            if rc != 0 {
                return Err(UffdError::Ioctl {
                    op: "UFFDIO_REGISTER",
                    source: io::Error::last_os_error(),
                }
                .into());
            }
        }
        self.armed.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn next_fault(&self, timeout: Duration) -> HookResult<Option<u64>> {
        let readable = super::transport::wait_readable(self.uffd.as_raw_fd(), timeout)
            .map_err(|e| format!("waiting for guest page faults: {e}"))?;
        if !readable {
            return Ok(None);
        }
        let mut msg = std::mem::MaybeUninit::<UffdMsg>::zeroed();
        // SAFETY: reads at most one `uffd_msg` (32 bytes) into memory of that size.
        let got = unsafe {
            libc::read(
                self.uffd.as_raw_fd(),
                msg.as_mut_ptr().cast(),
                std::mem::size_of::<UffdMsg>(),
            )
        };
        if got < 0 {
            let e = io::Error::last_os_error();
            // Another reader took it, or the fault went away: nothing to do.
            return if e.kind() == io::ErrorKind::WouldBlock {
                Ok(None)
            } else {
                Err(format!("reading a guest page fault: {e}"))
            };
        }
        if got as usize != std::mem::size_of::<UffdMsg>() {
            return Err(format!("short userfaultfd message: {got} bytes"));
        }
        // SAFETY: the kernel filled the whole message (checked above); zeroed before.
        let msg = unsafe { msg.assume_init() };
        if msg.event != UFFD_EVENT_PAGEFAULT {
            return Ok(None);
        }
        let _ = msg.flags;
        match self.gpa_of(msg.address) {
            Some(gpa) => Ok(Some(gpa & !(PAGE - 1))),
            None => Err(format!(
                "a page fault at host address {:#x}, outside guest RAM",
                msg.address
            )),
        }
    }

    fn place(&self, gpa: u64, data: &[u8]) -> HookResult<()> {
        let pages = data.len() as u64 / PAGE;
        let (host, _) = self.host(gpa, pages)?;
        if !self.armed.load(Ordering::SeqCst) {
            return Err("postcopy: pages placed before guest RAM was watched".into());
        }
        self.place_run("a page", gpa, host, pages * PAGE, |off, len| {
            let mut copy = UffdioCopy {
                dst: host + off,
                src: data[off as usize..].as_ptr() as u64,
                len,
                mode: 0,
                copy: 0,
            };
            // SAFETY: copies `len` bytes of `data` (ours, `off + len` within it) into
            // registered pages of guest RAM, atomically per page, and wakes their
            // waiters; the struct lives here.
            let rc = unsafe { libc::ioctl(self.uffd.as_raw_fd(), UFFDIO_COPY, &mut copy) };
            (rc, copy.copy, io::Error::last_os_error())
        })
    }

    fn place_zero(&self, gpa: u64, pages: u64) -> HookResult<()> {
        let (host, _) = self.host(gpa, pages)?;
        self.place_run("a zero page", gpa, host, pages * PAGE, |off, len| {
            let mut z = UffdioZeropage {
                range: UffdioRange {
                    start: host + off,
                    len,
                },
                mode: 0,
                zeropage: 0,
            };
            // SAFETY: maps the zero page at registered pages of guest RAM and wakes their
            // waiters; the struct lives here.
            let rc = unsafe { libc::ioctl(self.uffd.as_raw_fd(), UFFDIO_ZEROPAGE, &mut z) };
            (rc, z.zeropage, io::Error::last_os_error())
        })
    }

    fn disarm(&self) -> HookResult<()> {
        if !self.armed.swap(false, Ordering::SeqCst) {
            return Ok(());
        }
        for r in &self.regions {
            self.range_ioctl("UFFDIO_UNREGISTER", UFFDIO_UNREGISTER, r.host, r.len)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    /// `size` bytes of guest RAM and their `UffdRam`; `None` (the test skips) on a host
    /// without userfaultfd.
    fn watched_ram(size: usize) -> Option<(GuestMemoryMmap, UffdRam)> {
        if !available() {
            eprintln!("skipped: no userfaultfd on this host");
            return None;
        }
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap();
        let ram = UffdRam::new(&mem).unwrap();
        Some((mem, ram))
    }

    /// One `UFFDIO_COPY` per run: pages already there are skipped, the rest placed.
    #[test]
    fn a_run_is_placed_whole_around_pages_already_there() {
        let Some((mem, ram)) = watched_ram(16 * PAGE as usize) else {
            return;
        };
        ram.discard(0, 16).unwrap();
        ram.arm().unwrap();
        // Pages 2 and 5 are there first: a run over them places the rest around them.
        ram.place(2 * PAGE, &[2u8; 4096]).unwrap();
        ram.place_zero(5 * PAGE, 1).unwrap();
        let run: Vec<u8> = (0..8u8).flat_map(|p| [0x40 + p; 4096]).collect();
        ram.place(0, &run).unwrap();
        ram.place_zero(8 * PAGE, 8).unwrap();
        ram.place_zero(8 * PAGE, 8).unwrap();
        let mut all = vec![0u8; 16 * PAGE as usize];
        mem.read_slice(&mut all, GuestAddress(0)).unwrap();
        for p in 0..16usize {
            let want = match p {
                2 => 2,
                5 => 0,
                0..=7 => 0x40 + p as u8,
                _ => 0,
            };
            let page = &all[p * 4096..(p + 1) * 4096];
            assert!(
                page.iter().all(|&b| b == want),
                "page {p}: {:?}..",
                &page[..4]
            );
        }
        ram.disarm().unwrap();
    }

    /// The prefault helper's huge-page stretches split RAM's mapping at 2 MiB boundaries,
    /// and `UFFDIO_COPY` across a split fails (ENOENT): a run over one is placed whole.
    #[test]
    fn a_run_across_a_split_of_the_mapping_is_placed() {
        const M2: usize = crate::memory::HUGE_PAGE;
        let Some((mem, ram)) = watched_ram(4 * M2) else {
            return;
        };
        let asked = crate::memory::advise_huge_pages_within(&mem, M2 as u64, 2 * M2);
        assert!(asked > 0, "no 2 MiB stretch inside 4 MiB at 2 MiB");
        let pages = (4 * M2) as u64 / PAGE;
        ram.discard(0, pages).unwrap();
        ram.arm().unwrap();
        let run: Vec<u8> = (0..pages)
            .flat_map(|p| [(p % 251) as u8 + 1; 4096])
            .collect();
        ram.place(0, &run).unwrap();
        let mut all = vec![0u8; 4 * M2];
        mem.read_slice(&mut all, GuestAddress(0)).unwrap();
        let bad = (0..pages as usize)
            .find(|&p| all[p * 4096..(p + 1) * 4096] != run[p * 4096..(p + 1) * 4096]);
        assert_eq!(bad, None, "page placed wrong");
        ram.disarm().unwrap();
    }

    /// A thread reading guest RAM through the VMM's own accessor (as a device model's DMA
    /// does) waits for a page that is not there yet, and reads it once it is placed.
    #[test]
    fn a_vmm_read_of_a_missing_page_waits_until_it_is_placed() {
        let Some((mem, ram)) = watched_ram(16 * PAGE as usize) else {
            return;
        };
        mem.write_slice(&[7u8; 4096], GuestAddress(3 * PAGE))
            .unwrap();
        ram.discard(3 * PAGE, 1).unwrap();
        ram.arm().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let m = mem.clone();
        let reader = std::thread::spawn(move || {
            let mut b = [0u8; 16];
            m.read_slice(&mut b, GuestAddress(3 * PAGE + 8)).unwrap();
            tx.send(b).unwrap();
        });
        let gpa = ram
            .next_fault(Duration::from_secs(5))
            .unwrap()
            .expect("no fault reported within 5 s");
        assert_eq!(gpa, 3 * PAGE);
        assert!(
            rx.recv_timeout(Duration::from_millis(200)).is_err(),
            "the read went on before its page was placed"
        );
        ram.place(3 * PAGE, &[9u8; 4096]).unwrap();
        let b = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the read never went on");
        assert_eq!(b, [9u8; 16]);
        reader.join().unwrap();
        // A page placed twice stays as first placed; the zero placement of a present page
        // is no error either.
        ram.place(3 * PAGE, &[1u8; 4096]).unwrap();
        ram.place_zero(3 * PAGE, 1).unwrap();
        let mut b = [0u8; 4];
        mem.read_slice(&mut b, GuestAddress(3 * PAGE)).unwrap();
        assert_eq!(b, [9u8; 4]);
        ram.disarm().unwrap();
    }
}
