//! `--qmp unix:PATH`: QEMU's monitor protocol against real ferry processes, with a small
//! QMP client (`common::qmp`), and (when `FERRY_QMP_PYTHON` names a Python with QEMU's own
//! `qemu.qmp` package, as `scripts/dev_cli.sh tests` sets it) with QEMU's client.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::qmp::{error_of, tmpdir, Qmp};
use common::{wait_serial, Ferry};
use serde_json::{json, Value};

fn verify_guest(dir: &Path, qmp: &Path, cpus: &str) -> (Ferry, PathBuf) {
    verify_guest_with(dir, qmp, cpus, &[])
}

fn verify_guest_with(dir: &Path, qmp: &Path, cpus: &str, extra: &[&str]) -> (Ferry, PathBuf) {
    let serial = dir.join("serial.log");
    let elf = common::guest_elf();
    let mut args = vec![
        "--qmp".to_string(),
        format!("unix:{}", qmp.display()),
        "--kernel".into(),
        elf.to_str().unwrap().into(),
        "--cmdline".into(),
        "workload=verify start=1M size=16M".into(),
        "--cpus".into(),
        format!("boot={cpus}"),
        "--memory".into(),
        "size=256M".into(),
        "--serial".into(),
        format!("file={}", serial.display()),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let ferry = Ferry::spawn(&args);
    (ferry, serial)
}

fn serial_len(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

#[test]
fn bad_qmp_values_are_named() {
    for bad in ["unix:", "/tmp/x.sock", "tcp:127.0.0.1:4444"] {
        let (code, err) = common::run_ferry(&["--qmp", bad]);
        assert_eq!(code, 2, "{bad}: {err}");
        let line = common::error_line(&err);
        assert!(line.contains(&format!("{bad:?}")), "{line}");
    }
    // A path that is taken by a file: exit 1 naming it, the file left alone.
    let dir = tmpdir("bad");
    let file = dir.join("not-a-socket");
    std::fs::write(&file, b"x").unwrap();
    let (code, err) = common::run_ferry(&["--qmp", &format!("unix:{}", file.display())]);
    assert_eq!(code, 1, "{err}");
    let line = common::error_line(&err);
    assert!(
        line.contains(&format!(
            "QMP socket {}: exists and is not a socket",
            file.display()
        )),
        "{line}"
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"x");
}

/// Greeting, negotiation, errors, ids, the message limit, stop/cont with their events and
/// the guest really paused, events only to negotiated connections, quit.
#[test]
fn protocol_and_lifecycle() {
    let dir = tmpdir("protocol");
    let sock = dir.join("qmp.sock");
    let api_sock = dir.join("api.sock");
    let (ferry, serial) = verify_guest_with(
        &dir,
        &sock,
        "1",
        &["--api-socket", api_sock.to_str().unwrap()],
    );
    wait_serial(&serial, "guest: verified 0 1", 0, Duration::from_secs(60));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the QMP socket is owner-only");

    let mut q = Qmp::connect(&sock);
    let v = &q.greeting["QMP"];
    assert_eq!(
        v["version"]["qemu"],
        json!({"micro": 0, "minor": 2, "major": 7})
    );
    assert!(v["version"]["package"]
        .as_str()
        .unwrap()
        .starts_with("ferry "));
    assert_eq!(v["capabilities"], json!([]));
    // Nothing but qmp_capabilities before negotiation; the id comes back.
    let a = q.raw(b"{\"execute\": \"query-status\", \"id\": 41}\n");
    assert_eq!(a["id"], 41);
    assert_eq!(
        error_of(&a),
        (
            "CommandNotFound".into(),
            "Expecting capabilities negotiation with 'qmp_capabilities'".into()
        )
    );
    assert_eq!(
        q.raw(b"{\"execute\": \"qmp_capabilities\", \"id\": \"n\"}"),
        json!({"return": {}, "id": "n"})
    );
    let (class, _) = error_of(&q.cmd("qmp_capabilities", json!({})));
    assert_eq!(class, "CommandNotFound");
    // Unknown command, malformed JSON, not an object, bad arguments.
    let a = q.raw(b"{\"execute\": \"device_add\", \"id\": [1, {\"x\": null}]}\n");
    assert_eq!(a["id"], json!([1, {"x": null}]));
    assert_eq!(
        error_of(&a),
        (
            "CommandNotFound".into(),
            "The command device_add has not been found".into()
        )
    );
    let (class, desc) = error_of(&q.raw(b"{\"execute\": query-status}\n"));
    assert_eq!(class, "GenericError");
    assert!(desc.starts_with("JSON parse error, "), "{desc}");
    let (_, desc) = error_of(&q.raw(b"[1, 2]\n"));
    assert!(desc.contains("must be a JSON object"), "{desc}");
    let (_, desc) = error_of(&q.cmd("stop", json!({"now": true})));
    assert_eq!(desc, "Parameter 'now' is unexpected");
    // A message over the limit is refused, the connection goes on.
    let long = format!("{{\"execute\": \"{}\"}}\n", "x".repeat(100 * 1024));
    let (class, desc) = error_of(&q.raw(long.as_bytes()));
    assert_eq!(class, "GenericError");
    assert!(desc.contains("longer than 65536 bytes"), "{desc}");
    let a = q.raw(b"{\"execute\": \"query-status\", \"id\": {\"seq\": 7}}\n");
    assert_eq!(
        a,
        json!({"return": {"running": true, "singlestep": false, "status": "running"}, "id": {"seq": 7}})
    );
    assert_eq!(q.ok("query-migrate", json!({})), json!({}));
    let names: Vec<Value> = q
        .ok("query-commands", json!({}))
        .as_array()
        .unwrap()
        .clone();
    assert!(names.contains(&json!({"name": "migrate"})), "{names:?}");

    // A connection that has not negotiated hears no events.
    let mut quiet = Qmp::connect(&sock);

    q.ok("stop", json!({}));
    q.event("STOP", |_| true, Duration::from_secs(5));
    assert_eq!(q.ok("query-status", json!({}))["status"], "paused");
    q.ok("stop", json!({})); // already paused: fine, as in QEMU
    std::thread::sleep(Duration::from_millis(300));
    let before = serial_len(&serial);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        serial_len(&serial),
        before,
        "the guest prints nothing while stopped"
    );
    q.ok("cont", json!({}));
    q.event("RESUME", |_| true, Duration::from_secs(5));
    assert_eq!(q.ok("query-status", json!({}))["running"], true);
    let pos = wait_serial(
        &serial,
        "guest: verified 0 ",
        before as usize,
        Duration::from_secs(30),
    );
    assert!(pos > before as usize);

    // A pause and resume over the REST API are heard on QMP too.
    let api = vmm::api::client::Client::new(&api_sock, Some(Duration::from_secs(30)));
    assert_eq!(api.put("vm.pause", None).unwrap().status, 204);
    q.event("STOP", |_| true, Duration::from_secs(5));
    assert_eq!(api.put("vm.resume", None).unwrap().status, 204);
    q.event("RESUME", |_| true, Duration::from_secs(5));

    quiet
        .input
        .get_ref()
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 256];
    match quiet.input.read(&mut buf) {
        Ok(n) => panic!(
            "a connection without negotiation got {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(e) => assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "{e}"
        ),
    }

    assert_eq!(q.ok("quit", json!({})), json!({}));
    let (code, out) = ferry.wait(Duration::from_secs(10));
    assert_eq!(code, Some(0), "quit ends ferry:\n{out}");
    assert!(!out.contains("panicked"), "{out}");
    assert!(!sock.exists(), "the socket file is removed on quit");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits for both vCPUs to verify their share twice more after `pos`, with no mismatch.
fn goes_on(serial: &Path, pos: usize) {
    common::verified_twice_more(serial, pos, 2, Duration::from_secs(60));
}

/// A migration between two ferry processes driven only through QMP, as a QEMU user does.
#[test]
fn migration_through_qmp() {
    let dir = tmpdir("migrate");
    let sock_b = dir.join("b.sock");
    let dest = Ferry::spawn(&["--qmp", &format!("unix:{}", sock_b.display())]);
    let mut b = Qmp::negotiated(&sock_b);
    assert_eq!(b.ok("query-status", json!({}))["status"], "prelaunch");
    let port = free_port();
    let uri = format!("tcp:127.0.0.1:{port}");
    let (_, desc) = error_of(&b.cmd("migrate-incoming", json!({"uri": "ftp://x"})));
    assert!(desc.contains("ftp://x"), "{desc}");
    // A port taken: the answer says so (QEMU listens before answering too).
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_uri = format!("tcp:{}", taken.local_addr().unwrap());
    let (_, desc) = error_of(&b.cmd("migrate-incoming", json!({"uri": taken_uri})));
    assert!(desc.contains("cannot listen"), "{desc}");
    drop(taken);
    assert_eq!(b.ok("migrate-incoming", json!({"uri": uri})), json!({}));
    assert_eq!(b.ok("query-status", json!({}))["status"], "inmigrate");

    let sock_a = dir.join("a.sock");
    let (src, serial) = verify_guest(&dir, &sock_a, "2");
    let pos = wait_serial(&serial, "guest: verified 1 1", 0, Duration::from_secs(60));
    let mut a = Qmp::negotiated(&sock_a);
    // Ferry's own parameter beside QEMU's: QEMU's switch-over rule.
    a.ok(
        "migrate-set-parameters",
        json!({"downtime-limit": 300, "x-ferry-switch-over": "fits"}),
    );
    let p = a.ok("query-migrate-parameters", json!({}));
    assert_eq!(p["downtime-limit"], 300, "{p}");
    assert_eq!(p["x-ferry-switch-over"], "fits", "{p}");
    let (_, desc) = error_of(&a.cmd("migrate", json!({"uri": uri, "blk": true})));
    assert!(desc.contains("blk=true"), "{desc}");
    // `resume` takes up a postcopy migration that lost its link; there is none here.
    let (_, desc) = error_of(&a.cmd("migrate", json!({"uri": uri, "resume": true})));
    assert!(
        desc.contains("no postcopy migration of this VM is paused"),
        "{desc}"
    );
    assert_eq!(a.ok("migrate", json!({"uri": uri})), json!({}));
    a.event(
        "MIGRATION",
        |d| d["status"] == "setup",
        Duration::from_secs(10),
    );
    // query-migrate follows it (the source ends shortly after completing).
    let info = a.ok("query-migrate", json!({}));
    assert!(info["status"].is_string(), "{info}");
    a.event(
        "MIGRATION",
        |d| d["status"] == "completed",
        Duration::from_secs(120),
    );
    // QEMU would stay in postmigrate; Ferry's source ends once the VM moved.
    let (code, out) = src.wait(Duration::from_secs(10));
    assert_eq!(code, Some(0), "the source exits after its VM moved:\n{out}");
    assert!(
        out.contains("switch-over rule Fits"),
        "the source's log does not name the rule set over QMP:\n{out}"
    );

    b.event(
        "MIGRATION",
        |d| d["status"] == "completed",
        Duration::from_secs(30),
    );
    b.event("RESUME", |_| true, Duration::from_secs(5));
    assert_eq!(
        b.ok("query-status", json!({})),
        json!({"running": true, "singlestep": false, "status": "running"})
    );
    let info = b.ok("query-migrate", json!({}));
    assert_eq!(info["status"], "completed", "{info}");
    goes_on(&serial, pos);
    b.ok("quit", json!({}));
    let (code, out) = dest.wait(Duration::from_secs(10));
    assert_eq!(code, Some(0), "{out}");
}

/// QEMU's own client (`qemu.qmp.QMPClient`): lifecycle on one ferry, then a migration to
/// a second one followed with `query-migrate` to completion.
const PY_SCRIPT: &str = r#"
import asyncio, sys
from qemu.qmp import QMPClient

async def main(a_path, b_path, uri):
    a, b = QMPClient("source"), QMPClient("destination")
    await a.connect(a_path)
    await b.connect(b_path)
    print("greeting", a.greeting.QMP.version["qemu"])
    st = await a.execute("query-status")
    assert st["status"] == "running", st
    await a.execute("stop")
    assert (await a.execute("query-status"))["status"] == "paused"
    await a.execute("cont")
    assert (await a.execute("query-status"))["running"] is True
    assert await a.execute("query-migrate") == {}
    await b.execute("migrate-incoming", {"uri": uri})
    assert (await b.execute("query-status"))["status"] == "inmigrate"
    await a.execute("migrate-set-parameters", {"downtime-limit": 300})
    await a.execute("migrate", {"uri": uri})
    seen = set()
    for _ in range(2400):
        try:
            info = await a.execute("query-migrate")
        except Exception as e:  # the source ends after completing
            print("source gone:", type(e).__name__)
            break
        seen.add(info.get("status"))
        if info.get("status") in ("completed", "failed", "cancelled"):
            break
        await asyncio.sleep(0.05)
    print("source statuses", sorted(s for s in seen if s))
    assert "failed" not in seen and "cancelled" not in seen, seen
    for _ in range(600):
        info = await b.execute("query-migrate")
        if info.get("status") == "completed":
            break
        await asyncio.sleep(0.05)
    assert info.get("status") == "completed", info
    assert (await b.execute("query-status"))["status"] == "running"
    print("MIGRATED")
    await b.disconnect()
    try:
        await a.disconnect()
    except Exception:
        pass

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3]))
"#;

