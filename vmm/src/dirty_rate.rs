//! Dirty-page rates per vCPU from the KVM dirty rings, and a per-vCPU dirty limit (QMP's
//! `calc-dirty-rate` in `dirty-ring` mode, `set-vcpu-dirty-limit`).
//!
//! Both count ring entries: each vCPU has its own ring, so the entries harvested from ring
//! `i` are the pages vCPU `i` dirtied. The count is kept where entries are harvested (in
//! the hypervisor crate), whoever harvests: a ring-full exit, a migration's collection,
//! or this module. So a measurement or a limit and a running migration share the rings
//! without taking entries from each other, and every page still reaches the migration.
//!
//! KVM logs nothing unless dirty logging is on. A migration turns it on and off; the
//! [`RingWatch`] keeps it on while a measurement or a limit needs it too, and turns it off
//! when the last of them ends (not under a running migration).
//!
//! The limit: every [`TICK`] a thread kicks the limited vCPUs (so the CPU's buffered
//! entries reach the rings), counts each ring's entries (without taking them; it harvests
//! every [`HARVEST_PERIOD`]), and keeps a per-vCPU balance of pages dirtied against pages
//! allowed; a vCPU over its allowance sleeps outside KVM_RUN until the allowance catches
//! up. Each vCPU is held back on its own: the others run on.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::vcpu::{now_us, VcpuControl};

/// Pages of 4 KiB in a MiB: QMP's rates are in MiB/s ("MB/s" in QEMU's words).
pub const PAGES_PER_MIB: u64 = 256;
/// How often the limiter counts the limited vCPUs' entries (without taking them).
pub const TICK: Duration = Duration::from_millis(5);
/// How often the limiter harvests (and so resets) the rings. A harvest write-protects
/// the pages again, so a page the guest keeps writing (its stack) makes one entry per
/// harvest: harvesting every tick would count such pages 200 times a second against the
/// limit. A page rewritten less often than this counts at each rewrite.
pub const HARVEST_PERIOD: Duration = Duration::from_millis(100);
/// Largest allowance a limited vCPU may save up while it dirties less than its limit (in
/// seconds of its limit). It gives a vCPU back the allowance of a short time off the host
/// CPU; it is also how far over its limit a vCPU may go in any window (a saved-up vCPU
/// spends it at once), so it is kept small: 0.25 s is 3 % of an 8 s window. (0.5 s let a
/// CI run measure a vCPU 10.4 % over its limit; 0.1 s, 10.7 % under it while the limiter
/// thread itself waited for a CPU: it now runs at a higher priority, see `limiter`.)
const MAX_CREDIT_SECS: f64 = 0.25;
/// The window `current-rate` is averaged over.
const RATE_WINDOW_SECS: f64 = 1.0;
/// How long a measurement waits for the vCPUs to leave KVM_RUN at its edges.
const FLUSH_WAIT: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum DirtyRateError {
    #[error(
        "{what} needs the KVM dirty rings, and this VM tracks dirty pages with KVM's \
         bitmap (started with --dirty-ring off, or KVM has no dirty ring)"
    )]
    NoRings { what: &'static str },
    #[error("cpu-index {index} is out of range: the VM has {count} vCPUs (0 to {})", count - 1)]
    NoSuchVcpu { index: i64, count: u32 },
    #[error("dirty-rate {0} is out of range: a limit is at least 1 MB/s")]
    BadLimit(i128),
    #[error("dirty logging for {what}: {source}")]
    Logging {
        what: &'static str,
        #[source]
        source: hypervisor::HypervisorError,
    },
    #[error("cannot start the dirty-limit thread: {0}")]
    Thread(std::io::Error),
}

/// Who needs KVM's dirty logging.
#[derive(Default)]
struct Users {
    migration: bool,
    /// Measurements under way, plus one while any limit is set.
    watchers: u32,
}

/// The limits and what the limiter saw, shared with its thread.
struct Limits {
    /// Pages per second per vCPU, by vCPU index; None: no limit.
    pages_per_s: Vec<Option<u64>>,
    /// Pages per second each vCPU dirtied lately (while the limiter runs).
    current: Vec<f64>,
    stop: bool,
    /// Bumped by each change, so the thread starts afresh.
    generation: u64,
}

