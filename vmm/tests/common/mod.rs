//! Helpers shared by the VMM's integration tests: paths to the binaries and the test
//! guest, and a ferry process whose serial output can be awaited line by line.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The program `$var` names (a tool `scripts/dev_cli.sh tests` installs, such as
/// schemathesis), or why there is none: a test then prints one SKIPPED line.
pub fn tool_from_env(var: &str) -> Result<PathBuf, String> {
    let p = std::env::var_os(var)
        .ok_or_else(|| format!("{var} is not set (scripts/dev_cli.sh tests sets it)"))?;
    let p = PathBuf::from(p);
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!("{var}={} is not a file", p.display()))
    }
}

pub fn ferry_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ferry"))
}

/// The test guest, built by `test_guest/build.sh` when missing: target/test-guest/guest.elf,
/// or DIR/test-guest/guest.elf with `FERRY_TEST_GUEST_TARGET=DIR` (where build.sh then
/// puts it).
pub fn guest_elf() -> PathBuf {
    let root = repo_root();
    let elf = match std::env::var_os("FERRY_TEST_GUEST_TARGET") {
        Some(dir) => PathBuf::from(dir).join("test-guest/guest.elf"),
        None => root.join("target/test-guest/guest.elf"),
    };
    static BUILD: std::sync::Once = std::sync::Once::new();
    BUILD.call_once(|| {
        if !elf.exists() {
            let st = Command::new(root.join("test_guest/build.sh"))
                .status()
                .expect("run test_guest/build.sh");
            assert!(st.success(), "test_guest/build.sh failed");
        }
    });
    elf
}

/// A running ferry whose stdout (serial in tty mode) and stderr are collected.
pub struct Ferry {
    pub child: Child,
    lines: Receiver<String>,
    pub seen: Vec<String>,
}

impl Ferry {
    pub fn spawn(args: &[&str]) -> Ferry {
        Self::spawn_in(None, args)
    }

    /// Starts ferry inside network namespace `netns` (one of the test's hosts).
    pub fn spawn_in(netns: Option<&str>, args: &[&str]) -> Ferry {
        Self::spawn_in_env(netns, &[], args)
    }

    /// As [`Self::spawn_in`], with extra environment variables (test seams).
    pub fn spawn_in_env(netns: Option<&str>, env: &[(&str, &str)], args: &[&str]) -> Ferry {
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(ferry_bin());
                c
            }
            None => Command::new(ferry_bin()),
        };
        let mut child = cmd
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start ferry");
        let (tx, lines) = channel();
        for out in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for l in BufReader::new(out).lines().map_while(Result::ok) {
                    if tx.send(l).is_err() {
                        break;
                    }
                }
            });
        }
        Ferry {
            child,
            lines,
            seen: vec![],
        }
    }

    /// Waits for a line containing `pat`; panics with everything seen on timeout.
    pub fn expect_line(&mut self, pat: &str, timeout: Duration) -> String {
        let end = Instant::now() + timeout;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.contains(pat) {
                        return l;
                    }
                }
                Err(_) => panic!(
                    "no line with {pat:?} within {timeout:?}; output so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Waits for the process to end (killing it after `timeout`) and returns its status
    /// code and all its output.
    pub fn wait(mut self, timeout: Duration) -> (Option<i32>, String) {
        let end = Instant::now() + timeout;
        let code = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st.code();
            }
            if Instant::now() > end {
                // Say where every thread of the process was before ending it.
                if !timeout.is_zero() {
                    self.seen.push(threads_of(self.child.id()));
                }
                let _ = self.child.kill();
                let _ = self.child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // Drain what the readers still hold.
        while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(200)) {
            self.seen.push(l);
        }
        (code, self.seen.join("\n"))
    }
}

/// Runs ferry with `args` to its end: its exit status (-1: killed) and its stderr.
pub fn run_ferry(args: &[&str]) -> (i32, String) {
    let out = Command::new(ferry_bin()).args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code().unwrap_or(-1), err)
}

/// The one error line of a failed run's stderr (and no panic in it).
pub fn error_line(err: &str) -> &str {
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(
        lines.len(),
        1,
        "exactly one error line expected, got:\n{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    lines[0]
}

/// The nice value of each vCPU thread (`vcpuN`) of process `pid`, by thread name.
pub fn vcpu_nice(pid: u32) -> Vec<(String, i64)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let comm = comm.trim();
        if !comm.starts_with("vcpu") {
            continue;
        }
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        // After "pid (comm) ": state is field 3, nice field 19.
        let nice = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(16))
            .and_then(|n| n.parse().ok())
            .unwrap_or(i64::MIN);
        out.push((comm.to_string(), nice));
    }
    out.sort();
    out
}

