// Copyright 2026 Ferry authors
// SPDX-License-Identifier: Apache-2.0

//! What one harvest of a vfio-user device's DMA log costs against the size of what is
//! mapped for it, read the way Ferry reads it at every pass of a migration:
//! `vfio_dirty::DmaTracker::<UserDeviceLog>::harvest`, i.e. DMA_LOGGING_REPORT requests
//! of at most one message's bitmap each, over the socket, decoded into GPA ranges.
//!
//! The real device model (`dma_device::Device`) serves on a UNIX socket from a thread of
//! this process (as `dma_device/tests/device.rs` does); the client maps one memfd region
//! of S bytes (sparse: a 4 GiB region costs nothing until written), starts logging, has
//! the device write a fraction of the region's pages through its doorbell registers
//! (untimed: none; 1 %, every 100th page, one-page jobs; 100 %, every page, in jobs of
//! the largest size, 1 MiB), then times one harvest. After each 64 MiB of writes the
//! written pages are punched out of the memfd again, so that a 4 GiB region written
//! whole never holds more than 64 MiB of RAM (the device's log keeps its bits). The
//! pages a harvest finds must be exactly the pages written: asserted.
//!
//! Run: `cargo bench -p dma_device --bench log_harvest [-- --sizes 64M,256M,1G,4G]
//! [--reps N] [--save PATH]` (part of `scripts/dev_cli.sh bench vfio-user`). Prints a
//! table; `--save` writes the rows as JSON.

use std::cell::Cell;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dma_device::{listen, Device};
use guest_pattern::user_device::{
    MAX_JOB_BYTES, REG_ADDR, REG_DOORBELL, REG_LEN, REG_SEED, REG_STATUS, STATUS_OK,
};
use vfio_dirty::vfio_user::client::Client;
use vfio_dirty::vfio_user::log::{GuestRamFiles, UserDeviceLog};
use vfio_dirty::{DmaTracker, Identity, Scope};

const PAGE: u64 = 4096;
const GIB: f64 = (1u64 << 30) as f64;
/// Written pages are punched out of the memfd after this many bytes of jobs.
const PUNCH_EVERY: u64 = 64 << 20;

/// Best of `reps` timed runs of `f` (each after its untimed `prepare`), in ns: the
/// machine is shared, the minimum is the cost. Also returns every run's time.
fn best_of<T>(
    reps: u32,
    mut prepare: impl FnMut(),
    mut f: impl FnMut() -> T,
    mut check: impl FnMut(T),
) -> (f64, Vec<f64>) {
    let mut all = Vec::new();
    for _ in 0..reps {
        prepare();
        let t = Instant::now();
        let r = f();
        all.push(t.elapsed().as_nanos() as f64);
        check(r);
    }
    (all.iter().copied().fold(f64::INFINITY, f64::min), all)
}

fn memfd(bytes: u64) -> std::io::Result<File> {
    // SAFETY: the name is a NUL-terminated literal; the call only creates a file.
    let fd = unsafe { libc::memfd_create(c"ferry-harvest-bench".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(bytes)?;
    Ok(f)
}

/// Frees the memfd's pages in `[off, off + len)` (reads as zeros again).
fn punch(f: &File, off: u64, len: u64) {
    // SAFETY: fallocate on a descriptor this function borrows; no memory is passed.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off as libc::off_t,
            len as libc::off_t,
        )
    };
    assert_eq!(
        r,
        0,
        "punching the memfd: {}",
        std::io::Error::last_os_error()
    );
}

/// Guest RAM: the one memfd, at guest-physical 0.
struct OneFile(RawFd, u64);

impl GuestRamFiles for OneFile {
    fn file_of(&self, gpa: u64, length: u64) -> Option<(RawFd, u64)> {
        (gpa.checked_add(length)? <= self.1).then_some((self.0, gpa))
    }
}

