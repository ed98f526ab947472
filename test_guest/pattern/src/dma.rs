//! The `dma-verify` workload's fixed facts, shared by the guest and host-side tests: where
//! the guest's virtio driver keeps its rings and buffers ([`DriverMemory`]), what disk
//! block `k` holds ([`block_tag`]) and how big the disk must be ([`disk_bytes_needed`]).
//!
//! Driver memory starts right after the workload regions (the `dma-verify` region and the
//! optional `verify` region, whichever ends last), page-aligned, all of it ordinary RAM:
//!
//! | offset                        | what                                                  |
//! |-------------------------------|-------------------------------------------------------|
//! | `3 * 4K * q`                  | queue `q` (one per vCPU at most): descriptor table, available ring, used ring, a page each |
//! | `3 * 4K * cpus + 4K * c`      | vCPU `c`'s request page: [`BATCH`] 16-byte virtio-blk headers at +0, [`BATCH`] status bytes at +0x800 |
//! | then, `dma=blk`               | vCPU `c`'s staging buffer, [`BATCH`] pages, for writing the disk at start |
//! | then, `dma=rng`               | one u64 hash per page of the region ([`crate::page_hash`]) |
//! | then, `dma=vfio-user`         | one u64 per page of the region: the generation the device last wrote into it |
//! | then, `iommu=on`              | the virtio-iommu's own memory, which its device is not given (see below) |
//!
//! (`dma=vfio-user` uses neither the queues nor the request pages; they are left where they
//! are so that the layout is the same for every device.)
//!
//! Everything before the virtio-iommu's memory is what the DMA device touches
//! ([`DriverMemory::device_part`]); with `iommu=on` it is mapped for the device at
//! `crate::viommu::MEMORY_IOVA` and on. The virtio-iommu's memory
//! ([`DriverMemory::iommu_area`]), pages from its start:
//!
//! | offset (pages)                | what                                                  |
//! |-------------------------------|-------------------------------------------------------|
//! | 0, 3                          | its requestq and eventq rings (three pages each, as above) |
//! | 6                             | [`EVENT_BUFFERS`] eventq buffers of [`EVENT_BUFFER_BYTES`] |
//! | 7                             | the PROBE request (72 bytes, then `probe_size` + 4 the device writes) |
//! | 8 + [`IOMMU_REQUEST_PAGES`] × c | vCPU `c`'s request slots, [`IOMMU_SLOT_BYTES`] each |
//! | then                          | the IOVA of each window of the region (a u64 each) |
//! | then                          | the pages the device wrote and the domain has not reported yet (`nested-dirty=on`): a bit per region page |

use core::ops::Range;

use crate::cmdline::{Config, Dma};
use crate::PAGE_SIZE;

const PAGE: u64 = PAGE_SIZE as u64;

/// Requests one vCPU puts in flight per notification, at most (fewer when the queue is
/// smaller: a virtio-blk request takes three descriptors).
pub const BATCH: usize = 64;
/// Largest queue size the driver sets up (the device's maximum if smaller).
pub const MAX_QUEUE_SIZE: u16 = 256;
/// Disk block size of the workload: one page.
pub const BLOCK_SIZE: u64 = PAGE;
/// Bytes of one queue's rings: descriptor table, available ring, used ring, a page each
/// (enough for [`MAX_QUEUE_SIZE`] entries: 4096, 6 + 512 and 6 + 2048 bytes).
pub const RING_BYTES: u64 = 3 * PAGE;
/// Offset of the available ring in a queue's ring memory.
pub const AVAIL_OFFSET: u64 = PAGE;
/// Offset of the used ring in a queue's ring memory.
pub const USED_OFFSET: u64 = 2 * PAGE;
/// Offset of the status bytes in a vCPU's request page (the headers are at 0).
pub const STATUS_OFFSET: u64 = 0x800;
/// Size of a virtio-blk request header.
pub const HEADER_BYTES: u64 = 16;
/// `iommu=on`: eventq buffers posted, at most.
pub const EVENT_BUFFERS: u64 = 16;
/// `iommu=on`: bytes of an eventq buffer (a fault record is 24).
pub const EVENT_BUFFER_BYTES: u64 = 64;
/// `iommu=on`: pages of each vCPU's virtio-iommu request slots.
pub const IOMMU_REQUEST_PAGES: u64 = 2;
/// `iommu=on`: bytes of a virtio-iommu request slot (a GET_DIRTY_BITMAP of a whole window:
/// 40 + 64 + 4).
pub const IOMMU_SLOT_BYTES: u64 = 256;
/// `iommu=on`: request slots per vCPU.
pub const IOMMU_SLOTS: usize = (IOMMU_REQUEST_PAGES * PAGE / IOMMU_SLOT_BYTES) as usize;
// The eventq buffers fit their page; a GET_DIRTY_BITMAP of a whole window fits a slot.
const _: () = assert!(EVENT_BUFFERS * EVENT_BUFFER_BYTES <= PAGE);
const _: () = assert!(
    crate::viommu::GET_DIRTY_BITMAP_LEN as u64
        + 8 * crate::viommu::bitmap_words(crate::viommu::WINDOW_PAGES)
        + crate::viommu::TAIL_LEN as u64
        <= IOMMU_SLOT_BYTES
);

