//! Live migration over TLS with mutual authentication (`tls_dir`): between two namespace
//! hosts with the `verify` guest, and every refusal — wrong CA, a certificate the other
//! side's CA did not sign, no client certificate (a sender's tls_dir without one is
//! refused at the API; a raw rustls client without one is refused by the receiver), a
//! plain-TCP peer, a key others can read, a missing file — with a clear error on both
//! sides and the source VM running on. Over loopback: a peer trickling bytes is dropped
//! at the handshake's deadline, extra connections handshake in any order, a slow reader
//! bounds each write call, and a failed handshake leaves a stream that stays failed.
//! Certificates are made by the `openssl` command into the test's own directory.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::dma_hosts::{Host, Serial};
use common::netns::TwoHosts;
use common::tls_certs::TlsDirs;
use serde_json::{json, Value};
use vmm::api::client::{Client, Reply};
use vmm::migration::tls::{ClientTls, ServerTls};
use vmm::migration::transport::{Listener, MigrationUrl, Stream};

const PORT: u16 = 7100;

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ferry-tls-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn put(api: &Client, endpoint: &str, body: &Value) -> Reply {
    api.put(endpoint, Some(body.to_string().as_bytes()))
        .unwrap_or_else(|e| panic!("{endpoint}: {e}"))
}

