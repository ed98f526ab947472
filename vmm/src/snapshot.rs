//! `vm.snapshot` / `vm.restore`: a paused VM's configuration, machine state and RAM in a
//! directory, and a VM built back from them that goes on as after a migration.
//!
//! The files go through the same two seams as a migration ([`SourceVm`] to save,
//! [`DestinationVm`] to restore), so a snapshot holds exactly what a migration's
//! stop-and-copy carries; only the transport differs. A directory holds:
//!
//! - `snapshot.json`: the manifest — format version, the Ferry build that wrote it, and a
//!   crc32c for each other file (each RAM range separately). Every file is written under
//!   a temporary name first (owner-only); only then does an older snapshot's manifest go,
//!   the files are renamed into place and the new manifest last, so a failed save leaves
//!   the older snapshot whole, and a directory whose manifest is there holds a whole one.
//! - `config.json`: the VM configuration (as `vm.info` shows it).
//! - `state.json`: vCPUs and devices (the migration's machine state blob).
//! - `memory.bin`: guest RAM, range after range; pages the guest never wrote, or that hold
//!   only zeros, are holes (a 2 GiB guest that touched 100 MiB takes about 100 MiB of disk).
//!
//! Disks are not copied: like cloud-hypervisor, a snapshot names the disk files its
//! configuration uses, which must be there (unchanged) when it is restored.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use vm_migration::{DestinationVm, RamRange, SourceVm};

/// The version of the directory's layout; a restore refuses any other.
pub const FORMAT_VERSION: u32 = 1;
pub const MANIFEST: &str = "snapshot.json";
pub const CONFIG: &str = "config.json";
pub const STATE: &str = "state.json";
pub const MEMORY: &str = "memory.bin";

const PAGE: usize = 4096;
/// RAM moves through a buffer of this size (a multiple of the page size).
const CHUNK: usize = 2 << 20;
/// The manifest, configuration and state are small; larger is not a snapshot of ours.
const MAX_SMALL_FILE: u64 = 64 << 20;
/// Progress is logged every this many bytes of RAM.
const PROGRESS_EVERY: u64 = 1 << 30;

/// A test-only seam: `FERRY_TEST_SNAPSHOT_DROP_PAGES=GPA` (hex with 0x, or decimal)
/// leaves the [`DROP_PAGES`] pages from GPA out of the snapshot (holes instead), checksums
/// computed over what it wrote: a restore succeeds and only the guest can tell.
pub const DROP_PAGES_ENV: &str = "FERRY_TEST_SNAPSHOT_DROP_PAGES";
pub const DROP_PAGES: u64 = 64;

fn drop_seam() -> Option<std::ops::Range<u64>> {
    let v = std::env::var(DROP_PAGES_ENV).ok()?;
    let gpa = match v.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok()?,
        None => v.parse().ok()?,
    };
    log::warn!(
        "{DROP_PAGES_ENV} is set: the {DROP_PAGES} pages of guest RAM from {gpa:#x} are left out \
         of the snapshot (a test seam; the restored guest will find them stale)"
    );
    Some(gpa..gpa.saturating_add(DROP_PAGES * PAGE as u64))
}

#[derive(Debug, Error)]
pub enum SnapshotError {
    #[error("{url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("{}: {what}: {source}", path.display())]
    Io {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{}: {reason}", path.display())]
    Format { path: PathBuf, reason: String },
    #[error("{}: {what} has crc32c {found:#010x}, the manifest says {expected:#010x} (the file was changed or damaged)", path.display())]
    Checksum {
        path: PathBuf,
        what: String,
        expected: u32,
        found: u32,
    },
    #[error("{0}")]
    Vm(String),
}

type Result<T> = std::result::Result<T, SnapshotError>;

/// One file's length and checksum.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileSum {
    pub file: String,
    pub bytes: u64,
    pub crc32c: u32,
}

