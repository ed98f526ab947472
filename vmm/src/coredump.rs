//! `vm.coredump`: a paused VM's RAM as an ELF64 core file (`ET_CORE`, `EM_X86_64`), and a
//! small reader for such files (tests, tools).
//!
//! What the file holds, in order:
//!
//! | offset | contents |
//! |--------|----------|
//! | 0 | the ELF header (64 bytes) |
//! | 64 | program headers (56 bytes each): a `PT_NOTE` when vCPU registers are known, then one `PT_LOAD` per guest RAM region, in address order |
//! | after them | the notes (see below) |
//! | next multiple of 4 KiB | each RAM region's bytes, one region after the other, each starting on a 4 KiB boundary |
//!
//! Each `PT_LOAD`: `p_paddr` = `p_vaddr` = the region's guest-physical address,
//! `p_filesz` = `p_memsz` = its size, flags RWX, `p_align` 4 KiB. The guest's own virtual
//! addresses are not described (no page-table walk): `p_vaddr` is the physical address too.
//!
//! Notes, for each vCPU, from its registers as it last parked (the VM is paused):
//! * name `CORE`, type `NT_PRSTATUS` (1): Linux's x86-64 `struct elf_prstatus` (336
//!   bytes). `pr_pid` is the vCPU index + 1; `pr_reg` (at byte 112) holds r15, r14, r13,
//!   r12, rbp, rbx, r11, r10, r9, r8, rax, rcx, rdx, rsi, rdi, orig_rax (-1), rip, cs,
//!   rflags, rsp, ss, fs_base, gs_base, ds, es, fs, gs; everything else is zero (no signal,
//!   no times, `pr_fpvalid` 0: no FPU state is written). `gdb` and `readelf -n` read it.
//! * name `FERRY`, type 0x46520001 ([`NT_FERRY_CONTROL`], a number no core reader assigns): five little-endian u64, the vCPU index,
//!   CR0, CR3, CR4 and EFER (what a tool needs to walk the guest's page tables).
//!
//! Notes are 4-byte aligned, as in Linux core files.
//!
//! The file is written as a temporary file beside the destination (mode 0600: it holds the
//! guest's memory) and renamed over the destination once complete; on any error the
//! temporary file is removed, so no half-written core is ever left under either name.
//! Guest RAM is streamed region by region through a 1 MiB buffer, never copied whole, and
//! pages that are entirely zero are not written (the file is sparse there; reading it back
//! gives zeros all the same). The file is not fsync'ed.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::GuestMemoryMmap;
use crate::vcpu::VcpuSnapshot;

/// The only URL scheme `vm.coredump` writes to.
pub const FILE_SCHEME: &str = "file://";

const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
const ET_CORE: u16 = 4;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const PF_X: u32 = 1;
const PF_W: u32 = 2;
const PF_R: u32 = 4;
/// `e_phnum` value meaning "too many, see section 0": not supported here.
const PN_XNUM: usize = 0xffff;
/// Alignment of the RAM data in the file (and of `PT_LOAD`s).
const DATA_ALIGN: u64 = 4096;
/// Bytes of guest RAM read at a time.
const CHUNK: usize = 1 << 20;

/// `NT_PRSTATUS`: a thread's registers (name `CORE`).
pub const NT_PRSTATUS: u32 = 1;
/// Ferry's note of a vCPU's control registers (name `FERRY`).
pub const NT_FERRY_CONTROL: u32 = 0x4652_0001;
/// Size of Linux's x86-64 `struct elf_prstatus`.
pub const PRSTATUS_SIZE: usize = 336;
/// Offset of `pr_pid` in it.
pub const PRSTATUS_PID: usize = 32;
/// Offset of `pr_reg` (27 u64, `struct user_regs_struct`) in it.
pub const PRSTATUS_REGS: usize = 112;
/// Index of rip in `pr_reg`.
pub const PR_REG_RIP: usize = 16;
/// Index of rsp in `pr_reg`.
pub const PR_REG_RSP: usize = 19;

