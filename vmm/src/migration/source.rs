//! A running [`Machine`] as the migration engine's source.

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use hypervisor::{DirtyTracking, SyncKind};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vm_migration::engine::HookResult;
use vm_migration::priority::ThreadNice;
use vm_migration::protocol::MemoryFd;
use vm_migration::stats::{DirtySourceStats, DirtyTrackingMode, DirtyTrackingStats};
use vm_migration::{RamRange, SourceVm};

use crate::memory::PageMap;
use crate::vm::{Machine, MachineState, StateEncoding};

/// The engine's view of the machine being sent.
pub struct MachineSource {
    pub machine: Arc<Machine>,
    /// To send never-touched RAM as zeros without faulting it in (`None`: unavailable).
    pagemap: Option<PageMap>,
    /// The VM was paused (by its user) before the migration: a failed migration leaves
    /// it paused rather than running it.
    paused_before: bool,
    /// The state taken at `pause` (`Machine::pause_and_save`), or why it could not be,
    /// until `save_state` or `resume`.
    at_pause: Mutex<Option<Result<MachineState, String>>>,
    encoding: StateEncoding,
    /// The destination reads the binary encoding (an older Ferry reads JSON only).
    peer_reads_binary: std::sync::atomic::AtomicBool,
    /// The vCPU threads lowered while the guest runs during the migration
    /// ([`Self::yielding_vcpus`]), raised at the pause; put back to their own priority at
    /// `resume`, or when this is dropped.
    yielding: Mutex<Vec<ThreadNice>>,
    /// The yielding vCPU threads were raised for this pause already (`prepare_pause`).
    raised: std::sync::atomic::AtomicBool,
}

