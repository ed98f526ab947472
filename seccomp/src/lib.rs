//! Per-thread seccomp filters (cloud-hypervisor's model, our own lists).
//!
//! Each kind of Ferry thread ([`ThreadKind`]) installs its own allow-list when it starts,
//! before it touches guest input. Filters stack: a thread keeps the filter of the thread
//! that created it and adds its own, so what a vCPU may do is what both the VMM filter
//! (installed on the main thread first, [`init`]) and the vCPU filter allow.
//!
//! What a system call outside the filters does is the mode (`--seccomp`):
//! * `true` ([`SeccompMode::Enforce`]): the call traps; the handler writes one line naming
//!   the thread and the call to stderr and ends the process (status 159, 128 + SIGSYS).
//! * `log` ([`SeccompMode::Log`]): the call goes through and the kernel logs it (dmesg or
//!   the audit log: `type=1326 ... comm="THREAD" ... syscall=NR`).
//! * `false` ([`SeccompMode::Off`]): no filter.

mod rules;
mod syscall_names;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::mpsc::{channel, Sender};
use std::sync::{Mutex, OnceLock};
use std::thread::JoinHandle;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, SeccompRule, TargetArch};

pub use rules::allowed;
pub use syscall_names::syscall_name;

/// `--seccomp`: what a system call outside a thread's filter does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeccompMode {
    /// `true`: the process ends, naming the thread and the call.
    Enforce,
    /// `log`: the call is made and the kernel logs it.
    Log,
    /// `false`: no filters.
    Off,
}

impl FromStr for SeccompMode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "true" => Ok(SeccompMode::Enforce),
            "log" => Ok(SeccompMode::Log),
            "false" => Ok(SeccompMode::Off),
            other => Err(Error::BadMode(other.chars().take(64).collect())),
        }
    }
}

impl fmt::Display for SeccompMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SeccompMode::Enforce => "true",
            SeccompMode::Log => "log",
            SeccompMode::Off => "false",
        })
    }
}

/// The kinds of Ferry threads, each with its own allow-list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ThreadKind {
    /// The main thread and the API threads: they build and tear down VMs, run the
    /// migration's control flow and harvest dirty logs.
    Vmm,
    /// A vCPU: runs the guest and emulates what it exits for.
    Vcpu,
    /// A virtio device's queue worker: serves the guest's requests.
    DeviceWorker,
    /// One connection of an outgoing migration: writes pages to the socket.
    MigrationSender,
    /// One connection of an incoming migration: reads pages into guest RAM.
    MigrationReceiver,
    /// Auto-converge: kicks the vCPUs to slow a guest that dirties too fast.
    Throttle,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 6] = [
        ThreadKind::Vmm,
        ThreadKind::Vcpu,
        ThreadKind::DeviceWorker,
        ThreadKind::MigrationSender,
        ThreadKind::MigrationReceiver,
        ThreadKind::Throttle,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "vmm",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::DeviceWorker => "device-worker",
            ThreadKind::MigrationSender => "migration-sender",
            ThreadKind::MigrationReceiver => "migration-receiver",
            ThreadKind::Throttle => "throttle",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--seccomp {0:?} is not a mode (use true, false or log)")]
    BadMode(String),
    #[error("the seccomp mode was already set to {0}")]
    AlreadySet(SeccompMode),
    #[error("building the seccomp filter of {kind} threads: {source}")]
    Build {
        kind: &'static str,
        source: seccompiler::BackendError,
    },
    #[error("installing the seccomp filter of {kind} threads: {source}")]
    Install {
        kind: &'static str,
        source: seccompiler::Error,
    },
    #[error("installing the SIGSYS handler: {0}")]
    Handler(std::io::Error),
    #[error("starting the thread that starts filtered threads: {0}")]
    Spawner(std::io::Error),
}

static MODE: OnceLock<SeccompMode> = OnceLock::new();
/// Every kind's program in the process's mode, built once by [`init`]: threads that start
/// every pass (the migration's connections) then only apply theirs.
static PROGRAMS: OnceLock<Vec<(ThreadKind, BpfProgram)>> = OnceLock::new();

/// The process's mode; `Off` until [`init`] set one (so library tests that never call it
/// run unfiltered).
pub fn mode() -> SeccompMode {
    MODE.get().copied().unwrap_or(SeccompMode::Off)
}

