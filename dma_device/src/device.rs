// Copyright 2026 Ferry authors
// SPDX-License-Identifier: Apache-2.0

//! The device: BAR 0's registers and the DMA job, configuration space, DMA mappings and
//! logging, and migration, behind [`UserDevice`].
//!
//! Jobs run in one of two [`JobMode`]s. Synchronously, the doorbell write does the whole
//! job. Asynchronously, the doorbell checks the job (a refused one ends at once with its
//! status), sets STATUS BUSY and hands it to a worker thread, which writes it page by page
//! with a delay between pages. Both write through the one function [`run_pages`], which
//! writes every page with [`DmaSpace::write_page`] (so the DMA log sees every page).
//!
//! The registers and the DMA space are shared with the worker behind one mutex
//! ([`Engine`]). Whatever must not overlap a job waits for it first ([`Device::quiesce`],
//! bounded by [`QUIESCE_TIMEOUT`], then EIO naming the job): leaving RUNNING (so after the
//! STOP or STOP_COPY reply the device writes nothing, and the saved state holds the job's
//! results), DMA_UNMAP (a job never writes through a mapping that is going away), and
//! reset.

use std::fs::File;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use guest_pattern::user_device::{
    job_generation, BAR0_SIZE, MAGIC, MAX_JOB_BYTES, REG_ADDR, REG_DOORBELL, REG_GENERATION,
    REG_JOBS, REG_LEN, REG_MAGIC, REG_PAGES, REG_SEED, REG_STATUS, REG_VERSION, STATUS_BAD_JOB,
    STATUS_BUSY, STATUS_OK, STATUS_STOPPED, STATUS_UNMAPPED, VERSION,
};
use guest_pattern::{fill_page, PAGE_SIZE};
use log::{debug, info, warn};
use vfio_dirty::uapi::{
    VFIO_DEVICE_STATE_PRE_COPY, VFIO_DEVICE_STATE_RESUMING, VFIO_DEVICE_STATE_RUNNING,
    VFIO_DEVICE_STATE_STOP, VFIO_DEVICE_STATE_STOP_COPY, VFIO_MIGRATION_STOP_COPY,
};
use vfio_dirty::vfio_user::server::{Errno, UserDevice};
use vfio_dirty::vfio_user::wire::{
    DEVICE_FLAGS_PCI, DMA_MAP_WRITE, PCI_CONFIG_REGION, PCI_NUM_REGIONS, REGION_FLAG_READ,
    REGION_FLAG_WRITE,
};

use crate::config::{ConfigSpace, CONFIG_BYTES};
use crate::dma::{DmaSpace, PAGE};
use crate::state::{DeviceState, Registers, STATE_BYTES};

/// The BAR 0 region's index.
pub const BAR0_REGION: u32 = 0;
/// Most bytes of migration data taken while resuming (a blob is [`STATE_BYTES`]).
pub const MAX_RESUME_BYTES: usize = 4096;
/// The delay between two pages of an asynchronous job unless told otherwise.
pub const DEFAULT_PAGE_DELAY: Duration = Duration::from_micros(20);
/// How long leaving RUNNING, DMA_UNMAP or reset wait for a job in flight before they fail
/// with EIO.
pub const QUIESCE_TIMEOUT: Duration = Duration::from_secs(10);

// The high halves of the 64-bit registers, for 4-byte accesses.
const ADDR_HI: u64 = REG_ADDR + 4;
const LEN_HI: u64 = REG_LEN + 4;
const SEED_HI: u64 = REG_SEED + 4;
const GENERATION_HI: u64 = REG_GENERATION + 4;
const JOBS_HI: u64 = REG_JOBS + 4;
const PAGES_HI: u64 = REG_PAGES + 4;

fn lo(v: u64) -> u32 {
    v as u32
}

fn hi(v: u64) -> u32 {
    (v >> 32) as u32
}

fn set_lo(r: &mut u64, v: u32) {
    *r = (*r & !0xffff_ffff) | u64::from(v);
}

fn set_hi(r: &mut u64, v: u32) {
    *r = (*r & 0xffff_ffff) | u64::from(v) << 32;
}

/// A name for a device state, for the log.
pub fn state_name(s: u32) -> &'static str {
    match s {
        VFIO_DEVICE_STATE_STOP => "STOP",
        VFIO_DEVICE_STATE_RUNNING => "RUNNING",
        VFIO_DEVICE_STATE_STOP_COPY => "STOP_COPY",
        VFIO_DEVICE_STATE_RESUMING => "RESUMING",
        VFIO_DEVICE_STATE_PRE_COPY => "PRE_COPY",
        _ => "other",
    }
}

/// How a job the doorbell accepts runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobMode {
    /// Done before the doorbell write returns (the default).
    Sync,
    /// The doorbell write returns at once with STATUS BUSY; a worker thread writes the
    /// pages, `page_delay` apart, then sets STATUS OK.
    Async { page_delay: Duration },
}

/// A job the doorbell accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Job {
    /// Its number (JOBS after its doorbell).
    number: u64,
    addr: u64,
    len: u64,
    generation: u64,
}

impl std::fmt::Display for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "job {} ({:#x} bytes at {:#x})",
            self.number, self.len, self.addr
        )
    }
}

