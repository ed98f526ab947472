//! Boots the test guest (`target/test-guest/guest.elf`, built by `test_guest/build.sh`;
//! `$FERRY_TEST_GUEST_TARGET/test-guest/guest.elf` when that is set)
//! under QEMU with KVM and checks what it prints and how it exits, with 1, 2 and 4 vCPUs.
//!
//! Needs /dev/kvm and `qemu-system-x86_64` (`apt-get install -y qemu-system-x86`; the
//! project's scripts install it). `FERRY_QEMU_CPU` overrides the CPU model (default
//! `qemu64`: `-cpu host` trips over an MSR on nested hosts). QEMU's isa-debug-exit turns
//! the guest's exit byte `b` into the process status `(b << 1) | 1`: 1 = PASS, 3 = FAIL.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// QEMU status for a guest that exited with 0 (PASS) and with 1 (FAIL / bad argument).
const STATUS_PASS: i32 = 1;
const STATUS_FAIL: i32 = 3;
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
const RUN_TIMEOUT: Duration = Duration::from_secs(180);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Builds the guest once per test process (a no-op for cargo when it is up to date, and
/// it makes sure the ELF is there) and returns its path.
fn guest_elf() -> PathBuf {
    static ELF: OnceLock<PathBuf> = OnceLock::new();
    ELF.get_or_init(|| {
        let root = repo_root();
        let st = Command::new(root.join("test_guest/build.sh"))
            .status()
            .expect("run test_guest/build.sh");
        assert!(st.success(), "test_guest/build.sh failed: {st}");
        // build.sh puts it there too when FERRY_TEST_GUEST_TARGET is set.
        let elf = match std::env::var_os("FERRY_TEST_GUEST_TARGET") {
            Some(dir) => PathBuf::from(dir).join("test-guest/guest.elf"),
            None => root.join("target/test-guest/guest.elf"),
        };
        assert!(elf.exists(), "{} missing after build", elf.display());
        elf
    })
    .clone()
}

/// Whether `qemu-system-x86_64` runs at all (the virtio-iommu tests skip without it).
fn qemu_installed() -> bool {
    Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn qemu_binary() -> &'static str {
    let found = Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "qemu-system-x86_64 is not installed: run `apt-get install -y qemu-system-x86` \
         (scripts/dev_cli.sh tests does it for you)"
    );
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: these tests boot the guest under QEMU with KVM"
    );
    "qemu-system-x86_64"
}

/// One QEMU at a time: the guests are timed and the machine may have few cores.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running QEMU whose serial output (stdout) and messages (stderr) are read line by
/// line. Killed when dropped.
struct Qemu {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
    what: String,
    _serial: MutexGuard<'static, ()>,
}

impl Qemu {
    fn boot(cpus: u32, memory: &str, cmdline: &str, extra: &[&str]) -> Qemu {
        let qemu = qemu_binary();
        let elf = guest_elf();
        let serial = one_at_a_time();
        let cpu = std::env::var("FERRY_QEMU_CPU").unwrap_or_else(|_| "qemu64".into());
        let smp = cpus.to_string();
        let mut cmd = Command::new(qemu);
        cmd.args(["-accel", "kvm", "-cpu", &cpu, "-m", memory, "-smp", &smp])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .args(["-serial", "stdio", "-no-reboot"])
            .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
            .arg("-kernel")
            .arg(&elf)
            .args(["-append", cmdline])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start qemu-system-x86_64");
        let (tx, lines) = channel();
        let out: [Box<dyn Read + Send>; 2] = [
            Box::new(child.stdout.take().unwrap()),
            Box::new(child.stderr.take().unwrap()),
        ];
        for stream in out {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for l in BufReader::new(stream).split(b'\n').map_while(Result::ok) {
                    let l = String::from_utf8_lossy(&l).trim_end().to_string();
                    if tx.send(l).is_err() {
                        break;
                    }
                }
            });
        }
        Qemu {
            child,
            lines,
            seen: vec![],
            what: format!("-smp {cpus} -m {memory} -append '{cmdline}'"),
            _serial: serial,
        }
    }

    /// Everything seen so far, for failure messages.
    fn transcript(&self) -> String {
        format!("qemu {}:\n{}", self.what, self.seen.join("\n"))
    }

    /// The guest's lines seen so far (`guest: ...`).
    fn guest_lines(&self) -> Vec<&str> {
        self.seen
            .iter()
            .filter_map(|l| l.find("guest: ").map(|i| &l[i..]))
            .collect()
    }

    /// Waits until `done(guest lines so far)`; panics with the transcript on timeout or if
    /// QEMU ends first.
    fn wait_for(&mut self, what: &str, timeout: Duration, done: impl Fn(&[&str]) -> bool) {
        let end = Instant::now() + timeout;
        while !done(&self.guest_lines()) {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => self.seen.push(l),
                Err(_) => panic!("{what}: not seen within {timeout:?}\n{}", self.transcript()),
            }
        }
    }

    /// Waits for QEMU to exit (killing it after `timeout`); returns its status code.
    fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let end = Instant::now() + timeout;
        let code = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st.code();
            }
            if Instant::now() > end {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break None;
            }
            if let Ok(l) = self.lines.recv_timeout(Duration::from_millis(50)) {
                self.seen.push(l);
            }
        };
        while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(300)) {
            self.seen.push(l);
        }
        code
    }

    fn still_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `pci=scan` on QEMU's own PCI: the pc machine (0xCF8 only, no MCFG) and q35 (ECAM
/// announced by MCFG). The same code checks Ferry's bus (vmm/tests/test_guest.rs).
#[test]
fn pci_scan_agrees_with_qemu_pc_and_q35() {
    for (machine, bridge, ecam) in [
        (
            "pc",
            "guest: pci 00:00.0 8086:1237 class 060000",
            "guest: pci ecam none (no MCFG)",
        ),
        (
            "q35",
            "guest: pci 00:00.0 8086:29c0 class 060000",
            "guest: pci ecam 0xb0000000 agrees (2 devices)",
        ),
    ] {
        let mut q = Qemu::boot(
            1,
            "128",
            "workload=verify size=4M passes=1 pci=scan",
            &["-machine", machine],
        );
        let code = q.wait_exit(RUN_TIMEOUT);
        let lines = q.guest_lines();
        assert!(
            lines.contains(&bridge) && lines.contains(&ecam),
            "{machine}: {}",
            q.transcript()
        );
        assert_eq!(code, Some(STATUS_PASS), "{machine}: {}", q.transcript());
    }
}

