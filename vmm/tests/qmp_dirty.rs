//! QMP's dirty-rate measurement (`calc-dirty-rate` / `query-dirty-rate`, `dirty-ring`
//! mode) and the per-vCPU dirty limit (`set-`/`query-`/`cancel-vcpu-dirty-limit`) against
//! real guests: the test guest's `dirty` workload, paced (`rate=`) or flat out.
//!
//! Rates are QMP's whole MiB/s: 1 MiB/s = 256 pages/s. The rates picked here are ones the
//! guest reaches on two busy cores: its pacing loop spins, so a vCPU needs CPU time to keep
//! its pace, and with dirty logging on every new page costs it a fault; on this project's
//! 2-core machine at a load average of 11 (tests run with nice 10) a vCPU kept 2048 pages/s
//! but fell to 3000 of 4096, and flat out with logging on it made about 2200 pages/s.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::qmp::{error_of, tmpdir, Qmp};
use common::{wait_serial, Ferry};
use serde_json::{json, Value};

const PAGES_PER_MIB: f64 = 256.0;

/// A ferry with a QMP socket running the test guest with `cmdline` on 2 vCPUs.
fn dirty_guest(dir: &Path, cmdline: &str, extra: &[&str]) -> (Ferry, PathBuf, PathBuf) {
    dirty_guest_env(dir, cmdline, extra, &[])
}

