//! vm.add-disk / add-device / add-user-device / remove-device / resize: on a VM not yet
//! booted they change what vm.boot builds (the guest sees it); on a running VM, 405
//! (no hotplug) unless nothing would change; bad values are named.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{spawn_with_api, wait_serial};
use serde_json::{json, Value};
use vmm::api::client::{Client, Reply};

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ferry-apidev-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn put(api: &Client, endpoint: &str, body: Value) -> Reply {
    api.put(endpoint, Some(body.to_string().as_bytes()))
        .unwrap()
}

fn expect(api: &Client, endpoint: &str, body: Value, status: u16, want: &str) {
    let r = put(api, endpoint, body.clone());
    assert_eq!(r.status, status, "{endpoint} {body}: {}", r.error_message());
    assert!(
        r.error_message().contains(want),
        "{endpoint} {body}: no '{want}' in {}",
        r.error_message()
    );
}

fn config(api: &Client) -> Value {
    api.get("vm.info").unwrap().json().unwrap()["config"].clone()
}

#[test]
fn cold_plug_and_resize_shape_the_booted_vm_and_hotplug_is_refused() {
    let dir = tmpdir("cold");
    let (_ferry, api) = spawn_with_api(None, &dir, "vm", &[]);
    // No VM yet.
    expect(
        &api,
        "vm.resize",
        json!({"desired_vcpus": 2}),
        404,
        "vm.create",
    );
    let serial = dir.join("serial.log");
    let elf = common::guest_elf();
    let create = json!({
        "payload": {"kernel": elf, "cmdline": "workload=verify start=1M size=4M pci=scan"},
        "cpus": {"boot_vcpus": 1, "max_vcpus": 2},
        "memory": {"size": 128 << 20},
        "serial": {"mode": "File", "file": serial},
    });
    assert_eq!(put(&api, "vm.create", create).status, 204);

    let disk = dir.join("disk.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let missing = dir.join("missing.raw");
    expect(
        &api,
        "vm.add-disk",
        json!({"path": missing}),
        400,
        "missing.raw",
    );
    expect(
        &api,
        "vm.add-disk",
        json!({"path": disk, "direct": true}),
        400,
        "direct",
    );
    assert_eq!(
        put(&api, "vm.add-disk", json!({"path": disk, "id": "data"})).status,
        204
    );
    expect(
        &api,
        "vm.add-disk",
        json!({"path": disk, "id": "data"}),
        400,
        "data",
    );
    assert_eq!(put(&api, "vm.add-disk", json!({"path": disk})).status, 204);
    assert_eq!(config(&api)["disks"].as_array().map(Vec::len), Some(2));
    expect(
        &api,
        "vm.remove-device",
        json!({"id": "nope"}),
        404,
        "\"data\"",
    );
    // The second disk's default id is disk1 (its place).
    assert_eq!(
        put(&api, "vm.remove-device", json!({"id": "disk1"})).status,
        204
    );
    assert_eq!(config(&api)["disks"].as_array().map(Vec::len), Some(1));

    expect(
        &api,
        "vm.resize",
        json!({"desired_vcpus": 3}),
        400,
        "max_vcpus 2",
    );
    expect(
        &api,
        "vm.resize",
        json!({"desired_vcpus": 0}),
        400,
        "desired_vcpus 0",
    );
    expect(
        &api,
        "vm.resize",
        json!({"desired_balloon": 4096}),
        400,
        "balloon",
    );
    assert_eq!(
        put(
            &api,
            "vm.resize",
            json!({"desired_vcpus": 2, "desired_ram": 256u64 << 20})
        )
        .status,
        204
    );
    let c = config(&api);
    assert_eq!(
        (c["cpus"]["boot_vcpus"].clone(), c["memory"]["size"].clone()),
        (json!(2), json!(256u64 << 20))
    );

    // The guest sees what the configuration became: two vCPUs, 256 MiB, the disk.
    assert_eq!(api.put("vm.boot", None).unwrap().status, 204);
    let ready = common::serial_line(&serial, "guest: ready", Duration::from_secs(60));
    assert!(ready.contains("cpus=2"), "{ready}");
    wait_serial(&serial, "1af4:1042", 0, Duration::from_secs(60));
    let info = common::serial_line(&serial, "guest: info", Duration::from_secs(5));
    assert!(info.contains("ram_top=0x10000000"), "{info}");

    // Running: no hotplug; a resize to what it is changes nothing.
    expect(
        &api,
        "vm.add-disk",
        json!({"path": disk}),
        405,
        "no PCI hotplug",
    );
    expect(
        &api,
        "vm.remove-device",
        json!({"id": "data"}),
        405,
        "no PCI hotplug",
    );
    assert_eq!(
        put(&api, "vm.resize", json!({"desired_vcpus": 2})).status,
        204
    );
    expect(
        &api,
        "vm.resize",
        json!({"desired_vcpus": 1}),
        405,
        "no vCPU or memory hotplug",
    );
    // Bad values are named whatever the state.
    expect(
        &api,
        "vm.add-disk",
        json!({"path": missing}),
        400,
        "missing.raw",
    );
    let text = std::fs::read_to_string(&serial).unwrap();
    assert!(
        !text.contains("FAIL") && !text.contains("MISMATCH"),
        "{text}"
    );
}
