//! [`VfioOps`] over a VFIO device fd (a type1 group's device, or a VFIO cdev bound to an
//! iommufd): the region, IRQ and reset ioctls of `include/uapi/linux/vfio.h`, and pread /
//! pwrite at each region's offset in the fd. Nothing here can run on a host without VFIO;
//! the argument layouts are unit-tested against the header's sizes.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

use vfio_dirty::uapi::{io as ioc, VFIO_BASE, VFIO_TYPE};

use super::ops::{IrqInfo, RegionInfo, VfioOps, VfioOpsError};

pub const VFIO_GROUP_GET_DEVICE_FD: u64 = ioc(VFIO_TYPE, VFIO_BASE + 6);
pub const VFIO_DEVICE_GET_INFO: u64 = ioc(VFIO_TYPE, VFIO_BASE + 7);
pub const VFIO_DEVICE_GET_REGION_INFO: u64 = ioc(VFIO_TYPE, VFIO_BASE + 8);
pub const VFIO_DEVICE_GET_IRQ_INFO: u64 = ioc(VFIO_TYPE, VFIO_BASE + 9);
pub const VFIO_DEVICE_SET_IRQS: u64 = ioc(VFIO_TYPE, VFIO_BASE + 10);
pub const VFIO_DEVICE_RESET: u64 = ioc(VFIO_TYPE, VFIO_BASE + 11);

/// `vfio_device_info.flags`.
pub const VFIO_DEVICE_FLAGS_RESET: u32 = 1 << 0;
pub const VFIO_DEVICE_FLAGS_PCI: u32 = 1 << 1;

/// `vfio_irq_set.flags`.
pub const VFIO_IRQ_SET_DATA_NONE: u32 = 1 << 0;
pub const VFIO_IRQ_SET_DATA_BOOL: u32 = 1 << 1;
pub const VFIO_IRQ_SET_DATA_EVENTFD: u32 = 1 << 2;
pub const VFIO_IRQ_SET_ACTION_MASK: u32 = 1 << 3;
pub const VFIO_IRQ_SET_ACTION_UNMASK: u32 = 1 << 4;
pub const VFIO_IRQ_SET_ACTION_TRIGGER: u32 = 1 << 5;

/// `struct vfio_device_info`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VfioDeviceInfo {
    pub argsz: u32,
    pub flags: u32,
    pub num_regions: u32,
    pub num_irqs: u32,
    pub cap_offset: u32,
    pub pad: u32,
}

/// `struct vfio_region_info`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VfioRegionInfo {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub cap_offset: u32,
    pub size: u64,
    pub offset: u64,
}

/// `struct vfio_irq_info`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VfioIrqInfo {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub count: u32,
}

/// `struct vfio_irq_set` header; `data[]` (here: `count` eventfds as s32) follows.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VfioIrqSet {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub start: u32,
    pub count: u32,
}

const HEADER_WORDS: usize = std::mem::size_of::<VfioIrqSet>() / 4;

/// A SET_IRQS argument: the header then the eventfds, as u32 words (4-aligned, as the
/// struct is). `fds` empty with DATA_NONE turns the whole index off.
pub fn irq_set_arg(index: u32, start: u32, fds: &[RawFd]) -> Vec<u32> {
    let count = fds.len() as u32;
    let flags = if fds.is_empty() {
        VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER
    } else {
        VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER
    };
    let argsz = ((HEADER_WORDS + fds.len()) * 4) as u32;
    let mut words = vec![argsz, flags, index, start, count];
    words.extend(fds.iter().map(|&fd| fd as u32));
    words
}

/// The kernel's answer to `ioctl(fd, req, arg)`: a negative return is its errno.
///
/// # Safety
/// `arg` must be what the kernel expects for `req` on this fd: an integer for a request
/// that takes one, else a pointer to a live buffer at least as large as the argument's
/// declared `argsz`, writable where the kernel writes.
unsafe fn ioctl(
    fd: BorrowedFd<'_>,
    req: u64,
    arg: libc::c_ulong,
    op: &'static str,
) -> Result<i32, VfioOpsError> {
    // SAFETY: the fd is open for the borrow; what `arg` points at is the caller's promise.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg) };
    if ret < 0 {
        let errno = io::Error::last_os_error()
            .raw_os_error()
            .filter(|&e| e > 0)
            .unwrap_or(libc::EIO);
        return Err(VfioOpsError::Kernel { op, errno });
    }
    Ok(ret)
}

