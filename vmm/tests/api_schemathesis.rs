//! schemathesis against `docs/api/ferry.yaml`, in negative mode: every request it makes
//! breaks the document (a wrong type, a missing or unknown field, a value out of range, a
//! method the path does not take, ...). Each must get a 4xx — never a 5xx or a dropped
//! connection — with an answer that conforms to the document, and the running VM must
//! come out of it as it went in: still Running with the same config, its guest still
//! making progress, the VMM still answering.
//!
//! schemathesis speaks TCP; a relay in this test forwards 127.0.0.1:PORT to the API's
//! UNIX socket. `scripts/dev_cli.sh tests` installs schemathesis into
//! `target/schemathesis-venv` and sets `FERRY_SCHEMATHESIS` to its `st`; without that
//! variable (or with no such file) the test says so in one line and passes.

mod api_util;
mod common;

use std::io::{self, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use api_util::{ApiFerry, TempDir};

/// Examples per operation and phase: the whole run stays well under a minute.
const MAX_EXAMPLES: u32 = 50;
/// The run is killed past this.
const HARD_LIMIT: Duration = Duration::from_secs(150);
/// Relayed connections open at once, at most (the server takes 64).
const MAX_RELAYED: usize = 16;

/// Forwards TCP connections on 127.0.0.1 to a UNIX socket, one thread per direction of
/// each connection, at most [`MAX_RELAYED`] connections at once (more are closed at once).
struct Relay {
    port: u16,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    refused: Arc<AtomicUsize>,
}

fn pump(mut from: impl io::Read, mut to: impl Write, close: impl FnOnce()) {
    let _ = io::copy(&mut from, &mut to);
    let _ = to.flush();
    close();
}

impl Relay {
    fn start(sock: &Path) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let refused = Arc::new(AtomicUsize::new(0));
        let active = Arc::new(AtomicUsize::new(0));
        let sock = sock.to_path_buf();
        let (stop2, accepted2, refused2) = (stop.clone(), accepted.clone(), refused.clone());
        std::thread::spawn(move || {
            for tcp in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(tcp) = tcp else { continue };
                if active.fetch_add(1, Ordering::SeqCst) >= MAX_RELAYED {
                    active.fetch_sub(1, Ordering::SeqCst);
                    refused2.fetch_add(1, Ordering::SeqCst);
                    continue; // dropped: closed
                }
                accepted2.fetch_add(1, Ordering::SeqCst);
                let unix = match UnixStream::connect(&sock) {
                    Ok(u) => u,
                    Err(_) => {
                        active.fetch_sub(1, Ordering::SeqCst);
                        continue;
                    }
                };
                let (tcp2, unix2) = (tcp.try_clone().unwrap(), unix.try_clone().unwrap());
                let active2 = active.clone();
                std::thread::spawn(move || {
                    let back = std::thread::spawn(move || {
                        pump(&unix2, &tcp2, || {
                            let _ = tcp2.shutdown(Shutdown::Write);
                        })
                    });
                    pump(&tcp, &unix, || {
                        let _ = unix.shutdown(Shutdown::Write);
                    });
                    let _ = back.join();
                    active2.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Relay {
            port,
            stop,
            accepted,
            refused,
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port)); // wakes the accept loop
    }
}

/// Lines of the serial log saying `guest: verified 0 N` (a pass over its 4 MiB, about four
/// a second at rate=4096): the guest's progress.
fn verified_lines(f: &ApiFerry) -> usize {
    f.serial()
        .lines()
        .filter(|l| l.contains("guest: verified 0 "))
        .count()
}

/// Waits until the guest prints another progress line.
fn wait_progress(f: &ApiFerry, timeout: Duration) {
    let before = verified_lines(f);
    let end = Instant::now() + timeout;
    while verified_lines(f) <= before {
        assert!(
            Instant::now() < end,
            "the guest made no progress within {timeout:?}:\n{}",
            f.serial()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn invalid_requests_get_4xx_and_leave_the_vm_as_it_was() {
    let st = match common::tool_from_env("FERRY_SCHEMATHESIS") {
        Ok(p) => p,
        Err(why) => {
            eprintln!("SKIPPED: schemathesis negative run: {why}");
            return;
        }
    };
    let t0 = Instant::now();
    let f = ApiFerry::start(&[]);
    let mut config = f.config(&common::guest_elf(), "workload=verify size=4M rate=4096");
    config["memory"]["size"] = (64u64 << 20).into();
    f.put_json("vm.create", &config, 204);
    f.put("vm.boot", 204);
    f.wait_serial("guest: verified 0 1", 1, Duration::from_secs(60));
    let before = f.get("vm.info", 200).json().unwrap();
    assert_eq!(before["state"], "Running");

    let relay = Relay::start(&f.sock);
    let out = TempDir::new("schemathesis");
    let spec = common::repo_root().join("docs/api/ferry.yaml");
    let log = out.0.join("st.log");
    // The same requests every run, unless FERRY_SCHEMATHESIS_ARGS asks for something else
    // (its flags come last and win, e.g. "--max-examples=300 --seed=1": a longer random run).
    let extra: Vec<String> = match std::env::var("FERRY_SCHEMATHESIS_ARGS") {
        Ok(a) => a.split_whitespace().map(String::from).collect(),
        Err(_) => vec!["--generation-deterministic".into()],
    };
    let mut cmd = Command::new(&st);
    cmd.arg("run")
        .arg(&spec)
        .arg(format!("--url=http://127.0.0.1:{}/api/v1", relay.port))
        .args([
            "--mode=negative",
            "--phases=examples,coverage,fuzzing",
            "--checks=not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance,negative_data_rejection,unsupported_method,allow_header_conformance,missing_required_header",
            "--workers=1",
            "--request-timeout=20",
            "--no-color",
            "--suppress-health-check=all",
        ])
        .arg(format!("--max-examples={MAX_EXAMPLES}"))
        .args(extra)
        .current_dir(&out.0)
        .env_remove("SCHEMATHESIS_HOOKS")
        .env("HOME", &out.0)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(out.0.join("st.err")).unwrap());
    let mut child = cmd.spawn().expect("start schemathesis");
    let end = Instant::now() + HARD_LIMIT;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let text = std::fs::read_to_string(&log).unwrap_or_default()
        + &std::fs::read_to_string(out.0.join("st.err")).unwrap_or_default();
    let took = t0.elapsed();
    let relayed = relay.accepted.load(Ordering::SeqCst);
    let refused = relay.refused.load(Ordering::SeqCst);
    drop(relay);
    eprintln!(
        "schemathesis: {status:?} after {took:?}, {relayed} connections relayed, {refused} refused\n{text}"
    );
    let status = status
        .unwrap_or_else(|| panic!("schemathesis did not finish within {HARD_LIMIT:?} (killed)"));
    assert!(status.success(), "schemathesis found problems ({status})");
    assert_eq!(refused, 0, "the relay refused connections");

    // The VM as it was.
    let after = f.get("vm.info", 200).json().unwrap();
    assert_eq!(after["state"], "Running", "{after}");
    assert_eq!(after["config"], before["config"], "the config changed");
    wait_progress(&f, Duration::from_secs(10));
    assert!(!f.serial().contains("FAIL"), "{}", f.serial());
    let ping = f.get("vmm.ping", 200).json().unwrap();
    assert!(ping["version"].is_string(), "{ping}");
}