/// [`dirty_guest`] with extra environment variables for Ferry.
fn dirty_guest_env(
    dir: &Path,
    cmdline: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (Ferry, PathBuf, PathBuf) {
    let serial = dir.join("serial.log");
    let sock = dir.join("q.sock");
    let elf = common::guest_elf();
    let qmp = format!("unix:{}", sock.display());
    let ser = format!("file={}", serial.display());
    let mut args = vec![
        "--qmp",
        &qmp,
        "--kernel",
        elf.to_str().unwrap(),
        "--cmdline",
        cmdline,
        "--cpus",
        "boot=2",
        "--memory",
        "size=256M",
        "--serial",
        &ser,
    ];
    args.extend_from_slice(extra);
    (Ferry::spawn_in_env(None, env, &args), sock, serial)
}

/// Runs `calc-dirty-rate` over `secs` and returns `query-dirty-rate`'s answer once
/// measured (bounded wait).
fn measure(q: &mut Qmp, secs: u64) -> Value {
    assert_eq!(
        q.ok(
            "calc-dirty-rate",
            json!({"calc-time": secs, "mode": "dirty-ring"})
        ),
        json!({})
    );
    let end = Instant::now() + Duration::from_secs(secs + 30);
    loop {
        let r = q.ok("query-dirty-rate", json!({}));
        if r["status"] == "measured" {
            return r;
        }
        assert_eq!(r["status"], "measuring", "{r}");
        assert!(Instant::now() < end, "still measuring: {r}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Per-vCPU MiB/s of a `query-dirty-rate` answer, by id.
/// Ferry's exact per-vCPU rates in pages per second (`x-ferry-pages-per-second`, beside
/// QEMU's whole MiB/s), by vCPU index.
fn vcpu_pages_per_second(r: &Value) -> Vec<f64> {
    let list = r["vcpu-dirty-rate"]
        .as_array()
        .unwrap_or_else(|| panic!("{r}"));
    let mut out = vec![0.0; list.len()];
    for v in list {
        out[v["id"].as_u64().unwrap() as usize] = v["x-ferry-pages-per-second"]
            .as_f64()
            .unwrap_or_else(|| panic!("no x-ferry-pages-per-second: {r}"));
    }
    out
}

/// Whether `got` is within `tolerance` (a fraction) of `want`.
fn within(got: f64, want: f64, tolerance: f64) -> bool {
    (got - want).abs() <= want * tolerance
}

fn vcpu_rates(r: &Value) -> Vec<i64> {
    let list = r["vcpu-dirty-rate"]
        .as_array()
        .unwrap_or_else(|| panic!("{r}"));
    let mut out = vec![0; list.len()];
    for v in list {
        out[v["id"].as_u64().unwrap() as usize] = v["dirty-rate"].as_i64().unwrap();
    }
    out
}

/// QMP's rates are whole MiB/s (rounded): within `tolerance` of `want` give or take that
/// rounding.
fn within_rounded(got: i64, want: f64, tolerance: f64) -> bool {
    (got as f64 - want).abs() <= want * tolerance + 0.5
}

/// `guest: pass <cpu> <n>` lines as they appear in the serial log, with the host time
/// each was first seen.
struct PassWatch {
    path: PathBuf,
    read: usize,
    /// (seen at, cpu, pass)
    seen: Vec<(Instant, u32, u64)>,
}

impl PassWatch {
    fn new(path: &Path) -> PassWatch {
        let read = std::fs::metadata(path).map_or(0, |m| m.len() as usize);
        PassWatch {
            path: path.to_path_buf(),
            read,
            seen: vec![],
        }
    }

    fn poll(&mut self) {
        let text = std::fs::read(&self.path).unwrap_or_default();
        let now = Instant::now();
        // Whole lines only: a line being written is taken next time.
        let Some(end) = text[self.read.min(text.len())..]
            .iter()
            .rposition(|&b| b == b'\n')
        else {
            return;
        };
        let end = self.read + end + 1;
        for line in String::from_utf8_lossy(&text[self.read..end]).lines() {
            let mut w = line
                .trim()
                .strip_prefix("guest: pass ")
                .unwrap_or("")
                .split(' ');
            if let (Some(c), Some(n)) = (w.next(), w.next()) {
                if let (Ok(c), Ok(n)) = (c.parse(), n.parse()) {
                    self.seen.push((now, c, n));
                }
            }
        }
        self.read = end;
    }

    /// Polls for `d`, every 10 ms.
    fn watch_for(&mut self, d: Duration) {
        let end = Instant::now() + d;
        while Instant::now() < end {
            self.poll();
            std::thread::sleep(Duration::from_millis(10));
        }
        self.poll();
    }

    /// Pages per second vCPU `cpu` reports between `from` and `to`, with `share` pages
    /// per pass: the least-squares slope of its pass numbers over the times their lines
    /// appeared (a limited vCPU moves in steps of a nap, so single lines are late by up to
    /// one; the slope over many evens that out). None with fewer than 3 lines.
    fn rate(&self, cpu: u32, share: u64, from: Instant, to: Instant) -> Option<f64> {
        let pts: Vec<(f64, f64)> = self
            .seen
            .iter()
            .filter(|(t, c, _)| *c == cpu && *t >= from && *t <= to)
            .map(|(t, _, n)| (t.duration_since(from).as_secs_f64(), *n as f64))
            .collect();
        if pts.len() < 3 {
            return None;
        }
        let k = pts.len() as f64;
        let (mt, mn) = (
            pts.iter().map(|p| p.0).sum::<f64>() / k,
            pts.iter().map(|p| p.1).sum::<f64>() / k,
        );
        let cov: f64 = pts.iter().map(|p| (p.0 - mt) * (p.1 - mn)).sum();
        let var: f64 = pts.iter().map(|p| (p.0 - mt).powi(2)).sum();
        (var > 0.0).then(|| cov / var * share as f64)
    }
}

const PY_MEASURE: &str = r#"
import asyncio, json, sys
from qemu.qmp import QMPClient

async def main(path):
    q = QMPClient("ferry")
    await q.connect(path)
    before = await q.execute("query-dirty-rate")
    assert before["status"] == "unstarted", before
    await q.execute("calc-dirty-rate", {"calc-time": 2000, "calc-time-unit": "millisecond",
                                        "mode": "dirty-ring"})
    for _ in range(300):
        r = await q.execute("query-dirty-rate")
        if r["status"] == "measured":
            break
        await asyncio.sleep(0.1)
    ms = await q.execute("query-dirty-rate", {"calc-time-unit": "millisecond"})
    print("RESULT " + json.dumps({"seconds": r, "milliseconds": ms}))
    await q.disconnect()

asyncio.run(main(sys.argv[1]))
"#;

/// (a) Through QEMU's own client: the rate `query-dirty-rate` reports is the rate the
/// guest dirties at, in all and per vCPU, within 10 %.
#[test]
fn calc_dirty_rate_through_qemu_qmp_matches_the_guest() {
    let python = match common::tool_from_env("FERRY_QMP_PYTHON") {
        Ok(p) => p,
        Err(why) => {
            eprintln!("SKIPPED: qemu.qmp dirty-rate test: {why}");
            return;
        }
    };
    let dir = tmpdir("dirty-calc");
    // 2048 pages/s per vCPU = 8 MiB/s. Each vCPU's share is 8192 pages (4 s a pass), so
    // the 2 s window writes every page at most once: each write is a new ring entry.
    let (ferry, sock, serial) =
        dirty_guest(&dir, "workload=dirty start=1M size=64M rate=2048", &[]);
    // Past the first paced pass of both vCPUs (the unpaced zeroing before it is not
    // the configured rate).
    wait_serial(&serial, "guest: pass 0 1", 0, Duration::from_secs(60));
    wait_serial(&serial, "guest: pass 1 1", 0, Duration::from_secs(60));
    drop(Qmp::connect(&sock));
    let out = std::process::Command::new(&python)
        .args(["-c", PY_MEASURE])
        .arg(&sock)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap_or_else(|| panic!("no result from the qemu.qmp script:\n{text}"));
    let v: Value = serde_json::from_str(line).unwrap();
    let r = &v["seconds"];
    assert_eq!(r["status"], "measured", "{r}");
    assert_eq!(r["mode"], "dirty-ring", "{r}");
    assert_eq!(r["calc-time"], 2, "{r}");
    assert_eq!(r["calc-time-unit"], "second", "{r}");
    assert!(r["start-time"].as_i64().unwrap() > 0, "{r}");
    assert_eq!(v["milliseconds"]["calc-time"], 2000, "{v}");
    assert_eq!(v["milliseconds"]["calc-time-unit"], "millisecond", "{v}");
    let want = 2048.0 / PAGES_PER_MIB;
    let per = vcpu_rates(r);
    assert_eq!(per.len(), 2, "{r}");
    for (cpu, &got) in per.iter().enumerate() {
        assert!(
            within_rounded(got, want, 0.10),
            "vCPU {cpu}: {got} MiB/s measured, the guest dirties {want} MiB/s: {r}"
        );
    }
    let total = r["dirty-rate"].as_i64().unwrap();
    assert!(
        within_rounded(total, 2.0 * want, 0.10),
        "in all: {total} MiB/s measured, the guest dirties {} MiB/s: {r}",
        2.0 * want
    );
    // The exact figures, without QMP's rounding to whole MiB/s: within 10 % too.
    for (cpu, got) in vcpu_pages_per_second(r).into_iter().enumerate() {
        assert!(
            within(got, 2048.0, 0.10),
            "vCPU {cpu}: {got:.0} pages/s measured, the guest dirties 2048: {r}"
        );
    }
    let exact = r["x-ferry-pages-per-second"].as_f64().unwrap();
    assert!(
        within(exact, 4096.0, 0.10),
        "in all: {exact:.0} pages/s measured, the guest dirties 4096: {r}"
    );
    drop(ferry);
}

/// One phase of the limit test: waits `settle` for the limiter to settle, then measures with
/// `calc-dirty-rate` while following the guest's own pass lines over the same window.
fn limited_phase(q: &mut Qmp, pid: u32, serial: &Path, share: u64, settle: Duration) -> Phase {
    std::thread::sleep(settle);
    let mut passes = PassWatch::new(serial);
    let waited_before = runqueue_wait(pid);
    let from = Instant::now();
    assert_eq!(q.ok("calc-dirty-rate", json!({"calc-time": 8})), json!({}));
    passes.watch_for(Duration::from_secs(8));
    let to = Instant::now();
    let waited = runqueue_wait(pid)
        .iter()
        .zip(&waited_before)
        .map(|(after, before)| after.saturating_sub(*before).as_secs_f64() / 8.0)
        .collect();
    let end = Instant::now() + Duration::from_secs(30);
    let r = loop {
        let r = q.ok("query-dirty-rate", json!({}));
        if r["status"] == "measured" {
            break r;
        }
        assert!(Instant::now() < end, "still measuring: {r}");
        std::thread::sleep(Duration::from_millis(50));
    };
    Phase {
        ferry: vcpu_pages_per_second(&r),
        guest: (0..2).map(|c| passes.rate(c, share, from, to)).collect(),
        waited,
    }
}

/// The limiter's last ten lines in Ferry's debug log at `log` (each second: the pages it
/// booked per vCPU and how much of the second it had each nap), for a failed check to
/// print.
fn limiter_account(log: &Path) -> String {
    let text = match std::fs::read_to_string(log) {
        Ok(t) => t,
        Err(e) => return format!("(cannot read {}: {e})", log.display()),
    };
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("dirty limit")).collect();
    if lines.is_empty() {
        return format!("(no dirty-limit lines in {})", log.display());
    }
    lines[lines.len().saturating_sub(10)..].join("\n")
}

/// What one phase of the limit test measured, per vCPU.
struct Phase {
    /// Ferry's exact pages/s (`x-ferry-pages-per-second`).
    ferry: Vec<f64>,
    /// The guest's own workload pages/s, from its pass lines.
    guest: Vec<Option<f64>>,
    /// The share of the window the vCPU thread spent runnable but waiting for a host CPU.
    waited: Vec<f64>,
}

/// How long each vCPU thread (`vcpu0`, `vcpu1`) of process `pid` has waited for a host
/// CPU while runnable (the second field of `/proc/PID/task/TID/schedstat`). Zero where
/// the host does not say.
fn runqueue_wait(pid: u32) -> [Duration; 2] {
    let mut out = [Duration::ZERO; 2];
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let Some(i) = ["vcpu0", "vcpu1"].iter().position(|n| comm.trim() == *n) else {
            continue;
        };
        let stat = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
        if let Some(ns) = stat.split_whitespace().nth(1).and_then(|w| w.parse().ok()) {
            out[i] = Duration::from_nanos(ns);
        }
    }
    out
}

/// What a phase of the limit test expects of one vCPU.
#[derive(Clone, Copy)]
enum Want {
    /// Held at this many MiB/s.
    Limit(f64),
    /// No limit: the guest reports more than this many pages/s.
    Free(f64),
}

/// (b) `set-vcpu-dirty-limit` holds each vCPU of a guest dirtying flat out at its limit:
/// within 10 % by Ferry's `calc-dirty-rate` (its exact pages/s: at most 10 % over, and at
/// most 10 % under in the time the vCPU's thread had a host CPU),
/// cross-checked with the guest's own progress lines (its workload stays under the limit
/// and gets most of it); each vCPU on its own (two limits, then one limited and one
/// free), and `cancel` lets it run free again.
#[test]
fn dirty_limit_holds_each_vcpu_at_its_limit() {
    let dir = tmpdir("dirty-limit");
    // The guest paces itself at 2048 pages/s per vCPU (8 MiB/s), above the limits of 2
    // and 3 MiB/s (with two busy loops beside the tests, a vCPU kept only 1200 of it). Not
    // flat out: a limit counts dirty pages, and a vCPU running free for a moment (a
    // loaded host runs the limiter late) rewrites its share many times over between two
    // harvests for one entry a page, so its own pass count would say nothing about the
    // limit. Paced, it writes each page of its 512-page share once per pass (every second
    // at 2 MiB/s, long after the limiter's harvest): one entry per write, and a pass line
    // every 0.25-1.2 s over the 8 s window. (With 1024 pages a loaded run saw only two
    // lines of a vCPU in a window, too few for a rate.)
    let share = 512;
    // Ferry's debug log has the limiter's own per-second account of each vCPU: a failed
    // check prints it beside what the measurement saw.
    let log = dir.join("ferry.log");
    // RUST_LOG, not -v: a RUST_LOG set around the tests would override -v.
    let (ferry, sock, serial) = dirty_guest_env(
        &dir,
        "workload=dirty start=1M size=4M rate=2048",
        &["--log-file", log.to_str().unwrap()],
        &[("RUST_LOG", "debug")],
    );
    wait_serial(&serial, "guest: pass 1 1", 0, Duration::from_secs(60));
    let mut q = Qmp::negotiated(&sock);
    assert_eq!(q.ok("query-vcpu-dirty-limit", json!({})), json!([]));

    let free_for = |d: Duration| -> Vec<Option<f64>> {
        let mut passes = PassWatch::new(&serial);
        let from = Instant::now();
        passes.watch_for(d);
        (0..2)
            .map(|c| passes.rate(c, share, from, Instant::now()))
            .collect()
    };
    let check = |what: &str, p: &Phase, want: [Want; 2]| {
        eprintln!(
            "{what}: Ferry measured {:.0?} pages/s, the guest reports {:.0?}, the vCPU \
             threads waited for a host CPU {:.0?} % of the window",
            p.ferry,
            p.guest,
            p.waited.iter().map(|w| w * 100.0).collect::<Vec<_>>()
        );
        for (c, want) in want.into_iter().enumerate() {
            let g = p.guest[c].unwrap_or_else(|| panic!("{what}: vCPU {c}: no pass lines"));
            match want {
                Want::Free(min) => assert!(
                    g > min,
                    "{what}: vCPU {c} has no limit yet runs at {g:.0} pages/s (<= {min})"
                ),
                Want::Limit(mib) => {
                    let limit = mib * PAGES_PER_MIB;
                    let f = p.ferry[c];
                    // Ferry's exact count: never more than 10 % over the limit.
                    assert!(
                        f <= limit * 1.10,
                        "{what}: vCPU {c} measured at {f:.0} pages/s, over its limit \
                         {limit} by more than 10 % (all: {:?}); the limiter's account:\n{}",
                        p.ferry,
                        limiter_account(&log)
                    );
                    // And not held more than 10 % under it in the time its thread had a
                    // host CPU to run on: a vCPU the host keeps waiting cannot dirty, and
                    // that is no fault of the limit (on this 2-core host, beside other
                    // tests' guests, a vCPU thread waits 0-40 % of the window).
                    let could = limit * (1.0 - p.waited[c]);
                    assert!(
                        f >= could * 0.90,
                        "{what}: vCPU {c} measured at {f:.0} pages/s, limit {limit}: more \
                         than 10 % under the {could:.0} it could reach while its thread \
                         had a CPU ({:.0} % of the window waiting; all: {:?}); the \
                         limiter's account:\n{}",
                        p.waited[c] * 100.0,
                        p.ferry,
                        limiter_account(&log)
                    );
                    // The guest's own account counts its workload's pages only, while
                    // the limit counts every page the vCPU dirties: also its stack and
                    // what else it writes, again after each harvest (measured here: a
                    // paced vCPU at 2048 pages/s read 2190 in Ferry's count; held by
                    // the limit, its workload got 55-90 % of it on a loaded host), and
                    // at these rates the guest prints a line every 2-4 s, held back in
                    // steps of the limiter's naps. So: the workload must not beat the
                    // limit (10 %) and must not be stalled (40 %).
                    assert!(
                        g <= limit * 1.10 && g >= limit * 0.4,
                        "{what}: vCPU {c}: the guest reports {g:.0} pages/s of its \
                         workload, the limit is {limit} (Ferry measured {:?} pages/s)",
                        p.ferry
                    );
                }
            }
        }
    };
    let free = |d: Duration| Phase {
        ferry: vec![0.0; 2],
        guest: free_for(d),
        waited: vec![0.0; 2],
    };
    // Without dirty logging the guest runs far above every limit used below.
    // Without a limit the guest runs well above the limits (about its own pace).
    let fast = Want::Free(1.5 * 2.0 * PAGES_PER_MIB);
    check("free", &free(Duration::from_secs(4)), [fast, fast]);

    // Every vCPU at 4 MiB/s.
    assert_eq!(
        q.ok("set-vcpu-dirty-limit", json!({"dirty-rate": 2})),
        json!({})
    );
    let pid = ferry.child.id();
    // The first limit also turns dirty logging on: a vCPU may book a burst then (CI runs:
    // 1344 and 2695 pages in the first second at a 512 limit), paid back by napping 1.6
    // and 4.3 s; measured from 1 and 3 s on, that payback made it read 411 and 302
    // pages/s. Its account settles before the window here (6 s); later limits find
    // logging on. (Capping the payback at 1 s instead let a burst in the window go
    // unpaid: a CI run read 662 pages/s at 512.)
    let p = limited_phase(&mut q, pid, &serial, share, Duration::from_secs(6));
    check("both at 2", &p, [Want::Limit(2.0), Want::Limit(2.0)]);
    let limits = q.ok("query-vcpu-dirty-limit", json!({}));
    let list = limits.as_array().unwrap();
    assert_eq!(list.len(), 2, "{limits}");
    for (i, l) in list.iter().enumerate() {
        assert_eq!(l["cpu-index"], i, "{limits}");
        assert_eq!(l["limit-rate"], 2, "{limits}");
        // A running average over about a second: looser than the 4 s measurement.
        let cur = l["current-rate"].as_u64().unwrap() as i64;
        assert!(within_rounded(cur, 2.0, 0.3), "{limits}");
    }

    // vCPU 1 at 3, vCPU 0 stays at 2.
    q.ok(
        "set-vcpu-dirty-limit",
        json!({"cpu-index": 1, "dirty-rate": 3}),
    );
    let p = limited_phase(&mut q, pid, &serial, share, Duration::from_secs(1));
    check("2 and 3", &p, [Want::Limit(2.0), Want::Limit(3.0)]);

    // vCPU 0 free again, vCPU 1 still held. Dirty logging stays on for vCPU 1's limit,
    // and every page costs vCPU 0 a fault: on a loaded host it may not keep its own pace,
    // but it runs well above the limit it had.
    q.ok("cancel-vcpu-dirty-limit", json!({"cpu-index": 0}));
    let limits = q.ok("query-vcpu-dirty-limit", json!({}));
    assert_eq!(limits.as_array().unwrap().len(), 1, "{limits}");
    assert_eq!(limits[0]["cpu-index"], 1, "{limits}");
    let p = limited_phase(&mut q, pid, &serial, share, Duration::from_secs(1));
    check("free and 3", &p, [fast, Want::Limit(3.0)]);

    q.ok("cancel-vcpu-dirty-limit", json!({}));
    assert_eq!(q.ok("query-vcpu-dirty-limit", json!({})), json!([]));
    std::thread::sleep(Duration::from_millis(300));
    check("all cancelled", &free(Duration::from_secs(4)), [fast, fast]);
    drop(ferry);
}

/// (c) Refusals, with QEMU's GenericError and the offending value named; and a VM without
/// dirty rings refuses the commands, saying why.
#[test]
fn bad_dirty_rate_and_limit_requests_are_refused() {
    let dir = tmpdir("dirty-refusals");
    let (ferry, sock, serial) = dirty_guest(&dir, "workload=dirty start=1M size=8M rate=1000", &[]);
    wait_serial(&serial, "guest: ready", 0, Duration::from_secs(60));
    let mut q = Qmp::negotiated(&sock);
    let r = q.ok("query-dirty-rate", json!({}));
    assert_eq!(r["status"], "unstarted", "{r}");
    assert!(r.get("dirty-rate").is_none(), "{r}");
    for (args, needle) in [
        (
            json!({"calc-time": 1, "mode": "page-sampling"}),
            "mode 'page-sampling'",
        ),
        (
            json!({"calc-time": 1, "mode": "dirty-bitmap"}),
            "mode 'dirty-bitmap'",
        ),
        (json!({"calc-time": 1, "mode": "guess"}), "'guess'"),
        (json!({"calc-time": 0}), "calc-time 0 s"),
        (json!({"calc-time": 61}), "calc-time 61 s"),
        (json!({"calc-time": -1}), "calc-time -1 s"),
        (
            json!({"calc-time": 10, "calc-time-unit": "millisecond"}),
            "calc-time 10 ms",
        ),
        (json!({"calc-time": 1, "calc-time-unit": "hour"}), "'hour'"),
        (
            json!({"calc-time": 1, "sample-pages": 512}),
            "sample-pages 512",
        ),
        (json!({"calc-time": "x"}), "'calc-time', expected: integer"),
        (json!({}), "'calc-time' is missing"),
        (json!({"calc-time": 1, "bogus": 1}), "'bogus' is unexpected"),
    ] {
        let (class, desc) = error_of(&q.cmd("calc-dirty-rate", args.clone()));
        assert_eq!(class, "GenericError", "{args}: {desc}");
        assert!(desc.contains(needle), "{args}: {desc}");
    }
    // One measurement at a time.
    q.ok("calc-dirty-rate", json!({"calc-time": 2}));
    let (class, desc) = error_of(&q.cmd("calc-dirty-rate", json!({"calc-time": 1})));
    assert_eq!(class, "GenericError");
    assert!(desc.contains("already being measured"), "{desc}");
    for (args, needle) in [
        (json!({"dirty-rate": 0}), "dirty-rate 0"),
        (json!({"dirty-rate": -5}), "dirty-rate -5"),
        (json!({"dirty-rate": 8, "cpu-index": 2}), "cpu-index 2"),
        (json!({"dirty-rate": 8, "cpu-index": -1}), "cpu-index -1"),
        (
            json!({"dirty-rate": 1.5}),
            "'dirty-rate', expected: integer",
        ),
        (json!({"cpu-index": 0}), "'dirty-rate' is missing"),
    ] {
        let (class, desc) = error_of(&q.cmd("set-vcpu-dirty-limit", args.clone()));
        assert_eq!(class, "GenericError", "{args}: {desc}");
        assert!(desc.contains(needle), "{args}: {desc}");
    }
    let (class, desc) = error_of(&q.cmd("cancel-vcpu-dirty-limit", json!({"cpu-index": 9})));
    assert_eq!(class, "GenericError");
    assert!(
        desc.contains("cpu-index 9") && desc.contains("2 vCPUs"),
        "{desc}"
    );
    // Nothing was set by the refused requests.
    assert_eq!(q.ok("query-vcpu-dirty-limit", json!({})), json!([]));
    let names: Vec<Value> = q
        .ok("query-commands", json!({}))
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].clone())
        .collect();
    for c in [
        "calc-dirty-rate",
        "query-dirty-rate",
        "set-vcpu-dirty-limit",
        "query-vcpu-dirty-limit",
        "cancel-vcpu-dirty-limit",
    ] {
        assert!(names.contains(&json!(c)), "{c} not in {names:?}");
    }
    drop(ferry);

    // Bitmap mode: no rings, so no dirty-ring measurement and no limit.
    let dir = tmpdir("dirty-bitmap");
    let (ferry, sock, serial) = dirty_guest(
        &dir,
        "workload=dirty start=1M size=8M rate=1000",
        &["--dirty-ring", "off"],
    );
    wait_serial(&serial, "guest: ready", 0, Duration::from_secs(60));
    let mut q = Qmp::negotiated(&sock);
    for (cmd, args, needle) in [
        (
            "calc-dirty-rate",
            json!({"calc-time": 1}),
            "mode 'dirty-ring'",
        ),
        (
            "set-vcpu-dirty-limit",
            json!({"dirty-rate": 8}),
            "set-vcpu-dirty-limit",
        ),
        (
            "cancel-vcpu-dirty-limit",
            json!({}),
            "cancel-vcpu-dirty-limit",
        ),
        (
            "query-vcpu-dirty-limit",
            json!({}),
            "query-vcpu-dirty-limit",
        ),
    ] {
        let (class, desc) = error_of(&q.cmd(cmd, args));
        assert_eq!(class, "GenericError", "{cmd}: {desc}");
        assert!(
            desc.contains(needle) && desc.contains("--dirty-ring off"),
            "{cmd}: {desc}"
        );
    }
    assert_eq!(q.ok("query-dirty-rate", json!({}))["status"], "unstarted");
    drop(ferry);

    // No VM at all.
    let dir = tmpdir("dirty-novm");
    let sock = dir.join("q.sock");
    let ferry = Ferry::spawn(&["--qmp", &format!("unix:{}", sock.display())]);
    let mut q = Qmp::negotiated(&sock);
    for (cmd, args) in [
        ("calc-dirty-rate", json!({"calc-time": 1})),
        ("set-vcpu-dirty-limit", json!({"dirty-rate": 1})),
        ("query-vcpu-dirty-limit", json!({})),
    ] {
        let (class, desc) = error_of(&q.cmd(cmd, args));
        assert_eq!(class, "GenericError", "{cmd}: {desc}");
        assert!(desc.contains("there is no VM"), "{cmd}: {desc}");
    }
    drop(ferry);
}