fn ready_line(cpus: u32, workload: &str) -> String {
    format!("guest: ready cpus={cpus} workload={workload} ")
}

#[test]
fn idle_reports_every_cpu_and_stays_halted() {
    for cpus in [1, 2, 4] {
        let mut q = Qemu::boot(cpus, "256", "console=ttyS0 workload=idle", &[]);
        q.wait_for("the ready line", BOOT_TIMEOUT, |l| !l.is_empty());
        let first = q.guest_lines()[0].to_string();
        assert!(
            first.starts_with(&ready_line(cpus, "idle")),
            "{}",
            q.transcript()
        );
        std::thread::sleep(Duration::from_secs(1));
        assert!(q.still_running(), "idle guest exited\n{}", q.transcript());
    }
}

#[test]
fn dirty_passes_come_from_every_cpu() {
    for cpus in [1, 2, 4] {
        let mut q = Qemu::boot(cpus, "256", "workload=dirty", &[]);
        q.wait_for("the ready line", BOOT_TIMEOUT, |l| !l.is_empty());
        assert!(
            q.guest_lines()[0].starts_with(&ready_line(cpus, "dirty")),
            "{}",
            q.transcript()
        );
        // Every vCPU gets past its first pass, over and over.
        q.wait_for("a pass > 1 from every cpu", BOOT_TIMEOUT, |lines| {
            (0..cpus).all(|c| {
                lines.iter().any(|l| {
                    l.strip_prefix(&format!("guest: pass {c} "))
                        .and_then(|n| n.parse::<u64>().ok())
                        .is_some_and(|n| n > 1)
                })
            })
        });
        assert!(q.still_running(), "{}", q.transcript());
    }
}

#[test]
fn dirty_with_passes_ends_in_pass() {
    let mut q = Qemu::boot(2, "256", "workload=dirty passes=3 size=16M", &[]);
    let code = q.wait_exit(RUN_TIMEOUT);
    let lines = q.guest_lines();
    assert_eq!(code, Some(STATUS_PASS), "{}", q.transcript());
    assert_eq!(lines.last(), Some(&"guest: PASS"), "{}", q.transcript());
    for c in 0..2 {
        assert!(
            lines.contains(&format!("guest: pass {c} 3").as_str()),
            "{}",
            q.transcript()
        );
    }
}

#[test]
fn verify_three_passes_pass() {
    for cpus in [1, 2, 4] {
        let mut q = Qemu::boot(cpus, "256", "workload=verify passes=3", &[]);
        let code = q.wait_exit(RUN_TIMEOUT);
        let t = q.transcript();
        let lines = q.guest_lines();
        assert_eq!(code, Some(STATUS_PASS), "{t}");
        assert!(lines[0].starts_with(&ready_line(cpus, "verify")), "{t}");
        assert!(
            lines[0].contains("start=0x100000 size=0x6400000 passes=3"),
            "{t}"
        );
        for c in 0..cpus {
            assert!(
                lines.contains(&format!("guest: verified {c} 3").as_str()),
                "{t}"
            );
        }
        assert!(
            !lines
                .iter()
                .any(|l| l.contains("MISMATCH") || l.contains("FAIL")),
            "{t}"
        );
        assert_eq!(lines.last(), Some(&"guest: PASS"), "{t}");
    }
}

#[test]
fn bad_arguments_are_named_and_fail() {
    for (cmdline, expected) in [
        ("workload=fast", "guest: bad argument workload=fast"),
        ("workload=verify passes=0", "guest: bad argument passes=0"),
        ("rate=quick", "guest: bad argument rate=quick"),
        ("size=0", "guest: bad argument size=0"),
        (
            "start=0x30000 size=4K",
            "guest: bad argument start=0x30000 ",
        ),
        ("workload=verify size=1G", "guest: bad argument size=1G "),
        (
            "workload=dma-verify",
            "guest: bad argument dma= (required with workload=dma-verify: blk or rng)",
        ),
        (
            "workload=dma-bench dma=blk bs=3K",
            "guest: bad argument bs=3K (a multiple of 4K from 4K to 1M)",
        ),
        // The region fits below the top of RAM (0xffdd000 or so), the driver memory
        // that follows it does not.
        (
            "workload=dma-verify dma=rng size=0xfed0000",
            "guest: bad argument size=0xfed0000 (driver memory after the workload regions, 0xffd0000-",
        ),
    ] {
        let mut q = Qemu::boot(1, "256", cmdline, &[]);
        let code = q.wait_exit(BOOT_TIMEOUT);
        let t = q.transcript();
        let lines = q.guest_lines();
        assert_eq!(code, Some(STATUS_FAIL), "{t}");
        assert!(
            lines.iter().any(|l| l.starts_with(expected)),
            "want {expected:?}\n{t}"
        );
        assert!(!lines.iter().any(|l| l.starts_with("guest: ready")), "{t}");
    }
}