/// Sets the process's mode and filters the calling (main) thread as [`ThreadKind::Vmm`].
/// Call once, before any other thread exists, so that every later thread inherits it.
pub fn init(mode: SeccompMode) -> Result<(), Error> {
    MODE.set(mode)
        .map_err(|_| Error::AlreadySet(self::mode()))?;
    match mode {
        SeccompMode::Off => {
            log::warn!("seccomp is off (--seccomp false): every thread may make any system call");
            return Ok(());
        }
        SeccompMode::Enforce => install_sigsys_handler()?,
        SeccompMode::Log => log::warn!(
            "seccomp in log mode (--seccomp log): a system call outside its thread's filter is \
             made and logged by the kernel (dmesg: type=1326 ... comm=THREAD ... syscall=NR)"
        ),
    }
    if std::env::var_os("FERRY_TEST_NO_MALLOC_PRIME").is_none() {
        prime_malloc();
    }
    let programs = ThreadKind::ALL
        .iter()
        .map(|&k| Ok((k, program(k, mode)?)))
        .collect::<Result<Vec<_>, Error>>()?;
    let _ = PROGRAMS.set(programs);
    install(ThreadKind::Vmm)?;
    start_spawner().map_err(Error::Spawner)?;
    log::info!(
        "seccomp: mode {mode}; filters per thread kind: {}",
        ThreadKind::ALL
            .iter()
            .map(|k| format!("{} ({} calls)", k.name(), allowed(*k).len()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

/// glibc's malloc opens and reads `/proc/sys/vm/overcommit_memory` the first time it
/// shrinks a thread's heap, and keeps the answer for the process. No thread filter but
/// the VMM's allows `openat`, so a migration connection that freed its buffers first
/// ended the process (seen with 2 connections on an 8 GiB guest). Here that first shrink
/// happens before any filter: a thread grows its own heap by 8 MiB and frees it. Should a
/// raised trim threshold (glibc raises it after freeing a large mapping, or
/// `MALLOC_TRIM_THRESHOLD_`) keep this heap from shrinking, the SIGSYS handler refuses
/// that `openat` instead ([`REFUSED_CALL`]). (`FERRY_TEST_NO_MALLOC_PRIME` skips the
/// priming, for the test that shows both.)
fn prime_malloc() {
    let grow_and_free = || {
        // Pieces below the mmap threshold come from the thread's own heap; freed, they
        // leave its top above the trim threshold (twice the mmap threshold, 256 KiB
        // unless glibc raised it after freeing a larger mapping).
        let pieces: Vec<Vec<u8>> = (0..128)
            .map(|_| std::hint::black_box(Vec::with_capacity(64 << 10)))
            .collect();
        drop(std::hint::black_box(pieces));
    };
    match std::thread::Builder::new()
        .name("malloc-prime".into())
        .spawn(grow_and_free)
    {
        Ok(t) => {
            let _ = t.join();
        }
        Err(e) => log::warn!(
            "no thread to prime malloc with ({e}): a filtered thread that shrinks its heap \
             first may end the process"
        ),
    }
}

/// Filters the calling thread as `kind` (nothing when the mode is off). A thread calls it
/// first thing, before it reads anything a guest or a peer wrote.
pub fn install(kind: ThreadKind) -> Result<(), Error> {
    let Some(programs) = PROGRAMS.get() else {
        return Ok(());
    };
    let Some((_, program)) = programs.iter().find(|(k, _)| *k == kind) else {
        return Ok(());
    };
    remember_thread(kind);
    seccompiler::apply_filter(program).map_err(|source| Error::Install {
        kind: kind.name(),
        source,
    })?;
    if std::env::var("FERRY_TEST_FORBIDDEN_SYSCALL").is_ok_and(|k| k == kind.name()) {
        forbidden_call_seam(kind);
    }
    Ok(())
}

/// Test seam (`FERRY_TEST_FORBIDDEN_SYSCALL=KIND`): a thread of that kind makes a system
/// call no filter allows, right after installing its own. `personality(0xffffffff)` only
/// reads the current personality, so in log mode it changes nothing.
fn forbidden_call_seam(kind: ThreadKind) {
    log::warn!(
        "FERRY_TEST_FORBIDDEN_SYSCALL: this {} thread makes system call personality, which \
         no filter allows",
        kind.name()
    );
    // SAFETY: personality(0xffffffff) queries the persona and changes nothing.
    unsafe { libc::personality(0xffff_ffff) };
}

/// [`install`] for a thread that cannot go on unfiltered: a filter the kernel refuses
/// ends the process with the reason (status 1), rather than leaving one thread open.
pub fn install_or_exit(kind: ThreadKind) {
    if let Err(e) = install(kind) {
        eprintln!("ferry: error: {e}");
        std::process::exit(1);
    }
}

/// The BPF program of `kind` in `mode` (Enforce or Log).
pub fn program(kind: ThreadKind, mode: SeccompMode) -> Result<BpfProgram, Error> {
    let mismatch = match mode {
        SeccompMode::Log => SeccompAction::Log,
        _ => SeccompAction::Trap,
    };
    let rules: BTreeMap<i64, Vec<SeccompRule>> =
        allowed(kind).iter().map(|&nr| (nr, Vec::new())).collect();
    let build = |source| Error::Build {
        kind: kind.name(),
        source,
    };
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(build)?;
    filter.try_into().map_err(build)
}

type Job = Box<dyn FnOnce() + Send>;

/// Where [`spawn`] sends its jobs: a thread under the VMM filter only.
static SPAWNER: OnceLock<Mutex<Sender<Job>>> = OnceLock::new();

/// A thread inherits the filters of the thread that creates it. A device worker started
/// by a vCPU (the guest sets DRIVER_OK in an MMIO exit) would then need everything the
/// worker does in the vCPU's list too; so threads are created by one thread that holds
/// the VMM filter alone, and each adds its own.
fn start_spawner() -> std::io::Result<()> {
    let (jobs, next) = channel::<Job>();
    std::thread::Builder::new()
        .name("spawner".into())
        .spawn(move || {
            for job in next {
                job();
            }
        })?;
    let _ = SPAWNER.set(Mutex::new(jobs));
    Ok(())
}

/// Starts a thread named `name` of kind `kind` running `f`, under the VMM filter and its
/// own (nothing else: not those of the calling thread). Without [`init`] (or with
/// `--seccomp false`) it is a plain spawn.
pub fn spawn<F, T>(kind: ThreadKind, name: String, f: F) -> std::io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let body = move || {
        install_or_exit(kind);
        f()
    };
    let Some(spawner) = SPAWNER.get() else {
        return std::thread::Builder::new().name(name).spawn(body);
    };
    let (reply, handle) = channel();
    let job: Job = Box::new(move || {
        let _ = reply.send(std::thread::Builder::new().name(name).spawn(body));
    });
    spawner
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send(job)
        .map_err(|_| std::io::Error::other("the spawner thread has ended"))?;
    handle
        .recv()
        .map_err(|_| std::io::Error::other("the spawner thread has ended"))?
}

// What the SIGSYS handler says about the thread: set when the thread installs its
// filter, read in the handler (plain thread-locals without destructors: no allocation,
// no lock).
thread_local! {
    static KIND: Cell<&'static str> = const { Cell::new("") };
    static NAME: Cell<[u8; 16]> = const { Cell::new([0; 16]) };
}

fn remember_thread(kind: ThreadKind) {
    let mut name = [0u8; 16];
    if let Some(n) = std::thread::current().name() {
        let n = n.as_bytes();
        let len = n.len().min(15);
        name[..len].copy_from_slice(&n[..len]);
    }
    KIND.with(|k| k.set(kind.name()));
    NAME.with(|c| c.set(name));
}

/// The exit status of a process a system call outside its filters ended (128 + SIGSYS,
/// as a shell shows a process SIGSYS killed).
pub const EXIT_STATUS: i32 = 128 + libc::SIGSYS;

fn install_sigsys_handler() -> Result<(), Error> {
    // SAFETY: a zeroed sigaction is a valid value to fill in; `on_sigsys` has the
    // signature SA_SIGINFO requires and only does async-signal-safe work (see there).
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_sigsys as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut act.sa_mask);
        if libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) != 0 {
            return Err(Error::Handler(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// A small line buffer on the stack: the handler may not allocate.
struct Line {
    buf: [u8; 512],
    len: usize,
}

impl Line {
    /// Appends what fits, keeping the last byte for the line end.
    fn push(&mut self, s: &[u8]) {
        let n = s.len().min(self.buf.len() - 1 - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
    }

    fn push_number(&mut self, mut v: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// The line the handler writes for system call `nr` made by a thread named `name` of
/// kind `kind`.
fn forbidden_line(kind: &str, name: &[u8], nr: i64) -> Line {
    let outcome: &[u8] = if nr == REFUSED_CALL {
        b"refused with EACCES (glibc's malloc reads /proc/sys/vm/overcommit_memory once; it \
          takes a refusal as 'do not shrink')"
    } else {
        b"ending the process (--seccomp log lets it through and logs it)"
    };
    let mut line = Line {
        buf: [0; 512],
        len: 0,
    };
    line.push(b"ferry: seccomp: thread '");
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    line.push(&name[..end]);
    line.push(b"' (");
    // A thread that installed nothing of its own runs under the VMM filter it inherited.
    line.push(if kind.is_empty() {
        b"inherited vmm"
    } else {
        kind.as_bytes()
    });
    line.push(b" filter) made system call ");
    line.push(syscall_name(nr).unwrap_or("unknown").as_bytes());
    line.push(b" (");
    line.push_number(nr as u64);
    line.push(b"), which its filter does not allow; ");
    line.push(outcome);
    line.buf[line.len] = b'\n';
    line.len += 1;
    line
}

/// The one call a thread's filter refuses without ending the process: `openat` fails with
/// EACCES instead. glibc's malloc opens `/proc/sys/vm/overcommit_memory` the first time
/// a thread's heap shrinks ([`prime_malloc`] makes that happen before any filter, but a
/// raised trim threshold can defeat it); a refused open only keeps the heap from
/// shrinking. Any other file a filtered thread opens fails the same way, with the line.
const REFUSED_CALL: i64 = libc::SYS_openat;

/// Where SIGSYS's siginfo keeps the system call number (`si_syscall` of `_sigsys`, after
/// the three ints and padding of the header and the 8-byte `_call_addr`).
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for a SA_SIGINFO handler; for SIGSYS from
    // seccomp its `_sigsys` member is filled in, whose `_syscall` int sits at
    // SI_SYSCALL_OFFSET (include/uapi/asm-generic/siginfo.h on x86_64).
    let nr = unsafe {
        (info as *const u8)
            .add(SI_SYSCALL_OFFSET)
            .cast::<i32>()
            .read_unaligned()
    };
    let line = forbidden_line(KIND.with(Cell::get), &NAME.with(Cell::get), i64::from(nr));
    // SAFETY: write(2) is async-signal-safe and allowed in every filter (rules::BASE);
    // the buffer outlives the call.
    unsafe { libc::write(libc::STDERR_FILENO, line.buf.as_ptr().cast(), line.len) };
    if i64::from(nr) == REFUSED_CALL && !ctx.is_null() {
        // SAFETY: for a SA_SIGINFO handler `ctx` is the interrupted thread's ucontext_t;
        // the trapped call did not run, and what rax holds when the handler returns is
        // what the call returns (rt_sigreturn restores these registers).
        unsafe {
            let uc = &mut *ctx.cast::<libc::ucontext_t>();
            uc.uc_mcontext.gregs[libc::REG_RAX as usize] = -i64::from(libc::EACCES);
        }
        return;
    }
    // SAFETY: exit_group(2) is allowed in every filter (rules::BASE) and never returns.
    unsafe { libc::syscall(libc::SYS_exit_group, EXIT_STATUS) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_as_cloud_hypervisor_spells_them() {
        assert_eq!("true".parse::<SeccompMode>().unwrap(), SeccompMode::Enforce);
        assert_eq!("log".parse::<SeccompMode>().unwrap(), SeccompMode::Log);
        assert_eq!("false".parse::<SeccompMode>().unwrap(), SeccompMode::Off);
        let e = "yes".parse::<SeccompMode>().unwrap_err().to_string();
        assert!(
            e.contains("\"yes\"") && e.contains("true, false or log"),
            "{e}"
        );
    }

    #[test]
    fn every_kind_builds_in_both_modes() {
        for kind in ThreadKind::ALL {
            for mode in [SeccompMode::Enforce, SeccompMode::Log] {
                let p = program(kind, mode).unwrap();
                assert!(!p.is_empty(), "{kind:?} {mode}");
            }
        }
    }

    #[test]
    fn every_filter_lets_the_handler_and_thread_exit_through() {
        for kind in ThreadKind::ALL {
            for nr in [
                libc::SYS_write,
                libc::SYS_exit_group,
                libc::SYS_exit,
                libc::SYS_futex,
            ] {
                assert!(
                    allowed(kind).contains(&nr),
                    "{} lacks {}",
                    kind.name(),
                    syscall_name(nr).unwrap()
                );
            }
        }
    }

    #[test]
    fn the_message_names_thread_kind_and_call() {
        let mut name = [0u8; 16];
        name[..5].copy_from_slice(b"vcpu1");
        let line = forbidden_line("vcpu", &name, libc::SYS_personality);
        let text = std::str::from_utf8(&line.buf[..line.len]).unwrap();
        assert!(
            text.starts_with(
                "ferry: seccomp: thread 'vcpu1' (vcpu filter) made system call personality (135)"
            ),
            "{text}"
        );
        let line = forbidden_line("", &name, libc::SYS_personality);
        let text = std::str::from_utf8(&line.buf[..line.len]).unwrap();
        assert!(text.contains("(inherited vmm filter)"), "{text}");
        assert_eq!(syscall_name(0), Some("read"));
        assert_eq!(syscall_name(100_000), None);
    }

    #[test]
    fn the_allow_lists_have_no_duplicates() {
        for kind in ThreadKind::ALL {
            let mut v = allowed(kind).to_vec();
            v.sort_unstable();
            let n = v.len();
            v.dedup();
            assert_eq!(v.len(), n, "{} lists a call twice", kind.name());
        }
    }
}
