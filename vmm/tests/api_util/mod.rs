//! Helpers of the API tests: a `ferry --api-socket` process in its own temporary
//! directory (killed and removed on drop), requests with status checks against the route
//! table, and tiny PVH guests that power off, reset or debug-exit at once.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use vmm::api::client::{Client, Reply};
use vmm::api::routes;

use crate::common::{self, Ferry};

/// A fresh temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "ferry-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A ferry serving the API. Field order: the process dies before its directory goes.
pub struct ApiFerry {
    pub ferry: Option<Ferry>,
    pub client: Client,
    pub sock: PathBuf,
    pub dir: TempDir,
}

impl ApiFerry {
    /// Starts `ferry --api-socket DIR/api.sock ARGS...` and waits until it answers.
    pub fn start(args: &[&str]) -> ApiFerry {
        let dir = TempDir::new("api");
        let sock = dir.0.join("api.sock");
        let mut all = vec!["--api-socket", sock.to_str().unwrap()];
        all.extend_from_slice(args);
        let mut ferry = Ferry::spawn(&all);
        let client = Client::new(&sock, Some(Duration::from_secs(20)));
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = client.get("vmm.ping") {
                assert_eq!(r.status, 200);
                break;
            }
            if let Ok(Some(st)) = ferry.child.try_wait() {
                let (_, out) = ferry.wait(Duration::from_secs(1));
                panic!("ferry ended ({st}) before serving the API:\n{out}");
            }
            assert!(
                Instant::now() < end,
                "the API socket {} never answered",
                sock.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        ApiFerry {
            ferry: Some(ferry),
            client,
            sock,
            dir,
        }
    }

    pub fn serial_path(&self) -> PathBuf {
        self.dir.0.join("serial.log")
    }

    pub fn serial(&self) -> String {
        std::fs::read_to_string(self.serial_path()).unwrap_or_default()
    }

    /// Waits until the serial log has `n` complete lines containing `pat`. Only lines
    /// ended by a newline count: a test that stops or reboots the VM right after must not
    /// cut the guest's line short, or the next boot's first line would land on the same
    /// line and be missed.
    pub fn wait_serial(&self, pat: &str, n: usize, timeout: Duration) {
        let end = Instant::now() + timeout;
        loop {
            let s = self.serial();
            let complete = s.split_inclusive('\n').filter(|l| l.ends_with('\n'));
            if complete.filter(|l| l.contains(pat)).count() >= n {
                return;
            }
            assert!(
                Instant::now() < end,
                "fewer than {n} serial lines with {pat:?} within {timeout:?}:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A VmConfig for `kernel` with serial output to this ferry's serial log.
    pub fn config(&self, kernel: &Path, cmdline: &str) -> Value {
        serde_json::json!({
            "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
            "memory": {"size": 256u64 << 20},
            "payload": {"kernel": kernel, "cmdline": cmdline},
            "serial": {"mode": "File", "file": self.serial_path()},
        })
    }

    /// The test guest, idle once ready.
    pub fn idle_guest_config(&self) -> Value {
        self.config(&common::guest_elf(), "workload=idle")
    }

    /// `method endpoint` must answer `status`; also checks that the route table lists
    /// that status and that error answers carry a JSON `error` message.
    pub fn expect(&self, method: &str, endpoint: &str, body: Option<&[u8]>, status: u16) -> Reply {
        let r = self
            .client
            .request(method, endpoint, body)
            .unwrap_or_else(|e| panic!("{method} {endpoint}: {e}"));
        assert_eq!(
            r.status,
            status,
            "{method} {endpoint} {}: {}",
            body.map(String::from_utf8_lossy).unwrap_or_default(),
            String::from_utf8_lossy(&r.body)
        );
        check_reply(method, endpoint, &r);
        r
    }

    pub fn get(&self, endpoint: &str, status: u16) -> Reply {
        self.expect("GET", endpoint, None, status)
    }

    pub fn put(&self, endpoint: &str, status: u16) -> Reply {
        self.expect("PUT", endpoint, None, status)
    }

    pub fn put_json(&self, endpoint: &str, body: &Value, status: u16) -> Reply {
        self.expect("PUT", endpoint, Some(body.to_string().as_bytes()), status)
    }

    /// The error message of a failed request (checked to be `status`).
    pub fn error(&self, method: &str, endpoint: &str, body: Option<&[u8]>, status: u16) -> String {
        self.expect(method, endpoint, body, status).error_message()
    }

    pub fn state(&self) -> String {
        let info = self.get("vm.info", 200).json().unwrap();
        info["state"].as_str().unwrap().to_string()
    }

    pub fn counters(&self) -> Value {
        self.get("vm.counters", 200).json().unwrap()
    }

    /// Waits for the process to end; its exit code and output.
    pub fn wait_exit(&mut self, timeout: Duration) -> (Option<i32>, String) {
        self.ferry.take().unwrap().wait(timeout)
    }
}

/// A reply's status is one the route table lists for the endpoint, and error answers
/// have the JSON error shape.
pub fn check_reply(method: &str, endpoint: &str, r: &Reply) {
    if let Ok(route) = routes::route(method, &format!("{}{endpoint}", routes::API_PREFIX)) {
        assert!(
            route.statuses.contains(&r.status),
            "{method} {endpoint} answered {}, which the route table (and the spec) does not list",
            r.status
        );
    }
    if r.status >= 400 {
        let v: Value = serde_json::from_slice(&r.body).unwrap_or_else(|e| {
            panic!(
                "error body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&r.body)
            )
        });
        let msg = v[0]
            .as_str()
            .expect("cloud-hypervisor's error shape: an array of strings");
        assert!(!msg.is_empty());
        assert_eq!(
            r.header("content-type"),
            Some("application/json"),
            "{method} {endpoint}"
        );
    }
}

/// Guest code (32-bit protected mode, the PVH entry state) for the tiny guests.
pub mod code {
    /// ACPI PM1a control: SLP_TYP=5 | SLP_EN (the VMM's power-off).
    pub const POWER_OFF: &[u8] = &[
        0x66, 0xba, 0x04, 0x06, // mov dx, 0x604
        0x66, 0xb8, 0x00, 0x34, // mov ax, 0x3400
        0x66, 0xef, // out dx, ax
        0xf4, 0xeb, 0xfd, // hlt; jmp hlt
    ];
    /// i8042 reset pulse.
    pub const RESET: &[u8] = &[
        0xb0, 0xfe, // mov al, 0xfe
        0xe6, 0x64, // out 0x64, al
        0xf4, 0xeb, 0xfd, // hlt; jmp hlt
    ];

    /// Debug-exit with `status`.
    pub fn debug_exit(status: u8) -> Vec<u8> {
        vec![
            0xb0, status, // mov al, status
            0xe6, 0xf4, // out 0xf4, al
            0xf4, 0xeb, 0xfd, // hlt; jmp hlt
        ]
    }
}

/// Writes a 64-bit ELF with `code` loaded and entered (PVH note) at 1 MiB.
pub fn tiny_pvh_elf(dir: &Path, name: &str, code: &[u8]) -> PathBuf {
    const PADDR: u64 = 0x10_0000;
    const EHSIZE: usize = 64;
    const PHENT: usize = 56;
    let mut note = Vec::new();
    note.extend(4u32.to_le_bytes()); // namesz
    note.extend(4u32.to_le_bytes()); // descsz
    note.extend(18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
    note.extend(b"Xen\0");
    note.extend((PADDR as u32).to_le_bytes());
    let data_off = EHSIZE + 2 * PHENT;
    let mut out = vec![0u8; data_off];
    out[..4].copy_from_slice(b"\x7fELF");
    out[4] = 2; // 64-bit
    out[5] = 1; // little-endian
    out[6] = 1; // version
    let put = |o: &mut Vec<u8>, at: usize, v: &[u8]| o[at..at + v.len()].copy_from_slice(v);
    put(&mut out, 16, &2u16.to_le_bytes()); // ET_EXEC
    put(&mut out, 18, &62u16.to_le_bytes()); // x86-64
    put(&mut out, 20, &1u32.to_le_bytes());
    put(&mut out, 24, &PADDR.to_le_bytes()); // e_entry
    put(&mut out, 32, &(EHSIZE as u64).to_le_bytes()); // e_phoff
    put(&mut out, 52, &(EHSIZE as u16).to_le_bytes());
    put(&mut out, 54, &(PHENT as u16).to_le_bytes());
    put(&mut out, 56, &2u16.to_le_bytes()); // phnum
    let segs = [
        (1u32, data_off, PADDR, code.len(), 0x1000u64),
        (4u32, data_off + code.len(), 0, note.len(), 4),
    ];
    for (i, (kind, off, paddr, size, align)) in segs.into_iter().enumerate() {
        let at = EHSIZE + i * PHENT;
        put(&mut out, at, &kind.to_le_bytes());
        put(&mut out, at + 4, &5u32.to_le_bytes()); // R+X
        put(&mut out, at + 8, &(off as u64).to_le_bytes());
        put(&mut out, at + 16, &paddr.to_le_bytes()); // vaddr
        put(&mut out, at + 24, &paddr.to_le_bytes()); // paddr
        put(&mut out, at + 32, &(size as u64).to_le_bytes()); // filesz
        put(&mut out, at + 40, &(size as u64).to_le_bytes()); // memsz
        put(&mut out, at + 48, &align.to_le_bytes());
    }
    out.extend_from_slice(code);
    out.extend_from_slice(&note);
    let path = dir.join(name);
    std::fs::write(&path, out).unwrap();
    path
}