/// What the serve thread and a job's worker share.
struct Shared {
    regs: Registers,
    dma: DmaSpace,
    /// The job being written, if any.
    running: Option<Job>,
}

/// [`Shared`] behind its mutex, and the condition variable a job's end is announced on.
struct Engine {
    shared: Mutex<Shared>,
    idle: Condvar,
}

impl Engine {
    /// The shared state. A panicked holder leaves plain data behind (registers, mappings
    /// and bitmaps, each updated in one step), so a poisoned lock is taken as it is.
    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Writes `job`'s pages one by one, `delay` between two of them, each through
/// [`DmaSpace::write_page`] (which marks the DMA log) with the lock held for that page
/// only; then its results into the registers (PAGES, GENERATION, STATUS OK), the job no
/// longer running, and everyone waiting for that woken. The one way a job writes, in
/// either mode.
fn run_pages(engine: &Engine, job: Job, delay: Duration) {
    let mut buf = Box::new([0u8; PAGE_SIZE]);
    let mut written = 0u64;
    for a in (job.addr..job.addr + job.len).step_by(PAGE_SIZE) {
        if written > 0 && !delay.is_zero() {
            std::thread::sleep(delay);
        }
        fill_page(&mut buf, a, job.generation);
        // Checked writable at the doorbell, and nothing unmaps while a job runs (unmaps
        // wait for it), so this fails only if that wait timed out.
        let r = engine.lock().dma.write_page(a, &buf);
        if let Err(e) = r {
            warn!("{job}: write of page {a:#x} failed: errno {e}");
            break;
        }
        written += 1;
    }
    let mut s = engine.lock();
    s.regs.pages = s.regs.pages.wrapping_add(written);
    s.regs.status = STATUS_OK;
    s.regs.generation = job.generation;
    s.running = None;
    drop(s);
    engine.idle.notify_all();
    debug!(
        "{job}: {written} pages written, generation {:#x}",
        job.generation
    );
}

/// ferry-dma-device.
pub struct Device {
    engine: Arc<Engine>,
    mode: JobMode,
    /// The worker of the last asynchronous job (joined once the job is over).
    worker: Option<JoinHandle<()>>,
    /// How long [`Device::quiesce`] waits.
    quiesce_timeout: Duration,
    config: ConfigSpace,
    state: u32,
    /// STOP_COPY: the state blob and how much of it was read.
    saved: Option<(Vec<u8>, usize)>,
    /// RESUMING: the bytes written so far.
    resume: Vec<u8>,
}

impl Default for Device {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // A job in flight writes into mappings the worker keeps alive; wait for it so the
        // device ends with its writes, bounded as ever.
        let _ = self.quiesce("device dropped");
    }
}

impl Device {
    /// A device doing its jobs synchronously.
    pub fn new() -> Self {
        Self::with_mode(JobMode::Sync)
    }

    pub fn with_mode(mode: JobMode) -> Self {
        Device {
            engine: Arc::new(Engine {
                shared: Mutex::new(Shared {
                    regs: Registers::default(),
                    dma: DmaSpace::new(),
                    running: None,
                }),
                idle: Condvar::new(),
            }),
            mode,
            worker: None,
            quiesce_timeout: QUIESCE_TIMEOUT,
            config: ConfigSpace::default(),
            state: VFIO_DEVICE_STATE_RUNNING,
            saved: None,
            resume: Vec::new(),
        }
    }

    pub fn mode(&self) -> JobMode {
        self.mode
    }

    pub fn registers(&self) -> Registers {
        self.engine.lock().regs
    }

    pub fn config(&self) -> ConfigSpace {
        self.config
    }

    /// Number of DMA mappings.
    pub fn mappings(&self) -> usize {
        self.engine.lock().dma.len()
    }

    /// Waits until no job runs (at most `quiesce_timeout`), for `why` (a log phrase).
    /// EIO, naming the job, if it still runs then. Only the serve thread (this device's
    /// owner) starts jobs, so none starts after this returns until the next doorbell.
    fn quiesce(&mut self, why: &str) -> Result<(), Errno> {
        let s = self.engine.lock();
        if let Some(job) = s.running {
            info!("{why}: waiting for {job} to finish");
        }
        let (s, _) = self
            .engine
            .idle
            .wait_timeout_while(s, self.quiesce_timeout, |s| s.running.is_some())
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(job) = s.running {
            warn!(
                "{why}: {job} still running after {:?}: refused with EIO",
                self.quiesce_timeout
            );
            return Err(libc::EIO);
        }
        drop(s);
        if let Some(w) = self.worker.take() {
            if w.join().is_err() {
                warn!("{why}: the last job's worker panicked");
            }
        }
        Ok(())
    }

    /// The client went away: its mappings and the log go (that memory is not ours any
    /// more, and a new client maps its own), and an unfinished migration step is
    /// abandoned (back to RUNNING). A job in flight is waited for first (bounded; after
    /// that its remaining pages fail to write). Registers and configuration space stay,
    /// so a client that reconnects finds the device as the guest left it.
    pub fn client_gone(&mut self) {
        let _ = self.quiesce("client gone");
        let mut s = self.engine.lock();
        let n = s.dma.len();
        s.dma.unmap_all();
        s.dma.log_stop();
        drop(s);
        self.saved = None;
        self.resume = Vec::new();
        if self.state != VFIO_DEVICE_STATE_RUNNING {
            info!(
                "client gone in state {}: back to RUNNING",
                state_name(self.state)
            );
        }
        self.state = VFIO_DEVICE_STATE_RUNNING;
        if n > 0 {
            info!("client gone: dropped its {n} DMA mappings");
        }
    }