/// Has `dest` wait for a migration on `tcp:0.0.0.0:PORT` (with `tls_dir` when given) on
/// a thread, and returns once it listens.
fn receive(dest: &Host, tls_dir: Option<&Path>) -> std::thread::JoinHandle<Reply> {
    let api = Client::new(dest.api.path(), Some(Duration::from_secs(300)));
    let mut body = json!({"receiver_url": format!("tcp:0.0.0.0:{PORT}")});
    if let Some(d) = tls_dir {
        body["tls_dir"] = json!(d);
    }
    let t = std::thread::spawn(move || put(&api, "vm.receive-migration", &body));
    // Listening once migration-info reports a migration in its setup.
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let info = dest.api.get("vm.migration-info").ok();
        let status = info.as_ref().and_then(|r| r.json().ok());
        if status.as_ref().is_some_and(|s| s["status"] == "setup") {
            return t;
        }
        assert!(
            !t.is_finished(),
            "receive-migration ended at once: {}",
            t.join().unwrap().error_message()
        );
        assert!(
            Instant::now() < end,
            "the destination never started listening: {status:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn send(src: &Host, to: &str, tls_dir: Option<&Path>, connections: u32) -> Reply {
    let mut body = json!({"destination_url": to, "connections": connections,
                          "wait_for_completion": true});
    if let Some(d) = tls_dir {
        body["tls_dir"] = json!(d);
    }
    put(&src.api, "vm.send-migration", &body)
}

/// The highest `verify` pass any vCPU reported after byte `from` of the serial log.
fn last_pass(serial: &Serial, from: usize) -> Option<u64> {
    serial
        .text()
        .get(from..)?
        .lines()
        .filter_map(|l| {
            l.strip_prefix("guest: verified ")?
                .split(' ')
                .nth(1)?
                .trim()
                .parse()
                .ok()
        })
        .max()
}

/// Waits until the guest reports a pass after `pass` (it keeps running) and nothing went
/// wrong; the new pass.
fn guest_goes_on(serial: &Serial, pass: u64, timeout: Duration) -> u64 {
    let end = Instant::now() + timeout;
    loop {
        let t = serial.text();
        assert!(
            !t.contains("MISMATCH") && !t.contains("FAIL"),
            "the guest failed:\n{t}"
        );
        if let Some(p) = last_pass(serial, 0).filter(|&p| p > pass) {
            return p;
        }
        assert!(
            Instant::now() < end,
            "the guest made no progress past pass {pass} within {timeout:?}:\n{t}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn state(host: &Host) -> Value {
    host.api.get("vm.info").unwrap().json().unwrap()["state"].clone()
}

/// A source on host A running the `verify` guest long enough for every case of a test.
fn verify_source(hosts: &TwoHosts, dir: &Path, serial: &Serial) -> Host {
    let elf = common::guest_elf();
    let serial_arg = format!("file={}", serial.0.display());
    let src = Host::start(
        &hosts.a,
        dir,
        "source",
        &[
            "--kernel",
            elf.to_str().unwrap(),
            "--cmdline",
            "workload=verify start=1M size=64M rate=16384 passes=100000",
            "--cpus",
            "boot=2",
            "--memory",
            "size=256M",
            "--serial",
            &serial_arg,
        ],
        &[],
    );
    common::wait_serial(&serial.0, "guest: verified 0 1", 0, Duration::from_secs(90));
    src
}

/// Migrates the running source to `dest` over TLS and checks that the guest verifies on
/// B with nothing lost.
fn migrate_and_verify(
    hosts: &TwoHosts,
    mut src: Host,
    mut dest: Host,
    serial: &Serial,
    tls: &TlsDirs,
    connections: u32,
) {
    let receiving = receive(&dest, Some(&tls.receiver));
    let url = format!("tcp:{}:{PORT}", hosts.addr_b);
    let r = send(&src, &url, Some(&tls.sender), connections);
    assert_eq!(r.status, 204, "send-migration: {}", r.error_message());
    let r = receiving.join().unwrap();
    assert_eq!(r.status, 204, "receive-migration: {}", r.error_message());
    let (code, out) = src.wait_exit(Duration::from_secs(20));
    assert_eq!(
        code,
        Some(0),
        "the source did not end after the migration:\n{out}"
    );
    assert!(
        out.contains("TLS"),
        "the source did not say it used TLS:\n{out}"
    );
    assert_eq!(state(&dest), "Running");
    let info: Value = dest.api.get("vm.migration-info").unwrap().json().unwrap();
    assert_eq!(info["status"], "completed", "{info}");
    eprintln!("TLS migration ({connections} connection(s)): {info}");
    // Every line from now on is B's. Two passes of each vCPU there: the second began on
    // B, so it checked every page of its share as B holds it.
    let moved_at = serial.text().len();
    let end = Instant::now() + Duration::from_secs(120);
    loop {
        let t = serial.text();
        assert!(
            !t.contains("MISMATCH") && !t.contains("FAIL"),
            "the guest failed on B:\n{t}"
        );
        let on_b = &t[moved_at.min(t.len())..];
        let passes = |cpu: u32| {
            let prefix = format!("guest: verified {cpu} ");
            on_b.lines().filter(|l| l.starts_with(&prefix)).count()
        };
        if (0..2).all(|c| passes(c) >= 2) {
            break;
        }
        assert!(
            Instant::now() < end,
            "not two passes of each vCPU verified on B within 120 s:\n{t}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = dest.wait_exit(Duration::ZERO);
}

#[test]
fn verify_guest_moves_over_tls_with_two_connections() {
    let hosts = TwoHosts::new(41);
    let dir = tmpdir("two");
    let tls = TlsDirs::new(&dir.join("pki"), &hosts.addr_b);
    let serial = Serial(dir.join("serial.log"));
    let dest = Host::start(&hosts.b, &dir, "dest", &[], &[]);
    let src = verify_source(&hosts, &dir, &serial);
    migrate_and_verify(&hosts, src, dest, &serial, &tls, 2);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Each refusal against a live source: the source's error, the destination's error,
/// the source still running and its guest making progress, the destination ready
/// again. Then the right credentials move the VM, and it verifies on B.
#[test]
fn refused_peers_leave_the_source_running_then_tls_moves_the_vm() {
    let hosts = TwoHosts::new(42);
    let dir = tmpdir("refused");
    let tls = TlsDirs::new(&dir.join("pki"), &hosts.addr_b);
    let serial = Serial(dir.join("serial.log"));
    let dest = Host::start(&hosts.b, &dir, "dest", &[], &[]);
    let src = verify_source(&hosts, &dir, &serial);
    let url = format!("tcp:{}:{PORT}", hosts.addr_b);

    // (sender's tls_dir, receiver's, what the source says, what the destination says)
    let r = Some(tls.receiver.as_path());
    // A refusal for the wrong CA names the ca-cert.pem it was checked against.
    let src_ca = format!(
        "does not chain to this side's CA certificate {}",
        tls.sender_wrong_ca.join("ca-cert.pem").display()
    );
    let dest_ca = format!(
        "does not chain to this side's CA certificate {}",
        tls.receiver.join("ca-cert.pem").display()
    );
    let cases: [Case; 4] = [
        (
            Some(&tls.sender_wrong_ca),
            r,
            &[src_ca.as_str()],
            &["refused this side's certificate"],
        ),
        (
            Some(&tls.sender_foreign_cert),
            r,
            &["the destination refused this side's certificate"],
            &[dest_ca.as_str()],
        ),
        (
            None,
            r,
            &["takes migrations over TLS only"],
            &["did not start a TLS handshake (plain TCP?)"],
        ),
        // The other way round: a TLS source, a destination without tls_dir.
        (
            Some(&tls.sender),
            None,
            &["answered in Ferry's plain protocol, not TLS"],
            &["the source started a TLS handshake, but this receiver has no tls_dir"],
        ),
    ];
    let mut pass = last_pass(&serial, 0).unwrap_or(0);
    for (sender_dir, receiver_dir, src_says, dest_says) in cases {
        let case = format!("sender tls_dir {sender_dir:?}, receiver's {receiver_dir:?}");
        let receiving = receive(&dest, receiver_dir);
        let r = send(&src, &url, sender_dir, 1);
        assert_eq!(
            r.status, 500,
            "{case}: send-migration answered {}",
            r.status
        );
        let msg = r.error_message();
        for s in src_says {
            assert!(
                msg.contains(s),
                "{case}: the source said {msg:?}, not {s:?}"
            );
        }
        let r = receiving.join().unwrap();
        assert_eq!(
            r.status, 500,
            "{case}: receive-migration answered {}",
            r.status
        );
        let dmsg = r.error_message();
        for s in dest_says {
            assert!(
                dmsg.contains(s),
                "{case}: the destination said {dmsg:?}, not {s:?}"
            );
        }
        eprintln!("{case}:\n  source: {msg}\n  destination: {dmsg}");
        assert_eq!(state(&src), "Running", "{case}");
        pass = guest_goes_on(&serial, pass, Duration::from_secs(60));
        // The destination has no VM and takes the next receive-migration.
        assert_eq!(
            dest.api.get("vm.info").unwrap().status,
            404,
            "{case}: the destination holds a VM"
        );
    }

    // A key others can read, a missing file: refused before anything connects, naming
    // the file (400), on either side.
    let key = tls.sender.join("client-key.pem");
    set_mode(&key, 0o644);
    let r = send(&src, &url, Some(&tls.sender), 1);
    let msg = r.error_message();
    assert_eq!(r.status, 400, "{msg}");
    assert!(
        msg.contains(&format!("{} has mode 0644", key.display())),
        "{msg}"
    );
    set_mode(&key, 0o600);
    let server_key = tls.receiver.join("server-key.pem");
    set_mode(&server_key, 0o604);
    let body = json!({"receiver_url": format!("tcp:0.0.0.0:{PORT}"), "tls_dir": tls.receiver});
    let r = put(&dest.api, "vm.receive-migration", &body);
    let msg = r.error_message();
    assert_eq!(r.status, 400, "{msg}");
    assert!(
        msg.contains(&format!("{} has mode 0604", server_key.display())),
        "{msg}"
    );
    set_mode(&server_key, 0o600);
    let ca = tls.sender.join("ca-cert.pem");
    let moved = tls.sender.join("ca-cert.pem.away");
    std::fs::rename(&ca, &moved).unwrap();
    let r = send(&src, &url, Some(&tls.sender), 1);
    let msg = r.error_message();
    assert_eq!(r.status, 400, "{msg}");
    assert!(
        msg.contains(&format!("{} is missing", ca.display())),
        "{msg}"
    );
    std::fs::rename(&moved, &ca).unwrap();
    // No client certificate: refused at the API, naming the file (no connecting without).
    let r = send(&src, &url, Some(&tls.sender_no_cert), 1);
    let msg = r.error_message();
    assert_eq!(r.status, 400, "{msg}");
    let cert = tls.sender_no_cert.join("client-cert.pem");
    assert!(
        msg.contains(&format!("{} is missing", cert.display())),
        "{msg}"
    );
    assert_eq!(state(&src), "Running");
    guest_goes_on(&serial, pass, Duration::from_secs(60));

    migrate_and_verify(&hosts, src, dest, &serial, &tls, 1);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A refusal: the sender's tls_dir, the receiver's, what the source says, what the
/// destination says.
type Case<'a> = (
    Option<&'a Path>,
    Option<&'a Path>,
    &'a [&'a str],
    &'a [&'a str],
);

/// A migration listener on a free loopback port, and the URL that reaches it.
fn loopback_listener() -> (Listener, MigrationUrl) {
    let listener = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let url = format!("tcp:127.0.0.1:{}", listener.port().unwrap())
        .parse()
        .unwrap();
    (listener, url)
}

fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The TLS stream alone over loopback, as the engine drives it: 100 ms socket timeouts
/// retried, large writes, both directions, and each refusal's words on each side.
#[test]
fn loopback_sessions_carry_data_and_refuse_the_wrong_peers() {
    let dir = tmpdir("loopback");
    let tls = TlsDirs::new(&dir.join("pki"), "127.0.0.1");
    let server = ServerTls::load(&tls.receiver).unwrap();

    let (listener, url) = loopback_listener();
    // (sender's tls_dir, whether it is accepted)
    let cases = [
        (tls.sender.clone(), None),
        (tls.sender_wrong_ca.clone(), Some("does not chain")),
        (
            tls.sender_foreign_cert.clone(),
            Some("refused this side's certificate"),
        ),
    ];
    for (sender_dir, refused) in cases {
        let client = ClientTls::load(&sender_dir).unwrap();
        let srv = server.clone();
        let l = &listener;
        std::thread::scope(|s| {
            let t = s.spawn(move || -> Result<u64, String> {
                let stream = l.accept().map_err(|e| e.to_string())?;
                let mut stream = stream
                    .accept_tls(Some(&srv), &|| false)
                    .map_err(|e| e.to_string())?;
                let mut sum = 0u64;
                let mut total = 0u64;
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    match read_retrying(&mut stream, &mut buf) {
                        0 => break,
                        n => {
                            total += n as u64;
                            sum = buf[..n]
                                .iter()
                                .fold(sum, |a, &b| a.wrapping_mul(31).wrapping_add(b as u64));
                            if total == 64 << 20 {
                                write_retrying(&mut stream, b"done");
                                stream.flush().unwrap();
                            }
                        }
                    }
                }
                Ok(sum)
            });
            let sent = Stream::connect_tls(
                &url,
                Duration::from_secs(5),
                Some(&client),
                false,
                no_cancel(),
            );
            let got = match (sent, refused) {
                (Ok(mut c), None) => {
                    let mut sum = 0u64;
                    let block: Vec<u8> = (0..(1u32 << 20)).map(|i| (i * 7 % 251) as u8).collect();
                    for _ in 0..64 {
                        write_retrying(&mut c, &block);
                        sum = block
                            .iter()
                            .fold(sum, |a, &b| a.wrapping_mul(31).wrapping_add(b as u64));
                    }
                    let mut ack = [0u8; 4];
                    let mut at = 0;
                    while at < 4 {
                        at += read_retrying(&mut c, &mut ack[at..]);
                    }
                    assert_eq!(&ack, b"done");
                    c.shutdown();
                    Some(sum)
                }
                (Ok(_), Some(want)) => panic!("{sender_dir:?} connected; expected {want:?}"),
                (Err(e), None) => panic!("{sender_dir:?}: {e}"),
                (Err(e), Some(want)) => {
                    let e = e.to_string();
                    assert!(e.contains(want), "{sender_dir:?}: the source said {e:?}");
                    None
                }
            };
            let srv_result = t.join().unwrap();
            match (got, srv_result) {
                (Some(sum), Ok(their)) => assert_eq!(sum, their, "the data changed on the way"),
                (None, Err(e)) => eprintln!("{sender_dir:?} refused; the destination: {e}"),
                (a, b) => panic!("{sender_dir:?}: source {a:?}, destination {b:?}"),
            }
        });
    }

    // A plain-TCP peer: refused, and told so in Ferry's protocol.
    let srv = server.clone();
    let l = &listener;
    std::thread::scope(|s| {
        let t = s.spawn(move || {
            let stream = l.accept().unwrap();
            stream
                .accept_tls(Some(&srv), &|| false)
                .err()
                .map(|e| e.to_string())
        });
        let mut plain =
            std::net::TcpStream::connect(("127.0.0.1", listener.port().unwrap())).unwrap();
        plain.write_all(b"FRRY plain hello").unwrap();
        plain
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut answer = Vec::new();
        let _ = plain.read_to_end(&mut answer);
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.contains("takes migrations over TLS only"),
            "the plain peer was told {answer:?}"
        );
        let e = t.join().unwrap().expect("the plain peer was accepted");
        assert!(
            e.contains("did not start a TLS handshake (plain TCP?)"),
            "{e}"
        );
    });

    // The receiver's certificate names 127.0.0.1 only: reached as localhost, it is
    // refused (the sender checks the URL's host, not just the CA).
    let client = ClientTls::load(&tls.sender).unwrap();
    let by_name: MigrationUrl = format!("tcp:localhost:{}", listener.port().unwrap())
        .parse()
        .unwrap();
    let srv = server.clone();
    std::thread::scope(|s| {
        let t = s.spawn(|| {
            let stream = listener.accept().unwrap();
            stream.accept_tls(Some(&srv), &|| false).map(drop)
        });
        let e = Stream::connect_tls(
            &by_name,
            Duration::from_secs(5),
            Some(&client),
            false,
            no_cancel(),
        )
        .map(drop)
        .expect_err("a certificate for 127.0.0.1 was taken for localhost")
        .to_string();
        assert!(
            e.contains("is not for the address this side connected to"),
            "{e}"
        );
        let e = t
            .join()
            .unwrap()
            .expect_err("the receiver saw a handshake succeed");
        eprintln!("localhost: the destination: {e}");
    });

    // A TLS sender against a destination answering in the plain protocol.
    let client = ClientTls::load(&tls.sender).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            let Stream::Tcp(mut t) = listener.accept().unwrap() else {
                unreachable!()
            };
            let _ = t.write_all(b"FRRY\x00\x01\x00\x0a\x00\x00\x00\x00");
            std::thread::sleep(Duration::from_millis(300));
        });
        let e = Stream::connect_tls(
            &url,
            Duration::from_secs(5),
            Some(&client),
            false,
            no_cancel(),
        )
        .map(drop)
        .expect_err("a plain destination was taken for TLS")
        .to_string();
        assert!(e.contains("answered in Ferry's plain protocol"), "{e}");
    });
    let _ = std::fs::remove_dir_all(&dir);
}

