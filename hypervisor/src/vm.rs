//! VM construction in the order KVM requires, as types: dirty-tracking capabilities can
//! only be enabled on [`VmBuilder`], which exists before the first memslot; memslots only
//! on [`TrackedVmBuilder`]; vCPUs only on [`VmWithMemory`]. The finished [`Vm`] has no way
//! back.
//!
//! ```compile_fail
//! # use hypervisor::*;
//! # fn f(slots: Vec<MemorySlot>) -> Result<()> {
//! let with_memory = unsafe { VmBuilder::new()?.use_dirty_bitmap()?.add_memory(slots)? };
//! // Enabling the ring after memslots exist is what KVM forbids: it does not compile.
//! let _ = with_memory.enable_dirty_ring(4096);
//! # Ok(()) }
//! ```
//!
//! ```compile_fail
//! # use hypervisor::*;
//! # fn f() -> Result<()> {
//! // Memslots cannot be added before the dirty-tracking decision.
//! let _ = unsafe { VmBuilder::new()?.add_memory(vec![]) };
//! # Ok(()) }
//! ```

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_dirty_log, kvm_enable_cap, kvm_pit_config,
    kvm_userspace_memory_region, KVMIO, KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use vmm_sys_util::errno;
use vmm_sys_util::ioctl::{ioctl, ioctl_with_ref};
use vmm_sys_util::{ioctl_io_nr, ioctl_iow_nr, ioctl_iowr_nr};

use crate::caps::{CapabilityProbe, DirtyCaps, RingFlavor};
use crate::dirty_ring::DirtyRing;
use crate::dirty_set::{count_bits, DirtyPageSet, SlotDirtyBits};
use crate::vcpu::Vcpu;
use crate::{HypervisorError, Result};

ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);
ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);

const PAGE_SIZE: u64 = 4096;
const MANUAL_PROTECT_ENABLE: u64 = 1 << 0;

/// Guest RAM handed to KVM as one memslot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemorySlot {
    pub guest_phys_addr: u64,
    pub size: u64,
    /// Address of the backing mapping in this process.
    pub host_addr: u64,
}

impl MemorySlot {
    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }
}

/// How KVM reports dirty pages for this VM, fixed before the first memslot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirtyTracking {
    /// Per-vCPU rings of `entries` entries; `backup_bitmap` when WITH_BITMAP was enabled.
    Ring {
        entries: u32,
        flavor: RingFlavor,
        backup_bitmap: bool,
    },
    /// `KVM_GET_DIRTY_LOG`; with `manual_protect`, the get/clear split.
    Bitmap { manual_protect: bool },
}

impl DirtyTracking {
    pub fn is_ring(&self) -> bool {
        matches!(self, DirtyTracking::Ring { .. })
    }
}

/// One `KVM_ENABLE_CAP` call of the dirty-tracking setup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapStep {
    pub cap: u32,
    pub name: &'static str,
    pub arg: u64,
}

/// The capability calls for a ring of `entries`, in the order KVM requires: the ring
/// (ACQ_REL preferred) with its size in bytes, then WITH_BITMAP where advertised. Pure, so
/// both "advertised" and "absent" are testable on any kernel.
pub fn ring_setup_plan(caps: &DirtyCaps, entries: u32) -> Result<(Vec<CapStep>, DirtyTracking)> {
    let flavor = caps.validate_ring_entries(entries)?;
    let mut steps = vec![CapStep {
        cap: flavor.cap(),
        name: flavor.cap_name(),
        arg: u64::from(entries) * u64::from(crate::caps::RING_ENTRY_BYTES),
    }];
    if caps.with_bitmap {
        steps.push(CapStep {
            cap: KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP,
            name: "KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP",
            arg: 0,
        });
    }
    let tracking = DirtyTracking::Ring {
        entries,
        flavor,
        backup_bitmap: caps.with_bitmap,
    };
    Ok((steps, tracking))
}

