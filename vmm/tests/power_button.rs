//! `vm.power-button`: the ACPI fixed-feature power button, pressed through the API, seen
//! by the test guest (`power-button=on`: SCI enabled, S5 on a press) in a real ferry.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{spawn_with_api, wait_serial, Ferry};
use vmm::api::client::Client;

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ferry-pwrbtn-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

const PRESSED: &str = "guest: power button pressed: powering off (S5)";

/// A ferry running the verify guest (2 vCPUs) with `extra` on its command line, once
/// both vCPUs checked their share.
fn guest(dir: &Path, extra: &str) -> (Ferry, Client, PathBuf) {
    let serial = dir.join("serial.log");
    let elf = common::guest_elf();
    let cmdline = format!("workload=verify start=1M size=16M {extra}");
    let serial_arg = format!("file={}", serial.display());
    let args = [
        "--kernel",
        elf.to_str().unwrap(),
        "--cmdline",
        &cmdline,
        "--cpus",
        "boot=2",
        "--memory",
        "size=128M",
        "--serial",
        &serial_arg,
    ];
    let (ferry, api) = spawn_with_api(None, dir, "vm", &args);
    wait_serial(&serial, "guest: verified 1 1", 0, Duration::from_secs(120));
    (ferry, api, serial)
}

fn press(api: &Client) {
    let r = api.put("vm.power-button", None).unwrap();
    assert_eq!(r.status, 204, "{}", r.error_message());
}

fn state(api: &Client) -> String {
    let r = api.get("vm.info").unwrap();
    assert_eq!(r.status, 200, "{}", r.error_message());
    r.json().unwrap()["state"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

fn wait_state(api: &Client, want: &str) {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let s = state(api);
        if s == want {
            return;
        }
        assert!(
            Instant::now() < end,
            "the VM is {s}, not {want}, after 60 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn serial_len(p: &Path) -> usize {
    std::fs::metadata(p).map(|m| m.len() as usize).unwrap_or(0)
}

#[test]
fn a_press_powers_the_guest_off_and_the_vm_is_shut_down() {
    let dir = tmpdir("press");
    let (_ferry, api, serial) = guest(&dir, "power-button=on");
    let line = common::serial_line(&serial, "guest: power button sci=", Duration::from_secs(5));
    assert!(line.contains("sci=9") && line.contains("s5=5"), "{line}");
    press(&api);
    wait_serial(&serial, PRESSED, 0, Duration::from_secs(60));
    wait_state(&api, "Shutdown");
    let text = std::fs::read_to_string(&serial).unwrap();
    assert!(
        !text.contains("FAIL") && !text.contains("MISMATCH"),
        "{text}"
    );
}

#[test]
fn a_press_while_paused_is_seen_on_resume() {
    let dir = tmpdir("paused");
    let (_ferry, api, serial) = guest(&dir, "power-button=on");
    assert_eq!(api.put("vm.pause", None).unwrap().status, 204);
    press(&api);
    std::thread::sleep(Duration::from_millis(500));
    let text = std::fs::read_to_string(&serial).unwrap();
    assert!(
        !text.contains(PRESSED),
        "a paused guest acted on the press:\n{text}"
    );
    assert_eq!(state(&api), "Paused");
    assert_eq!(api.put("vm.resume", None).unwrap().status, 204);
    wait_serial(&serial, PRESSED, 0, Duration::from_secs(60));
    wait_state(&api, "Shutdown");
}

/// A guest that did not enable the event takes no interrupt: it runs on, untouched.
#[test]
fn a_guest_that_ignores_the_button_runs_on() {
    let dir = tmpdir("ignored");
    let (_ferry, api, serial) = guest(&dir, "");
    press(&api);
    let pos = serial_len(&serial);
    for cpu in 0..2 {
        wait_serial(
            &serial,
            &format!("guest: verified {cpu} "),
            pos,
            Duration::from_secs(60),
        );
    }
    let text = std::fs::read_to_string(&serial).unwrap();
    assert!(!text.contains(PRESSED), "{text}");
    assert!(
        !text.contains("FAIL") && !text.contains("MISMATCH"),
        "{text}"
    );
    assert_eq!(state(&api), "Running");
}

#[test]
fn without_a_running_vm_the_press_is_refused() {
    let dir = tmpdir("novm");
    let (_ferry, api) = spawn_with_api(None, &dir, "empty", &[]);
    let r = api.put("vm.power-button", None).unwrap();
    assert_eq!(r.status, 404, "{}", r.error_message());
    let elf = common::guest_elf();
    let body = serde_json::json!({"payload": {"kernel": elf}, "memory": {"size": 64 << 20}});
    let r = api
        .put("vm.create", Some(body.to_string().as_bytes()))
        .unwrap();
    assert_eq!(r.status, 204, "{}", r.error_message());
    let r = api.put("vm.power-button", None).unwrap();
    assert_eq!(r.status, 405, "{}", r.error_message());
    assert!(
        r.error_message().contains("vm.power-button"),
        "{}",
        r.error_message()
    );
}

/// QEMU's `system_powerdown` over QMP presses the same button: the guest powers off and
/// QMP says so with QEMU's SHUTDOWN event (guest-initiated).
#[test]
fn qmp_system_powerdown_presses_the_button() {
    let dir = tmpdir("qmp");
    let serial = dir.join("serial.log");
    let sock = dir.join("qmp.sock");
    let elf = common::guest_elf();
    let qmp_arg = format!("unix:{}", sock.display());
    let serial_arg = format!("file={}", serial.display());
    let _ferry = Ferry::spawn(&[
        "--qmp",
        &qmp_arg,
        "--kernel",
        elf.to_str().unwrap(),
        "--cmdline",
        "workload=verify start=1M size=16M power-button=on",
        "--memory",
        "size=128M",
        "--serial",
        &serial_arg,
    ]);
    wait_serial(&serial, "guest: verified 0 1", 0, Duration::from_secs(120));
    let mut q = common::qmp::Qmp::negotiated(&sock);
    assert_eq!(
        q.ok("system_powerdown", serde_json::json!({})),
        serde_json::json!({})
    );
    wait_serial(&serial, PRESSED, 0, Duration::from_secs(60));
    q.event("SHUTDOWN", |d| d["guest"] == true, Duration::from_secs(60));
}