    fn reg_read32(r: &Registers, off: u64) -> u32 {
        match off {
            REG_MAGIC => MAGIC,
            REG_VERSION => VERSION,
            REG_ADDR => lo(r.addr),
            ADDR_HI => hi(r.addr),
            REG_LEN => lo(r.len),
            LEN_HI => hi(r.len),
            REG_SEED => lo(r.seed),
            SEED_HI => hi(r.seed),
            REG_STATUS => r.status,
            REG_GENERATION => lo(r.generation),
            GENERATION_HI => hi(r.generation),
            REG_JOBS => lo(r.jobs),
            JOBS_HI => hi(r.jobs),
            REG_PAGES => lo(r.pages),
            PAGES_HI => hi(r.pages),
            _ => 0,
        }
    }

    fn reg_write32(&mut self, off: u64, v: u32) {
        if off == REG_DOORBELL {
            self.doorbell();
            return;
        }
        let r = &mut self.engine.lock().regs;
        match off {
            REG_ADDR => set_lo(&mut r.addr, v),
            ADDR_HI => set_hi(&mut r.addr, v),
            REG_LEN => set_lo(&mut r.len, v),
            LEN_HI => set_hi(&mut r.len, v),
            REG_SEED => set_lo(&mut r.seed, v),
            SEED_HI => set_hi(&mut r.seed, v),
            _ => {}
        }
    }

    /// Checks a BAR 0 access: 4 or 8 bytes, naturally aligned, inside the BAR.
    fn reg_access(offset: u64, len: usize) -> Result<(), Errno> {
        let ok = matches!(len, 4 | 8)
            && offset.is_multiple_of(len as u64)
            && offset
                .checked_add(len as u64)
                .is_some_and(|e| e <= BAR0_SIZE);
        ok.then_some(()).ok_or(libc::EINVAL)
    }

    /// The doorbell: ignored while a job runs (STATUS BUSY); else one job, counted in
    /// JOBS. Refused at once (nothing written): STOPPED when the device is not running,
    /// BAD_JOB for an unaligned, empty or too long job, UNMAPPED when a page is not in a
    /// writable mapping. Accepted: done before this returns ([`JobMode::Sync`]), or STATUS
    /// BUSY and the job handed to a worker ([`JobMode::Async`]).
    fn doorbell(&mut self) {
        let mut s = self.engine.lock();
        if let Some(job) = s.running {
            debug!("doorbell while {job} runs: ignored");
            return;
        }
        s.regs.jobs = s.regs.jobs.wrapping_add(1);
        let Registers {
            addr,
            len,
            seed,
            jobs,
            ..
        } = s.regs;
        let status = if !matches!(
            self.state,
            VFIO_DEVICE_STATE_RUNNING | VFIO_DEVICE_STATE_PRE_COPY
        ) {
            STATUS_STOPPED
        } else if !addr.is_multiple_of(PAGE)
            || !len.is_multiple_of(PAGE)
            || len == 0
            || len > MAX_JOB_BYTES
            || addr.checked_add(len).is_none()
        {
            STATUS_BAD_JOB
        } else if !s.dma.writable(addr, len) {
            STATUS_UNMAPPED
        } else {
            STATUS_OK
        };
        if status != STATUS_OK {
            s.regs.status = status;
            warn!(
                "job {jobs} ({len:#x} bytes at {addr:#x}) refused: status {status} ({})",
                match status {
                    STATUS_STOPPED => "device not running",
                    STATUS_BAD_JOB => "bad address or length",
                    _ => "not in a writable DMA mapping",
                }
            );
            return;
        }
        let job = Job {
            number: jobs,
            addr,
            len,
            generation: job_generation(seed, jobs),
        };
        s.running = Some(job);
        let JobMode::Async { page_delay } = self.mode else {
            drop(s);
            run_pages(&self.engine, job, Duration::ZERO);
            return;
        };
        s.regs.status = STATUS_BUSY;
        drop(s);
        // The last worker is done (nothing runs): collect it.
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
        let engine = Arc::clone(&self.engine);
        let spawned = std::thread::Builder::new()
            .name(format!("dma-job-{jobs}"))
            .spawn(move || run_pages(&engine, job, page_delay));
        match spawned {
            Ok(w) => {
                debug!("{job}: started, {page_delay:?} between pages");
                self.worker = Some(w);
            }
            Err(e) => {
                warn!("{job}: no worker thread ({e}): written before the doorbell returns");
                run_pages(&self.engine, job, Duration::ZERO);
            }
        }
    }

    fn save(&self) -> Vec<u8> {
        DeviceState {
            regs: self.registers(),
            config: self.config,
        }
        .encode()
    }

