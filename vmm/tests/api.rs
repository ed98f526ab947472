//! Every endpoint's success and failure codes against a real `ferry --api-socket`
//! process, through HTTP on its socket; and `ferry-remote` against the same.

mod api_util;
mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use api_util::{code, tiny_pvh_elf, ApiFerry, TempDir};
use serde_json::{json, Value};

const BOOT_TIMEOUT: Duration = Duration::from_secs(30);

fn body(v: &Value) -> Vec<u8> {
    v.to_string().into_bytes()
}

#[test]
fn without_a_vm() {
    let f = ApiFerry::start(&[]);
    let ping = f.get("vmm.ping", 200).json().unwrap();
    assert_eq!(
        ping["pid"].as_u64(),
        Some(u64::from(f.ferry.as_ref().unwrap().child.id()))
    );
    assert_eq!(ping["version"].as_str(), Some(env!("CARGO_PKG_VERSION")));
    assert!(ping["build_version"].is_string());
    assert!(ping["features"].is_array());

    assert!(f.error("GET", "vm.info", None, 404).contains("vm.create"));
    f.get("vm.counters", 404);
    for action in [
        "vm.boot",
        "vm.pause",
        "vm.resume",
        "vm.shutdown",
        "vm.reboot",
    ] {
        let msg = f.error("PUT", action, None, 404);
        assert!(msg.contains("no VM"), "{action}: {msg}");
    }
    // cloud-hypervisor answers 204 to a delete with nothing to delete.
    f.put("vm.delete", 204);
    let send = json!({"destination_url": "tcp:127.0.0.1:6000"});
    f.put_json("vm.send-migration", &send, 404);
    // No VM is what receiving needs: the body is valid, but nothing can listen there.
    let msg = f.error(
        "PUT",
        "vm.receive-migration",
        Some(&body(
            &json!({"receiver_url": "unix:/nonexistent-ferry-dir/x.sock"}),
        )),
        500,
    );
    assert!(
        msg.contains("cannot listen on unix:/nonexistent-ferry-dir/x.sock"),
        "{msg}"
    );
    assert!(f
        .error("GET", "vm.migration-info", None, 404)
        .contains("no migration has run"));
    assert!(f
        .error("PUT", "vm.cancel-migration", None, 404)
        .contains("no migration is in progress"));
}

/// The socket is the VM's whole control: only its owner may connect. Another user (here
/// `nobody`, uid 65534) is refused by the file's mode; the owner is served.
#[test]
fn the_api_socket_is_for_its_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;

    let f = ApiFerry::start(&[]);
    let mode = std::fs::metadata(&f.sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the API socket has mode {mode:o}");
    // The directory must let `nobody` reach the socket for the mode to be what refuses.
    std::fs::set_permissions(&f.dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let probe = format!(
        "import socket; s = socket.socket(socket.AF_UNIX); s.connect({:?})",
        f.sock.to_str().unwrap()
    );
    let out = Command::new("python3")
        .args(["-c", &probe])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("PermissionError"),
        "another user connected to the API socket (status {}): {err}",
        out.status
    );
    f.get("vmm.ping", 200);
}

#[test]
fn create_checks_the_config() {
    let f = ApiFerry::start(&[]);
    let elf = common::guest_elf();
    let good = f.idle_guest_config();
    let mut cases: Vec<(Vec<u8>, &str)> = vec![
        (b"{".to_vec(), "JSON"),
        (b"[]".to_vec(), "invalid"),
        (b"{}".to_vec(), "payload"),
        (body(&json!({"payload": {}})), "kernel"),
        (
            body(&json!({"payload": {"kernel": elf, "firmware": "/fw"}})),
            "firmware",
        ),
        (
            body(&json!({"payload": {"kernel": elf}, "net": [{"tap": "tap0"}]})),
            "net",
        ),
        (
            body(&json!({"payload": {"kernel": elf}, "disks": [{"path": "/a", "direct": true}]})),
            "direct",
        ),
        (body(&json!({"payload": {"kernel": elf}, "rng": {}})), "src"),
        (
            body(&json!({"payload": {"kernel": elf}, "cpus": {"boot_vcpus": 0}})),
            "boot_vcpus=0",
        ),
        (
            body(&json!({"payload": {"kernel": elf}, "cpus": {"boot_vcpus": 2, "max_vcpus": 1}})),
            "max_vcpus=1",
        ),
        (
            body(&json!({"payload": {"kernel": elf}, "cpus": {"boot_vcpus": 999}})),
            "999",
        ),
        (
            body(&json!({"payload": {"kernel": elf}, "memory": {"size": 4095}})),
            "4095",
        ),
        (
            body(
                &json!({"payload": {"kernel": elf}, "memory": {"size": 1 << 30, "mergeable": true}}),
            ),
            "mergeable",
        ),
        (
            body(&json!({"payload": {"kernel": elf}, "serial": {"mode": "Pty"}})),
            "Pty",
        ),
        (
            body(&json!({"payload": {"kernel": elf}, "serial": {"mode": "File"}})),
            "file",
        ),
        (
            body(&json!({"payload": {"kernel": elf}, "iommu": "yes"})),
            "yes",
        ),
    ];
    for (b, needle) in cases.drain(..) {
        let msg = f.error("PUT", "vm.create", Some(&b), 400);
        assert!(
            msg.contains(needle),
            "{}: {msg:?} does not name {needle:?}",
            String::from_utf8_lossy(&b)
        );
    }
    assert!(f
        .error("PUT", "vm.create", None, 400)
        .contains("JSON request body"));
    f.get("vm.info", 404);

    f.put_json("vm.create", &good, 204);
    let info = f.get("vm.info", 200).json().unwrap();
    assert_eq!(info["state"], "Created");
    assert_eq!(info["config"]["payload"]["cmdline"], "workload=idle");
    assert_eq!(info["config"]["cpus"]["max_vcpus"], 1);
    assert_eq!(info["memory_actual_size"], 256u64 << 20);
    assert_eq!(info["config"]["disks"], json!([]));
    assert!(info["config"].get("rng").is_none(), "{info}");
    let msg = f.error("PUT", "vm.create", Some(&body(&good)), 405);
    assert!(msg.contains("already exists"), "{msg}");

    // Created: only boot and delete make sense.
    for action in ["vm.pause", "vm.resume", "vm.shutdown", "vm.reboot"] {
        let msg = f.error("PUT", action, None, 405);
        assert!(msg.contains("Created"), "{action}: {msg}");
    }
    f.get("vm.counters", 405);
    f.put_json(
        "vm.send-migration",
        &json!({"destination_url": "tcp:127.0.0.1:6000"}),
        405,
    );
    f.put_json(
        "vm.receive-migration",
        &json!({"receiver_url": "tcp:0.0.0.0:6000"}),
        405,
    );
    f.put("vm.delete", 204);
    f.get("vm.info", 404);
    // Deleting when there is no VM is not an error (cloud-hypervisor answers 204 too).
    f.put("vm.delete", 204);
}

