//! Per-thread seccomp filters (`--seccomp true|false|log`) on a running guest: every
//! thread is filtered, a call outside its filter ends the process naming thread and call
//! (or, in log mode, goes through and the kernel logs it).
//!
//! Every other test runs ferry with the default (`true`), so the allow-lists are also
//! checked by all of them: a call a thread needs and its list lacks ends that test's ferry.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::Ferry;

/// A guest on 2 vCPUs whose virtio-rng worker is busy (dma-verify), with the API served:
/// every kind of thread a VM has outside a migration.
fn start(tag: &str, seccomp: &str, env: &[(&str, &str)]) -> (Ferry, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("ferry-seccomp-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("api.sock");
    let elf = common::guest_elf();
    let ferry = Ferry::spawn_in_env(
        None,
        env,
        &[
            "--api-socket",
            sock.to_str().unwrap(),
            "--seccomp",
            seccomp,
            "--kernel",
            elf.to_str().unwrap(),
            "--cpus",
            "boot=2",
            "--memory",
            "size=512M",
            "--serial",
            "tty",
            "--rng",
            "src=/dev/urandom",
            "--cmdline",
            "workload=dma-verify dma=rng size=4M",
        ],
    );
    (ferry, dir)
}

/// (name, `Seccomp:` mode, `Seccomp_filters:`) of every thread of `pid`.
fn thread_filters(pid: u32) -> Vec<(String, u32, u32)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let t = t.unwrap().path();
        let comm = std::fs::read_to_string(t.join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(t.join("status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        out.push((
            comm.trim().to_string(),
            field("Seccomp:"),
            field("Seccomp_filters:"),
        ));
    }
    out.sort();
    out
}

#[test]
fn every_thread_of_a_running_ferry_has_a_seccomp_filter() {
    let (mut ferry, dir) = start("all", "true", &[]);
    ferry.expect_line("guest: dma-verified 1 1", Duration::from_secs(120));
    let threads = thread_filters(ferry.child.id());
    let seen = format!("{threads:?}");
    // Mode 2 is SECCOMP_MODE_FILTER.
    for (name, mode, filters) in &threads {
        assert_eq!(*mode, 2, "thread {name} is not filtered: {seen}");
        assert!(*filters >= 1, "thread {name} has no filter: {seen}");
    }
    // Threads with their own filter on top of the VMM one they inherited.
    for own in ["vcpu0", "vcpu1"] {
        assert!(
            threads.iter().any(|(n, _, f)| n == own && *f == 2),
            "{own} lacks its own filter: {seen}"
        );
    }
    let known = ["ferry", "api-accept", "api-conn", "vcpu0", "vcpu1"];
    assert!(
        threads
            .iter()
            .any(|(n, _, f)| !known.contains(&n.as_str()) && !n.starts_with("kvm") && *f == 2),
        "the rng's queue worker lacks its own filter: {seen}"
    );
    drop(ferry);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn seccomp_false_leaves_threads_unfiltered_and_a_bad_mode_is_named() {
    let (mut ferry, dir) = start("off", "false", &[]);
    ferry.expect_line("guest: dma-verified 1 1", Duration::from_secs(120));
    let threads = thread_filters(ferry.child.id());
    assert!(threads.iter().all(|(_, mode, _)| *mode == 0), "{threads:?}");
    drop(ferry);
    let _ = std::fs::remove_dir_all(&dir);

    let (code, err) = common::run_ferry(&["--seccomp", "maybe"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        common::error_line(&err).contains("\"maybe\"")
            && common::error_line(&err).contains("true, false or log"),
        "{err}"
    );
}

/// The seam makes the first thread of a kind call personality(2), which no filter allows.
fn forbidden_call_ends_the_process(kind: &str, thread: &str) {
    let (ferry, dir) = start(kind, "true", &[("FERRY_TEST_FORBIDDEN_SYSCALL", kind)]);
    let (code, out) = ferry.wait(Duration::from_secs(120));
    assert_eq!(
        code,
        Some(ferry_seccomp::EXIT_STATUS),
        "ferry should have ended with {} (128 + SIGSYS):\n{out}",
        ferry_seccomp::EXIT_STATUS
    );
    let want = format!("({kind} filter) made system call personality (135)");
    let line = out
        .lines()
        .find(|l| l.starts_with("ferry: seccomp: thread '"))
        .unwrap_or_else(|| panic!("no seccomp line:\n{out}"));
    assert!(
        line.contains(&want) && line.contains(thread),
        "want {thread:?} and {want:?} in: {line}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_vcpu_making_a_forbidden_call_ends_the_process_naming_it() {
    forbidden_call_ends_the_process("vcpu", "'vcpu");
}

#[test]
fn a_device_worker_making_a_forbidden_call_ends_the_process_naming_it() {
    forbidden_call_ends_the_process("device-worker", "' (device-worker filter)");
}

/// `--seccomp log`: the call goes through (the guest runs on) and the kernel logs it
/// with the thread's name and the call's number.
#[test]
fn in_log_mode_a_forbidden_call_goes_through_and_the_kernel_logs_it() {
    let (mut ferry, dir) = start("log", "log", &[("FERRY_TEST_FORBIDDEN_SYSCALL", "vcpu")]);
    ferry.expect_line("guest: dma-verified 1 2", Duration::from_secs(120));
    let pid = ferry.child.id();
    let want = format!("pid={pid} comm=\"vcpu");
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let out = Command::new("dmesg").output().ok();
        let Some(out) = out.filter(|o| o.status.success()) else {
            eprintln!("skipped the kernel-log check: dmesg cannot be read here");
            break;
        };
        let log = String::from_utf8_lossy(&out.stdout);
        if log
            .lines()
            .any(|l| l.contains("type=1326") && l.contains(&want) && l.contains(" syscall=135 "))
        {
            break;
        }
        assert!(
            Instant::now() < end,
            "no kernel log line with type=1326, {want} and syscall=135 within 10 s; its end:\n{}",
            log.lines().rev().take(20).collect::<Vec<_>>().join("\n")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        ferry.child.try_wait().unwrap().is_none(),
        "ferry ended in log mode"
    );
    drop(ferry);
    let _ = std::fs::remove_dir_all(&dir);
}