fn no_cancel() -> vmm::migration::tls::CancelCheck {
    std::sync::Arc::new(|| false)
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// Reads as the engine's watchdog does: short socket timeouts, retried (30 s at most).
fn read_retrying(s: &mut Stream, buf: &mut [u8]) -> usize {
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        match s.read(buf) {
            Ok(n) => return n,
            Err(e) if is_timeout(&e) && Instant::now() < end => {}
            Err(e) => panic!("read: {e}"),
        }
    }
}

fn write_retrying(s: &mut Stream, mut buf: &[u8]) {
    s.set_write_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let end = Instant::now() + Duration::from_secs(30);
    while !buf.is_empty() {
        match s.write(buf) {
            Ok(n) => buf = &buf[n..],
            Err(e) if is_timeout(&e) && Instant::now() < end => {}
            Err(e) => panic!("write: {e}"),
        }
    }
}

/// A TLS pair over loopback with the test CA: (sender's stream, receiver's), each
/// handshake done.
fn tls_pair(tls: &TlsDirs, tune: impl Fn(&std::net::TcpStream) + Sync) -> (Stream, Stream) {
    let server = ServerTls::load(&tls.receiver).unwrap();
    let client = ClientTls::load(&tls.sender).unwrap();
    let (listener, url) = loopback_listener();
    std::thread::scope(|s| {
        let t = s.spawn(|| {
            let Stream::Tcp(t) = listener.accept().unwrap() else {
                unreachable!()
            };
            tune(&t);
            Stream::Tcp(t).accept_tls(Some(&server), &|| false).unwrap()
        });
        let c = Stream::connect_tls(
            &url,
            Duration::from_secs(5),
            Some(&client),
            false,
            no_cancel(),
        )
        .unwrap();
        (c, t.join().unwrap())
    })
}

