//! Host-side checks of a core file written by `vm.coredump`: QEMU's migration-test check
//! of the test guest's `dirty` workload, on the guest RAM a core file holds.

use guest_pattern::{check_dirty_counters, share, DirtyCounters, DirtyError, PAGE_SIZE};
use vmm::coredump::CoreFile;

/// Checks the `dirty` workload's counters (the first byte of each 4 KiB page) of each of
/// `cpus` vCPUs' shares of the region `start..start + size` in `core`, in vCPU order.
/// The error names the vCPU and the guest-physical address of the first wrong page.
pub fn check_dirty_region(
    core: &CoreFile,
    start: u64,
    size: u64,
    cpus: u32,
) -> Result<Vec<DirtyCounters>, String> {
    let pages = size / PAGE_SIZE as u64;
    let firsts = core
        .first_bytes_of_pages(start, pages)
        .map_err(|e| e.to_string())?;
    (0..cpus)
        .map(|c| {
            let r = share(pages, cpus, c);
            let own = &firsts[r.start as usize..r.end as usize];
            check_dirty_counters(own.iter().copied()).map_err(|e| {
                let at = match e {
                    DirtyError::Mismatch { index, .. } => {
                        format!(" (gpa {:#x})", start + (r.start + index) * PAGE_SIZE as u64)
                    }
                    DirtyError::Empty => String::new(),
                };
                format!(
                    "vCPU {c}'s share, pages {}..{} of the region at {start:#x}: {e}{at}",
                    r.start, r.end
                )
            })
        })
        .collect()
}

/// Whether the counters show that the workload ran: not every page of every share holds
/// zero (which is what a never-written region, or a dump of the wrong memory, reads as).
pub fn counters_moved(shares: &[DirtyCounters]) -> bool {
    shares.iter().any(|s| s.value != 0 || s.edge.is_some())
}