/// One RAM range of `memory.bin`: guest address, size, where it starts in the file, and
/// the crc32c of its bytes (holes read as zeros).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MemoryRange {
    pub gpa: u64,
    pub size: u64,
    pub offset: u64,
    pub crc32c: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub version: u32,
    /// The Ferry build that wrote it (for people; not checked).
    pub ferry: String,
    pub config: FileSum,
    pub state: FileSum,
    pub memory_file: String,
    pub memory: Vec<MemoryRange>,
}

/// What [`save`] wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Saved {
    pub ram_bytes: u64,
    /// Pages stored as data (the rest are holes).
    pub data_pages: u64,
}

/// What [`restore`] read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Restored {
    pub ram_bytes: u64,
    pub data_pages: u64,
}

/// The directory a `file:///dir` URL names (it must exist).
pub fn dir_from_url(url: &str) -> Result<PathBuf> {
    let bad = |reason: String| SnapshotError::Url {
        url: url.chars().take(300).collect(),
        reason,
    };
    let dir = crate::coredump::file_url_path(url, "file:///path/to/directory").map_err(bad)?;
    match std::fs::metadata(&dir) {
        Ok(m) if m.is_dir() => Ok(dir),
        Ok(_) => Err(bad("the path is not a directory".into())),
        Err(_) => Err(bad("the directory does not exist".into())),
    }
}

fn io<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(std::io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        what,
        source,
    }
}

/// Writes `bytes` to `dir/name` through a temporary name, so the file is whole or absent.
/// `dir/.NAME.partial`, where a file is written before it is renamed into place.
fn partial(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!(".{name}.partial"))
}

/// Creates `path` afresh for writing: owner-only (guest RAM and registers are in these
/// files), never through a symlink someone left there.
fn create_private(path: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(path, "removing a stale partial file")(e)),
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(io(path, "creating"))
}

/// Writes `bytes` to `dir/.NAME.partial` (renamed into place by [`save_files`] once
/// everything is written).
fn write_small(dir: &Path, name: &str, bytes: &[u8]) -> Result<FileSum> {
    let tmp = partial(dir, name);
    if bytes.len() as u64 > MAX_SMALL_FILE {
        // A restore would refuse it: say so now, not when it is needed.
        return Err(SnapshotError::Format {
            path: dir.join(name),
            reason: format!(
                "{} bytes, more than the {MAX_SMALL_FILE} a restore reads",
                bytes.len()
            ),
        });
    }
    let mut f = create_private(&tmp)?;
    f.write_all(bytes).map_err(io(&tmp, "writing"))?;
    f.sync_all().map_err(io(&tmp, "syncing"))?;
    Ok(FileSum {
        file: name.to_string(),
        bytes: bytes.len() as u64,
        crc32c: crc32c::crc32c(bytes),
    })
}

fn is_zero(page: &[u8]) -> bool {
    page.iter().all(|&b| b == 0)
}

/// Saves the paused VM behind `src` into `dir` (an existing directory). A snapshot
/// already there is replaced once the new one is written; a failure before that leaves
/// it as it was (and no partial file).
pub fn save(src: &dyn SourceVm, dir: &Path) -> Result<Saved> {
    let r = save_files(src, dir);
    if r.is_err() {
        for name in [CONFIG, STATE, MEMORY, MANIFEST] {
            let _ = std::fs::remove_file(partial(dir, name));
        }
    }
    r
}

