// Copyright 2026 Ferry authors
// SPDX-License-Identifier: Apache-2.0

//! The ioctl backends against the real device nodes. Each test skips, in one printed line,
//! where what it needs is missing: `/dev/iommu`, `/dev/vfio/vfio`, or a VFIO device to use,
//! named by the environment (a test never takes a device on its own):
//! - `FERRY_VFIO_CDEV=/dev/vfio/devices/vfioN`: a device bound to vfio-pci, for iommufd and
//!   device DMA logging;
//! - `FERRY_VFIO_GROUP=/dev/vfio/N`: a viable group, for type1.

use std::fs::OpenOptions;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use vfio_dirty::device_log::{DeviceLog, MigState, Migration};
use vfio_dirty::iommufd::IommufdBackend;
use vfio_dirty::type1::{Type1Backend, DEFAULT_PAGE_SIZE};
use vfio_dirty::{DirtyBackend, DirtyBitmap, DmaTracker, Identity, Range, Scope};

const PAGE: u64 = 4096;
const IOVA: u64 = 0x10_0000;
const RAM_PAGES: usize = 64;

/// `Some("skipped: ...")` naming the first missing node, the env var unset, or the path it
/// names missing.
fn missing(node: &str, env: Option<&str>) -> Option<String> {
    if !Path::new(node).exists() {
        return Some(format!("skipped: {node} is missing"));
    }
    let var = env?;
    match std::env::var(var) {
        Err(_) => Some(format!(
            "skipped: {var} is not set (the VFIO device this test may use)"
        )),
        Ok(p) if !Path::new(&p).exists() => Some(format!("skipped: {p} ({var}) is missing")),
        Ok(_) => None,
    }
}

fn open_rw(path: &str) -> OwnedFd {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {path}: {e}"))
        .into()
}

/// Page-aligned anonymous memory standing in for guest RAM at GPA 0.
struct Ram {
    base: *mut libc::c_void,
    len: usize,
}

impl Ram {
    fn new(pages: usize) -> Ram {
        let len = pages * PAGE as usize;
        // SAFETY: a fresh private anonymous mapping: no address hint, no fd; the result is
        // checked against MAP_FAILED before use.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED, "mmap guest RAM");
        Ram { base, len }
    }

    /// GPA → HVA over `[0, len)`.
    fn gpa_to_hva(&self) -> impl Fn(u64, u64) -> Option<u64> {
        let (base, len) = (self.base as u64, self.len as u64);
        move |gpa, length| (gpa.checked_add(length)? <= len).then_some(base + gpa)
    }
}

