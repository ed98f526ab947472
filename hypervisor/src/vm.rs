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
use crate::dirty_rings::{Collected, DirtyRings, RingKernel};
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
        let rings = DirtyRings::new(rings);
        let vm = Arc::new(Vm {
            kvm: self.b.kvm,
            fd: self.b.fd,
            tracking: self.tracking,
            slots: self.slots,
            ring_reset_indexes: rings.reset_indexes(),
            rings: Mutex::new(rings),
            dirty,
            logging: AtomicBool::new(false),
            out_of_step: AtomicBool::new(false),
            stats: DirtyStats::default(),
            msr_indices,
            irq_routes: Mutex::new(crate::IrqRoutes::default()),
        });
        // KVM copies a vCPU's registers into its `kvm_run` page at every exit where asked
        // (KVM_CAP_SYNC_REGS): a save then reads them there, two ioctls fewer in a
        // migration's downtime.
        let sync = crate::vcpu::SYNC_ON_EXIT
            & u64::try_from(
                vm.fd
                    .check_extension_raw(kvm_bindings::KVM_CAP_SYNC_REGS.into()),
            )
            .unwrap_or(0)
            == crate::vcpu::SYNC_ON_EXIT;
        log::debug!("vCPU registers copied out at each exit (KVM_CAP_SYNC_REGS): {sync}");
        let vcpus = vcpus
            .into_iter()
            .map(|(i, f)| Vcpu::new(i, f, vm.clone(), sync))
            .collect();
        Ok((vm, vcpus))
    }
}

/// Counters of the dirty-tracking machinery (read by `vm.counters`).
#[derive(Debug, Default)]
pub struct DirtyStats {
    /// Ring collections: all rings at a dirty sync, or one ring at a ring-full exit.
    pub ring_harvests: AtomicU64,
    pub ring_entries: AtomicU64,
    pub ring_full_exits: AtomicU64,
    /// Rings KVM overfilled (entries lost, so all RAM was marked dirty).
    pub ring_overflows: AtomicU64,
    /// Extra `KVM_RESET_DIRTY_RINGS` calls needed because KVM stopped a reset part-way.
    pub ring_reset_retries: AtomicU64,
    /// Entries KVM overwrote after they were flagged, taken again to finish a reset.
    pub ring_retaken: AtomicU64,
    /// Empty entries stepped over because they had been taken out of order after an
    /// overrun (KVM counted them as published).
    pub ring_skipped: AtomicU64,
    /// Ring-full exits with nothing published anywhere that stepped over one entry.
    pub ring_steps: AtomicU64,
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

/// Blocks every signal that can be blocked in this thread until dropped. A pending
/// signal stops KVM's reset walk part-way, and a kernel may then leave the last entries
/// it cleared without write-protecting their pages; blocked signals are not pending for
/// it, and are delivered when the mask is restored (a kick then ends the vCPU's next
/// `KVM_RUN` as usual).
struct SignalsHeld {
    old: libc::sigset_t,
}

impl SignalsHeld {
    fn new() -> SignalsHeld {
        // SAFETY: sigset_t is plain data; sigfillset initialises it fully, and
        // pthread_sigmask only changes this thread's mask (the old one is kept to restore).
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut set);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
            SignalsHeld { old }
        }
    }
}

impl Drop for SignalsHeld {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved in `new` for this same thread.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.old, std::ptr::null_mut()) };
    }
}

/// KVM's half of the ring protocol on a real VM. Signals are held off while it exists
/// (see [`SignalsHeld`]).
struct KvmRings<'a> {
    fd: &'a VmFd,
    _held: SignalsHeld,
}

impl RingKernel for KvmRings<'_> {
    fn reset_rings(&mut self) -> Result<u32> {
        // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument; the fd is a VM fd we own.
        let ret = unsafe { ioctl(self.fd, KVM_RESET_DIRTY_RINGS()) };
        if ret < 0 {
            let e = errno::Error::last();
            if e.errno() == libc::EINTR {
                return Ok(0);
            }
            return Err(HypervisorError::Ioctl {
                what: "KVM_RESET_DIRTY_RINGS",
                source: e,
            });
        }
        Ok(ret as u32)
    }
}