/// Where the driver's memory is, for `cpus` vCPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DriverMemory {
    pub base: u64,
    pub cpus: u32,
    /// Pages in the `dma-verify` region.
    pub pages: u64,
    pub dma: Dma,
    /// `iommu=on`: the virtio-iommu's memory follows.
    pub iommu: bool,
}

impl DriverMemory {
    /// The layout for `cfg` (its `dma=` and regions) and `cpus` vCPUs: it starts where the
    /// last workload region ends. `cfg.dma` must be set.
    pub fn for_config(cfg: &Config, cpus: u32) -> DriverMemory {
        let mut base = cfg.start.saturating_add(cfg.size);
        if let Some(v) = cfg.verify_region() {
            base = base.max(v.end);
        }
        DriverMemory {
            base: base.next_multiple_of(PAGE),
            cpus,
            pages: cfg.size / PAGE,
            dma: cfg.dma.unwrap_or(Dma::Blk),
            iommu: cfg.iommu,
        }
    }

    /// Ring memory of queue `queue` (< `cpus`): descriptor table here, then
    /// [`AVAIL_OFFSET`], [`USED_OFFSET`].
    pub fn rings(&self, queue: u32) -> u64 {
        debug_assert!(queue < self.cpus);
        self.base + RING_BYTES * u64::from(queue)
    }

    /// vCPU `cpu`'s request page: headers at 0 ([`HEADER_BYTES`] each), status bytes at
    /// [`STATUS_OFFSET`].
    pub fn requests(&self, cpu: u32) -> u64 {
        debug_assert!(cpu < self.cpus);
        self.base + RING_BYTES * u64::from(self.cpus) + PAGE * u64::from(cpu)
    }

    fn tail(&self) -> u64 {
        self.base + (RING_BYTES + PAGE) * u64::from(self.cpus)
    }

    /// `dma=blk`: vCPU `cpu`'s staging buffer, [`BATCH`] pages.
    pub fn staging(&self, cpu: u32) -> u64 {
        debug_assert!(cpu < self.cpus && self.dma == Dma::Blk);
        self.tail() + BATCH as u64 * PAGE * u64::from(cpu)
    }

    /// `dma=rng`: where the hash of region page `page` is kept (a u64).
    pub fn hash(&self, page: u64) -> u64 {
        debug_assert!(page < self.pages && self.dma == Dma::Rng);
        self.tail() + 8 * page
    }

    /// `dma=vfio-user`: where the generation the device last wrote into region page `page`
    /// is kept (a u64, in the place `dma=rng` keeps its hashes).
    pub fn generation(&self, page: u64) -> u64 {
        debug_assert!(page < self.pages && self.dma == Dma::VfioUser);
        self.tail() + 8 * page
    }

    /// What the DMA device touches: everything but the virtio-iommu's memory.
    pub fn device_part(&self) -> Range<u64> {
        let tail = match self.dma {
            Dma::Blk => BATCH as u64 * PAGE * u64::from(self.cpus),
            Dma::Rng | Dma::VfioUser => (8 * self.pages).next_multiple_of(PAGE),
        };
        self.base..self.tail() + tail
    }

