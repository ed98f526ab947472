//! A machine being received, as the migration engine's destination: built from the
//! source's configuration with the same capability ordering, filled page by page, and
//! started only once its state has been restored.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use vm_migration::engine::HookResult;
use vm_migration::protocol::MemoryFd;
use vm_migration::{DestinationVm, PostcopyRam, RamRange};

use crate::config::VmConfig;
use crate::memory::GuestMemoryMmap;
use crate::vm::{memory_from_files, IncomingMachine, LoadedState, Machine, MachineState};

/// The engine's view of the machine being received.
#[derive(Default)]
pub struct MachineDestination {
    /// Guest RAM mapped from the source's files (`MemFDs`), until the VM is built on it.
    adopted: Option<GuestMemoryMmap>,
    incoming: Option<IncomingMachine>,
    /// `incoming`'s own state as built, encoded: what `warm_up` loads.
    fresh_state: Option<Vec<u8>>,
    /// A `warm_up` failed: no more.
    rehearsal_failed: AtomicBool,
    state: Option<MachineState>,
    /// The state loaded into `incoming` while the last pages came (`prepare_state`), and
    /// which blob it came from.
    loaded: std::sync::Mutex<Option<(BlobPrint, LoadedState)>>,
    /// The running machine, once `resume` succeeded; its vCPU threads are confirmed
    /// when it is taken ([`MachineDestination::take_started`]).
    machine: Option<Machine>,
    /// This host's sockets for the source's vfio-user devices, in order (none given: the
    /// source's paths).
    pub user_device_sockets: Vec<std::path::PathBuf>,
    /// `resume` builds the machine paused (a snapshot restored without `resume`).
    pub start_paused: bool,
    /// Guest RAM under userfaultfd while postcopy runs.
    postcopy: Option<Arc<super::postcopy::UffdRam>>,
    /// Pages already faulted in here: each pass rewrites pages the last one brought in.
    prefaulted: Option<Arc<crate::memory::PrefaultedPages>>,
    /// Faults in, meanwhile, the pages the first pass left for later.
    prefaulter: std::sync::Mutex<Option<Prefaulter>>,
}

/// What identifies a machine-state blob: its length and crc32c. `restore_state` must be
/// handed the blob `prepare_state` loaded (the engine passes the one it kept); a different
/// one would otherwise be ignored without a word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct BlobPrint {
    len: usize,
    crc32c: u32,
}

impl BlobPrint {
    fn of(blob: &[u8]) -> BlobPrint {
        BlobPrint {
            len: blob.len(),
            crc32c: crc32c::crc32c(blob),
        }
    }

    /// Ok when `blob` is the one this print was taken of.
    fn check(self, blob: &[u8]) -> Result<(), String> {
        let given = BlobPrint::of(blob);
        if given == self {
            return Ok(());
        }
        Err(format!(
            "restore_state was handed a machine state of {} bytes (crc32c {:#010x}), not \
             the one prepare_state loaded ({} bytes, crc32c {:#010x})",
            given.len, given.crc32c, self.len, self.crc32c
        ))
    }
}

/// A thread faulting in the pages the first pass left out, from the last one down, while
/// the receiving thread writes them from the first one up; pieces already faulted in are
/// skipped. It holds its own handle on guest RAM, so the mapping outlives it.
/// Dropping it stops the thread and waits for it (at most one piece).
struct Prefaulter {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Prefaulter {
    /// Pieces faulted in per `madvise`, as the receiver's chunks.
    const PIECE: u64 = 1 << 20;

