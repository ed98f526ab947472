//! `vm.snapshot` / `vm.restore` / `--restore` with the `verify` guest in real ferry
//! processes: a snapshot restored in another process goes on with every page as it was;
//! refusals name what is wrong and leave no VM; a snapshot that left pages out is caught
//! by the guest (the seam).

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{spawn_with_api, spawn_with_api_env, wait_serial, Ferry};
use serde_json::{json, Value};
use vmm::api::client::{Client, Reply};

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ferry-snap-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The verify region: 32 MiB from 1 MiB.
const CMDLINE: &str = "workload=verify start=1M size=32M";

fn guest_args(serial: &Path) -> Vec<String> {
    vec![
        "--kernel".into(),
        common::guest_elf().to_str().unwrap().into(),
        "--cmdline".into(),
        CMDLINE.into(),
        "--cpus".into(),
        "boot=2".into(),
        "--memory".into(),
        "size=256M".into(),
        "--serial".into(),
        format!("file={}", serial.display()),
    ]
}

fn put(api: &Client, endpoint: &str, body: Value) -> Reply {
    api.put(endpoint, Some(body.to_string().as_bytes()))
        .unwrap_or_else(|e| panic!("{endpoint}: {e}"))
}

fn put_ok(api: &Client, endpoint: &str, body: Option<Value>) {
    let r = match body {
        Some(b) => put(api, endpoint, b),
        None => api.put(endpoint, None).unwrap(),
    };
    assert_eq!(r.status, 204, "{endpoint}: {}", r.error_message());
}

fn state(api: &Client) -> Value {
    let r = api.get("vm.info").unwrap();
    if r.status != 200 {
        return Value::Null;
    }
    r.json().unwrap()["state"].clone()
}

fn url(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

/// Boots the verify guest in a ferry with an API, waits for both vCPUs' first check,
/// pauses it and snapshots it into `snap`; returns the ferry (still holding the VM) and
/// the serial log's path.
fn snapshotted(dir: &Path, snap: &Path, env: &[(&str, &str)]) -> (Ferry, Client, PathBuf) {
    let serial = dir.join("serial.log");
    let args = guest_args(&serial);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ferry, api) = spawn_with_api_env(None, dir, "a", &args, env);
    wait_serial(&serial, "guest: verified 1 1", 0, Duration::from_secs(120));
    // A snapshot of a running VM is refused: cloud-hypervisor's rule too.
    let r = put(&api, "vm.snapshot", json!({"destination_url": url(snap)}));
    assert_eq!(r.status, 405, "{}", r.error_message());
    assert!(
        r.error_message().contains("Running"),
        "{}",
        r.error_message()
    );
    put_ok(&api, "vm.pause", None);
    put_ok(
        &api,
        "vm.snapshot",
        Some(json!({"destination_url": url(snap)})),
    );
    assert_eq!(
        state(&api),
        "Paused",
        "the VM stays paused after its snapshot"
    );
    (ferry, api, serial)
}

fn serial_len(p: &Path) -> usize {
    std::fs::metadata(p).map(|m| m.len() as usize).unwrap_or(0)
}

fn goes_on(serial: &Path, pos: usize) {
    common::verified_twice_more(serial, pos, 2, Duration::from_secs(120));
}

/// Ends a ferry through its API.
fn shut_down(ferry: Ferry, api: &Client) {
    let _ = api.put("vmm.shutdown", None);
    let (code, out) = ferry.wait(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{out}");
}

#[test]
fn a_snapshot_restored_by_another_process_goes_on_with_every_page() {
    let dir = tmpdir("cli");
    let snap = dir.join("snap");
    std::fs::create_dir(&snap).unwrap();
    let (a, api_a, serial) = snapshotted(&dir, &snap, &[]);
    shut_down(a, &api_a);

    for f in ["snapshot.json", "config.json", "state.json", "memory.bin"] {
        assert!(snap.join(f).exists(), "no {f} in the snapshot");
    }
    // Holes: the 256 MiB guest touched its image and 32 MiB region, not all of it.
    let mem = std::fs::metadata(snap.join("memory.bin")).unwrap();
    assert_eq!(mem.len(), 256 << 20);
    assert!(
        mem.blocks() * 512 < 128 << 20,
        "memory.bin holds {} bytes of data for a guest that touched ~33 MiB",
        mem.blocks() * 512
    );
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(snap.join("snapshot.json")).unwrap()).unwrap();
    assert_eq!(manifest["version"], 1, "{manifest}");

    // --restore: the VM comes back paused, with the guest as it was.
    let restore = format!("source_url={}", url(&snap));
    let (b, api_b) = spawn_with_api(None, &dir, "b", &["--restore", &restore]);
    assert_eq!(state(&api_b), "Paused");
    let pos = serial_len(&serial);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        serial_len(&serial),
        pos,
        "a VM restored without resume=true must not run"
    );
    let info = api_b.get("vm.info").unwrap().json().unwrap();
    assert_eq!(info["config"]["payload"]["cmdline"], CMDLINE, "{info}");
    put_ok(&api_b, "vm.resume", None);
    goes_on(&serial, pos);
    shut_down(b, &api_b);
}

