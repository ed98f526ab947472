//! `--event-monitor` (cloud-hypervisor's flag and event shape): every lifecycle step the
//! API takes is one JSON object in the file, in order, with a timestamp that never goes
//! back; a migration that fails says so; a bad option is refused naming it.

mod api_util;
mod common;

use std::time::Duration;

use api_util::{ApiFerry, TempDir};
use serde_json::{json, Value};

/// The events in `path`: concatenated JSON objects, as cloud-hypervisor writes them.
fn events(path: &std::path::Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    serde_json::Deserializer::from_str(&text)
        .into_iter::<Value>()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("the event file is not a JSON stream ({e}):\n{text}"))
}

fn names(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| {
            format!(
                "{}:{}",
                e["source"].as_str().unwrap(),
                e["event"].as_str().unwrap()
            )
        })
        .collect()
}

#[test]
fn lifecycle_and_migration_events_in_cloud_hypervisors_shape() {
    let dir = TempDir::new("events");
    let file = dir.0.join("events.json");
    let arg = format!("path={}", file.display());
    let mut f = ApiFerry::start(&["--event-monitor", &arg]);
    f.put_json("vm.create", &f.idle_guest_config(), 204);
    f.put("vm.boot", 204);
    f.put("vm.pause", 204);
    f.put("vm.resume", 204);
    f.put("vm.reboot", 204);
    // Nobody listens there: the migration starts and fails, the VM goes on.
    let msg = f.error(
        "PUT",
        "vm.send-migration",
        Some(
            json!({"destination_url": "unix:/nonexistent-ferry-dir/m.sock",
                   "wait_for_completion": true})
            .to_string()
            .as_bytes(),
        ),
        500,
    );
    assert!(msg.contains("cannot connect"), "{msg}");
    f.put("vm.shutdown", 204);
    f.put("vm.delete", 204);
    f.put("vmm.shutdown", 204);
    let (code, out) = f.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(0), "{out}");

    let all = events(&file);
    assert_eq!(
        names(&all),
        [
            "vmm:starting",
            "vm:booting",
            "vm:booted",
            "vm:pausing",
            "vm:paused",
            "vm:resuming",
            "vm:resumed",
            "vm:rebooting",
            "vm:rebooted",
            "vm:migration-started",
            "vm:migration-failed",
            "vm:shutdown",
            "vm:deleted",
            "vmm:shutdown",
        ],
        "{all:#?}"
    );
    let mut last = 0u128;
    for e in &all {
        let t = &e["timestamp"];
        let (secs, nanos) = (t["secs"].as_u64().unwrap(), t["nanos"].as_u64().unwrap());
        assert!(nanos < 1_000_000_000, "{e}");
        let at = u128::from(secs) * 1_000_000_000 + u128::from(nanos);
        assert!(at >= last, "time went back at {e}");
        last = at;
        assert_eq!(e.as_object().unwrap().len(), 4, "{e}");
    }
    assert_eq!(all[1]["properties"], Value::Null);
    let started = &all[9]["properties"];
    assert_eq!(
        started["url"], "unix:/nonexistent-ferry-dir/m.sock",
        "{started}"
    );
}

#[test]
fn a_bad_event_monitor_option_is_named() {
    for (bad, needle) in [
        ("file=/tmp/x", "\"file=/tmp/x\""),
        ("fd=999999", "fd=999999"),
        (
            "path=/nonexistent-ferry-dir/events",
            "/nonexistent-ferry-dir/events",
        ),
    ] {
        let out = std::process::Command::new(common::ferry_bin())
            .args(["--event-monitor", bad])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad}: {err}");
        assert!(err.contains(needle), "{bad}: {err}");
    }
}
