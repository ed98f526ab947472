//! The soak run behind `scripts/dev_cli.sh soak N`: the `verify` guest ping-pongs between
//! two namespace hosts N times (A → B → A …), each hop a fresh receiving `ferry` on the
//! other host. The guest rewrites and checks every page of its region all the time, so a
//! page lost in any hop is a `MISMATCH` on the next host (the guest then stops; the soak
//! starts a fresh one and counts it). Ignored by `cargo test`: the script runs it.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::netns::TwoHosts;
use common::Ferry;
use serde_json::{json, Value};
use vmm::api::client::Client;

const PORT: u16 = 7100;
const GUEST: &str = "workload=verify start=1M size=64M";

struct Running {
    ferry: Ferry,
    api: Client,
    /// 0: host A, 1: host B.
    host: usize,
}

fn boot(hosts: &TwoHosts, dir: &Path, serial: &Path, n: usize, env: &[(&str, &str)]) -> Running {
    let elf = common::guest_elf();
    let serial_arg = format!("file={}", serial.display());
    let (ferry, api) = common::spawn_with_api_env(
        Some(&hosts.a),
        dir,
        &format!("guest{n}"),
        &[
            "--kernel",
            elf.to_str().unwrap(),
            "--cpus",
            "boot=2",
            "--memory",
            "size=256M",
            "--cmdline",
            GUEST,
            "--serial",
            &serial_arg,
        ],
        env,
    );
    common::wait_serial(serial, "guest: verified 1 1", 0, Duration::from_secs(60));
    Running {
        ferry,
        api,
        host: 0,
    }
}

#[derive(Default)]
struct Tally {
    runs: usize,
    failed: Vec<String>,
    lost_pages: usize,
    guests: usize,
    total_ms: Vec<u64>,
    downtime_ms: Vec<u64>,
}

/// The last pass vCPU `cpu` reported in `text` (`guest: verified CPU PASS`).
fn last_pass(text: &str, cpu: u32) -> Option<u64> {
    let prefix = format!("guest: verified {cpu} ");
    text.lines()
        .filter_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
        .max()
}

fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