/// Stopped at any moment, the `dirty` workload's counters satisfy
/// `check_dirty_counters` share by share (memory read through QEMU's gdb stub).
#[test]
fn dirty_counters_are_consistent_whenever_stopped() {
    const START: u64 = 0x40_0000;
    const PAGES: u64 = 512;
    let port = free_port();
    let gdb = format!("tcp:127.0.0.1:{port}");
    let cmdline = format!("workload=dirty start={START:#x} size={}", PAGES * 4096);
    let mut q = Qemu::boot(2, "256", &cmdline, &["-gdb", &gdb]);
    q.wait_for("a pass > 1 from both cpus", BOOT_TIMEOUT, |l| {
        (0..2).all(|c| {
            l.iter()
                .any(|x| x.starts_with(&format!("guest: pass {c} 2")))
        })
    });
    for round in 0..3 {
        let mut stub = GdbStub::connect(port);
        for cpu in 0..2 {
            let pages = guest_pattern::share(PAGES, 2, cpu);
            let bytes: Vec<u8> = pages.map(|p| stub.read_byte(START + p * 4096)).collect();
            if let Err(e) = guest_pattern::check_dirty_counters(bytes.iter().copied()) {
                panic!(
                    "round {round}, cpu {cpu}: {e}\n{bytes:?}\n{}",
                    q.transcript()
                );
            }
        }
        stub.detach();
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// A page changed behind the guest's back (as a lost dirty page would leave it) is
/// reported: memory is written through QEMU's gdb stub while `verify` runs.
#[test]
fn verify_reports_a_corrupted_page() {
    let port = free_port();
    let gdb = format!("tcp:127.0.0.1:{port}");
    let mut q = Qemu::boot(2, "256", "workload=verify size=8M", &["-gdb", &gdb]);
    // Both vCPUs have written every page of their share at least once.
    let (code, t, lines, mismatch) = corrupt_two_pages(&mut q, port, "verified");
    assert!(
        mismatch.contains(" expected=") && mismatch.contains(" found="),
        "{t}"
    );
    assert!(mismatch.ends_with("(bad checksum)"), "{t}");
    assert!(
        mismatch.contains("gpa=0x164000 ") || mismatch.contains("gpa=0x6dc000 "),
        "{t}"
    );
    assert!(lines.iter().any(|l| l == "guest: FAIL"), "{t}");
    assert_eq!(code, Some(STATUS_FAIL), "{t}");
}

/// A sparse raw disk image in the temporary directory, removed when dropped.
struct TempDisk(PathBuf);

impl TempDisk {
    fn new(bytes: u64) -> TempDisk {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("ferry-dma-verify-{}-{n}.raw", std::process::id()));
        let f = std::fs::File::create(&path)
            .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        f.set_len(bytes).unwrap();
        TempDisk(path)
    }

    /// QEMU arguments for a virtio-blk-pci disk backed by this file.
    fn qemu_args(&self) -> Vec<String> {
        vec![
            "-device".into(),
            "virtio-blk-pci,drive=d0".into(),
            "-drive".into(),
            format!("file={},if=none,id=d0,format=raw", self.0.display()),
        ]
    }
}

impl Drop for TempDisk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The figures of `guest: dma interrupts <n> (irq=<mode>, <k> completions)`: n, mode, k.
fn dma_interrupts(lines: &[&str]) -> Option<(u64, String, u64)> {
    let rest = lines
        .iter()
        .find_map(|l| l.strip_prefix("guest: dma interrupts "))?;
    let (n, rest) = rest.split_once(" (irq=")?;
    let (mode, rest) = rest.split_once(", ")?;
    let k = rest.strip_suffix(" completions)")?;
    Some((n.parse().ok()?, mode.to_string(), k.parse().ok()?))
}

/// Checks the interrupt lines of a `dma-verify` / `dma-bench` run that passed: with
/// `irq=msix` (in `cmdline`) `guest: dma irq=msix ... vectors=<queues>/.. idt=0x40-..`
/// after the device line, with `irq=intx` `guest: dma irq=intx pin=A line=..`, and at
/// least one interrupt but no more than completions (the guest itself fails a queue that
/// completed requests without one); otherwise none.
fn check_dma_interrupts(cmdline: &str, lines: &[&str], t: &str) {
    let (n, mode, k) =
        dma_interrupts(lines).unwrap_or_else(|| panic!("no `guest: dma interrupts` line:\n{t}"));
    assert!(k > 0, "{t}");
    if cmdline.contains("irq=msix") {
        assert_eq!(mode, "msix", "{t}");
        assert!(n > 0 && n <= k, "{n} interrupts for {k} completions:\n{t}");
        let queues = lines
            .iter()
            .find_map(|l| l.strip_prefix("guest: dma device="))
            .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix("queues=")))
            .unwrap_or_else(|| panic!("no queues= on the device line:\n{t}"));
        let msix = lines
            .iter()
            .find(|l| l.starts_with("guest: dma irq=msix table="))
            .unwrap_or_else(|| panic!("no `guest: dma irq=msix` line:\n{t}"));
        let last: u32 = 0x40 + queues.parse::<u32>().unwrap() - 1;
        assert!(
            msix.contains(&format!(" vectors={queues}/"))
                && msix.contains(&format!(" idt=0x40-{last:#x} ")),
            "{t}"
        );
        eprintln!("irq=msix: {n} interrupts for {k} completions ({queues} queue(s))");
    } else if cmdline.contains("irq=intx") {
        assert_eq!(mode, "intx", "{t}");
        assert!(n > 0 && n <= k, "{n} interrupts for {k} completions:\n{t}");
        let intx = lines
            .iter()
            .find(|l| l.starts_with("guest: dma irq=intx pin=A line="))
            .unwrap_or_else(|| panic!("no `guest: dma irq=intx` line:\n{t}"));
        assert!(intx.contains(" idt=0x60 "), "{t}");
        eprintln!("irq=intx: {n} interrupts for {k} completions ({intx})");
    } else {
        assert_eq!((n, mode.as_str()), (0, "off"), "{t}");
    }
}

/// Boots `dma-verify` with `cmdline` and `-device` arguments `extra`, expects PASS from
/// every vCPU after `passes` passes (and `verified` lines too when `vsize=` is given), and
/// the interrupts `irq=` asks for. Returns how long QEMU ran.
fn dma_verify_passes(cpus: u32, cmdline: &str, passes: u64, extra: &[String]) -> Duration {
    dma_verify_run(cpus, cmdline, passes, extra).0
}

