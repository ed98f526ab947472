//! Dirty tracking against the real /dev/kvm: a tiny 32-bit guest writes a known set of
//! pages and the harvest must return exactly those.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

mod common;

use common::writer::*;
use hypervisor::kvm_bindings::{
    KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP,
};
use hypervisor::*;

fn dirty_pages(bitmaps: &[Vec<u64>]) -> Vec<u64> {
    let mut out = vec![];
    for (w, word) in bitmaps[0].iter().enumerate() {
        for b in 0..64 {
            if word & (1 << b) != 0 {
                out.push(w as u64 * 64 + b);
            }
        }
    }
    out
}

fn expected(start: u64, count: u64, stride: u64) -> Vec<u64> {
    (0..count).map(|i| start / PAGE + i * stride).collect()
}

fn harvest_is_exact(mode: Mode) {
    let mut g = guest(mode, 64 << 20);
    g.vm.start_dirty_log().unwrap();
    g.write_pages(0x10_0000, 37, 3);
    let got = dirty_pages(&g.vm.sync_dirty(SyncKind::Live).unwrap());
    assert_eq!(got, expected(0x10_0000, 37, 3));
    // Nothing more until the guest writes again.
    assert!(dirty_pages(&g.vm.sync_dirty(SyncKind::Live).unwrap()).is_empty());
    // The same pages dirtied again are reported again (they were re-protected).
    g.write_pages(0x10_0000, 5, 3);
    g.write_pages(0x200_0000, 3, 1);
    let mut want = expected(0x10_0000, 5, 3);
    want.extend(expected(0x200_0000, 3, 1));
    assert_eq!(
        dirty_pages(&g.vm.sync_dirty(SyncKind::Final).unwrap()),
        want
    );
}

#[test]
fn ring_harvest_returns_exactly_the_written_pages() {
    harvest_is_exact(Mode::Ring(4096));
}

#[test]
fn bitmap_harvest_returns_exactly_the_written_pages() {
    harvest_is_exact(Mode::Bitmap);
}

#[test]
fn sync_before_start_is_an_error() {
    let g = guest(Mode::Ring(4096), 16 << 20);
    let e = g.vm.sync_dirty(SyncKind::Live).unwrap_err().to_string();
    assert!(e.contains("start_dirty_log"), "{e}");
}

/// Checks that every written page is in `got`. A ring KVM overfilled makes the harvest
/// report all RAM (entries were lost), so only then is a superset accepted.
fn assert_all_reported(g: &Guest, got: &[u64], want: &[u64]) {
    let gs: HashSet<_> = got.iter().collect();
    let missing: Vec<_> = want.iter().filter(|p| !gs.contains(p)).take(10).collect();
    assert!(
        missing.is_empty(),
        "{} of {} written pages missing, first {missing:?}",
        want.len() - want.iter().filter(|p| gs.contains(p)).count(),
        want.len()
    );
    let overflows = g.vm.stats.ring_overflows.load(Ordering::Relaxed);
    if overflows == 0 {
        assert_eq!(
            got.len(),
            want.len(),
            "no overflow, so the set must be exact"
        );
    } else {
        assert_eq!(
            got.len() as u64,
            (g.size as u64) / PAGE,
            "after an overflow all RAM is dirty"
        );
    }
}

fn merge(into: &mut Vec<u64>, bm: &[u64]) {
    if into.is_empty() {
        into.extend_from_slice(bm);
    } else {
        into.iter_mut().zip(bm).for_each(|(a, b)| *a |= b);
    }
}

#[test]
fn ring_full_exits_lose_no_page() {
    // 1024 entries, or KVM's minimum if larger.
    let entries = 1024u32.max(MIN_RING_ENTRIES);
    let pages = u64::from(entries) * 12;
    let mut g = guest(Mode::Ring(entries), ((pages + 1024) * PAGE) as usize);
    g.vm.start_dirty_log().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let vm = g.vm.clone();
    let s = stop.clone();
    // A harvester beside the running vCPU, slower than the guest dirties pages, so the
    // ring fills and the vCPU must harvest on its own.
    let harvester = std::thread::spawn(move || {
        let mut collected = vec![];
        while !s.load(Ordering::Relaxed) {
            merge(&mut collected, &vm.sync_dirty(SyncKind::Live).unwrap()[0]);
            std::thread::sleep(std::time::Duration::from_millis(30));
        }
        collected
    });
    g.write_pages(0x20_0000, pages, 1);
    stop.store(true, Ordering::Relaxed);
    let mut collected = harvester.join().unwrap();
    merge(
        &mut collected,
        &g.vm.sync_dirty(SyncKind::Final).unwrap()[0],
    );
    let full = g.vm.stats.ring_full_exits.load(Ordering::Relaxed);
    assert!(full > 0, "the test must provoke ring-full exits");
    assert_all_reported(
        &g,
        &dirty_pages(&[collected]),
        &expected(0x20_0000, pages, 1),
    );
    eprintln!(
        "ring of {entries}: {pages} pages, {full} ring-full exits, {} overflows",
        g.vm.stats.ring_overflows.load(Ordering::Relaxed)
    );
}