/// The capability calls for bitmap mode: the get/clear split where KVM offers it. The
/// INITIALLY_SET flag is not asked for: the first migration pass sends all RAM anyway.
pub fn bitmap_setup_plan(caps: &DirtyCaps) -> (Vec<CapStep>, DirtyTracking) {
    if caps.manual_protect & MANUAL_PROTECT_ENABLE as u32 != 0 {
        let step = CapStep {
            cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
            name: "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2",
            arg: MANUAL_PROTECT_ENABLE,
        };
        (
            vec![step],
            DirtyTracking::Bitmap {
                manual_protect: true,
            },
        )
    } else {
        (
            vec![],
            DirtyTracking::Bitmap {
                manual_protect: false,
            },
        )
    }
}

fn enable_caps(fd: &VmFd, steps: &[CapStep]) -> Result<()> {
    for s in steps {
        let cap = kvm_enable_cap {
            cap: s.cap,
            args: [s.arg, 0, 0, 0],
            ..Default::default()
        };
        fd.enable_cap(&cap)
            .map_err(|source| HypervisorError::EnableCap {
                cap: s.name,
                value: s.arg,
                source,
            })?;
        log::info!("enabled {} ({})", s.name, s.arg);
    }
    Ok(())
}

/// A VM with no memslots and no vCPUs: the only state in which dirty-tracking
/// capabilities may be enabled.
pub struct VmBuilder {
    kvm: Kvm,
    fd: VmFd,
}

impl VmBuilder {
    pub fn new() -> Result<Self> {
        let kvm = Kvm::new().map_err(HypervisorError::OpenKvm)?;
        let fd = kvm.create_vm().map_err(HypervisorError::CreateVm)?;
        Ok(VmBuilder { kvm, fd })
    }

    /// What KVM advertises for this VM.
    pub fn dirty_caps(&self) -> DirtyCaps {
        DirtyCaps::probe(&self.fd)
    }

    /// Per-vCPU dirty rings of `entries` entries (a power of two within KVM's range).
    pub fn enable_dirty_ring(self, entries: u32) -> Result<TrackedVmBuilder> {
        let caps = self.dirty_caps();
        self.enable_dirty_ring_with(entries, &caps)
    }

    /// As [`Self::enable_dirty_ring`], with capabilities read through `probe` (the seam
    /// tests use to stand in for kernels with other capabilities).
    pub fn enable_dirty_ring_probed(
        self,
        entries: u32,
        probe: &impl CapabilityProbe,
    ) -> Result<TrackedVmBuilder> {
        self.enable_dirty_ring_with(entries, &DirtyCaps::probe(probe))
    }

    fn enable_dirty_ring_with(self, entries: u32, caps: &DirtyCaps) -> Result<TrackedVmBuilder> {
        let (steps, tracking) = ring_setup_plan(caps, entries)?;
        enable_caps(&self.fd, &steps)?;
        Ok(TrackedVmBuilder { b: self, tracking })
    }

    /// Dirty bitmap (`KVM_GET_DIRTY_LOG`), with the get/clear split when advertised.
    pub fn use_dirty_bitmap(self) -> Result<TrackedVmBuilder> {
        let (steps, tracking) = bitmap_setup_plan(&self.dirty_caps());
        enable_caps(&self.fd, &steps)?;
        Ok(TrackedVmBuilder { b: self, tracking })
    }
}

/// Dirty tracking is decided; memslots come next.
pub struct TrackedVmBuilder {
    b: VmBuilder,
    tracking: DirtyTracking,
}

impl TrackedVmBuilder {
    pub fn tracking(&self) -> DirtyTracking {
        self.tracking
    }

    /// Registers guest RAM, slot ids in the order given.
    ///
    /// # Safety
    /// Each slot's `host_addr..host_addr+size` must be a mapping of this process that
    /// stays valid (and is not unmapped or remapped) for as long as the VM exists.
    pub unsafe fn add_memory(self, slots: Vec<MemorySlot>) -> Result<VmWithMemory> {
        for (i, s) in slots.iter().enumerate() {
            if s.size == 0 || s.size % PAGE_SIZE != 0 || s.guest_phys_addr % PAGE_SIZE != 0 {
                return Err(HypervisorError::BadMemslot {
                    gpa: s.guest_phys_addr,
                    size: s.size,
                });
            }
            // SAFETY: the caller guarantees the host mapping outlives the VM.
            unsafe { set_memslot(&self.b.fd, i as u32, s, false)? };
        }
        Ok(VmWithMemory {
            b: self.b,
            tracking: self.tracking,
            slots,
        })
    }
}