#[test]
#[ignore = "the soak run: scripts/dev_cli.sh soak N"]
fn soak() {
    let runs: usize = std::env::var("FERRY_SOAK_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let tally = ping_pong(90, runs, &[]);
    assert!(
        tally.failed.is_empty() && tally.lost_pages == 0,
        "{} of {} runs failed, {} pages lost",
        tally.failed.len(),
        tally.runs,
        tally.lost_pages
    );
}

/// The same soak on a source that does not send again the pages the guest dirtied while
/// a pass was being sent (the seam; only the stop-and-copy's are): the guest finds them
/// stale on the next host, and the soak counts them.
#[test]
fn the_soak_counts_pages_a_source_drops() {
    let tally = ping_pong(91, 3, &[("FERRY_TEST_DROP_LIVE_DIRTY", "1")]);
    assert!(
        tally.lost_pages > 0 && !tally.failed.is_empty(),
        "the seam dropped the pages dirtied during the passes, yet the soak saw {} lost pages in {} runs",
        tally.lost_pages,
        tally.runs
    );
}

/// `runs` hops of the verify guest between two fresh hosts (`tag`), each ferry started
/// with `env`; prints the table and returns the tally.
fn ping_pong(tag: u8, runs: usize, env: &[(&str, &str)]) -> Tally {
    let hosts = TwoHosts::new(tag);
    let addrs = [hosts.addr_a.clone(), hosts.addr_b.clone()];
    let names = [hosts.a.clone(), hosts.b.clone()];
    let dir: PathBuf = std::env::temp_dir().join(format!("ferry-soak-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut tally = Tally {
        guests: 1,
        ..Tally::default()
    };
    let mut serial = dir.join("serial-1.log");
    let mut vm = boot(&hosts, &dir, &serial, 1, env);
    let started = Instant::now();
    for run in 1..=runs {
        tally.runs = run;
        let to = 1 - vm.host;
        let (mut receiver, recv_api) =
            common::spawn_with_api_env(Some(&names[to]), &dir, &format!("r{run}"), &[], env);
        let long = Client::new(recv_api.path(), Some(Duration::from_secs(120)));
        let receiving = std::thread::spawn(move || {
            let body = json!({"receiver_url": format!("tcp:0.0.0.0:{PORT}")});
            long.put("vm.receive-migration", Some(body.to_string().as_bytes()))
        });
        let end = Instant::now() + Duration::from_secs(10);
        while recv_api.get("vm.migration-info").map(|r| r.status).ok() != Some(200) {
            assert!(
                Instant::now() < end,
                "run {run}: the receiver never listened"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let moved_at = std::fs::metadata(&serial).map(|m| m.len()).unwrap_or(0) as usize;
        let body = json!({"destination_url": format!("tcp:{}:{PORT}", addrs[to]),
                          "wait_for_completion": true});
        let sent = vm
            .api
            .put("vm.send-migration", Some(body.to_string().as_bytes()));
        let received = receiving.join().unwrap();
        let ok = matches!((&sent, &received), (Ok(s), Ok(r)) if s.status == 204 && r.status == 204);
        if !ok {
            let why = format!(
                "run {run}: send {:?}, receive {:?}",
                sent.map(|r| (r.status, r.error_message())),
                received.map(|r| (r.status, r.error_message()))
            );
            eprintln!("{why}");
            tally.failed.push(why);
            // The source runs on (a failed migration leaves it so): the next hop retries.
            let _ = receiver.child.kill();
            continue;
        }
        let info: Value = recv_api
            .get("vm.migration-info")
            .ok()
            .and_then(|r| r.json().ok())
            .unwrap_or(Value::Null);
        tally
            .total_ms
            .push(info["total-time"].as_u64().unwrap_or(0));
        tally
            .downtime_ms
            .push(info["downtime"].as_u64().unwrap_or(0));
        let (code, out) = std::mem::replace(&mut vm.ferry, receiver).wait(Duration::from_secs(30));
        if code != Some(0) {
            let why = format!("run {run}: the source ended with {code:?}:\n{out}");
            eprintln!("{why}");
            tally.failed.push(why);
        }
        vm.api = recv_api;
        vm.host = to;
        // The guest on the new host checks every page again: each vCPU finishes the pass
        // it was in at the move and one whole pass more (a page the move lost sits just
        // behind where the vCPU was writing, and is checked only in that next pass).
        let text_end = Instant::now() + Duration::from_secs(60);
        // (Read once the source has ended: lines up to here may still be the source's.)
        let at_move: Vec<u64> = {
            let t = std::fs::read_to_string(&serial).unwrap_or_default();
            (0..2).map(|c| last_pass(&t, c).unwrap_or(0)).collect()
        };
        let fine = loop {
            let t = std::fs::read_to_string(&serial).unwrap_or_default();
            let after = t.get(moved_at..).unwrap_or("");
            if after.contains("MISMATCH") || after.contains("FAIL") {
                break false;
            }
            if (0..2).all(|c| last_pass(after, c).is_some_and(|p| p >= at_move[c as usize] + 2)) {
                break true;
            }
            if Instant::now() > text_end {
                break false;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if !fine {
            let t = std::fs::read_to_string(&serial).unwrap_or_default();
            let lost = t.lines().filter(|l| l.contains("MISMATCH")).count();
            tally.lost_pages += lost;
            let tail: Vec<&str> = t.lines().rev().take(5).collect();
            let why = format!("run {run}: the guest after the hop: {tail:?}");
            eprintln!("{why}");
            tally.failed.push(why);
            // A fresh guest for the rest.
            drop(vm);
            tally.guests += 1;
            serial = dir.join(format!("serial-{}.log", tally.guests));
            vm = boot(&hosts, &dir, &serial, tally.guests, env);
        }
        if run % 50 == 0 || run == runs {
            eprintln!(
                "soak: {run}/{runs} runs, {} failed, {} pages lost, {:.0} s",
                tally.failed.len(),
                tally.lost_pages,
                started.elapsed().as_secs_f64()
            );
        }
    }
    let (mut t, mut d) = (tally.total_ms.clone(), tally.downtime_ms.clone());
    println!("| runs | failed | pages lost | guests booted | median total ms | median downtime ms | max downtime ms | wall s |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {} | {} | {} | {} | {} | {} | {} | {:.0} |",
        tally.runs,
        tally.failed.len(),
        tally.lost_pages,
        tally.guests,
        median(&mut t),
        median(&mut d),
        d.iter().max().copied().unwrap_or(0),
        started.elapsed().as_secs_f64()
    );
    for f in &tally.failed {
        println!("- {}", f.lines().next().unwrap_or(""));
    }
    drop(vm);
    let _ = std::fs::remove_dir_all(&dir);
    tally
}