fn save_files(src: &dyn SourceVm, dir: &Path) -> Result<Saved> {
    let started = Instant::now();
    let config = write_small(dir, CONFIG, &src.config().map_err(SnapshotError::Vm)?)?;
    let (machine, devices) = src.save_state().map_err(SnapshotError::Vm)?;
    if !devices.is_empty() {
        // Ferry's machine state is one blob; a second one would be lost here.
        return Err(SnapshotError::Vm(format!(
            "the machine state came in two parts ({} device bytes): this format keeps one",
            devices.len()
        )));
    }
    let state = write_small(dir, STATE, &machine)?;

    let tmp = partial(dir, MEMORY);
    let file = create_private(&tmp)?;
    let layout = src.ram_layout();
    let total: u64 = layout.iter().map(|r| r.size).sum();
    // Sized first: pages left unwritten are holes that read as zeros.
    file.set_len(total).map_err(io(&tmp, "sizing"))?;
    let dropped = drop_seam();
    let mut buf = vec![0u8; CHUNK];
    let mut zero = Vec::new();
    let mut ranges = Vec::with_capacity(layout.len());
    let (mut offset, mut data_pages, mut done, mut next_report) =
        (0u64, 0u64, 0u64, PROGRESS_EVERY);
    for r in &layout {
        let mut crc = 0u32;
        let mut at = 0u64;
        while at < r.size {
            let n = (r.size - at).min(CHUNK as u64) as usize;
            let chunk = &mut buf[..n];
            zero.clear();
            src.read_pages_known_zero(r.gpa + at, chunk, &mut zero)
                .map_err(SnapshotError::Vm)?;
            for (i, page) in chunk.chunks_exact_mut(PAGE).enumerate() {
                if zero.get(i).copied().unwrap_or(false) {
                    page.fill(0);
                    continue;
                }
                if is_zero(page) {
                    continue;
                }
                let gpa = r.gpa + at + (i * PAGE) as u64;
                if dropped.as_ref().is_some_and(|d| d.contains(&gpa)) {
                    page.fill(0);
                    continue;
                }
                let pos = offset + at + (i * PAGE) as u64;
                file.write_all_at(page, pos)
                    .map_err(io(&tmp, "writing RAM"))?;
                data_pages += 1;
            }
            crc = crc32c::crc32c_append(crc, chunk);
            at += n as u64;
            done += n as u64;
            if done >= next_report {
                log::info!(
                    "snapshot: {} of {} MiB of RAM written",
                    done >> 20,
                    total >> 20
                );
                next_report += PROGRESS_EVERY;
            }
        }
        ranges.push(MemoryRange {
            gpa: r.gpa,
            size: r.size,
            offset,
            crc32c: crc,
        });
        offset += r.size;
    }
    file.sync_all().map_err(io(&tmp, "syncing"))?;
    drop(file);

    let manifest = Manifest {
        version: FORMAT_VERSION,
        ferry: vm_migration::engine::build_string(),
        config,
        state,
        memory_file: MEMORY.to_string(),
        memory: ranges,
    };
    let text = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| SnapshotError::Vm(format!("writing the manifest: {e}")))?;
    write_small(dir, MANIFEST, &text)?;
    // Everything is written: only now does an older snapshot here go (its manifest
    // first, so that a crash in between leaves no manifest over mixed files).
    let manifest_path = dir.join(MANIFEST);
    match std::fs::remove_file(&manifest_path) {
        Ok(()) => log::info!("snapshot: replacing the one in {}", dir.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(&manifest_path, "removing the old manifest")(e)),
    }
    for name in [CONFIG, STATE, MEMORY, MANIFEST] {
        let path = dir.join(name);
        std::fs::rename(partial(dir, name), &path).map_err(io(&path, "renaming into place"))?;
    }
    log::info!(
        "snapshot: {} written: {} MiB of RAM ({} data pages, the rest holes) in {:?}",
        dir.display(),
        total >> 20,
        data_pages,
        started.elapsed()
    );
    Ok(Saved {
        ram_bytes: total,
        data_pages,
    })
}

/// Opens a file of the snapshot for reading: a regular file only (a FIFO or device put
/// there would block or never end), checked without blocking.
fn open_regular(path: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(io(path, "opening"))?;
    let meta = f.metadata().map_err(io(path, "reading its type"))?;
    if !meta.is_file() {
        return Err(SnapshotError::Format {
            path: path.to_path_buf(),
            reason: "not a regular file".into(),
        });
    }
    // O_NONBLOCK means nothing for a regular file's reads.
    Ok(f)
}