/// The device model serving one client on a fresh socket, in a thread.
fn device() -> (Arc<Mutex<Client>>, JoinHandle<()>, PathBuf) {
    let path =
        std::env::temp_dir().join(format!("ferry-harvest-bench-{}.sock", std::process::id()));
    let listener = listen::bind(&path).expect("bind the device's socket");
    let t = std::thread::spawn(move || {
        let (stream, _) = listener.accept().expect("accept");
        let mut dev = Device::new();
        let _ = listen::serve_client(stream, &mut dev, &mut None);
    });
    let c = Client::connect(&path, Duration::from_secs(10)).expect("connect to the device");
    (Arc::new(Mutex::new(c)), t, path)
}

fn w64(c: &mut Client, off: u64, v: u64) {
    c.region_write(0, off, &v.to_le_bytes()).unwrap();
}

/// Runs jobs of `len` bytes at every address of `addrs` (seed and length set once),
/// punching out what was written every [`PUNCH_EVERY`] bytes. Returns the pages written.
fn run_jobs(c: &mut Client, f: &File, addrs: impl Iterator<Item = u64>, len: u64) -> u64 {
    w64(c, REG_LEN, len);
    w64(c, REG_SEED, 0x5eed);
    let (mut pages, mut since, mut punch_from) = (0, 0, 0);
    for a in addrs {
        w64(c, REG_ADDR, a);
        c.region_write(0, REG_DOORBELL, &1u32.to_le_bytes())
            .unwrap();
        let mut s = [0u8; 4];
        c.region_read(0, REG_STATUS, &mut s).unwrap();
        assert_eq!(u32::from_le_bytes(s), STATUS_OK, "job at {a:#x}");
        pages += len / PAGE;
        since += len;
        if since >= PUNCH_EVERY {
            punch(f, punch_from, a + len - punch_from);
            punch_from = a + len;
            since = 0;
        }
    }
    punch(f, 0, f.metadata().unwrap().len());
    pages
}

#[derive(Clone, Copy)]
enum Fraction {
    None,
    OnePercent,
    All,
}

impl Fraction {
    fn name(self) -> &'static str {
        match self {
            Fraction::None => "none",
            Fraction::OnePercent => "1%",
            Fraction::All => "100%",
        }
    }

    /// Has the device write this fraction of `[0, size)`; the pages written.
    fn dirty(self, c: &mut Client, f: &File, size: u64) -> u64 {
        let pages = size / PAGE;
        match self {
            Fraction::None => 0,
            Fraction::OnePercent => run_jobs(c, f, (0..pages).step_by(100).map(|p| p * PAGE), PAGE),
            Fraction::All => run_jobs(
                c,
                f,
                (0..size).step_by(MAX_JOB_BYTES as usize),
                MAX_JOB_BYTES,
            ),
        }
    }
}

struct Row {
    size: u64,
    fraction: Fraction,
    pages_dirtied: u64,
    pages_found: u64,
    reports: u64,
    best_ns: f64,
    runs_ns: Vec<f64>,
}