/// # Safety
/// `s.host_addr..+size` must stay mapped while the VM exists.
unsafe fn set_memslot(fd: &VmFd, slot: u32, s: &MemorySlot, log: bool) -> Result<()> {
    let region = kvm_userspace_memory_region {
        slot,
        flags: if log { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
        guest_phys_addr: s.guest_phys_addr,
        memory_size: s.size,
        userspace_addr: s.host_addr,
    };
    // SAFETY: forwarded from the caller.
    unsafe { fd.set_user_memory_region(region) }.map_err(|source| HypervisorError::SetMemslot {
        slot,
        gpa: s.guest_phys_addr,
        size: s.size,
        source,
    })
}

/// Memslots exist; the in-kernel irqchip and the vCPUs come next.
pub struct VmWithMemory {
    b: VmBuilder,
    tracking: DirtyTracking,
    slots: Vec<MemorySlot>,
}

impl VmWithMemory {
    /// Creates the in-kernel irqchip (PIC, IOAPIC, LAPICs) and PIT, then `count` vCPUs
    /// (APIC ids 0..count; vCPU 0 boots, the others wait for INIT/SIPI), mapping each
    /// vCPU's dirty ring in ring mode.
    pub fn create_vcpus(self, count: u32) -> Result<(Arc<Vm>, Vec<Vcpu>)> {
        let fd = &self.b.fd;
        // The TSS and identity map pages sit just below the 4 GiB MMIO top, inside the hole.
        fd.set_identity_map_address(0xfffb_c000)
            .map_err(HypervisorError::ioctl("KVM_SET_IDENTITY_MAP_ADDR"))?;
        fd.set_tss_address(0xfffb_d000)
            .map_err(HypervisorError::ioctl("KVM_SET_TSS_ADDR"))?;
        fd.create_irq_chip()
            .map_err(HypervisorError::ioctl("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit)
            .map_err(HypervisorError::ioctl("KVM_CREATE_PIT2"))?;
        let cpuid = self
            .b
            .kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(HypervisorError::ioctl("KVM_GET_SUPPORTED_CPUID"))?;

        let mut vcpus = Vec::new();
        let mut rings = Vec::new();
        let mut msr_indices = Vec::new();
        for index in 0..count {
            let vfd = fd
                .create_vcpu(u64::from(index))
                .map_err(|source| HypervisorError::CreateVcpu { index, source })?;
            crate::vcpu::configure_cpuid(&vfd, &cpuid, index, count)?;
            crate::vcpu::configure_msrs(&vfd)?;
            if index == 0 {
                msr_indices = crate::state::saveable_msrs(&self.b.kvm, &vfd)?;
            }
            if let DirtyTracking::Ring { entries, .. } = self.tracking {
                use std::os::unix::io::AsRawFd;
                rings.push(DirtyRing::map(vfd.as_raw_fd(), index, entries)?);
            }
            vcpus.push((index, vfd));
        }
        let dirty = DirtyPageSet::new(
            self.slots
                .iter()
                .map(|s| SlotDirtyBits::new(s.guest_phys_addr, s.pages()))
                .collect(),
        );
        let vm = Arc::new(Vm {
            kvm: self.b.kvm,
            fd: self.b.fd,
            tracking: self.tracking,
            slots: self.slots,
            rings: Mutex::new(rings),
            dirty,
            logging: AtomicBool::new(false),
            out_of_step: AtomicBool::new(false),
            stats: DirtyStats::default(),
            msr_indices,
        });
        let vcpus = vcpus
            .into_iter()
            .map(|(i, f)| Vcpu::new(i, f, vm.clone()))
            .collect();
        Ok((vm, vcpus))
    }
}

/// Counters of the dirty-tracking machinery (read by `vm.counters`).
#[derive(Debug, Default)]
pub struct DirtyStats {
    pub ring_harvests: AtomicU64,
    pub ring_entries: AtomicU64,
    pub ring_full_exits: AtomicU64,
    /// Rings KVM overfilled (entries lost, so all RAM was marked dirty).
    pub ring_overflows: AtomicU64,
    /// Extra `KVM_RESET_DIRTY_RINGS` calls needed because KVM stopped a reset part-way.
    pub ring_reset_retries: AtomicU64,
    pub bitmap_reads: AtomicU64,
}

/// Which collection a dirty sync is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncKind {
    /// While vCPUs run (precopy iterations).
    Live,
    /// The last one: every vCPU is out of KVM_RUN (kicked and parked); the backup bitmap,
    /// where enabled, is read after the rings, as the very last collection.
    Final,
}

/// Blocks the vCPU kick signal in this thread until dropped.
struct KicksHeld {
    old: libc::sigset_t,
}

impl KicksHeld {
    fn new() -> KicksHeld {
        // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it fully, and
        // pthread_sigmask only changes this thread's mask (the old one is kept to restore).
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, crate::vcpu::kick_signal());
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
            KicksHeld { old }
        }
    }
}