/// Reads a small file whole, refusing one over [`MAX_SMALL_FILE`].
fn read_small(path: &Path) -> Result<Vec<u8>> {
    let f = open_regular(path)?;
    let mut out = Vec::new();
    f.take(MAX_SMALL_FILE + 1)
        .read_to_end(&mut out)
        .map_err(io(path, "reading"))?;
    if out.len() as u64 > MAX_SMALL_FILE {
        return Err(SnapshotError::Format {
            path: path.to_path_buf(),
            reason: format!("larger than {MAX_SMALL_FILE} bytes"),
        });
    }
    Ok(out)
}

/// Reads `sum.file` from `dir` and checks its length and crc32c.
fn read_checked(dir: &Path, sum: &FileSum) -> Result<Vec<u8>> {
    let path = dir.join(&sum.file);
    let bytes = read_small(&path)?;
    if bytes.len() as u64 != sum.bytes {
        return Err(SnapshotError::Format {
            path,
            reason: format!(
                "{} bytes long, the manifest says {}",
                bytes.len(),
                sum.bytes
            ),
        });
    }
    let found = crc32c::crc32c(&bytes);
    if found != sum.crc32c {
        return Err(SnapshotError::Checksum {
            path,
            what: "the file".into(),
            expected: sum.crc32c,
            found,
        });
    }
    Ok(bytes)
}

/// A file name in the manifest must be a plain name inside the directory.
fn plain_name(manifest: &Path, name: &str) -> Result<()> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." || name.contains('\0') {
        return Err(SnapshotError::Format {
            path: manifest.to_path_buf(),
            reason: format!("file name {name:?} is not a plain name inside the directory"),
        });
    }
    Ok(())
}

/// Reads and checks the manifest of the snapshot in `dir`.
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST);
    let bytes = read_small(&path)?;
    let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| SnapshotError::Format {
        path: path.clone(),
        reason: format!("not a Ferry snapshot manifest: {e}"),
    })?;
    let bad = |reason: String| SnapshotError::Format {
        path: path.clone(),
        reason,
    };
    if m.version != FORMAT_VERSION {
        return Err(bad(format!(
            "format version {} (this Ferry reads version {FORMAT_VERSION}; written by {})",
            m.version, m.ferry
        )));
    }
    for name in [&m.config.file, &m.state.file, &m.memory_file] {
        plain_name(&path, name)?;
    }
    let mut next = 0u64;
    let mut prev_end = 0u64;
    for r in &m.memory {
        if r.size == 0 || r.size % PAGE as u64 != 0 || r.gpa % PAGE as u64 != 0 {
            return Err(bad(format!(
                "RAM range gpa={:#x} size={:#x} is not whole pages",
                r.gpa, r.size
            )));
        }
        if r.offset != next {
            return Err(bad(format!(
                "RAM range gpa={:#x} starts at offset {:#x} of the memory file, not {next:#x}",
                r.gpa, r.offset
            )));
        }
        if r.gpa < prev_end {
            return Err(bad(format!(
                "RAM range gpa={:#x} overlaps or precedes the one before it",
                r.gpa
            )));
        }
        prev_end = r.gpa.checked_add(r.size).ok_or_else(|| {
            bad(format!(
                "RAM range gpa={:#x} size={:#x} wraps the address space",
                r.gpa, r.size
            ))
        })?;
        next = next
            .checked_add(r.size)
            .ok_or_else(|| bad("RAM sizes overflow".into()))?;
    }
    if m.memory.is_empty() {
        return Err(bad("no RAM range".into()));
    }
    Ok(m)
}

/// Whether `[pos, pos + len)` of `file` holds no data at all (a hole).
fn is_hole(file: &File, pos: u64, len: u64) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(at) = libc::off_t::try_from(pos) else {
        return false;
    };
    // SAFETY: lseek on a file descriptor we own; it moves only the file offset, which no
    // other code uses (reads are positional).
    let data = unsafe { libc::lseek(file.as_raw_fd(), at, libc::SEEK_DATA) };
    if data < 0 {
        // ENXIO: no data from `pos` to the end. Anything else: cannot tell, so read.
        return std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
    }
    data as u64 >= pos + len
}