/// A peer that starts a TLS record and then sends one byte every 2 s: the receiver's
/// handshake ends at its deadline (HANDSHAKE_TIMEOUT from its start), not whenever the
/// peer stops.
#[test]
fn a_peer_trickling_bytes_is_dropped_at_the_handshake_deadline() {
    use vmm::migration::tls::HANDSHAKE_TIMEOUT;
    let dir = tmpdir("trickle");
    let tls = TlsDirs::new(&dir.join("pki"), "127.0.0.1");
    let server = ServerTls::load(&tls.receiver).unwrap();
    let listener = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let port = listener.port().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let trickler = std::thread::spawn(move || {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        // A handshake record header announcing 512 bytes, then its body a byte at a time.
        let _ = c.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00]);
        let mut sent = 0;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) && sent < 60 {
            std::thread::sleep(Duration::from_secs(2));
            if c.write_all(&[0x42]).is_err() {
                break;
            }
            sent += 1;
        }
    });
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let s = listener.accept().unwrap();
        let start = Instant::now();
        let r = s.accept_tls(Some(&server), &|| false).map(drop);
        let _ = tx.send((start.elapsed(), r.map_err(|e| e.to_string())));
    });
    let limit = HANDSHAKE_TIMEOUT + Duration::from_secs(4);
    let got = rx.recv_timeout(limit);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (took, r) = got.unwrap_or_else(|_| {
        panic!("the receiver's handshake with a trickling peer still ran after {limit:?}")
    });
    let e = r.expect_err("a trickling peer completed a handshake");
    assert!(e.contains("not done within"), "{e}");
    assert!(
        took >= HANDSHAKE_TIMEOUT - Duration::from_millis(500),
        "ended after {took:?}: {e}"
    );
    eprintln!("trickling peer dropped after {took:?}: {e}");
    let _ = trickler.join();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The sender handshakes its extra connections in an order other than the one the