impl Drop for KicksHeld {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved in `new` for this same thread.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.old, std::ptr::null_mut()) };
    }
}

/// Most `KVM_RESET_DIRTY_RINGS` calls to finish one reset (each makes progress or is
/// interrupted by a signal; the bound only guards against a KVM that never finishes).
const MAX_RESET_CALLS: u32 = 1000;

/// A running VM.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    tracking: DirtyTracking,
    slots: Vec<MemorySlot>,
    /// One lock for all rings: a harvest and its `KVM_RESET_DIRTY_RINGS` are one step, so
    /// the reset count KVM returns must equal what was harvested.
    rings: Mutex<Vec<DirtyRing>>,
    dirty: DirtyPageSet,
    logging: AtomicBool,
    /// A ring lost step with KVM since dirty logging started (see `sync_dirty`).
    out_of_step: AtomicBool,
    pub stats: DirtyStats,
    /// MSRs saved with each vCPU's state.
    msr_indices: Vec<u32>,
}

impl Vm {
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    pub fn tracking(&self) -> DirtyTracking {
        self.tracking
    }

    pub fn slots(&self) -> &[MemorySlot] {
        &self.slots
    }

    pub fn is_logging(&self) -> bool {
        self.logging.load(Ordering::Acquire)
    }

    /// Starts dirty logging: sets `KVM_MEM_LOG_DIRTY_PAGES` on every slot (KVM then
    /// write-protects guest RAM) and forgets anything collected before.
    pub fn start_dirty_log(&self) -> Result<()> {
        self.out_of_step.store(false, Ordering::Release);
        self.set_logging(true)?;
        self.dirty.slots().iter().for_each(|s| drop(s.take()));
        Ok(())
    }

    /// Stops dirty logging on every slot.
    pub fn stop_dirty_log(&self) -> Result<()> {
        self.set_logging(false)
    }

    fn set_logging(&self, on: bool) -> Result<()> {
        for (i, s) in self.slots.iter().enumerate() {
            // SAFETY: re-registering a slot with the same mapping, which the builder's
            // caller guaranteed to outlive the VM; only the flags change.
            unsafe { set_memslot(&self.fd, i as u32, s, on)? };
        }
        self.logging.store(on, Ordering::Release);
        Ok(())
    }

    /// Handles vCPU `index`'s `KVM_EXIT_DIRTY_RING_FULL`: harvests its ring and resets
    /// it in KVM so the vCPU can re-enter. When KVM reports the ring full but nothing is
    /// harvestable, KVM overran the ring earlier: skip the stale entries so KVM's reset
    /// catches up, and treat the lost entries as "all RAM dirty".
    pub fn handle_ring_full(&self, index: u32) -> Result<u64> {
        let mut rings = self.rings.lock().unwrap_or_else(|p| p.into_inner());
        let Some(ring) = rings.get_mut(index as usize) else {
            return Ok(0);
        };
        let mut n = self.harvest_one(ring)?;
        if n == 0 {
            // Bounded by KVM's smallest soft limit (ring size minus its reserve of 64 +
            // 512 PML entries), so KVM's reset index never passes its producer index.
            let max_skip = (ring.entries() / 4).max(1);
            let skipped = ring.skip_stale(max_skip);
            log::warn!(
                "vCPU {index}: dirty ring out of step with KVM, skipped {skipped} stale entries"
            );
            self.note_overflow();
            n = u64::from(skipped) + self.harvest_one(ring)?;
        }
        self.reset_rings(n)?;
        Ok(n)
    }

