//! Booting real guests on /dev/kvm: the test guest with 1, 2 and 4 vCPUs, and Debian's
//! Linux kernel as far as this machine's KVM lets it go (its early console).

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::Ferry;

#[test]
fn test_guest_reports_every_vcpu() {
    let elf = common::guest_elf();
    for n in [1, 2, 4] {
        let cpus = format!("boot={n}");
        let mut f = Ferry::spawn(&[
            "--kernel",
            elf.to_str().unwrap(),
            "--cmdline",
            "workload=idle",
            "--cpus",
            &cpus,
            "--memory",
            "size=256M",
            "--serial",
            "tty",
        ]);
        let line = f.expect_line("guest: ready", Duration::from_secs(60));
        assert!(
            line.contains(&format!("cpus={n} ")),
            "{n} vCPUs expected: {line}"
        );
    }
}

#[test]
fn debug_exit_status_is_ferry_status() {
    let elf = common::guest_elf();
    // A bad argument makes the guest write 1 to the debug-exit port.
    let f = Ferry::spawn(&[
        "--kernel",
        elf.to_str().unwrap(),
        "--cmdline",
        "workload=juggle",
        "--serial",
        "tty",
        "--memory",
        "size=256M",
    ]);
    let (code, out) = f.wait(Duration::from_secs(60));
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("guest: bad argument workload=juggle"), "{out}");
}

/// Debian's cloud kernel, fetched with `apt-get download` into target/ once.
fn debian_kernel() -> PathBuf {
    let dir = common::repo_root().join("target/debian-kernel");
    let found = |dir: &PathBuf| -> Option<PathBuf> {
        std::fs::read_dir(dir.join("boot"))
            .ok()?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz"))
            })
    };
    if let Some(k) = found(&dir) {
        return k;
    }
    let st = Command::new(common::repo_root().join("scripts/fetch_debian_kernel.sh"))
        .arg(&dir)
        .status()
        .expect("run scripts/fetch_debian_kernel.sh");
    assert!(st.success(), "fetching Debian's kernel failed");
    found(&dir).expect("vmlinuz in the unpacked package")
}

#[test]
fn debian_linux_reaches_its_early_console() {
    let kernel = debian_kernel();
    let cmdline = "console=ttyS0 earlyprintk=serial,ttyS0,115200 ferry-test-marker=42";
    let mut f = Ferry::spawn(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--cmdline",
        cmdline,
        "--cpus",
        "boot=1",
        "--memory",
        "size=512M",
        "--serial",
        "tty",
    ]);
    // Decompressing the kernel takes about two minutes on this nested KVM.
    f.expect_line("Linux version", Duration::from_secs(400));
    // The kernel echoes its command line early on.
    f.expect_line("ferry-test-marker=42", Duration::from_secs(60));
}