    /// Leaving RESUMING: the blob written becomes the device's state, or EINVAL.
    fn restore(&mut self) -> Result<(), Errno> {
        match DeviceState::decode(&self.resume) {
            Ok(s) => {
                self.engine.lock().regs = s.regs;
                self.config = s.config;
                self.resume = Vec::new();
                info!(
                    "state restored: {} jobs, {} pages, generation {:#x}",
                    s.regs.jobs, s.regs.pages, s.regs.generation
                );
                Ok(())
            }
            Err(e) => {
                warn!("migration data refused: {e}");
                Err(libc::EINVAL)
            }
        }
    }
}

impl UserDevice for Device {
    fn info(&self) -> (u32, u32, u32) {
        (DEVICE_FLAGS_PCI, PCI_NUM_REGIONS, 1)
    }

    fn region(&self, index: u32) -> Result<(u32, u64), Errno> {
        let rw = REGION_FLAG_READ | REGION_FLAG_WRITE;
        match index {
            BAR0_REGION => Ok((rw, BAR0_SIZE)),
            PCI_CONFIG_REGION => Ok((rw, CONFIG_BYTES)),
            i if i < PCI_NUM_REGIONS => Ok((0, 0)),
            _ => Err(libc::EINVAL),
        }
    }

    fn irq(&self, index: u32) -> Result<(u32, u32), Errno> {
        match index {
            0 => Ok((0, 0)),
            _ => Err(libc::EINVAL),
        }
    }

    fn set_irqs(
        &mut self,
        index: u32,
        _flags: u32,
        _start: u32,
        count: u32,
        files: Vec<File>,
    ) -> Result<(), Errno> {
        // No interrupts: only "none of them" is a setting that holds.
        if index == 0 && count == 0 && files.is_empty() {
            Ok(())
        } else {
            Err(libc::EINVAL)
        }
    }

    fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> Result<(), Errno> {
        match region {
            BAR0_REGION => {
                Self::reg_access(offset, data.len())?;
                // Both halves of an 8-byte access from one look at the registers.
                let r = self.registers();
                let mut v = u64::from(Self::reg_read32(&r, offset));
                if data.len() == 8 {
                    v |= u64::from(Self::reg_read32(&r, offset + 4)) << 32;
                }
                data.copy_from_slice(&v.to_le_bytes()[..data.len()]);
                Ok(())
            }
            PCI_CONFIG_REGION => self.config.read(offset, data),
            _ => Err(libc::EINVAL),
        }
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), Errno> {
        match region {
            BAR0_REGION => {
                Self::reg_access(offset, data.len())?;
                let mut b = [0u8; 8];
                b[..data.len()].copy_from_slice(data);
                let v = u64::from_le_bytes(b);
                self.reg_write32(offset, lo(v));
                if data.len() == 8 {
                    self.reg_write32(offset + 4, hi(v));
                }
                Ok(())
            }
            PCI_CONFIG_REGION => {
                let before = self.config;
                self.config.write(offset, data)?;
                if self.config != before {
                    debug!("config space: {before:?} -> {:?}", self.config);
                }
                Ok(())
            }
            _ => Err(libc::EINVAL),
        }
    }

    fn dma_map(
        &mut self,
        flags: u32,
        address: u64,
        size: u64,
        file: File,
        offset: u64,
    ) -> Result<(), Errno> {
        let rw = if flags & DMA_MAP_WRITE != 0 {
            "rw"
        } else {
            "ro"
        };
        let mut s = self.engine.lock();
        let r = s.dma.map(flags, address, size, &file, offset);
        let n = s.dma.len();
        drop(s);
        match r {
            Ok(()) => {
                info!(
                    "DMA map [{address:#x}, {:#x}) {rw} (file offset {offset:#x}), {n} mappings",
                    address.wrapping_add(size),
                );
                Ok(())
            }
            Err(e) => {
                warn!(
                    "DMA map of {size:#x} bytes at {address:#x} {rw} (file offset {offset:#x}) refused: {}",
                    std::io::Error::from_raw_os_error(e)
                );
                Err(e)
            }
        }
    }

    /// Waits for a job in flight first (bounded: EIO and nothing unmapped if it still
    /// runs), so a job never writes through a mapping that is going away.
    fn dma_unmap(&mut self, address: u64, size: u64) -> Result<(), Errno> {
        self.quiesce("DMA unmap")?;
        let r = self.engine.lock().dma.unmap(address, size);
        match r {
            Ok(n) => {
                info!("DMA unmap of {size:#x} bytes at {address:#x}: {n} mappings gone");
                Ok(())
            }
            Err(e) => {
                warn!(
                    "DMA unmap of {size:#x} bytes at {address:#x} refused: {}",
                    std::io::Error::from_raw_os_error(e)
                );
                Err(e)
            }
        }
    }

    /// Registers cleared, state RUNNING; mappings kept. Configuration space is kept (as the
    /// kernel's VFIO reset restores it), and so is the DMA log: a page written before the
    /// reset and not yet reported still has to reach the destination. A job in flight is
    /// waited for first (bounded: EIO and nothing reset if it still runs).
    fn reset(&mut self) -> Result<(), Errno> {
        info!("reset");
        self.quiesce("reset")?;
        self.engine.lock().regs = Registers::default();
        self.state = VFIO_DEVICE_STATE_RUNNING;
        self.saved = None;
        self.resume = Vec::new();
        Ok(())
    }

    fn migration_flags(&self) -> Option<u64> {
        Some(VFIO_MIGRATION_STOP_COPY)
    }