/// Why a core file could not be written.
#[derive(Debug, thiserror::Error)]
pub enum CoredumpError {
    #[error("destination_url {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("cannot create core file {path} (as temporary file {tmp}): {source}")]
    Create {
        path: String,
        tmp: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write core file {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot rename the finished core file {tmp} to {path}: {source}")]
    Rename {
        path: String,
        tmp: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {len} bytes of guest RAM at {gpa:#x} for core file {path}: {reason}")]
    Memory {
        path: String,
        gpa: u64,
        len: usize,
        reason: String,
    },
    #[error("{count} guest RAM regions do not fit in an ELF program header table (at most {max})")]
    TooManyRegions { count: usize, max: usize },
}

/// The absolute path a `file:///abs/path` URL names (no host part, no relative path, no
/// NUL byte; taken literally, without %-decoding), or why the URL is refused. `example`
/// ends the messages, e.g. `file:///path/to/core`. `vm.coredump`, `vm.snapshot` and
/// `vm.restore` take their URLs through it.
pub fn file_url_path(url: &str, example: &'static str) -> Result<PathBuf, String> {
    let path = url
        .strip_prefix(FILE_SCHEME)
        .ok_or_else(|| format!("only file:// URLs are accepted ({example})"))?;
    if !path.starts_with('/') {
        return Err(format!(
            "the path must be absolute and there is no host part ({example})"
        ));
    }
    if path.contains('\0') {
        return Err("the path contains a NUL byte".into());
    }
    Ok(PathBuf::from(path))
}

/// The path a `file://` URL names: `file:///abs/path` only ([`file_url_path`]), and not a
/// directory.
pub fn destination_path(url: &str) -> Result<PathBuf, CoredumpError> {
    let bad = |reason: String| CoredumpError::Url {
        url: url.chars().take(300).collect(),
        reason,
    };
    let path = file_url_path(url, "file:///path/to/core").map_err(bad)?;
    let text = path.to_string_lossy();
    if text.ends_with('/') || text.ends_with("/.") || text.ends_with("/..") {
        return Err(bad("the path names a directory, not a file".into()));
    }
    Ok(path)
}

/// What [`write_core_file`] wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoreSummary {
    /// Length of the file (holes included).
    pub file_len: u64,
    /// Guest RAM bytes in it (the sum of the `PT_LOAD` sizes).
    pub ram_bytes: u64,
    pub regions: usize,
    /// vCPUs with register notes.
    pub vcpus: usize,
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// One note: header, name and description, each padded to 4 bytes.
fn push_note(out: &mut Vec<u8>, name: &str, kind: u32, desc: &[u8]) {
    let namesz = name.len() + 1;
    out.extend((namesz as u32).to_le_bytes());
    out.extend((desc.len() as u32).to_le_bytes());
    out.extend(kind.to_le_bytes());
    out.extend(name.as_bytes());
    out.push(0);
    out.resize(align_up(out.len() as u64, 4) as usize, 0);
    out.extend(desc);
    out.resize(align_up(out.len() as u64, 4) as usize, 0);
}

/// `struct elf_prstatus` of one vCPU.
fn prstatus(v: &VcpuSnapshot) -> [u8; PRSTATUS_SIZE] {
    let mut d = [0u8; PRSTATUS_SIZE];
    put32(&mut d, PRSTATUS_PID, v.index.wrapping_add(1));
    let [rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8, r9, r10, r11, r12, r13, r14, r15] = v.gprs;
    let [cs, ss, ds, es, fs, gs] = v.selectors.map(u64::from);
    let regs: [u64; 27] = [
        r15,
        r14,
        r13,
        r12,
        rbp,
        rbx,
        r11,
        r10,
        r9,
        r8,
        rax,
        rcx,
        rdx,
        rsi,
        rdi,
        u64::MAX, // orig_rax: not in a system call
        v.rip,
        cs,
        v.rflags,
        rsp,
        ss,
        v.fs_base,
        v.gs_base,
        ds,
        es,
        fs,
        gs,
    ];
    for (i, r) in regs.iter().enumerate() {
        put64(&mut d, PRSTATUS_REGS + i * 8, *r);
    }
    d
}

/// The notes of the vCPUs (empty without any).
fn notes(vcpus: &[VcpuSnapshot]) -> Vec<u8> {
    let mut out = Vec::new();
    for v in vcpus {
        push_note(&mut out, "CORE", NT_PRSTATUS, &prstatus(v));
        let control: Vec<u8> = [u64::from(v.index), v.cr0, v.cr3, v.cr4, v.efer]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        push_note(&mut out, "FERRY", NT_FERRY_CONTROL, &control);
    }
    out
}

/// The headers and notes: everything before the RAM data, and where each region's data
/// goes.
fn headers(
    regions: &[(u64, u64)],
    vcpus: &[VcpuSnapshot],
) -> Result<(Vec<u8>, Vec<u64>, u64), CoredumpError> {
    let notes = notes(vcpus);
    let phnum = regions.len() + usize::from(!notes.is_empty());
    if phnum >= PN_XNUM {
        return Err(CoredumpError::TooManyRegions {
            count: regions.len(),
            max: PN_XNUM - 2,
        });
    }
    let notes_at = EHDR_SIZE + phnum * PHDR_SIZE;
    let mut head = vec![0u8; notes_at];
    head[..4].copy_from_slice(b"\x7fELF");
    head[4] = 2; // ELFCLASS64
    head[5] = 1; // ELFDATA2LSB
    head[6] = 1; // EV_CURRENT
    put16(&mut head, 16, ET_CORE);
    put16(&mut head, 18, EM_X86_64);
    put32(&mut head, 20, 1); // e_version
    put64(&mut head, 32, EHDR_SIZE as u64); // e_phoff
    put16(&mut head, 52, EHDR_SIZE as u16); // e_ehsize
    put16(&mut head, 54, PHDR_SIZE as u16); // e_phentsize
    put16(&mut head, 56, phnum as u16);

    let mut ph = EHDR_SIZE;
    if !notes.is_empty() {
        put32(&mut head, ph, PT_NOTE);
        put32(&mut head, ph + 4, PF_R);
        put64(&mut head, ph + 8, notes_at as u64);
        put64(&mut head, ph + 32, notes.len() as u64);
        put64(&mut head, ph + 40, notes.len() as u64);
        put64(&mut head, ph + 48, 4);
        ph += PHDR_SIZE;
    }
    let mut offset = align_up((notes_at + notes.len()) as u64, DATA_ALIGN);
    let mut offsets = Vec::with_capacity(regions.len());
    for &(gpa, size) in regions {
        put32(&mut head, ph, PT_LOAD);
        put32(&mut head, ph + 4, PF_R | PF_W | PF_X);
        put64(&mut head, ph + 8, offset);
        put64(&mut head, ph + 16, gpa); // p_vaddr
        put64(&mut head, ph + 24, gpa); // p_paddr
        put64(&mut head, ph + 32, size); // p_filesz
        put64(&mut head, ph + 40, size); // p_memsz
        put64(&mut head, ph + 48, DATA_ALIGN);
        ph += PHDR_SIZE;
        offsets.push(offset);
        offset = align_up(offset + size, DATA_ALIGN);
    }
    head.extend_from_slice(&notes);
    let end = offsets
        .last()
        .zip(regions.last())
        .map_or(head.len() as u64, |(o, r)| o + r.1);
    Ok((head, offsets, end))
}

fn is_zero(b: &[u8]) -> bool {
    b.chunks(64).all(|c| c.iter().fold(0u8, |a, x| a | x) == 0)
}

/// Writes `data` at file offset `at`, skipping its all-zero 4 KiB pages.
fn write_sparse(file: &File, at: u64, data: &[u8]) -> std::io::Result<()> {
    let page = DATA_ALIGN as usize;
    let mut i = 0;
    while i < data.len() {
        let next = |i: usize| (i + page).min(data.len());
        if is_zero(&data[i..next(i)]) {
            i = next(i);
            continue;
        }
        let start = i;
        while i < data.len() && !is_zero(&data[i..next(i)]) {
            i = next(i);
        }
        file.write_all_at(&data[start..i], at + start as u64)?;
    }
    Ok(())
}

/// Writes the whole core into `file` (empty, just created).
fn write_core(
    file: &File,
    path: &str,
    mem: &GuestMemoryMmap,
    vcpus: &[VcpuSnapshot],
) -> Result<CoreSummary, CoredumpError> {
    let write_err = |source| CoredumpError::Write {
        path: path.to_string(),
        source,
    };
    let mut regions: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
    regions.sort_unstable();
    let (head, offsets, end) = headers(&regions, vcpus)?;
    file.write_all_at(&head, 0).map_err(write_err)?;
    let mut buf = vec![0u8; CHUNK];
    for (&(gpa, size), &offset) in regions.iter().zip(&offsets) {
        let mut done = 0u64;
        while done < size {
            let n = (size - done).min(CHUNK as u64) as usize;
            let at = gpa + done;
            mem.read_slice(&mut buf[..n], GuestAddress(at))
                .map_err(|e| CoredumpError::Memory {
                    path: path.to_string(),
                    gpa: at,
                    len: n,
                    reason: e.to_string(),
                })?;
            write_sparse(file, offset + done, &buf[..n]).map_err(write_err)?;
            done += n as u64;
        }
    }
    // Trailing zero pages were skipped: the length makes them part of the file.
    file.set_len(end).map_err(write_err)?;
    Ok(CoreSummary {
        file_len: end,
        ram_bytes: regions.iter().map(|r| r.1).sum(),
        regions: regions.len(),
        vcpus: vcpus.len(),
    })
}

/// Writes the core of `mem` (and of `vcpus`' registers) to `path`, through a temporary
/// file beside it that is renamed into place when complete and removed on any error.
/// The vCPUs should be paused, or the image is not a consistent one.
pub fn write_core_file(
    path: &Path,
    mem: &GuestMemoryMmap,
    vcpus: &[VcpuSnapshot],
) -> Result<CoreSummary, CoredumpError> {
    let shown = path.display().to_string();
    let name = path
        .file_name()
        .ok_or_else(|| CoredumpError::Url {
            url: format!("{FILE_SCHEME}{shown}"),
            reason: "the path names a directory, not a file".into(),
        })?
        .to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.ferry-tmp-{}", std::process::id()));
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|source| CoredumpError::Create {
            path: shown.clone(),
            tmp: tmp.display().to_string(),
            source,
        })?;
    let result = write_core(&file, &shown, mem, vcpus).and_then(|summary| {
        drop(file);
        std::fs::rename(&tmp, path).map_err(|source| CoredumpError::Rename {
            path: shown.clone(),
            tmp: tmp.display().to_string(),
            source,
        })?;
        Ok(summary)
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

// ---- reading ----

/// Why a core file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CoreReadError {
    #[error("cannot read core file {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not an x86-64 ELF64 core file: {reason}")]
    Format { path: String, reason: String },
    #[error("{path}: guest-physical range {gpa:#x}+{len:#x} is not inside one PT_LOAD")]
    NotCovered { path: String, gpa: u64, len: u64 },
}

/// One `PT_LOAD` of a core file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoreLoad {
    /// `p_paddr`: the guest-physical address.
    pub gpa: u64,
    pub vaddr: u64,
    /// Where its bytes are in the file.
    pub offset: u64,
    pub filesz: u64,
    pub memsz: u64,
    pub flags: u32,
    pub align: u64,
}

/// One note of a core file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CoreNote {
    /// Without its NUL.
    pub name: String,
    pub kind: u32,
    pub desc: Vec<u8>,
}

/// An ELF64 x86-64 core file, its program headers parsed: read guest RAM by address.
pub struct CoreFile {
    file: File,
    path: String,
    pub len: u64,
    pub loads: Vec<CoreLoad>,
    pub notes: Vec<CoreNote>,
}

fn get16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn get32(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

fn get64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// Parses a note segment; None when it is malformed.
fn parse_notes(b: &[u8]) -> Option<Vec<CoreNote>> {
    let mut notes = Vec::new();
    let mut at = 0usize;
    while at < b.len() {
        let head = b.get(at..at.checked_add(12)?)?;
        let namesz = get32(head, 0) as usize;
        let descsz = get32(head, 4) as usize;
        let kind = get32(head, 8);
        let name_at = at + 12;
        let desc_at = name_at.checked_add(namesz.checked_add(3)? & !3)?;
        let name = b.get(name_at..name_at.checked_add(namesz)?)?;
        let name = name.strip_suffix(&[0]).unwrap_or(name);
        let desc = b.get(desc_at..desc_at.checked_add(descsz)?)?;
        notes.push(CoreNote {
            name: String::from_utf8_lossy(name).into_owned(),
            kind,
            desc: desc.to_vec(),
        });
        at = desc_at.checked_add(descsz.checked_add(3)? & !3)?;
    }
    Some(notes)
}

impl CoreFile {
    /// Opens and checks `path`: an ELF64 little-endian `ET_CORE` for x86-64 whose program
    /// headers and segments lie within the file.
    pub fn open(path: &Path) -> Result<CoreFile, CoreReadError> {
        let shown = path.display().to_string();
        let io = |source| CoreReadError::Io {
            path: shown.clone(),
            source,
        };
        let bad = |reason: String| CoreReadError::Format {
            path: shown.clone(),
            reason,
        };
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let mut eh = [0u8; EHDR_SIZE];
        if len < EHDR_SIZE as u64 {
            return Err(bad(format!("{len} bytes, shorter than an ELF header")));
        }
        file.read_exact_at(&mut eh, 0).map_err(io)?;
        if &eh[..4] != b"\x7fELF" {
            return Err(bad(format!("magic {:02x?}", &eh[..4])));
        }
        if eh[4] != 2 || eh[5] != 1 {
            return Err(bad(format!("class {} data {}", eh[4], eh[5])));
        }
        let (etype, machine) = (get16(&eh, 16), get16(&eh, 18));
        if etype != ET_CORE || machine != EM_X86_64 {
            return Err(bad(format!("e_type {etype}, e_machine {machine}")));
        }
        let phoff = get64(&eh, 32);
        let phentsize = get16(&eh, 54) as usize;
        let phnum = get16(&eh, 56) as usize;
        if phentsize != PHDR_SIZE {
            return Err(bad(format!("e_phentsize {phentsize}")));
        }
        let table = (phnum * PHDR_SIZE) as u64;
        if phoff.checked_add(table).is_none_or(|end| end > len) {
            return Err(bad(format!(
                "{phnum} program headers at {phoff} pass the end of the file ({len} bytes)"
            )));
        }
        let mut ph = vec![0u8; table as usize];
        file.read_exact_at(&mut ph, phoff).map_err(io)?;
        let mut loads = Vec::new();
        let mut notes = Vec::new();
        for (i, p) in ph.chunks_exact(PHDR_SIZE).enumerate() {
            let (kind, offset, filesz) = (get32(p, 0), get64(p, 8), get64(p, 32));
            if (kind == PT_LOAD || kind == PT_NOTE)
                && offset.checked_add(filesz).is_none_or(|end| end > len)
            {
                return Err(bad(format!(
                    "segment {i} ({filesz} bytes at {offset}) passes the end of the file ({len} bytes)"
                )));
            }
            match kind {
                PT_LOAD => loads.push(CoreLoad {
                    gpa: get64(p, 24),
                    vaddr: get64(p, 16),
                    offset,
                    filesz,
                    memsz: get64(p, 40),
                    flags: get32(p, 4),
                    align: get64(p, 48),
                }),
                PT_NOTE => {
                    let n = usize::try_from(filesz)
                        .ok()
                        .filter(|n| *n <= 1 << 24)
                        .ok_or_else(|| bad(format!("note segment {i} of {filesz} bytes")))?;
                    let mut b = vec![0u8; n];
                    file.read_exact_at(&mut b, offset).map_err(io)?;
                    notes.extend(
                        parse_notes(&b)
                            .ok_or_else(|| bad(format!("note segment {i} is malformed")))?,
                    );
                }
                _ => {}
            }
        }
        Ok(CoreFile {
            file,
            path: shown,
            len,
            loads,
            notes,
        })
    }

    /// Guest RAM bytes in the file: the sum of the `PT_LOAD` file sizes.
    pub fn ram_bytes(&self) -> u64 {
        self.loads.iter().map(|l| l.filesz).sum()
    }

    /// Where guest-physical `gpa` is in the file, when `len` bytes from it lie in one
    /// `PT_LOAD`.
    pub fn file_offset(&self, gpa: u64, len: u64) -> Result<u64, CoreReadError> {
        self.loads
            .iter()
            .find(|l| gpa >= l.gpa && gpa.checked_add(len).is_some_and(|e| e <= l.gpa + l.filesz))
            .map(|l| l.offset + (gpa - l.gpa))
            .ok_or_else(|| CoreReadError::NotCovered {
                path: self.path.clone(),
                gpa,
                len,
            })
    }

    /// Reads guest RAM at `gpa` into `buf` (the range must lie in one `PT_LOAD`).
    pub fn read_at(&self, gpa: u64, buf: &mut [u8]) -> Result<(), CoreReadError> {
        let at = self.file_offset(gpa, buf.len() as u64)?;
        self.file
            .read_exact_at(buf, at)
            .map_err(|source| CoreReadError::Io {
                path: self.path.clone(),
                source,
            })
    }

    /// The first byte of each of `pages` 4 KiB pages from `gpa` (read a chunk at a time).
    pub fn first_bytes_of_pages(&self, gpa: u64, pages: u64) -> Result<Vec<u8>, CoreReadError> {
        let page = DATA_ALIGN;
        let per_chunk = (CHUNK as u64) / page;
        let mut out = Vec::with_capacity(pages as usize);
        let mut buf = vec![0u8; CHUNK];
        let mut done = 0;
        while done < pages {
            let n = (pages - done).min(per_chunk);
            // Up to the first byte of the last page: no need to read past the range.
            let bytes = ((n - 1) * page + 1) as usize;
            self.read_at(gpa + done * page, &mut buf[..bytes])?;
            out.extend(buf[..bytes].iter().step_by(page as usize));
            done += n;
        }
        Ok(out)
    }

    /// The `NT_PRSTATUS` notes: (pr_pid, pr_reg) of each vCPU.
    pub fn prstatus(&self) -> Vec<(u32, [u64; 27])> {
        self.notes
            .iter()
            .filter(|n| n.name == "CORE" && n.kind == NT_PRSTATUS && n.desc.len() >= PRSTATUS_SIZE)
            .map(|n| {
                let mut regs = [0u64; 27];
                for (i, r) in regs.iter_mut().enumerate() {
                    *r = get64(&n.desc, PRSTATUS_REGS + i * 8);
                }
                (get32(&n.desc, PRSTATUS_PID), regs)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ferry-coredump-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Two regions with a hole between them; every page's first bytes name it, some pages
    /// left zero, a partly zero chunk and a last page that is non-zero.
    fn memory() -> GuestMemoryMmap {
        let m = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x4_0000),
            (GuestAddress(0x10_0000), 0x22_0000),
        ])
        .unwrap();
        for r in [0u64..0x4_0000, 0x10_0000..0x32_0000] {
            for gpa in r.step_by(4096) {
                if (gpa >> 12) % 3 != 0 {
                    m.write_slice(&gpa.to_le_bytes(), GuestAddress(gpa + 8))
                        .unwrap();
                }
            }
        }
        m.write_slice(b"last", GuestAddress(0x32_0000 - 4)).unwrap();
        m
    }

    fn vcpu(index: u32) -> VcpuSnapshot {
        VcpuSnapshot {
            index,
            rip: 0x1000 + u64::from(index),
            cr0: 0x8000_0011,
            cr3: 0x2_9000,
            cr4: 0x20,
            efer: 0x500,
            gprs: core::array::from_fn(|i| (i as u64 + 1) * 0x100 + u64::from(index)),
            rflags: 0x202,
            selectors: [0x8, 0x10, 0x18, 0x20, 0x28, 0x30],
            fs_base: 0xf5,
            gs_base: 0x65,
        }
    }

    #[test]
    fn what_is_written_reads_back() {
        let dir = tmpdir("roundtrip");
        let path = dir.join("vm.core");
        let mem = memory();
        let vcpus = [vcpu(0), vcpu(1)];
        let s = write_core_file(&path, &mem, &vcpus).unwrap();
        assert_eq!(s.ram_bytes, 0x4_0000 + 0x22_0000);
        assert_eq!((s.regions, s.vcpus), (2, 2));
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), s.file_len);
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        // Only the core is in the directory: no temporary file is left.
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["vm.core"]);

        let core = CoreFile::open(&path).unwrap();
        assert_eq!(core.ram_bytes(), s.ram_bytes);
        assert_eq!(core.loads.len(), 2);
        for (l, (gpa, size)) in core
            .loads
            .iter()
            .zip([(0u64, 0x4_0000u64), (0x10_0000, 0x22_0000)])
        {
            assert_eq!((l.gpa, l.vaddr, l.filesz, l.memsz), (gpa, gpa, size, size));
            assert_eq!(l.offset % 4096, 0);
            assert_eq!((l.flags, l.align), (7, 4096));
        }
        // Every byte of guest RAM is in the file at its address.
        for r in mem.iter() {
            let mut want = vec![0u8; r.len() as usize];
            mem.read_slice(&mut want, r.start_addr()).unwrap();
            let mut got = vec![0u8; want.len()];
            core.read_at(r.start_addr().0, &mut got).unwrap();
            assert!(got == want, "region at {:#x} differs", r.start_addr().0);
        }
        let mut tail = [0u8; 4];
        core.read_at(0x32_0000 - 4, &mut tail).unwrap();
        assert_eq!(&tail, b"last");
        // Ranges in the hole or across a region's end are refused.
        let mut b = [0u8; 16];
        assert!(matches!(
            core.read_at(0x8_0000, &mut b),
            Err(CoreReadError::NotCovered { gpa: 0x8_0000, .. })
        ));
        assert!(core.read_at(0x4_0000 - 8, &mut b).is_err());
        let firsts = core.first_bytes_of_pages(0x10_0000, 0x220).unwrap();
        assert_eq!(firsts.len(), 0x220);
        assert!(
            firsts.iter().all(|b| *b == 0),
            "bytes 0..8 of each page are zero"
        );

        // Registers.
        let pr = core.prstatus();
        assert_eq!(pr.len(), 2);
        for (i, (pid, regs)) in pr.iter().enumerate() {
            let v = vcpu(i as u32);
            assert_eq!(*pid, i as u32 + 1);
            assert_eq!(regs[PR_REG_RIP], v.rip);
            assert_eq!(regs[PR_REG_RSP], v.gprs[6]);
            assert_eq!(regs[10], v.gprs[0], "rax");
            assert_eq!(regs[0], v.gprs[15], "r15");
            assert_eq!(regs[17], 0x8, "cs");
            assert_eq!(regs[18], 0x202, "rflags");
            assert_eq!(regs[26], 0x30, "gs");
        }
        let ctl: Vec<_> = core.notes.iter().filter(|n| n.name == "FERRY").collect();
        assert_eq!(ctl.len(), 2);
        assert_eq!(ctl[1].kind, NT_FERRY_CONTROL);
        assert_eq!(get64(&ctl[1].desc, 0), 1);
        assert_eq!(get64(&ctl[1].desc, 16), 0x2_9000, "cr3");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// `readelf` (binutils), an independent parser, agrees with the layout.
    #[test]
    fn readelf_reads_it() {
        let dir = tmpdir("readelf");
        let path = dir.join("vm.core");
        write_core_file(&path, &memory(), &[vcpu(0)]).unwrap();
        let out = match std::process::Command::new("readelf")
            .args(["-h", "-l", "-n", "-W"])
            .arg(&path)
            .output()
        {
            Ok(o) => o,
            Err(e) => {
                eprintln!("readelf not available ({e}): cross-check skipped");
                return;
            }
        };
        let text = String::from_utf8_lossy(&out.stdout);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && err.trim().is_empty(),
            "{text}\n{err}"
        );
        assert!(text.contains("CORE (Core file)"), "{text}");
        assert!(text.contains("X86-64"), "{text}");
        let loads: Vec<&str> = text
            .lines()
            .filter(|l| l.trim_start().starts_with("LOAD"))
            .collect();
        assert_eq!(loads.len(), 2, "{text}");
        assert!(
            loads[1].contains("0x0000000000100000 0x0000000000100000 0x220000 0x220000"),
            "{text}"
        );
        assert!(text.contains("NT_PRSTATUS"), "{text}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn without_vcpus_there_is_no_note() {
        let dir = tmpdir("nonote");
        let path = dir.join("c");
        write_core_file(&path, &memory(), &[]).unwrap();
        let core = CoreFile::open(&path).unwrap();
        assert!(core.notes.is_empty());
        assert_eq!(core.loads.len(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn urls() {
        assert_eq!(
            destination_path("file:///var/tmp/vm.core").unwrap(),
            PathBuf::from("/var/tmp/vm.core")
        );
        for (url, needle) in [
            ("tcp:127.0.0.1:7000", "only file://"),
            ("/var/tmp/vm.core", "only file://"),
            ("FILE:///x", "only file://"),
            ("file://host/x", "absolute"),
            ("file://relative", "absolute"),
            ("file://", "absolute"),
            ("file:///", "directory"),
            ("file:///tmp/", "directory"),
            ("file:///tmp/..", "directory"),
            ("file:///tmp/a\0b", "NUL"),
        ] {
            let e = destination_path(url).unwrap_err().to_string();
            assert!(e.contains(needle), "{url:?}: {e}");
            assert!(
                e.contains(&format!("{:?}", url)),
                "{url:?}: {e} does not name the url"
            );
        }
    }

    #[test]
    fn errors_name_the_path_and_leave_nothing_behind() {
        let dir = tmpdir("errors");
        let mem = memory();
        // A directory that does not exist.
        let missing = dir.join("no-such-dir/vm.core");
        let e = write_core_file(&missing, &mem, &[]).unwrap_err();
        assert!(matches!(e, CoredumpError::Create { .. }));
        assert!(e.to_string().contains(missing.to_str().unwrap()), "{e}");
        // The destination is a directory: everything is written, the rename fails, and
        // the temporary file goes.
        let taken = dir.join("taken");
        std::fs::create_dir(&taken).unwrap();
        std::fs::write(taken.join("keep"), b"x").unwrap();
        let e = write_core_file(&taken, &mem, &[vcpu(0)]).unwrap_err();
        assert!(matches!(e, CoredumpError::Rename { .. }), "{e}");
        assert!(e.to_string().contains(taken.to_str().unwrap()), "{e}");
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            names,
            ["taken"],
            "nothing else is left in {}",
            dir.display()
        );
        assert!(taken.join("keep").exists());
        // An existing file is replaced whole.
        let old = dir.join("old.core");
        std::fs::write(&old, vec![0xffu8; 8 << 20]).unwrap();
        let s = write_core_file(&old, &mem, &[]).unwrap();
        assert_eq!(std::fs::metadata(&old).unwrap().len(), s.file_len);
        assert_eq!(CoreFile::open(&old).unwrap().ram_bytes(), s.ram_bytes);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_reader_refuses_what_is_not_a_core_without_panicking() {
        let dir = tmpdir("reader");
        let good = dir.join("good");
        write_core_file(&good, &memory(), &[vcpu(0)]).unwrap();
        let bytes = std::fs::read(&good).unwrap();
        let bad = dir.join("bad");
        let mut cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![], "shorter"),
            (b"#!/bin/sh\n".repeat(10), "magic"),
            (bytes[..100].to_vec(), "end of the file"),
            (bytes[..5000].to_vec(), "end of the file"),
        ];
        let mut exec = bytes.clone();
        put16(&mut exec, 16, 2);
        cases.push((exec, "e_type 2"));
        let mut far = bytes.clone();
        put64(&mut far, EHDR_SIZE + PHDR_SIZE + 8, u64::MAX - 8);
        cases.push((far, "end of the file"));
        let mut note = bytes.clone();
        let note_at = get64(&bytes, EHDR_SIZE + 8) as usize;
        put32(&mut note, note_at, 0xffff_fff0); // namesz
        cases.push((note, "malformed"));
        for (b, needle) in cases {
            std::fs::write(&bad, &b).unwrap();
            let e = CoreFile::open(&bad).err().expect("refused");
            assert!(e.to_string().contains(needle), "{e}");
            assert!(e.to_string().contains(bad.to_str().unwrap()), "{e}");
        }
        let e = CoreFile::open(&dir.join("absent")).err().unwrap();
        assert!(e.to_string().contains("absent"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn too_many_regions_is_an_error() {
        let regions = vec![(0u64, 4096u64); PN_XNUM];
        assert!(matches!(
            headers(&regions, &[]),
            Err(CoredumpError::TooManyRegions { count: PN_XNUM, .. })
        ));
    }
}
