// Copyright 2026 Ferry authors
// SPDX-License-Identifier: Apache-2.0

//! ferry-dma-device driven over its socket by Ferry's own vfio-user client.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dma_device::device::JobMode;
use dma_device::{listen, Device};
use guest_pattern::user_device::{
    job_generation, DEVICE_ID, REG_ADDR, REG_DOORBELL, REG_GENERATION, REG_JOBS, REG_LEN,
    REG_PAGES, REG_SEED, REG_STATUS, STATUS_BUSY, STATUS_OK, STATUS_STOPPED, STATUS_UNMAPPED,
    VENDOR_ID,
};
use guest_pattern::{check_page, page_matches, PageCheck, PAGE_SIZE};
use vfio_dirty::uapi::{
    VFIO_DEVICE_STATE_RESUMING, VFIO_DEVICE_STATE_RUNNING, VFIO_DEVICE_STATE_STOP,
    VFIO_DEVICE_STATE_STOP_COPY, VFIO_MIGRATION_STOP_COPY,
};
use vfio_dirty::vfio_user::client::{Client, ClientError};
use vfio_dirty::vfio_user::wire::{DMA_MAP_READ, DMA_MAP_WRITE, PCI_CONFIG_REGION};

const PAGE: u64 = PAGE_SIZE as u64;
const RW: u32 = DMA_MAP_READ | DMA_MAP_WRITE;
const TIMEOUT: Duration = Duration::from_secs(10);

/// A socket path of its own for every device of every test.
fn socket_path(what: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!(
        "ferry-dma-device-{}-{what}-{n}.sock",
        std::process::id()
    ))
}

/// A device serving one client on a fresh socket, in a thread; the thread ends when the
/// client goes and removes the socket.
fn device(garbage: Option<u64>) -> (Client, JoinHandle<()>) {
    device_in(JobMode::Sync, garbage)
}

/// [`device`] running its jobs in `mode`.
fn device_in(mode: JobMode, garbage: Option<u64>) -> (Client, JoinHandle<()>) {
    let path = socket_path("t");
    let listener = listen::bind(&path).unwrap();
    let p = path.clone();
    let t = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut dev = Device::with_mode(mode);
        let mut garbage = garbage;
        let _ = listen::serve_client(stream, &mut dev, &mut garbage);
        let _ = std::fs::remove_file(&p);
    });
    (Client::connect(&path, TIMEOUT).unwrap(), t)
}

fn set_state(c: &mut Client, state: u32) -> Result<(), ClientError> {
    c.set_state(state)
}

fn log_start(c: &mut Client, page_size: u64, ranges: &[(u64, u64)]) -> Result<(), ClientError> {
    c.log_start(page_size, ranges)
}

#[test]
fn set_state_reply_decodes() {
    let (mut c, t) = device(None);
    c.set_state(VFIO_DEVICE_STATE_STOP).unwrap();
    c.log_start(4096, &[]).unwrap();
    c.shutdown();
    t.join().unwrap();
}