/// Two ferries for QEMU's own tools: B waiting with only QMP, A running the verify guest
/// (2 vCPUs) past its first check, both sockets up, and a free loopback URI.
struct Pair {
    python: PathBuf,
    dest: Ferry,
    sock_b: PathBuf,
    src: Ferry,
    sock_a: PathBuf,
    serial: PathBuf,
    pos: usize,
    uri: String,
}

/// [`Pair`], or `None` (the test skips, saying so) without the Python that has qemu.qmp.
fn pair_for_qemu_tools(tag: &str, what: &str) -> Option<Pair> {
    let python = match common::tool_from_env("FERRY_QMP_PYTHON") {
        Ok(p) => p,
        Err(why) => {
            eprintln!("SKIPPED: {what}: {why}");
            return None;
        }
    };
    let dir = tmpdir(tag);
    let sock_b = dir.join("b.sock");
    let dest = Ferry::spawn(&["--qmp", &format!("unix:{}", sock_b.display())]);
    let sock_a = dir.join("a.sock");
    let (src, serial) = verify_guest(&dir, &sock_a, "2");
    let pos = wait_serial(&serial, "guest: verified 1 1", 0, Duration::from_secs(60));
    // Both sockets exist before the tools connect.
    drop(Qmp::connect(&sock_a));
    drop(Qmp::connect(&sock_b));
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    Some(Pair {
        python,
        dest,
        sock_b,
        src,
        sock_a,
        serial,
        pos,
        uri,
    })
}

