//! The register contract of `ferry-dma-device`, the vfio-user device server in
//! `dma_device/`, shared by that server and the test guest's driver (`dma=vfio-user`).
//!
//! The device has one memory BAR (BAR 0, [`BAR0_SIZE`] bytes) and no interrupts: the guest
//! programs a job and rings the doorbell, then reads [`REG_STATUS`] and [`REG_GENERATION`].
//!
//! - Synchronous mode (the default): the device has finished the job (every page written
//!   by DMA, or nothing written and a status saying why) when the doorbell write returns;
//!   STATUS is never [`STATUS_BUSY`].
//! - Asynchronous mode (`ferry-dma-device --async-jobs`): a job the device refuses still
//!   ends at once with its status, but an accepted one makes the doorbell write return at
//!   once with STATUS [`STATUS_BUSY`] while the device writes the pages in the background.
//!   The guest polls STATUS until it is not BUSY; only then do [`REG_GENERATION`],
//!   [`REG_JOBS`] and [`REG_PAGES`] describe the job. A doorbell write while STATUS is
//!   BUSY is ignored: no job starts and it is counted nowhere (not in JOBS).
//!
//! A driver that polls while STATUS is BUSY works with both modes.
//!
//! A job writes [`crate::fill_page`] of generation [`job_generation`]`(seed, job)` into
//! every page of `[ADDR, ADDR + LEN)`, the page's *DMA address* (an IOVA behind a vIOMMU,
//! else a guest-physical address) standing for its `gpa`. `job` counts the jobs since
//! the device was reset and is part of its migrated state, so the generation is different
//! every time, also across a migration.
//!
//! Registers are little-endian; 64-bit registers may be accessed as one 8-byte access or
//! two 4-byte halves. Writes to read-only registers are ignored.

/// Not a registered PCI ID: Ferry's test device only.
pub const VENDOR_ID: u16 = 0x1f57;
pub const DEVICE_ID: u16 = 0xd3a0;
/// PCI class: unassigned (0xff), no subclass, no interface.
pub const CLASS_CODE: u32 = 0xff_00_00;

/// Bytes in BAR 0 (a 32-bit, non-prefetchable memory BAR).
pub const BAR0_SIZE: u64 = 4096;

/// RO u32: [`MAGIC`].
pub const REG_MAGIC: u64 = 0x00;
/// RO u32: [`VERSION`].
pub const REG_VERSION: u64 = 0x04;
/// RW u64: DMA address of the job's first byte (page aligned).
pub const REG_ADDR: u64 = 0x08;
/// RW u64: bytes in the job (whole pages, at most [`MAX_JOB_BYTES`]).
pub const REG_LEN: u64 = 0x10;
/// RW u64: the guest's seed for the job's generation.
pub const REG_SEED: u64 = 0x18;
/// WO u32: any write starts the job; it is done when the write returns (synchronous mode)
/// or once STATUS is no longer [`STATUS_BUSY`] (asynchronous mode; ignored while BUSY).
pub const REG_DOORBELL: u64 = 0x20;
/// RO u32: how the last job ended (`STATUS_*`), or [`STATUS_BUSY`] while it runs.
pub const REG_STATUS: u64 = 0x24;
/// RO u64: the generation the last job wrote (0 before the first).
pub const REG_GENERATION: u64 = 0x28;
/// RO u64: jobs started since reset (including refused ones).
pub const REG_JOBS: u64 = 0x30;
/// RO u64: pages written by DMA since reset.
pub const REG_PAGES: u64 = 0x38;

pub const MAGIC: u32 = u32::from_le_bytes(*b"FDMA");
pub const VERSION: u32 = 1;

/// Largest job: 256 pages.
pub const MAX_JOB_BYTES: u64 = 1 << 20;

/// The job was done: every page written.
pub const STATUS_OK: u32 = 0;
/// `ADDR` or `LEN` not page aligned, `LEN` zero or over [`MAX_JOB_BYTES`]: nothing written.
pub const STATUS_BAD_JOB: u32 = 1;
/// Some page of the job is not DMA-mapped (writable) for the device: nothing written.
pub const STATUS_UNMAPPED: u32 = 2;
/// The device is not running (stopped for migration): nothing written.
pub const STATUS_STOPPED: u32 = 3;
/// The job runs (asynchronous mode only): poll STATUS until it is not BUSY. Doorbell
/// writes meanwhile are ignored (not counted in JOBS).
pub const STATUS_BUSY: u32 = 4;

/// The name of status `s` (`STATUS_*`), for failure lines: `OK`, `BAD_JOB`, `UNMAPPED`,
/// `STOPPED`, `BUSY`, or `unknown`.
pub const fn status_name(s: u32) -> &'static str {
    match s {
        STATUS_OK => "OK",
        STATUS_BAD_JOB => "BAD_JOB",
        STATUS_UNMAPPED => "UNMAPPED",
        STATUS_STOPPED => "STOPPED",
        STATUS_BUSY => "BUSY",
        _ => "unknown",
    }
}

/// Pages in the largest job.
pub const MAX_JOB_PAGES: u64 = MAX_JOB_BYTES / crate::PAGE_SIZE as u64;

/// The generation job number `job` (counted from 1) writes for `seed`: never 0, and
/// different for every job of the same seed.
pub const fn job_generation(seed: u64, job: u64) -> u64 {
    // An odd multiplier is a bijection on u64, so distinct jobs give distinct values.
    (seed ^ job.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1 << 63
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_differ_job_to_job_and_are_never_zero() {
        let seed = 0x1234_5678_9abc_def0;
        let mut seen = std::collections::HashSet::new();
        for job in 1..10_000 {
            let g = job_generation(seed, job);
            assert_ne!(g, 0);
            assert!(seen.insert(g), "job {job} repeats generation {g:#x}");
        }
    }

    #[test]
    fn status_names() {
        assert_eq!(status_name(STATUS_OK), "OK");
        assert_eq!(status_name(STATUS_BAD_JOB), "BAD_JOB");
        assert_eq!(status_name(STATUS_UNMAPPED), "UNMAPPED");
        assert_eq!(status_name(STATUS_STOPPED), "STOPPED");
        assert_eq!(status_name(STATUS_BUSY), "BUSY");
        assert_eq!(status_name(7), "unknown");
        let all = [
            STATUS_OK,
            STATUS_BAD_JOB,
            STATUS_UNMAPPED,
            STATUS_STOPPED,
            STATUS_BUSY,
        ];
        for (i, a) in all.iter().enumerate() {
            assert!(!all[i + 1..].contains(a), "status {a} repeats");
        }
        assert_eq!(MAX_JOB_PAGES, 256);
    }

    #[test]
    fn registers_do_not_overlap_and_fit_the_bar() {
        let regs = [
            (REG_MAGIC, 4),
            (REG_VERSION, 4),
            (REG_ADDR, 8),
            (REG_LEN, 8),
            (REG_SEED, 8),
            (REG_DOORBELL, 4),
            (REG_STATUS, 4),
            (REG_GENERATION, 8),
            (REG_JOBS, 8),
            (REG_PAGES, 8),
        ];
        for (i, &(a, la)) in regs.iter().enumerate() {
            assert_eq!(a % la, 0, "register at {a:#x} is not aligned to its size");
            assert!(a + la <= BAR0_SIZE);
            for &(b, lb) in &regs[i + 1..] {
                assert!(a + la <= b || b + lb <= a, "{a:#x} overlaps {b:#x}");
            }
        }
    }
}
