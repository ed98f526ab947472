//! The test guest under ferry: every workload with 1, 2 and 4 vCPUs, and proof that its
//! verifier catches a page that does not hold what the guest last wrote.

mod common;

use std::time::Duration;

use common::Ferry;
use guest_pattern::{check_page, fill_page, PAGE_SIZE};
use vm_memory::{Bytes, GuestAddress};
use vmm::config::{parse_cpus, parse_serial, VmConfig};
use vmm::vcpu::VmEvent;
use vmm::vm::Machine;

fn ferry(cpus: u32, cmdline: &str) -> Ferry {
    let elf = common::guest_elf();
    Ferry::spawn(&[
        "--kernel",
        elf.to_str().unwrap(),
        "--cmdline",
        cmdline,
        "--cpus",
        &format!("boot={cpus}"),
        "--memory",
        "size=256M",
        "--serial",
        "tty",
    ])
}

#[test]
fn every_workload_runs_with_1_2_and_4_vcpus() {
    for n in [1u32, 2, 4] {
        let mut f = ferry(n, "workload=dirty start=1M size=8M");
        f.expect_line(
            &format!("guest: ready cpus={n} workload=dirty"),
            Duration::from_secs(60),
        );
        for cpu in 0..n {
            f.expect_line(&format!("guest: pass {cpu} "), Duration::from_secs(60));
        }
        drop(f);

        let f = ferry(n, "workload=verify start=1M size=16M passes=3");
        let (code, out) = f.wait(Duration::from_secs(120));
        assert_eq!(code, Some(0), "verify passes=3 with {n} vCPUs:\n{out}");
        assert!(
            out.contains("guest: PASS") && !out.contains("MISMATCH"),
            "{out}"
        );
        for cpu in 0..n {
            assert!(out.contains(&format!("guest: verified {cpu} 3")), "{out}");
        }
    }
}

#[test]
fn bad_arguments_are_named_and_exit_1() {
    for arg in ["passes=lots", "size=0x", "rate=-1"] {
        let f = ferry(1, &format!("workload=verify {arg}"));
        let (code, out) = f.wait(Duration::from_secs(60));
        assert_eq!(code, Some(1), "{arg}: {out}");
        assert!(
            out.contains(&format!("guest: bad argument {arg}")),
            "{arg}: {out}"
        );
    }
}

#[test]
fn verifier_catches_a_stale_page_written_by_the_vmm() {
    let serial = std::env::temp_dir().join(format!("ferry-stale-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&serial);
    let mut c = VmConfig {
        cpus: parse_cpus("boot=2").unwrap(),
        ..Default::default()
    };
    c.memory.size = 128 << 20;
    c.payload.kernel = Some(common::guest_elf());
    // Slow passes (0.5 s for the 2048 pages) so the page is checked after we resume.
    c.payload.cmdline = Some("workload=verify start=1M size=8M rate=4096".into());
    c.serial = parse_serial(&format!("file={}", serial.display())).unwrap();
    let m = Machine::boot(c).unwrap();
    common::wait_serial(&serial, "guest: verified 1 1", 0, Duration::from_secs(60));
    m.pause();
    // A page in vCPU 1's share (the second 4 MiB): put back its previous generation.
    let gpa = 0x50_0000 + 7 * PAGE_SIZE as u64;
    let mut page = [0u8; PAGE_SIZE];
    m.memory().read_slice(&mut page, GuestAddress(gpa)).unwrap();
    let generation = check_page(&page, gpa).generation();
    assert!(
        generation >= 1,
        "the guest has written the page: {generation}"
    );
    fill_page(&mut page, gpa, generation - 1);
    m.memory().write_slice(&page, GuestAddress(gpa)).unwrap();
    m.resume();
    let line = common::serial_line(&serial, "guest: MISMATCH", Duration::from_secs(60));
    assert!(
        line.contains(&format!("cpu=1 gpa={gpa:#x} ")),
        "the mismatch names the page: {line}"
    );
    common::wait_serial(&serial, "guest: FAIL", 0, Duration::from_secs(10));
    assert_eq!(
        m.wait_event(Some(Duration::from_secs(10))),
        Some(VmEvent::DebugExit(1))
    );
    drop(m);
    let _ = std::fs::remove_file(serial);
}

/// The guest lists PCI bus 0 through ports 0xCF8/0xCFC and finds the same through ECAM
/// at the address the MCFG table gives (QEMU's q35 and pc machines pass the same check:
/// test_guest/pattern/tests/qemu_boot.rs).
#[test]
fn pci_scan_sees_the_host_bridge_through_cf8_and_ecam() {
    let f = ferry(1, "workload=verify start=1M size=4M passes=1 pci=scan");
    let (code, out) = f.wait(Duration::from_secs(60));
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("guest: pci 00:00.0 1b36:0008 class 060000"),
        "the host bridge at 00:00.0: {out}"
    );
    assert!(
        out.contains("guest: pci ecam 0xe0000000 agrees (1 devices)"),
        "ECAM from MCFG agrees with 0xCF8: {out}"
    );
    assert!(!out.contains("FAIL"), "{out}");
}