/// Whether processes started here may raise a thread's priority again (CAP_SYS_NICE),
/// which Ferry needs before it lowers its vCPUs' for a migration.
pub fn may_renice() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << 23) != 0)
}

/// Each thread of process `pid`: its name, where it sleeps in the kernel and the system
/// call it is in (what a test that timed out waiting for the process reports).
pub fn threads_of(pid: u32) -> String {
    let mut out = format!("--- threads of {pid} when it was killed:");
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out + " (gone)";
    };
    for t in tasks.flatten() {
        let read = |f: &str| {
            std::fs::read_to_string(t.path().join(f))
                .unwrap_or_default()
                .trim()
                .to_string()
        };
        let syscall = read("syscall");
        out.push_str(&format!(
            "\n{} {}: wchan {} syscall {}",
            t.file_name().to_string_lossy(),
            read("comm"),
            read("wchan"),
            syscall.split(' ').next().unwrap_or("")
        ));
    }
    out
}

/// Starts ferry (inside `netns` when given) serving its API at `dir/NAME.sock`, and
/// returns once the API answers, with a client for it (180 s per request).
pub fn spawn_with_api(
    netns: Option<&str>,
    dir: &Path,
    name: &str,
    args: &[&str],
) -> (Ferry, vmm::api::client::Client) {
    spawn_with_api_env(netns, dir, name, args, &[])
}

/// As [`spawn_with_api`], with extra environment variables (test seams).
pub fn spawn_with_api_env(
    netns: Option<&str>,
    dir: &Path,
    name: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> (Ferry, vmm::api::client::Client) {
    let sock = dir.join(format!("{name}.sock"));
    let mut all = vec!["--api-socket", sock.to_str().unwrap()];
    all.extend_from_slice(args);
    let mut ferry = Ferry::spawn_in_env(netns, env, &all);
    let api = vmm::api::client::Client::new(&sock, Some(Duration::from_secs(180)));
    let end = Instant::now() + Duration::from_secs(30);
    while api.get("vmm.ping").map(|r| r.status).ok() != Some(200) {
        if let Ok(Some(st)) = ferry.child.try_wait() {
            // Its last lines say why; the readers see the pipes close.
            std::thread::sleep(Duration::from_millis(200));
            let said: Vec<String> = ferry.lines.try_iter().collect();
            panic!(
                "{name} ended ({st}) before serving its API:\n{}",
                said.join("\n")
            );
        }
        assert!(Instant::now() < end, "{name}'s API never answered");
        std::thread::sleep(Duration::from_millis(20));
    }
    (ferry, api)
}

impl Drop for Ferry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
pub mod coredump;
pub mod dma_hosts;
pub mod netns;
pub mod qmp;
pub mod tls_certs;

/// Waits until the serial log at `path` holds `pat` after byte `from`; returns the offset
/// just past it. Panics with the whole log on timeout.
pub fn wait_serial(path: &Path, pat: &str, from: usize, timeout: Duration) -> usize {
    let end = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if let Some(p) = text.get(from..).and_then(|t| t.find(pat)) {
            return from + p + pat.len();
        }
        assert!(Instant::now() < end, "no {pat:?} in {timeout:?}:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until each of the `verify` guest's `cpus` vCPUs has checked its whole share
/// twice more after byte `pos` of the serial log at `serial` (every page checked after
/// whatever happened at `pos`), each check within `each`; fails on a MISMATCH or FAIL
/// line anywhere in it.
pub fn verified_twice_more(serial: &Path, pos: usize, cpus: u32, each: Duration) {
    let mut pos = pos;
    for _ in 0..2 {
        for cpu in 0..cpus {
            wait_serial(serial, &format!("guest: verified {cpu} "), pos, each);
        }
        pos = std::fs::metadata(serial).map_or(0, |m| m.len() as usize);
    }
    let text = std::fs::read_to_string(serial).unwrap_or_default();
    assert!(
        !text.contains("MISMATCH") && !text.contains("FAIL"),
        "{text}"
    );
}

/// The line of the serial log at `path` that holds `pat` (waiting for it).
pub fn serial_line(path: &Path, pat: &str, timeout: Duration) -> String {
    let end = wait_serial(path, pat, 0, timeout);
    // The guest writes a byte per port access: wait (a little) for the line's end, or a
    // line read mid-way names half an address.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let start = text[..end].rfind('\n').map_or(0, |i| i + 1);
        match text[end..].find('\n') {
            Some(i) => return text[start..end + i].to_string(),
            None if std::time::Instant::now() >= deadline => return text[start..].to_string(),
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}