/// receiver accepted them in: the receiver's LaneAcceptor serves each on its own
/// thread, so both complete at once (one by one they would wait for each other until
/// the handshake timeout).
#[test]
fn extra_connections_handshake_in_any_order() {
    use vmm::migration::transport::LaneAcceptor;
    let dir = tmpdir("order");
    let tls = TlsDirs::new(&dir.join("pki"), "127.0.0.1");
    let server = ServerTls::load(&tls.receiver).unwrap();
    let client = ClientTls::load(&tls.sender).unwrap();
    let (listener, url) = loopback_listener();
    // Connected (and so accepted) in the order 1, 2, 3; handshaken in the order 3, 1, 2.
    let connect = || {
        Stream::connect_tls(
            &url,
            Duration::from_secs(5),
            Some(&client),
            true,
            no_cancel(),
        )
    };
    let mut lanes: Vec<Stream> = (0..3).map(|_| connect().unwrap()).collect();
    let start = Instant::now();
    let got = std::thread::scope(|s| {
        let receiver = s.spawn(|| {
            let mut acceptor = LaneAcceptor::new(&listener, Some(server.clone()), s, no_cancel());
            let mut got = Vec::new();
            for _ in 0..3 {
                let mut st = acceptor
                    .accept(Duration::from_secs(20))
                    .unwrap_or_else(|e| panic!("accepting after {:?}: {e}", start.elapsed()));
                let mut b = [0u8; 6];
                let mut at = 0;
                while at < b.len() {
                    at += read_retrying(&mut st, &mut b[at..]);
                }
                got.push(String::from_utf8_lossy(&b).to_string());
            }
            got
        });
        for i in [2, 0, 1] {
            write_retrying(&mut lanes[i], format!("lane {}", i + 1).as_bytes());
            lanes[i].flush().unwrap();
        }
        receiver.join().unwrap()
    });
    let took = start.elapsed();
    let mut sorted = got.clone();
    sorted.sort();
    assert_eq!(sorted, ["lane 1", "lane 2", "lane 3"], "received {got:?}");
    assert!(
        took < Duration::from_secs(8),
        "three handshakes took {took:?} (waiting for each other?)"
    );
    eprintln!("handshakes in the order 3, 1, 2: {took:?}, received {got:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn set_buf(t: &std::net::TcpStream, opt: libc::c_int, bytes: libc::c_int) {
    use std::os::fd::AsRawFd;
    // SAFETY: setsockopt on a socket this test owns, with a pointer to a live c_int and
    // its size.
    let r = unsafe {
        libc::setsockopt(
            t.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&bytes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "setsockopt: {}", std::io::Error::last_os_error());
}

/// A reader that pauses 1.2 s between bursts: each `write` returns within about two
/// socket timeouts (the engine's checks run between calls), timeouts come back as
/// TimedOut or WouldBlock, and every byte arrives once, in order.
#[test]
fn a_slow_reader_bounds_each_write_call() {
    let dir = tmpdir("slow");
    let tls = TlsDirs::new(&dir.join("pki"), "127.0.0.1");
    let (tx, mut rx) = tls_pair(&tls, |t| set_buf(t, libc::SO_RCVBUF, 64 << 10));
    if let Stream::Tls(t) = &tx {
        set_buf(t.tcp(), libc::SO_SNDBUF, 64 << 10);
    }
    const TOTAL: usize = 6 << 20;
    let timeout = Duration::from_millis(200);
    let hash = |h: u64, b: &[u8]| {
        b.iter()
            .fold(h, |a, &x| a.wrapping_mul(31).wrapping_add(x as u64))
    };
    std::thread::scope(|s| {
        // Owned here: a failed check below drops it, ending the reader's wait at once.
        let mut tx = tx;
        let reader = s.spawn(move || {
            rx.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            let mut buf = vec![0u8; 256 << 10];
            let (mut total, mut h) = (0usize, 0u64);
            let end = Instant::now() + Duration::from_secs(120);
            while total < TOTAL {
                assert!(Instant::now() < end, "only {total} bytes in 120 s");
                // A burst of up to 1 MiB, then a pause.
                let mut burst = 0;
                while burst < (1 << 20) && total < TOTAL {
                    match rx.read(&mut buf) {
                        Ok(0) => panic!("EOF after {total} bytes"),
                        Ok(n) => {
                            h = hash(h, &buf[..n]);
                            total += n;
                            burst += n;
                        }
                        Err(e) if is_timeout(&e) => break,
                        Err(e) => panic!("read after {total} bytes: {e}"),
                    }
                }
                std::thread::sleep(Duration::from_millis(1200));
            }
            h
        });
        tx.set_write_timeout(Some(timeout)).unwrap();
        let data: Vec<u8> = (0..TOTAL as u32).map(|i| (i * 13 % 253) as u8).collect();
        let (mut at, mut calls, mut timeouts) = (0, 0, 0);
        let mut longest = Duration::ZERO;
        let end = Instant::now() + Duration::from_secs(120);
        while at < TOTAL {
            assert!(Instant::now() < end, "only {at} bytes written in 120 s");
            let t0 = Instant::now();
            let r = tx.write(&data[at..]);
            let took = t0.elapsed();
            longest = longest.max(took);
            calls += 1;
            assert!(
                took <= 2 * timeout + Duration::from_millis(250),
                "write call {calls} took {took:?} (socket timeout {timeout:?}): {r:?}"
            );
            match r {
                Ok(n) => at += n,
                Err(e) if is_timeout(&e) => timeouts += 1,
                Err(e) => panic!("write at {at}: {e} (kind {:?})", e.kind()),
            }
        }
        tx.flush()
            .or_else(|e| {
                // Anything still pending goes with the retried flush.
                let end = Instant::now() + Duration::from_secs(30);
                let mut e = e;
                loop {
                    assert!(is_timeout(&e) && Instant::now() < end, "flush: {e}");
                    match tx.flush() {
                        Ok(()) => return Ok::<(), std::io::Error>(()),
                        Err(e2) => e = e2,
                    }
                }
            })
            .unwrap();
        assert!(
            timeouts > 0,
            "no write timed out: the reader was not slow enough"
        );
        let theirs = reader.join().unwrap();
        assert_eq!(theirs, hash(0, &data), "the data changed on the way");
        eprintln!("{calls} write calls, {timeouts} timed out, the longest {longest:?}");
    });
    let _ = std::fs::remove_dir_all(&dir);
}

/// A deferred handshake that failed leaves the stream failed: the next write says so
/// instead of running on a session half set up.
#[test]
fn a_failed_handshake_leaves_the_stream_failed() {
    let dir = tmpdir("failed");
    let tls = TlsDirs::new(&dir.join("pki"), "127.0.0.1");
    let server = ServerTls::load(&tls.receiver).unwrap();
    let client = ClientTls::load(&tls.sender_wrong_ca).unwrap();
    let (listener, url) = loopback_listener();
    std::thread::scope(|s| {
        let t = s.spawn(|| {
            let stream = listener.accept().unwrap();
            stream.accept_tls(Some(&server), &|| false).map(drop)
        });
        let mut c = Stream::connect_tls(
            &url,
            Duration::from_secs(5),
            Some(&client),
            true,
            no_cancel(),
        )
        .unwrap();
        let e = c
            .write(b"hello")
            .expect_err("a wrong CA was taken")
            .to_string();
        assert!(e.contains("does not chain"), "{e}");
        let e = c
            .write(b"hello")
            .expect_err("a failed session was used")
            .to_string();
        assert!(e.contains("unusable: its handshake failed"), "{e}");
        let e = c
            .read(&mut [0u8; 4])
            .expect_err("a failed session was read")
            .to_string();
        assert!(e.contains("unusable"), "{e}");
        let _ = t.join().unwrap();
    });
    let _ = std::fs::remove_dir_all(&dir);
}

/// A client presenting no certificate (a raw rustls client: Ferry's sender always has
/// one) is refused by the receiver, which says why.
#[test]
fn a_client_without_a_certificate_is_refused_by_the_receiver() {
    let dir = tmpdir("nocert");
    let tls = TlsDirs::new(&dir.join("pki"), "127.0.0.1");
    let server = ServerTls::load(&tls.receiver).unwrap();
    let listener = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let port = listener.port().unwrap();
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(tls.sender.join("ca-cert.pem")).unwrap();
    use rustls::pki_types::pem::PemObject;
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    std::thread::scope(|s| {
        let t = s.spawn(|| {
            let stream = listener.accept().unwrap();
            stream.accept_tls(Some(&server), &|| false).map(drop)
        });
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
        let sock = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        let mut tls_sock = rustls::StreamOwned::new(conn, sock);
        // The client's handshake ends before the server checks; the refusal arrives as
        // an alert on the first read.
        let mut b = [0u8; 1];
        let client_saw = tls_sock.read(&mut b);
        let e = t
            .join()
            .unwrap()
            .expect_err("the receiver took a client without a certificate")
            .to_string();
        assert!(e.contains("presented no client certificate"), "{e}");
        assert!(
            client_saw.is_err(),
            "the client read {client_saw:?} instead of a refusal"
        );
        eprintln!("no client certificate: the receiver: {e}; the client: {client_saw:?}");
    });
    let _ = std::fs::remove_dir_all(&dir);
}

/// The migration's cancel check reaches a sender's deferred handshake: against a
/// receiver that never answers, a cancel ends it at once, not at the handshake timeout.
#[test]
fn a_cancel_ends_the_senders_deferred_handshake() {
    let dir = tmpdir("cancel");
    let tls = TlsDirs::new(&dir.join("pki"), "127.0.0.1");
    let client = ClientTls::load(&tls.sender).unwrap();
    // Connections wait in its backlog, never accepted.
    let (listener, url) = loopback_listener();
    let cancelled = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = cancelled.clone();
    let check: vmm::migration::tls::CancelCheck =
        std::sync::Arc::new(move || flag.load(std::sync::atomic::Ordering::Relaxed));
    let mut c =
        Stream::connect_tls(&url, Duration::from_secs(5), Some(&client), true, check).unwrap();
    let canceller = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        cancelled.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let start = Instant::now();
    let e = c
        .write(b"hello")
        .expect_err("a handshake nobody answered succeeded")
        .to_string();
    let took = start.elapsed();
    canceller.join().unwrap();
    assert!(e.contains("cancelled"), "after {took:?}: {e}");
    assert!(
        took < Duration::from_secs(3),
        "cancelled after {took:?}: {e}"
    );
    drop(listener);
    let _ = std::fs::remove_dir_all(&dir);
}