/// `VFIO_GROUP_GET_DEVICE_FD`: the device `name` (its PCI address, `0000:01:00.0`) of a
/// group that is in a container with its IOMMU set.
pub fn group_device_fd(group: BorrowedFd<'_>, name: &str) -> Result<OwnedFd, VfioOpsError> {
    let c = CString::new(name).map_err(|_| VfioOpsError::Kernel {
        op: "VFIO_GROUP_GET_DEVICE_FD",
        errno: libc::EINVAL,
    })?;
    // SAFETY: GET_DEVICE_FD takes a NUL-terminated string, read only; `c` lives across
    // the call.
    let fd = unsafe {
        ioctl(
            group,
            VFIO_GROUP_GET_DEVICE_FD,
            c.as_ptr() as libc::c_ulong,
            "VFIO_GROUP_GET_DEVICE_FD",
        )
    }?;
    // SAFETY: a non-negative return is a new fd the kernel installed for this process,
    // owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A region access that failed or came up short, as the ops error.
fn transfer_error(
    op: &'static str,
    index: u32,
    offset: u64,
    len: usize,
    e: io::Error,
) -> VfioOpsError {
    if e.kind() == io::ErrorKind::UnexpectedEof || e.kind() == io::ErrorKind::WriteZero {
        // The region ended before the access did (the kernel said 0 bytes).
        return VfioOpsError::Short {
            op,
            index,
            offset,
            len,
        };
    }
    VfioOpsError::Kernel {
        op: if op == "read" { "pread" } else { "pwrite" },
        errno: e.raw_os_error().unwrap_or(libc::EIO),
    }
}

/// A VFIO device fd.
pub struct KernelDevice {
    /// The device fd, as a file: region accesses are pread/pwrite at the region's offset.
    file: std::fs::File,
    info: VfioDeviceInfo,
    /// Region info, asked once per region.
    regions: Mutex<BTreeMap<u32, RegionInfo>>,
}

impl KernelDevice {
    /// Over an opened device fd: asks its info and checks it is a PCI device.
    pub fn new(fd: OwnedFd) -> Result<Self, VfioOpsError> {
        let mut info = VfioDeviceInfo {
            argsz: std::mem::size_of::<VfioDeviceInfo>() as u32,
            ..Default::default()
        };
        // SAFETY: GET_INFO takes a `struct vfio_device_info` of `argsz` bytes and writes
        // within them (a larger capability chain is only announced in `argsz`); `info`
        // lives across the call.
        unsafe {
            ioctl(
                fd.as_fd(),
                VFIO_DEVICE_GET_INFO,
                &mut info as *mut _ as libc::c_ulong,
                "VFIO_DEVICE_GET_INFO",
            )
        }?;
        if info.flags & VFIO_DEVICE_FLAGS_PCI == 0 {
            return Err(VfioOpsError::BadAnswer {
                what: "VFIO_DEVICE_GET_INFO flags (not a PCI device)",
                value: u64::from(info.flags),
            });
        }
        Ok(KernelDevice {
            file: std::fs::File::from(fd),
            info,
            regions: Mutex::new(BTreeMap::new()),
        })
    }

    pub fn info(&self) -> VfioDeviceInfo {
        self.info
    }

    /// The device fd, for DMA logging and migration ioctls.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    fn checked(
        &self,
        index: u32,
        offset: u64,
        len: usize,
    ) -> Result<(RegionInfo, u64), VfioOpsError> {
        let r = self.region_info(index)?;
        let fits = offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= r.size);
        let at = r.offset.checked_add(offset).filter(|_| fits);
        at.map(|at| (r, at)).ok_or(VfioOpsError::OutOfRegion {
            index,
            offset,
            len,
            size: r.size,
        })
    }
}

impl VfioOps for KernelDevice {
    fn region_info(&self, index: u32) -> Result<RegionInfo, VfioOpsError> {
        let mut cache = self.regions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = cache.get(&index) {
            return Ok(*r);
        }
        if index >= self.info.num_regions {
            // A region the device does not have: empty.
            return Ok(RegionInfo {
                index,
                ..Default::default()
            });
        }
        let mut arg = VfioRegionInfo {
            argsz: std::mem::size_of::<VfioRegionInfo>() as u32,
            index,
            ..Default::default()
        };
        // SAFETY: GET_REGION_INFO takes a `struct vfio_region_info` of `argsz` bytes and
        // writes within them (capabilities that do not fit are only announced); `arg`
        // lives across the call.
        unsafe {
            ioctl(
                self.file.as_fd(),
                VFIO_DEVICE_GET_REGION_INFO,
                &mut arg as *mut _ as libc::c_ulong,
                "VFIO_DEVICE_GET_REGION_INFO",
            )
        }?;
        let r = RegionInfo {
            index,
            flags: arg.flags,
            size: arg.size,
            offset: arg.offset,
        };
        cache.insert(index, r);
        Ok(r)
    }