fn memfd(bytes: u64) -> File {
    // SAFETY: the name is a NUL-terminated literal; the call only creates a file.
    let fd = unsafe { libc::memfd_create(c"ferry-dma-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just created and is owned by nothing else.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(bytes).unwrap();
    f
}

fn w64(c: &mut Client, off: u64, v: u64) {
    c.region_write(0, off, &v.to_le_bytes()).unwrap();
}

fn r64(c: &mut Client, off: u64) -> u64 {
    let mut b = [0u8; 8];
    c.region_read(0, off, &mut b).unwrap();
    u64::from_le_bytes(b)
}

fn status(c: &mut Client) -> u32 {
    let mut b = [0u8; 4];
    c.region_read(0, REG_STATUS, &mut b).unwrap();
    u32::from_le_bytes(b)
}

/// Programs and runs one job; its STATUS.
fn job(c: &mut Client, addr: u64, len: u64, seed: u64) -> u32 {
    w64(c, REG_ADDR, addr);
    // LEN by halves, as a 32-bit driver would.
    c.region_write(0, REG_LEN, &(len as u32).to_le_bytes())
        .unwrap();
    c.region_write(0, REG_LEN + 4, &((len >> 32) as u32).to_le_bytes())
        .unwrap();
    w64(c, REG_SEED, seed);
    c.region_write(0, REG_DOORBELL, &1u32.to_le_bytes())
        .unwrap();
    status(c)
}

/// Which of the file's pages (as DMA addresses, the file mapped at `base`) hold what.
fn page_of(f: &File, index: u64) -> [u8; PAGE_SIZE] {
    let mut b = [0u8; PAGE_SIZE];
    f.read_exact_at(&mut b, index * PAGE).unwrap();
    b
}

fn assert_untouched(f: &File, pages: u64) {
    for p in 0..pages {
        assert!(page_of(f, p).iter().all(|&b| b == 0), "page {p} written");
    }
}

/// The set pages of a report.
fn reported(bitmap: &[u8], iova: u64) -> Vec<u64> {
    (0..bitmap.len() * 8)
        .filter(|i| bitmap[i / 8] & (1 << (i % 8)) != 0)
        .map(|i| iova + i as u64 * PAGE)
        .collect()
}

#[test]
fn a_job_writes_fill_pages_of_its_generation() {
    let (mut c, t) = device(None);
    assert_eq!(c.num_regions, 9);
    assert_eq!(c.num_irqs, 1);
    assert_eq!(c.migration_page_size, Some(4096));
    assert_eq!(c.region_info(0).unwrap().size, 4096);
    assert_eq!(c.region_info(PCI_CONFIG_REGION).unwrap().size, 256);
    assert_eq!(c.region_info(2).unwrap().size, 0);

    let base = 0x1_0000_0000u64;
    let f = memfd(16 * PAGE);
    c.dma_map(base, 16 * PAGE, f.as_raw_fd(), 0, RW).unwrap();
    assert_eq!(job(&mut c, base + 2 * PAGE, 5 * PAGE, 0xfeed), STATUS_OK);
    let g = job_generation(0xfeed, 1);
    assert_eq!(r64(&mut c, REG_GENERATION), g);
    assert_eq!(r64(&mut c, REG_JOBS), 1);
    assert_eq!(r64(&mut c, REG_PAGES), 5);
    for p in 0..16 {
        let page = page_of(&f, p);
        let dma = base + p * PAGE;
        if (2..7).contains(&p) {
            assert!(page_matches(&page, dma, g), "page {p}");
        } else {
            assert_eq!(
                check_page(&page, dma),
                PageCheck::NotWritten { generation: 0 }
            );
        }
    }
    // A second job over part of it: a new generation there only.
    assert_eq!(job(&mut c, base + 6 * PAGE, 2 * PAGE, 0xfeed), STATUS_OK);
    let g2 = job_generation(0xfeed, 2);
    assert_ne!(g, g2);
    assert!(page_matches(&page_of(&f, 5), base + 5 * PAGE, g));
    assert!(page_matches(&page_of(&f, 6), base + 6 * PAGE, g2));
    assert!(page_matches(&page_of(&f, 7), base + 7 * PAGE, g2));
    c.shutdown();
    t.join().unwrap();
}

#[test]
fn logging_reports_exactly_the_written_pages_once() {
    let (mut c, t) = device(None);
    assert!(c.can_log_dma().unwrap());
    let base = 0x8000_0000u64;
    let f = memfd(512 * PAGE);
    c.dma_map(base, 256 * PAGE, f.as_raw_fd(), 0, RW).unwrap();
    c.dma_map(base + 256 * PAGE, 256 * PAGE, f.as_raw_fd(), 256 * PAGE, RW)
        .unwrap();
    // Written before logging: never reported.
    assert_eq!(job(&mut c, base, PAGE, 1), STATUS_OK);
    let err = log_start(&mut c, 8192, &[]).unwrap_err();
    assert_eq!(err.errno(), Some(libc::EINVAL as u32));
    log_start(&mut c, 4096, &[]).unwrap();
    // A job across the two mappings.
    assert_eq!(job(&mut c, base + 250 * PAGE, 10 * PAGE, 2), STATUS_OK);
    assert_eq!(job(&mut c, base + 3 * PAGE, PAGE, 3), STATUS_OK);
    let bitmap = c.log_report(base, 512 * PAGE, PAGE).unwrap();
    assert_eq!(bitmap.len(), 64);
    let mut want: Vec<u64> = (250..260).map(|p| base + p * PAGE).collect();
    want.insert(0, base + 3 * PAGE);
    assert_eq!(reported(&bitmap, base), want);
    // Cleared by the report.
    let bitmap = c.log_report(base, 512 * PAGE, PAGE).unwrap();
    assert_eq!(reported(&bitmap, base), Vec::<u64>::new());
    // Refused jobs write nothing, so log nothing.
    assert_eq!(job(&mut c, base + 600 * PAGE, PAGE, 4), STATUS_UNMAPPED);
    let bitmap = c.log_report(base, 512 * PAGE, PAGE).unwrap();
    assert_eq!(reported(&bitmap, base), Vec::<u64>::new());
    let err = c.log_report(base, 512 * PAGE, 8192).unwrap_err();
    assert_eq!(err.errno(), Some(libc::EINVAL as u32));
    c.log_stop().unwrap();
    let err = c.log_report(base, 512 * PAGE, PAGE).unwrap_err();
    assert_eq!(err.errno(), Some(libc::EINVAL as u32));
    c.shutdown();
    t.join().unwrap();
}

#[test]
fn unmapped_read_only_and_stopped_jobs_write_nothing() {
    let (mut c, t) = device(None);
    let f = memfd(8 * PAGE);
    c.dma_map(0x10_0000, 4 * PAGE, f.as_raw_fd(), 0, RW)
        .unwrap();
    c.dma_map(0x20_0000, 4 * PAGE, f.as_raw_fd(), 4 * PAGE, DMA_MAP_READ)
        .unwrap();
    // Partly outside the mapping.
    assert_eq!(job(&mut c, 0x10_2000, 4 * PAGE, 1), STATUS_UNMAPPED);
    // Read-only mapping.
    assert_eq!(job(&mut c, 0x20_0000, PAGE, 1), STATUS_UNMAPPED);
    // Stopped.
    set_state(&mut c, VFIO_DEVICE_STATE_STOP).unwrap();
    assert_eq!(job(&mut c, 0x10_0000, PAGE, 1), STATUS_STOPPED);
    assert_untouched(&f, 8);
    assert_eq!(r64(&mut c, REG_JOBS), 3);
    assert_eq!(r64(&mut c, REG_PAGES), 0);
    assert_eq!(r64(&mut c, REG_GENERATION), 0);
    // Overlapping maps and unknown unmaps are refused; an exact unmap works.
    let e = c
        .dma_map(0x10_1000, PAGE, f.as_raw_fd(), 0, RW)
        .unwrap_err();
    assert_eq!(e.errno(), Some(libc::EEXIST as u32));
    let e = c.dma_unmap(0x30_0000, PAGE).unwrap_err();
    assert_eq!(e.errno(), Some(libc::ENOENT as u32));
    c.dma_unmap(0x10_0000, 4 * PAGE).unwrap();
    set_state(&mut c, VFIO_DEVICE_STATE_RUNNING).unwrap();
    assert_eq!(job(&mut c, 0x10_0000, PAGE, 1), STATUS_UNMAPPED);
    assert_untouched(&f, 8);
    c.shutdown();
    t.join().unwrap();
}

/// Reads the source's whole state.
fn save(c: &mut Client) -> Vec<u8> {
    let mut blob = Vec::new();
    loop {
        let part = c.mig_data_read(16).unwrap();
        if part.is_empty() {
            return blob;
        }
        assert!(part.len() <= 16);
        blob.extend(part);
    }
}

#[test]
fn migration_round_trip_continues_the_job_count() {
    let (mut src, ts) = device(None);
    let (mut dst, td) = device(None);
    assert_eq!(src.migration_flags().unwrap(), VFIO_MIGRATION_STOP_COPY);
    let f = memfd(4 * PAGE);
    src.dma_map(0x40_0000, 4 * PAGE, f.as_raw_fd(), 0, RW)
        .unwrap();
    assert_eq!(job(&mut src, 0x40_0000, 2 * PAGE, 9), STATUS_OK);
    assert_eq!(job(&mut src, 0x40_0000, 8 * PAGE, 9), STATUS_UNMAPPED);
    assert_eq!(job(&mut src, 0x40_1000, 3 * PAGE, 0x5eed), STATUS_OK);
    src.region_write(PCI_CONFIG_REGION, 0x10, &0xfe00_0000u32.to_le_bytes())
        .unwrap();
    src.region_write(PCI_CONFIG_REGION, 0x04, &6u16.to_le_bytes())
        .unwrap();

    set_state(&mut src, VFIO_DEVICE_STATE_STOP).unwrap();
    set_state(&mut src, VFIO_DEVICE_STATE_STOP_COPY).unwrap();
    let blob = save(&mut src);
    assert_eq!(&blob[..4], b"FDMS");
    set_state(&mut src, VFIO_DEVICE_STATE_STOP).unwrap();

    set_state(&mut dst, VFIO_DEVICE_STATE_STOP).unwrap();
    set_state(&mut dst, VFIO_DEVICE_STATE_RESUMING).unwrap();
    dst.mig_data_write(&blob).unwrap();
    set_state(&mut dst, VFIO_DEVICE_STATE_STOP).unwrap();
    set_state(&mut dst, VFIO_DEVICE_STATE_RUNNING).unwrap();
    assert_eq!(dst.state().unwrap(), VFIO_DEVICE_STATE_RUNNING);

    for off in (0..0x40).step_by(8) {
        assert_eq!(r64(&mut src, off), r64(&mut dst, off), "register {off:#x}");
    }
    let (mut a, mut b) = ([0u8; 256], [0u8; 256]);
    src.region_read(PCI_CONFIG_REGION, 0, &mut a).unwrap();
    dst.region_read(PCI_CONFIG_REGION, 0, &mut b).unwrap();
    assert_eq!(a, b);
    assert_eq!(
        u32::from_le_bytes(b[0x10..0x14].try_into().unwrap()),
        0xfe00_0000
    );

    // The destination maps its own memory; the next job is job 4.
    let g = memfd(4 * PAGE);
    dst.dma_map(0x40_0000, 4 * PAGE, g.as_raw_fd(), 0, RW)
        .unwrap();
    assert_eq!(job(&mut dst, 0x40_0000, PAGE, 0x5eed), STATUS_OK);
    let gen = job_generation(0x5eed, 4);
    assert_eq!(r64(&mut dst, REG_GENERATION), gen);
    assert!(page_matches(&page_of(&g, 0), 0x40_0000, gen));
    assert_eq!(r64(&mut dst, REG_JOBS), 4);
    assert_eq!(r64(&mut dst, REG_PAGES), 6);
    src.shutdown();
    dst.shutdown();
    ts.join().unwrap();
    td.join().unwrap();
}

#[test]
fn malformed_state_blobs_are_refused() {
    let (mut src, ts) = device(None);
    set_state(&mut src, VFIO_DEVICE_STATE_STOP_COPY).unwrap();
    let good = save(&mut src);
    let (mut dst, td) = device(None);
    set_state(&mut dst, VFIO_DEVICE_STATE_STOP).unwrap();
    let mut bad_version = good.clone();
    bad_version[4] = 2;
    let mut bad_magic = good.clone();
    bad_magic[1] = 0;
    let bad: [&[u8]; 5] = [&[], &good[..10], &bad_version, &bad_magic, &[0xff; 66]];
    for blob in bad {
        set_state(&mut dst, VFIO_DEVICE_STATE_RESUMING).unwrap();
        dst.mig_data_write(blob).unwrap();
        let e = set_state(&mut dst, VFIO_DEVICE_STATE_STOP).unwrap_err();
        assert_eq!(e.errno(), Some(libc::EINVAL as u32), "{blob:02x?}");
        assert_eq!(dst.state().unwrap(), VFIO_DEVICE_STATE_RESUMING);
        // Only a good blob leaves RESUMING for STOP; a reset gets out.
        dst.reset().unwrap();
        set_state(&mut dst, VFIO_DEVICE_STATE_STOP).unwrap();
    }
    set_state(&mut dst, VFIO_DEVICE_STATE_RESUMING).unwrap();
    dst.mig_data_write(&good).unwrap();
    set_state(&mut dst, VFIO_DEVICE_STATE_STOP).unwrap();
    src.shutdown();
    dst.shutdown();
    ts.join().unwrap();
    td.join().unwrap();
}

#[test]
fn illegal_state_arcs_are_refused() {
    let (mut c, t) = device(None);
    for s in [VFIO_DEVICE_STATE_RESUMING, 0, 6, 99] {
        let e = set_state(&mut c, s).unwrap_err();
        assert_eq!(e.errno(), Some(libc::EINVAL as u32), "RUNNING -> {s}");
    }
    set_state(&mut c, VFIO_DEVICE_STATE_STOP_COPY).unwrap();
    let e = set_state(&mut c, VFIO_DEVICE_STATE_RUNNING).unwrap_err();
    assert_eq!(e.errno(), Some(libc::EINVAL as u32));
    assert_eq!(c.state().unwrap(), VFIO_DEVICE_STATE_STOP_COPY);
    c.shutdown();
    t.join().unwrap();
}

#[test]
fn garbage_seam_breaks_one_reply() {
    // Two replies (VERSION, DEVICE_GET_INFO) in connect, then garbage.
    let (mut c, t) = device(Some(2));
    match c.region_info(0) {
        Err(ClientError::Conn { .. }) => {}
        r => panic!("expected a broken answer, got {r:?}"),
    }
    c.shutdown();
    t.join().unwrap();
}

struct Server {
    child: Child,
    path: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.path);
    }
}