#[test]
fn create_checks_disk_and_rng_files() {
    let f = ApiFerry::start(&[]);
    let missing = f.dir.0.join("missing.raw");
    let odd = f.dir.0.join("odd.raw");
    std::fs::write(&odd, vec![0u8; 1000]).unwrap();
    let with = |disks: Value, rng: Option<Value>| {
        let mut c = f.idle_guest_config();
        c["disks"] = disks;
        if let Some(r) = rng {
            c["rng"] = r;
        }
        c
    };
    for (config, needle) in [
        (
            with(json!([{"path": missing}]), None),
            format!(
                "disk {}: cannot open read-write: No such file or directory",
                missing.display()
            ),
        ),
        (
            with(json!([{"path": missing, "readonly": true}]), None),
            format!("disk {}: cannot open read-only", missing.display()),
        ),
        (
            with(json!([{"path": odd}]), None),
            format!("disk {}: its size, 1000 bytes", odd.display()),
        ),
        (
            with(json!([]), Some(json!({"src": missing}))),
            format!("rng {}: cannot open for reading", missing.display()),
        ),
    ] {
        let msg = f.error("PUT", "vm.create", Some(&body(&config)), 400);
        assert!(msg.contains(&needle), "{msg:?} does not say {needle:?}");
    }
    f.get("vm.info", 404);

    let a = f.dir.0.join("a.raw");
    let b = f.dir.0.join("b.raw");
    for p in [&a, &b] {
        std::fs::File::create(p).unwrap().set_len(1 << 20).unwrap();
    }
    let dup = with(
        json!([{"path": a, "id": "d"}, {"path": b, "id": "d"}]),
        None,
    );
    let msg = f.error("PUT", "vm.create", Some(&body(&dup)), 400);
    assert!(msg.contains("'d'"), "{msg}");

    // The devices are not made yet: only the configuration goes round.
    let good = with(
        json!([{"path": a}, {"path": b, "readonly": true, "id": "data"}]),
        Some(json!({"src": "/dev/urandom"})),
    );
    f.put_json("vm.create", &good, 204);
    let info = f.get("vm.info", 200).json().unwrap();
    assert_eq!(
        info["config"]["disks"],
        json!([
            {"path": a, "readonly": false},
            {"path": b, "readonly": true, "id": "data"},
        ])
    );
    assert_eq!(info["config"]["rng"], json!({"src": "/dev/urandom"}));

    // cloud-hypervisor's per-device iommu: refused when not a boolean, reported when on.
    f.put("vm.delete", 204);
    for (config, needle) in [
        (with(json!([{"path": a, "iommu": "on"}]), None), "\"on\""),
        (
            with(json!([]), Some(json!({"src": "/dev/urandom", "iommu": 1}))),
            "boolean",
        ),
    ] {
        let msg = f.error("PUT", "vm.create", Some(&body(&config)), 400);
        assert!(msg.contains(needle), "{msg:?} does not say {needle:?}");
    }
    let iommu = with(
        json!([{"path": a, "iommu": true}, {"path": b, "iommu": false}]),
        Some(json!({"src": "/dev/urandom", "iommu": true})),
    );
    f.put_json("vm.create", &iommu, 204);
    let info = f.get("vm.info", 200).json().unwrap();
    assert_eq!(
        info["config"]["disks"],
        json!([
            {"path": a, "readonly": false, "iommu": true},
            {"path": b, "readonly": false},
        ])
    );
    assert_eq!(
        info["config"]["rng"],
        json!({"src": "/dev/urandom", "iommu": true})
    );
}

