//! What Ferry's test guest writes into its memory, and how anybody (the guest itself, or a
//! host-side test reading guest RAM) checks it.
//!
//! * [`fill_page`] / [`check_page`]: the `verify` workload's self-describing pages.
//! * [`check_dirty_counters`]: the `dirty` workload's per-page counters.
//! * [`share`]: which pages of the workload region each vCPU owns.
//! * [`cmdline`]: the guest's command line and its rules.
//!
//! The crate is `no_std` (the guest is bare metal) and has no dependencies.
#![no_std]
#![deny(clippy::undocumented_unsafe_blocks)]

#[cfg(test)]
extern crate std;

pub mod cmdline;
mod dirty;
pub mod dma;
pub mod user_device;
pub mod viommu;

pub use dirty::{check_dirty_counters, DirtyCounters, DirtyError};

use core::ops::Range;

/// Size of a page: the unit of dirty tracking and of the workloads.
pub const PAGE_SIZE: usize = 4096;

/// `u64` words in a page.
const WORDS: usize = PAGE_SIZE / 8;

/// Word indices of a `verify` page's header; the payload follows it.
const GPA_WORD: usize = 0;
const GENERATION_WORD: usize = 1;
const CHECKSUM_WORD: usize = 2;
const MAGIC_WORD: usize = 3;
const HEADER_WORDS: usize = 4;

/// Marks a page written by [`fill_page`] (the bytes `"FerryVfy"` read as little-endian).
pub const PAGE_MAGIC: u64 = u64::from_le_bytes(*b"FerryVfy");

// Odd 64-bit constants for the generator and the checksum (arbitrary, well mixed bits).
const STEP: u64 = 0x9e37_79b9_7f4a_7c15;
const MIX_KEY: u64 = 0xd6e8_feb8_6659_fd93;
const SEED_KEY: u64 = 0xa076_1d64_78bd_642f;
const SUM_MUL: u64 = 0xff51_afd7_ed55_8ccd;
const SUM_LANES: [u64; 4] = [
    0x6a09_e667_f3bc_c909,
    0xbb67_ae85_84ca_a73b,
    0x3c6e_f372_fe94_f82b,
    0xa54f_f53a_5f1d_36f1,
];

/// What [`check_page`] found in a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageCheck {
    /// A complete, intact page for this GPA, written with `generation`.
    Ok { generation: u64 },
    /// No page pattern at all (wrong magic): never written by `verify`, e.g. still zero.
    /// `generation` is whatever the generation field holds.
    NotWritten { generation: u64 },
    /// An intact-looking header, but for another address: the contents of page
    /// `found_gpa` landed here.
    WrongGpa { found_gpa: u64, generation: u64 },
    /// The header names this GPA but the checksum does not match: a torn or partly
    /// stale page. `generation` is the generation field as read.
    BadChecksum { generation: u64 },
}

impl PageCheck {
    /// The generation field as read from the page, whatever else is wrong with it.
    pub fn generation(&self) -> u64 {
        match *self {
            PageCheck::Ok { generation }
            | PageCheck::NotWritten { generation }
            | PageCheck::WrongGpa { generation, .. }
            | PageCheck::BadChecksum { generation } => generation,
        }
    }

    /// Whether the page holds exactly `generation`, intact.
    pub fn is(&self, generation: u64) -> bool {
        *self == PageCheck::Ok { generation }
    }
}

/// 64x64->128 multiply folded back to 64 bits: the generator's and checksum's mixer.
#[inline(always)]
fn fold_mul(a: u64, b: u64) -> u64 {
    let m = u128::from(a) * u128::from(b);
    (m as u64) ^ ((m >> 64) as u64)
}

/// The seed of page `(gpa, generation)`'s payload stream.
#[inline(always)]
fn seed(gpa: u64, generation: u64) -> u64 {
    fold_mul(gpa ^ SEED_KEY, generation.wrapping_mul(STEP) ^ MIX_KEY)
}