    /// `iommu=on`: the virtio-iommu's memory.
    pub fn iommu_area(&self) -> Range<u64> {
        let start = self.device_part().end;
        let windows = crate::viommu::Windows { pages: self.pages }.count();
        let table = (8 * windows).next_multiple_of(PAGE);
        let bits = (8 * crate::viommu::bitmap_words(self.pages)).next_multiple_of(PAGE);
        start..start + (8 + IOMMU_REQUEST_PAGES * u64::from(self.cpus)) * PAGE + table + bits
    }

    /// `iommu=on`: the virtio-iommu's ring memory of queue `queue` (0 requestq, 1 eventq).
    pub fn iommu_rings(&self, queue: u16) -> u64 {
        debug_assert!(queue < 2);
        self.iommu_area().start + RING_BYTES * u64::from(queue)
    }

    /// `iommu=on`: eventq buffer `i` (< [`EVENT_BUFFERS`]).
    pub fn iommu_event(&self, i: u64) -> u64 {
        debug_assert!(i < EVENT_BUFFERS);
        self.iommu_area().start + 6 * PAGE + EVENT_BUFFER_BYTES * i
    }

    /// `iommu=on`: the page of the PROBE request.
    pub fn iommu_probe(&self) -> u64 {
        self.iommu_area().start + 7 * PAGE
    }

    /// `iommu=on`: vCPU `cpu`'s request slots ([`IOMMU_SLOTS`] of [`IOMMU_SLOT_BYTES`]).
    pub fn iommu_requests(&self, cpu: u32) -> u64 {
        debug_assert!(cpu < self.cpus);
        self.iommu_area().start + (8 + IOMMU_REQUEST_PAGES * u64::from(cpu)) * PAGE
    }

    /// `iommu=on`: where the IOVA of window `k` is kept (a u64).
    pub fn iommu_window(&self, k: u64) -> u64 {
        debug_assert!(k < crate::viommu::Windows { pages: self.pages }.count());
        self.iommu_area().start + (8 + IOMMU_REQUEST_PAGES * u64::from(self.cpus)) * PAGE + 8 * k
    }

    /// `iommu=on`: word `w` of the bitmap of pages written and not yet reported (bit `i`
    /// of word `w`: region page `64 w + i`).
    pub fn iommu_unreported(&self, w: u64) -> u64 {
        debug_assert!(w < crate::viommu::bitmap_words(self.pages));
        let windows = crate::viommu::Windows { pages: self.pages }.count();
        self.iommu_area().start
            + (8 + IOMMU_REQUEST_PAGES * u64::from(self.cpus)) * PAGE
            + (8 * windows).next_multiple_of(PAGE)
            + 8 * w
    }

    /// All of it.
    pub fn range(&self) -> Range<u64> {
        let end = if self.iommu {
            self.iommu_area().end
        } else {
            self.device_part().end
        };
        self.base..end
    }
}

/// The tag [`crate::fill_page`] gets for disk block `block` (in place of a GPA): its byte
/// offset on the disk.
pub const fn block_tag(block: u64) -> u64 {
    block * BLOCK_SIZE
}