/// [`dma_verify_passes`], also returning the guest's lines and the transcript.
fn dma_verify_run(
    cpus: u32,
    cmdline: &str,
    passes: u64,
    extra: &[String],
) -> (Duration, Vec<String>, String) {
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let t0 = Instant::now();
    let mut q = Qemu::boot(cpus, "256", cmdline, &extra);
    let code = q.wait_exit(RUN_TIMEOUT);
    let took = t0.elapsed();
    let t = q.transcript();
    let lines = q.guest_lines();
    assert_eq!(code, Some(STATUS_PASS), "{t}");
    assert!(lines[0].starts_with(&ready_line(cpus, "dma-verify")), "{t}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("guest: dma device=virtio-")),
        "{t}"
    );
    for c in 0..cpus {
        assert!(
            lines.contains(&format!("guest: dma-verified {c} {passes}").as_str()),
            "{t}"
        );
        if cmdline.contains("vsize=") {
            assert!(
                lines.contains(&format!("guest: verified {c} {passes}").as_str()),
                "{t}"
            );
        }
    }
    assert!(
        !lines
            .iter()
            .any(|l| l.contains("MISMATCH") || l.contains("FAIL")),
        "{t}"
    );
    assert_eq!(lines.last(), Some(&"guest: PASS"), "{t}");
    check_dma_interrupts(cmdline, &lines, &t);
    eprintln!("{cpus} vCPU(s), '{cmdline}': {took:.1?}");
    let lines = lines.iter().map(|l| l.to_string()).collect();
    (took, lines, t)
}

/// `dma=blk`: the guest writes the disk, then has the device read every page of the
/// region three times over from alternating halves of the disk, checking each time.
#[test]
fn dma_verify_blk_three_passes_pass() {
    const SIZE: u64 = 64 << 20;
    for cpus in [1, 2] {
        let disk = TempDisk::new(guest_pattern::dma::disk_bytes_needed(SIZE));
        dma_verify_passes(
            cpus,
            "workload=dma-verify dma=blk size=64M passes=3",
            3,
            &disk.qemu_args(),
        );
    }
}

/// `dma=rng`: every page is refilled with random bytes each pass and must not change
/// between passes.
#[test]
fn dma_verify_rng_three_passes_pass() {
    let rng = ["-device".to_string(), "virtio-rng-pci".to_string()];
    for cpus in [1, 2] {
        dma_verify_passes(
            cpus,
            "workload=dma-verify dma=rng size=64M passes=3",
            3,
            &rng,
        );
    }
}

/// `vsize=`: `verify` runs on a second region alongside the DMA work, on every vCPU.
#[test]
fn dma_verify_with_a_verify_region_passes() {
    let rng = ["-device".to_string(), "virtio-rng-pci".to_string()];
    dma_verify_passes(
        2,
        "workload=dma-verify dma=rng size=16M vsize=16M passes=3",
        3,
        &rng,
    );
}

/// `irq=msix`: the driver enables MSI-X with an entry per queue (QEMU's virtio-blk has a
/// queue per vCPU) and takes the interrupts in ring 3, counting them, while it still
/// completes by polling; at least one must arrive. `dma-verify` with virtio-blk on 1 and
/// 2 vCPUs and with virtio-rng on 1; `dma-bench` one pass over a 4 MiB disk.
#[test]
fn dma_workloads_count_msix_interrupts() {
    const SIZE: u64 = 16 << 20;
    for cpus in [1, 2] {
        let disk = TempDisk::new(guest_pattern::dma::disk_bytes_needed(SIZE));
        dma_verify_passes(
            cpus,
            "workload=dma-verify dma=blk size=16M passes=2 irq=msix",
            2,
            &disk.qemu_args(),
        );
    }
    let rng = ["-device".to_string(), "virtio-rng-pci".to_string()];
    dma_verify_passes(
        1,
        "workload=dma-verify dma=rng size=16M passes=2 irq=msix",
        2,
        &rng,
    );
    let disk = TempDisk::new(4 << 20);
    let line = dma_bench_line(
        "workload=dma-bench dma=blk bs=64K passes=1 size=4M irq=msix",
        &disk,
    );
    assert_eq!(dma_bench_figures(&line).1, 64, "{line}");
}

/// `irq=intx`: MSI-X left off, the driver routes the line SeaBIOS wrote in the interrupt
/// line register (an ISA IRQ on QEMU's pc machine: 10 or 11) through the I/O APIC,
/// level-triggered, and its handler reads the ISR to acknowledge. virtio-blk on 2 vCPUs
/// (2 queues, one line), virtio-rng on 1.
#[test]
fn dma_verify_counts_intx_interrupts() {
    const SIZE: u64 = 16 << 20;
    let disk = TempDisk::new(guest_pattern::dma::disk_bytes_needed(SIZE));
    dma_verify_passes(
        2,
        "workload=dma-verify dma=blk size=16M passes=2 irq=intx",
        2,
        &disk.qemu_args(),
    );
    let rng = ["-device".to_string(), "virtio-rng-pci".to_string()];
    dma_verify_passes(
        1,
        "workload=dma-verify dma=rng size=16M passes=2 irq=intx",
        2,
        &rng,
    );
}

/// QEMU arguments for a virtio-iommu and `dma`'s device behind it: `iommu_platform=on`
/// (QEMU's VIRTIO_F_ACCESS_PLATFORM, without which the device's DMA bypasses the IOMMU)
/// needs a modern-only device (`disable-legacy=on`); `disk` for blk.
/// The DMA device's `guest: dma device=` line shows ACCESS_PLATFORM agreed (its DMA goes
/// through the virtio-iommu).
fn assert_access_platform(lines: &[String], t: &str) {
    let features = u64::from_str_radix(
        field(lines, "guest: dma device=", "features", t).trim_start_matches("0x"),
        16,
    )
    .unwrap();
    assert_ne!(
        features & guest_pattern::viommu::F_ACCESS_PLATFORM,
        0,
        "{t}"
    );
}

fn iommu_args(machine: &str, dma: &str, disk: Option<&TempDisk>) -> Vec<String> {
    let mut a: Vec<String> = ["-machine", machine, "-device", "virtio-iommu-pci"]
        .map(String::from)
        .to_vec();
    let behind = "iommu_platform=on,disable-legacy=on";
    match (dma, disk) {
        ("blk", Some(d)) => a.extend([
            "-device".into(),
            format!("virtio-blk-pci,drive=d0,{behind}"),
            "-drive".into(),
            format!("file={},if=none,id=d0,format=raw", d.0.display()),
        ]),
        ("rng", None) => a.extend(["-device".into(), format!("virtio-rng-pci,{behind}")]),
        _ => panic!("iommu_args({dma}, {})", disk.is_some()),
    }
    a
}