struct Shared {
    hv: Arc<hypervisor::Vm>,
    control: Arc<VcpuControl>,
    users: Mutex<Users>,
    limits: Mutex<Limits>,
    changed: Condvar,
}

/// One machine's ring users: dirty logging on behalf of measurements and limits, and the
/// limiter thread. Dropped (or [`RingWatch::shut_down`]) before the vCPU threads end.
pub struct RingWatch {
    shared: Arc<Shared>,
    vcpus: u32,
    thread: Mutex<Option<JoinHandle<()>>>,
    running: AtomicBool,
    /// One `set`/`cancel` at a time (two QMP connections may race).
    edits: Mutex<()>,
}

/// One reading of every ring's harvest count.
#[derive(Clone, Debug)]
pub struct Sample {
    pub at: Instant,
    pub pages: Vec<u64>,
}

/// The limit of one vCPU, as `query-vcpu-dirty-limit` shows it (MiB/s).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LimitInfo {
    pub cpu_index: u32,
    pub limit_rate: u64,
    pub current_rate: u64,
}

impl RingWatch {
    pub fn new(hv: Arc<hypervisor::Vm>, control: Arc<VcpuControl>, vcpus: u32) -> RingWatch {
        let n = vcpus as usize;
        RingWatch {
            shared: Arc::new(Shared {
                hv,
                control,
                users: Mutex::new(Users::default()),
                limits: Mutex::new(Limits {
                    pages_per_s: vec![None; n],
                    current: vec![0.0; n],
                    stop: false,
                    generation: 0,
                }),
                changed: Condvar::new(),
            }),
            vcpus,
            thread: Mutex::new(None),
            running: AtomicBool::new(false),
            edits: Mutex::new(()),
        }
    }