    fn start(
        mem: GuestMemoryMmap,
        prefaulted: Arc<crate::memory::PrefaultedPages>,
        runs: Vec<(u64, u32)>,
    ) -> std::io::Result<Prefaulter> {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("mig-prefault".into())
            .spawn(move || {
                ferry_seccomp::install_or_exit(ferry_seccomp::ThreadKind::MigrationReceiver);
                let started = std::time::Instant::now();
                let huge = Self::advise_huge_pages(&mem, &runs);
                let mut faulted = 0u64;
                'runs: for &(gpa, pages) in runs.iter().rev() {
                    let mut end = gpa + u64::from(pages) * 4096;
                    while end > gpa {
                        if stopped.load(Ordering::Relaxed) {
                            break 'runs;
                        }
                        let start = end.saturating_sub(Self::PIECE).max(gpa);
                        // Pieces already there (a receiver got to them: the connections
                        // take a pass's runs in address order, so together they write
                        // upwards) are skipped.
                        if prefaulted.prefault(&mem, start, (end - start) as usize) {
                            faulted += (end - start) / 4096;
                        }
                        end = start;
                    }
                }
                log::info!(
                    "prefault helper: faulted in {faulted} of the pages the first pass left \
                     out in {:.1} ms ({} MiB of them in huge pages)",
                    started.elapsed().as_secs_f64() * 1000.0,
                    huge >> 20
                );
            })?;
        Ok(Prefaulter {
            stop,
            thread: Some(thread),
        })
    }

    /// Has the thread stop after its current piece, without waiting for it.
    fn ask_to_stop(&self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Huge pages only where the first pass left at least this much (64 MiB) for later:
    /// there they save a lot of faults, while on a few MiB (b's guest since its vCPUs
    /// yield to the migration: 10-20 MiB) a huge page's fault, ~5 ms on this host, is
    /// one more the resume can run into.
    const HUGE_MIN_PAGES: u64 = 16384;

    /// Runs at most this many `madvise` calls: each may split the mapping, and a process
    /// has a bounded number of mappings (`vm.max_map_count`, 65530 by default).
    const MAX_HUGE_RUNS: usize = 4096;

    /// Asks for transparent huge pages on the runs the first pass left whole 2 MiB of:
    /// nothing was written there yet, so each 2 MiB fills with one fault instead of 512.
    /// On the 2 GiB `verify` guest the helper's ~110k pages took 0.1 s instead of ~1 s,
    /// and the migration 1.7 s instead of 2.2 (loopback). Not on RAM as a whole: where the
    /// first pass writes scattered pages, a 2 MiB page per 4 KiB written can cost more than
    /// it saves (the 150 MiB `dirty` guest's migration took 2-3× as long in two sets of
    /// runs out of three). Returns the bytes asked for.
    fn advise_huge_pages(mem: &GuestMemoryMmap, runs: &[(u64, u32)]) -> usize {
        let pages: u64 = runs.iter().map(|r| u64::from(r.1)).sum();
        if pages < Self::HUGE_MIN_PAGES {
            return 0;
        }
        runs.iter()
            .filter(|&&(_, pages)| pages as usize * 4096 >= crate::memory::HUGE_PAGE)
            .take(Self::MAX_HUGE_RUNS)
            .map(|&(gpa, pages)| {
                crate::memory::advise_huge_pages_within(mem, gpa, pages as usize * 4096)
            })
            .sum()
    }
}

impl Drop for Prefaulter {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl MachineDestination {
    /// Set with `incoming` (in `check_config`), so there whenever a page can be written.
    fn prefault(&self, mem: &GuestMemoryMmap, gpa: u64, len: usize) {
        if let Some(p) = &self.prefaulted {
            p.prefault(mem, gpa, len);
        }
    }

    /// Stops the prefault helper, if one runs: before the VM runs or its RAM goes under
    /// userfaultfd (where faulting a missing page in would wait for the source).
    fn stop_prefaulter(&self) {
        let p = self
            .prefaulter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        drop(p);
    }

    /// [`Prefaulter::ask_to_stop`], if one runs.
    fn ask_prefaulter_to_stop(&self) {
        if let Some(p) = &*self.prefaulter.lock().unwrap_or_else(|p| p.into_inner()) {
            p.ask_to_stop();
        }
    }