/// Payload word `i` of the page seeded with `seed`: counter-based, so every word is
/// independent of the others (no serial dependency; the CPU overlaps the multiplies).
#[inline(always)]
fn payload_word(seed: u64, i: usize) -> u64 {
    let x = seed.wrapping_add((i as u64).wrapping_mul(STEP));
    fold_mul(x, x ^ MIX_KEY)
}

#[inline(always)]
fn load(buf: &[u8; PAGE_SIZE], word: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[word * 8..word * 8 + 8]);
    u64::from_le_bytes(b)
}

#[inline(always)]
fn store(buf: &mut [u8; PAGE_SIZE], word: usize, v: u64) {
    buf[word * 8..word * 8 + 8].copy_from_slice(&v.to_le_bytes());
}

/// Checksum of every word of the page except the checksum word itself (read as zero).
fn checksum(buf: &[u8; PAGE_SIZE]) -> u64 {
    hash_words(buf, CHECKSUM_WORD)
}

/// A 64-bit hash of the whole page (every byte counts): the `dma-verify` workload keeps one
/// per page the virtio-rng device filled, to notice a page that changed afterwards (or did
/// not change when the device was asked to write it). Same mixing as the checksum, so any
/// single changed word always changes the hash.
pub fn page_hash(buf: &[u8; PAGE_SIZE]) -> u64 {
    hash_words(buf, usize::MAX)
}

/// Hash of the page's words, word `skip` read as zero (none if out of range).
///
/// Four independent lanes; each step `(lane ^ w) * odd` then a rotation is a bijection
/// of the lane, so any single changed word always changes the result.
#[inline(always)]
fn hash_words(buf: &[u8; PAGE_SIZE], skip: usize) -> u64 {
    let mut lanes = SUM_LANES;
    for (c, chunk) in buf.chunks_exact(32).enumerate() {
        for (j, lane) in lanes.iter_mut().enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(&chunk[j * 8..j * 8 + 8]);
            let mut w = u64::from_le_bytes(b);
            if c * 4 + j == skip {
                w = 0;
            }
            *lane = (*lane ^ w).wrapping_mul(SUM_MUL).rotate_left(29);
        }
    }
    let mut h = lanes[0];
    for lane in &lanes[1..] {
        h = (h ^ lane.rotate_left(17)).wrapping_mul(SUM_MUL);
    }
    h ^ (h >> 32)
}

/// Writes the `verify` pattern of generation `generation` for the page at `gpa`:
///
/// | bytes     | contents                                                     |
/// |-----------|--------------------------------------------------------------|
/// | 0..8      | `gpa` (little-endian u64)                                     |
/// | 8..16     | `generation`                                                 |
/// | 16..24    | checksum of every other word of the page                     |
/// | 24..32    | [`PAGE_MAGIC`]                                               |
/// | 32..4096  | pseudo-random words derived from `(gpa, generation)`         |
///
/// The page is never all-zero and does not compress, and two generations of the same page
/// differ in every word but the GPA and the magic, so a stale copy cannot pass for a fresh
/// one.
pub fn fill_page(buf: &mut [u8; PAGE_SIZE], gpa: u64, generation: u64) {
    let s = seed(gpa, generation);
    for i in HEADER_WORDS..WORDS {
        store(buf, i, payload_word(s, i));
    }
    store(buf, GPA_WORD, gpa);
    store(buf, GENERATION_WORD, generation);
    store(buf, CHECKSUM_WORD, 0);
    store(buf, MAGIC_WORD, PAGE_MAGIC);
    let sum = checksum(buf);
    store(buf, CHECKSUM_WORD, sum);
}

/// Checks a page that should hold a [`fill_page`] pattern for `gpa`.
///
/// This checks the header and the checksum, not the payload against the generator: that
/// is enough to catch lost, stale, torn and misplaced pages, and several times faster.
/// Use [`page_matches`] for the exhaustive comparison.
pub fn check_page(buf: &[u8; PAGE_SIZE], gpa: u64) -> PageCheck {
    let generation = load(buf, GENERATION_WORD);
    if load(buf, MAGIC_WORD) != PAGE_MAGIC {
        return PageCheck::NotWritten { generation };
    }
    let found_gpa = load(buf, GPA_WORD);
    if found_gpa != gpa {
        return PageCheck::WrongGpa {
            found_gpa,
            generation,
        };
    }
    if checksum(buf) != load(buf, CHECKSUM_WORD) {
        return PageCheck::BadChecksum { generation };
    }
    PageCheck::Ok { generation }
}