    fn users(&self) -> MutexGuard<'_, Users> {
        self.shared.users.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn limits(&self) -> MutexGuard<'_, Limits> {
        self.shared.limits.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A migration starts its log: `start` (which restarts KVM's logging) runs under the
    /// users' lock, so a measurement starting at the same time cannot restart it again
    /// after the migration's first pass began.
    pub fn migration_starts<E>(&self, start: impl FnOnce() -> Result<(), E>) -> Result<(), E> {
        let mut u = self.users();
        start()?;
        u.migration = true;
        Ok(())
    }

    /// A migration ends its log: KVM's logging goes off unless a measurement or a limit
    /// still needs it.
    pub fn migration_ends(&self) -> hypervisor::Result<()> {
        let mut u = self.users();
        u.migration = false;
        if u.watchers == 0 {
            self.shared.hv.stop_dirty_log()
        } else {
            Ok(())
        }
    }

    /// `vcpus` as the number QMP's `cpu-index` must be below.
    pub fn vcpus(&self) -> u32 {
        self.vcpus
    }

    /// Whether this VM has dirty rings.
    pub fn has_rings(&self) -> bool {
        self.shared.hv.tracking().is_ring()
    }

    /// Keeps dirty logging on for `what` until [`Self::unwatch`].
    pub fn watch(&self, what: &'static str) -> Result<(), DirtyRateError> {
        if !self.has_rings() {
            return Err(DirtyRateError::NoRings { what });
        }
        let mut u = self.users();
        if !self.shared.hv.is_logging() {
            self.shared
                .hv
                .start_dirty_log()
                .map_err(|source| DirtyRateError::Logging { what, source })?;
        }
        u.watchers += 1;
        Ok(())
    }

    /// Ends one [`Self::watch`]; the last one turns logging off unless a migration runs.
    pub fn unwatch(&self) {
        let mut u = self.users();
        u.watchers = u.watchers.saturating_sub(1);
        if u.watchers == 0 && !u.migration {
            if let Err(e) = self.shared.hv.stop_dirty_log() {
                log::warn!("turning dirty logging off after the last dirty-rate user: {e}");
            }
        }
    }

    /// Every vCPU's harvest count now: the vCPUs are kicked out of KVM_RUN first (so what
    /// the CPU buffered is in the rings) and every ring harvested.
    pub fn sample(&self) -> Result<Sample, DirtyRateError> {
        let all: Vec<u32> = (0..self.vcpus).collect();
        self.shared.control.flush(&all, Some(FLUSH_WAIT));
        self.shared
            .hv
            .harvest_rings()
            .map_err(|source| DirtyRateError::Logging {
                what: "a dirty-rate sample",
                source,
            })?;
        Ok(Sample {
            at: Instant::now(),
            pages: self.shared.hv.rings_harvested(),
        })
    }

    fn check_index(&self, index: Option<i64>) -> Result<Option<usize>, DirtyRateError> {
        match index {
            None => Ok(None),
            Some(i) if i >= 0 && i < i64::from(self.vcpus) => Ok(Some(i as usize)),
            Some(i) => Err(DirtyRateError::NoSuchVcpu {
                index: i,
                count: self.vcpus,
            }),
        }
    }

    /// `set-vcpu-dirty-limit`: vCPU `index` (None: all) dirties at most `mib_per_s`.
    pub fn set_limit(&self, index: Option<i64>, mib_per_s: i128) -> Result<(), DirtyRateError> {
        const WHAT: &str = "set-vcpu-dirty-limit";
        if !self.has_rings() {
            return Err(DirtyRateError::NoRings { what: WHAT });
        }
        let index = self.check_index(index)?;
        let _edit = self.edits.lock().unwrap_or_else(|p| p.into_inner());
        let pages = u64::try_from(mib_per_s)
            .ok()
            .filter(|&m| m >= 1)
            .and_then(|m| m.checked_mul(PAGES_PER_MIB))
            .ok_or(DirtyRateError::BadLimit(mib_per_s))?;
        let had_any = self.limits().pages_per_s.iter().any(Option::is_some);
        if !had_any {
            self.watch(WHAT)?;
        }
        self.ensure_thread().inspect_err(|_| {
            if !had_any {
                self.unwatch();
            }
        })?;
        let mut l = self.limits();
        match index {
            Some(i) => l.pages_per_s[i] = Some(pages),
            None => l.pages_per_s.iter_mut().for_each(|p| *p = Some(pages)),
        }
        l.generation += 1;
        self.shared.changed.notify_all();
        log::info!(
            "dirty limit: {} at {mib_per_s} MiB/s",
            index.map_or("every vCPU".to_string(), |i| format!("vCPU {i}"))
        );
        Ok(())
    }

    /// `cancel-vcpu-dirty-limit`: vCPU `index` (None: all) runs free again.
    pub fn cancel_limit(&self, index: Option<i64>) -> Result<(), DirtyRateError> {
        if !self.has_rings() {
            return Err(DirtyRateError::NoRings {
                what: "cancel-vcpu-dirty-limit",
            });
        }
        let index = self.check_index(index)?;
        let _edit = self.edits.lock().unwrap_or_else(|p| p.into_inner());
        let mut l = self.limits();
        let had_any = l.pages_per_s.iter().any(Option::is_some);
        match index {
            Some(i) => l.pages_per_s[i] = None,
            None => l.pages_per_s.iter_mut().for_each(|p| *p = None),
        }
        for (i, p) in l.pages_per_s.iter().enumerate() {
            if p.is_none() {
                self.shared.control.hold_vcpu(i as u32, 0);
            }
        }
        let has_any = l.pages_per_s.iter().any(Option::is_some);
        l.generation += 1;
        self.shared.changed.notify_all();
        drop(l);
        if had_any && !has_any {
            self.unwatch();
        }
        Ok(())
    }

    /// `query-vcpu-dirty-limit`: the limited vCPUs, in index order.
    pub fn limits_info(&self) -> Vec<LimitInfo> {
        let l = self.limits();
        l.pages_per_s
            .iter()
            .zip(&l.current)
            .enumerate()
            .filter_map(|(i, (lim, cur))| {
                lim.map(|p| LimitInfo {
                    cpu_index: i as u32,
                    limit_rate: p / PAGES_PER_MIB,
                    current_rate: (cur / PAGES_PER_MIB as f64).round() as u64,
                })
            })
            .collect()
    }

    fn ensure_thread(&self) -> Result<(), DirtyRateError> {
        let mut t = self.thread.lock().unwrap_or_else(|p| p.into_inner());
        if t.is_some() {
            return Ok(());
        }
        let shared = self.shared.clone();
        // The thread inherits the spawning (API or QMP) thread's seccomp filter, which
        // allows what it does: harvest the rings and kick vCPU threads.
        let handle = std::thread::Builder::new()
            .name("dirty-limit".into())
            .spawn(move || limiter(&shared))
            .map_err(DirtyRateError::Thread)?;
        *t = Some(handle);
        self.running.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Ends the limiter thread and lets every vCPU run (before the vCPU threads end).
    pub fn shut_down(&self) {
        {
            let mut l = self.limits();
            l.stop = true;
            self.shared.changed.notify_all();
        }
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
        if self.running.swap(false, Ordering::SeqCst) {
            for i in 0..self.vcpus {
                self.shared.control.hold_vcpu(i, 0);
            }
        }
    }
}

impl Drop for RingWatch {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// A limited vCPU's account, in pages.
#[derive(Clone, Copy, Default)]
struct Account {
    last_total: u64,
    /// Pages dirtied beyond the allowance (negative: saved-up allowance).
    debt: f64,
    /// For the debug log: pages booked and nap time asked since it last printed.
    booked: u64,
    napped: f64,
}

impl Account {
    /// Books `pages` dirtied over `dt` seconds against `limit` pages/s; returns how long
    /// the vCPU must stay out from now (seconds, 0: it may run) for its rate to come back
    /// to the limit.
    fn settle(&mut self, pages: f64, limit: f64, dt: f64) -> f64 {
        self.debt = (self.debt + pages - limit * dt).max(-limit * MAX_CREDIT_SECS);
        if self.debt > 0.0 {
            self.debt / limit
        } else {
            0.0
        }
    }
}

/// The limiter thread: idle while no limit is set. It runs raised for its life: each tick
/// is a few microseconds of work, but a tick that waits for a CPU behind busy vCPU threads
/// lets a vCPU run free meanwhile (or nap longer than it should).
fn limiter(s: &Shared) {
    let _raised = vm_migration::priority::ThreadNice::raise_current("the dirty limiter's thread");
    let mut seen_generation = u64::MAX;
    let mut accounts: Vec<Account> = Vec::new();
    let mut last = Instant::now();
    let mut harvested = Instant::now();
    let mut logged = Instant::now();
    loop {
        let (limits, generation) = {
            let mut l = s.limits.lock().unwrap_or_else(|p| p.into_inner());
            while !l.stop && l.pages_per_s.iter().all(Option::is_none) {
                l.current.iter_mut().for_each(|c| *c = 0.0);
                l = s.changed.wait(l).unwrap_or_else(|p| p.into_inner());
            }
            if l.stop {
                return;
            }
            (l.pages_per_s.clone(), l.generation)
        };
        let limited: Vec<u32> = limits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_some())
            .map(|(i, _)| i as u32)
            .collect();
        // Kicked now, their buffered entries are harvested by this tick or the next.
        s.control.flush(&limited, None);
        if harvested.elapsed() >= HARVEST_PERIOD {
            harvested = Instant::now();
            if let Err(e) = s.hv.harvest_rings() {
                log::warn!("dirty limit: harvesting the rings: {e}");
            }
        }
        let totals = s.hv.rings_dirtied();
        let now = Instant::now();
        if generation != seen_generation || accounts.len() != totals.len() {
            // Limits changed: every account starts from here.
            seen_generation = generation;
            accounts = totals
                .iter()
                .map(|&t| Account {
                    last_total: t,
                    ..Account::default()
                })
                .collect();
            last = now;
            std::thread::sleep(TICK);
            continue;
        }
        let dt = now.duration_since(last).as_secs_f64().max(1e-6);
        last = now;
        let mut rates = Vec::with_capacity(totals.len());
        for (i, (&total, acc)) in totals.iter().zip(accounts.iter_mut()).enumerate() {
            let delta = total.saturating_sub(acc.last_total) as f64;
            acc.last_total = total;
            rates.push(delta / dt);
            let Some(limit) = limits.get(i).copied().flatten() else {
                acc.debt = 0.0;
                continue;
            };
            let nap = acc.settle(delta, limit as f64, dt);
            acc.booked += delta as u64;
            acc.napped += nap.min(TICK.as_secs_f64());
            let until = if nap > 0.0 {
                now_us() + (nap * 1e6) as u64
            } else {
                0
            };
            s.control.hold_vcpu(i as u32, until);
        }
        if logged.elapsed() >= Duration::from_secs(1) {
            let secs = logged.elapsed().as_secs_f64();
            logged = Instant::now();
            let per: Vec<String> = accounts
                .iter_mut()
                .map(|a| {
                    let s = format!(
                        "{:.0} pages/s napping {:.0} %",
                        a.booked as f64 / secs,
                        a.napped / secs * 100.0
                    );
                    (a.booked, a.napped) = (0, 0.0);
                    s
                })
                .collect();
            // Per-second figures: how lumpy the limiting is (a loaded host runs the limiter
            // late, and a vCPU runs free until it does).
            log::debug!("dirty limit, per vCPU: {per:?}");
        }
        {
            let mut l = s.limits.lock().unwrap_or_else(|p| p.into_inner());
            let alpha = (dt / RATE_WINDOW_SECS).min(1.0);
            for (c, r) in l.current.iter_mut().zip(&rates) {
                *c += alpha * (r - *c);
            }
        }
        std::thread::sleep(TICK);
    }
}

/// MiB/s from `pages` over `secs` (QMP's integer "MB/s", rounded to the nearest).
pub fn mib_per_s(pages: u64, secs: f64) -> i64 {
    if secs <= 0.0 {
        return 0;
    }
    (pages as f64 / PAGES_PER_MIB as f64 / secs).round() as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_mib_per_second() {
        assert_eq!(mib_per_s(256, 1.0), 1);
        assert_eq!(mib_per_s(2560, 2.0), 5);
        assert_eq!(mib_per_s(8000 * 2, 2.0), 31);
        assert_eq!(mib_per_s(5, 0.0), 0);
    }

    /// A vCPU that would dirty 10x its limit, with its naps honoured, dirties at its
    /// limit; one that dirties below it is never held, and saves up little allowance.
    #[test]
    fn the_account_holds_a_fast_vcpu_at_its_limit() {
        let (limit, tick, fast) = (1000.0, 0.005, 10_000.0);
        let mut acc = Account::default();
        let (mut t, mut pages, mut nap_until) = (0.0, 0.0, 0.0);
        while t < 10.0 {
            // The vCPU runs unless napping; the limiter books each tick.
            let ran = if t >= nap_until { fast * tick } else { 0.0 };
            pages += ran;
            t += tick;
            let nap = acc.settle(ran, limit, tick);
            if nap > 0.0 {
                nap_until = t + nap;
            }
        }
        let rate = pages / t;
        assert!((rate - limit).abs() < limit * 0.02, "{rate} pages/s");

        let mut slow = Account::default();
        for _ in 0..1000 {
            assert_eq!(slow.settle(limit * tick / 2.0, limit, tick), 0.0);
        }
        assert!(slow.debt >= -limit * MAX_CREDIT_SECS, "{}", slow.debt);
    }

    #[test]
    fn errors_name_the_value() {
        let e = DirtyRateError::NoSuchVcpu { index: 7, count: 2 }.to_string();
        assert!(e.contains("cpu-index 7") && e.contains("0 to 1"), "{e}");
        let e = DirtyRateError::BadLimit(-3).to_string();
        assert!(e.contains("dirty-rate -3"), "{e}");
    }
}