/// The `key=` value of the first guest line starting with `prefix`.
fn field<'a>(lines: &'a [String], prefix: &str, key: &str, t: &str) -> &'a str {
    lines
        .iter()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting {prefix:?}:\n{t}"))
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|w| w.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key}= on the {prefix:?} line:\n{t}"))
}

/// `dma-verify iommu=on remap=on detach=on nested-dirty=on` under QEMU 7.2's
/// virtio-iommu-pci (q35; rng also on pc), blk and rng on 2 vCPUs, 3 passes: the guest
/// finds the IOMMU, PROBEs the endpoint (QEMU reports the x86 MSI window as RESV_MEM),
/// maps the region at IOVAs a TiB away from its GPAs, remaps a window per pass and vCPU,
/// detaches and re-attaches between passes, and every page checks. QEMU has no
/// DIRTY_TRACKING (bit 10): the guest says so and runs without it.
#[test]
fn dma_verify_through_qemus_virtio_iommu() {
    if !qemu_installed() {
        eprintln!("skipped: qemu-system-x86_64 is not installed");
        return;
    }
    const SIZE: u64 = 16 << 20;
    let cmdline = |dma: &str| {
        format!("workload=dma-verify dma={dma} size=16M passes=3 iommu=on remap=on detach=on nested-dirty=on")
    };
    let disk = TempDisk::new(guest_pattern::dma::disk_bytes_needed(SIZE));
    for (machine, dma, cpus) in [("q35", "rng", 2), ("q35", "blk", 2), ("pc", "rng", 1)] {
        let args = iommu_args(machine, dma, (dma == "blk").then_some(&disk));
        let (_, lines, t) = dma_verify_run(cpus, &cmdline(dma), 3, &args);
        let t = format!("-machine {machine}: {t}");
        let has = |l: &str| lines.iter().any(|x| x == l);
        assert!(
            has("guest: note: nested dirty tracking not offered (feature bit 10); running without it"),
            "{t}"
        );
        assert!(
            lines[0].ends_with(" iommu=on remap=on detach=on nested-dirty=on"),
            "{t}"
        );
        // The device, its features (VERSION_1, MAP_UNMAP, PROBE, BYPASS_CONFIG taken; no
        // bit 10), bypass written 0.
        let features = u64::from_str_radix(
            field(&lines, "guest: viommu device ", "features", &t).trim_start_matches("0x"),
            16,
        )
        .unwrap();
        let want = guest_pattern::viommu::F_VERSION_1
            | guest_pattern::viommu::F_MAP_UNMAP
            | guest_pattern::viommu::F_PROBE
            | guest_pattern::viommu::F_BYPASS_CONFIG;
        assert_eq!(features & want, want, "{t}");
        assert_eq!(features & guest_pattern::viommu::F_DIRTY_TRACKING, 0, "{t}");
        assert_eq!(
            field(&lines, "guest: viommu config ", "bypass", &t),
            "0",
            "{t}"
        );
        // The endpoint is the DMA device's BDF.
        let pci = field(&lines, "guest: dma device=", "pci", &t);
        let slot = u32::from_str_radix(&pci[3..5], 16).unwrap();
        let endpoint = format!("{:#x}", slot << 3);
        assert!(
            has(&format!(
                "guest: viommu probe endpoint={endpoint} resv_mem subtype=msi start=0xfee00000 end=0xfeefffff"
            )),
            "{t}"
        );
        let main = "guest: viommu pci=";
        assert_eq!(field(&lines, main, "endpoint", &t), endpoint, "{t}");
        assert_eq!(
            field(&lines, main, "region_iova", &t),
            "0x10000000000",
            "{t}"
        );
        assert_eq!(field(&lines, main, "windows", &t), "8", "{t}");
        assert_eq!(
            field(&lines, main, "nested-dirty", &t),
            "not-offered",
            "{t}"
        );
        // The device's DMA went through it: ACCESS_PLATFORM agreed.
        assert_access_platform(&lines, &t);
        // A remap per pass and vCPU, a re-attach between passes, no fault.
        let done = "guest: viommu done ";
        let count = |key: &str| -> u64 { field(&lines, done, key, &t).parse().unwrap() };
        // (blk's pass 0, which only reads the disk into the region, has one too.)
        let passes = if dma == "blk" { 4 } else { 3 };
        let remaps = passes * u64::from(cpus);
        assert_eq!(count("remaps"), remaps, "{t}");
        assert_eq!(count("unmaps"), remaps, "{t}");
        assert_eq!(count("detaches"), 2, "{t}");
        // Initial maps (8 windows + the driver memory), again after each re-attach, one
        // per remap.
        assert_eq!(count("maps"), 3 * 9 + remaps, "{t}");
        assert_eq!(count("faults"), 0, "{t}");
        // (Every other remap moves the window to the other IOVA bank; the remap lines are
        // rate-limited, so under load the one showing it may not be printed: the counts
        // above are what is checked.)
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("guest: viommu re-attached endpoint=")),
            "{t}"
        );
    }
}