/// `dma=blk` with a region of `size` bytes needs a disk of twice that: block `i` and
/// block `i + pages` for every page `i`.
pub const fn disk_bytes_needed(size: u64) -> u64 {
    size.saturating_mul(2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmdline::parse;

    fn overlaps(a: &Range<u64>, b: &Range<u64>) -> bool {
        a.start < b.end && b.start < a.end
    }

    #[test]
    fn driver_memory_follows_the_last_region_and_nothing_overlaps() {
        let cfg = parse(b"workload=dma-verify dma=blk size=64M").unwrap();
        let m = DriverMemory::for_config(&cfg, 2);
        assert_eq!(m.base, (1 << 20) + (64 << 20));
        assert_eq!(m.pages, 16384);
        let pieces = [
            m.rings(0)..m.rings(0) + RING_BYTES,
            m.rings(1)..m.rings(1) + RING_BYTES,
            m.requests(0)..m.requests(0) + PAGE,
            m.requests(1)..m.requests(1) + PAGE,
            m.staging(0)..m.staging(0) + BATCH as u64 * PAGE,
            m.staging(1)..m.staging(1) + BATCH as u64 * PAGE,
        ];
        for (i, a) in pieces.iter().enumerate() {
            assert!(a.start >= m.base && a.end <= m.range().end, "{a:x?}");
            assert_eq!(a.start % PAGE, 0);
            for b in &pieces[i + 1..] {
                assert!(!overlaps(a, b), "{a:x?} {b:x?}");
            }
        }
        assert_eq!(m.range().end, pieces[5].end);
        // Headers and status bytes of a full batch fit their page.
        assert!(BATCH as u64 * HEADER_BYTES <= STATUS_OFFSET);
        assert!(STATUS_OFFSET + BATCH as u64 <= PAGE);
        // A queue of MAX_QUEUE_SIZE fits its ring pages.
        let q = u64::from(MAX_QUEUE_SIZE);
        assert!(16 * q <= AVAIL_OFFSET);
        assert!(6 + 2 * q <= USED_OFFSET - AVAIL_OFFSET);
        assert!(6 + 8 * q <= RING_BYTES - USED_OFFSET);
    }

    #[test]
    fn rng_keeps_a_hash_per_page_after_the_verify_region() {
        let cfg = parse(b"workload=dma-verify dma=rng size=4M vstart=0x8000000 vsize=8M").unwrap();
        let m = DriverMemory::for_config(&cfg, 1);
        assert_eq!(m.base, 0x800_0000 + (8 << 20));
        assert_eq!(m.hash(0), m.requests(0) + PAGE);
        assert_eq!(m.hash(1023) + 8, m.range().end);
        // A verify region below the DMA region: memory still follows the DMA region.
        let cfg =
            parse(b"workload=dma-verify dma=rng start=16M size=4M vstart=8M vsize=4M").unwrap();
        assert_eq!(DriverMemory::for_config(&cfg, 1).base, 20 << 20);
    }

    #[test]
    fn vfio_user_keeps_a_generation_per_page_where_rng_keeps_hashes() {
        let cfg = parse(b"workload=dma-verify dma=vfio-user size=4M iommu=on").unwrap();
        let m = DriverMemory::for_config(&cfg, 2);
        assert_eq!(m.dma, Dma::VfioUser);
        assert_eq!(m.generation(0), m.requests(1) + PAGE);
        assert_eq!(m.generation(1023) + 8, m.device_part().end);
        assert_eq!(m.iommu_area().start, m.device_part().end);
    }

    #[test]
    fn iommu_memory_follows_what_the_device_touches() {
        let cfg = parse(b"workload=dma-verify dma=blk size=64M iommu=on").unwrap();
        let m = DriverMemory::for_config(&cfg, 2);
        assert!(m.iommu);
        let dev = m.device_part();
        let area = m.iommu_area();
        assert_eq!(area.start, dev.end);
        assert_eq!(m.range(), dev.start..area.end);
        // 16384 pages: 32 windows (a page of IOVAs), 256 bitmap words (a page).
        assert_eq!(area.end - area.start, (8 + 2 * 2 + 1 + 1) * PAGE);
        let pieces = [
            m.iommu_rings(0)..m.iommu_rings(0) + RING_BYTES,
            m.iommu_rings(1)..m.iommu_rings(1) + RING_BYTES,
            m.iommu_event(0)..m.iommu_event(EVENT_BUFFERS - 1) + EVENT_BUFFER_BYTES,
            m.iommu_probe()..m.iommu_probe() + PAGE,
            m.iommu_requests(0)..m.iommu_requests(0) + IOMMU_REQUEST_PAGES * PAGE,
            m.iommu_requests(1)..m.iommu_requests(1) + IOMMU_REQUEST_PAGES * PAGE,
            m.iommu_window(0)..m.iommu_window(31) + 8,
            m.iommu_unreported(0)..m.iommu_unreported(255) + 8,
        ];
        for (i, a) in pieces.iter().enumerate() {
            assert!(a.start >= area.start && a.end <= area.end, "{a:x?}");
            for b in &pieces[i + 1..] {
                assert!(!overlaps(a, b), "{a:x?} {b:x?}");
            }
        }
        assert_eq!(IOMMU_SLOTS, 32);
        // Without iommu=on nothing follows.
        let cfg = parse(b"workload=dma-verify dma=blk size=64M").unwrap();
        let m = DriverMemory::for_config(&cfg, 2);
        assert_eq!(m.range(), m.device_part());
    }

    #[test]
    fn blocks_and_disk_size() {
        assert_eq!(block_tag(3), 0x3000);
        assert_eq!(disk_bytes_needed(64 << 20), 128 << 20);
    }
}