/// Builds the VM saved in `dir` behind `dest`: configuration, every RAM page (checked
/// against its crc32c before the VM may run), then the machine state. The caller starts
/// it (`DestinationVm::resume`). On any error nothing of the VM is kept by this call.
pub fn restore(dest: &mut dyn DestinationVm, dir: &Path) -> Result<Restored> {
    let started = Instant::now();
    let m = read_manifest(dir)?;
    let config = read_checked(dir, &m.config)?;
    let state = read_checked(dir, &m.state)?;
    let mem_path = dir.join(&m.memory_file);
    let file = open_regular(&mem_path)?;
    let total: u64 = m.memory.iter().map(|r| r.size).sum();
    let len = file
        .metadata()
        .map_err(io(&mem_path, "reading its length"))?
        .len();
    if len != total {
        return Err(SnapshotError::Format {
            path: mem_path,
            reason: format!("{len} bytes long, the manifest's RAM ranges add up to {total}"),
        });
    }
    let layout: Vec<RamRange> = m
        .memory
        .iter()
        .map(|r| RamRange {
            gpa: r.gpa,
            size: r.size,
        })
        .collect();
    dest.check_config(&config, &layout)
        .map_err(SnapshotError::Vm)?;
    let mut buf = vec![0u8; CHUNK];
    let (mut data_pages, mut done, mut next_report) = (0u64, 0u64, PROGRESS_EVERY);
    for r in &m.memory {
        let mut crc = 0u32;
        let mut at = 0u64;
        while at < r.size {
            let n = (r.size - at).min(CHUNK as u64) as usize;
            let chunk = &mut buf[..n];
            let pos = r.offset + at;
            if is_hole(&file, pos, n as u64) {
                // Fresh guest RAM is zero already: nothing to write.
                chunk.fill(0);
            } else {
                file.read_exact_at(chunk, pos)
                    .map_err(io(&mem_path, "reading RAM"))?;
                let mut i = 0;
                let pages = n / PAGE;
                while i < pages {
                    if is_zero(&chunk[i * PAGE..(i + 1) * PAGE]) {
                        i += 1;
                        continue;
                    }
                    let first = i;
                    while i < pages && !is_zero(&chunk[i * PAGE..(i + 1) * PAGE]) {
                        i += 1;
                    }
                    dest.write_pages(
                        r.gpa + at + (first * PAGE) as u64,
                        &chunk[first * PAGE..i * PAGE],
                    )
                    .map_err(SnapshotError::Vm)?;
                    data_pages += (i - first) as u64;
                }
            }
            crc = crc32c::crc32c_append(crc, chunk);
            at += n as u64;
            done += n as u64;
            if done >= next_report {
                log::info!("restore: {} of {} MiB of RAM read", done >> 20, total >> 20);
                next_report += PROGRESS_EVERY;
            }
        }
        if crc != r.crc32c {
            return Err(SnapshotError::Checksum {
                path: mem_path,
                what: format!("RAM range gpa={:#x} size={:#x}", r.gpa, r.size),
                expected: r.crc32c,
                found: crc,
            });
        }
    }
    dest.restore_state(&state, &[]).map_err(SnapshotError::Vm)?;
    log::info!(
        "restore: {} read: {} MiB of RAM ({data_pages} data pages) in {:?}",
        dir.display(),
        total >> 20,
        started.elapsed()
    );
    Ok(Restored {
        ram_bytes: total,
        data_pages,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use vm_migration::engine::HookResult;

    /// Two RAM ranges (1 MiB at 0, 2 MiB at 4 GiB) with a few pages written.
    struct FakeSource {
        ranges: Vec<(u64, Vec<u8>)>,
        /// Every read of RAM fails.
        broken: bool,
    }

    impl FakeSource {
        fn new() -> FakeSource {
            let mut low = vec![0u8; 1 << 20];
            low[0x3000..0x4000].fill(0xab);
            low[0x3000] = 1;
            let mut high = vec![0u8; 2 << 20];
            high[0x10_0000..0x10_2000].fill(0x5a);
            FakeSource {
                ranges: vec![(0, low), (4 << 30, high)],
                broken: false,
            }
        }
    }

    impl SourceVm for FakeSource {
        fn config(&self) -> HookResult<Vec<u8>> {
            Ok(br#"{"fake":true}"#.to_vec())
        }
        fn ram_layout(&self) -> Vec<RamRange> {
            self.ranges
                .iter()
                .map(|(gpa, m)| RamRange {
                    gpa: *gpa,
                    size: m.len() as u64,
                })
                .collect()
        }
        fn read_pages(&self, gpa: u64, buf: &mut [u8]) -> HookResult<()> {
            if self.broken {
                return Err(format!("reading {gpa:#x} failed"));
            }
            let (base, m) = self
                .ranges
                .iter()
                .find(|(b, m)| gpa >= *b && gpa < b + m.len() as u64)
                .ok_or("outside RAM")?;
            let at = (gpa - base) as usize;
            buf.copy_from_slice(&m[at..at + buf.len()]);
            Ok(())
        }
        fn start_dirty_log(&self) -> HookResult<()> {
            Ok(())
        }
        fn collect_dirty(&self, _: bool) -> HookResult<Vec<(u64, u64)>> {
            Ok(vec![])
        }
        fn stop_dirty_log(&self) {}
        fn pause(&self) -> HookResult<()> {
            Ok(())
        }
        fn resume(&self) -> HookResult<()> {
            Ok(())
        }
        fn save_state(&self) -> HookResult<(Vec<u8>, Vec<u8>)> {
            Ok((b"{\"state\":1}".to_vec(), vec![]))
        }
    }

    #[derive(Default)]
    struct FakeDest {
        layout: Vec<RamRange>,
        writes: RefCell<Vec<(u64, Vec<u8>)>>,
        state: Option<Vec<u8>>,
    }

    impl DestinationVm for FakeDest {
        fn check_config(&mut self, c: &[u8], ram: &[RamRange]) -> HookResult<Vec<RamRange>> {
            assert_eq!(c, br#"{"fake":true}"#);
            self.layout = ram.to_vec();
            Ok(ram.to_vec())
        }
        fn write_pages(&self, gpa: u64, data: &[u8]) -> HookResult<()> {
            self.writes.borrow_mut().push((gpa, data.to_vec()));
            Ok(())
        }
        fn zero_pages(&self, _: u64, _: u64) -> HookResult<()> {
            Ok(())
        }
        fn restore_state(&mut self, v: &[u8], _: &[u8]) -> HookResult<()> {
            self.state = Some(v.to_vec());
            Ok(())
        }
        fn resume(&mut self) -> HookResult<()> {
            Ok(())
        }
    }

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ferry-snapunit-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn round_trip_writes_only_non_zero_pages_and_keeps_holes() {
        let dir = tmp("rt");
        let src = FakeSource::new();
        let saved = save(&src, &dir).unwrap();
        assert_eq!(saved.ram_bytes, 3 << 20);
        assert_eq!(saved.data_pages, 3);
        let mut dest = FakeDest::default();
        let r = restore(&mut dest, &dir).unwrap();
        assert_eq!(r.data_pages, 3);
        assert_eq!(dest.layout, src.ram_layout());
        assert_eq!(dest.state.as_deref(), Some(&b"{\"state\":1}"[..]));
        let writes = dest.writes.borrow();
        let got: Vec<(u64, usize)> = writes.iter().map(|(g, d)| (*g, d.len())).collect();
        assert_eq!(got, vec![(0x3000, 0x1000), ((4 << 30) + 0x10_0000, 0x2000)]);
        assert_eq!(writes[0].1[..], src.ranges[0].1[0x3000..0x4000]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn rewrite_manifest(dir: &Path, f: impl FnOnce(&mut Manifest)) {
        let mut m = read_manifest(dir).unwrap();
        f(&mut m);
        std::fs::write(dir.join(MANIFEST), serde_json::to_vec(&m).unwrap()).unwrap();
    }

    #[test]
    fn bad_manifests_and_files_are_refused_naming_what() {
        let dir = tmp("bad");
        save(&FakeSource::new(), &dir).unwrap();
        let good = std::fs::read(dir.join(MANIFEST)).unwrap();
        type Change = Box<dyn FnOnce(&mut Manifest)>;
        let cases: Vec<(Change, &str)> = vec![
            (Box::new(|m| m.version = 2), "format version 2"),
            (
                Box::new(|m| m.config.file = "../x".into()),
                "not a plain name",
            ),
            (Box::new(|m| m.memory[1].offset += 4096), "starts at offset"),
            (Box::new(|m| m.memory[1].gpa = 0x1000), "overlaps"),
            (Box::new(|m| m.memory[0].size = 100), "not whole pages"),
            (Box::new(|m| m.memory.clear()), "no RAM range"),
            (Box::new(|m| m.state.crc32c ^= 1), "crc32c"),
            (Box::new(|m| m.config.bytes += 1), "bytes long"),
            (
                Box::new(|m| m.memory[1].crc32c ^= 1),
                "RAM range gpa=0x100000000",
            ),
            (Box::new(|m| m.memory[1].size += 4096), "add up to"),
        ];
        for (change, want) in cases {
            std::fs::write(dir.join(MANIFEST), &good).unwrap();
            rewrite_manifest(&dir, change);
            let mut dest = FakeDest::default();
            let e = restore(&mut dest, &dir).unwrap_err().to_string();
            assert!(e.contains(want), "no '{want}' in: {e}");
            assert!(dest.state.is_none(), "{want}: state restored anyway");
        }
        std::fs::write(dir.join(MANIFEST), b"{not json").unwrap();
        let e = restore(&mut FakeDest::default(), &dir)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a Ferry snapshot manifest"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn urls_name_the_problem() {
        let dir = tmp("url");
        assert_eq!(
            dir_from_url(&format!("file://{}", dir.display())).unwrap(),
            dir
        );
        for (u, want) in [
            ("http://x/y", "only file://"),
            ("file://host/x", "absolute"),
            ("file:///definitely/not/here", "does not exist"),
        ] {
            let e = dir_from_url(u).unwrap_err().to_string();
            assert!(e.contains(want), "{u}: {e}");
        }
        let f = dir.join("file");
        std::fs::write(&f, b"x").unwrap();
        let e = dir_from_url(&format!("file://{}", f.display())).unwrap_err();
        assert!(e.to_string().contains("not a directory"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_failed_save_keeps_the_older_snapshot_and_no_partial_file() {
        let dir = tmp("fail");
        save(&FakeSource::new(), &dir).unwrap();
        let broken = FakeSource {
            broken: true,
            ..FakeSource::new()
        };
        let e = save(&broken, &dir).unwrap_err();
        assert!(e.to_string().contains("reading 0x0 failed"), "{e}");
        let left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(!left.iter().any(|n| n.ends_with(".partial")), "{left:?}");
        // The older snapshot is still whole.
        let mut dest = FakeDest::default();
        assert_eq!(restore(&mut dest, &dir).unwrap().data_pages, 3);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn files_are_owner_only_and_not_written_through_symlinks() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tmp("mode");
        // A symlink planted at a temporary name is replaced, not followed.
        let victim = dir.join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        std::os::unix::fs::symlink(&victim, partial(&dir, MEMORY)).unwrap();
        save(&FakeSource::new(), &dir).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        for name in [MANIFEST, CONFIG, STATE, MEMORY] {
            let mode = std::fs::metadata(dir.join(name))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{name}: {mode:o}");
        }
        // A FIFO where the memory file should be is refused, not read (which would block).
        std::fs::remove_file(dir.join(MEMORY)).unwrap();
        let fifo = std::ffi::CString::new(dir.join(MEMORY).to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid NUL-terminated path; it only creates a file.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let e = restore(&mut FakeDest::default(), &dir)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a regular file"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