/// A limit set before a migration holds through it, and the migration loses no page: a
/// `verify` guest (which checks every page it wrote) held at 4 MiB/s per vCPU moves to a
/// second ferry and goes on there with nothing missing. The limiter and the migration
/// harvest the same rings; every entry reaches the migration's dirty set.
#[test]
fn a_dirty_limit_holds_through_a_migration() {
    let dir = tmpdir("dirty-migrate");
    let sock_b = dir.join("b.sock");
    let dest = Ferry::spawn(&["--qmp", &format!("unix:{}", sock_b.display())]);
    let mut b = Qmp::negotiated(&sock_b);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let uri = format!("tcp:127.0.0.1:{port}");
    b.ok("migrate-incoming", json!({"uri": uri}));

    let (src, sock_a, serial) = dirty_guest(&dir, "workload=verify start=1M size=32M", &[]);
    wait_serial(&serial, "guest: verified 1 1", 0, Duration::from_secs(60));
    let mut a = Qmp::negotiated(&sock_a);
    a.ok("set-vcpu-dirty-limit", json!({"dirty-rate": 4}));
    // Held (after the burst from before the limit is paid back): a measurement reads
    // about the limit per vCPU. This guest runs flat out, beside the other tests: one
    // 2 s window in CI once read a vCPU at 6 MiB/s (the limiter late behind them), so up
    // to three windows are taken and one must hold; how closely a limit holds is
    // `dirty_limit_holds_each_vcpu_at_its_limit`'s check, this test's is the migration.
    std::thread::sleep(Duration::from_secs(1));
    let mut seen = Vec::new();
    let held = (0..3).any(|_| {
        let r = measure(&mut a, 2);
        let ok = vcpu_rates(&r)
            .into_iter()
            .all(|got| within_rounded(got, 4.0, 0.25));
        seen.push(r);
        ok
    });
    assert!(
        held,
        "no 2 s window read both vCPUs at 4 MiB/s (within 25 %): {seen:?}"
    );
    a.ok("migrate", json!({"uri": uri}));
    a.event(
        "MIGRATION",
        |d| d["status"] == "completed",
        Duration::from_secs(120),
    );
    let (code, out) = src.wait(Duration::from_secs(10));
    assert_eq!(code, Some(0), "the source exits after its VM moved:\n{out}");
    b.event(
        "MIGRATION",
        |d| d["status"] == "completed",
        Duration::from_secs(30),
    );
    // The guest goes on at B (two more passes per vCPU), nothing lost.
    let pos = std::fs::metadata(&serial).map_or(0, |m| m.len() as usize);
    common::verified_twice_more(&serial, pos, 2, Duration::from_secs(60));
    // The limit stayed with the source: the arrived VM has none.
    assert_eq!(b.ok("query-vcpu-dirty-limit", json!({})), json!([]));
    b.ok("quit", json!({}));
    let (code, out) = dest.wait(Duration::from_secs(10));
    assert_eq!(code, Some(0), "{out}");
}