#[test]
fn qemu_qmp_python_client() {
    let Some(Pair {
        python,
        dest,
        sock_b,
        src,
        sock_a,
        serial,
        pos,
        uri,
    }) = pair_for_qemu_tools("python", "qemu.qmp client test")
    else {
        return;
    };
    let out = std::process::Command::new(&python)
        .args(["-c", PY_SCRIPT])
        .arg(&sock_a)
        .arg(&sock_b)
        .arg(&uri)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, src_out) = src.wait(Duration::from_secs(10));
    assert!(
        out.status.success() && text.contains("MIGRATED"),
        "{text}\n--- source:\n{src_out}"
    );
    eprintln!("{text}");
    goes_on(&serial, pos);
    let mut b = Qmp::negotiated(&sock_b);
    b.ok("quit", json!({}));
    let (code, out) = dest.wait(Duration::from_secs(10));
    assert_eq!(code, Some(0), "{out}");
}

/// Runs QEMU's `qmp-shell` (beside `python` in the virtualenv) on `sock` with `lines` as
/// its input, as a user types them; its whole output.
fn qmp_shell(python: &Path, sock: &Path, lines: &[&str]) -> String {
    let shell = python.with_file_name("qmp-shell");
    let mut child = std::process::Command::new(&shell)
        .arg(sock)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", shell.display()));
    let mut input = child.stdin.take().unwrap();
    for l in lines {
        writeln!(input, "{l}").unwrap();
    }
    // End of input ends the shell.
    drop(input);
    let end = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > end {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "qmp-shell {}: {text}", sock.display());
    text
}