/// This machine's KVM raises the ring-full exit only once the ring is completely full,
/// so it overwrites entries and its producer index runs ahead of the harvest. With no
/// harvester but the vCPU itself, the VM must still run to the end (no endless ring-full
/// exits) and report every page.
#[test]
fn overfilled_ring_recovers_and_loses_no_page() {
    let pages = 8000;
    let mut g = guest(Mode::Ring(1024), 64 << 20);
    g.vm.start_dirty_log().unwrap();
    g.write_pages(0x20_0000, pages, 1);
    let got = dirty_pages(&g.vm.sync_dirty(SyncKind::Final).unwrap());
    assert_all_reported(&g, &got, &expected(0x20_0000, pages, 1));
    eprintln!(
        "{} ring-full exits, {} overflows",
        g.vm.stats.ring_full_exits.load(Ordering::Relaxed),
        g.vm.stats.ring_overflows.load(Ordering::Relaxed)
    );
}

/// A probe that adds capabilities to what the real kernel advertises.
struct Claim(&'static [(u32, i32)]);

impl CapabilityProbe for Claim {
    fn check_extension_raw(&self, cap: u32) -> i32 {
        if let Some((_, v)) = self.0.iter().find(|(c, _)| *c == cap) {
            return *v;
        }
        let kvm = hypervisor::kvm_ioctls::Kvm::new().unwrap();
        kvm.check_extension_raw(cap as _)
    }
}

#[test]
fn with_bitmap_absent_enables_ring_only() {
    let b = VmBuilder::new().unwrap();
    let caps = b.dirty_caps();
    assert!(caps.ring.is_some(), "this machine's KVM has dirty rings");
    let t = b
        .enable_dirty_ring_probed(4096, &Claim(&[(KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP, 0)]))
        .unwrap()
        .tracking();
    assert!(matches!(
        t,
        DirtyTracking::Ring {
            entries: 4096,
            backup_bitmap: false,
            ..
        }
    ));
}

#[test]
fn with_bitmap_advertised_is_enabled_before_memslots() {
    let b = VmBuilder::new().unwrap();
    let real = b.dirty_caps().with_bitmap;
    let r = b.enable_dirty_ring_probed(4096, &Claim(&[(KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP, 1)]));
    if real {
        assert!(matches!(
            r.unwrap().tracking(),
            DirtyTracking::Ring {
                backup_bitmap: true,
                ..
            }
        ));
    } else {
        // This kernel lacks it: the builder still asked for it, and KVM's refusal is a
        // clear error naming the capability and the value.
        let e = r.err().expect("x86 KVM refuses WITH_BITMAP").to_string();
        assert!(
            e.contains("KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP") && e.contains("value 0"),
            "{e}"
        );
    }
}

#[test]
fn kernel_refusal_names_capability_and_value() {
    // Claim a larger maximum than KVM really has, so validation passes and KVM refuses.
    let b = VmBuilder::new().unwrap();
    let r = b.enable_dirty_ring_probed(
        1 << 20,
        &Claim(&[
            (KVM_CAP_DIRTY_LOG_RING_ACQ_REL, 1 << 30),
            (KVM_CAP_DIRTY_LOG_RING, 1 << 30),
        ]),
    );
    let e = r.err().expect("KVM refuses a 16 MiB ring").to_string();
    assert!(
        e.contains("KVM_CAP_DIRTY_LOG_RING_ACQ_REL") && e.contains("16777216"),
        "{e}"
    );
}

#[test]
fn bad_ring_sizes_name_the_accepted_range() {
    for n in [1000, 64, 1 << 20] {
        let e = VmBuilder::new()
            .unwrap()
            .enable_dirty_ring(n)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains(&n.to_string()) && e.contains("256") && e.contains("65536"),
            "{e}"
        );
    }
}

/// What a shadow migration saw.
struct ShadowRun {
    /// Pages whose copy differs from guest RAM after the final collection.
    mismatched: Vec<u64>,
    syncs: u64,
    report: String,
}