    fn incoming(&self) -> HookResult<&IncomingMachine> {
        self.incoming
            .as_ref()
            .ok_or_else(|| "no VM was built for this migration".to_string())
    }

    /// The machine built and started here, its vCPU threads confirmed
    /// ([`Machine::confirm_vcpus`]: `resume` hands them their vCPUs only, so that
    /// `Resumed` leaves without waiting for them to be scheduled).
    pub fn take_started(&mut self) -> Result<Machine, String> {
        let machine = self
            .machine
            .take()
            .ok_or_else(|| "the VM did not start".to_string())?;
        // Asked to stop at `resume`; its last piece may have run on meanwhile.
        self.stop_prefaulter();
        machine.confirm_vcpus().map_err(|e| e.to_string())?;
        Ok(machine)
    }
}

impl DestinationVm for MachineDestination {
    fn check_config(&mut self, vm_config: &[u8], ram: &[RamRange]) -> HookResult<Vec<RamRange>> {
        let mut config: VmConfig = serde_json::from_slice(vm_config)
            .map_err(|e| format!("the source's VM configuration is not understood here: {e}"))?;
        if !self.user_device_sockets.is_empty() {
            if self.user_device_sockets.len() != config.user_devices.len() {
                return Err(format!(
                    "user_devices names {} socket(s), the source has {} vfio-user device(s)",
                    self.user_device_sockets.len(),
                    config.user_devices.len()
                ));
            }
            for (u, socket) in config
                .user_devices
                .iter_mut()
                .zip(&self.user_device_sockets)
            {
                log::info!(
                    "vfio-user device {}: the source's {} is {} here",
                    u.id.as_deref().unwrap_or("(no id)"),
                    u.socket.display(),
                    socket.display()
                );
                u.socket = socket.clone();
            }
        }
        for (i, u) in config.user_devices.iter().enumerate() {
            let id = u.id.clone().unwrap_or_else(|| format!("user{i}"));
            crate::user_devices::probe(u).map_err(|e| format!("vfio-user device {id}: {e}"))?;
        }
        let incoming = match self.adopted.take() {
            Some(mem) => Machine::incoming_on(config, mem),
            None => Machine::incoming(config),
        }
        .map_err(|e| e.to_string())?;
        let layout = crate::memory::ram_layout(incoming.memory());
        if layout != ram {
            return Err(format!(
                "the source's RAM layout {ram:x?} differs from the one built here {layout:x?}"
            ));
        }
        // Only the downtime's first-run costs are at stake: the real load reports its own
        // errors.
        self.fresh_state = incoming
            .fresh_state()
            .map_err(|e| log::warn!("no state load rehearsals: {e}"))
            .ok();
        self.incoming = Some(incoming);
        self.prefaulted = Some(Arc::new(crate::memory::PrefaultedPages::new(&layout)));
        Ok(layout)
    }

    fn adopt_memory(&mut self, files: Vec<(MemoryFd, OwnedFd)>) -> HookResult<()> {
        self.adopted = Some(memory_from_files(files).map_err(|e| e.to_string())?);
        Ok(())
    }

    fn write_pages(&self, gpa: u64, data: &[u8]) -> HookResult<()> {
        let mem = self.incoming()?.memory();
        self.prefault(mem, gpa, data.len());
        mem.write_slice(data, GuestAddress(gpa))
            .map_err(|e| format!("writing {} bytes at {gpa:#x}: {e}", data.len()))
    }

