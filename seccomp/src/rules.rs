//! The allow-lists, by thread kind. A call is listed for a kind when a thread of that
//! kind makes it in normal work (found by running the whole test suite with
//! `--seccomp log` and reading the kernel's log); each line says who needs it.

use libc::*;

use crate::ThreadKind;

/// Every thread: memory, locks, time, signals, its own exit, and the SIGSYS handler's
/// write and exit_group.
const BASE: &[c_long] = &[
    SYS_brk,
    SYS_clock_gettime,
    SYS_clock_nanosleep,
    SYS_close,
    SYS_exit,
    SYS_exit_group,
    SYS_futex,
    SYS_getpid,
    SYS_getrandom,
    SYS_gettid,
    SYS_madvise,
    SYS_mmap,
    SYS_mprotect,
    SYS_mremap,
    SYS_munmap,
    SYS_nanosleep,
    SYS_poll,
    SYS_ppoll,
    SYS_read,
    SYS_restart_syscall,
    SYS_rseq,
    SYS_rt_sigaction,
    SYS_rt_sigprocmask,
    SYS_rt_sigreturn,
    SYS_sched_getaffinity,
    SYS_sched_yield,
    SYS_set_robust_list,
    SYS_sigaltstack,
    SYS_write,
];

/// The main and API threads: everything that builds, runs, migrates and tears down a VM
/// outside the guest's hot paths.
const VMM: &[c_long] = &[
    SYS_accept4,
    SYS_bind,
    SYS_chmod,
    SYS_clone,
    SYS_clone3,
    SYS_connect,
    SYS_dup,
    SYS_epoll_create1,
    SYS_epoll_ctl,
    SYS_epoll_pwait,
    SYS_epoll_wait,
    SYS_eventfd2,
    SYS_fallocate,
    SYS_fcntl,
    SYS_fdatasync,
    SYS_fstat,
    SYS_fsync,
    SYS_ftruncate,
    SYS_getcwd,
    SYS_getpeername,
    // A migration's switch-over thread puts its priority back after the pause.
    SYS_getpriority,
    SYS_getsockname,
    SYS_getsockopt,
    SYS_ioctl,
    SYS_kill,
    SYS_listen,
    SYS_lseek,
    SYS_memfd_create,
    SYS_mkdir,
    SYS_newfstatat,
    SYS_open,
    SYS_openat,
    SYS_pipe2,
    SYS_prctl,
    // getrlimit(RLIMIT_NICE): may a vCPU lowered for a migration be put back
    // (migration/src/priority.rs).
    SYS_prlimit64,
    SYS_pread64,
    SYS_preadv,
    SYS_pwrite64,
    SYS_pwritev,
    SYS_readlink,
    SYS_readv,
    SYS_recvfrom,
    SYS_recvmsg,
    SYS_rename,
    SYS_sched_setaffinity,
    SYS_seccomp,
    SYS_sendmsg,
    SYS_sendto,
    // The dirty limiter's thread raises its own priority, a migration's switch-over thread
    // its own for the pause, and the migration's thread lowers and raises the vCPU threads'
    // (migration/src/priority.rs).
    SYS_setpriority,
    SYS_setsockopt,
    SYS_shutdown,
    SYS_socket,
    SYS_socketpair,
    SYS_statx,
    SYS_tgkill,
    SYS_timerfd_create,
    SYS_timerfd_settime,
    SYS_umask,
    SYS_uname,
    SYS_unlink,
    SYS_unlinkat,
    // Postcopy's page-fault descriptor where /dev/userfaultfd is missing.
    SYS_userfaultfd,
    SYS_wait4,
    SYS_writev,
];

/// A vCPU: KVM_RUN and the exits it emulates (serial file writes, eventfd kicks,
/// vfio-user BAR accesses over the device's socket), and a virtio device's start when the
/// guest sets DRIVER_OK (its eventfds and epoll; the worker thread itself comes from the
/// spawner, `crate::spawn`).
const VCPU: &[c_long] = &[
    SYS_epoll_create1,
    SYS_eventfd2,
    SYS_fcntl,
    SYS_ioctl,
    SYS_recvfrom,
    SYS_recvmsg,
    SYS_sendmsg,
    SYS_sendto,
    SYS_tgkill,
    SYS_writev,
];

/// A virtio queue worker: event-manager's epoll, the disk and the rng source; the
/// vIOMMU's worker also tells vfio-user devices of MAP/UNMAP over their sockets.
const DEVICE_WORKER: &[c_long] = &[
    SYS_epoll_ctl,
    SYS_epoll_pwait,
    SYS_epoll_wait,
    SYS_fdatasync,
    SYS_fsync,
    SYS_ioctl,
    SYS_lseek,
    SYS_pread64,
    SYS_preadv,
    SYS_pwrite64,
    SYS_pwritev,
    SYS_recvfrom,
    SYS_recvmsg,
    SYS_sendmsg,
    SYS_sendto,
];

/// A migration connection, either way: its socket (data, the peer's acknowledgements,
/// timeouts, shutdown on failure).
const MIGRATION_SOCKET: &[c_long] = &[
    SYS_ioctl,
    SYS_recvfrom,
    SYS_recvmsg,
    SYS_sendmsg,
    SYS_sendto,
    SYS_setsockopt,
    SYS_shutdown,
    SYS_writev,
];

/// One connection of an outgoing migration: the socket, and guest RAM read from its
/// memfd where it is shared.
const MIGRATION_SENDER: &[c_long] = &[SYS_pread64];

/// One connection of an incoming migration: the socket, and guest RAM it reads into
/// (mapped: nothing more).
const MIGRATION_RECEIVER: &[c_long] = &[];

/// Auto-converge: sleeps and kicks the vCPUs with a signal.
const THROTTLE: &[c_long] = &[SYS_tgkill];

/// The system calls a thread of `kind` may make (its own filter; the VMM filter it
/// inherited applies too).
pub fn allowed(kind: ThreadKind) -> Vec<c_long> {
    let own: &[&[c_long]] = match kind {
        ThreadKind::Vmm => &[VMM],
        ThreadKind::Vcpu => &[VCPU],
        ThreadKind::DeviceWorker => &[DEVICE_WORKER],
        ThreadKind::MigrationSender => &[MIGRATION_SOCKET, MIGRATION_SENDER],
        ThreadKind::MigrationReceiver => &[MIGRATION_SOCKET, MIGRATION_RECEIVER],
        ThreadKind::Throttle => &[THROTTLE],
    };
    BASE.iter()
        .chain(own.iter().flat_map(|l| l.iter()))
        .copied()
        .collect()
}
