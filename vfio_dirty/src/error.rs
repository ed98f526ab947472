// Copyright 2026 Ferry authors
// SPDX-License-Identifier: Apache-2.0

//! errno → [`BackendError`], the one raw ioctl call every backend goes through, and the one
//! error [`BackendError`] cannot say: a migration state step refused before any ioctl.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use thiserror::Error;

pub use crate::policy::BackendError;

/// What an ioctl's return value and errno mean: a negative return is the errno (EIO when the
/// kernel left none, which it does not do, but an error must never read as success).
pub fn check(op: &'static str, ret: i32, errno: i32) -> Result<i32, BackendError> {
    if ret < 0 {
        Err(BackendError {
            op,
            errno: if errno > 0 { errno } else { libc::EIO },
        })
    } else {
        Ok(ret)
    }
}

/// An [`io::Error`] (an `open`, a failed syscall) as a [`BackendError`] of `op`.
pub fn from_io(op: &'static str, e: &io::Error) -> BackendError {
    BackendError {
        op,
        errno: e.raw_os_error().filter(|&n| n > 0).unwrap_or(libc::EIO),
    }
}

/// An error the caller refused before asking the kernel, with the errno the kernel would
/// have given (EINVAL for a malformed argument).
pub fn refused(op: &'static str, errno: i32) -> BackendError {
    BackendError { op, errno }
}

/// Whether the error says "this kernel, driver or device does not do that" rather than
/// "that failed": ENOTTY (unknown ioctl or feature), EOPNOTSUPP, ENOIOCTLCMD (515, what the
/// iommufd VFIO compat layer gives for `VFIO_IOMMU_DIRTY_PAGES`) and EINVAL for a feature
/// index the device does not know.
pub fn is_unsupported(e: &BackendError) -> bool {
    const ENOIOCTLCMD: i32 = 515;
    matches!(
        e.errno,
        libc::ENOTTY | libc::EOPNOTSUPP | libc::EINVAL | ENOIOCTLCMD
    )
}

/// `ioctl(fd, req, arg)`, the errno mapped to a [`BackendError`] named `op`.
///
/// # Safety
/// `arg` must be what the kernel expects for `req` on this kind of fd: a pointer to a live,
/// writable buffer at least as large as the size the argument declares (its `size`/`argsz`),
/// every pointer inside it valid for what the kernel reads or writes there, or for a request
/// taking an integer, that integer.
pub(crate) unsafe fn ioctl(
    fd: BorrowedFd<'_>,
    req: u64,
    arg: libc::c_ulong,
    op: &'static str,
) -> Result<i32, BackendError> {
    // SAFETY: the fd is open for the borrow's lifetime; what `arg` points at is the caller's
    // promise above. `req as _` only adapts to the libc signature (c_ulong or c_int).
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg) };
    let errno = if ret < 0 {
        io::Error::last_os_error().raw_os_error().unwrap_or(0)
    } else {
        0
    };
    check(op, ret, errno)
}

/// A migration state change refused, by the step rules before any ioctl, or by the kernel.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum MigrationError {
    #[error("migration state {from:?} -> {to:?} is not a step Ferry takes")]
    Illegal {
        from: crate::device_log::MigState,
        to: crate::device_log::MigState,
    },
    #[error("migration state {0:?} needs a capability the device does not offer")]
    Unsupported(crate::device_log::MigState),
    #[error("the device reported state {0}, which is not a VFIO migration state")]
    UnknownState(u32),
    #[error(transparent)]
    Backend(#[from] BackendError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negative_return_is_the_errno() {
        assert_eq!(
            check("IOMMU_HWPT_ALLOC", -1, libc::EOPNOTSUPP),
            Err(BackendError {
                op: "IOMMU_HWPT_ALLOC",
                errno: libc::EOPNOTSUPP
            })
        );
        assert_eq!(check("x", 0, 0), Ok(0));
        // A positive return (GROUP_GET_DEVICE_FD, CHECK_EXTENSION) is a value, not an error,
        // whatever errno still holds.
        assert_eq!(check("x", 7, libc::EINVAL), Ok(7));
    }

    #[test]
    fn failure_without_errno_is_still_a_failure() {
        assert_eq!(check("x", -1, 0).unwrap_err().errno, libc::EIO);
        let e = io::Error::other("no errno");
        assert_eq!(from_io("open", &e).errno, libc::EIO);
        let e = io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(
            from_io("open /dev/iommu", &e),
            BackendError {
                op: "open /dev/iommu",
                errno: libc::ENOENT
            }
        );
    }

    #[test]
    fn unsupported_errnos() {
        for errno in [libc::ENOTTY, libc::EOPNOTSUPP, libc::EINVAL, 515] {
            assert!(is_unsupported(&refused("x", errno)), "{errno}");
        }
        for errno in [libc::ENOENT, libc::EFAULT, libc::ENOMEM, libc::EBUSY] {
            assert!(!is_unsupported(&refused("x", errno)), "{errno}");
        }
    }

    #[test]
    fn messages_name_op_and_errno() {
        assert_eq!(
            refused("VFIO_IOMMU_DIRTY_PAGES", libc::EINVAL).to_string(),
            "VFIO_IOMMU_DIRTY_PAGES failed with errno 22"
        );
    }
}
