//! Guest RAM: `vm-memory` regions with an atomic dirty bitmap, so every write the VMM's
//! own code makes through `GuestMemory` is logged for migration.

use vm_memory::bitmap::AtomicBitmap;

/// Guest RAM as the VMM sees it. Writes through this type set bits in the per-region
/// `AtomicBitmap` (one bit per 4 KiB page).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;
/// One RAM region of [`GuestMemoryMmap`].
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<AtomicBitmap>;

/// `MADV_POPULATE_WRITE` (Linux 5.14), not yet in every libc.
const MADV_POPULATE_WRITE: libc::c_int = 23;

/// Faults every page of guest RAM in up front. A migration destination does this before
/// the pages arrive: one madvise per region is far cheaper than a fault per page taken
/// while receiving (on a nested host each fault is an exit to the outer hypervisor).
/// Returns false where the kernel lacks the call (the pages then fault in on first write).
pub fn populate(mem: &GuestMemoryMmap) -> bool {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    mem.iter().all(|r| {
        // SAFETY: the range is exactly one live anonymous mapping owned by `mem`;
        // MADV_POPULATE_WRITE only faults its pages in, it changes no contents.
        let rc = unsafe { libc::madvise(r.as_ptr().cast(), r.len() as usize, MADV_POPULATE_WRITE) };
        rc == 0
    })
}
