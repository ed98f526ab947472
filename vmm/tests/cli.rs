//! Bad input to `ferry` gives one clear error line and a non-zero exit, never a panic.

mod common;

use common::{error_line, run_ferry as run};

#[test]
fn missing_kernel_file_is_named() {
    let (code, err) = run(&["--kernel", "/nonexistent/vmlinuz"]);
    assert_ne!(code, 0);
    assert!(error_line(&err).contains("/nonexistent/vmlinuz"), "{err}");
}

#[test]
fn garbage_kernel_is_refused() {
    let p = std::env::temp_dir().join(format!("ferry-garbage-{}", std::process::id()));
    std::fs::write(&p, vec![0x42u8; 8192]).unwrap();
    let (code, err) = run(&["--kernel", p.to_str().unwrap()]);
    std::fs::remove_file(&p).ok();
    assert_ne!(code, 0);
    let line = error_line(&err);
    assert!(line.contains(p.to_str().unwrap()), "{line}");
}

#[test]
fn zero_cpus_is_refused() {
    let elf = common::guest_elf();
    let (code, err) = run(&["--kernel", elf.to_str().unwrap(), "--cpus", "boot=0"]);
    assert_ne!(code, 0);
    assert!(error_line(&err).contains("boot_vcpus=0"), "{err}");
}

#[test]
fn bad_option_values_are_named() {
    for (args, needle) in [
        (vec!["--memory", "size=lots"], "lots"),
        (vec!["--serial", "pty"], "pty"),
        (vec!["--dirty-ring", "entries=1000"], "1000"),
        (vec!["--cpus", "boot=2,sockets=1"], "sockets"),
        (vec!["--console", "bogus"], "bogus"),
        (vec!["--console", "pty"], "no virtio-console"),
        (vec!["--console", "file=/tmp/c"], "\"File\""),
    ] {
        let elf = common::guest_elf();
        let mut a = vec!["--kernel", elf.to_str().unwrap()];
        a.extend(args);
        let (code, err) = run(&a);
        assert_ne!(code, 0, "{a:?}");
        assert!(error_line(&err).contains(needle), "{a:?}: {err}");
    }
}

#[test]
fn memory_too_small_for_the_kernel() {
    let elf = common::guest_elf();
    let (code, err) = run(&["--kernel", elf.to_str().unwrap(), "--memory", "size=1M"]);
    assert_ne!(code, 0);
    assert!(error_line(&err).contains("size"), "{err}");
}

#[test]
fn unusable_disk_and_rng_files_are_named() {
    let elf = common::guest_elf();
    let dir = std::env::temp_dir().join(format!("ferry-cli-disk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let odd = dir.join("odd.raw");
    std::fs::write(&odd, vec![0u8; 1000]).unwrap();
    let missing = dir.join("missing.raw");
    let (m, o) = (missing.to_str().unwrap(), odd.to_str().unwrap());
    for (arg, needle) in [
        (
            vec!["--disk".to_string(), format!("path={m}")],
            format!("disk {m}: cannot open read-write: No such file or directory"),
        ),
        (
            vec!["--disk".to_string(), format!("path={m},readonly=on")],
            format!("disk {m}: cannot open read-only"),
        ),
        (
            vec!["--disk".to_string(), format!("path={o}")],
            format!("disk {o}: its size, 1000 bytes, is not a multiple of 512"),
        ),
        (
            vec!["--rng".to_string(), format!("src={m}")],
            format!("rng {m}: cannot open for reading"),
        ),
    ] {
        let mut a = vec!["--kernel", elf.to_str().unwrap()];
        a.extend(arg.iter().map(String::as_str));
        let (code, err) = run(&a);
        assert_ne!(code, 0, "{a:?}");
        let line = error_line(&err);
        assert!(line.starts_with("ferry: error: "), "{line}");
        assert!(line.contains(&needle), "{a:?}: {err}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_disk_and_rng_options_are_named() {
    let elf = common::guest_elf();
    for (args, needle) in [
        (vec!["--disk", "path=/x.raw,direct=on"], "direct"),
        (vec!["--disk", "path=/x.raw,readonly=maybe"], "maybe"),
        (vec!["--disk", "path="], "path"),
        (vec!["--disk", "readonly=on"], "path= is required"),
        (
            vec!["--disk", "path=/dev/zero", "--disk", "path=/dev/zero"],
            "/dev/zero",
        ),
        (
            vec!["--disk", "path=/x,id=a", "--disk", "path=/y,id=a"],
            "'a'",
        ),
        (vec!["--rng", "file=/dev/urandom"], "file"),
        (
            vec!["--disk", "path=/x.raw,iommu=yes"],
            "--disk: 'yes' is not a valid value for iommu",
        ),
        (
            vec!["--rng", "src=/dev/urandom,iommu=2"],
            "--rng: '2' is not a valid value for iommu",
        ),
        (vec!["--rng", "iommu=on"], "src= is required"),
    ] {
        let mut a = vec!["--kernel", elf.to_str().unwrap()];
        a.extend(args);
        let (code, err) = run(&a);
        assert_ne!(code, 0, "{a:?}");
        assert!(error_line(&err).contains(needle), "{a:?}: {err}");
    }
}

/// A vfio-user device nobody serves, a socket path that is not a socket, and bad
/// options: one error line naming the device and why.
#[test]
fn unusable_user_devices_are_named() {
    let elf = common::guest_elf();
    let dir = std::env::temp_dir().join(format!("ferry-cli-user-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("plain-file");
    std::fs::write(&file, b"not a socket").unwrap();
    let missing = dir.join("missing.sock");
    let (m, f) = (missing.to_str().unwrap(), file.to_str().unwrap());
    for (arg, needle) in [
        (
            format!("socket={m}"),
            format!("user0: vfio-user: device socket {m}: cannot connect: No such file"),
        ),
        (
            format!("socket={f},id=nic"),
            format!("nic: vfio-user: device socket {f}: cannot connect: Connection refused"),
        ),
        (
            "socket=".to_string(),
            "--user-device: '' is not a valid value for socket: the path is empty".to_string(),
        ),
        (
            "id=x".to_string(),
            "--user-device: socket= is required (in 'id=x')".to_string(),
        ),
        (
            "socket=/s,iommu=maybe".to_string(),
            "'maybe' is not a valid value for iommu".to_string(),
        ),
        (
            "sock=/s".to_string(),
            "unknown parameter 'sock' (accepted: socket, id, iommu)".to_string(),
        ),
    ] {
        let a = [
            "--kernel",
            elf.to_str().unwrap(),
            "--user-device",
            arg.as_str(),
        ];
        let (code, err) = run(&a);
        assert_ne!(code, 0, "{a:?}");
        let line = error_line(&err);
        assert!(line.contains(&needle), "{a:?}: {err}");
    }
    std::fs::remove_dir_all(&dir).ok();
}
