//! `dma=vfio-user`: the driver of `ferry-dma-device`, an out-of-process PCI device (a
//! vfio-user server) whose register contract is `guest_pattern::user_device`.
//!
//! * Boot ([`setup`], ring 0, before `smp::GO`): the first function on bus 0 with vendor
//!   0x1f57, device 0xd3a0; with `iommu=on` the virtio-iommu is set up first and the
//!   device's endpoint (its BDF) attached and the region mapped, as for the virtio devices
//!   (`dma_iommu::setup`). BAR 0 is used where the VMM or the firmware put it (a memory BAR
//!   wholly below 4 GiB; the driver never moves it), its 2 MiB page made uncached (the
//!   identity map already lets ring 3 reach it); memory space, bus master and INTx disable
//!   are set in the command register. MAGIC and VERSION must read right. Prints
//!   `guest: dma device=vfio-user ...`.
//! * Jobs ([`job`], ring 3, from the `dma-verify` loops): one set of registers for every
//!   vCPU, so a spin lock serialises them: ADDR, LEN, SEED (one 8-byte write each), a
//!   write to DOORBELL, then STATUS is read; while it is BUSY (a device started with
//!   `--async-jobs` writes the pages after the doorbell returns) it is polled, for at most
//!   [`BUSY_SECS`] seconds by the TSC (then the run fails: the job is "still busy"); then
//!   GENERATION is read, and the lock dropped. A synchronous device is never BUSY: the
//!   first read ends the wait.

use core::sync::atomic::{compiler_fence, AtomicBool, AtomicU64, Ordering};

use guest_pattern::cmdline::Config;
use guest_pattern::dma::DriverMemory;
use guest_pattern::user_device::{
    BAR0_SIZE, DEVICE_ID, MAGIC, MAX_JOB_PAGES, REG_ADDR, REG_DOORBELL, REG_GENERATION, REG_JOBS,
    REG_LEN, REG_MAGIC, REG_PAGES, REG_SEED, REG_STATUS, REG_VERSION, STATUS_BUSY, STATUS_OK,
    VENDOR_ID, VERSION,
};

use crate::pci::{self, CMD_BUS_MASTER, CMD_INTX_DISABLE, CMD_MEMORY};
use crate::timer;
use crate::workload::{self, check_stop};

const FOUR_GIB: u64 = 1 << 32;
const MIB2: u64 = 2 << 20;

/// Address of BAR 0, published by `smp::GO` (0: not set up).
static BAR: AtomicU64 = AtomicU64::new(0);
/// Held while a vCPU programs a job and reads its outcome.
static LOCK: AtomicBool = AtomicBool::new(false);
/// Longest a job may read BUSY before the run fails.
pub const BUSY_SECS: u64 = 10;

fn reg(offset: u64) -> u64 {
    let base = BAR.load(Ordering::Relaxed);
    assert!(base != 0, "vfio-user device not set up");
    base + offset
}

fn read32(offset: u64) -> u32 {
    // SAFETY: a register of BAR 0 (offsets from `guest_pattern::user_device`, inside its
    // BAR0_SIZE bytes, naturally aligned), which `setup` checked is a memory BAR wholly
    // below 4 GiB, identity-mapped, user-accessible and uncached. Device memory, not memory
    // Rust knows about: one volatile access of the register's size.
    unsafe { core::ptr::read_volatile(reg(offset) as *const u32) }
}

fn read64(offset: u64) -> u64 {
    // SAFETY: as for `read32`; the contract allows 64-bit registers one 8-byte access.
    unsafe { core::ptr::read_volatile(reg(offset) as *const u64) }
}

fn write32(offset: u64, value: u32) {
    // SAFETY: as for `read32`; writing a register changes device state only.
    unsafe { core::ptr::write_volatile(reg(offset) as *mut u32, value) }
}

fn write64(offset: u64, value: u64) {
    // SAFETY: as for `write32`, one 8-byte access.
    unsafe { core::ptr::write_volatile(reg(offset) as *mut u64, value) }
}

/// Fails the run naming the function: `guest: FAIL vfio-user 00:DD.F: <why>`.
fn fail_at(dev: u8, func: u8, why: core::fmt::Arguments) -> ! {
    crate::fail(format_args!("vfio-user 00:{dev:02x}.{func}: {why}"))
}