/// Several vCPUs write a new value into every page of their own range, pass after pass,
/// while a harvester thread collects the dirty set and copies the dirty pages into a
/// shadow of guest RAM, as a migration's precopy does. Then the vCPUs stop, the final
/// collection's pages are copied (with `lose_one`, through a harvest that drops one
/// entry), and the shadow must equal guest RAM: a page whose last write the dirty log
/// missed still holds an older value in the shadow.
fn shadow_migration(entries: u32, vcpus: u32, pages: u64, passes: u8, lose_one: bool) -> ShadowRun {
    let range = pages * PAGE;
    let base = 0x10_0000;
    let size = (base + range * u64::from(vcpus)) as usize;
    let mut g = guest_with_vcpus(Mode::Ring(entries), size, vcpus);
    g.vm.start_dirty_log().unwrap();
    let ram = g.ram();
    let total = size as u64 / PAGE;
    // Pass 0 of the migration: all RAM.
    let mut shadow = vec![0u8; size];
    for p in 0..total {
        ram.copy_page(p, &mut shadow[(p * PAGE) as usize..][..PAGE as usize]);
    }
    let writers: Vec<_> = std::mem::take(&mut g.vcpus)
        .into_iter()
        .enumerate()
        .map(|(i, mut vcpu)| {
            std::thread::spawn(move || {
                let start = base + range * i as u64;
                for pass in 1..=passes {
                    run_writer(&mut vcpu, start, pages, 1, pass);
                }
                vcpu
            })
        })
        .collect();
    let copy = |bitmaps: &[Vec<u64>], shadow: &mut [u8]| {
        for (w, word) in bitmaps[0].iter().enumerate() {
            for b in 0..64 {
                if word & (1 << b) != 0 {
                    let p = w as u64 * 64 + b;
                    ram.copy_page(p, &mut shadow[(p * PAGE) as usize..][..PAGE as usize]);
                }
            }
        }
    };
    let mut syncs = 0u64;
    // The harvester: a sync every 0-3 ms while any vCPU writes.
    while writers.iter().any(|w| !w.is_finished()) {
        copy(&g.vm.sync_dirty(SyncKind::Live).unwrap(), &mut shadow);
        syncs += 1;
        std::thread::sleep(std::time::Duration::from_micros(syncs % 4 * 1000));
    }
    g.vcpus = writers.into_iter().map(|w| w.join().unwrap()).collect();
    if lose_one {
        // One more pass on vCPU 0 after the last live sync, so the final harvest has
        // entries, and the seam drops one of them.
        run_writer(&mut g.vcpus[0], base, pages, 1, passes + 1);
        g.vm.lose_next_ring_entry_for_test();
    }
    copy(&g.vm.sync_dirty(SyncKind::Final).unwrap(), &mut shadow);
    let mut page = vec![0u8; PAGE as usize];
    let mismatched = (0..total)
        .filter(|&p| {
            ram.copy_page(p, &mut page);
            page[..] != shadow[(p * PAGE) as usize..][..PAGE as usize]
        })
        .collect();
    let mut report = (0..vcpus)
        .map(|i| format!("vCPU {i} ring: {}\n", g.vm.ring_indexes(i).unwrap()))
        .collect::<String>();
    report += &ring_counters(&g.vm);
    for i in 0..vcpus {
        let idx = g.vm.ring_indexes(i).unwrap();
        assert_eq!(
            idx.fetch, idx.reset,
            "after the final sync every ring is reset:\n{report}"
        );
    }
    ShadowRun {
        mismatched,
        syncs,
        report,
    }
}

fn assert_nothing_lost(run: &ShadowRun) {
    assert!(
        run.mismatched.is_empty(),
        "{} pages lost (first {:?}) after {} syncs:\n{}",
        run.mismatched.len(),
        &run.mismatched[..run.mismatched.len().min(10)],
        run.syncs,
        run.report
    );
    eprintln!("{} syncs, nothing lost\n{}", run.syncs, run.report);
}

/// Three vCPUs on two cores with the default ring (65536 entries, more than they write,
/// so no overrun can mark all RAM dirty and hide a loss), a harvester racing them: every
/// last write reaches the shadow through the rings alone.
#[test]
fn several_vcpus_racing_a_harvester_lose_no_page() {
    let run = shadow_migration(65536, 3, 6000, 6, false);
    assert!(run.report.contains("overflows 0,"), "{}", run.report);
    assert_nothing_lost(&run);
}

/// Rings of 1024 entries, which this host's KVM overruns at every ring-full exit, on
/// three vCPUs with a harvester racing their own ring-full handling: no vCPU hangs (each
/// run is bounded and fails with its ring's indexes), KVM's reset index stays exact, and
/// nothing is lost.
#[test]
fn ring_full_exits_on_several_vcpus_never_hang_and_lose_no_page() {
    let run = shadow_migration(1024, 3, 6000, 4, false);
    assert_nothing_lost(&run);
    assert!(
        !run.report.contains("ring-full exits 0,"),
        "the test must provoke ring-full exits:\n{}",
        run.report
    );
}

/// The shadow check is not blind: a harvest that drops one entry loses exactly that page.
#[test]
fn the_shadow_check_catches_one_lost_page() {
    let run = shadow_migration(65536, 2, 2000, 2, true);
    assert_eq!(
        run.mismatched.len(),
        1,
        "one dropped entry is one lost page, not {:?}:\n{}",
        run.mismatched,
        run.report
    );
}