/// QEMU's `qmp-shell`, typed into as the README shows: B waits for the stream, A gets a
/// downtime limit and migrates; the guest goes on on B. An unknown command gets QEMU's
/// `CommandNotFound`.
#[test]
fn qmp_shell_drives_a_migration() {
    let Some(Pair {
        python,
        dest,
        sock_b,
        src,
        sock_a,
        serial,
        pos,
        uri,
    }) = pair_for_qemu_tools("shell", "qmp-shell test")
    else {
        return;
    };
    let b_out = qmp_shell(
        &python,
        &sock_b,
        &[&format!("migrate-incoming uri={uri}"), "query-status"],
    );
    assert!(
        b_out.contains(r#""status": "inmigrate""#) && b_out.contains(r#"{"return": {}}"#),
        "B's shell: {b_out}"
    );
    let a_out = qmp_shell(
        &python,
        &sock_a,
        &[
            "migrate-set-parameters downtime-limit=300",
            "query-migrate-parameters",
            &format!("migrate uri={uri}"),
            "no-such-command",
        ],
    );
    for want in [
        r#""downtime-limit": 300"#,
        r#"{"return": {}}"#,
        r#""class": "CommandNotFound""#,
    ] {
        assert!(a_out.contains(want), "no '{want}' in A's shell: {a_out}");
    }
    let mut b = Qmp::negotiated(&sock_b);
    let end = Instant::now() + Duration::from_secs(120);
    loop {
        let st = b.ok("query-status", json!({}));
        if st["status"] == "running" {
            break;
        }
        assert!(Instant::now() < end, "B never ran the VM: {st}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, src_out) = src.wait(Duration::from_secs(30));
    assert_eq!(
        code,
        Some(0),
        "the source exits after its VM moved:\n{src_out}"
    );
    goes_on(&serial, pos);
    b.ok("quit", json!({}));
    let (code, out) = dest.wait(Duration::from_secs(10));
    assert_eq!(code, Some(0), "{out}");
}
