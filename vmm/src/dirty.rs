//! The one dirty set the migration engine consumes: KVM's log (rings or bitmap) unioned
//! with the log of the VMM's own writes to guest memory (vm-memory's atomic bitmap), as
//! GPA ranges per RAM region. Each collection clears what it returned.

use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::GuestMemoryMmap;
use hypervisor::SyncKind;

const PAGE: u64 = 4096;

/// Dirty pages of one RAM region as `(gpa, len)` ranges in ascending order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegionDirty {
    pub region_gpa: u64,
    pub ranges: Vec<(u64, u64)>,
}

impl RegionDirty {
    pub fn pages(&self) -> u64 {
        self.ranges.iter().map(|r| r.1 / PAGE).sum()
    }
}

/// Turns a page bitmap (bit n = page n from `base`) into coalesced GPA ranges.
pub fn bitmap_to_ranges(base: u64, bitmap: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (w, &word) in bitmap.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            let b = bits.trailing_zeros() as u64;
            // Run of ones starting at b.
            let run = (!(bits >> b)).trailing_zeros() as u64;
            let gpa = base + (w as u64 * 64 + b) * PAGE;
            let len = run * PAGE;
            match out.last_mut() {
                Some(last) if last.0 + last.1 == gpa => last.1 += len,
                _ => out.push((gpa, len)),
            }
            bits = if b + run >= 64 {
                0
            } else {
                bits & (!0u64 << (b + run))
            };
        }
    }
    out
}

/// Pages each source reported dirty, summed over the collections since tracking
/// started (a page two sources report counts in both): `vm.migration-info` shows them.
#[derive(Debug, Default)]
pub struct DirtySources {
    /// KVM: the vCPU rings or the bitmap (and the backup bitmap).
    pub kvm: AtomicU64,
    /// The VMM's own writes: device models not behind the vIOMMU, the VMM itself.
    pub devices: AtomicU64,
    /// DMA of devices behind the vIOMMU, translated to guest-physical pages.
    pub viommu_dma: AtomicU64,
    /// DMA of vfio-user devices, from their own logs.
    pub user_devices: AtomicU64,
    /// DMA of VFIO devices, from their DMA logs or their IOMMU domains.
    pub vfio_devices: AtomicU64,
}

impl DirtySources {
    pub fn reset(&self) {
        for c in [
            &self.kvm,
            &self.devices,
            &self.viommu_dma,
            &self.user_devices,
            &self.vfio_devices,
        ] {
            c.store(0, Ordering::Relaxed);
        }
    }

