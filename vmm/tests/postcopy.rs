//! Postcopy live migration between two hosts (network namespaces joined by a veth pair
//! whose A side is rate-limited, so that a `verify` guest outruns the link and precopy
//! never converges): the VM moves with pages still on A, runs on B while they stream in
//! or are fetched on demand, and checks every page it wrote.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::dma_hosts::Host;
use common::netns::TwoHosts;
use serde_json::{json, Value};
use vmm::api::client::{Client, Reply};

const PORT: u16 = 7000;

/// What these tests ask of a host beyond the shared [`Host`].
trait HostExt {
    fn get(&self, endpoint: &str) -> Value;
    fn migration_status(&self) -> String;
    fn wait_status(&self, status: &str, timeout: Duration) -> Value;
    /// Waits for the process to end and asserts it ended with 0, its output in the message.
    fn exits_cleanly(&mut self, timeout: Duration);
}

impl HostExt for Host {
    fn get(&self, endpoint: &str) -> Value {
        let r = self
            .api
            .get(endpoint)
            .unwrap_or_else(|e| panic!("{endpoint}: {e}"));
        r.json().unwrap_or(Value::Null)
    }

    fn migration_status(&self) -> String {
        self.get("vm.migration-info")["status"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    /// Waits until `vm.migration-info` says `status`; its whole answer.
    fn wait_status(&self, status: &str, timeout: Duration) -> Value {
        let end = Instant::now() + timeout;
        loop {
            let info = self.get("vm.migration-info");
            if info["status"] == status {
                return info;
            }
            assert!(
                Instant::now() < end,
                "migration-info never said {status} in {timeout:?}; last: {info}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn exits_cleanly(&mut self, timeout: Duration) {
        let (code, out) = self.wait_exit(timeout);
        assert_eq!(code, Some(0), "--- ferry output\n{out}");
    }
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ferry-postcopy-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A ferry on host `ns` waiting for a migration on `tcp:0.0.0.0:PORT` (the request
/// blocks until the migration ended, so it runs on a thread).
fn receiver(ns: &str, dir: &Path) -> (Host, std::thread::JoinHandle<Reply>) {
    let host = Host::start(ns, dir, "dest", &[], &[]);
    let api = Client::new(host.api.path(), Some(Duration::from_secs(300)));
    let t = std::thread::spawn(move || {
        let body = json!({"receiver_url": format!("tcp:0.0.0.0:{PORT}"),
                          "memory_mode": "Postcopy"});
        api.put("vm.receive-migration", Some(body.to_string().as_bytes()))
            .unwrap()
    });
    let end = Instant::now() + Duration::from_secs(10);
    while host.api.get("vm.migration-info").map(|r| r.status).ok() != Some(200) {
        assert!(
            Instant::now() < end,
            "the destination never started listening"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (host, t)
}

/// Two vCPUs rewriting 64 MiB as fast as they can: far more than the link carries.
fn source(ns: &str, dir: &Path, serial: &Path, env: &[(&str, &str)]) -> Host {
    let elf = common::guest_elf();
    let serial_arg = format!("file={}", serial.display());
    let args = [
        "--kernel",
        elf.to_str().unwrap(),
        "--cmdline",
        "workload=verify start=1M size=64M",
        "--cpus",
        "boot=2",
        "--memory",
        "size=256M",
        "--serial",
        &serial_arg,
    ];
    Host::start(ns, dir, "source", &args, env)
}

/// Starts the migration on a thread: precopy without auto-converge (it would never fit
/// 20 ms), postcopy after two passes.
fn send_postcopy(src: &Host, addr_b: &str) -> std::thread::JoinHandle<Reply> {
    send_postcopy_after(src, addr_b, 2)
}

fn send_postcopy_after(src: &Host, addr_b: &str, passes: u32) -> std::thread::JoinHandle<Reply> {
    let api = Client::new(src.api.path(), Some(Duration::from_secs(300)));
    let body = json!({"destination_url": format!("tcp:{addr_b}:{PORT}"),
                      "downtime_ms": 20, "auto_converge": false,
                      "memory_mode": "Postcopy", "postcopy_after_passes": passes,
                      "wait_for_completion": true});
    std::thread::spawn(move || {
        api.put("vm.send-migration", Some(body.to_string().as_bytes()))
            .unwrap()
    })
}

fn join_within<T>(t: std::thread::JoinHandle<T>, timeout: Duration, what: &str) -> T {
    let end = Instant::now() + timeout;
    while !t.is_finished() {
        assert!(
            Instant::now() < end,
            "{what} did not end within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    t.join().unwrap()
}

fn serial_len(serial: &Path) -> usize {
    std::fs::metadata(serial).map_or(0, |m| m.len() as usize)
}

/// Two namespace hosts joined at `mbit` Mbit/s, a fresh directory `name` with the guest's
/// serial log, and a destination on B already receiving.
fn setup(
    tag: u8,
    name: &str,
    mbit: u32,
) -> (
    TwoHosts,
    PathBuf,
    PathBuf,
    Host,
    std::thread::JoinHandle<Reply>,
) {
    let hosts = TwoHosts::new(tag);
    hosts.limit_rate(mbit);
    let dir = tmpdir(name);
    let serial = dir.join("serial.log");
    let (dest, receiving) = receiver(&hosts.b, &dir);
    (hosts, dir, serial, dest, receiving)
}

/// The guest on B asked for pages: postcopy was used.
fn asked_for_pages(info: &Value) {
    assert!(
        info["ram"]["postcopy-requests"]
            .as_u64()
            .is_some_and(|n| n > 0),
        "the guest on B asked for no page: was postcopy used? {info}"
    );
}

/// Every line from here on is B's: each vCPU checks its whole share twice.
fn goes_on_at_b(serial: &Path) {
    let moved_at = serial_len(serial);
    common::verified_twice_more(serial, moved_at, 2, Duration::from_secs(60));
}

/// The guest never converges over a 200 Mbit/s link; after two passes it moves with
/// postcopy, asks for pages it touches, and goes on on B checking every page twice.
#[test]
fn a_guest_that_never_converges_moves_with_postcopy_and_loses_nothing() {
    let (hosts, dir, serial, dest, receiving) = setup(60, "moves", 200);
    let mut src = source(&hosts.a, &dir, &serial, &[]);
    common::wait_serial(&serial, "guest: verified 1 1", 0, Duration::from_secs(60));
    let started = Instant::now();
    let sending = send_postcopy(&src, &hosts.addr_b);
    let r = join_within(sending, Duration::from_secs(120), "send-migration");
    assert_eq!(r.status, 204, "send-migration: {}", r.error_message());
    let took = started.elapsed();
    let rr = join_within(receiving, Duration::from_secs(30), "receive-migration");
    assert_eq!(rr.status, 204, "receive-migration: {}", rr.error_message());
    src.exits_cleanly(Duration::from_secs(10));
    let info = dest.get("vm.migration-info");
    eprintln!("postcopy migration in {took:?}: {info}");
    assert_eq!(info["status"], "completed", "{info}");
    asked_for_pages(&info);
    assert_eq!(dest.get("vm.info")["state"], "Running");
    goes_on_at_b(&serial);
    drop(dest);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The seam leaves one page that was written again after it was sent neither discarded
/// nor sent: B keeps the stale copy, and the guest must catch it.
#[test]
fn a_stale_page_left_on_the_destination_is_caught_by_the_guest() {
    let (hosts, dir, serial, dest, receiving) = setup(61, "stale", 200);
    let src = source(
        &hosts.a,
        &dir,
        &serial,
        &[("FERRY_TEST_POSTCOPY_STALE_FROM", "0x100000")],
    );
    common::wait_serial(&serial, "guest: verified 1 1", 0, Duration::from_secs(60));
    let sending = send_postcopy(&src, &hosts.addr_b);
    let r = join_within(sending, Duration::from_secs(120), "send-migration");
    assert_eq!(r.status, 204, "send-migration: {}", r.error_message());
    let rr = join_within(receiving, Duration::from_secs(30), "receive-migration");
    assert_eq!(rr.status, 204, "receive-migration: {}", rr.error_message());
    // The guest rewrites its whole share every pass: within two passes it reads the page.
    common::wait_serial(&serial, "guest: MISMATCH", 0, Duration::from_secs(120));
    drop((src, dest));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The link dies while pages still stream: neither side runs the VM any more (both say
/// postcopy-paused, refuse vm.resume, and the guest prints nothing); once the link is
/// back, `resume: true` on the source takes the migration up again and the guest goes on
/// on B with nothing lost.
#[test]
fn a_link_cut_during_postcopy_pauses_both_sides_until_the_migration_is_resumed() {
    // Slow enough that the postcopy stream of ~64 MiB takes many seconds.
    let (hosts, dir, serial, dest, receiving) = setup(62, "cut", 40);
    let mut src = source(&hosts.a, &dir, &serial, &[]);
    common::wait_serial(&serial, "guest: verified 1 1", 0, Duration::from_secs(60));
    let sending = send_postcopy(&src, &hosts.addr_b);
    let info = dest.wait_status("postcopy-active", Duration::from_secs(120));
    eprintln!("postcopy running on B: {info}");
    hosts.cut_link();
    let dest_info = dest.wait_status("postcopy-paused", Duration::from_secs(40));
    let src_info = src.wait_status("postcopy-paused", Duration::from_secs(40));
    eprintln!("B: {dest_info}\nA: {src_info}");
    assert!(
        dest_info["error-desc"]
            .as_str()
            .is_some_and(|e| e.contains("pages still at the source")),
        "{dest_info}"
    );
    let r = join_within(sending, Duration::from_secs(30), "send-migration");
    assert_eq!(
        r.status,
        500,
        "send-migration should fail: {}",
        r.error_message()
    );
    // Nobody runs the guest: the serial log stands still.
    std::thread::sleep(Duration::from_secs(1));
    let before = serial_len(&serial);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        serial_len(&serial),
        before,
        "the guest still prints after the link was cut:\n{}",
        std::fs::read_to_string(&serial).unwrap_or_default()
    );
    assert_eq!(
        src.get("vm.info")["state"],
        "Paused",
        "the source must not resume"
    );
    // Neither copy may be resumed by hand, nor the source sent anywhere else. (The
    // destination's VM joins its vm.info only once the receive has ended.)
    let r = src.api.put("vm.resume", None).unwrap();
    assert!(
        r.status >= 400 && r.error_message().contains("postcopy-paused"),
        "vm.resume on the source: {} {}",
        r.status,
        r.error_message()
    );
    let r = dest.api.put("vm.resume", None).unwrap();
    assert!(
        r.status >= 400,
        "vm.resume on the destination: {}",
        r.status
    );
    let plain = json!({"destination_url": format!("tcp:{}:{PORT}", hosts.addr_b)});
    let r = src
        .api
        .put("vm.send-migration", Some(plain.to_string().as_bytes()))
        .unwrap();
    assert_eq!(
        r.status,
        400,
        "a new send while postcopy is paused: {}",
        r.error_message()
    );
    // The link comes back: still nothing runs until the migration is taken up again.
    hosts.mend_link();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(src.migration_status(), "postcopy-paused");
    assert_eq!(dest.migration_status(), "postcopy-paused");
    assert_eq!(serial_len(&serial), before);
    let body = json!({"destination_url": format!("tcp:{}:{PORT}", hosts.addr_b),
                      "resume": true, "wait_for_completion": true});
    let r = src
        .api
        .put("vm.send-migration", Some(body.to_string().as_bytes()))
        .unwrap();
    assert_eq!(r.status, 204, "resume: {}", r.error_message());
    let rr = join_within(receiving, Duration::from_secs(60), "receive-migration");
    assert_eq!(rr.status, 204, "receive-migration: {}", rr.error_message());
    src.exits_cleanly(Duration::from_secs(10));
    let info = dest.get("vm.migration-info");
    eprintln!("after the resume: {info}");
    assert_eq!(info["status"], "completed", "{info}");
    assert_eq!(dest.get("vm.info")["state"], "Running");
    goes_on_at_b(&serial);
    drop(dest);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A plain precopy migration that cannot converge switches when asked
/// (`vm.migrate-start-postcopy`, QMP's `migrate-start-postcopy`).
#[test]
fn a_precopy_migration_switches_to_postcopy_when_asked() {
    let (hosts, dir, serial, dest, receiving) = setup(63, "asked", 200);
    let mut src = source(&hosts.a, &dir, &serial, &[]);
    common::wait_serial(&serial, "guest: verified 1 1", 0, Duration::from_secs(60));
    let api = Client::new(src.api.path(), Some(Duration::from_secs(300)));
    let body = json!({"destination_url": format!("tcp:{}:{PORT}", hosts.addr_b),
                      "downtime_ms": 20, "auto_converge": false, "timeout_s": 300,
                      "wait_for_completion": true});
    let sending = std::thread::spawn(move || {
        api.put("vm.send-migration", Some(body.to_string().as_bytes()))
            .unwrap()
    });
    // Well into precopy (a pass or more done), ask for the switch.
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let info = src.get("vm.migration-info");
        if info["status"] == "active"
            && info["iterations"].as_array().is_some_and(|i| !i.is_empty())
        {
            break;
        }
        assert!(Instant::now() < end, "precopy never made a pass: {info}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = src.api.put("vm.migrate-start-postcopy", None).unwrap();
    assert_eq!(
        r.status,
        204,
        "vm.migrate-start-postcopy: {}",
        r.error_message()
    );
    let r = join_within(sending, Duration::from_secs(120), "send-migration");
    assert_eq!(r.status, 204, "send-migration: {}", r.error_message());
    let rr = join_within(receiving, Duration::from_secs(30), "receive-migration");
    assert_eq!(rr.status, 204, "receive-migration: {}", rr.error_message());
    src.exits_cleanly(Duration::from_secs(10));
    let info = dest.get("vm.migration-info");
    assert_eq!(info["status"], "completed", "{info}");
    asked_for_pages(&info);
    goes_on_at_b(&serial);
    // Nothing to switch any more.
    let r = dest.api.put("vm.migrate-start-postcopy", None).unwrap();
    assert_eq!(r.status, 404, "{}", r.error_message());
    drop(dest);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Postcopy from the start: the VM runs on B before a single page moved (its code and
/// stack included), every page fetched on demand or streamed exactly once.
#[test]
fn a_guest_moves_with_postcopy_from_the_start() {
    let (hosts, dir, serial, dest, receiving) = setup(64, "start", 200);
    let mut src = source(&hosts.a, &dir, &serial, &[]);
    common::wait_serial(&serial, "guest: verified 1 1", 0, Duration::from_secs(60));
    let sending = send_postcopy_after(&src, &hosts.addr_b, 0);
    let r = join_within(sending, Duration::from_secs(120), "send-migration");
    assert_eq!(r.status, 204, "send-migration: {}", r.error_message());
    let rr = join_within(receiving, Duration::from_secs(30), "receive-migration");
    assert_eq!(rr.status, 204, "receive-migration: {}", rr.error_message());
    src.exits_cleanly(Duration::from_secs(10));
    let info = dest.get("vm.migration-info");
    eprintln!("postcopy from the start: {info}");
    assert_eq!(info["status"], "completed", "{info}");
    assert_eq!(
        info["iterations"].as_array().map(Vec::len),
        Some(0),
        "{info}"
    );
    asked_for_pages(&info);
    goes_on_at_b(&serial);
    drop(dest);
    let _ = std::fs::remove_dir_all(&dir);
}
