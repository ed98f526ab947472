//! The precopy engine: [`send_migration`] on the source, [`receive_migration`] on the
//! destination, both over any [`MigrationStream`] and a VM seen through a trait, so all of
//! it is tested here with fake VMs and no KVM.
//!
//! The vmm implements [`SourceVm`] / [`DestinationVm`] over its real machine, connects or
//! accepts the stream, creates a [`MigrationProgress`] the API can read and cancel, and
//! calls the engine on a thread of its own (it returns when the migration has ended).

mod destination;
mod postcopy;
pub use postcopy::resume_postcopy;
mod source;

use std::sync::Arc;
use std::time::Duration;

pub use destination::{
    receive_migration, receive_migration_from, AcceptChannel, ReceiveError, ReceiveOptions,
};
pub use source::{send_migration, send_migration_parallel, SendError, SendOptions, SwitchOver};

/// Test-only seam (tests of postcopy's own checks): at the switch to postcopy the source
/// leaves the first page at or above this gpa (hex or decimal) of the final dirty set out
/// of both the discard list and the stream, so the destination keeps its stale copy.
pub const TEST_STALE_PAGE_ENV: &str = "FERRY_TEST_POSTCOPY_STALE_FROM";

/// Test-only seam (tests that a sparse page sent again lands whole): when set, the
/// destination writes every sparse page's stretches over what the page held, as if it
/// had never been written, so the zeros between them can be stale.
pub const TEST_SPARSE_NEVER_CLEARED_ENV: &str = "FERRY_TEST_SPARSE_NEVER_CLEARED";

use std::os::fd::{BorrowedFd, OwnedFd};

use crate::protocol::{MemoryFd, RamRange};
use crate::stats::DirtyTrackingStats;
#[allow(unused_imports)] // For the links in the docs above.
use crate::{stats::MigrationProgress, transport::MigrationStream};

/// What a VM hook returns on failure: the vmm's own description of what went wrong.
pub type HookResult<T> = Result<T, String>;

/// What to do when `timeout` passes before the remaining pages fit in the downtime.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TimeoutStrategy {
    /// Abort: tell the destination, resume the source VM, fail with "timed out".
    #[default]
    Cancel,
    /// Switch over anyway, whatever the downtime.
    Ignore,
}

/// The source VM as the engine needs it. Methods take `&self`: the guest keeps running
/// (and dirtying memory) on its own threads while the engine reads it.
pub trait SourceVm {
    /// The VM configuration, opaque to the engine (the vmm's JSON); sent in `Config`.
    fn config(&self) -> HookResult<Vec<u8>>;

    /// Guest RAM as page-aligned, sorted, non-overlapping `(gpa, size)` ranges.
    fn ram_layout(&self) -> Vec<RamRange>;

    /// Copies guest RAM at `gpa` into `buf` (a whole number of pages, inside one range).
    fn read_pages(&self, gpa: u64, buf: &mut [u8]) -> HookResult<()>;

    /// [`SourceVm::read_pages`], except that pages the VM knows to be zero without reading
    /// them (never-touched RAM) may be left unwritten in `buf` and marked in `zero` (one
    /// entry per page; left empty, it says nothing). The default reads every page.
    fn read_pages_known_zero(
        &self,
        gpa: u64,
        buf: &mut [u8],
        zero: &mut Vec<bool>,
    ) -> HookResult<()> {
        zero.clear();
        self.read_pages(gpa, buf)
    }

    /// Starts dirty logging (every source: vCPUs, the VMM itself, DMA). Pages dirtied from
    /// now on must appear in a later [`SourceVm::collect_dirty`].
    fn start_dirty_log(&self) -> HookResult<()>;

    /// Returns and clears the pages dirtied since the last call, as `(gpa, len)` ranges
    /// (any order, overlaps allowed). `final_pass` is true once, after [`SourceVm::pause`]:
    /// that is when to flush rings of kicked vCPUs and read the backup bitmap last.
    fn collect_dirty(&self, final_pass: bool) -> HookResult<Vec<(u64, u64)>>;

    /// Stops dirty logging (after success or failure).
    fn stop_dirty_log(&self);

    /// Stops the vCPUs: no guest or device write to RAM may happen until `resume`.
    fn pause(&self) -> HookResult<()>;

    /// Runs the vCPUs again (the migration failed or was cancelled).
    fn resume(&self) -> HookResult<()>;

    /// The paused machine's state: `(vcpus, devices)`, opaque blobs for the destination.
    fn save_state(&self) -> HookResult<(Vec<u8>, Vec<u8>)>;

