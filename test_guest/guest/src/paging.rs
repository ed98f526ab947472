//! The identity map. The entry code maps 0-4 GiB with 2 MiB pages (RAM below the hole,
//! the MMIO hole with the local APIC); [`map_ram`] adds RAM above 4 GiB with 1 GiB pages
//! when CPUID offers them, else with 2 MiB pages from a fixed pool.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::arch::{cpuid, flush_tlb};
use crate::boot::{BOOT_PD, BOOT_PDPT, PD_POOL_PAGES};

const GIB: u64 = 1 << 30;
/// Present, writable, user-accessible (the workloads run in ring 3).
const PRESENT_WRITABLE: u64 = 0x7;
const LARGE: u64 = 0x80;
/// PWT | PCD: uncached (PAT entry 3 at reset).
const UNCACHED: u64 = 0x18;

static MAPPED_LIMIT: AtomicU64 = AtomicU64::new(4 * GIB);

/// Everything below this address is identity-mapped.
pub fn mapped_limit() -> u64 {
    MAPPED_LIMIT.load(Ordering::Relaxed)
}

/// How RAM above 4 GiB got mapped.
pub enum HighMap {
    None,
    Gib1,
    Mib2,
}

/// Maps `[4 GiB, top)`. Returns how, and the new mapped limit, which is below `top` only
/// if `top` is beyond what the page tables can reach (512 GiB with 1 GiB pages, 20 GiB
/// without). Boot CPU only, before any AP runs.
pub fn map_ram(top: u64) -> (HighMap, u64) {
    if top <= 4 * GIB {
        return (HighMap::None, mapped_limit());
    }
    let gib1 = cpuid(0x8000_0000, 0)[0] >= 0x8000_0001 && cpuid(0x8000_0001, 0)[3] & (1 << 26) != 0;
    let gibs = top.div_ceil(GIB).min(512);
    let mut limit = 4 * GIB;
    // SAFETY: the page tables are only written here and by the entry code, on the boot
    // CPU before any AP starts; entries being added are not present yet, so no live
    // translation changes under running code.
    unsafe {
        let pdpt = &mut (*BOOT_PDPT.get()).0;
        let pool = &mut *PD_POOL_PAGES.get();
        for g in 4..gibs {
            if gib1 {
                pdpt[g as usize] = (g * GIB) | LARGE | PRESENT_WRITABLE;
            } else {
                let Some(pd) = pool.get_mut(g as usize - 4) else {
                    break;
                };
                for (i, e) in pd.0.iter_mut().enumerate() {
                    *e = (g * GIB + ((i as u64) << 21)) | LARGE | PRESENT_WRITABLE;
                }
                pdpt[g as usize] = pd as *mut _ as u64 | PRESENT_WRITABLE;
            }
            limit = (g + 1) * GIB;
        }
    }
    flush_tlb();
    MAPPED_LIMIT.store(limit, Ordering::Relaxed);
    (if gib1 { HighMap::Gib1 } else { HighMap::Mib2 }, limit)
}

/// Makes the 2 MiB page holding `addr` (below 4 GiB: an MMIO register page) uncached.
/// Boot CPU only, before any AP runs.
pub fn set_uncached(addr: u64) {
    if addr >= 4 * GIB {
        return;
    }
    // SAFETY: as in `map_ram`: boot CPU only, before APs run. Changing the cache type of
    // an MMIO page nobody has touched yet is followed by a TLB flush.
    unsafe {
        let pd = &mut *BOOT_PD.get();
        let i = (addr >> 21) as usize;
        pd[i / 512].0[i % 512] |= UNCACHED;
    }
    flush_tlb();
}
