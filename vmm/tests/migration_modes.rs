//! The two other ways of moving a VM between ferry processes on one host, driven through
//! the REST API: memory over several TCP connections, and `MemFDs` (guest RAM handed over
//! as memfds on a UNIX socket, nothing copied: how ferry itself is upgraded in place).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{wait_serial, Ferry};
use serde_json::{json, Value};
use vmm::api::client::Client;

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ferry-modes-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn start(dir: &Path, name: &str, args: &[&str]) -> (Ferry, Client) {
    common::spawn_with_api(None, dir, name, args)
}

struct Moved {
    dest: Ferry,
    dest_api: Client,
    /// The destination's `vm.migration-info` after the migration.
    info: Value,
    serial: PathBuf,
    /// Serial log offset when the migration started.
    pos: usize,
    dir: PathBuf,
}

/// Boots the `verify` guest (2 vCPUs, over `region` of RAM) in one ferry, moves it to a
/// second one with the `receive` and `send` bodies, and checks that the source exited.
fn move_guest(tag: &str, memory: &str, region: &str, receive: Value, mut send: Value) -> Moved {
    let dir = tmpdir(tag);
    let serial = dir.join("serial.log");
    let (dest, dest_api) = start(&dir, "dest", &[]);
    let recv_api = Client::new(dest_api.path(), Some(Duration::from_secs(300)));
    let body = receive.to_string();
    let receiving = std::thread::spawn(move || {
        recv_api
            .put("vm.receive-migration", Some(body.as_bytes()))
            .unwrap()
    });
    let end = Instant::now() + Duration::from_secs(10);
    while dest_api.get("vm.migration-info").map(|r| r.status).ok() != Some(200) {
        assert!(
            Instant::now() < end,
            "the destination never started listening"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let elf = common::guest_elf();
    let serial_arg = format!("file={}", serial.display());
    let (src, src_api) = start(
        &dir,
        "source",
        &[
            "--kernel",
            elf.to_str().unwrap(),
            "--cmdline",
            &format!("workload=verify start=1M size={region}"),
            "--cpus",
            "boot=2",
            "--memory",
            memory,
            "--serial",
            &serial_arg,
        ],
    );
    let pos = wait_serial(&serial, "guest: verified 1 1", 0, Duration::from_secs(60));
    send["wait_for_completion"] = json!(true);
    let r = match src_api.put("vm.send-migration", Some(send.to_string().as_bytes())) {
        Ok(r) => r,
        Err(e) => {
            let (_, src_out) = src.wait(Duration::from_secs(5));
            let (_, dest_out) = dest.wait(Duration::from_secs(5));
            panic!("send-migration: {e}\n--- source:\n{src_out}\n--- destination:\n{dest_out}");
        }
    };
    assert_eq!(r.status, 204, "send-migration: {}", r.error_message());
    let r = receiving.join().unwrap();
    assert_eq!(r.status, 204, "receive-migration: {}", r.error_message());
    let (code, out) = src.wait(Duration::from_secs(10));
    assert_eq!(code, Some(0), "the source exits after its VM moved:\n{out}");
    let state: Value = dest_api.get("vm.info").unwrap().json().unwrap();
    assert_eq!(state["state"], "Running");
    let info: Value = dest_api.get("vm.migration-info").unwrap().json().unwrap();
    assert_eq!(info["status"], "completed", "{info}");
    let (ms, us) = (info["downtime"].as_u64(), info["downtime-us"].as_u64());
    assert!(
        ms.is_some() && ms == us.map(|us| us.div_ceil(1000)),
        "downtime in ms and in us: {info}"
    );
    eprintln!("{tag}: {info}");
    Moved {
        dest,
        dest_api,
        info,
        serial,
        pos,
        dir,
    }
}

/// The guest goes on at the destination: both vCPUs verify their whole share twice more
/// with nothing lost; then the destination shuts down cleanly. Returns its output.
fn goes_on_cleanly(m: Moved) -> String {
    let mut pos = m.pos;
    for _ in 0..2 {
        for cpu in 0..2 {
            wait_serial(
                &m.serial,
                &format!("guest: verified {cpu} "),
                pos,
                Duration::from_secs(60),
            );
        }
        pos = std::fs::metadata(&m.serial).unwrap().len() as usize;
    }
    let text = std::fs::read_to_string(&m.serial).unwrap();
    assert!(
        !text.contains("MISMATCH") && !text.contains("FAIL"),
        "{text}"
    );
    let r = m.dest_api.put("vmm.shutdown", None).unwrap();
    assert_eq!(r.status, 204, "{}", r.error_message());
    let (code, out) = m.dest.wait(Duration::from_secs(20));
    assert_eq!(code, Some(0), "{out}");
    let _ = std::fs::remove_dir_all(&m.dir);
    out
}

#[test]
fn four_tcp_connections_carry_the_memory_and_lose_nothing() {
    // A free port: bind, read it, release it for the destination.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let m = move_guest(
        "conns",
        "size=512M",
        "128M",
        json!({"receiver_url": format!("tcp:127.0.0.1:{port}")}),
        json!({"destination_url": format!("tcp:127.0.0.1:{port}"), "connections": 4}),
    );
    let sent = m.info["ram"]["transferred"].as_u64().unwrap();
    assert!(sent > 0, "{}", m.info);
    let out = goes_on_cleanly(m);
    assert!(
        out.contains("receiving memory over 4 connections"),
        "the destination used one connection:\n{out}"
    );
}

#[test]
fn memfds_hand_the_guest_ram_to_a_new_ferry_without_copying_it() {
    let dir = tmpdir("memfds-sock");
    let sock = dir.join("migrate.sock");
    let url = format!("unix:{}", sock.display());
    let m = move_guest(
        "memfds",
        "size=512M,shared=on",
        "128M",
        json!({ "receiver_url": url }),
        json!({"destination_url": url, "memory_mode": "MemFDs"}),
    );
    // Only the machine state crossed the socket, not 512 MiB of RAM.
    let sent = m.info["ram"]["transferred"].as_u64().unwrap();
    assert!(sent < 1 << 20, "{} bytes sent", sent);
    assert_eq!(m.info["ram"]["total"], 512u64 << 20);
    goes_on_cleanly(m);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The bodies cloud-hypervisor's `ch-remote` sends for a local migration, every default
/// field included (its `local: true` with `memory_mode: Precopy` is Ferry's `MemFDs`).
#[test]
fn cloud_hypervisor_migration_bodies_move_a_guest() {
    let dir = tmpdir("ch-bodies-sock");
    let sock = dir.join("migrate.sock");
    let url = format!("unix:{}", sock.display());
    let m = move_guest(
        "ch-bodies",
        "size=256M,shared=on",
        "64M",
        json!({
            "receiver_url": url,
            "tls_dir": null,
            "memory_mode": "Precopy",
            "vfio_fds": null,
            "iommufd_fd": null,
            "zone_updates": []
        }),
        json!({
            "destination_url": url,
            "local": true,
            "downtime_ms": 300,
            "timeout_s": 3600,
            "timeout_strategy": "Cancel",
            "connections": 1,
            "preserve_source": false,
            "tls_dir": null
        }),
    );
    let sent = m.info["ram"]["transferred"].as_u64().unwrap();
    assert!(sent < 1 << 20, "RAM went as files: {sent} bytes sent");
    goes_on_cleanly(m);
    let _ = std::fs::remove_dir_all(&dir);
}