    /// Entries were lost: every page of every slot counts as dirty, now and again in the
    /// final sync.
    fn note_overflow(&self) {
        self.out_of_step.store(true, Ordering::Release);
        if self.stats.ring_overflows.fetch_add(1, Ordering::Relaxed) == 0 {
            log::warn!(
                "KVM overfilled a dirty ring of {} entries (its soft-full exit came \
                 too late); marking all guest RAM dirty so no page is lost",
                self.rings_entries()
            );
        }
        for s in self.dirty.slots() {
            s.mark_all();
        }
    }

    fn rings_entries(&self) -> u32 {
        match self.tracking {
            DirtyTracking::Ring { entries, .. } => entries,
            DirtyTracking::Bitmap { .. } => 0,
        }
    }

    /// Harvests every ring, then one `KVM_RESET_DIRTY_RINGS`, so pages are re-protected
    /// before anyone reads their contents.
    pub fn harvest_all_rings(&self) -> Result<u64> {
        let mut rings = self.rings.lock().unwrap_or_else(|p| p.into_inner());
        let mut total = 0;
        for ring in rings.iter_mut() {
            total += self.harvest_one(ring)?;
        }
        self.reset_rings(total)?;
        Ok(total)
    }

    /// Entries harvested so far from vCPU `index`'s ring (for per-vCPU dirty rates).
    pub fn ring_harvested(&self, index: u32) -> u64 {
        let rings = self.rings.lock().unwrap_or_else(|p| p.into_inner());
        rings.get(index as usize).map_or(0, |r| r.total_harvested())
    }

    fn harvest_one(&self, ring: &mut DirtyRing) -> Result<u64> {
        let mut bad = None;
        let h = ring.harvest(|slot, offset| {
            if let Err(e) = self.dirty.mark_ring_entry(slot, offset) {
                bad.get_or_insert(e);
            }
        });
        if h.overflowed {
            self.note_overflow();
        }
        self.stats.ring_harvests.fetch_add(1, Ordering::Relaxed);
        self.stats
            .ring_entries
            .fetch_add(h.entries, Ordering::Relaxed);
        bad.map_or(Ok(h.entries), Err)
    }

    /// Must run under the rings lock, right after the harvest it completes.
    ///
    /// KVM may stop a reset part-way and return what it did so far (it bails out when the
    /// calling thread has a signal pending: a vCPU thread being kicked). The entries it
    /// left are still marked harvested, so calling again finishes them. It must be
    /// finished now: a harvested page stays writable (its writes unlogged) until KVM
    /// resets its entry, so a write in between would be lost.
    fn reset_rings(&self, harvested: u64) -> Result<()> {
        if harvested == 0 {
            return Ok(());
        }
        // A pending kick makes KVM stop a reset part-way, and a reset stopped part-way has
        // been seen to leave pages writable without logging them (a lost dirty page under
        // auto-converge's kicks). Hold kicks off for the ioctl: one that arrives meanwhile
        // is delivered right after, and ends the vCPU's next KVM_RUN as usual.
        let _held = KicksHeld::new();
        let mut reset = 0u64;
        let mut calls = 0u32;
        while reset < harvested {
            calls += 1;
            // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument; the fd is a VM fd we own.
            let ret = unsafe { ioctl(&self.fd, KVM_RESET_DIRTY_RINGS()) };
            if ret < 0 {
                let e = errno::Error::last();
                if e.errno() == libc::EINTR && calls < MAX_RESET_CALLS {
                    continue;
                }
                return Err(HypervisorError::Ioctl {
                    what: "KVM_RESET_DIRTY_RINGS",
                    source: e,
                });
            }
            if ret == 0 || calls >= MAX_RESET_CALLS {
                break;
            }
            reset += ret as u64;
        }
        if calls > 1 {
            self.stats
                .ring_reset_retries
                .fetch_add(u64::from(calls - 1), Ordering::Relaxed);
            log::debug!("KVM_RESET_DIRTY_RINGS needed {calls} calls for {harvested} entries");
        }
        if reset != harvested {
            // KVM reset a different number of entries than were handed back: the ring and
            // KVM are out of step (an overfilled ring being refilled while we harvest).
            // Entries may be lost, so count it as an overflow rather than fail the VM.
            log::warn!("KVM_RESET_DIRTY_RINGS reset {reset} entries, {harvested} were harvested");
            self.note_overflow();
        }
        Ok(())
    }