/// Whether `buf` is byte for byte what [`fill_page`] writes for `(gpa, generation)`.
pub fn page_matches(buf: &[u8; PAGE_SIZE], gpa: u64, generation: u64) -> bool {
    let s = seed(gpa, generation);
    (HEADER_WORDS..WORDS).all(|i| load(buf, i) == payload_word(s, i))
        && check_page(buf, gpa).is(generation)
}

/// The pages (indices into the workload region) that vCPU `cpu` of `cpus` works on:
/// the region's `pages` split evenly, in order, the first vCPU's share first. Shares
/// differ by at most one page; with fewer pages than vCPUs some shares are empty.
///
/// # Panics
/// If `cpus` is zero or `cpu >= cpus`.
pub fn share(pages: u64, cpus: u32, cpu: u32) -> Range<u64> {
    assert!(cpu < cpus, "cpu {cpu} of {cpus}");
    let bound = |c: u32| (u128::from(pages) * u128::from(c) / u128::from(cpus)) as u64;
    bound(cpu)..bound(cpu + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::boxed::Box;
    use std::collections::HashSet;
    use std::vec::Vec;

    fn page() -> Box<[u8; PAGE_SIZE]> {
        Box::new([0u8; PAGE_SIZE])
    }

    #[test]
    fn filled_page_checks_ok_and_has_its_header() {
        let mut p = page();
        fill_page(&mut p, 0x1234_5000, 7);
        assert_eq!(check_page(&p, 0x1234_5000), PageCheck::Ok { generation: 7 });
        assert!(page_matches(&p, 0x1234_5000, 7));
        assert_eq!(&p[0..8], &0x1234_5000u64.to_le_bytes());
        assert_eq!(&p[8..16], &7u64.to_le_bytes());
        assert_eq!(&p[24..32], b"FerryVfy");
    }

    #[test]
    fn zero_page_is_not_written() {
        let p = page();
        assert_eq!(
            check_page(&p, 0x10_0000),
            PageCheck::NotWritten { generation: 0 }
        );
    }

    #[test]
    fn page_for_another_address_is_named() {
        let mut p = page();
        fill_page(&mut p, 0x20_0000, 3);
        assert_eq!(
            check_page(&p, 0x30_0000),
            PageCheck::WrongGpa {
                found_gpa: 0x20_0000,
                generation: 3
            }
        );
    }

    #[test]
    fn every_single_bit_flip_is_caught() {
        let mut good = page();
        fill_page(&mut good, 0x40_0000, 11);
        let mut p = page();
        for bit in 0..PAGE_SIZE * 8 {
            p.copy_from_slice(&good[..]);
            p[bit / 8] ^= 1 << (bit % 8);
            let r = check_page(&p, 0x40_0000);
            assert!(!r.is(11), "bit {bit} flipped unnoticed");
        }
    }

    #[test]
    fn stale_and_torn_pages_are_caught() {
        let (old, new) = (page(), page());
        let (mut old, mut new) = (old, new);
        fill_page(&mut old, 0x50_0000, 4);
        fill_page(&mut new, 0x50_0000, 5);
        // A stale page names its own generation.
        assert_eq!(check_page(&old, 0x50_0000).generation(), 4);
        // Every word differs between generations.
        for w in 0..WORDS {
            if w != GPA_WORD && w != MAGIC_WORD {
                assert_ne!(load(&old, w), load(&new, w), "word {w}");
            }
        }
        // A torn page: new header, old tail (any split point).
        for split in (32..PAGE_SIZE).step_by(8) {
            let mut torn = new.clone();
            torn[split..].copy_from_slice(&old[split..]);
            assert_eq!(
                check_page(&torn, 0x50_0000),
                PageCheck::BadChecksum { generation: 5 },
                "split at {split}"
            );
        }
        // Old header, new tail.
        let mut torn = old.clone();
        torn[2048..].copy_from_slice(&new[2048..]);
        assert_eq!(
            check_page(&torn, 0x50_0000),
            PageCheck::BadChecksum { generation: 4 }
        );
    }

    #[test]
    fn swapped_words_are_caught() {
        let mut p = page();
        fill_page(&mut p, 0x60_0000, 1);
        let (a, b) = (load(&p, 100), load(&p, 104));
        store(&mut p, 100, b);
        store(&mut p, 104, a);
        assert_eq!(
            check_page(&p, 0x60_0000),
            PageCheck::BadChecksum { generation: 1 }
        );
    }

    #[test]
    fn pages_are_not_compressible_to_nothing() {
        let mut p = page();
        fill_page(&mut p, 0x10_0000, 1);
        let distinct: HashSet<u64> = (0..WORDS).map(|i| load(&p, i)).collect();
        assert_eq!(distinct.len(), WORDS);
        // Byte histogram close to uniform: no byte value dominates.
        let mut hist = [0u32; 256];
        for b in p.iter() {
            hist[usize::from(*b)] += 1;
        }
        assert!(hist.iter().all(|&n| n < 64), "{hist:?}");
        // Neighbouring pages and generations differ.
        let mut q = page();
        fill_page(&mut q, 0x10_1000, 1);
        assert_ne!(&p[32..], &q[32..]);
        fill_page(&mut q, 0x10_0000, 2);
        assert_ne!(&p[32..], &q[32..]);
    }

    #[test]
    fn generation_zero_and_huge_values_work() {
        let mut p = page();
        for (gpa, g) in [(0, 0), (!0xfffu64, u64::MAX), (0x4_0000_0000, 1 << 40)] {
            fill_page(&mut p, gpa, g);
            assert!(page_matches(&p, gpa, g));
            assert!(!page_matches(&p, gpa, g.wrapping_add(1)));
        }
    }

    #[test]
    fn page_hash_sees_every_bit_and_every_word() {
        let mut p = page();
        fill_page(&mut p, 0x70_0000, 2);
        let h = page_hash(&p);
        for bit in 0..PAGE_SIZE * 8 {
            p[bit / 8] ^= 1 << (bit % 8);
            assert_ne!(page_hash(&p), h, "bit {bit}");
            p[bit / 8] ^= 1 << (bit % 8);
        }
        assert_eq!(page_hash(&p), h);
        // Unlike the checksum, the checksum word counts too.
        store(&mut p, CHECKSUM_WORD, 0);
        assert_ne!(page_hash(&p), h);
        assert_ne!(page_hash(&page()), page_hash(&p));
    }

    #[test]
    fn shares_cover_the_region_exactly() {
        for pages in [0u64, 1, 3, 7, 25600, 25601, 1 << 40] {
            for cpus in 1..=9u32 {
                let mut next = 0;
                let mut sizes = Vec::new();
                for c in 0..cpus {
                    let r = share(pages, cpus, c);
                    assert_eq!(r.start, next);
                    next = r.end;
                    sizes.push(r.end - r.start);
                }
                assert_eq!(next, pages);
                let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
                assert!(max - min <= 1, "{pages} pages, {cpus} cpus: {sizes:?}");
            }
        }
    }

    #[test]
    #[should_panic]
    fn share_of_a_missing_cpu_panics() {
        share(10, 2, 2);
    }

    /// Not a benchmark with a threshold (CI machines vary): prints the speed so a slow
    /// change is noticed. `cargo test -p guest-pattern --release -- --nocapture speed`.
    #[test]
    fn speed() {
        let n = if cfg!(debug_assertions) { 200 } else { 20_000 };
        let mut pages = std::vec![[0u8; PAGE_SIZE]; 64];
        let t = std::time::Instant::now();
        for i in 0..n {
            let p = &mut pages[i % 64];
            let gpa = (i as u64) << 12;
            fill_page(p, gpa, 1);
            assert!(check_page(p, gpa).is(1));
        }
        let secs = t.elapsed().as_secs_f64();
        std::println!(
            "fill+check: {:.2} GB/s",
            (n * PAGE_SIZE) as f64 / secs / 1e9
        );
    }
}