#[test]
fn lifecycle_of_the_test_guest() {
    let mut f = ApiFerry::start(&[]);
    f.put_json("vm.create", &f.idle_guest_config(), 204);
    f.put("vm.boot", 204);
    assert_eq!(f.state(), "Running");
    f.wait_serial("guest: ready", 1, BOOT_TIMEOUT);

    let c = f.counters();
    assert!(c["serial"]["out_bytes"].as_u64().unwrap() > 0, "{c}");
    assert!(c["vcpu_exits"]["io_out"].as_u64().unwrap() > 0, "{c}");
    for k in [
        "ring_harvests",
        "ring_full_exits",
        "ring_overflows",
        "ring_reset_retries",
        "ring_retaken",
        "ring_skipped",
        "ring_steps",
        "bitmap_reads",
    ] {
        assert!(c["dirty_tracking"][k].is_u64(), "{k} missing: {c}");
    }

    assert!(f.error("PUT", "vm.boot", None, 405).contains("Running"));
    f.put("vm.resume", 405);
    // Pausing parks the (one) vCPU outside KVM_RUN, once.
    let parks = |f: &ApiFerry| f.counters()["vcpu_exits"]["parks"].as_u64().unwrap();
    let before = parks(&f);
    f.put("vm.pause", 204);
    assert_eq!(f.state(), "Paused");
    let paused = parks(&f);
    assert_eq!(paused, before + 1);
    assert!(f.error("PUT", "vm.pause", None, 405).contains("Paused"));
    f.put("vm.boot", 405);
    assert_eq!(parks(&f), paused, "a refused pause/boot parks nobody");
    f.put("vm.resume", 204);
    assert_eq!(f.state(), "Running");

    f.put("vm.reboot", 204);
    assert_eq!(f.state(), "Running");
    f.wait_serial("guest: ready", 2, BOOT_TIMEOUT);

    f.put("vm.shutdown", 204);
    assert_eq!(f.state(), "Shutdown");
    let c = f.counters();
    assert!(
        c["serial"]["out_bytes"].as_u64().unwrap() > 0,
        "counters survive: {c}"
    );
    for action in ["vm.shutdown", "vm.pause", "vm.resume", "vm.reboot"] {
        let msg = f.error("PUT", action, None, 405);
        assert!(msg.contains("Shutdown"), "{action}: {msg}");
    }
    f.put("vm.boot", 204);
    f.wait_serial("guest: ready", 3, BOOT_TIMEOUT);
    f.put("vm.pause", 204);
    f.put("vm.shutdown", 204);
    f.put("vm.boot", 204);
    f.put("vm.delete", 204);
    f.get("vm.info", 404);

    // A body where none belongs is ignored and the action taken, as cloud-hypervisor does.
    f.put_json("vm.create", &f.idle_guest_config(), 204);
    f.put_json("vm.boot", &json!({"ignored": true}), 204);
    assert_eq!(f.state(), "Running");

    f.put("vmm.shutdown", 204);
    let (code, out) = f.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(0), "{out}");
    assert!(!f.sock.exists(), "the socket is removed at exit");
}

#[test]
fn boot_failure_answers_500_and_keeps_the_vm() {
    let f = ApiFerry::start(&[]);
    let missing = f.dir.0.join("no-such-kernel");
    f.put_json("vm.create", &f.config(&missing, ""), 204);
    let msg = f.error("PUT", "vm.boot", None, 500);
    assert!(msg.contains(missing.to_str().unwrap()), "{msg}");
    assert_eq!(f.state(), "Created");
    // Still serving, and the VM can be replaced.
    f.put("vm.delete", 204);
    f.put_json("vm.create", &f.idle_guest_config(), 204);
    f.put("vm.boot", 204);
    assert_eq!(f.state(), "Running");
}