    fn read_kvm_bitmap(&self, slot: u32, s: &MemorySlot, clear: bool) -> Result<Vec<u64>> {
        let mut bm = vec![0u64; s.pages().div_ceil(64) as usize];
        let log = kvm_dirty_log {
            slot,
            padding1: 0,
            __bindgen_anon_1: kvm_bindings::kvm_dirty_log__bindgen_ty_1 {
                dirty_bitmap: bm.as_mut_ptr().cast(),
            },
        };
        // SAFETY: `bm` holds one bit per page of the slot and outlives the call.
        let ret = unsafe { ioctl_with_ref(&self.fd, KVM_GET_DIRTY_LOG(), &log) };
        if ret < 0 {
            return Err(HypervisorError::Ioctl {
                what: "KVM_GET_DIRTY_LOG",
                source: errno::Error::last(),
            });
        }
        self.stats.bitmap_reads.fetch_add(1, Ordering::Relaxed);
        if clear {
            self.clear_kvm_bitmap(slot, s, &bm)?;
        }
        Ok(bm)
    }

    /// `KVM_CLEAR_DIRTY_LOG` on every 64-page chunk that had dirty bits, re-protecting
    /// exactly the pages we are about to send.
    fn clear_kvm_bitmap(&self, slot: u32, s: &MemorySlot, bm: &[u64]) -> Result<()> {
        let pages = s.pages();
        let mut w = 0;
        while w < bm.len() {
            if bm[w] == 0 {
                w += 1;
                continue;
            }
            let start = w;
            while w < bm.len() && bm[w] != 0 {
                w += 1;
            }
            let first_page = start as u64 * 64;
            // Chunks are multiples of 64 pages except one ending exactly at the slot end.
            let num_pages = (w as u64 * 64).min(pages) - first_page;
            let clear = kvm_clear_dirty_log {
                slot,
                num_pages: num_pages as u32,
                first_page,
                __bindgen_anon_1: kvm_bindings::kvm_clear_dirty_log__bindgen_ty_1 {
                    dirty_bitmap: bm[start..w].as_ptr() as *mut libc::c_void,
                },
            };
            // SAFETY: the bitmap slice covers `num_pages` bits and outlives the call;
            // KVM only reads it.
            let ret = unsafe { ioctl_with_ref(&self.fd, KVM_CLEAR_DIRTY_LOG(), &clear) };
            if ret < 0 {
                return Err(HypervisorError::Ioctl {
                    what: "KVM_CLEAR_DIRTY_LOG",
                    source: errno::Error::last(),
                });
            }
        }
        Ok(())
    }

