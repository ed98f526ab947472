//! Live migration between two hosts (network namespaces joined by a veth pair), with real
//! `ferry` processes driven through their REST API, as an operator would.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::netns::TwoHosts;
use common::Ferry;
use serde_json::{json, Value};
use vmm::api::client::{Client, Reply};

const PORT: u16 = 7000;

/// A ferry process serving its API on a socket in a directory of the test's own.
struct Host {
    ferry: Option<Ferry>,
    api: Client,
    dir: PathBuf,
}

impl Host {
    fn start(netns: &str, dir: &std::path::Path, name: &str, args: &[&str]) -> Host {
        let sock = dir.join(format!("{name}.sock"));
        let mut all = vec!["--api-socket", sock.to_str().unwrap()];
        all.extend_from_slice(args);
        let mut ferry = Ferry::spawn_in(Some(netns), &all);
        let api = Client::new(&sock, Some(Duration::from_secs(180)));
        let end = Instant::now() + Duration::from_secs(30);
        while api.get("vmm.ping").map(|r| r.status).ok() != Some(200) {
            if let Ok(Some(st)) = ferry.child.try_wait() {
                panic!("{name} ended ({st}) before serving its API");
            }
            assert!(Instant::now() < end, "{name}'s API never answered");
            std::thread::sleep(Duration::from_millis(20));
        }
        Host {
            ferry: Some(ferry),
            api,
            dir: dir.to_path_buf(),
        }
    }

    fn put(&self, endpoint: &str, body: &Value) -> Reply {
        self.api
            .put(endpoint, Some(body.to_string().as_bytes()))
            .unwrap_or_else(|e| panic!("{endpoint}: {e}"))
    }

    fn info(&self) -> Value {
        self.api.get("vm.info").unwrap().json().unwrap()
    }

    /// Waits for the process to end; its exit status.
    fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let f = self.ferry.take().unwrap();
        let (code, out) = f.wait(timeout);
        eprintln!("--- {}\n{out}", self.dir.display());
        code
    }
}

struct Serial(PathBuf);

impl Serial {
    fn text(&self) -> String {
        std::fs::read_to_string(&self.0).unwrap_or_default()
    }

    /// Waits for `pat` after byte `from`; returns the offset just past it.
    fn wait(&self, pat: &str, from: usize, timeout: Duration) -> usize {
        let end = Instant::now() + timeout;
        loop {
            let t = self.text();
            if let Some(p) = t.get(from..).and_then(|s| s.find(pat)) {
                return from + p + pat.len();
            }
            assert!(Instant::now() < end, "no {pat:?} in {timeout:?}:\n{t}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn assert_clean(&self) {
        let t = self.text();
        assert!(!t.contains("MISMATCH") && !t.contains("FAIL"), "{t}");
    }
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ferry-hosts-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Starts a receiving ferry on host `ns` and has it wait on `tcp:0.0.0.0:PORT` (the
/// request blocks until the VM arrived, so it runs on a thread).
fn receiver(ns: &str, dir: &std::path::Path, name: &str) -> (Host, std::thread::JoinHandle<Reply>) {
    let host = Host::start(ns, dir, name, &[]);
    let api = Client::new(host.api.path(), Some(Duration::from_secs(300)));
    let t = std::thread::spawn(move || {
        let body = json!({"receiver_url": format!("tcp:0.0.0.0:{PORT}")});
        api.put("vm.receive-migration", Some(body.to_string().as_bytes()))
            .unwrap()
    });
    // Listening once migration-info reports the incoming migration's setup.
    let end = Instant::now() + Duration::from_secs(10);
    while host.api.get("vm.migration-info").map(|r| r.status).ok() != Some(200) {
        assert!(Instant::now() < end, "{name} never started listening");
        std::thread::sleep(Duration::from_millis(20));
    }
    (host, t)
}

fn source(ns: &str, dir: &std::path::Path, serial: &Serial, cmdline: &str, extra: &[&str]) -> Host {
    let elf = common::guest_elf();
    let serial_arg = format!("file={}", serial.0.display());
    let mut args = vec![
        "--kernel",
        elf.to_str().unwrap(),
        "--cmdline",
        cmdline,
        "--serial",
        &serial_arg,
    ];
    args.extend_from_slice(extra);
    Host::start(ns, dir, "source", &args)
}

fn migrate_between_hosts(tag: u8, cmdline: &str, extra: &[&str]) {
    let hosts = TwoHosts::new(tag);
    let dir = tmpdir(&format!("m{tag}"));
    let serial = Serial(dir.join("serial.log"));
    let (mut dest, receiving) = receiver(&hosts.b, &dir, "dest");
    let mut src = source(&hosts.a, &dir, &serial, cmdline, extra);
    let pos = serial.wait("guest: verified 0 1", 0, Duration::from_secs(60));

    let r = src.put(
        "vm.send-migration",
        &json!({"destination_url": format!("tcp:{}:{PORT}", hosts.addr_b)}),
    );
    assert_eq!(r.status, 204, "send-migration: {}", r.error_message());
    let r = receiving.join().unwrap();
    assert_eq!(r.status, 204, "receive-migration: {}", r.error_message());
    // The source exits once its VM runs on the destination.
    assert_eq!(src.wait_exit(Duration::from_secs(10)), Some(0));
    assert_eq!(dest.info()["state"], "Running");
    let info: Value = dest.api.get("vm.migration-info").unwrap().json().unwrap();
    assert_eq!(info["status"], "completed", "{info}");
    eprintln!("migration: {info}");
    // The guest goes on on B and finishes its passes with nothing lost.
    serial.wait("guest: verified", pos, Duration::from_secs(60));
    serial.wait("guest: PASS", pos, Duration::from_secs(120));
    assert_eq!(dest.wait_exit(Duration::from_secs(20)), Some(0));
    serial.assert_clean();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn verify_guest_2_vcpus_moves_between_hosts_over_tcp_with_rings() {
    migrate_between_hosts(
        1,
        "workload=verify start=1M size=256M rate=65536 passes=20",
        &["--cpus", "boot=2", "--memory", "size=512M"],
    );
}

#[test]
fn verify_guest_1_vcpu_moves_between_hosts_in_bitmap_mode() {
    migrate_between_hosts(
        2,
        "workload=verify start=1M size=256M rate=65536 passes=12",
        &[
            "--cpus",
            "boot=1",
            "--memory",
            "size=512M",
            "--dirty-ring",
            "off",
        ],
    );
}