/// A running VM.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    tracking: DirtyTracking,
    slots: Vec<MemorySlot>,
    /// One lock for all rings: a harvest and its `KVM_RESET_DIRTY_RINGS` are one step, so
    /// each reset count KVM returns belongs to the ring just harvested.
    rings: Mutex<DirtyRings>,
    /// KVM's reset index per ring, as the rings last saw it (read without the lock).
    ring_reset_indexes: Arc<[std::sync::atomic::AtomicU32]>,
    dirty: DirtyPageSet,
    logging: AtomicBool,
    /// A ring lost step with KVM since dirty logging started (see `sync_dirty`).
    out_of_step: AtomicBool,
    pub stats: DirtyStats,
    /// MSRs saved with each vCPU's state.
    msr_indices: Vec<u32>,
    /// GSI routes beyond KVM's defaults (device MSI-X vectors).
    irq_routes: Mutex<crate::IrqRoutes>,
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
    /// write-protects all guest RAM) and forgets anything collected before.
    ///
    /// Logging is first turned off if it was on, so that every page is write-protected
    /// anew (a page an earlier overrun left writable is then logged again), and the rings
    /// are drained in between: what a cancelled migration left in them is taken and
    /// reset, and KVM's indexes and ours agree before the new log starts.
    pub fn start_dirty_log(&self) -> Result<()> {
        let mut rings = self.rings.lock().unwrap_or_else(|p| p.into_inner());
        if self.is_logging() {
            self.set_logging(false)?;
        }
        if self.tracking.is_ring() {
            let drained = self.lost_step_on_error(rings.collect_all(
                &mut self.kvm_rings(),
                &self.dirty,
                false,
            ))?;
            self.count(&drained);
        }
        self.set_logging(true)?;
        self.out_of_step.store(false, Ordering::Release);
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

    fn kvm_rings(&self) -> KvmRings<'_> {
        KvmRings {
            fd: &self.fd,
            _held: SignalsHeld::new(),
        }
    }

    /// KVM's reset index of vCPU `index`'s ring as last seen. A vCPU reads it before
    /// `KVM_RUN` and hands it to [`Self::handle_ring_full`].
    pub fn ring_reset_index(&self, index: u32) -> u32 {
        self.ring_reset_indexes
            .get(index as usize)
            .map_or(0, |r| r.load(Ordering::Acquire))
    }

    /// The indexes of vCPU `index`'s ring (for logs and test failure messages).
    pub fn ring_indexes(&self, index: u32) -> Option<crate::RingIndexes> {
        let rings = self.rings.lock().unwrap_or_else(|p| p.into_inner());
        rings.indexes(index as usize)
    }

    /// Handles vCPU `index`'s `KVM_EXIT_DIRTY_RING_FULL` on that vCPU's thread: harvests
    /// its ring and resets it in KVM so the vCPU can re-enter. `reset_before_run` is
    /// [`Self::ring_reset_index`] read before the `KVM_RUN` that exited: when nothing is
    /// published and the ring was reset since, the exit is stale and the vCPU simply
    /// re-enters.
    pub fn handle_ring_full(&self, index: u32, reset_before_run: u32) -> Result<u64> {
        let mut rings = self.rings.lock().unwrap_or_else(|p| p.into_inner());
        if index as usize >= rings.len() {
            return Ok(0);
        }
        let got = self.lost_step_on_error(rings.handle_full(
            index as usize,
            reset_before_run,
            &mut self.kvm_rings(),
            &self.dirty,
        ))?;
        if got.stepped {
            log::debug!(
                "vCPU {index}: ring full with nothing published; stepped over one entry \
                 taken earlier ({})",
                rings.indexes(index as usize).expect("index checked above")
            );
        }
        self.count(&got);
        Ok(got.entries)
    }

    /// Counts a collection and acts on what it found. An overrun (or an entry naming no
    /// page of ours) means pages may be missing from the rings and may stay writable
    /// without a new entry: every page counts as dirty now, and again in the final sync.
    fn count(&self, c: &Collected) {
        let s = &self.stats;
        s.ring_harvests.fetch_add(1, Ordering::Relaxed);
        s.ring_entries.fetch_add(c.entries, Ordering::Relaxed);
        s.ring_reset_retries
            .fetch_add(c.extra_resets, Ordering::Relaxed);
        s.ring_retaken.fetch_add(c.retaken, Ordering::Relaxed);
        s.ring_skipped.fetch_add(c.skipped, Ordering::Relaxed);
        s.ring_steps
            .fetch_add(u64::from(c.stepped), Ordering::Relaxed);
        if let Some((slot, offset)) = c.bad_entry {
            log::warn!(
                "a dirty ring entry names slot {slot:#x} offset {offset:#x}, outside every \
                 memory slot; marking all guest RAM dirty"
            );
        }
        if c.overflowed || c.bad_entry.is_some() {
            if s.ring_overflows.fetch_add(1, Ordering::Relaxed) == 0 {
                log::warn!(
                    "{}; marking all guest RAM dirty now and in the final pass so no page \
                     is lost",
                    if c.overflowed {
                        format!(
                            "KVM overran a dirty ring of {} entries (its ring-full exit came \
                             too late; a larger ring makes this rarer)",
                            self.rings_entries()
                        )
                    } else {
                        "a dirty ring entry named no page of ours".to_string()
                    }
                );
            }
            self.lose_step();
        }
    }

    /// A ring that could not be reset leaves pages writable without entries: until the
    /// next `start_dirty_log`, every page is dirty now and in the final sync.
    fn lost_step_on_error<T>(&self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            log::error!("{e}; marking all guest RAM dirty");
            self.lose_step();
        }
        r
    }

    /// The rings lost step with KVM: every page is dirty now, and again in the final
    /// sync of this log.
    fn lose_step(&self) {
        self.out_of_step.store(true, Ordering::Release);
        for slot in self.dirty.slots() {
            slot.mark_all();
        }
    }

    fn rings_entries(&self) -> u32 {
        match self.tracking {
            DirtyTracking::Ring { entries, .. } => entries,
            DirtyTracking::Bitmap { .. } => 0,
        }
    }

    /// Test seam: the next ring harvest drops one page, as a broken harvest would. Only
    /// for tests that prove their no-lost-page check catches a lost page.
    #[doc(hidden)]
    pub fn lose_next_ring_entry_for_test(&self) {
        let mut rings = self.rings.lock().unwrap_or_else(|p| p.into_inner());
        rings.lose_next_entry_for_test();
    }

    /// Pages harvested so far from every vCPU's ring, in vCPU order, read at one instant
    /// (empty in bitmap mode), for per-vCPU dirty rates: entries, less those repeating
    /// the entry before them (KVM's emulated writes; see `dirty_ring::PageRuns`).
    /// Every harvest counts here, whoever made it: a ring-full exit, a migration's
    /// collection, [`Self::harvest_rings`].
    pub fn rings_harvested(&self) -> Vec<u64> {
        let rings = self.rings.lock().unwrap_or_else(|p| p.into_inner());
        (0..rings.len())
            .map(|i| rings.ring(i).map_or(0, |r| r.pages_harvested()))
            .collect()
    }

    /// Pages KVM has published so far in every vCPU's ring, in vCPU order: what
    /// [`Self::rings_harvested`] counts plus what waits in the rings, counted without
    /// taking it (so without resetting its pages: cheap, and a page being rewritten is
    /// not counted again until the next harvest, unless KVM emulates writes to it that
    /// alternate with writes to other pages: only a run of entries naming one page
    /// counts once).
    pub fn rings_dirtied(&self) -> Vec<u64> {
        let mut rings = self.rings.lock().unwrap_or_else(|p| p.into_inner());
        rings.dirtied()
    }

    /// Harvests every ring now, while vCPUs run (for dirty-rate measurement and the
    /// per-vCPU dirty limit, which want fresh counts). The pages go to the same dirty set
    /// a migration collects from, so a migration running meanwhile loses nothing: it
    /// finds them at its next collection. Nothing to do without rings or logging.
    pub fn harvest_rings(&self) -> Result<()> {
        if !self.tracking.is_ring() || !self.is_logging() {
            return Ok(());
        }
        let mut rings = self.rings.lock().unwrap_or_else(|p| p.into_inner());
        let got =
            self.lost_step_on_error(rings.collect_all(&mut self.kvm_rings(), &self.dirty, false))?;
        self.count(&got);
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

    /// Brings the dirty rings into the caches ahead of the final collection (see
    /// `DirtyRing::warm`): call it just before the vCPUs are paused for it.
    pub fn warm_dirty_rings(&self) {
        if let DirtyTracking::Ring { .. } = self.tracking {
            self.rings.lock().unwrap_or_else(|p| p.into_inner()).warm();
        }
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
        // The bits are taken under the rings lock: a ring-full handler publishes its
        // pages after their reset, and entirely before or after this collection.
        let mut rings = self.rings.lock().unwrap_or_else(|p| p.into_inner());
        match self.tracking {
            DirtyTracking::Ring { backup_bitmap, .. } => {
                // The final collection also looks past an empty entry at each fetch index
                // (every vCPU is parked, so nothing moves): a hole nobody knew of is then
                // found, and counted as an overrun.
                let got = self.lost_step_on_error(rings.collect_all(
                    &mut self.kvm_rings(),
                    &self.dirty,
                    kind == SyncKind::Final,
                ))?;
                self.count(&got);
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
        drop(rings);
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

    /// Routes `gsi` to an MSI message (a device's MSI-X vector as the guest programmed
    /// it); irqfds on that GSI then deliver it.
    pub fn set_msi_route(&self, gsi: u32, address: u64, data: u32) -> Result<()> {
        let mut routes = self.irq_routes.lock().unwrap_or_else(|p| p.into_inner());
        routes
            .set_msi(gsi, address, data)
            .map_err(HypervisorError::IrqRoute)?;
        let table = routes.table().map_err(HypervisorError::IrqRoute)?;
        self.fd
            .set_gsi_routing(&table)
            .map_err(HypervisorError::ioctl("KVM_SET_GSI_ROUTING"))
    }

    /// Delivers GSI `gsi` whenever `fd` is written.
    pub fn register_irqfd(&self, fd: &vmm_sys_util::eventfd::EventFd, gsi: u32) -> Result<()> {
        self.fd
            .register_irqfd(fd, gsi)
            .map_err(HypervisorError::ioctl("KVM_IRQFD"))
    }

    /// Has KVM signal `fd` on a guest write to MMIO address `addr` (any value), without
    /// an exit to the VMM.
    pub fn register_mmio_ioevent(
        &self,
        fd: &vmm_sys_util::eventfd::EventFd,
        addr: u64,
    ) -> Result<()> {
        self.fd
            .register_ioevent(
                fd,
                &kvm_ioctls::IoEventAddress::Mmio(addr),
                kvm_ioctls::NoDatamatch,
            )
            .map_err(HypervisorError::ioctl("KVM_IOEVENTFD"))
    }

    pub fn unregister_mmio_ioevent(
        &self,
        fd: &vmm_sys_util::eventfd::EventFd,
        addr: u64,
    ) -> Result<()> {
        self.fd
            .unregister_ioevent(
                fd,
                &kvm_ioctls::IoEventAddress::Mmio(addr),
                kvm_ioctls::NoDatamatch,
            )
            .map_err(HypervisorError::ioctl("KVM_IOEVENTFD deassign"))
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
