//! The host-side `dirty` check on core files (`common::coredump`): counters as the test
//! guest leaves them pass, and a single lost or wrong page in the file is caught. Runs on
//! guest RAM made by the VMM's own allocator and dumped by its own core writer, without a
//! VM.

mod common;

use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use common::coredump::{check_dirty_region, counters_moved};
use guest_pattern::{share, PAGE_SIZE};
use vm_memory::{Bytes, GuestAddress};
use vmm::coredump::{write_core_file, CoreFile};

const START: u64 = 1 << 20;
const SIZE: u64 = 8 << 20;
const PAGES: u64 = SIZE / PAGE_SIZE as u64;
const CPUS: u32 = 2;

fn dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ferry-corecheck-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Guest RAM holding what the `dirty` workload leaves when stopped: vCPU 0's share at
/// 7 up to page 100 of its share and 6 after it; vCPU 1's share wrapped, 0 then 255 from
/// page 33. The rest of each page is noise that the check must ignore. The RAM is a
/// memfd (`--memory shared=on`), as MemFDs migrations use.
fn dirty_memory() -> vmm::memory::GuestMemoryMmap {
    let mem = vmm::vm::create_memory(64 << 20, true, true).unwrap();
    for c in 0..CPUS {
        let r = share(PAGES, CPUS, c);
        for p in r.clone() {
            let i = p - r.start;
            let v: u8 = match c {
                0 if i < 100 => 7,
                0 => 6,
                _ if i < 33 => 0,
                _ => 255,
            };
            let gpa = START + p * PAGE_SIZE as u64;
            mem.write_slice(&[v, 0xa5, 0x5a, c as u8], GuestAddress(gpa))
                .unwrap();
        }
    }
    mem
}

fn core_of(mem: &vmm::memory::GuestMemoryMmap, path: &std::path::Path) -> CoreFile {
    write_core_file(path, mem, &[]).unwrap();
    CoreFile::open(path).unwrap()
}

/// Adds `delta` to the counter of `page` (of the region) in the core file itself.
fn bump_in_file(path: &std::path::Path, page: u64, delta: u8) {
    let core = CoreFile::open(path).unwrap();
    let at = core
        .file_offset(START + page * PAGE_SIZE as u64, 1)
        .unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .read(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0].wrapping_add(delta)], at).unwrap();
}

#[test]
fn counters_as_the_guest_leaves_them_pass() {
    let d = dir("good");
    let core = core_of(&dirty_memory(), &d.join("vm.core"));
    assert_eq!(core.ram_bytes(), 64 << 20);
    let shares = check_dirty_region(&core, START, SIZE, CPUS).unwrap();
    assert_eq!(shares.len(), 2);
    assert_eq!((shares[0].value, shares[0].edge), (7, Some(100)));
    assert_eq!((shares[1].value, shares[1].edge), (0, Some(33)));
    assert_eq!(shares[0].pages + shares[1].pages, PAGES);
    assert!(counters_moved(&shares));
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn one_wrong_page_in_the_core_is_caught() {
    let d = dir("bad");
    let mem = dirty_memory();
    let path = d.join("vm.core");
    let second = share(PAGES, CPUS, 1).start;
    // (page of the region, change, which vCPU's share is named)
    for (page, delta, cpu) in [
        (second + 500, 2u8, 1u32), // a page two steps ahead
        (40, 255, 0),              // a page one behind before the writer's position: a lost page
        (0, 1, 0),                 // the first page one ahead
        (second - 1, 1, 0),        // the share's last page caught up with nothing else
    ] {
        core_of(&mem, &path);
        bump_in_file(&path, page, delta);
        let core = CoreFile::open(&path).unwrap();
        let e = check_dirty_region(&core, START, SIZE, CPUS).unwrap_err();
        assert!(
            e.contains(&format!("vCPU {cpu}'s share")),
            "page {page}: {e}"
        );
        eprintln!("page {page} {delta:+}: {e}");
    }
    // The gpa of the wrong page is named.
    core_of(&mem, &path);
    bump_in_file(&path, second + 500, 2);
    let e = check_dirty_region(&CoreFile::open(&path).unwrap(), START, SIZE, CPUS).unwrap_err();
    let gpa = START + (second + 500) * PAGE_SIZE as u64;
    assert!(e.contains(&format!("gpa {gpa:#x}")), "{e}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn untouched_memory_passes_the_check_but_shows_no_work() {
    let d = dir("zero");
    let mem = vmm::vm::create_memory(64 << 20, false, true).unwrap();
    let core = core_of(&mem, &d.join("vm.core"));
    let shares = check_dirty_region(&core, START, SIZE, CPUS).unwrap();
    assert!(!counters_moved(&shares), "{shares:?}");
    // A region outside the dumped RAM is an error, not a pass.
    assert!(check_dirty_region(&core, 63 << 20, SIZE, CPUS).is_err());
    let _ = std::fs::remove_dir_all(&d);
}