impl Drop for Ram {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` are exactly the mapping `new` made, unmapped once, here.
        unsafe { libc::munmap(self.base, self.len) };
    }
}

/// iommufd: IOAS map/unmap; with a device, the whole tracker cycle over an HWPT.
#[test]
fn iommufd_backend() {
    if let Some(m) = missing("/dev/iommu", None) {
        eprintln!("{m}");
        return;
    }
    // Declared first, dropped last: the backend unpins it before it goes.
    let ram = Ram::new(RAM_PAGES);
    let len = ram.len as u64;
    let mut b = IommufdBackend::open(ram.gpa_to_hva()).expect("open /dev/iommu, IOAS_ALLOC");
    b.map(IOVA, len, 0).expect("IOAS_MAP without a device");
    assert_eq!(b.unmap(IOVA, len), Ok(len));
    if let Some(m) = missing("/dev/iommu", Some("FERRY_VFIO_CDEV")) {
        eprintln!("{m}");
        return;
    }
    let cdev = std::env::var("FERRY_VFIO_CDEV").unwrap();
    b.add_device(1, open_rw(&cdev)).expect("BIND_IOMMUFD");
    let caps = b.hw_capabilities(1).expect("GET_HW_INFO");
    eprintln!("{cdev}: out_capabilities {caps:#x}");

    let mut t = DmaTracker::new(b, PAGE);
    let scope = t.add_device(1).expect("HWPT_ALLOC + ATTACH");
    t.map(IOVA, len, 0).expect("map");
    t.start();
    let h = t.harvest(&Identity).expect("harvest");
    match scope {
        Scope::Tracked(_) => assert!(h.errors.is_empty(), "{:?}", h.errors),
        // Rule 4: a device that cannot report makes everything mapped dirty.
        Scope::Unknown(_) => assert!(h.contains(IOVA) && h.contains(IOVA + len - 1)),
    }
    assert_eq!(t.unmap(IOVA, len, &Identity), Ok(len));
    t.stop().expect("stop");
    t.remove_device(1, &Identity).expect("DETACH");
    assert!(t.backend_mut().remove_device(1).is_some());
}

/// Type1: a container, then with a group the whole tracker cycle.
#[test]
fn type1_backend() {
    if let Some(m) = missing("/dev/vfio/vfio", None) {
        eprintln!("{m}");
        return;
    }
    let ram = Ram::new(RAM_PAGES);
    let len = ram.len as u64;
    let mut b = Type1Backend::open(ram.gpa_to_hva()).expect("open container, type1v2");
    if let Some(m) = missing("/dev/vfio/vfio", Some("FERRY_VFIO_GROUP")) {
        eprintln!("{m}");
        return;
    }
    let group = std::env::var("FERRY_VFIO_GROUP").unwrap();
    b.add_group(1, open_rw(&group)).expect("a viable group");
    let mut t = DmaTracker::new(b, DEFAULT_PAGE_SIZE);
    let scope = t.add_device(1).expect("SET_CONTAINER + SET_IOMMU");
    // The tracker's granule must be the container's smallest page (4 KiB on x86 IOMMUs).
    assert_eq!(t.backend().page_size(), DEFAULT_PAGE_SIZE);
    eprintln!("{group}: {scope:?}, {:?}", t.backend().info());
    t.map(IOVA, len, 0).expect("MAP_DMA");
    t.start();
    let h = t.harvest(&Identity).expect("harvest");
    if let Scope::Tracked(_) = scope {
        assert!(h.errors.is_empty(), "{:?}", h.errors);
        // No group declared pinned scope: type1 reports every mapped page dirty.
        assert!(h.contains(IOVA));
    }
    // While tracking, the unmap also returns the range's bits.
    assert_eq!(t.unmap(IOVA, len, &Identity), Ok(len));
    let _ = t.backend_mut().take_unmap_dirty();
    t.stop().expect("DIRTY_PAGES STOP");
    t.remove_device(1, &Identity).expect("UNSET_CONTAINER");
}

/// Device DMA logging and migration state on a cdev bound to an iommufd.
#[test]
fn device_log_and_migration() {
    if let Some(m) = missing("/dev/iommu", Some("FERRY_VFIO_CDEV")) {
        eprintln!("{m}");
        return;
    }
    let ram = Ram::new(RAM_PAGES);
    let len = ram.len as u64;
    let cdev = std::env::var("FERRY_VFIO_CDEV").unwrap();
    let mut b = IommufdBackend::open(ram.gpa_to_hva()).expect("open /dev/iommu");
    b.add_device(1, open_rw(&cdev)).expect("BIND_IOMMUFD");
    let hwpt = b.alloc_domain(1, false).expect("HWPT_ALLOC");
    b.attach(1, hwpt).expect("ATTACH");
    b.map(IOVA, len, 0).expect("IOAS_MAP");
    let fd = b.device_fd(1).unwrap();

    let mut log = DeviceLog::new(fd.as_fd());
    if log.supported().expect("PROBE") {
        let granule = log
            .start(
                PAGE,
                &[Range {
                    start: IOVA,
                    length: len,
                }],
            )
            .expect("DMA_LOGGING_START");
        let mut bm = DirtyBitmap::default();
        bm.prepare(IOVA, len, granule.max(PAGE)).unwrap();
        log.report(&mut bm).expect("DMA_LOGGING_REPORT");
        log.stop().expect("DMA_LOGGING_STOP");
    } else {
        eprintln!("{cdev}: no device DMA logging");
    }

    match Migration::new(fd.as_fd()) {
        Ok(mut m) => {
            assert_eq!(m.state(), MigState::Running, "a freshly opened device runs");
            // Stop and run again: the one round trip that leaves the device as it was.
            assert!(m.step(MigState::Stop).expect("RUNNING -> STOP").is_none());
            assert!(m
                .step(MigState::Running)
                .expect("STOP -> RUNNING")
                .is_none());
            assert_eq!(m.refresh(), Ok(MigState::Running));
        }
        Err(e) => eprintln!("{cdev}: no migration ({e})"),
    }

    assert_eq!(b.unmap(IOVA, len), Ok(len));
    b.detach(1, hwpt).expect("DETACH");
    b.free_domain(hwpt).expect("DESTROY");
    drop(b.remove_device(1));
}