    /// Collects what KVM logged since the last sync and returns it, one bitmap per slot
    /// (bit n = page n of the slot), leaving the accumulated set empty.
    ///
    /// Ring mode: harvests every ring (vCPUs may run for `Live`). `Final` then reads the
    /// backup bitmap when WITH_BITMAP is on, last, and never clears it. Bitmap mode:
    /// `KVM_GET_DIRTY_LOG` (+ `KVM_CLEAR_DIRTY_LOG` with manual protect) per slot.
    pub fn sync_dirty(&self, kind: SyncKind) -> Result<Vec<Vec<u64>>> {
        if !self.is_logging() {
            return Err(HypervisorError::TrackingOff("call start_dirty_log first"));
        }
        match self.tracking {
            DirtyTracking::Ring { backup_bitmap, .. } => {
                self.harvest_all_rings()?;
                if kind == SyncKind::Final && self.out_of_step.load(Ordering::Acquire) {
                    // A ring lost step with KVM during this log: some harvested page may
                    // have stayed writable without a new entry. With every vCPU parked,
                    // copying all RAM once more is the only way to be sure.
                    log::warn!(
                        "a dirty ring lost step with KVM during this migration: the final \
                         pass copies all guest RAM"
                    );
                    for s in self.dirty.slots() {
                        s.mark_all();
                    }
                }
                if kind == SyncKind::Final && backup_bitmap {
                    for (i, s) in self.slots.iter().enumerate() {
                        let bm = self.read_kvm_bitmap(i as u32, s, false)?;
                        self.dirty.slots()[i].merge(&bm);
                    }
                }
            }
            DirtyTracking::Bitmap { manual_protect } => {
                for (i, s) in self.slots.iter().enumerate() {
                    let bm = self.read_kvm_bitmap(i as u32, s, manual_protect)?;
                    self.dirty.slots()[i].merge(&bm);
                }
            }
        }
        let out: Vec<Vec<u64>> = self.dirty.slots().iter().map(|s| s.take()).collect();
        log::debug!(
            "dirty sync {:?}: {} pages",
            kind,
            out.iter().map(|b| count_bits(b)).sum::<u64>()
        );
        Ok(out)
    }

    pub(crate) fn msr_indices(&self) -> &[u32] {
        &self.msr_indices
    }

    /// The irqchip, PIT and clock. Call with every vCPU parked.
    pub fn save_state(&self) -> Result<crate::VmState> {
        crate::state::save_vm(&self.fd)
    }

    /// Restores what [`Self::save_state`] returned, before any vCPU runs.
    pub fn restore_state(&self, s: &crate::VmState) -> Result<()> {
        crate::state::restore_vm(&self.fd, s)
    }

    /// Raises or lowers an interrupt line of the in-kernel irqchip.
    pub fn set_irq_line(&self, irq: u32, level: bool) -> Result<()> {
        self.fd
            .set_irq_line(irq, level)
            .map_err(HypervisorError::ioctl("KVM_IRQ_LINE"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::caps::tests::fake;
    use kvm_bindings::{KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL};

    #[test]
    fn ring_plan_with_bitmap_advertised_enables_it_after_the_ring() {
        let caps = DirtyCaps::probe(&fake(&[
            (KVM_CAP_DIRTY_LOG_RING_ACQ_REL, 1 << 20),
            (KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP, 1),
        ]));
        let (steps, t) = ring_setup_plan(&caps, 4096).unwrap();
        let names: Vec<_> = steps.iter().map(|s| s.name).collect();
        assert_eq!(
            names,
            [
                "KVM_CAP_DIRTY_LOG_RING_ACQ_REL",
                "KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP"
            ]
        );
        assert_eq!(steps[0].arg, 4096 * 16);
        assert_eq!(
            t,
            DirtyTracking::Ring {
                entries: 4096,
                flavor: RingFlavor::AcqRel,
                backup_bitmap: true
            }
        );
    }

    #[test]
    fn ring_plan_with_bitmap_absent_only_enables_the_ring() {
        let caps = DirtyCaps::probe(&fake(&[(KVM_CAP_DIRTY_LOG_RING, 1 << 20)]));
        let (steps, t) = ring_setup_plan(&caps, 1024).unwrap();
        assert_eq!(steps.len(), 1);
        assert_eq!(steps[0].cap, KVM_CAP_DIRTY_LOG_RING);
        assert!(matches!(
            t,
            DirtyTracking::Ring {
                backup_bitmap: false,
                ..
            }
        ));
    }

    #[test]
    fn bitmap_plan_uses_manual_protect_only_when_offered() {
        let (s, t) = bitmap_setup_plan(&DirtyCaps::probe(&fake(&[(
            KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
            3,
        )])));
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].arg, 1, "INITIALLY_SET must not be requested");
        assert_eq!(
            t,
            DirtyTracking::Bitmap {
                manual_protect: true
            }
        );
        let (s, t) = bitmap_setup_plan(&DirtyCaps::probe(&fake(&[])));
        assert!(s.is_empty());
        assert_eq!(
            t,
            DirtyTracking::Bitmap {
                manual_protect: false
            }
        );
    }
}