fn start_binary() -> (Server, Client) {
    let path = socket_path("bin");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferry-dma-device"));
    cmd.arg("--socket")
        .arg(&path)
        .arg("--log-level")
        .arg("debug")
        .stdin(Stdio::null())
        .env_remove(listen::GARBAGE_ENV);
    let server = Server {
        child: cmd.spawn().unwrap(),
        path: path.clone(),
    };
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match Client::connect(&path, TIMEOUT) {
            Ok(c) => return (server, c),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn the_binary_serves_its_config_space_and_takes_a_reconnect() {
    let (server, mut c) = start_binary();
    let mut id = [0u8; 4];
    c.region_read(PCI_CONFIG_REGION, 0, &mut id).unwrap();
    assert_eq!(u16::from_le_bytes([id[0], id[1]]), VENDOR_ID);
    assert_eq!(u16::from_le_bytes([id[2], id[3]]), DEVICE_ID);
    let f = memfd(PAGE);
    c.dma_map(0, PAGE, f.as_raw_fd(), 0, RW).unwrap();
    assert_eq!(job(&mut c, 0, PAGE, 3), STATUS_OK);
    c.shutdown();
    drop(c);
    // The next client finds the registers, not the old mappings.
    let mut c = Client::connect(&server.path, TIMEOUT).unwrap();
    assert_eq!(r64(&mut c, REG_JOBS), 1);
    c.dma_map(0, PAGE, f.as_raw_fd(), 0, RW).unwrap();
    // A second server on the same path is refused.
    let out = Command::new(env!("CARGO_BIN_EXE_ferry-dma-device"))
        .arg("--socket")
        .arg(&server.path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&*server.path.to_string_lossy()), "{err}");
}

#[test]
fn the_binary_refuses_a_path_that_is_not_a_socket() {
    let path = socket_path("file");
    std::fs::write(&path, b"not a socket").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ferry-dma-device"))
        .arg("--socket")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not a socket"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn the_binary_replaces_a_stale_socket_and_honours_the_garbage_seam() {
    let path = socket_path("stale");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferry-dma-device"));
    cmd.arg("--socket").arg(&path).env(listen::GARBAGE_ENV, "3");
    let server = Server {
        child: cmd.spawn().unwrap(),
        path: path.clone(),
    };
    let deadline = Instant::now() + TIMEOUT;
    let mut c = loop {
        match Client::connect(&path, TIMEOUT) {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("{e}"),
        }
    };
    c.region_info(0).unwrap();
    assert!(matches!(c.region_info(0), Err(ClientError::Conn { .. })));
    drop(c);
    // The seam fires once: the next client is served normally.
    let mut c = Client::connect(&path, TIMEOUT).unwrap();
    c.region_info(0).unwrap();
    drop(server);
}

/// Guest RAM as one memfd at guest-physical 0.
struct OneFile(std::os::fd::RawFd, u64);

impl vfio_dirty::vfio_user::log::GuestRamFiles for OneFile {
    fn file_of(&self, gpa: u64, length: u64) -> Option<(std::os::fd::RawFd, u64)> {
        (gpa.checked_add(length)? <= self.1).then_some((self.0, gpa))
    }
}

/// One mapping, IOVA to guest-physical.
struct Linear(u64, u64, u64);

impl vfio_dirty::IovaTranslator for Linear {
    fn translate(&self, iova: u64, length: u64) -> Option<Vec<vfio_dirty::Range>> {
        let Linear(at, gpa, len) = *self;
        (iova >= at && iova + length <= at + len).then(|| {
            vec![vfio_dirty::Range {
                start: gpa + (iova - at),
                length,
            }]
        })
    }
}

/// Rule 6 through Ferry's tracker and the real device: what the device wrote into a
/// mapping is read before the mapping goes, and the next harvest has it where the mapping
/// pointed. With that read skipped (`FERRY_TEST_SKIP_UNMAP_LOG_READ`'s seam) the pages are
/// lost: the harvest comes back without them, and this test says so.
#[test]
fn the_log_is_read_before_a_mapping_goes_and_skipping_it_loses_the_pages() {
    use std::sync::{Arc, Mutex};
    use vfio_dirty::vfio_user::log::UserDeviceLog;
    use vfio_dirty::{DmaTracker, Range};
    for skip in [false, true] {
        let (c, t) = device(None);
        let c = Arc::new(Mutex::new(c));
        let ram = memfd(64 * PAGE);
        let mut log = UserDeviceLog::new(c.clone(), Box::new(OneFile(ram.as_raw_fd(), 64 * PAGE)));
        log.set_skip_unmap_read(skip);
        let mut tracker = DmaTracker::new(log, PAGE);
        tracker.add_device(0).unwrap();
        let (iova, gpa) = (1u64 << 40, 16 * PAGE);
        let window = Linear(iova, gpa, 8 * PAGE);
        tracker.map(iova, 8 * PAGE, gpa).unwrap();
        tracker.start();
        assert_eq!(
            job(&mut c.lock().unwrap(), iova + 2 * PAGE, 2 * PAGE, 7),
            STATUS_OK
        );
        // The guest unmaps the window before the next harvest.
        tracker.unmap(iova, 8 * PAGE, &window).unwrap();
        let h = tracker.harvest(&window).unwrap();
        let want = vec![Range {
            start: gpa + 2 * PAGE,
            length: 2 * PAGE,
        }];
        if skip {
            assert!(h.ranges.is_empty(), "skip: {:?}", h.ranges);
        } else {
            assert_eq!(h.ranges, want, "the pages written before the unmap");
        }
        // The pages are in guest RAM all the same: only the log could say they changed.
        assert!(page_of(&ram, 18).iter().any(|&b| b != 0));
        c.lock().unwrap().shutdown();
        t.join().unwrap();
    }
}

/// A device with asynchronous jobs, `page_delay` between pages.
fn async_device(page_delay: Duration) -> (Client, JoinHandle<()>) {
    device_in(JobMode::Async { page_delay }, None)
}

/// Polls STATUS until it is not BUSY, for at most [`TIMEOUT`]; that status.
fn wait_not_busy(c: &mut Client) -> u32 {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let s = status(c);
        if s != STATUS_BUSY {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "STATUS still BUSY after {TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The pages of `[first, first + n)` of `f` (mapped at DMA address `base`) that do not hold
/// generation `g` (none: all written).
fn all_written(f: &File, base: u64, first: u64, n: u64, g: u64) -> Vec<u64> {
    (first..first + n)
        .filter(|&p| !page_matches(&page_of(f, p), base + p * PAGE, g))
        .collect()
}

#[test]
fn an_async_job_is_busy_then_ok_and_its_pages_are_logged() {
    let (mut c, t) = async_device(Duration::from_millis(5));
    let base = 0x2_0000_0000u64;
    let f = memfd(64 * PAGE);
    c.dma_map(base, 64 * PAGE, f.as_raw_fd(), 0, RW).unwrap();
    log_start(&mut c, 4096, &[]).unwrap();
    assert_eq!(job(&mut c, base + 8 * PAGE, 32 * PAGE, 0xa5), STATUS_BUSY);
    // A doorbell while BUSY is ignored: not counted, no second job.
    assert_eq!(job(&mut c, base, PAGE, 0x5a), STATUS_BUSY);
    assert_eq!(r64(&mut c, REG_JOBS), 1);
    // Reports while it runs and after it has ended add up to exactly its pages.
    let mut seen = reported(&c.log_report(base, 64 * PAGE, PAGE).unwrap(), base);
    assert_eq!(wait_not_busy(&mut c), STATUS_OK);
    seen.extend(reported(
        &c.log_report(base, 64 * PAGE, PAGE).unwrap(),
        base,
    ));
    seen.sort_unstable();
    let want: Vec<u64> = (8..40).map(|p| base + p * PAGE).collect();
    assert_eq!(seen, want);
    let g = job_generation(0xa5, 1);
    assert_eq!(r64(&mut c, REG_GENERATION), g);
    assert_eq!(r64(&mut c, REG_PAGES), 32);
    assert_eq!(r64(&mut c, REG_JOBS), 1);
    assert_eq!(all_written(&f, base, 8, 32, g), Vec::<u64>::new());
    assert_untouched(&f, 8);
    // A refused job ends at once, never BUSY; the next accepted one is job 3 (one page,
    // no delay before it: it may be over by the time STATUS is read).
    assert_eq!(job(&mut c, base + 64 * PAGE, PAGE, 1), STATUS_UNMAPPED);
    assert!(matches!(
        job(&mut c, base, PAGE, 1),
        STATUS_BUSY | STATUS_OK
    ));
    assert_eq!(wait_not_busy(&mut c), STATUS_OK);
    assert_eq!(r64(&mut c, REG_GENERATION), job_generation(1, 3));
    c.shutdown();
    t.join().unwrap();
}

/// The point of the asynchronous mode: a job still running when the device is told to
/// STOP ends before the reply, and nothing is written after it.
#[test]
fn stop_during_a_long_job_answers_after_its_last_page() {
    let delay = Duration::from_millis(30);
    let (mut c, t) = async_device(delay);
    let base = 0x10_0000u64;
    let f = memfd(16 * PAGE);
    c.dma_map(base, 16 * PAGE, f.as_raw_fd(), 0, RW).unwrap();
    log_start(&mut c, 4096, &[]).unwrap();
    let t0 = Instant::now();
    assert_eq!(job(&mut c, base, 16 * PAGE, 0x77), STATUS_BUSY);
    let g = job_generation(0x77, 1);
    // The job is still running: not every page has been written yet.
    assert!(!all_written(&f, base, 0, 16, g).is_empty());
    set_state(&mut c, VFIO_DEVICE_STATE_STOP).unwrap();
    // Right after the STOP reply every page of the job holds the new pattern.
    assert_eq!(all_written(&f, base, 0, 16, g), Vec::<u64>::new());
    assert!(t0.elapsed() >= delay * 15, "STOP answered early");
    assert_eq!(status(&mut c), STATUS_OK);
    assert_eq!(r64(&mut c, REG_PAGES), 16);
    assert_eq!(r64(&mut c, REG_GENERATION), g);
    // The final harvest, after STOP, has every page.
    let want: Vec<u64> = (0..16).map(|p| base + p * PAGE).collect();
    assert_eq!(
        reported(&c.log_report(base, 16 * PAGE, PAGE).unwrap(), base),
        want
    );
    // Stopped: a new job is refused at once and the memory stays as it is.
    let before: Vec<_> = (0..16).map(|p| page_of(&f, p)).collect();
    assert_eq!(job(&mut c, base, PAGE, 1), STATUS_STOPPED);
    std::thread::sleep(delay * 2);
    assert!((0..16).all(|p| page_of(&f, p) == before[p as usize]));
    // The saved state holds the finished job (STATUS: the refused one's STOPPED).
    set_state(&mut c, VFIO_DEVICE_STATE_STOP_COPY).unwrap();
    let blob = save(&mut c);
    assert_eq!(&blob[32..36], &STATUS_STOPPED.to_le_bytes());
    assert_eq!(&blob[36..44], &g.to_le_bytes());
    assert_eq!(&blob[52..60], &16u64.to_le_bytes());
    c.shutdown();
    t.join().unwrap();
}

#[test]
fn unmap_during_a_job_waits_for_it() {
    let delay = Duration::from_millis(20);
    let (mut c, t) = async_device(delay);
    let base = 0x10_0000u64;
    let f = memfd(8 * PAGE);
    c.dma_map(base, 8 * PAGE, f.as_raw_fd(), 0, RW).unwrap();
    assert_eq!(job(&mut c, base, 8 * PAGE, 0x33), STATUS_BUSY);
    let g = job_generation(0x33, 1);
    c.dma_unmap(base, 8 * PAGE).unwrap();
    // The unmap answered after the job's last page, written through the mapping.
    assert_eq!(all_written(&f, base, 0, 8, g), Vec::<u64>::new());
    assert_eq!(status(&mut c), STATUS_OK);
    assert_eq!(r64(&mut c, REG_PAGES), 8);
    assert_eq!(job(&mut c, base, PAGE, 1), STATUS_UNMAPPED);
    // Reset waits the same way.
    c.dma_map(base, 8 * PAGE, f.as_raw_fd(), 0, RW).unwrap();
    assert_eq!(job(&mut c, base, 4 * PAGE, 0x44), STATUS_BUSY);
    c.reset().unwrap();
    assert_eq!(
        all_written(&f, base, 0, 4, job_generation(0x44, 3)),
        Vec::<u64>::new()
    );
    assert_eq!(r64(&mut c, REG_JOBS), 0);
    assert_eq!(status(&mut c), STATUS_OK);
    c.shutdown();
    t.join().unwrap();
}

#[test]
fn the_binary_takes_async_jobs_and_refuses_a_delay_without_them() {
    let path = socket_path("async");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferry-dma-device"));
    cmd.arg("--socket")
        .arg(&path)
        .args(["--async-jobs", "--page-delay-us", "50000"])
        .stdin(Stdio::null())
        .env_remove(listen::GARBAGE_ENV);
    let server = Server {
        child: cmd.spawn().unwrap(),
        path: path.clone(),
    };
    let deadline = Instant::now() + TIMEOUT;
    let mut c = loop {
        match Client::connect(&path, TIMEOUT) {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("{e}"),
        }
    };
    let f = memfd(4 * PAGE);
    c.dma_map(0, 4 * PAGE, f.as_raw_fd(), 0, RW).unwrap();
    assert_eq!(job(&mut c, 0, 4 * PAGE, 3), STATUS_BUSY);
    assert_eq!(wait_not_busy(&mut c), STATUS_OK);
    assert_eq!(
        all_written(&f, 0, 0, 4, job_generation(3, 1)),
        Vec::<u64>::new()
    );
    drop(c);
    drop(server);
    let out = Command::new(env!("CARGO_BIN_EXE_ferry-dma-device"))
        .arg("--socket")
        .arg(socket_path("nodelay"))
        .args(["--page-delay-us", "5"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--async-jobs"), "{err}");
}
