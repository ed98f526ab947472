//! cloud-hypervisor's own VM configuration, as its vm.info reports it, against a real
//! `ferry --api-socket`: defaults accepted and the guest runs; values Ferry cannot honour
//! refused with 400 naming field and value; vm.info writes no `null` (issue 16).

mod api_util;
mod common;

use std::time::Duration;

use api_util::ApiFerry;
use serde_json::{json, Value};

const BOOT_TIMEOUT: Duration = Duration::from_secs(30);

/// cloud-hypervisor's full configuration for a default VM (1 vCPU, 512 MiB, the test
/// guest, serial to `serial`, console off, rng from /dev/urandom, no disks or network),
/// every field as its vm.info writes it.
fn ch_default_config(serial: Value) -> Value {
    json!({
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1, "topology": null, "kvm_hyperv": false,
            "max_phys_bits": 46, "affinity": null, "features": {"amx": false},
            "nested": true, "core_scheduling": "Vm", "profile": "Host"},
        "memory": {"size": 536870912u64, "mergeable": false, "hotplug_method": "Acpi",
            "hotplug_size": null, "hotplugged_size": null, "shared": false,
            "hugepages": false, "hugepage_size": null, "prefault": false, "reserve": false,
            "zones": null, "thp": true},
        "payload": {"firmware": null, "kernel": common::guest_elf(),
            "cmdline": "workload=idle", "initramfs": null, "igvm": null, "host_data": null},
        "rate_limit_groups": null,
        "disks": [],
        "net": [],
        "rng": {"src": "/dev/urandom", "iommu": false, "id": null, "pci_segment": 0},
        "balloon": null,
        "fs": null,
        "pmem": null,
        "serial": serial,
        // cloud-hypervisor's default console is Tty: taken (Ferry has none; a warning).
        "console": {"file": null, "mode": "Tty", "iommu": false, "socket": null,
            "id": null, "pci_segment": 0},
        "debug_console": {"file": null, "mode": "Off", "iobase": 233},
        "devices": null,
        "user_devices": null,
        "vdpa": null,
        "vsock": null,
        "pvpanic": false,
        "iommu": false,
        "numa": null,
        "watchdog": false,
        "pci_segments": null,
        "platform": null,
        "tpm": null,
        "preserved_fds": null,
        "landlock_enable": false,
        "landlock_rules": null,
        "generic_vhost_user": null,
        "rtc": null,
        "_ferry_test_unknown": {"ignored": true},
    })
}

/// No `null` anywhere in a JSON value.
fn assert_no_null(v: &Value, at: &str) {
    match v {
        Value::Null => panic!("null at {at}"),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .for_each(|(i, x)| assert_no_null(x, &format!("{at}[{i}]"))),
        Value::Object(o) => o
            .iter()
            .for_each(|(k, x)| assert_no_null(x, &format!("{at}.{k}"))),
        _ => {}
    }
}

#[test]
fn cloud_hypervisors_default_configuration_boots() {
    let f = ApiFerry::start(&[]);
    let serial = json!({"file": f.serial_path(), "mode": "File", "iommu": false,
        "socket": null});
    let cfg = ch_default_config(serial);
    f.put_json("vm.create", &cfg, 204);
    assert_eq!(f.state(), "Created");
    f.put("vm.boot", 204);
    f.wait_serial("guest: ready", 1, BOOT_TIMEOUT);
    assert_eq!(f.state(), "Running");
    let info = f.get("vm.info", 200).json().unwrap();
    assert_no_null(&info, "vm.info");
    assert_eq!(info["config"]["rng"]["src"], "/dev/urandom");
    assert_eq!(info["config"]["memory"]["size"], 536870912u64);
    assert!(
        info["config"]["payload"].get("initramfs").is_none(),
        "{info}"
    );
    f.put("vm.shutdown", 204);
}

/// Serial `Null` and `Tty` (cloud-hypervisor's usual choices) are taken too; vm.info then
/// leaves `serial.file` out.
#[test]
fn serial_null_and_tty_and_no_null_in_vm_info() {
    for mode in ["Null", "Tty"] {
        let f = ApiFerry::start(&[]);
        let cfg = ch_default_config(json!({"file": null, "mode": mode, "socket": null}));
        f.put_json("vm.create", &cfg, 204);
        let info = f.get("vm.info", 200).json().unwrap();
        assert_no_null(&info, "vm.info");
        assert_eq!(info["config"]["serial"], json!({"mode": mode}), "{info}");
        let payload = &info["config"]["payload"];
        assert!(payload.get("initramfs").is_none(), "{payload}");
        assert_eq!(payload["cmdline"], "workload=idle");
        f.put("vm.boot", 204);
        let t = std::time::Instant::now();
        while f.state() != "Running" {
            assert!(t.elapsed() < BOOT_TIMEOUT, "{mode}: never Running");
            std::thread::sleep(Duration::from_millis(50));
        }
        // The guest runs: its vCPU exits keep counting.
        let exits = |c: &Value| -> u64 {
            c["vcpu_exits"]
                .as_object()
                .map(|o| o.values().filter_map(Value::as_u64).sum())
                .unwrap_or(0)
        };
        let first = exits(&f.counters());
        let t = std::time::Instant::now();
        while exits(&f.counters()) <= first {
            assert!(t.elapsed() < BOOT_TIMEOUT, "{mode}: the guest does not run");
            std::thread::sleep(Duration::from_millis(50));
        }
        f.put("vm.shutdown", 204);
    }
}