    /// Whether the destination reads the state in the VM's binary encoding
    /// ([`crate::protocol::features::BINARY_STATE`]); told once, after the handshake,
    /// before any [`SourceVm::save_state`]. The default ignores it.
    fn peer_reads_binary_state(&self, yes: bool) {
        let _ = yes;
    }

    /// Called just before the pause for the last pass, the guest still running: work that
    /// makes the pause shorter without being needed for it (the final dirty collection's
    /// memory brought into the caches, say). The default does nothing.
    fn prepare_pause(&self) {}

    /// Whether [`SourceVm::save_state`] right after [`SourceVm::pause`] already gives the
    /// final state: nothing the state holds changes while the last pages are collected.
    /// The state then goes before those pages, and the destination loads it meanwhile
    /// ([`DestinationVm::prepare_state`]). The default: no, it goes after them.
    fn state_ready_at_pause(&self) -> bool {
        false
    }

    /// Guest RAM as files, one per RAM range in layout order, for a migration on one host
    /// (`MemFDs`). The default: RAM is not shared memory.
    fn memory_files(&self) -> HookResult<Vec<(MemoryFd, BorrowedFd<'_>)>> {
        Err("guest RAM is not shared memory (start the VM with --memory shared=on)".into())
    }

    /// Holds the vCPUs back for `percent` of their time (0: run freely), so that a guest
    /// dirtying memory faster than the link carries it lets the migration converge
    /// (auto-converge). The default does nothing.
    fn set_throttle(&self, percent: u8) -> HookResult<()> {
        let _ = percent;
        Ok(())
    }

    /// Dirty-tracking figures for `vm.migration-info` (`None`: not reported).
    fn dirty_tracking_stats(&self) -> Option<DirtyTrackingStats> {
        None
    }
}

/// The destination VM as the engine needs it. RAM handed to the engine by
/// [`DestinationVm::check_config`] must read as zeros: zero pages never written before
/// are skipped, so an untouched page stays unallocated.
pub trait DestinationVm {
    /// Checks that this host can run the source's configuration with the source's RAM
    /// layout and builds the (not yet running) VM; returns the RAM layout it built. `Err`
    /// refuses the migration with that reason before any page moves.
    fn check_config(&mut self, vm_config: &[u8], ram: &[RamRange]) -> HookResult<Vec<RamRange>>;

    /// Takes the source's guest RAM as files (a migration on one host, `MemFDs`): called
    /// before [`DestinationVm::check_config`], which must then build the VM on them.
    fn adopt_memory(&mut self, files: Vec<(MemoryFd, OwnedFd)>) -> HookResult<()> {
        drop(files);
        Err("this VM cannot take its RAM as files".into())
    }

    /// Writes `data` (whole pages, inside one RAM range: the engine checks) at `gpa`.
    /// Called from several threads at once when memory comes over several connections,
    /// never for overlapping pages at the same time.
    fn write_pages(&self, gpa: u64, data: &[u8]) -> HookResult<()>;

    /// Lets `fill` write `len` bytes (whole pages, inside one RAM range: the engine checks)
    /// at `gpa` in place: `fill` is called once with a buffer that becomes those pages.
    /// Pages never written through this trait must read as zero in it (fresh RAM does, so
    /// does the default's buffer): `fill` leaves the zeros of a sparse page there
    /// alone and overwrites everything else (or the migration fails). The same concurrency as
    /// [`DestinationVm::write_pages`]. The default fills a buffer and writes it; a VM whose
    /// RAM can be handed out directly saves that copy (pages read from the network go
    /// straight into guest RAM).
    fn fill_pages(&self, gpa: u64, len: usize, fill: &mut dyn FnMut(&mut [u8])) -> HookResult<()> {
        let mut buf = vec![0u8; len];
        fill(&mut buf);
        self.write_pages(gpa, &buf)
    }

    /// Zeroes `pages` pages at `gpa` (pages that were written earlier and are zero now).
    fn zero_pages(&self, gpa: u64, pages: u64) -> HookResult<()>;

    /// The pages the first pass left out, as `(gpa, pages)` runs in address order: the
    /// guest wrote them again before their turn, so they come in a later pass. A VM may
    /// get them ready meanwhile (fault them in on another thread: on a nested host that
    /// first touch costs more than receiving the page). Called once, after the first pass,
    /// from a receiving thread. The default does nothing.
    fn expect_pages(&self, runs: Vec<(u64, u32)>) {
        drop(runs);
    }