fn parse_size(s: &str) -> u64 {
    let s = s.trim();
    let (n, mult) = match s.chars().last() {
        Some('K') => (&s[..s.len() - 1], 1 << 10),
        Some('M') => (&s[..s.len() - 1], 1 << 20),
        Some('G') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    n.parse::<u64>().expect("a size like 64M or 4G") * mult
}

fn human(size: u64) -> String {
    if size >= 1 << 30 {
        format!("{} GiB", size >> 30)
    } else {
        format!("{} MiB", size >> 20)
    }
}

/// One region size: every fraction, `reps` harvests each. `Err`: the region could not
/// be made or mapped.
fn one_size(size: u64, reps: u32) -> Result<Vec<Row>, String> {
    let f = memfd(size).map_err(|e| format!("memfd of {}: {e}", human(size)))?;
    let (client, server, path) = device();
    let log = UserDeviceLog::new(client.clone(), Box::new(OneFile(f.as_raw_fd(), size)));
    let mut tracker = DmaTracker::new(log, PAGE);
    let scope = tracker.add_device(0).map_err(|e| e.to_string())?;
    assert!(
        matches!(scope, Scope::Tracked(_)),
        "the device must log: {scope:?}"
    );
    let mapped = tracker
        .map(0, size, 0)
        .map_err(|e| format!("DMA_MAP of {}: {e}", human(size)));
    let mut rows = Vec::new();
    if mapped.is_ok() {
        tracker.start();
        // The first harvest after the start, untimed.
        tracker.harvest(&Identity).unwrap();
        for fraction in [Fraction::None, Fraction::OnePercent, Fraction::All] {
            let (dirtied, found) = (Cell::new(0), Cell::new(0));
            let (best_ns, runs_ns) = best_of(
                reps,
                || dirtied.set(fraction.dirty(&mut client.lock().unwrap(), &f, size)),
                || tracker.harvest(&Identity).unwrap(),
                |h| {
                    assert!(h.errors.is_empty() && !h.all_ram, "{:?}", h.errors);
                    let pages: u64 = h.ranges.iter().map(|r| r.length / PAGE).sum();
                    found.set(pages);
                    assert_eq!(
                        pages,
                        dirtied.get(),
                        "{} {}: the harvest found {pages} pages, the device wrote {}",
                        human(size),
                        fraction.name(),
                        dirtied.get()
                    );
                },
            );
            rows.push(Row {
                size,
                fraction,
                pages_dirtied: dirtied.get(),
                pages_found: found.get(),
                reports: size.div_ceil(UserDeviceLog::report_span(PAGE)),
                best_ns,
                runs_ns,
            });
        }
        tracker.stop().unwrap();
    }
    client.lock().unwrap().shutdown();
    drop(tracker);
    drop(client);
    server.join().unwrap();
    let _ = std::fs::remove_file(&path);
    mapped.map(|()| rows)
}

fn main() {
    let mut sizes = "64M,256M,1G,4G".to_string();
    let mut reps = 5u32;
    let mut save = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--sizes" => sizes = args.next().expect("--sizes LIST"),
            "--reps" => reps = args.next().and_then(|n| n.parse().ok()).expect("--reps N"),
            "--save" => save = Some(args.next().expect("--save PATH")),
            "--bench" => {} // cargo bench passes it
            other => panic!("unknown argument {other} (--sizes, --reps, --save)"),
        }
    }
    let mut rows = Vec::new();
    let mut skipped = Vec::new();
    for s in sizes.split(',') {
        let size = parse_size(s);
        match one_size(size, reps) {
            Ok(r) => rows.extend(r),
            Err(e) => {
                println!("skipped {}: {e}", human(size));
                skipped.push(format!("{}: {e}", human(size)));
            }
        }
    }
    println!(
        "| region | written | pages written | pages found | reports | ms per harvest (best of {reps}) | ns per GiB mapped |"
    );
    println!("|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {:.3} | {:.0} |",
            human(r.size),
            r.fraction.name(),
            r.pages_dirtied,
            r.pages_found,
            r.reports,
            r.best_ns / 1e6,
            r.best_ns / (r.size as f64 / GIB)
        );
    }
    if let Some(path) = save {
        let json_rows: Vec<String> = rows
            .iter()
            .map(|r| {
                let runs: Vec<String> = r.runs_ns.iter().map(|n| format!("{n:.0}")).collect();
                format!(
                    "  {{\"region_bytes\": {}, \"written\": \"{}\", \"pages_written\": {}, \
                     \"pages_found\": {}, \"reports\": {}, \"best_ms\": {:.4}, \
                     \"ns_per_gib\": {:.0}, \"runs_ns\": [{}]}}",
                    r.size,
                    r.fraction.name(),
                    r.pages_dirtied,
                    r.pages_found,
                    r.reports,
                    r.best_ns / 1e6,
                    r.best_ns / (r.size as f64 / GIB),
                    runs.join(", ")
                )
            })
            .collect();
        let skipped: Vec<String> = skipped.iter().map(|s| format!("{s:?}")).collect();
        let doc = format!(
            "{{\"reps\": {reps}, \"report_span_bytes\": {}, \"rows\": [\n{}\n], \"skipped\": [{}]}}\n",
            UserDeviceLog::report_span(PAGE),
            json_rows.join(",\n"),
            skipped.join(", ")
        );
        std::fs::write(&path, doc).expect("write the --save file");
    }
}