/// The vm.create example of cloud-hypervisor's docs/api.md (4 vCPUs, kernel and cmdline,
/// a disk, an rng, a network device): taken without the network device, which Ferry
/// does not have and refuses by name.
#[test]
fn the_api_md_example() {
    let f = ApiFerry::start(&[]);
    let disk = f.dir.0.join("focal.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let mut example = json!({
        "cpus": {"boot_vcpus": 4, "max_vcpus": 4},
        "payload": {"kernel": common::guest_elf(),
            "cmdline": "console=ttyS0 console=hvc0 root=/dev/vda1 rw"},
        "disks": [{"path": disk}],
        "rng": {"src": "/dev/urandom"},
        "net": [{"ip": "192.168.10.10", "mask": "255.255.255.0", "mac": "12:34:56:78:90:01"}]
    });
    let msg = f.error(
        "PUT",
        "vm.create",
        Some(example.to_string().as_bytes()),
        400,
    );
    assert!(
        msg.contains("net: [{") && msg.contains("192.168.10.10") && msg.contains("network"),
        "{msg}"
    );
    f.get("vm.info", 404);
    example.as_object_mut().unwrap().remove("net");
    f.put_json("vm.create", &example, 204);
    let info = f.get("vm.info", 200).json().unwrap();
    assert_eq!(info["config"]["cpus"]["boot_vcpus"], 4);
    assert_eq!(info["config"]["disks"][0]["path"], json!(disk));
    assert_no_null(&info, "vm.info");
}

/// Each value Ferry cannot honour: 400 naming the field and the value, nothing created,
/// the VMM still serving.
#[test]
fn values_ferry_cannot_honour_are_refused() {
    let f = ApiFerry::start(&[]);
    let base = ch_default_config(json!({"mode": "Null"}));
    let cases: &[(&str, &str, Value, &str)] = &[
        ("cpus", "kvm_hyperv", json!(true), "cpus.kvm_hyperv: true"),
        ("cpus", "nested", json!(false), "cpus.nested: false"),
        ("cpus", "max_phys_bits", json!(40), "cpus.max_phys_bits: 40"),
        (
            "cpus",
            "core_scheduling",
            json!("Vcpu"),
            r#"cpus.core_scheduling: "Vcpu""#,
        ),
        (
            "cpus",
            "features",
            json!({"amx": true}),
            r#"cpus.features: {"amx":true}"#,
        ),
        ("memory", "hugepages", json!(true), "memory.hugepages: true"),
        ("memory", "mergeable", json!(true), "memory.mergeable: true"),
        ("memory", "prefault", json!(true), "memory.prefault: true"),
        ("memory", "reserve", json!(true), "memory.reserve: true"),
        ("memory", "thp", json!(false), "memory.thp: false"),
        (
            "memory",
            "hotplug_size",
            json!(1u64 << 30),
            "memory.hotplug_size: 1073741824",
        ),
        (
            "payload",
            "firmware",
            json!("/fw.bin"),
            r#"payload.firmware: "/fw.bin""#,
        ),
        ("serial", "mode", json!("Pty"), r#"serial.mode: "Pty""#),
        (
            "serial",
            "mode",
            json!("Socket"),
            r#"serial.mode: "Socket""#,
        ),
        ("console", "mode", json!("File"), r#"console.mode: "File""#),
        (
            "debug_console",
            "mode",
            json!("File"),
            r#"debug_console.mode: "File""#,
        ),
        ("", "pvpanic", json!(true), "pvpanic: true"),
        ("", "watchdog", json!(true), "watchdog: true"),
        ("", "landlock_enable", json!(true), "landlock_enable: true"),
        ("", "balloon", json!({"size": 0}), r#"balloon: {"size":0}"#),
        ("", "fs", json!([{"tag": "t", "socket": "/s"}]), "fs: [{"),
        ("", "pmem", json!([{"file": "/p"}]), "pmem: [{"),
        ("", "vsock", json!({"cid": 3, "socket": "/v"}), "vsock: {"),
        ("", "numa", json!([{"guest_numa_id": 0}]), "numa: [{"),
        ("", "tpm", json!({"socket": "/t"}), "tpm: {"),
        (
            "",
            "platform",
            json!({"num_pci_segments": 2}),
            "platform.num_pci_segments: 2",
        ),
    ];
    for (part, field, value, want) in cases {
        let mut cfg = base.clone();
        if part.is_empty() {
            cfg[*field] = value.clone();
        } else {
            cfg[*part][*field] = value.clone();
        }
        let msg = f.error("PUT", "vm.create", Some(cfg.to_string().as_bytes()), 400);
        assert!(
            msg.contains(want) && msg.contains("is not supported by Ferry"),
            "{part}.{field}={value}: {msg}"
        );
        let nothing = f.error("GET", "vm.info", None, 404);
        assert!(!nothing.is_empty());
        f.get("vmm.ping", 200);
    }
    // And the default configuration still goes through afterwards.
    f.put_json("vm.create", &base, 204);
}
