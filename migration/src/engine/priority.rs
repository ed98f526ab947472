//! The switch-over's own threads run ahead of the guest's for its few milliseconds.
//!
//! On a host with as many busy threads as CPUs (the 2-core test host: a guest's vCPUs
//! running flat out on the destination, a migration's two ends), the thread that sends
//! `Complete` or `Resumed`, or reads it, can wait for a CPU behind a vCPU thread for a
//! scheduler slice (a few ms) after its wake-up, while the guest stays paused or the
//! source's clock runs on. A higher priority makes the wake-up take a CPU at once; it is
//! held only from the pause to `Resumed`, so no guest loses anything to it otherwise.

/// The nice value of a thread in the switch-over (the dirty limiter's too).
const SWITCH_OVER_NICE: libc::c_int = -10;

/// The calling thread at [`SWITCH_OVER_NICE`] until dropped, then back where it was.
pub(super) struct SwitchOverPriority {
    tid: libc::id_t,
    before: libc::c_int,
}

impl SwitchOverPriority {
    /// Raises the calling thread's priority; `None` (said in the log) where the host
    /// refuses it (no CAP_SYS_NICE): the switch-over works the same, only less promptly
    /// on a busy host.
    pub(super) fn raise(side: &str) -> Option<SwitchOverPriority> {
        // SAFETY: gettid has no arguments and cannot fail.
        let tid = unsafe { libc::syscall(libc::SYS_gettid) } as libc::id_t;
        // getpriority may return -1 as a value: errno tells.
        // SAFETY: __errno_location returns this thread's errno, valid for the thread.
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: getpriority reads its two integer arguments only.
        let before = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid) };
        if before == -1 && std::io::Error::last_os_error().raw_os_error() != Some(0) {
            log::info!(
                "{side}: the switch-over thread keeps its priority (getpriority: {})",
                std::io::Error::last_os_error()
            );
            return None;
        }
        if before <= SWITCH_OVER_NICE {
            return None;
        }
        // SAFETY: setpriority reads its three integer arguments only; `tid` is this thread.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, SWITCH_OVER_NICE) } != 0 {
            log::info!(
                "{side}: the switch-over thread keeps its priority (setpriority nice \
                 {SWITCH_OVER_NICE}: {}); on a busy host the pause may be longer",
                std::io::Error::last_os_error()
            );
            return None;
        }
        Some(SwitchOverPriority { tid, before })
    }
}

impl Drop for SwitchOverPriority {
    fn drop(&mut self) {
        // SAFETY: as in `raise`; lowering a priority needs no privilege.
        let _ = unsafe { libc::setpriority(libc::PRIO_PROCESS, self.tid, self.before) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nice() -> libc::c_int {
        // SAFETY: getpriority reads its two integer arguments only; 0 is this thread.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
    }

    /// Raised while held (where the host allows it), and back to what it was after.
    #[test]
    fn the_priority_is_raised_while_held_and_put_back() {
        std::thread::spawn(|| {
            let before = nice();
            match SwitchOverPriority::raise("test") {
                Some(p) => {
                    assert_eq!(nice(), SWITCH_OVER_NICE);
                    drop(p);
                }
                None => eprintln!("skipped the raised part: this host refuses setpriority"),
            }
            assert_eq!(nice(), before);
        })
        .join()
        .unwrap();
    }
}