/// `fault=on` under QEMU: the device gets a buffer at an IOVA nothing maps; QEMU's
/// virtio-iommu reports MAPPING faults for the endpoint at addresses in that buffer (its
/// devices then complete the request as if it had worked: the guest notes it), the guest
/// resets the device and runs its passes.
#[test]
fn qemus_virtio_iommu_reports_a_fault_at_an_unmapped_iova() {
    if !qemu_installed() {
        eprintln!("skipped: qemu-system-x86_64 is not installed");
        return;
    }
    let disk = TempDisk::new(32 << 20);
    for dma in ["rng", "blk"] {
        let args = iommu_args("q35", dma, (dma == "blk").then_some(&disk));
        let cmdline = format!("workload=dma-verify dma={dma} size=16M passes=1 iommu=on fault=on");
        let (_, lines, t) = dma_verify_run(1, &cmdline, 1, &args);
        let test = lines
            .iter()
            .find(|l| l.starts_with("guest: viommu fault-test "))
            .unwrap_or_else(|| panic!("no fault-test line:\n{t}"));
        assert!(
            test.starts_with(&format!(
                "guest: viommu fault-test dma={dma} iova=0xffffff0000 "
            )),
            "{t}"
        );
        let endpoint = field(&lines, "guest: viommu pci=", "endpoint", &t);
        let faults: Vec<&String> = lines
            .iter()
            .filter(|l| l.starts_with("guest: viommu fault reason="))
            .collect();
        assert!(!faults.is_empty(), "{t}");
        for f in &faults {
            assert!(
                f.starts_with("guest: viommu fault reason=mapping flags=0x100 endpoint=")
                    && f.contains(&format!(" endpoint={endpoint} address=0xffffff0")),
                "{f}\n{t}"
            );
        }
        let n: usize = field(&lines, "guest: viommu fault-test ", "faults", &t)
            .parse()
            .unwrap();
        assert_eq!(n, faults.len(), "{t}");
        eprintln!("{dma}: {test}");
    }
}

/// What `iommu=on` refuses: no virtio-iommu, a device QEMU does not put behind it
/// (`iommu_platform=off`: no ACCESS_PLATFORM), and the new keys without `iommu=on` or with
/// another workload.
#[test]
fn dma_verify_iommu_refusals() {
    if !qemu_installed() {
        eprintln!("skipped: qemu-system-x86_64 is not installed");
        return;
    }
    let rng = "-device virtio-rng-pci,disable-legacy=on";
    for (extra, cmdline, expected, ready) in [
        (
            rng,
            "workload=dma-verify dma=rng size=4M iommu=on",
            "guest: FAIL no virtio-iommu on PCI bus 0 (vendor 1af4, device 1057)",
            true,
        ),
        (
            "-device virtio-iommu-pci -device virtio-rng-pci,disable-legacy=on",
            "workload=dma-verify dma=rng size=4M iommu=on",
            "guest: FAIL virtio-rng 00:03.0: iommu=on, but VIRTIO_F_ACCESS_PLATFORM (bit 33) is not offered",
            true,
        ),
        (
            rng,
            "workload=dma-verify dma=rng size=4M remap=on",
            "guest: bad argument remap=on (needs iommu=on)",
            false,
        ),
        (
            "",
            "workload=verify size=4M iommu=on",
            "guest: bad argument iommu=on (only with workload=dma-verify or dma-bench)",
            false,
        ),
    ] {
        let extra: Vec<&str> = extra.split_whitespace().collect();
        let mut q = Qemu::boot(1, "256", cmdline, &extra);
        let code = q.wait_exit(BOOT_TIMEOUT);
        let t = q.transcript();
        let lines = q.guest_lines();
        assert_eq!(code, Some(STATUS_FAIL), "{t}");
        assert!(
            lines.iter().any(|l| l.starts_with(expected)),
            "want {expected:?}\n{t}"
        );
        assert_eq!(
            lines.iter().any(|l| l.starts_with("guest: ready")),
            ready,
            "{t}"
        );
    }
}

/// The figures of a `guest: dma-bench ...` line: bs, requests, bytes, ms, MiB/s, req/s,
/// notifies (MiB/s as printed, e.g. `696.7`).
fn dma_bench_figures(line: &str) -> (u64, u64, u64, u64, String, u64, u64) {
    let field = |key: &str| -> String {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
            .to_string()
    };
    let num = |key: &str| -> u64 {
        field(key)
            .parse()
            .unwrap_or_else(|e| panic!("{key}= in {line:?}: {e}"))
    };
    (
        num("bs"),
        num("requests"),
        num("bytes"),
        num("ms"),
        field("MiB/s"),
        num("req/s"),
        num("notifies"),
    )
}

/// Boots `dma-bench` on `disk` with `cmdline`, expects PASS after one `guest: dma-bench`
/// line, and returns that line.
fn dma_bench_line(cmdline: &str, disk: &TempDisk) -> String {
    dma_bench_run(cmdline, &disk.qemu_args()).0
}

/// Boots `dma-bench` with `cmdline` and QEMU arguments `extra` (the disk), expects PASS
/// after one `guest: dma-bench` line; returns that line, the guest's lines and the
/// transcript.
fn dma_bench_run(cmdline: &str, extra: &[String]) -> (String, Vec<String>, String) {
    let args: Vec<&str> = extra.iter().map(String::as_str).collect();
    let mut q = Qemu::boot(1, "256", cmdline, &args);
    let code = q.wait_exit(RUN_TIMEOUT);
    let t = q.transcript();
    let lines = q.guest_lines();
    assert_eq!(code, Some(STATUS_PASS), "{t}");
    assert!(lines[0].starts_with(&ready_line(1, "dma-bench")), "{t}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("guest: dma device=virtio-blk")),
        "{t}"
    );
    let bench: Vec<&&str> = lines
        .iter()
        .filter(|l| l.starts_with("guest: dma-bench "))
        .collect();
    assert_eq!(bench.len(), 1, "{t}");
    assert_eq!(lines.last(), Some(&"guest: PASS"), "{t}");
    check_dma_interrupts(cmdline, &lines, &t);
    eprintln!("'{cmdline}': {}", bench[0]);
    let line = bench[0].to_string();
    let lines = lines.iter().map(|l| l.to_string()).collect();
    (line, lines, t)
}

/// Checks a `guest: dma-bench` line of `bytes`-byte requests: non-zero figures that agree
/// with each other.
fn check_dma_bench_figures(line: &str, bytes: u64) {
    let (b, requests, total, ms, mib_s, req_s, _) = dma_bench_figures(line);
    assert_eq!(b, bytes, "{line}");
    assert!(requests > 0 && req_s > 0 && ms >= 1000, "{line}");
    assert_eq!(total, requests * bytes, "{line}");
    let mib_s: f64 = mib_s.parse().unwrap();
    assert!(mib_s > 0.0, "{line}");
    // MiB/s and req/s say the same thing twice (rounding apart).
    let from_req = req_s as f64 * bytes as f64 / (1 << 20) as f64;
    assert!((mib_s - from_req).abs() <= from_req * 0.01 + 0.1, "{line}");
}