    fn add(counter: &AtomicU64, bitmap: &[u64]) {
        let n: u64 = bitmap.iter().map(|w| u64::from(w.count_ones())).sum();
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// Test seams: logs read and thrown away.
#[derive(Clone, Copy, Debug, Default)]
pub struct DropLogs {
    /// The VMM's log and the DMA log.
    pub devices: bool,
    /// The DMA log of the devices behind the vIOMMU only.
    pub viommu: bool,
}

/// Collects KVM's dirty log, the VMM's own and the vIOMMU's DMA log, unioned per region.
/// Slot i of the KVM VM is region i of `mem` (Ferry registers them in that order), and
/// region i of `dma_log` maps the same RAM.
///
/// `drop` is a test-only seam (`FERRY_TEST_DROP_DEVICE_LOG`, both logs;
/// `FERRY_TEST_DROP_VIOMMU_LOG`, the DMA log): the logs it names are read and thrown
/// away, as a VMM whose device writes bypassed them would, so a test can show the guest
/// catching the pages that then go missing.
pub fn collect(
    vm: &hypervisor::Vm,
    mem: &GuestMemoryMmap,
    dma_log: Option<&GuestMemoryMmap>,
    kind: SyncKind,
    drop: DropLogs,
    sources: &DirtySources,
) -> hypervisor::Result<Vec<RegionDirty>> {
    let kvm_bitmaps = vm.sync_dirty(kind)?;
    let mut dma_regions = dma_log.map(|m| m.iter());
    Ok(mem
        .iter()
        .zip(kvm_bitmaps)
        .map(|(region, mut bm)| {
            DirtySources::add(&sources.kvm, &bm);
            // The VMM's logs are read after KVM's, so a device write racing the sync is
            // either in this collection or the next, never lost.
            let own = take_into(vmm_log(region), &mut bm, drop.devices);
            sources.devices.fetch_add(own, Ordering::Relaxed);
            if let Some(r) = dma_regions.as_mut().and_then(|r| r.next()) {
                let dma = take_into(vmm_log(r), &mut bm, drop.devices || drop.viommu);
                sources.viommu_dma.fetch_add(dma, Ordering::Relaxed);
            }
            let base = region.start_addr().0;
            RegionDirty {
                region_gpa: base,
                ranges: bitmap_to_ranges(base, &bm),
            }
        })
        .collect())
}

/// Takes `log` (one region's) and ORs it into `bm`, KVM's bitmap of the same region,
/// unless `thrown_away` (a test seam); returns the pages it held.
fn take_into(log: &devices::guest_ram::DirtyLog, bm: &mut [u64], thrown_away: bool) -> u64 {
    let mut pages = 0;
    log.take_each(|i, bits| {
        pages += u64::from(bits.count_ones());
        if let (false, Some(w)) = (thrown_away, bm.get_mut(i)) {
            *w |= bits;
        }
    });
    pages
}

/// The whole-region bitmap of VMM writes (the region's `MmapRegion` holds it).
fn vmm_log(region: &crate::memory::GuestRegionMmap) -> &devices::guest_ram::DirtyLog {
    std::ops::Deref::deref(region).bitmap()
}

/// Forgets the VMM's own log (at the start of tracking: the first pass sends all RAM).
pub fn reset_vmm_log(mem: &GuestMemoryMmap) {
    mem.iter().for_each(|r| vmm_log(r).reset());
}

/// Adds guest-physical `extra` ranges (page aligned) to the regions they fall in, keeping
/// each region's ranges sorted and merged.
pub fn add_ranges(regions: &mut [RegionDirty], mem: &GuestMemoryMmap, extra: &[(u64, u64)]) {
    if extra.is_empty() {
        return;
    }
    for (rd, region) in regions.iter_mut().zip(mem.iter()) {
        let (start, end) = (region.start_addr().0, region.start_addr().0 + region.len());
        let before = rd.ranges.len();
        for &(a, l) in extra {
            let (a2, b2) = (a.max(start), a.saturating_add(l).min(end));
            if a2 < b2 {
                rd.ranges.push((a2, b2 - a2));
            }
        }
        if rd.ranges.len() == before {
            continue;
        }
        rd.ranges.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::with_capacity(rd.ranges.len());
        for (a, l) in rd.ranges.drain(..) {
            match out.last_mut() {
                Some((la, ll)) if a <= *la + *ll => *ll = (*ll).max(a + l - *la),
                _ => out.push((a, l)),
            }
        }
        rd.ranges = out;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn added_ranges_land_in_their_regions_merged() {
        let mem = GuestMemoryMmap::from_ranges(&[
            (vm_memory::GuestAddress(0), 0x10000),
            (vm_memory::GuestAddress(0x100000), 0x10000),
        ])
        .unwrap();
        let mut regions = vec![
            RegionDirty {
                region_gpa: 0,
                ranges: vec![(0x1000, 0x1000), (0x8000, 0x1000)],
            },
            RegionDirty {
                region_gpa: 0x100000,
                ranges: vec![],
            },
        ];
        // Overlapping, adjacent, straddling the end of region 0 and a hole, in region 1.
        add_ranges(
            &mut regions,
            &mem,
            &[
                (0x1800, 0x1000),
                (0x9000, 0x1000),
                (0xf000, 0x10000),
                (0x100000, 0x2000),
            ],
        );
        assert_eq!(
            regions[0].ranges,
            vec![(0x1000, 0x1800), (0x8000, 0x2000), (0xf000, 0x1000)]
        );
        assert_eq!(regions[1].ranges, vec![(0x100000, 0x2000)]);
    }

    #[test]
    fn ranges_coalesce_across_words() {
        assert_eq!(bitmap_to_ranges(0, &[]), vec![]);
        assert_eq!(bitmap_to_ranges(0x1000, &[0b1]), vec![(0x1000, 0x1000)]);
        assert_eq!(
            bitmap_to_ranges(0, &[0b1101]),
            vec![(0, 0x1000), (0x2000, 0x2000)]
        );
        // Bits 63 of word 0 and 0..2 of word 1 are one run.
        assert_eq!(
            bitmap_to_ranges(0, &[1 << 63, 0b11]),
            vec![(63 * PAGE, 3 * PAGE)]
        );
        assert_eq!(bitmap_to_ranges(0, &[!0, !0]), vec![(0, 128 * PAGE)]);
    }
}