    fn fill_pages(&self, gpa: u64, len: usize, fill: &mut dyn FnMut(&mut [u8])) -> HookResult<()> {
        use vm_memory::bitmap::Bitmap;
        let mem = self.incoming()?.memory();
        let slice = mem
            .get_slice(GuestAddress(gpa), len)
            .map_err(|e| format!("{len} bytes at {gpa:#x}: {e}"))?;
        self.prefault(mem, gpa, len);
        let guard = slice.ptr_guard_mut();
        // SAFETY: `slice` is `len` bytes of this VM's guest RAM mapping (checked by
        // `get_slice`), mapped for as long as `mem` is borrowed, which outlives `buf`. The
        // VM being received runs nothing yet (no vCPU, no device), and the engine never
        // hands the same pages to two threads at once, so nothing else reads or writes
        // these bytes while `fill` holds them.
        let buf = unsafe { std::slice::from_raw_parts_mut(guard.as_ptr(), len) };
        fill(buf);
        // As a write through `GuestMemory` would: the VMM's dirty log sees every write.
        slice.bitmap().mark_dirty(0, len);
        Ok(())
    }

    fn zero_pages(&self, gpa: u64, pages: u64) -> HookResult<()> {
        const ZERO: [u8; 4096] = [0; 4096];
        let mem = self.incoming()?.memory();
        for i in 0..pages {
            let a = gpa + i * 4096;
            mem.write_slice(&ZERO, GuestAddress(a))
                .map_err(|e| format!("zeroing the page at {a:#x}: {e}"))?;
        }
        Ok(())
    }

    fn expect_pages(&self, runs: Vec<(u64, u32)>) {
        let (Ok(incoming), Some(prefaulted)) = (self.incoming(), &self.prefaulted) else {
            return;
        };
        let pages: u64 = runs.iter().map(|r| u64::from(r.1)).sum();
        let mut slot = self.prefaulter.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_some() {
            return;
        }
        match Prefaulter::start(incoming.memory().clone(), prefaulted.clone(), runs) {
            Ok(p) => {
                log::info!(
                    "the first pass left {pages} pages for later: a helper thread faults \
                     them in meanwhile, from the last one down"
                );
                *slot = Some(p);
            }
            Err(e) => log::warn!("no prefault helper ({e}): the receiver faults pages in"),
        }
    }

    fn warm_up(&self) {
        let (Some(incoming), Some(fresh)) = (&self.incoming, &self.fresh_state) else {
            return;
        };
        // Never over a state loaded (or kept for the start): the engine does not call
        // this then either.
        if self.state.is_some()
            || self
                .loaded
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some()
            || self.rehearsal_failed.load(Ordering::Relaxed)
        {
            return;
        }
        if let Err(e) = incoming.rehearse_load(fresh) {
            // Only the downtime's first-run costs were at stake: no more tries.
            self.rehearsal_failed.store(true, Ordering::Relaxed);
            log::warn!("rehearsing the state load failed, not tried again: {e}");
        }
    }

    fn prepare_state(&self, vcpus: &[u8], _devices: &[u8]) -> HookResult<()> {
        // The source has paused: the pages still coming are the last few, which the
        // receiver faults in itself. The helper's piece in progress ends meanwhile, instead
        // of running into the VM's start (see `resume`).
        self.ask_prefaulter_to_stop();
        let state = MachineState::decode(vcpus)?;
        let loaded = self.incoming()?.load(state).map_err(|e| e.to_string())?;
        *self.loaded.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((BlobPrint::of(vcpus), loaded));
        Ok(())
    }

    fn restore_state(&mut self, vcpus: &[u8], _devices: &[u8]) -> HookResult<()> {
        if let Some((print, _)) = self.loaded.get_mut().unwrap_or_else(|p| p.into_inner()) {
            // Loaded already: only make sure it is the same blob.
            return print.check(vcpus);
        }
        let state = MachineState::decode(vcpus)?;
        self.state = Some(state);
        Ok(())
    }

    fn supports_postcopy(&self) -> bool {
        // RAM handed over as files is the source's own: nothing to fetch.
        self.adopted.is_none() && super::postcopy::available()
    }

    fn postcopy_ram(&mut self) -> HookResult<Arc<dyn PostcopyRam>> {
        self.stop_prefaulter();
        let ram = Arc::new(super::postcopy::UffdRam::new(self.incoming()?.memory())?);
        self.postcopy = Some(ram.clone());
        Ok(ram)
    }