/// `dma-bench` for a second with 4 KiB and with 64 KiB requests: the figures are there,
/// non-zero and agree with each other.
#[test]
fn dma_bench_reports_its_throughput() {
    let disk = TempDisk::new(32 << 20);
    for (bs, bytes) in [("4K", 4096), ("64K", 65536)] {
        let line = dma_bench_line(
            &format!("workload=dma-bench dma=blk bs={bs} secs=1 size=16M"),
            &disk,
        );
        check_dma_bench_figures(&line, bytes);
    }
}

/// `dma-bench iommu=on` under QEMU 7.2's virtio-iommu-pci (q35), the disk behind it: the
/// guest maps the 16 MiB region (8 windows) and its driver memory (9 MAPs), then reads a
/// second through IOVAs only, with 4 KiB and 64 KiB requests; the figures are there and
/// agree, the disk agreed ACCESS_PLATFORM, no fault record came.
#[test]
fn dma_bench_through_qemus_virtio_iommu() {
    if !qemu_installed() {
        eprintln!("skipped: qemu-system-x86_64 is not installed");
        return;
    }
    let disk = TempDisk::new(32 << 20);
    for (bs, bytes) in [("4K", 4096), ("64K", 65536)] {
        let cmdline = format!("workload=dma-bench dma=blk bs={bs} secs=1 size=16M iommu=on");
        let (line, lines, t) = dma_bench_run(&cmdline, &iommu_args("q35", "blk", Some(&disk)));
        check_dma_bench_figures(&line, bytes);
        assert!(lines[0].ends_with(" iommu=on"), "{t}");
        let main = "guest: viommu pci=";
        assert_eq!(field(&lines, main, "windows", &t), "8", "{t}");
        assert_eq!(field(&lines, main, "mappings", &t), "9", "{t}");
        let done = "guest: viommu done ";
        for (key, want) in [("maps", "9"), ("unmaps", "0"), ("faults", "0")] {
            assert_eq!(field(&lines, done, key, &t), want, "{key}:\n{t}");
        }
        assert_access_platform(&lines, &t);
    }
}

/// `passes=` instead of a time: exactly that many passes over the whole disk.
#[test]
fn dma_bench_passes_read_the_whole_disk() {
    let disk = TempDisk::new(8 << 20);
    let line = dma_bench_line("workload=dma-bench dma=blk bs=64K passes=3 size=4M", &disk);
    let (_, requests, bytes, ..) = dma_bench_figures(&line);
    assert_eq!((requests, bytes), (3 * 128, 3 * (8 << 20)), "{line}");
}

/// A disk smaller than twice the region, or no device at all, fails after the ready line.
#[test]
fn dma_verify_refuses_a_small_disk_and_a_missing_device() {
    const SIZE: u64 = 16 << 20;
    let have = guest_pattern::dma::disk_bytes_needed(SIZE) - 4096;
    let disk = TempDisk::new(have);
    let args = disk.qemu_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let cases = [
        (
            &args[..],
            format!(
                "guest: FAIL disk too small: need {} bytes, have {have}",
                2 * SIZE
            ),
        ),
        (
            &[][..],
            "guest: FAIL no virtio-blk on PCI bus 0 (vendor 1af4, device 1042 or 1001)".into(),
        ),
    ];
    for (extra, expected) in cases {
        let mut q = Qemu::boot(1, "256", "workload=dma-verify dma=blk size=16M", extra);
        let code = q.wait_exit(BOOT_TIMEOUT);
        let t = q.transcript();
        let lines = q.guest_lines();
        assert_eq!(code, Some(STATUS_FAIL), "{t}");
        assert!(lines[0].starts_with(&ready_line(1, "dma-verify")), "{t}");
        assert!(lines.contains(&expected.as_str()), "want {expected:?}\n{t}");
    }
}