    fn set_state(&mut self, new: u32) -> Result<(), Errno> {
        use vfio_dirty::uapi::{
            VFIO_DEVICE_STATE_RESUMING as RESUMING, VFIO_DEVICE_STATE_RUNNING as RUNNING,
            VFIO_DEVICE_STATE_STOP as STOP, VFIO_DEVICE_STATE_STOP_COPY as STOP_COPY,
        };
        let cur = self.state;
        if new == cur {
            return Ok(());
        }
        match (cur, new) {
            // Leaving RUNNING: the job in flight ends first, so after this reply the device
            // writes nothing, and a saved state holds the job's results.
            (RUNNING, STOP) => self.quiesce("RUNNING -> STOP")?,
            (STOP, RUNNING) => {}
            (STOP | RUNNING, STOP_COPY) => {
                if cur == RUNNING {
                    self.quiesce("RUNNING -> STOP_COPY")?;
                }
                let blob = self.save();
                let r = self.registers();
                info!(
                    "state saved ({} bytes): {} jobs, {} pages",
                    blob.len(),
                    r.jobs,
                    r.pages
                );
                self.saved = Some((blob, 0));
            }
            (STOP_COPY, STOP) => self.saved = None,
            (STOP, RESUMING) => self.resume = Vec::new(),
            (RESUMING, STOP) => self.restore()?,
            _ => {
                warn!(
                    "state change {} ({cur}) -> {} ({new}) refused",
                    state_name(cur),
                    state_name(new)
                );
                return Err(libc::EINVAL);
            }
        }
        info!("state {} -> {}", state_name(cur), state_name(new));
        self.state = new;
        Ok(())
    }

    fn state(&self) -> u32 {
        self.state
    }

    fn mig_data_read(&mut self, max: usize) -> Result<Vec<u8>, Errno> {
        let (blob, at) = self.saved.as_mut().ok_or(libc::EINVAL)?;
        let n = max.min(blob.len() - *at);
        let out = blob[*at..*at + n].to_vec();
        *at += n;
        Ok(out)
    }

    fn mig_data_write(&mut self, data: &[u8]) -> Result<(), Errno> {
        if self.state != VFIO_DEVICE_STATE_RESUMING {
            return Err(libc::EINVAL);
        }
        if self.resume.len() + data.len() > MAX_RESUME_BYTES {
            warn!("migration data: more than {MAX_RESUME_BYTES} bytes (a state is {STATE_BYTES})");
            return Err(libc::EINVAL);
        }
        self.resume.extend_from_slice(data);
        Ok(())
    }

    fn can_log(&self) -> bool {
        true
    }

    fn log_start(&mut self, page_size: u64, ranges: &[(u64, u64)]) -> Result<(), Errno> {
        let r = self.engine.lock().dma.log_start(page_size, ranges);
        match r {
            Ok(()) => info!(
                "DMA logging started: page size {page_size}, {}",
                if ranges.is_empty() {
                    "everything mapped".to_string()
                } else {
                    format!("{} ranges", ranges.len())
                }
            ),
            Err(e) => warn!("DMA logging start (page size {page_size}) refused: errno {e}"),
        }
        r
    }

    fn log_stop(&mut self) -> Result<(), Errno> {
        info!("DMA logging stopped");
        self.engine.lock().dma.log_stop();
        Ok(())
    }