#[test]
fn vm_restore_through_the_api_refusals_and_a_damaged_snapshot() {
    let dir = tmpdir("api");
    let snap = dir.join("snap");
    std::fs::create_dir(&snap).unwrap();
    let (a, api_a, serial) = snapshotted(&dir, &snap, &[]);
    // Restore where a VM exists: refused, the VM untouched.
    let r = put(&api_a, "vm.restore", json!({"source_url": url(&snap)}));
    assert_eq!(r.status, 405, "{}", r.error_message());
    assert_eq!(state(&api_a), "Paused");
    shut_down(a, &api_a);

    let (b, api) = spawn_with_api(None, &dir, "b", &[]);
    let refused = |body: Value, status: u16, want: &str| {
        let r = put(&api, "vm.restore", body.clone());
        assert_eq!(r.status, status, "{body}: {}", r.error_message());
        assert!(
            r.error_message().contains(want),
            "{body}: no '{want}' in: {}",
            r.error_message()
        );
        assert_eq!(api.get("vm.info").unwrap().status, 404, "{body} left a VM");
    };
    refused(json!({"source_url": "/no/scheme"}), 400, "file://");
    refused(
        json!({"source_url": url(&dir.join("missing"))}),
        400,
        "does not exist",
    );
    refused(
        json!({"source_url": url(&snap), "memory_restore_mode": "OnDemand"}),
        400,
        "OnDemand",
    );
    refused(
        json!({"source_url": url(&snap), "zone_updates": [{"id": "z", "host_numa_node": 0}]}),
        400,
        "zone_updates",
    );
    refused(json!({"source_url": url(&dir)}), 500, "snapshot.json");

    // One byte of a data page flipped: the checksum names the range; no VM is left.
    let mem_path = snap.join("memory.bin");
    let mut mem = std::fs::read(&mem_path).unwrap();
    let at = (2 << 20) + 100; // inside the verify region, written by the guest
    mem[at] ^= 0x40;
    std::fs::write(&mem_path, &mem).unwrap();
    refused(json!({"source_url": url(&snap)}), 500, "crc32c");
    mem[at] ^= 0x40;
    std::fs::write(&mem_path, &mem).unwrap();
    drop(mem);

    // A manifest of another format version.
    let man_path = snap.join("snapshot.json");
    let original = std::fs::read(&man_path).unwrap();
    let mut m: Value = serde_json::from_slice(&original).unwrap();
    m["version"] = json!(99);
    std::fs::write(&man_path, m.to_string()).unwrap();
    refused(json!({"source_url": url(&snap)}), 500, "format version 99");
    std::fs::write(&man_path, &original).unwrap();

    // cloud-hypervisor's whole body, as ch-remote sends it, with resume: the VM runs.
    let pos = serial_len(&serial);
    let ch_body = json!({
        "source_url": url(&snap), "prefault": false, "memory_restore_mode": "Copy",
        "net_fds": null, "vfio_fds": null, "iommufd_fd": null, "resume": true,
        "zone_updates": []
    });
    let r = put(&api, "vm.restore", ch_body);
    assert_eq!(r.status, 204, "{}", r.error_message());
    assert_eq!(state(&api), "Running");
    goes_on(&serial, pos);
    shut_down(b, &api);
}

/// The seam: a snapshot that leaves 64 pages of the verify region out (holes, checksums
/// over what it wrote) restores without complaint, and the guest finds the pages stale.
#[test]
fn a_snapshot_missing_pages_is_caught_by_the_guest() {
    let dir = tmpdir("seam");
    let snap = dir.join("snap");
    std::fs::create_dir(&snap).unwrap();
    // 4 MiB: inside the region (1 MiB + 32 MiB), whichever vCPU's share it is.
    let env = [("FERRY_TEST_SNAPSHOT_DROP_PAGES", "0x400000")];
    let (a, api_a, serial) = snapshotted(&dir, &snap, &env);
    shut_down(a, &api_a);
    let pos = serial_len(&serial);
    let restore = format!("source_url={},resume=true", url(&snap));
    // The guest ends the run (debug-exit 1) once it sees a stale page, maybe before the
    // API is up: no client here, only the process.
    let sock = dir.join("b.sock");
    let b = Ferry::spawn(&[
        "--api-socket",
        sock.to_str().unwrap(),
        "--restore",
        &restore,
    ]);
    let end = Instant::now() + Duration::from_secs(120);
    let text = loop {
        let t = std::fs::read_to_string(&serial).unwrap_or_default();
        if t[pos..].contains("MISMATCH") {
            break t;
        }
        assert!(
            Instant::now() < end,
            "the guest did not catch the pages left out of the snapshot:\n{}",
            &t[pos..]
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let (code, out) = b.wait(Duration::from_secs(30));
    assert_eq!(
        code,
        Some(1),
        "the guest fails the run on the stale page:\n{out}\n{text}"
    );
}

#[test]
fn restore_option_errors_are_named() {
    let dir = tmpdir("opt");
    for (args, want) in [
        (vec!["--restore", "resume=true"], "needs source_url"),
        (
            vec!["--restore", "source_url=file:///tmp,speed=9"],
            "unknown parameter \"speed\"",
        ),
        (
            vec!["--restore", "source_url=file:///tmp,resume=maybe"],
            "resume=\"maybe\"",
        ),
        (
            vec!["--restore", "source_url=file:///tmp"],
            "--api-socket or --qmp",
        ),
    ] {
        let (code, out) = common::run_ferry(&args);
        assert_eq!(code, 2, "{args:?}: {out}");
        assert!(out.contains(want), "{args:?}: no '{want}' in {out}");
    }
    // A directory without a snapshot: the process says which file is missing.
    let sock = dir.join("x.sock");
    let restore = format!("source_url={}", url(&dir));
    let (code, out) = common::run_ferry(&[
        "--api-socket",
        sock.to_str().unwrap(),
        "--restore",
        &restore,
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("snapshot.json"), "{out}");
}
