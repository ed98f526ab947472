//! The dirty set the migration engine reads is the union of KVM's log and the log of
//! the VMM's own writes to guest memory, and a collection clears what it returned.

mod common;

use std::time::{Duration, Instant};

use hypervisor::SyncKind;
use vmm::config::{parse_dirty_ring, parse_serial, VmConfig};
use vmm::dirty::RegionDirty;
use vmm::vm::Machine;

fn idle_machine(ring: &str, tag: &str) -> (Machine, std::path::PathBuf) {
    let serial = std::env::temp_dir().join(format!("ferry-union-{tag}-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&serial);
    let mut c = VmConfig::default();
    c.memory.size = 128 << 20;
    c.payload.kernel = Some(common::guest_elf());
    c.payload.cmdline = Some("workload=idle".into());
    c.serial = parse_serial(&format!("file={}", serial.display())).unwrap();
    c.dirty_tracking = parse_dirty_ring(ring).unwrap();
    let m = Machine::boot(c).unwrap();
    let end = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&serial)
        .unwrap_or_default()
        .contains("guest: ready")
    {
        assert!(Instant::now() < end, "the idle guest did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
    (m, serial)
}

fn ranges(d: &[RegionDirty]) -> Vec<(u64, u64)> {
    d.iter().flat_map(|r| r.ranges.iter().copied()).collect()
}

fn vmm_writes_appear_once(ring: &str) {
    let (m, serial) = idle_machine(ring, ring);
    // The guest is halted with interrupts off: from here on only the VMM writes.
    std::thread::sleep(Duration::from_millis(100));
    m.start_dirty_log().unwrap();
    m.pause();
    m.write_guest(0x300_0000, &[1u8; 8192]).unwrap();
    m.write_guest(0x500_0ff0, &[2u8; 32]).unwrap(); // straddles two pages
    let got = ranges(&m.collect_dirty(SyncKind::Live).unwrap());
    assert_eq!(got, vec![(0x300_0000, 0x2000), (0x500_0000, 0x2000)]);
    assert!(
        ranges(&m.collect_dirty(SyncKind::Final).unwrap()).is_empty(),
        "a collection clears what it returned"
    );
    drop(m);
    let _ = std::fs::remove_file(serial);
}

#[test]
fn vmm_writes_are_in_the_ring_mode_union() {
    vmm_writes_appear_once("entries=4096");
}

#[test]
fn vmm_writes_are_in_the_bitmap_mode_union() {
    vmm_writes_appear_once("off");
}

#[test]
fn guest_and_vmm_writes_are_unioned() {
    let serial = std::env::temp_dir().join(format!("ferry-union-dirty-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&serial);
    let mut c = VmConfig::default();
    c.memory.size = 128 << 20;
    c.payload.kernel = Some(common::guest_elf());
    // The guest dirties 1 MiB at 16 MiB; the VMM writes elsewhere.
    c.payload.cmdline = Some("workload=dirty start=16M size=1M".into());
    c.serial = parse_serial(&format!("file={}", serial.display())).unwrap();
    let m = Machine::boot(c).unwrap();
    let end = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&serial)
        .unwrap_or_default()
        .contains("guest: pass")
    {
        assert!(Instant::now() < end, "the dirty guest did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    m.start_dirty_log().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    m.write_guest(0x400_0000, &[7u8; 4096]).unwrap();
    m.pause();
    let got = ranges(&m.collect_dirty(SyncKind::Final).unwrap());
    assert!(
        got.contains(&(0x400_0000, 0x1000)),
        "VMM write missing: {got:x?}"
    );
    let guest_pages: u64 = got
        .iter()
        .filter(|r| r.0 >= 0x100_0000 && r.0 < 0x110_0000)
        .map(|r| r.1 / 4096)
        .sum();
    assert_eq!(
        guest_pages, 256,
        "every page of the guest's region: {got:x?}"
    );
    drop(m);
    let _ = std::fs::remove_file(serial);
}