/// `vm.migration-info` once the migration has ended (within 30 s).
fn migration_outcome(f: &ApiFerry) -> Value {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let info = f.get("vm.migration-info", 200).json().unwrap();
        if ["completed", "failed", "cancelled"].contains(&info["status"].as_str().unwrap_or("")) {
            return info;
        }
        assert!(Instant::now() < end, "the migration never ended: {info}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn migration_requests_are_checked_then_refused() {
    let f = ApiFerry::start(&[]);
    f.put_json("vm.create", &f.idle_guest_config(), 204);
    f.put("vm.boot", 204);
    for (b, needle) in [
        (json!({}), "destination_url"),
        (
            json!({"destination_url": "tcp:h:1", "connections": 0}),
            "connections=0",
        ),
        (
            json!({"destination_url": "tcp:h:1", "connections": 129}),
            "connections=129",
        ),
        (
            json!({"destination_url": "tcp:h:1", "downtime_ms": 0}),
            "downtime_ms=0",
        ),
        (
            json!({"destination_url": "tcp:h:1", "timeout_s": 0}),
            "timeout_s=0",
        ),
        (
            json!({"destination_url": "tcp:h:1", "timeout_strategy": "Maybe"}),
            "Maybe",
        ),
        (
            json!({"destination_url": "tcp:h:1", "memory_mode": "Teleport"}),
            "Teleport",
        ),
        (
            json!({"destination_url": "tcp:h:1", "tls_dir": "/etc"}),
            "tls_dir",
        ),
        (
            json!({"destination_url": "tcp:h:1", "local": true}),
            "unix:",
        ),
        (
            json!({"destination_url": "unix:/s", "connections": 2}),
            "connections=2",
        ),
        (
            json!({"destination_url": "carrier-pigeon"}),
            "carrier-pigeon",
        ),
    ] {
        let msg = f.error("PUT", "vm.send-migration", Some(&body(&b)), 400);
        assert!(msg.contains(needle), "{b}: {msg}");
    }
    assert!(f
        .error("PUT", "vm.send-migration", None, 400)
        .contains("JSON request body"));
    // Valid bodies: nobody listens at these addresses, so the migration fails at once.
    for b in [
        json!({"destination_url": "tcp:127.0.0.1:1", "wait_for_completion": true}),
        json!({"destination_url": "tcp:[::1]:1", "downtime_ms": 50, "timeout_s": 10,
               "timeout_strategy": "Ignore", "connections": 16, "memory_mode": "Precopy",
               "wait_for_completion": true}),
    ] {
        let msg = f.error("PUT", "vm.send-migration", Some(&body(&b)), 500);
        assert!(msg.contains("cannot connect"), "{b}: {msg}");
    }
    // Not waited for (the default): 204 once started; the failure, with the reason the
    // 500 above gave word for word, is in vm.migration-info, and the VM runs on.
    let refused = json!({"destination_url": "tcp:127.0.0.1:1"});
    f.put_json("vm.send-migration", &refused, 204);
    let info = migration_outcome(&f);
    assert_eq!(info["status"], "failed", "{info}");
    let why = info["error-desc"].as_str().unwrap_or_default();
    let mut waited = refused.clone();
    waited["wait_for_completion"] = json!(true);
    let msg = f.error("PUT", "vm.send-migration", Some(&body(&waited)), 500);
    assert_eq!(msg, format!("vm.send-migration failed: {why}"), "{info}");
    assert_eq!(f.state(), "Running");
    for (b, needle) in [
        (
            json!({"destination_url": "unix:/tmp/m.sock", "local": true}),
            "--memory shared=on",
        ),
        (
            json!({"destination_url": "unix:/tmp/m.sock", "memory_mode": "MemFDs"}),
            "--memory shared=on",
        ),
        (
            json!({"destination_url": "tcp:127.0.0.1:1", "memory_mode": "Precopy",
                   "postcopy_after_passes": 1}),
            "needs memory_mode Postcopy",
        ),
    ] {
        let msg = f.error("PUT", "vm.send-migration", Some(&body(&b)), 400);
        assert!(msg.contains(needle), "{b}: {msg}");
    }
    // The refused migration left the VM as it was.
    assert_eq!(f.state(), "Running");
    f.put("vm.pause", 204);
    f.put_json(
        "vm.send-migration",
        &json!({"destination_url": "unix:/m", "wait_for_completion": true}),
        500,
    );
    assert_eq!(
        f.state(),
        "Paused",
        "a failed migration leaves a paused VM paused"
    );

    for (b, needle) in [
        (json!({}), "receiver_url"),
        (json!({"receiver_url": "tcp:nohost"}), "tcp:nohost"),
        (
            json!({"receiver_url": "unix:/s", "zone_updates": [{"id": "z0"}]}),
            "zone_updates",
        ),
    ] {
        let msg = f.error("PUT", "vm.receive-migration", Some(&body(&b)), 400);
        assert!(msg.contains(needle), "{b}: {msg}");
    }
    let msg = f.error(
        "PUT",
        "vm.receive-migration",
        Some(&body(&json!({"receiver_url": "tcp:0.0.0.0:6000"}))),
        405,
    );
    assert!(msg.contains("already exists"), "{msg}");
    // The failed attempts are on record; none is in progress.
    f.get("vm.migration-info", 200);
    f.put("vm.cancel-migration", 404);
    // A body is ignored: still nothing to cancel.
    f.error("PUT", "vm.cancel-migration", Some(b"{}"), 404);
}

#[test]
fn guest_power_off_and_reset_leave_the_vm_shut_down() {
    let f = ApiFerry::start(&[]);
    for (name, code) in [("poweroff", code::POWER_OFF), ("reset", code::RESET)] {
        let elf = tiny_pvh_elf(&f.dir.0, name, code);
        f.put_json("vm.create", &f.config(&elf, ""), 204);
        f.put("vm.boot", 204);
        let end = Instant::now() + BOOT_TIMEOUT;
        while f.state() != "Shutdown" {
            assert!(Instant::now() < end, "{name}: the VM never shut down");
            std::thread::sleep(Duration::from_millis(20));
        }
        // The VMM lives on, and the VM can boot again.
        let c = f.counters();
        assert!(
            c["vcpu_exits"]["io_out"].as_u64().unwrap() >= 1,
            "{name}: {c}"
        );
        f.put("vm.boot", 204);
        f.put("vm.delete", 204);
    }
    f.get("vmm.ping", 200);
}

#[test]
fn guest_debug_exit_ends_the_process_with_its_status() {
    let mut f = ApiFerry::start(&[]);
    let elf = tiny_pvh_elf(&f.dir.0, "exit7", &code::debug_exit(7));
    f.put_json("vm.create", &f.config(&elf, ""), 204);
    f.put("vm.boot", 204);
    let (code, out) = f.wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(7), "{out}");
    assert!(!f.sock.exists(), "the socket is removed at exit");

    // The test guest's own failure status (a refused argument) too.
    let mut f = ApiFerry::start(&[]);
    f.put_json(
        "vm.create",
        &f.config(&common::guest_elf(), "workload=idle passes=many"),
        204,
    );
    f.put("vm.boot", 204);
    let (code, out) = f.wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(1), "{out}");
    assert!(f.serial().contains("passes"), "{}", f.serial());
}

#[test]
fn kernel_flag_boots_at_start_and_the_api_serves_it() {
    let dir = TempDir::new("flags");
    let serial = dir.0.join("serial.log");
    let elf = common::guest_elf();
    let f = ApiFerry::start(&[
        "--kernel",
        elf.to_str().unwrap(),
        "--cmdline",
        "workload=idle",
        "--memory",
        "size=256M",
        "--serial",
        &format!("file={}", serial.display()),
    ]);
    assert_eq!(f.state(), "Running");
    let info = f.get("vm.info", 200).json().unwrap();
    assert_eq!(info["config"]["payload"]["kernel"], elf.to_str().unwrap());
    f.put("vm.pause", 204);
    f.put("vm.resume", 204);
    f.put_json("vm.create", &f.idle_guest_config(), 405);
}