impl MachineSource {
    pub fn new(machine: Arc<Machine>) -> Self {
        let pagemap = PageMap::open()
            .map_err(|e| log::info!("no /proc/self/pagemap ({e}): every page is read"))
            .ok();
        let paused_before = machine.is_paused();
        MachineSource {
            machine,
            pagemap,
            paused_before,
            at_pause: Mutex::new(None),
            encoding: StateEncoding::Binary,
            peer_reads_binary: std::sync::atomic::AtomicBool::new(false),
            yielding: Mutex::new(Vec::new()),
            raised: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The vCPU threads yield to the migration ([`Machine::lower_vcpu_priority`]) until
    /// the pause: there they must leave the guest at once, and the guest runs at its own
    /// priority again wherever the migration ends.
    pub fn yielding_vcpus(self) -> Self {
        let lowered = self.machine.lower_vcpu_priority();
        if !lowered.is_empty() {
            log::info!(
                "{} of {} vCPU threads yield to the migration (nice +{}) until the pause",
                lowered.len(),
                self.machine.config.cpus.boot_vcpus,
                vm_migration::priority::YIELD_BY
            );
        }
        *self.yielding.lock().unwrap_or_else(|p| p.into_inner()) = lowered;
        self
    }

    /// Raises the yielding vCPU threads for the pause (once per pause): a lowered vCPU
    /// thread waits for a CPU behind the migration's before it can leave the guest (an
    /// A/B of 3 runs each on the 2 GiB `verify` guest saw pauses of 8 and 21 ms while they
    /// stayed lowered; put back to their own priority, still 7 ms in 2 of 5). Raised like
    /// the switch-over's threads, a queued one takes a CPU at once; `resume`, or the end
    /// of the migration, puts them back.
    fn raise_for_pause(&self) {
        if self.raised.swap(true, Ordering::Relaxed) {
            return;
        }
        let mut yielding = self.yielding.lock().unwrap_or_else(|p| p.into_inner());
        if !yielding.iter().all(ThreadNice::raise_held) {
            yielding.clear();
        }
    }

    /// The vCPU threads back at their own priority, where they still yielded.
    fn stop_yielding(&self) {
        self.raised.store(false, Ordering::Relaxed);
        self.yielding
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Writes the state as JSON (snapshots keep a readable `state.json`).
    pub fn with_json_state(mut self) -> Self {
        self.encoding = StateEncoding::Json;
        self
    }

    /// How the state goes to this destination.
    fn state_encoding(&self) -> StateEncoding {
        match self.encoding {
            StateEncoding::Binary if !self.peer_reads_binary.load(Ordering::Relaxed) => {
                StateEncoding::Json
            }
            e => e,
        }
    }

    fn at_pause(&self) -> std::sync::MutexGuard<'_, Option<Result<MachineState, String>>> {
        self.at_pause.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fills `buf` from guest RAM at `gpa`, except pages that were never written: those
    /// are marked in `zero` instead of read (reading would fault them in), and left as they
    /// were in `buf`. Private RAM asks the page table (pagemap), shared RAM its file
    /// (holes). False: neither could tell, nothing was read.
    fn read_sparse(&self, gpa: u64, buf: &mut [u8], zero: &mut Vec<bool>) -> Result<bool, String> {
        let Some(map) = &self.pagemap else {
            return Ok(false);
        };
        let mem = self.machine.memory();
        let Some(region) = mem.find_region(GuestAddress(gpa)) else {
            return Ok(false);
        };
        if gpa + buf.len() as u64 > region.start_addr().0 + region.len() {
            return Ok(false);
        }
        let within = gpa - region.start_addr().0;
        let pages = buf.len() / PAGE;
        let found = match region.file_offset() {
            // Shared RAM: the file knows which pages anybody (a device process too) wrote.
            Some(f) => crate::memory::file_holes(f.file(), f.start() + within, pages, zero),
            None => map.untouched(region.as_ptr() as usize + within as usize, pages, zero),
        };
        if found.is_err() {
            zero.clear();
            return Ok(false);
        }
        let mut i = 0;
        while i < pages {
            let untouched = zero[i];
            let start = i;
            while i < pages && zero[i] == untouched {
                i += 1;
            }
            if !untouched {
                let bytes = &mut buf[start * PAGE..i * PAGE];
                let at = gpa + (start * PAGE) as u64;
                mem.read_slice(bytes, GuestAddress(at)).map_err(|e| {
                    format!("reading {} bytes of guest RAM at {at:#x}: {e}", bytes.len())
                })?;
            }
        }
        Ok(true)
    }
}

const PAGE: usize = 4096;

impl Drop for MachineSource {
    fn drop(&mut self) {
        // Before `machine` may go with its vCPU threads: a thread id is reused once its
        // thread ended (fields drop in declaration order, `machine` first).
        self.stop_yielding();
    }
}

impl SourceVm for MachineSource {
    fn config(&self) -> HookResult<Vec<u8>> {
        serde_json::to_vec(&self.machine.config).map_err(|e| format!("VM config: {e}"))
    }

    fn ram_layout(&self) -> Vec<RamRange> {
        crate::memory::ram_layout(self.machine.memory())
    }

    fn read_pages(&self, gpa: u64, buf: &mut [u8]) -> HookResult<()> {
        let mut zero = Vec::new();
        self.read_pages_known_zero(gpa, buf, &mut zero)?;
        for (page, _) in buf.chunks_exact_mut(PAGE).zip(&zero).filter(|(_, &z)| z) {
            page.fill(0);
        }
        Ok(())
    }

    fn read_pages_known_zero(
        &self,
        gpa: u64,
        buf: &mut [u8],
        zero: &mut Vec<bool>,
    ) -> HookResult<()> {
        if self.read_sparse(gpa, buf, zero)? {
            return Ok(());
        }
        zero.clear();
        self.machine
            .memory()
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|e| format!("reading {} bytes of guest RAM at {gpa:#x}: {e}", buf.len()))
    }

    fn start_dirty_log(&self) -> HookResult<()> {
        self.machine.start_dirty_log().map_err(|e| e.to_string())
    }

    fn collect_dirty(&self, final_pass: bool) -> HookResult<Vec<(u64, u64)>> {
        // The final pass runs with every vCPU parked outside KVM_RUN (the engine paused
        // the machine), so the rings hold everything; the backup bitmap comes last.
        let kind = if final_pass {
            SyncKind::Final
        } else {
            SyncKind::Live
        };
        let regions = self
            .machine
            .collect_dirty(kind)
            .map_err(|e| e.to_string())?;
        if !final_pass && std::env::var_os("FERRY_TEST_DROP_LIVE_DIRTY").is_some() {
            log::warn!(
                "FERRY_TEST_DROP_LIVE_DIRTY is set: the pages the guest dirtied while this \
                 pass was sent are not sent again (a test seam; the guest will find them stale)"
            );
            return Ok(Vec::new());
        }
        Ok(regions.into_iter().flat_map(|r| r.ranges).collect())
    }

    fn stop_dirty_log(&self) {
        if let Err(e) = self.machine.stop_dirty_log() {
            log::warn!("stopping dirty logging: {e}");
        }
    }

    fn prepare_pause(&self) {
        // Their setpriority calls (~10 µs) before the pause rather than in it.
        self.raise_for_pause();
        self.machine.prepare_final_collection();
        // The state's encoding run once on this thread, the one that encodes it in the
        // pause: cold, after the passes went through the caches, it took 15-25 µs more.
        let blank = MachineState::blank(self.machine.config.cpus.boot_vcpus);
        std::hint::black_box(blank.encode(self.state_encoding()).ok());
    }

    fn pause(&self) -> HookResult<()> {
        self.raise_for_pause();
        if self.machine.pauses_devices_late() {
            // The test seam's devices write after the final collection: their state is
            // taken after that, in `save_state`.
            self.machine.pause();
            return Ok(());
        }
        // The devices stop with it (as `Machine::pause`): nothing in this state changes
        // while the last pages are collected and sent. A failure to save is reported by
        // `save_state`: the pause itself happened, so the engine resumes the VM on error.
        let state = self.machine.pause_and_save().map_err(|e| e.to_string());
        *self.at_pause() = Some(state);
        Ok(())
    }

    fn resume(&self) -> HookResult<()> {
        // Stale once the vCPUs run.
        self.at_pause().take();
        // Raised for the pause: the guest runs on at its own priority.
        self.stop_yielding();
        if self.paused_before {
            log::info!("the VM was paused before the migration: it stays paused");
        } else {
            self.machine.resume();
        }
        Ok(())
    }

    fn save_state(&self) -> HookResult<(Vec<u8>, Vec<u8>)> {
        let taken = self.at_pause().take();
        let state = match taken {
            Some(s) => s?,
            None => self.machine.save_state().map_err(|e| e.to_string())?,
        };
        let blob = state.encode(self.state_encoding())?;
        // One versioned blob holds vCPUs and devices alike.
        Ok((blob, Vec::new()))
    }

    fn peer_reads_binary_state(&self, yes: bool) {
        self.peer_reads_binary.store(yes, Ordering::Relaxed);
    }

    fn state_ready_at_pause(&self) -> bool {
        // `pause` took it, except under the device-late seam.
        !self.machine.pauses_devices_late()
    }

    fn set_throttle(&self, percent: u8) -> HookResult<()> {
        self.machine
            .set_throttle(percent)
            .map_err(|e| e.to_string())
    }

    fn memory_files(&self) -> HookResult<Vec<(MemoryFd, BorrowedFd<'_>)>> {
        self.machine
            .memory()
            .iter()
            .map(|r| {
                let f = r.file_offset().ok_or_else(|| {
                    format!(
                        "guest RAM at {:#x} is not shared memory (start the VM with --memory shared=on)",
                        r.start_addr().0
                    )
                })?;
                let entry = MemoryFd {
                    gpa: r.start_addr().0,
                    size: r.len(),
                    file_offset: f.start(),
                };
                Ok((entry, f.file().as_fd()))
            })
            .collect()
    }

    fn dirty_tracking_stats(&self) -> Option<DirtyTrackingStats> {
        let hv = self.machine.hypervisor();
        let src = self.machine.dirty_sources();
        let sources = DirtySourceStats {
            kvm: src.kvm.load(Ordering::Relaxed),
            devices: src.devices.load(Ordering::Relaxed),
            viommu_dma: src.viommu_dma.load(Ordering::Relaxed),
            viommu_footprint: self.machine.viommu_footprint_pages(),
            user_devices: src.user_devices.load(Ordering::Relaxed),
            vfio_devices: src.vfio_devices.load(Ordering::Relaxed),
        };
        Some(match hv.tracking() {
            DirtyTracking::Ring {
                entries,
                backup_bitmap,
                ..
            } => DirtyTrackingStats {
                mode: DirtyTrackingMode::Ring,
                ring_entries: entries,
                ring_full_exits: hv.stats.ring_full_exits.load(Ordering::Relaxed),
                backup_bitmap,
                sources,
            },
            DirtyTracking::Bitmap { .. } => DirtyTrackingStats {
                mode: DirtyTrackingMode::Bitmap,
                ring_entries: 0,
                ring_full_exits: 0,
                backup_bitmap: false,
                sources,
            },
        })
    }
}