/// Finds and sets up the device (see the module documentation), the virtio-iommu first
/// with `iommu=on`. Ring 0, boot vCPU, after the ready line. A missing or unusable device
/// fails the run.
pub fn setup(cfg: &Config, mem: &DriverMemory) {
    let Some((dev, func)) = pci::find(VENDOR_ID, DEVICE_ID) else {
        crate::fail(format_args!(
            "no vfio-user DMA device (ferry-dma-device) on PCI bus 0 (vendor {VENDOR_ID:04x}, device {DEVICE_ID:04x})"
        ))
    };
    // iommu=on: the endpoint attached and the region mapped before the device is used.
    if cfg.iommu {
        let iommu = crate::virtio::iommu::setup(mem, cfg.nested_dirty);
        iommu.announce();
        crate::dma_iommu::setup(
            cfg,
            mem,
            &iommu,
            guest_pattern::viommu::endpoint(0, dev, func),
        );
    }
    let bar = pci::memory_bar(dev, func, 0)
        .unwrap_or_else(|e| fail_at(dev, func, format_args!("BAR 0 {e}")));
    let end = bar.saturating_add(BAR0_SIZE);
    if end > FOUR_GIB {
        fail_at(
            dev,
            func,
            format_args!(
                "BAR 0 at {bar:#x}-{end:#x} is not below 4 GiB, the only MMIO the driver maps"
            ),
        );
    }
    let command = pci::enable(dev, func, CMD_MEMORY | CMD_BUS_MASTER | CMD_INTX_DISABLE);
    if command & (CMD_MEMORY | CMD_BUS_MASTER) != CMD_MEMORY | CMD_BUS_MASTER {
        fail_at(
            dev,
            func,
            format_args!(
                "the command register reads {command:#06x} after enabling memory space and bus mastering"
            ),
        );
    }
    let mut page = bar & !(MIB2 - 1);
    while page < end {
        crate::paging::set_uncached(page);
        page += MIB2;
    }
    BAR.store(bar, Ordering::Relaxed);

    let magic = read32(REG_MAGIC);
    if magic != MAGIC {
        fail_at(
            dev,
            func,
            format_args!(
                "BAR 0 at {bar:#x}: MAGIC reads {magic:#010x}, want {MAGIC:#010x} (\"FDMA\")"
            ),
        );
    }
    let version = read32(REG_VERSION);
    if version != VERSION {
        fail_at(
            dev,
            func,
            format_args!("BAR 0 at {bar:#x}: VERSION reads {version}, the driver knows {VERSION}"),
        );
    }
    let (jobs, pages) = (read64(REG_JOBS), read64(REG_PAGES));
    let memory = mem.range();
    say!(
        "dma device=vfio-user pci=00:{dev:02x}.{func} id={VENDOR_ID:04x}:{DEVICE_ID:04x} bar=0:{bar:#x} version={version} jobs={jobs} pages={pages} job_pages={MAX_JOB_PAGES} memory={:#x}-{:#x}",
        memory.start,
        memory.end
    );
}

/// What a job that did not end OK reported.
#[derive(Clone, Copy)]
pub struct Refused {
    pub status: u32,
}

/// Has the device write `len` bytes (whole pages, at most `MAX_JOB_BYTES`) from DMA
/// address `addr` with a generation from `seed`; returns the generation it wrote
/// (GENERATION), or the STATUS if that is not OK. Ring 3, any vCPU: jobs are serialised.
pub fn job(addr: u64, len: u64, seed: u64) -> Result<u64, Refused> {
    while LOCK.swap(true, Ordering::Acquire) {
        while LOCK.load(Ordering::Relaxed) {
            check_stop();
            core::hint::spin_loop();
        }
    }
    write64(REG_ADDR, addr);
    write64(REG_LEN, len);
    write64(REG_SEED, seed);
    // A synchronous device has done the job when this write returns (the VMM hands it to
    // the device and waits); the STATUS read after it could not pass it anyway. An
    // asynchronous one reads BUSY until it has.
    write32(REG_DOORBELL, 1);
    let mut status = read32(REG_STATUS);
    if status == STATUS_BUSY {
        let start = timer::now();
        let limit = BUSY_SECS * timer::hz();
        while status == STATUS_BUSY {
            check_stop();
            if timer::now().wrapping_sub(start) > limit {
                workload::fail(format_args!(
                    "vfio-user job dma={addr:#x} len={len:#x}: STATUS still BUSY after {BUSY_SECS} s"
                ));
            }
            core::hint::spin_loop();
            status = read32(REG_STATUS);
        }
    }
    // GENERATION (and the pages) describe the job only once STATUS is no longer BUSY.
    let generation = read64(REG_GENERATION);
    LOCK.store(false, Ordering::Release);
    // The pages the device wrote are read after this, never before.
    compiler_fence(Ordering::SeqCst);
    if status == STATUS_OK {
        Ok(generation)
    } else {
        Err(Refused { status })
    }
}
