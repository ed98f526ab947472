//! `--device` (VFIO passthrough). This host has no VFIO: the VM must refuse the device with
//! one error naming its path and what is missing. With VFIO and a device bound to vfio-pci
//! named by `FERRY_VFIO_DEVICE=/sys/bus/pci/devices/...`, the device is opened through the
//! VMM's own code path and its config header read (no VM is booted).

mod common;

use common::{error_line, run_ferry as run};

use std::path::Path;

use vmm::config::DeviceConfig;
use vmm::vfio_devices::VfioDevice;

fn boot_with_device(device: &str) -> (i32, String) {
    let elf = common::guest_elf();
    run(&[
        "--kernel",
        elf.to_str().unwrap(),
        "--memory",
        "size=64M",
        "--device",
        device,
    ])
}

#[test]
fn a_device_path_that_does_not_exist_is_named() {
    let path = "/sys/bus/pci/devices/0000:00:1f.7";
    assert!(!Path::new(path).exists(), "{path} exists on this host");
    let (code, err) = boot_with_device(&format!("path={path}"));
    assert!(code == 1 || code == 2, "exit {code}: {err}");
    let line = error_line(&err);
    assert!(line.contains(path), "{line}");
    assert!(line.contains("No such file or directory"), "{line}");
}

#[test]
fn a_device_not_bound_to_vfio_is_refused_with_the_reason() {
    let Some(dev) = std::fs::read_dir("/sys/bus/pci/devices")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            std::fs::read_link(p.join("driver"))
                .map(|d| !d.ends_with("vfio-pci"))
                .unwrap_or(true)
        })
    else {
        eprintln!("skipped: no PCI device outside vfio-pci in /sys/bus/pci/devices");
        return;
    };
    let path = dev.to_str().unwrap();
    let (code, err) = boot_with_device(&format!("path={path},id=nic"));
    assert!(code == 1 || code == 2, "exit {code}: {err}");
    let line = error_line(&err);
    assert!(line.contains(path) && line.contains("nic"), "{line}");
    let reasons = [
        "/dev/vfio/vfio is missing: VFIO is not available on this host",
        "has no iommu_group: not bound to vfio-pci?",
        "not vfio-pci",
        "is bound to no driver",
    ];
    assert!(reasons.iter().any(|r| line.contains(r)), "{line}");
    if !Path::new("/dev/vfio/vfio").exists() && !Path::new("/dev/iommu").exists() {
        assert!(line.contains(reasons[0]), "{line}");
    }
}

#[test]
fn bad_device_options_are_named() {
    for (arg, needle) in [
        ("iommu=on", "path= is required"),
        ("path=/x,iommu=sometimes", "sometimes"),
        ("path=/x,bus=3", "bus"),
    ] {
        let (code, err) = boot_with_device(arg);
        assert_eq!(code, 2, "{arg}: {err}");
        let line = error_line(&err);
        assert!(line.contains("--device") && line.contains(needle), "{line}");
    }
}

/// With VFIO: open the device `FERRY_VFIO_DEVICE` names as the VMM does and read its
/// header, from the device and through Ferry's function.
#[test]
fn hardware_open_and_read_the_config_header() {
    if !Path::new("/dev/vfio/vfio").exists() && !Path::new("/dev/iommu").exists() {
        eprintln!("skipped: /dev/vfio/vfio is missing");
        return;
    }
    let Ok(path) = std::env::var("FERRY_VFIO_DEVICE") else {
        eprintln!("skipped: FERRY_VFIO_DEVICE is not set (the VFIO device this test may use)");
        return;
    };
    let mem = vmm::vm::create_memory(64 << 20, false, false).expect("guest RAM");
    let cfg = DeviceConfig {
        path: path.clone().into(),
        iommu: false,
        id: None,
    };
    let dev = VfioDevice::open("hw".into(), 1, &cfg, &mem)
        .unwrap_or_else(|e| panic!("opening {path}: {e}"));
    let h = dev.device_header().expect("reading the config region");
    let vendor = u16::from_le_bytes([h[0], h[1]]);
    assert_ne!(vendor, 0xffff, "{path}: vendor id reads all ones");
    let mut ids = [0u8; 4];
    use devices::pci::PciDevice;
    dev.function.lock().unwrap().read_config(0, &mut ids);
    assert_eq!(ids, h[0..4], "Ferry's header shows the device's ids");
    eprintln!(
        "{path}: {:04x}:{:04x}, BARs {:x?}",
        vendor,
        u16::from_le_bytes([h[2], h[3]]),
        dev.function.lock().unwrap().bars()
    );
}