    fn pause_postcopy(&mut self) -> HookResult<()> {
        let machine = self
            .machine
            .as_ref()
            .ok_or_else(|| "the VM did not start".to_string())?;
        machine.pause_for_postcopy();
        // Its pages that never came must keep their waiters waiting, whatever becomes of
        // this migration's objects.
        if let Some(ram) = self.postcopy.take() {
            super::postcopy::keep_for_good(ram);
        }
        Ok(())
    }

    fn resume_postcopy(&mut self) -> HookResult<()> {
        let machine = self
            .machine
            .as_ref()
            .ok_or_else(|| "the VM did not start".to_string())?;
        machine.resume_after_postcopy();
        Ok(())
    }

    fn resume(&mut self) -> HookResult<()> {
        // Stopped, not waited for: a piece it is faulting in (1 MiB, or a huge page: ~6 ms
        // on this host's first touch) would hold the guest paused, and faulting pages in
        // never changes what they hold. Waited for once `Resumed` is out (`take_started`).
        // (Its `madvise` holds the mmap lock meanwhile, which can still stall the start:
        // b's destinations saw the start take 1-6 ms when a piece ran into it; hence the
        // stop at the pause, `prepare_state`.)
        self.ask_prefaulter_to_stop();
        let incoming = self
            .incoming
            .take()
            .ok_or_else(|| "no VM was built for this migration".to_string())?;
        let loaded = self
            .loaded
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let started = match (loaded, self.state.take()) {
            (Some((_, loaded)), _) => incoming.start_loaded(loaded, self.start_paused),
            (None, Some(state)) => incoming.start(state, self.start_paused),
            (None, None) => return Err("no machine state was received".to_string()),
        };
        self.machine = Some(started.map_err(|e| e.to_string())?);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `restore_state` after `prepare_state` takes the same blob only: one byte or one
    /// length apart is an error naming both sizes.
    #[test]
    fn a_prepared_state_is_checked_against_the_blob_restored() {
        let blob: Vec<u8> = (0..9000u32).map(|i| (i * 7) as u8).collect();
        let print = BlobPrint::of(&blob);
        print.check(&blob).expect("the same blob");
        let mut changed = blob.clone();
        changed[4500] ^= 1;
        let e = print.check(&changed).expect_err("one bit apart");
        assert!(e.contains("9000 bytes") && e.contains("crc32c"), "{e}");
        let e = print.check(&blob[..8999]).expect_err("one byte shorter");
        assert!(e.contains("8999 bytes") && e.contains("9000 bytes"), "{e}");
    }

    /// The helper faulting in what pass 0 left out is gone before guest RAM goes under
    /// userfaultfd: there, faulting in a missing page would wait for a source that sends
    /// it, and a helper left running would hang (and the VM's teardown with it).
    #[test]
    fn the_prefault_helper_stops_before_postcopy_takes_the_ram() {
        if !super::super::postcopy::available() {
            eprintln!("skipped: no userfaultfd on this host");
            return;
        }
        let mut config = VmConfig::default();
        config.memory.size = 256 << 20;
        let incoming = Machine::incoming(config).expect("an incoming machine");
        let layout = crate::memory::ram_layout(incoming.memory());
        let mut d = MachineDestination {
            prefaulted: Some(Arc::new(crate::memory::PrefaultedPages::new(&layout))),
            incoming: Some(incoming),
            ..Default::default()
        };
        // All of RAM left for later: the helper has 64k pages to fault in.
        d.expect_pages(
            layout
                .iter()
                .map(|r| (r.gpa, (r.size / 4096) as u32))
                .collect(),
        );
        assert!(d.prefaulter.lock().unwrap().is_some(), "the helper started");
        let _ram = d.postcopy_ram().expect("postcopy RAM");
        assert!(
            d.prefaulter.lock().unwrap().is_none(),
            "the helper still runs with the RAM under userfaultfd"
        );
    }
}
