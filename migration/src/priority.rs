//! Thread priorities around a migration, changed for a while and put back.
//!
//! On a host with as many busy threads as CPUs (the 2-core test host: a guest's vCPUs
//! running flat out, a migration's two ends), who gets a CPU decides how fast a migration
//! goes and how long a pause lasts. Three users, one guard:
//! - the switch-over's threads are raised from the pause until `Resumed`, so that a
//!   wake-up does not wait a scheduler slice behind a vCPU thread while the guest is
//!   stopped (`engine`);
//! - the dirty limiter's thread is raised for its life, so its ticks are on time
//!   (`vmm`'s `dirty_rate`);
//! - a migrating guest's vCPU threads are lowered while it runs, so that its pages go out
//!   rather than wait behind the guest that dirties them (`vmm`'s migration handler).

/// The nice value of a raised thread.
pub const RAISED_NICE: libc::c_int = -10;
/// How far a yielding thread is lowered: nice +10 against its peers' 0 gives it a
/// scheduler weight of 110 against 1024, a tenth of a contended CPU.
pub const YIELD_BY: libc::c_int = 10;
/// The lowest priority there is.
const MAX_NICE: libc::c_int = 19;

/// A thread's nice value, changed until dropped, then put back where it was.
#[derive(Debug)]
pub struct ThreadNice {
    tid: libc::id_t,
    before: libc::c_int,
}

/// The calling thread's id.
pub fn current_tid() -> libc::id_t {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as libc::id_t }
}

impl ThreadNice {
    /// The calling thread at [`RAISED_NICE`]. `None` where it is there already, or the
    /// host refuses (no CAP_SYS_NICE; said in the log with `who`): the work is the same,
    /// only less prompt on a busy host.
    pub fn raise_current(who: &str) -> Option<ThreadNice> {
        let tid = current_tid();
        let before = nice_of(tid, who)?;
        if before <= RAISED_NICE {
            return None;
        }
        Self::set(tid, before, RAISED_NICE, who)
    }

    /// Thread `tid` [`YIELD_BY`] lower. `None` where it is at the bottom already, or it
    /// could not be put back afterwards: without CAP_SYS_NICE (or an RLIMIT_NICE that
    /// allows it) a thread's priority can be lowered but never raised again, and a guest
    /// whose migration failed must not run on at a tenth of a CPU.
    pub fn lower(tid: libc::id_t, who: &str) -> Option<ThreadNice> {
        let before = nice_of(tid, who)?;
        let nice = (before + YIELD_BY).min(MAX_NICE);
        if nice <= before {
            return None;
        }
        if !may_raise_to(before) {
            log::info!(
                "{who} keeps its priority (nice {before}): without CAP_SYS_NICE or an \
                 RLIMIT_NICE of {} it could not be put back",
                20 - before
            );
            return None;
        }
        Self::set(tid, before, nice, who)
    }

    /// Moves the thread to [`RAISED_NICE`] while the guard is held (dropping it still
    /// puts back the nice value from before); `false` where the host refuses.
    pub fn raise_held(&self) -> bool {
        // SAFETY: setpriority reads its three integer arguments only.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, self.tid, RAISED_NICE) == 0 }
    }

    fn set(
        tid: libc::id_t,
        before: libc::c_int,
        nice: libc::c_int,
        who: &str,
    ) -> Option<ThreadNice> {
        // SAFETY: setpriority reads its three integer arguments only.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) } != 0 {
            log::info!(
                "{who} keeps its priority (setpriority thread {tid} nice {nice}: {})",
                std::io::Error::last_os_error()
            );
            return None;
        }
        Some(ThreadNice { tid, before })
    }
}

impl Drop for ThreadNice {
    fn drop(&mut self) {
        // SAFETY: setpriority reads its three integer arguments only. Raising back needs
        // the privilege that `raise_current` used or `lower` checked for.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, self.tid, self.before) } != 0 {
            log::warn!(
                "thread {} not put back to nice {}: {}",
                self.tid,
                self.before,
                std::io::Error::last_os_error()
            );
        }
    }
}

/// Thread `tid`'s nice value; `None` (said in the log) when it cannot be read.
fn nice_of(tid: libc::id_t, who: &str) -> Option<libc::c_int> {
    // getpriority may return -1 as a value: errno tells.
    // SAFETY: __errno_location returns this thread's errno, valid for the thread.
    unsafe { *libc::__errno_location() = 0 };
    // SAFETY: getpriority reads its two integer arguments only.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid) };
    let e = std::io::Error::last_os_error();
    if nice == -1 && e.raw_os_error() != Some(0) {
        log::info!("{who} keeps its priority (getpriority thread {tid}: {e})");
        return None;
    }
    Some(nice)
}

/// Whether this process may set a thread back to `nice` after lowering it.
fn may_raise_to(nice: libc::c_int) -> bool {
    const CAP_SYS_NICE: u32 = 23;
    let status = std::fs::read_to_string("/proc/thread-self/status").unwrap_or_default();
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    if effective & (1 << CAP_SYS_NICE) != 0 {
        return true;
    }
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit, which `limit` is.
    if unsafe { libc::getrlimit(libc::RLIMIT_NICE, &mut limit) } != 0 {
        return false;
    }
    // RLIMIT_NICE n allows nice values down to 20 - n.
    i64::from(20 - nice) <= limit.rlim_cur as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nice() -> libc::c_int {
        nice_of(current_tid(), "test").unwrap()
    }

    /// Raised while held (where the host allows it), and back to what it was after.
    #[test]
    fn a_raised_thread_is_put_back() {
        std::thread::spawn(|| {
            let before = nice();
            match ThreadNice::raise_current("test") {
                Some(p) => {
                    assert_eq!(nice(), RAISED_NICE);
                    drop(p);
                }
                None => eprintln!("skipped the raised part: this host refuses setpriority"),
            }
            assert_eq!(nice(), before);
        })
        .join()
        .unwrap();
    }

    /// Another thread lowered by `YIELD_BY` while held, and back after; or left alone
    /// where it could not be put back.
    #[test]
    fn a_lowered_thread_is_put_back() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            tx.send(current_tid()).unwrap();
            let _ = done_rx.recv();
        });
        let tid = rx.recv().unwrap();
        let before = nice_of(tid, "test").unwrap();
        match ThreadNice::lower(tid, "test") {
            Some(g) => {
                assert_eq!(
                    nice_of(tid, "test"),
                    Some((before + YIELD_BY).min(MAX_NICE))
                );
                if g.raise_held() {
                    assert_eq!(nice_of(tid, "test"), Some(RAISED_NICE));
                }
                drop(g);
            }
            None => assert!(!may_raise_to(before) || before == MAX_NICE),
        }
        assert_eq!(nice_of(tid, "test"), Some(before));
        done_tx.send(()).unwrap();
        t.join().unwrap();
    }
}