    fn irq_info(&self, index: u32) -> Result<IrqInfo, VfioOpsError> {
        if index >= self.info.num_irqs {
            return Ok(IrqInfo {
                index,
                ..Default::default()
            });
        }
        let mut arg = VfioIrqInfo {
            argsz: std::mem::size_of::<VfioIrqInfo>() as u32,
            index,
            ..Default::default()
        };
        // SAFETY: GET_IRQ_INFO takes a `struct vfio_irq_info` of `argsz` bytes and writes
        // `flags` and `count` in `arg`, which lives across the call.
        unsafe {
            ioctl(
                self.file.as_fd(),
                VFIO_DEVICE_GET_IRQ_INFO,
                &mut arg as *mut _ as libc::c_ulong,
                "VFIO_DEVICE_GET_IRQ_INFO",
            )
        }?;
        Ok(IrqInfo {
            index,
            flags: arg.flags,
            count: arg.count,
        })
    }

    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), VfioOpsError> {
        let (_, at) = self.checked(index, offset, data.len())?;
        self.file
            .read_exact_at(data, at)
            .map_err(|e| transfer_error("read", index, offset, data.len(), e))?;
        Ok(())
    }

    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<(), VfioOpsError> {
        let (_, at) = self.checked(index, offset, data.len())?;
        self.file
            .write_all_at(data, at)
            .map_err(|e| transfer_error("write", index, offset, data.len(), e))?;
        Ok(())
    }

    fn set_irq_eventfds(&self, index: u32, start: u32, fds: &[RawFd]) -> Result<(), VfioOpsError> {
        let mut arg = irq_set_arg(index, start, fds);
        // SAFETY: SET_IRQS takes a `struct vfio_irq_set` followed by `count` s32 eventfds,
        // `argsz` bytes in all: `arg` is exactly that, 4-aligned like the struct, read
        // only, alive across the call. Each fd is an eventfd the caller keeps open, or -1.
        unsafe {
            ioctl(
                self.file.as_fd(),
                VFIO_DEVICE_SET_IRQS,
                arg.as_mut_ptr() as libc::c_ulong,
                "VFIO_DEVICE_SET_IRQS",
            )
        }?;
        Ok(())
    }

    fn disable_irqs(&self, index: u32) -> Result<(), VfioOpsError> {
        self.set_irq_eventfds(index, 0, &[])
    }

    fn reset(&self) -> Result<(), VfioOpsError> {
        if self.info.flags & VFIO_DEVICE_FLAGS_RESET == 0 {
            return Err(VfioOpsError::Kernel {
                op: "VFIO_DEVICE_RESET (the device has no reset)",
                errno: libc::ENOTTY,
            });
        }
        // SAFETY: VFIO_DEVICE_RESET takes no argument and writes no memory.
        unsafe { ioctl(self.file.as_fd(), VFIO_DEVICE_RESET, 0, "VFIO_DEVICE_RESET") }?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn ioctl_numbers_are_vfio_base_plus_n() {
        assert_eq!(VFIO_GROUP_GET_DEVICE_FD, 0x3b6a);
        assert_eq!(VFIO_DEVICE_GET_INFO, 0x3b6b);
        assert_eq!(VFIO_DEVICE_GET_REGION_INFO, 0x3b6c);
        assert_eq!(VFIO_DEVICE_GET_IRQ_INFO, 0x3b6d);
        assert_eq!(VFIO_DEVICE_SET_IRQS, 0x3b6e);
        assert_eq!(VFIO_DEVICE_RESET, 0x3b6f);
    }

    #[test]
    fn layouts_match_the_header() {
        assert_eq!(size_of::<VfioDeviceInfo>(), 24);
        assert_eq!(size_of::<VfioRegionInfo>(), 32);
        assert_eq!(offset_of!(VfioRegionInfo, size), 16);
        assert_eq!(offset_of!(VfioRegionInfo, offset), 24);
        assert_eq!(size_of::<VfioIrqInfo>(), 16);
        assert_eq!(size_of::<VfioIrqSet>(), 20);
    }

    #[test]
    fn irq_set_argument() {
        let a = irq_set_arg(2, 1, &[7, -1, 9]);
        assert_eq!(
            a,
            vec![
                32,
                VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
                2,
                1,
                3,
                7,
                u32::MAX,
                9
            ]
        );
        let off = irq_set_arg(2, 0, &[]);
        assert_eq!(
            off,
            vec![
                20,
                VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
                2,
                0,
                0
            ]
        );
    }
}