#[test]
fn socket_in_use_and_stale_socket() {
    let f = ApiFerry::start(&[]);
    // A second ferry on a live socket refuses to start.
    let out = Command::new(common::ferry_bin())
        .args(["--api-socket", f.sock.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("another process") && err.contains(f.sock.to_str().unwrap()),
        "{err}"
    );
    f.get("vmm.ping", 200);

    // A socket file nobody listens on is replaced.
    let dir = TempDir::new("stale");
    let stale = dir.0.join("api.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let mut g = common::Ferry::spawn(&["--api-socket", stale.to_str().unwrap()]);
    g.expect_line("API server listening", Duration::from_secs(10));
    let c = vmm::api::client::Client::new(&stale, Some(Duration::from_secs(5)));
    assert_eq!(c.get("vmm.ping").unwrap().status, 200);

    // A regular file is not replaced.
    let plain = dir.0.join("plain");
    std::fs::write(&plain, b"keep me").unwrap();
    let out = Command::new(common::ferry_bin())
        .args(["--api-socket", plain.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a socket"));
    assert_eq!(std::fs::read(&plain).unwrap(), b"keep me");
}

#[test]
fn a_long_request_does_not_block_others() {
    let f = ApiFerry::start(&[]);
    f.put_json("vm.create", &f.idle_guest_config(), 204);
    f.put("vm.boot", 204);
    // A request whose body is slow to come occupies its connection thread...
    let mut slow = f.client.connect().unwrap();
    use std::io::Write;
    slow.write_all(b"PUT /api/v1/vm.send-migration HTTP/1.1\r\nContent-Length: 40\r\n\r\n{\"dest")
        .unwrap();
    // ...while others are answered at once.
    let t = Instant::now();
    for _ in 0..20 {
        f.get("vm.info", 200);
        f.get("vm.counters", 200);
    }
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    drop(slow);
    f.get("vmm.ping", 200);
}

#[test]
fn coredump_of_a_paused_vm() {
    let f = ApiFerry::start(&[]);
    let core = f.dir.0.join("vm.core");
    let url = format!("file://{}", core.display());
    let good = json!({ "destination_url": url });
    assert!(f
        .error("PUT", "vm.coredump", Some(&body(&good)), 404)
        .contains("no VM"));
    f.put_json("vm.create", &f.idle_guest_config(), 204);
    assert!(f
        .error("PUT", "vm.coredump", Some(&body(&good)), 405)
        .contains("Created"));
    f.put("vm.boot", 204);
    f.wait_serial("guest: ready", 1, BOOT_TIMEOUT);

    // Bad bodies and URLs are refused whatever the state, naming what is wrong.
    for (b, needle) in [
        (json!({}), "destination_url"),
        (json!({"destination_url": 7}), "invalid"),
        (
            json!({"destination_url": url, "compress": true}),
            "compress",
        ),
        (
            json!({"destination_url": "tcp:127.0.0.1:7000"}),
            "\"tcp:127.0.0.1:7000\"",
        ),
        (
            json!({"destination_url": "/tmp/vm.core"}),
            "\"/tmp/vm.core\"",
        ),
        (
            json!({"destination_url": "file://host/vm.core"}),
            "\"file://host/vm.core\"",
        ),
        (json!({"destination_url": "file:///tmp/"}), "directory"),
    ] {
        let msg = f.error("PUT", "vm.coredump", Some(&body(&b)), 400);
        assert!(msg.contains(needle), "{b}: {msg}");
    }
    assert!(f
        .error("PUT", "vm.coredump", None, 400)
        .contains("JSON request body"));
    // Running: refused like the other wrong-state actions, and nothing is written.
    let msg = f.error("PUT", "vm.coredump", Some(&body(&good)), 405);
    assert!(
        msg.contains("vm.coredump") && msg.contains("Running"),
        "{msg}"
    );
    assert!(!core.exists());

    f.put("vm.pause", 204);
    f.put_json("vm.coredump", &good, 204);
    assert_eq!(f.state(), "Paused", "the VM stays paused");
    let c = vmm::coredump::CoreFile::open(&core).unwrap();
    assert_eq!(c.ram_bytes(), 256 << 20, "{:?}", c.loads);
    assert!(c
        .loads
        .iter()
        .all(|l| l.filesz == l.memsz && l.vaddr == l.gpa));
    assert_eq!(c.loads[0].gpa, 0);
    // The memory is the guest's: the command line the VMM put there is in low RAM, and
    // the one vCPU's registers are in a note.
    let mut low = vec![0u8; 1 << 20];
    c.read_at(0, &mut low).unwrap();
    assert!(low.windows(13).any(|w| w == b"workload=idle"));
    let pr = c.prstatus();
    assert_eq!(pr.len(), 1);
    assert_eq!(pr[0].0, 1, "pr_pid is the vCPU index + 1");
    assert_ne!(pr[0].1[vmm::coredump::PR_REG_RIP], 0, "rip");

    // A file that cannot be created: a 500 naming the path; nothing is left behind, the
    // VM is still paused.
    let missing = f.dir.0.join("no-such-dir/vm.core");
    let msg = f.error(
        "PUT",
        "vm.coredump",
        Some(&body(
            &json!({"destination_url": format!("file://{}", missing.display())}),
        )),
        500,
    );
    assert!(msg.contains(missing.to_str().unwrap()), "{msg}");
    assert_eq!(f.state(), "Paused");
    let leftovers: Vec<_> = std::fs::read_dir(&f.dir.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // ferry-remote writes one too; then the guest goes on.
    let other = f.dir.0.join("other.core");
    let (code, _, err) = remote(
        &f.sock,
        &["coredump", &format!("file://{}", other.display())],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        vmm::coredump::CoreFile::open(&other).unwrap().ram_bytes(),
        256 << 20
    );
    let (code, _, err) = remote(&f.sock, &["coredump", "unix:/x"]);
    assert_eq!(code, 1);
    assert!(err.contains("unix:/x") && err.contains("HTTP 400"), "{err}");
    f.put("vm.resume", 204);
    assert_eq!(f.state(), "Running");
}

// ---- ferry-remote ----

fn remote(sock: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry-remote"))
        .arg("--api-socket")
        .arg(sock)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn ferry_remote_commands() {
    let mut f = ApiFerry::start(&[]);
    let s = f.sock.clone();
    let ok = |args: &[&str]| {
        let (code, out, err) = remote(&s, args);
        assert_eq!(code, 0, "{args:?}: {err}");
        assert!(err.is_empty(), "{args:?}: {err}");
        out
    };
    let fails = |args: &[&str], needle: &str| {
        let (code, out, err) = remote(&s, args);
        assert_eq!(code, 1, "{args:?}: {out} {err}");
        let line = err.trim();
        assert!(line.starts_with("ferry-remote: error: "), "{args:?}: {err}");
        assert!(line.contains(needle), "{args:?}: {err} lacks {needle:?}");
        assert_eq!(line.lines().count(), 1, "{err}");
    };

    let ping: Value = serde_json::from_str(&ok(&["ping"])).unwrap();
    assert_eq!(ping["version"], env!("CARGO_PKG_VERSION"));
    fails(
        &["info"],
        "no VM has been created (PUT /api/v1/vm.create first) (HTTP 404)",
    );
    fails(&["counters"], "HTTP 404");
    fails(&["boot"], "no VM");

    let cfg = f.dir.0.join("vm.json");
    std::fs::write(&cfg, f.idle_guest_config().to_string()).unwrap();
    let bad = f.dir.0.join("bad.json");
    std::fs::write(
        &bad,
        r#"{"payload":{"kernel":"/k"},"net":[{"tap":"tap0"}]}"#,
    )
    .unwrap();
    fails(&["create", bad.to_str().unwrap()], "net");
    fails(&["create", "/no/such/file.json"], "/no/such/file.json");
    assert_eq!(ok(&["create", cfg.to_str().unwrap()]), "");
    let info: Value = serde_json::from_str(&ok(&["info"])).unwrap();
    assert_eq!(info["state"], "Created");
    ok(&["boot"]);
    f.wait_serial("guest: ready", 1, BOOT_TIMEOUT);
    let counters: Value = serde_json::from_str(&ok(&["counters"])).unwrap();
    assert!(counters["serial"]["out_bytes"].as_u64().unwrap() > 0);
    ok(&["pause"]);
    fails(&["pause"], "Paused");
    ok(&["resume"]);
    ok(&["reboot"]);
    fails(
        &["send-migration", "tcp:127.0.0.1:6000", "--connections", "0"],
        "connections=0",
    );
    fails(
        &["send-migration", "tcp:127.0.0.1:6000", "--local"],
        "unix:",
    );
    fails(
        &[
            "send-migration",
            "unix:/tmp/m.sock",
            "--local",
            "--downtime-ms",
            "100",
            "--timeout-s",
            "60",
        ],
        "--memory shared=on",
    );
    fails(&["receive-migration", "tcp:0.0.0.0:6000"], "already exists");
    fails(&["migration-info"], "no migration has run");
    fails(&["cancel-migration"], "no migration is in progress");
    // send-migration follows the migration it started to its end: a failure is its
    // error, with the reason migration-info holds; --no-wait returns once it started.
    let (code, _, err) = remote(&s, &["send-migration", "tcp:127.0.0.1:1"]);
    assert_eq!(code, 1, "{err}");
    let info = migration_outcome(&f);
    let why = info["error-desc"].as_str().unwrap_or_default();
    assert!(why.contains("cannot connect"), "{info}");
    assert_eq!(
        err.lines().last(),
        Some(format!("ferry-remote: error: migration failed: {why}").as_str()),
        "{err}"
    );
    assert!(
        err.lines()
            .rev()
            .skip(1)
            .all(|l| !l.contains("ferry-remote")),
        "one error line, after the progress lines: {err}"
    );
    ok(&["send-migration", "tcp:127.0.0.1:1", "--no-wait"]);
    assert_eq!(migration_outcome(&f)["status"], "failed");
    ok(&["shutdown"]);
    let info: Value = serde_json::from_str(&ok(&["info"])).unwrap();
    assert_eq!(info["state"], "Shutdown");
    ok(&["delete"]);
    ok(&["delete"]);

    // Usage errors come from the argument parser (status 2).
    let (code, _, err) = remote(&s, &["frobnicate"]);
    assert_eq!(code, 2, "{err}");
    ok(&["shutdown-vmm"]);
    let (code, out) = f.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(0), "{out}");
    fails(&["ping"], "cannot connect");
}

// ---- the migration seam: a long request does not block the others ----

/// cloud-hypervisor's `--log-file` and `-v`: the log goes to the file, at debug level
/// with one `-v`, and not to standard error; a file that cannot be opened is named.
#[test]
fn log_file_and_verbosity() {
    let dir = TempDir::new("logfile");
    let log = dir.0.join("ferry.log");
    let mut f = ApiFerry::start(&["--log-file", log.to_str().unwrap(), "-v"]);
    // Ignored, and said so at debug level.
    f.error("PUT", "vm.boot", Some(b"{}"), 404);
    f.put("vmm.shutdown", 204);
    let (code, out) = f.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(0), "{out}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("DEBUG") && text.contains("vm.boot: ignoring a 2-byte request body"),
        "{text}"
    );
    assert!(
        !out.contains("ignoring a 2-byte"),
        "the log also went to stderr:\n{out}"
    );
    let bad = std::process::Command::new(common::ferry_bin())
        .args(["--log-file", "/nonexistent-ferry-dir/ferry.log"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("/nonexistent-ferry-dir/ferry.log"));
}

/// `vm.nmi` (cloud-hypervisor's endpoint): every vCPU takes an NMI (the test guest prints a
/// line per CPU and goes on); a paused VM takes it when it resumes; no VM: 404.
#[test]
fn nmi_reaches_every_vcpu() {
    let f = ApiFerry::start(&[]);
    f.put("vm.nmi", 404);
    let mut config = f.idle_guest_config();
    config["cpus"] = json!({"boot_vcpus": 2, "max_vcpus": 2});
    f.put_json("vm.create", &config, 204);
    f.put("vm.nmi", 405);
    f.put("vm.boot", 204);
    f.wait_serial("guest: ready", 1, BOOT_TIMEOUT);
    // Until both vCPUs halt, a CPU may be mid-line when its NMI comes, and the guest's
    // handler then prints over that line: wait for the boot lines to end.
    let end = Instant::now() + BOOT_TIMEOUT;
    let mut last = f.serial();
    loop {
        std::thread::sleep(Duration::from_millis(700));
        let now = f.serial();
        if now == last {
            break;
        }
        assert!(
            Instant::now() < end,
            "the idle guest never went quiet:\n{now}"
        );
        last = now;
    }
    f.put("vm.nmi", 204);
    f.wait_serial("guest: NMI on apic_id 0 ", 1, BOOT_TIMEOUT);
    f.wait_serial("guest: NMI on apic_id 1 ", 1, BOOT_TIMEOUT);
    f.put("vm.pause", 204);
    f.put("vm.nmi", 204);
    std::thread::sleep(Duration::from_millis(200));
    let paused = f.serial().matches("guest: NMI").count();
    assert_eq!(paused, 2, "a paused guest took an NMI:\n{}", f.serial());
    f.put("vm.resume", 204);
    f.wait_serial("guest: NMI", 4, BOOT_TIMEOUT);
    assert_eq!(f.state(), "Running");
    assert!(!f.serial().contains("FAIL"), "{}", f.serial());
}

/// One request the way cloud-hypervisor's `ch-remote` (its `api_client` crate) makes it —
/// no Content-Type, `Accept: */*`, a Content-Length only with a body — on a connection of
/// its own, and the answer read by that client's rules: the status code is everything
/// between `HTTP/1.1 ` and the line end, trimmed; the body is `Content-Length` bytes after
/// the head, none without that header. Returns (code, body).
fn ch_client_request(
    sock: &std::path::Path,
    method: &str,
    command: &str,
    body: Option<&str>,
) -> (u16, Option<String>) {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req =
        format!("{method} /api/v1/{command} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n");
    if let Some(b) = body {
        req.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    req.push_str("\r\n");
    req.push_str(body.unwrap_or_default());
    s.write_all(req.as_bytes()).unwrap();
    let mut res = String::new();
    let (mut head_end, mut length) = (None, None);
    loop {
        let mut buf = [0u8; 256];
        let n = s.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        res.push_str(std::str::from_utf8(&buf[..n]).unwrap());
        if let Some(o) = res.find("\r\n\r\n") {
            head_end = Some(o + 4);
            length = res.find("Content-Length: ").map(|o| {
                let v = &res[o + 16..o + res[o..].find('\r').unwrap()];
                v.trim()
                    .parse::<usize>()
                    .expect("Content-Length as a number")
            });
            match length {
                None => break,
                Some(l) if res.len() >= o + 4 + l => break,
                _ => {}
            }
        }
    }
    let o = res.find("HTTP/1.1").expect("a status line");
    let code = res[o + 9..o + res[o..].find('\r').unwrap()]
        .trim()
        .parse::<u16>()
        .unwrap_or_else(|e| panic!("cloud-hypervisor's client cannot read {res:?}: {e}"));
    let body = length.and(head_end.map(|h| res[h..].to_string()));
    (code, body)
}

#[test]
fn cloud_hypervisor_client_reads_every_answer() {
    let f = ApiFerry::start(&[]);
    let sock = f.sock.clone();
    let ch = |method: &str, command: &str, body: Option<&str>, want: u16| {
        let (code, body) = ch_client_request(&sock, method, command, body);
        assert_eq!(code, want, "{method} {command}: {body:?}");
        body
    };
    let ping: Value = serde_json::from_str(&ch("GET", "vmm.ping", None, 200).unwrap()).unwrap();
    assert!(ping["version"].is_string(), "{ping}");
    // An error, in cloud-hypervisor's shape: messages as an array of strings.
    let err: Value = serde_json::from_str(&ch("GET", "vm.info", None, 404).unwrap()).unwrap();
    assert!(
        err.as_array()
            .is_some_and(|a| !a.is_empty() && a.iter().all(Value::is_string)),
        "{err}"
    );
    let config = f.idle_guest_config().to_string();
    assert_eq!(ch("PUT", "vm.create", Some(&config), 204), None);
    ch("PUT", "vm.boot", None, 204);
    let info: Value = serde_json::from_str(&ch("GET", "vm.info", None, 200).unwrap()).unwrap();
    assert_eq!(info["state"], "Running");
    ch("PUT", "vm.pause", None, 204);
    ch("PUT", "vm.resume", None, 204);
    ch("GET", "vm.counters", None, 200);
    let err = ch("PUT", "vm.boot", None, 405).unwrap();
    assert!(err.starts_with("[\""), "{err}");
    ch("PUT", "vm.delete", None, 204);
    ch("PUT", "vm.delete", None, 204);
}

mod seam {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Condvar, Mutex};
    use std::time::{Duration, Instant};

    use serde_json::{json, Value};
    use vmm::api::client::Client;
    use vmm::api::migration::{MigrationHandler, ReceiveMigration, SendMigration};
    use vmm::api::{ApiError, ApiServer, VmState, Vmm};

    use crate::api_util::{check_reply, TempDir};
    use crate::common;

    /// A receive that lasts until cancelled.
    #[derive(Default)]
    struct UntilCancelled {
        receiving: AtomicBool,
        cancelled: Mutex<bool>,
        cv: Condvar,
    }

    impl MigrationHandler for UntilCancelled {
        fn send(&self, _: &Arc<Vmm>, _: SendMigration) -> Result<(), ApiError> {
            Err(ApiError::NotFound("no sending here".into()))
        }

        fn receive(&self, _: &Arc<Vmm>, r: ReceiveMigration) -> Result<(), ApiError> {
            self.receiving.store(true, Ordering::SeqCst);
            let mut c = self.cancelled.lock().unwrap();
            let end = Instant::now() + Duration::from_secs(30);
            while !*c && Instant::now() < end {
                c = self
                    .cv
                    .wait_timeout(c, Duration::from_millis(100))
                    .unwrap()
                    .0;
            }
            self.receiving.store(false, Ordering::SeqCst);
            Err(ApiError::Failed {
                action: "vm.receive-migration",
                reason: format!("cancelled while waiting on {}", r.receiver_url),
            })
        }

        fn info(&self, _: &Arc<Vmm>) -> Result<Value, ApiError> {
            Ok(
                json!({"state": if self.receiving.load(Ordering::SeqCst) { "Receiving" } else { "Idle" }}),
            )
        }

        fn cancel(&self, _: &Arc<Vmm>) -> Result<(), ApiError> {
            *self.cancelled.lock().unwrap() = true;
            self.cv.notify_all();
            Ok(())
        }
    }

    #[test]
    fn a_long_migration_does_not_block_info_counters_or_cancel() {
        let dir = TempDir::new("seam");
        let sock = dir.0.join("api.sock");
        let vmm = Vmm::new(Box::new(UntilCancelled::default()));
        let server = ApiServer::start(&sock, vmm.clone()).unwrap();
        let client = Client::new(&sock, Some(Duration::from_secs(40)));
        let call = |m: &str, ep: &str, body: Option<&str>, status: u16| {
            let r = client.request(m, ep, body.map(str::as_bytes)).unwrap();
            assert_eq!(r.status, status, "{m} {ep}: {}", r.error_message());
            check_reply(m, ep, &r);
            r
        };

        let c2 = client.clone();
        let receiver = std::thread::spawn(move || {
            c2.put(
                "vm.receive-migration",
                Some(br#"{"receiver_url":"tcp:127.0.0.1:1"}"#),
            )
            .unwrap()
        });
        let end = Instant::now() + Duration::from_secs(10);
        while call("GET", "vm.migration-info", None, 200).json().unwrap()["state"] != "Receiving" {
            assert!(Instant::now() < end, "the receive never started");
            std::thread::sleep(Duration::from_millis(10));
        }
        // Everything else answers at once while the receive runs.
        let t = Instant::now();
        call("GET", "vmm.ping", None, 200);
        call("GET", "vm.info", None, 404);
        call("GET", "vm.counters", None, 404);
        let cfg = r#"{"payload":{"kernel":"/k"}}"#;
        let busy = call("PUT", "vm.create", Some(cfg), 405).error_message();
        assert!(
            busy.contains("vm.receive-migration is in progress"),
            "{busy}"
        );
        let twice = r#"{"receiver_url":"unix:/x"}"#;
        call("PUT", "vm.receive-migration", Some(twice), 405);
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert!(!receiver.is_finished());

        call("PUT", "vm.cancel-migration", None, 204);
        let r = receiver.join().unwrap();
        assert_eq!(r.status, 500);
        assert!(r
            .error_message()
            .contains("cancelled while waiting on tcp:127.0.0.1:1"));
        // The operation is over: the VMM takes requests again.
        call("PUT", "vm.create", Some(cfg), 204);
        assert_eq!(
            call("GET", "vm.info", None, 200).json().unwrap()["state"],
            "Created"
        );
        drop(server);
        assert!(!sock.exists());
    }

    #[test]
    fn the_engine_shares_the_machine_and_can_replace_it() {
        let vmm = Vmm::new(Box::new(vmm::api::NotImplemented));
        let config = vmm::api::parse_vm_config(
            json!({"payload": {"kernel": common::guest_elf(), "cmdline": "workload=idle"},
                   "memory": {"size": 256u64 << 20}, "serial": {"mode": "Off"}})
            .to_string()
            .as_bytes(),
        )
        .unwrap();
        assert!(matches!(vmm.machine("test"), Err(ApiError::NoVm)));
        vmm.create(config.clone()).unwrap();
        assert!(matches!(
            vmm.machine("test"),
            Err(ApiError::WrongState { .. })
        ));
        vmm.boot().unwrap();

        // A pause made by the engine on its own Arc shows in vm.info, and vm.resume undoes it.
        let m = vmm.machine("test").unwrap();
        m.pause();
        assert_eq!(vmm.info().unwrap().state, VmState::Paused);
        vmm.resume().unwrap();
        assert!(!m.is_paused());
        assert_eq!(vmm.info().unwrap().state, VmState::Running);

        // The engine takes the machine out (the VM left): Shutdown, counters kept.
        let taken = vmm.with_vm(|vm| vm.unwrap().take_machine()).unwrap();
        assert!(Arc::ptr_eq(&taken, &m));
        assert_eq!(vmm.state(), Some(VmState::Shutdown));
        assert!(vmm.counters().unwrap().contains_key("vcpu_exits"));
        drop(m);
        // ... and installs one (an arriving VM): Running again.
        vmm.delete().unwrap();
        vmm.install(config, taken);
        assert_eq!(vmm.state(), Some(VmState::Running));
        vmm.pause().unwrap();
        assert_eq!(vmm.state(), Some(VmState::Paused));
        vmm.shutdown().unwrap();
        assert_eq!(vmm.state(), Some(VmState::Shutdown));
    }
}