    fn log_report(
        &mut self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u8],
    ) -> Result<(), Errno> {
        // Under the lock a worker writes its pages with: every page written so far is in.
        let r = self
            .engine
            .lock()
            .dma
            .log_report(iova, length, page_size, bitmap);
        if let Err(e) = r {
            warn!("DMA log report of {length:#x} bytes at {iova:#x} refused: errno {e}");
        }
        r
    }

    fn client_capabilities(&mut self, capabilities: &str) {
        debug!("client capabilities {capabilities}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dma::tests::memfd;
    use guest_pattern::{check_page, PageCheck};
    use std::os::unix::fs::FileExt;
    use vfio_dirty::uapi::VFIO_DEVICE_STATE_ERROR;
    use vfio_dirty::vfio_user::wire::DMA_MAP_READ;

    const RUNNING: u32 = VFIO_DEVICE_STATE_RUNNING;
    const STOP: u32 = VFIO_DEVICE_STATE_STOP;
    const STOP_COPY: u32 = VFIO_DEVICE_STATE_STOP_COPY;
    const RESUMING: u32 = VFIO_DEVICE_STATE_RESUMING;

    fn w64(d: &mut Device, off: u64, v: u64) {
        d.region_write(BAR0_REGION, off, &v.to_le_bytes()).unwrap();
    }

    fn r64(d: &mut Device, off: u64) -> u64 {
        let mut b = [0u8; 8];
        d.region_read(BAR0_REGION, off, &mut b).unwrap();
        u64::from_le_bytes(b)
    }

    fn r32(d: &mut Device, off: u64) -> u32 {
        let mut b = [0u8; 4];
        d.region_read(BAR0_REGION, off, &mut b).unwrap();
        u32::from_le_bytes(b)
    }

    /// A memfd of `len` bytes mapped read-write for `d` at DMA address `address`.
    fn map_rw(d: &mut Device, address: u64, len: u64) -> File {
        let f = memfd(len);
        d.dma_map(
            DMA_MAP_READ | DMA_MAP_WRITE,
            address,
            len,
            f.try_clone().unwrap(),
            0,
        )
        .unwrap();
        f
    }

    fn job(d: &mut Device, addr: u64, len: u64, seed: u64) -> u32 {
        w64(d, REG_ADDR, addr);
        w64(d, REG_LEN, len);
        w64(d, REG_SEED, seed);
        d.region_write(BAR0_REGION, REG_DOORBELL, &1u32.to_le_bytes())
            .unwrap();
        r32(d, REG_STATUS)
    }

    #[test]
    fn registers_by_halves_and_whole() {
        let mut d = Device::new();
        assert_eq!(r32(&mut d, REG_MAGIC), MAGIC);
        assert_eq!(r32(&mut d, REG_VERSION), VERSION);
        assert_eq!(
            r64(&mut d, REG_MAGIC),
            u64::from(MAGIC) | u64::from(VERSION) << 32
        );
        d.region_write(0, REG_SEED, &0x1111_2222u32.to_le_bytes())
            .unwrap();
        d.region_write(0, REG_SEED + 4, &0x3333_4444u32.to_le_bytes())
            .unwrap();
        assert_eq!(r64(&mut d, REG_SEED), 0x3333_4444_1111_2222);
        assert_eq!(r32(&mut d, REG_SEED + 4), 0x3333_4444);
        w64(&mut d, REG_ADDR, 0xaaaa_bbbb_cccc_d000);
        assert_eq!(r64(&mut d, REG_ADDR), 0xaaaa_bbbb_cccc_d000);
        // Read-only registers ignore writes; unknown offsets read 0.
        w64(&mut d, REG_JOBS, 99);
        assert_eq!(r64(&mut d, REG_JOBS), 0);
        w64(&mut d, REG_MAGIC, 0);
        assert_eq!(r32(&mut d, REG_MAGIC), MAGIC);
        assert_eq!(r64(&mut d, 0x800), 0);
        assert_eq!(r32(&mut d, REG_DOORBELL), 0);
        // Sizes and alignment.
        for (off, n) in [
            (0u64, 1usize),
            (0, 2),
            (0, 16),
            (4, 8),
            (2, 4),
            (BAR0_SIZE, 4),
            (u64::MAX - 3, 4),
        ] {
            let mut b = vec![0u8; n];
            assert_eq!(
                d.region_read(0, off, &mut b),
                Err(libc::EINVAL),
                "{off:#x}+{n}"
            );
            assert_eq!(
                d.region_write(0, off, &b),
                Err(libc::EINVAL),
                "{off:#x}+{n}"
            );
        }
        assert_eq!(d.region_read(1, 0, &mut [0u8; 4]), Err(libc::EINVAL));
        assert_eq!(d.region(9), Err(libc::EINVAL));
        assert_eq!(d.region(3), Ok((0, 0)));
    }

    #[test]
    fn a_job_fills_pages_and_counts() {
        let mut d = Device::new();
        let f = map_rw(&mut d, 0x40_0000, 8 * PAGE);
        assert_eq!(job(&mut d, 0x40_1000, 3 * PAGE, 77), STATUS_OK);
        let g = job_generation(77, 1);
        assert_eq!(r64(&mut d, REG_GENERATION), g);
        assert_eq!(r64(&mut d, REG_PAGES), 3);
        let mut buf = [0u8; PAGE_SIZE];
        for p in 0..8u64 {
            f.read_exact_at(&mut buf, p * PAGE).unwrap();
            let gpa = 0x40_0000 + p * PAGE;
            let r = check_page(&buf, gpa);
            if (1..4).contains(&p) {
                assert!(guest_pattern::page_matches(&buf, gpa, g), "page {p}");
            } else {
                assert_eq!(r, PageCheck::NotWritten { generation: 0 }, "page {p}");
            }
        }
        // Refused jobs count but write nothing and keep the generation.
        assert_eq!(job(&mut d, 0x40_0800, PAGE, 1), STATUS_BAD_JOB);
        assert_eq!(job(&mut d, 0x40_0000, 0, 1), STATUS_BAD_JOB);
        assert_eq!(job(&mut d, 0, MAX_JOB_BYTES + PAGE, 1), STATUS_BAD_JOB);
        assert_eq!(job(&mut d, !(PAGE - 1), 2 * PAGE, 1), STATUS_BAD_JOB);
        assert_eq!(job(&mut d, 0x40_7000, 2 * PAGE, 1), STATUS_UNMAPPED);
        assert_eq!(r64(&mut d, REG_JOBS), 6);
        assert_eq!(r64(&mut d, REG_PAGES), 3);
        assert_eq!(r64(&mut d, REG_GENERATION), g);
        f.read_exact_at(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        // The next job's generation follows the job count.
        assert_eq!(job(&mut d, 0x40_0000, PAGE, 5), STATUS_OK);
        assert_eq!(r64(&mut d, REG_GENERATION), job_generation(5, 7));
    }

    #[test]
    fn legal_and_illegal_state_arcs() {
        let mut d = Device::new();
        assert_eq!(d.state(), RUNNING);
        let illegal = [
            (RUNNING, RESUMING),
            (RUNNING, VFIO_DEVICE_STATE_ERROR),
            (RUNNING, VFIO_DEVICE_STATE_PRE_COPY),
            (RUNNING, 99),
            (STOP, VFIO_DEVICE_STATE_PRE_COPY),
            (STOP_COPY, RUNNING),
            (STOP_COPY, RESUMING),
            (RESUMING, RUNNING),
            (RESUMING, STOP_COPY),
        ];
        let reach = |d: &mut Device, s: u32| {
            d.reset().unwrap();
            match s {
                RUNNING => {}
                STOP => d.set_state(STOP).unwrap(),
                STOP_COPY => d.set_state(STOP_COPY).unwrap(),
                RESUMING => {
                    d.set_state(STOP).unwrap();
                    d.set_state(RESUMING).unwrap();
                }
                _ => unreachable!(),
            }
            assert_eq!(d.state(), s);
        };
        for (from, to) in illegal {
            reach(&mut d, from);
            assert_eq!(d.set_state(to), Err(libc::EINVAL), "{from} -> {to}");
            assert_eq!(d.state(), from);
        }
        let legal = [
            (RUNNING, STOP),
            (STOP, RUNNING),
            (STOP, STOP_COPY),
            (STOP_COPY, STOP),
            (STOP, RESUMING),
            (RUNNING, STOP_COPY),
            (STOP, STOP),
            (RUNNING, RUNNING),
        ];
        for (from, to) in legal {
            reach(&mut d, from);
            assert_eq!(d.set_state(to), Ok(()), "{from} -> {to}");
            assert_eq!(d.state(), to);
        }
        // RESUMING -> STOP is legal with a good blob only.
        reach(&mut d, RESUMING);
        assert_eq!(d.set_state(STOP), Err(libc::EINVAL));
        assert_eq!(d.state(), RESUMING);
        let good = Device::new().save();
        d.mig_data_write(&good).unwrap();
        assert_eq!(d.set_state(STOP), Ok(()));
    }

    #[test]
    fn stopped_device_refuses_jobs() {
        let mut d = Device::new();
        let f = map_rw(&mut d, 0, PAGE);
        d.set_state(STOP).unwrap();
        assert_eq!(job(&mut d, 0, PAGE, 1), STATUS_STOPPED);
        d.set_state(STOP_COPY).unwrap();
        assert_eq!(job(&mut d, 0, PAGE, 1), STATUS_STOPPED);
        let mut buf = [0u8; PAGE_SIZE];
        f.read_exact_at(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        d.set_state(STOP).unwrap();
        d.set_state(RUNNING).unwrap();
        assert_eq!(job(&mut d, 0, PAGE, 1), STATUS_OK);
        assert_eq!(r64(&mut d, REG_JOBS), 3);
    }

    #[test]
    fn migration_data_in_chunks_and_bounded() {
        let mut d = Device::new();
        assert_eq!(d.mig_data_read(10), Err(libc::EINVAL));
        assert_eq!(d.mig_data_write(&[1]), Err(libc::EINVAL));
        w64(&mut d, REG_SEED, 42);
        d.config.write(0x10, &[0, 0x20, 0, 0xfe]).unwrap();
        d.set_state(STOP).unwrap();
        d.set_state(STOP_COPY).unwrap();
        let mut blob = Vec::new();
        loop {
            let part = d.mig_data_read(10).unwrap();
            if part.is_empty() {
                break;
            }
            assert!(part.len() <= 10);
            blob.extend(part);
        }
        assert_eq!(blob.len(), STATE_BYTES);
        let mut e = Device::new();
        e.set_state(STOP).unwrap();
        e.set_state(RESUMING).unwrap();
        assert_eq!(
            e.mig_data_write(&vec![0; MAX_RESUME_BYTES + 1]),
            Err(libc::EINVAL)
        );
        for c in blob.chunks(7) {
            e.mig_data_write(c).unwrap();
        }
        e.set_state(STOP).unwrap();
        assert_eq!(e.registers(), d.registers());
        assert_eq!(e.config(), d.config());
        assert_eq!(e.config().bar0, 0xfe00_2000);
    }

    #[test]
    fn reset_and_client_gone() {
        let mut d = Device::new();
        let _ram = map_rw(&mut d, 0, PAGE);
        assert_eq!(job(&mut d, 0, PAGE, 1), STATUS_OK);
        d.set_state(STOP).unwrap();
        d.reset().unwrap();
        assert_eq!(d.state(), RUNNING);
        assert_eq!(d.registers(), Registers::default());
        assert_eq!(d.mappings(), 1);
        assert_eq!(job(&mut d, 0, PAGE, 1), STATUS_OK);
        d.set_state(STOP).unwrap();
        d.client_gone();
        assert_eq!(d.state(), RUNNING);
        assert_eq!(d.mappings(), 0);
        assert_eq!(r64(&mut d, REG_JOBS), 1);
        assert_eq!(job(&mut d, 0, PAGE, 1), STATUS_UNMAPPED);
    }

    fn async_device(page_delay: Duration) -> Device {
        Device::with_mode(JobMode::Async { page_delay })
    }

    /// Polls STATUS until it is not BUSY (bounded); that status.
    fn wait_not_busy(d: &mut Device) -> u32 {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let s = r32(d, REG_STATUS);
            if s != STATUS_BUSY {
                return s;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "still BUSY after 10 s"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn an_async_job_is_busy_then_ok_and_ignores_doorbells_meanwhile() {
        let mut d = async_device(Duration::from_millis(20));
        let f = map_rw(&mut d, 0x40_0000, 8 * PAGE);
        d.log_start(PAGE, &[]).unwrap();
        assert_eq!(job(&mut d, 0x40_0000, 4 * PAGE, 3), STATUS_BUSY);
        assert_eq!(r64(&mut d, REG_JOBS), 1);
        // Ignored while BUSY: not counted, and the running job keeps its registers' values.
        assert_eq!(job(&mut d, 0x40_4000, PAGE, 9), STATUS_BUSY);
        assert_eq!(r64(&mut d, REG_JOBS), 1);
        assert_eq!(wait_not_busy(&mut d), STATUS_OK);
        let g = job_generation(3, 1);
        assert_eq!(r64(&mut d, REG_GENERATION), g);
        assert_eq!(r64(&mut d, REG_PAGES), 4);
        let mut buf = [0u8; PAGE_SIZE];
        for p in 0..8u64 {
            f.read_exact_at(&mut buf, p * PAGE).unwrap();
            let gpa = 0x40_0000 + p * PAGE;
            assert_eq!(guest_pattern::page_matches(&buf, gpa, g), p < 4, "page {p}");
        }
        let mut bitmap = [0u8; 1];
        d.log_report(0x40_0000, 8 * PAGE, PAGE, &mut bitmap)
            .unwrap();
        assert_eq!(bitmap, [0b1111]);
        // Refused jobs end at once, never BUSY.
        assert_eq!(job(&mut d, 0x40_0800, PAGE, 1), STATUS_BAD_JOB);
        assert_eq!(job(&mut d, 0x50_0000, PAGE, 1), STATUS_UNMAPPED);
        assert_eq!(r64(&mut d, REG_JOBS), 3);
    }

    #[test]
    fn leaving_running_saves_the_finished_job() {
        let mut d = async_device(Duration::from_millis(20));
        let f = map_rw(&mut d, 0, 4 * PAGE);
        assert_eq!(job(&mut d, 0, 4 * PAGE, 5), STATUS_BUSY);
        d.set_state(STOP_COPY).unwrap();
        let saved = DeviceState::decode(&d.mig_data_read(STATE_BYTES).unwrap()).unwrap();
        assert_eq!(saved.regs.status, STATUS_OK);
        assert_eq!(saved.regs.pages, 4);
        assert_eq!(saved.regs.generation, job_generation(5, 1));
        let mut buf = [0u8; PAGE_SIZE];
        f.read_exact_at(&mut buf, 3 * PAGE).unwrap();
        assert!(guest_pattern::page_matches(
            &buf,
            3 * PAGE,
            job_generation(5, 1)
        ));
    }

    #[test]
    fn a_job_outlasting_the_wait_fails_stop_unmap_and_reset_with_eio() {
        // A job of about 750 ms against waits of 20 ms.
        let mut d = async_device(Duration::from_millis(250));
        d.quiesce_timeout = Duration::from_millis(20);
        let _ram = map_rw(&mut d, 0, 4 * PAGE);
        assert_eq!(job(&mut d, 0, 4 * PAGE, 5), STATUS_BUSY);
        assert_eq!(d.set_state(STOP), Err(libc::EIO));
        assert_eq!(d.state(), RUNNING);
        assert_eq!(d.set_state(STOP_COPY), Err(libc::EIO));
        assert_eq!(d.dma_unmap(0, 4 * PAGE), Err(libc::EIO));
        assert_eq!(d.mappings(), 1);
        assert_eq!(d.reset(), Err(libc::EIO));
        assert_eq!(r64(&mut d, REG_JOBS), 1);
        d.quiesce_timeout = QUIESCE_TIMEOUT;
        assert_eq!(d.set_state(STOP), Ok(()));
        assert_eq!(r32(&mut d, REG_STATUS), STATUS_OK);
        assert_eq!(r64(&mut d, REG_PAGES), 4);
        // Reset and unmap with nothing running go through.
        assert_eq!(d.dma_unmap(0, 4 * PAGE), Ok(()));
        assert_eq!(d.reset(), Ok(()));
        assert_eq!(d.registers(), Registers::default());
    }

    #[test]
    fn irqs_and_info() {
        let mut d = Device::new();
        assert_eq!(d.info(), (DEVICE_FLAGS_PCI, 9, 1));
        assert_eq!(d.irq(0), Ok((0, 0)));
        assert_eq!(d.irq(1), Err(libc::EINVAL));
        assert_eq!(d.set_irqs(0, 0, 0, 0, Vec::new()), Ok(()));
        assert_eq!(d.set_irqs(0, 0, 0, 1, Vec::new()), Err(libc::EINVAL));
        assert_eq!(
            d.region(PCI_CONFIG_REGION),
            Ok((REGION_FLAG_READ | REGION_FLAG_WRITE, 256))
        );
        assert_eq!(
            d.region(0),
            Ok((REGION_FLAG_READ | REGION_FLAG_WRITE, BAR0_SIZE))
        );
    }
}
