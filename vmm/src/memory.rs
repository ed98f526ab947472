//! Guest RAM: `vm-memory` regions with an atomic dirty bitmap, so every write the VMM's
//! own code makes through `GuestMemory` is logged for migration.

use vm_memory::bitmap::AtomicBitmap;

/// Guest RAM as the VMM sees it. Writes through this type set bits in the per-region
/// `AtomicBitmap` (one bit per 4 KiB page).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;
/// One RAM region of [`GuestMemoryMmap`].
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<AtomicBitmap>;