/// A page changed behind the guest's back after the device wrote it is reported: memory
/// is written through QEMU's gdb stub while `dma-verify dma=blk` runs.
#[test]
fn dma_verify_reports_a_corrupted_page() {
    let disk = TempDisk::new(16 << 20);
    let port = free_port();
    let gdb = format!("tcp:127.0.0.1:{port}");
    let mut args = disk.qemu_args();
    args.extend(["-gdb".to_string(), gdb]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut q = Qemu::boot(2, "256", "workload=dma-verify dma=blk size=8M", &args);
    // The device rewrites each page every pass, but the guest checks it first.
    let (code, t, lines, mismatch) = corrupt_two_pages(&mut q, port, "dma-verified");
    assert!(
        mismatch.contains("gpa=0x164000 block=") || mismatch.contains("gpa=0x6dc000 block="),
        "{t}"
    );
    assert!(mismatch.ends_with("(bad checksum)"), "{t}");
    assert!(lines.iter().any(|l| l == "guest: FAIL"), "{t}");
    assert_eq!(code, Some(STATUS_FAIL), "{t}");
}

/// Once both vCPUs printed a `guest: <pass> <cpu> ...` line, changes one payload byte in
/// a page of each vCPU's share (region 1M-9M, 1024 pages each) through the gdb stub on
/// `port`, waits for the guest to end, and returns its status, the transcript, the guest
/// lines and the MISMATCH line (panicking with the transcript if there is none).
fn corrupt_two_pages(
    q: &mut Qemu,
    port: u16,
    pass: &str,
) -> (Option<i32>, String, Vec<String>, String) {
    q.wait_for(
        &format!("a {pass} pass from both cpus"),
        BOOT_TIMEOUT,
        |l| {
            (0..2).all(|c| {
                l.iter()
                    .any(|x| x.starts_with(&format!("guest: {pass} {c} ")))
            })
        },
    );
    let mut stub = GdbStub::connect(port);
    stub.write_byte(0x10_0000 + 100 * 4096 + 700, 0x5a);
    stub.write_byte(0x10_0000 + 1500 * 4096 + 700, 0x5a);
    stub.detach();
    let code = q.wait_exit(RUN_TIMEOUT);
    let t = q.transcript();
    let lines: Vec<String> = q.guest_lines().iter().map(|l| l.to_string()).collect();
    let mismatch = lines
        .iter()
        .find(|l| l.starts_with("guest: MISMATCH cpu="))
        .cloned()
        .unwrap_or_else(|| panic!("no MISMATCH line\n{t}"));
    (code, t, lines, mismatch)
}

/// A connection to QEMU's gdb stub: the VM is stopped while it is open. Addresses are
/// guest-virtual, which the guest's identity map makes guest-physical.
struct GdbStub(TcpStream);

impl GdbStub {
    fn connect(port: u16) -> GdbStub {
        let end = Instant::now() + Duration::from_secs(10);
        let s = loop {
            match TcpStream::connect(("127.0.0.1", port)) {
                Ok(s) => break s,
                Err(e) if Instant::now() > end => panic!("gdb stub on port {port}: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // One small packet per round trip: without this, Nagle + delayed ACKs make each
        // one take tens of milliseconds.
        s.set_nodelay(true).unwrap();
        GdbStub(s)
    }

    fn write_byte(&mut self, addr: u64, value: u8) {
        let reply = self.packet(&format!("M{addr:x},1:{value:02x}"));
        assert_eq!(reply, "OK", "gdb stub refused to write {addr:#x}");
    }

    fn read_byte(&mut self, addr: u64) -> u8 {
        let reply = self.packet(&format!("m{addr:x},1"));
        u8::from_str_radix(&reply, 16)
            .unwrap_or_else(|_| panic!("gdb stub read of {addr:#x}: {reply:?}"))
    }

    /// Detaches: the VM runs again.
    fn detach(mut self) {
        self.packet("D");
    }

    /// Sends one remote-protocol packet and returns the reply's payload, skipping stop
    /// notifications (`T..`/`S..`: QEMU stops the VM when a debugger connects, and says
    /// so).
    fn packet(&mut self, payload: &str) -> String {
        let sum = payload.bytes().fold(0u8, |a, b| a.wrapping_add(b));
        self.0
            .write_all(format!("${payload}#{sum:02x}").as_bytes())
            .unwrap();
        loop {
            let reply = self.read_packet();
            if !reply.starts_with('T') && !reply.starts_with('S') {
                return reply;
            }
        }
    }

    fn read_packet(&mut self) -> String {
        // Skip acks ('+') up to '$', read to '#', then the two checksum digits.
        let mut byte = [0u8; 1];
        let mut reply = Vec::new();
        let mut in_packet = false;
        loop {
            self.0.read_exact(&mut byte).expect("gdb stub reply");
            match (in_packet, byte[0]) {
                (false, b'$') => in_packet = true,
                (false, _) => {}
                (true, b'#') => break,
                (true, b) => reply.push(b),
            }
        }
        let mut sum = [0u8; 2];
        self.0.read_exact(&mut sum).unwrap();
        self.0.write_all(b"+").unwrap();
        String::from_utf8_lossy(&reply).into_owned()
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port()
}

/// Sends one QMP command on a fresh connection to `sock` (after the greeting and
/// `qmp_capabilities`); returns its answer line.
fn qmp_command(sock: &Path, command: &str) -> String {
    use std::os::unix::net::UnixStream;
    let end = Instant::now() + Duration::from_secs(30);
    let s = loop {
        match UnixStream::connect(sock) {
            Ok(s) => break s,
            Err(e) => {
                assert!(Instant::now() < end, "QMP {}: {e}", sock.display());
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut out = s.try_clone().unwrap();
    let mut input = BufReader::new(s);
    let mut greeting = String::new();
    input.read_line(&mut greeting).unwrap();
    assert!(greeting.contains("QMP"), "no QMP greeting: {greeting}");
    let mut answer = |msg: &str| -> String {
        out.write_all(msg.as_bytes()).unwrap();
        loop {
            let mut line = String::new();
            input.read_line(&mut line).unwrap();
            // Events may come first.
            if !line.contains("\"event\"") {
                return line;
            }
        }
    };
    let r = answer("{\"execute\":\"qmp_capabilities\"}\n");
    assert!(r.contains("return"), "{r}");
    answer(&format!("{{\"execute\":\"{command}\"}}\n"))
}

/// `power-button=on` against QEMU's own ACPI (PIIX4 on pc, ICH9 on q35): QEMU's
/// `system_powerdown` presses the button; the guest says so and powers off through
/// `_S5_`, and QEMU ends as after an OS's power-off. Ferry's `vm.power-button` is checked
/// against the same guest code (vmm/tests/power_button.rs).
#[test]
fn power_button_under_qemu_pc_and_q35() {
    for machine in ["pc", "q35"] {
        let sock = std::env::temp_dir().join(format!(
            "ferry-qemu-pwrbtn-{machine}-{}.sock",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&sock);
        let qmp = format!("unix:{},server=on,wait=off", sock.display());
        let mut q = Qemu::boot(
            1,
            "128",
            "workload=verify size=4M power-button=on",
            &["-machine", machine, "-qmp", &qmp],
        );
        q.wait_for("the power button set up", RUN_TIMEOUT, |l| {
            l.iter().any(|l| l.starts_with("guest: power button sci="))
        });
        q.wait_for("a verify pass", RUN_TIMEOUT, |l| {
            l.iter().any(|l| l.starts_with("guest: verified 0 1"))
        });
        let r = qmp_command(&sock, "system_powerdown");
        assert!(r.contains("return"), "{machine}: system_powerdown: {r}");
        let code = q.wait_exit(RUN_TIMEOUT);
        let lines = q.guest_lines();
        assert!(
            // The line may come in the middle of one a vCPU was printing: the SCI
            // interrupts it.
            lines
                .iter()
                .any(|l| l.contains("guest: power button pressed: powering off (S5)")),
            "{machine}: {}",
            q.transcript()
        );
        assert_eq!(code, Some(0), "{machine}: S5 ends QEMU: {}", q.transcript());
        let _ = std::fs::remove_file(&sock);
    }
}