    /// A precopy pass came in, and the source's state not yet: it may pause soon.
    /// A VM may run ahead here what loading the state will run (on its fresh state), so
    /// that the load in the downtime finds that code and memory warm: on this nested
    /// host the state's decode took ~50 µs after a pass of pages had gone through the
    /// caches, 5 µs warm. Called from the receiving thread, never once the state arrived,
    /// and only where the source pauses after the call at the earliest (it waits for the
    /// pass's ack, and sends its state at the pause; see `features::STATE_AT_PAUSE`).
    /// The default does nothing.
    fn warm_up(&self) {}

    /// The source's state arrived (before the last pages, when the source sends it at the
    /// pause): a VM may load what needs no guest RAM meanwhile (registers into KVM),
    /// nothing that runs or reads RAM. Called at most once, from the receiving thread,
    /// while other threads may still write pages. [`DestinationVm::restore_state`] follows
    /// with the same blobs once every page arrived and was checked. The default does
    /// nothing.
    fn prepare_state(&self, vcpus: &[u8], devices: &[u8]) -> HookResult<()> {
        let _ = (vcpus, devices);
        Ok(())
    }

    /// Restores the source's state; called once, after every page arrived and checked.
    fn restore_state(&mut self, vcpus: &[u8], devices: &[u8]) -> HookResult<()>;

    /// Starts the vCPUs. Called only after a successful `restore_state`.
    fn resume(&mut self) -> HookResult<()>;

    /// Whether this VM can run before all of its RAM is here (postcopy). When true,
    /// [`DestinationVm::postcopy_ram`] must work once [`DestinationVm::check_config`] has.
    fn supports_postcopy(&self) -> bool {
        false
    }

    /// Guest RAM as postcopy needs it (see [`PostcopyRam`]); called once, after
    /// `check_config`, before the VM is resumed.
    fn postcopy_ram(&mut self) -> HookResult<Arc<dyn PostcopyRam>> {
        Err("this VM cannot run before all of its RAM is here (postcopy)".into())
    }

    /// Postcopy lost its link after `resume`: stop the vCPUs (those waiting for a page
    /// stay waiting), keep everything else as it is, so that the pages still missing can
    /// come later. The default does nothing.
    fn pause_postcopy(&mut self) -> HookResult<()> {
        Ok(())
    }

    /// Postcopy's link is back (the source connected again): undoes `pause_postcopy`.
    fn resume_postcopy(&mut self) -> HookResult<()> {
        Ok(())
    }
}

/// The destination's guest RAM while postcopy runs: the VM runs with pages missing, and
/// whoever touches a missing page (a vCPU, the kernel for it, a device model's DMA)
/// waits until the page is placed. Implemented over userfaultfd by the vmm.
pub trait PostcopyRam: Send + Sync {
    /// Drops what RAM holds of `pages` pages at `gpa` (not valid any more), so that the
    /// next touch waits for the page instead of reading the old data.
    fn discard(&self, gpa: u64, pages: u64) -> HookResult<()>;

    /// From now on, a touch of a page not present waits and is reported by `next_fault`.
    fn arm(&self) -> HookResult<()>;

    /// The next page someone waits for (page-aligned gpa), or `None` after `timeout`.
    /// The same page may be reported more than once.
    fn next_fault(&self, timeout: Duration) -> HookResult<Option<u64>>;

    /// Places whole pages `data` at `gpa` at once and wakes whoever waits for them. A page
    /// already present there is left as it is (not an error).
    fn place(&self, gpa: u64, data: &[u8]) -> HookResult<()>;

    /// [`PostcopyRam::place`] with `pages` zero pages.
    fn place_zero(&self, gpa: u64, pages: u64) -> HookResult<()>;

    /// Every page is present: touches no longer need watching.
    fn disarm(&self) -> HookResult<()>;
}

/// Default for how long a read or write may make no progress before the peer counts as gone.
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Default for how long the source waits for `Resumed` after `Complete`.
pub const DEFAULT_CONFIRM_TIMEOUT: Duration = Duration::from_secs(8);
/// Default for how long the destination waits for the next message.
pub const DEFAULT_RECEIVE_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default pages per memory chunk (1 MiB).
pub const DEFAULT_CHUNK_PAGES: u32 = 256;

/// Text of the `Hello` build field.
pub fn build_string() -> String {
    format!("ferry vm-migration {}", env!("CARGO_PKG_VERSION"))
}
