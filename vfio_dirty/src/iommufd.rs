// Copyright 2026 Ferry authors
// SPDX-License-Identifier: Apache-2.0

//! [`IommufdBackend`]: the [`DirtyBackend`] over one `/dev/iommu` fd and one IOAS, with VFIO
//! cdev devices bound to it. A domain is an iommufd paging HWPT allocated on the IOAS.
//!
//! Every ioctl's argument is built by a small pure function (`*_arg`), tested here field by
//! field; the calls themselves need the device nodes and are exercised by
//! `tests/hardware.rs`, which skips where they are missing.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use crate::bitmap::DirtyBitmap;
use crate::error::{from_io, ioctl, refused};
use crate::policy::{BackendError, DeviceId, DirtyBackend, DomainId};
use crate::uapi::*;

// ---- UAPI the crate's `uapi` module does not carry (iommufd.h, vfio.h) ----

/// `struct iommu_destroy` (IOMMU_DESTROY).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IommuDestroy {
    pub size: u32,
    pub id: u32,
}

/// `struct iommu_ioas_alloc` (IOMMU_IOAS_ALLOC).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IommuIoasAlloc {
    pub size: u32,
    pub flags: u32,
    pub out_ioas_id: u32,
}

/// `struct iommu_ioas_map` (IOMMU_IOAS_MAP).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IommuIoasMap {
    pub size: u32,
    pub flags: u32,
    pub ioas_id: u32,
    pub reserved: u32,
    pub user_va: u64,
    pub length: u64,
    pub iova: u64,
}

/// `enum iommufd_ioas_map_flags`.
pub const IOMMU_IOAS_MAP_FIXED_IOVA: u32 = 1 << 0;
pub const IOMMU_IOAS_MAP_WRITEABLE: u32 = 1 << 1;
pub const IOMMU_IOAS_MAP_READABLE: u32 = 1 << 2;

/// `struct vfio_device_bind_iommufd` up to `out_devid` (the kernel's minimum size); the
/// newer `token_uuid_ptr` is only read with `VFIO_DEVICE_BIND_FLAG_TOKEN`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VfioDeviceBindIommufd {
    pub argsz: u32,
    pub flags: u32,
    pub iommufd: i32,
    pub out_devid: u32,
}

/// `struct vfio_device_attach_iommufd_pt` up to `pt_id`; the newer `pasid` is only read with
/// `VFIO_DEVICE_ATTACH_PASID`. The kernel writes the id of the HWPT it attached to back.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VfioDeviceAttachIommufdPt {
    pub argsz: u32,
    pub flags: u32,
    pub pt_id: u32,
}

/// `struct vfio_device_detach_iommufd_pt` without the newer `pasid` (read only with
/// `VFIO_DEVICE_DETACH_PASID`).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VfioDeviceDetachIommufdPt {
    pub argsz: u32,
    pub flags: u32,
}

// The argument sizes below are the structs' own, which fit in u32 by construction.
const fn size32<T>() -> u32 {
    std::mem::size_of::<T>() as u32
}

// ---- argument building ----

pub fn ioas_alloc_arg() -> IommuIoasAlloc {
    IommuIoasAlloc {
        size: size32::<IommuIoasAlloc>(),
        ..Default::default()
    }
}

pub fn destroy_arg(id: u32) -> IommuDestroy {
    IommuDestroy {
        size: size32::<IommuDestroy>(),
        id,
    }
}

/// A fixed-IOVA, read-write mapping of `length` bytes of this process at `user_va`.
pub fn ioas_map_arg(ioas_id: u32, iova: u64, length: u64, user_va: u64) -> IommuIoasMap {
    IommuIoasMap {
        size: size32::<IommuIoasMap>(),
        flags: IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_WRITEABLE | IOMMU_IOAS_MAP_READABLE,
        ioas_id,
        reserved: 0,
        user_va,
        length,
        iova,
    }
}

pub fn ioas_unmap_arg(ioas_id: u32, iova: u64, length: u64) -> IommuIoasUnmap {
    IommuIoasUnmap {
        size: size32::<IommuIoasUnmap>(),
        ioas_id,
        iova,
        length,
    }
}

/// Asks only for the capabilities: no driver-specific data (`data_len` 0).
pub fn hw_info_arg(dev_id: u32) -> IommuHwInfo {
    IommuHwInfo {
        size: size32::<IommuHwInfo>(),
        dev_id,
        ..Default::default()
    }
}

/// A paging HWPT on the IOAS `ioas_id` for the device `dev_id`, dirty-tracking when `dirty`.
pub fn hwpt_alloc_arg(dev_id: u32, ioas_id: u32, dirty: bool) -> IommuHwptAlloc {
    IommuHwptAlloc {
        size: size32::<IommuHwptAlloc>(),
        flags: if dirty {
            IOMMU_HWPT_ALLOC_DIRTY_TRACKING
        } else {
            0
        },
        dev_id,
        pt_id: ioas_id,
        ..Default::default()
    }
}

pub fn set_dirty_tracking_arg(hwpt_id: u32, enable: bool) -> IommuHwptSetDirtyTracking {
    IommuHwptSetDirtyTracking {
        size: size32::<IommuHwptSetDirtyTracking>(),
        flags: if enable {
            IOMMU_HWPT_DIRTY_TRACKING_ENABLE
        } else {
            0
        },
        hwpt_id,
        reserved: 0,
    }
}

/// The query for `bitmap`'s range at its page size, into its buffer (which must stay where
/// it is until the ioctl returns). The bitmap is not touched: the caller zeroed it.
pub fn get_dirty_bitmap_arg(
    hwpt_id: u32,
    bitmap: &mut DirtyBitmap,
    no_clear: bool,
) -> IommuHwptGetDirtyBitmap {
    IommuHwptGetDirtyBitmap {
        size: size32::<IommuHwptGetDirtyBitmap>(),
        hwpt_id,
        flags: if no_clear {
            IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR
        } else {
            0
        },
        reserved: 0,
        iova: bitmap.iova(),
        length: bitmap.length(),
        page_size: bitmap.page_size(),
        data: bitmap.words_mut().as_mut_ptr() as u64,
    }
}

pub fn bind_arg(iommufd: BorrowedFd<'_>) -> VfioDeviceBindIommufd {
    VfioDeviceBindIommufd {
        argsz: size32::<VfioDeviceBindIommufd>(),
        flags: 0,
        iommufd: iommufd.as_raw_fd(),
        out_devid: 0,
    }
}

pub fn attach_arg(pt_id: u32) -> VfioDeviceAttachIommufdPt {
    VfioDeviceAttachIommufdPt {
        argsz: size32::<VfioDeviceAttachIommufdPt>(),
        flags: 0,
        pt_id,
    }
}

pub fn detach_arg() -> VfioDeviceDetachIommufdPt {
    VfioDeviceDetachIommufdPt {
        argsz: size32::<VfioDeviceDetachIommufdPt>(),
        flags: 0,
    }
}

// ---- the backend ----

/// Guest-physical → host-virtual, for the memory the IOAS maps (`IOMMU_IOAS_MAP` takes a
/// user address). `None` unless all of `[gpa, gpa + length)` is one contiguous host range.
pub trait GpaToHva {
    fn hva(&self, gpa: u64, length: u64) -> Option<u64>;
}

impl<F: Fn(u64, u64) -> Option<u64>> GpaToHva for F {
    fn hva(&self, gpa: u64, length: u64) -> Option<u64> {
        self(gpa, length)
    }
}

/// A VFIO cdev bound to the iommufd.
#[derive(Debug)]
struct Device {
    cdev: OwnedFd,
    dev_id: u32,
}

/// The [`DirtyBackend`] over iommufd. Devices come in as opened VFIO cdevs
/// (`/dev/vfio/devices/vfioN`) through [`IommufdBackend::add_device`], which binds them.
pub struct IommufdBackend<T: GpaToHva> {
    // Declared (hence dropped) before `fd`: the cdevs unbind, then the iommufd closes and
    // takes the IOAS and any HWPT left with it.
    devices: BTreeMap<DeviceId, Device>,
    /// HWPT id → whether it was allocated with DIRTY_TRACKING.
    hwpts: BTreeMap<DomainId, bool>,
    fd: OwnedFd,
    ioas_id: u32,
    gpa_to_hva: T,
}

impl<T: GpaToHva> IommufdBackend<T> {
    /// Open `/dev/iommu` and allocate an IOAS.
    pub fn open(gpa_to_hva: T) -> Result<Self, BackendError> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/iommu")
            .map_err(|e| from_io("open /dev/iommu", &e))?;
        Self::new(f.into(), gpa_to_hva)
    }

    /// Over an open iommufd: allocate an IOAS on it.
    pub fn new(fd: OwnedFd, gpa_to_hva: T) -> Result<Self, BackendError> {
        let mut arg = ioas_alloc_arg();
        // SAFETY: IOMMU_IOAS_ALLOC takes a `struct iommu_ioas_alloc` whose `size` is its own;
        // `arg` lives across the call and the kernel only writes `out_ioas_id` in it.
        unsafe {
            ioctl(
                fd.as_fd(),
                IOMMU_IOAS_ALLOC,
                &mut arg as *mut _ as _,
                "IOMMU_IOAS_ALLOC",
            )
        }?;
        Ok(IommufdBackend {
            devices: BTreeMap::new(),
            hwpts: BTreeMap::new(),
            fd,
            ioas_id: arg.out_ioas_id,
            gpa_to_hva,
        })
    }

    pub fn ioas_id(&self) -> u32 {
        self.ioas_id
    }

    pub fn iommufd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Bind the opened VFIO cdev to this iommufd (`VFIO_DEVICE_BIND_IOMMUFD`, once per cdev)
    /// and know it as `id` from now on. Returns the iommufd device id. Not attached yet.
    pub fn add_device(&mut self, id: DeviceId, cdev: OwnedFd) -> Result<u32, BackendError> {
        if self.devices.contains_key(&id) {
            return Err(refused("VFIO_DEVICE_BIND_IOMMUFD", libc::EEXIST));
        }
        let mut arg = bind_arg(self.fd.as_fd());
        // SAFETY: VFIO_DEVICE_BIND_IOMMUFD on a cdev takes a `struct vfio_device_bind_iommufd`
        // of at least `argsz` (its minimum size, without the token pointer, whose flag is not
        // set); `arg` lives across the call and the kernel only writes `out_devid`.
        unsafe {
            ioctl(
                cdev.as_fd(),
                VFIO_DEVICE_BIND_IOMMUFD,
                &mut arg as *mut _ as _,
                "VFIO_DEVICE_BIND_IOMMUFD",
            )
        }?;
        self.devices.insert(
            id,
            Device {
                cdev,
                dev_id: arg.out_devid,
            },
        );
        Ok(arg.out_devid)
    }

    /// Forget the device and hand its cdev back (closing it unbinds it). Detach it first.
    pub fn remove_device(&mut self, id: DeviceId) -> Option<OwnedFd> {
        self.devices.remove(&id).map(|d| d.cdev)
    }

    /// The iommufd device id `id` was bound as.
    pub fn dev_id(&self, id: DeviceId) -> Option<u32> {
        self.devices.get(&id).map(|d| d.dev_id)
    }

    /// The device's cdev, for its own ioctls (DMA logging, migration state).
    pub fn device_fd(&self, id: DeviceId) -> Option<BorrowedFd<'_>> {
        self.devices.get(&id).map(|d| d.cdev.as_fd())
    }

    fn device(&self, id: DeviceId, op: &'static str) -> Result<&Device, BackendError> {
        self.devices.get(&id).ok_or(refused(op, libc::ENOENT))
    }

    /// `IOMMU_GET_HW_INFO`'s `out_capabilities` for the device.
    pub fn hw_capabilities(&mut self, id: DeviceId) -> Result<u64, BackendError> {
        let dev_id = self.device(id, "IOMMU_GET_HW_INFO")?.dev_id;
        let mut arg = hw_info_arg(dev_id);
        // SAFETY: IOMMU_GET_HW_INFO takes a `struct iommu_hw_info` of `size` bytes; with
        // `data_len` 0 the kernel writes no driver data through `data_uptr` (null), only the
        // struct's own output fields, in `arg`, which lives across the call.
        unsafe {
            ioctl(
                self.fd.as_fd(),
                IOMMU_GET_HW_INFO,
                &mut arg as *mut _ as _,
                "IOMMU_GET_HW_INFO",
            )
        }?;
        Ok(arg.out_capabilities)
    }
}

impl<T: GpaToHva> DirtyBackend for IommufdBackend<T> {
    fn device_dirty_capable(&mut self, dev: DeviceId) -> Result<bool, BackendError> {
        Ok(self.hw_capabilities(dev)? & IOMMU_HW_CAP_DIRTY_TRACKING != 0)
    }

    fn alloc_domain(&mut self, dev: DeviceId, dirty: bool) -> Result<DomainId, BackendError> {
        let dev_id = self.device(dev, "IOMMU_HWPT_ALLOC")?.dev_id;
        let mut arg = hwpt_alloc_arg(dev_id, self.ioas_id, dirty);
        // SAFETY: IOMMU_HWPT_ALLOC takes a `struct iommu_hwpt_alloc` of `size` bytes; no
        // driver data (`data_len` 0, null `data_uptr`); the kernel writes `out_hwpt_id` in
        // `arg`, which lives across the call.
        unsafe {
            ioctl(
                self.fd.as_fd(),
                IOMMU_HWPT_ALLOC,
                &mut arg as *mut _ as _,
                "IOMMU_HWPT_ALLOC",
            )
        }?;
        self.hwpts.insert(arg.out_hwpt_id, dirty);
        Ok(arg.out_hwpt_id)
    }

    fn free_domain(&mut self, domain: DomainId) -> Result<(), BackendError> {
        let mut arg = destroy_arg(domain);
        // SAFETY: IOMMU_DESTROY takes a `struct iommu_destroy` of `size` bytes, read only;
        // `arg` lives across the call.
        unsafe {
            ioctl(
                self.fd.as_fd(),
                IOMMU_DESTROY,
                &mut arg as *mut _ as _,
                "IOMMU_DESTROY",
            )
        }?;
        self.hwpts.remove(&domain);
        Ok(())
    }

    fn attach(&mut self, dev: DeviceId, domain: DomainId) -> Result<(), BackendError> {
        let cdev = self
            .device(dev, "VFIO_DEVICE_ATTACH_IOMMUFD_PT")?
            .cdev
            .as_fd();
        let mut arg = attach_arg(domain);
        // SAFETY: VFIO_DEVICE_ATTACH_IOMMUFD_PT on a bound cdev takes a
        // `struct vfio_device_attach_iommufd_pt` of at least `argsz` (its minimum, without
        // `pasid`, whose flag is not set); the kernel writes `pt_id` back in `arg`, which
        // lives across the call.
        unsafe {
            ioctl(
                cdev,
                VFIO_DEVICE_ATTACH_IOMMUFD_PT,
                &mut arg as *mut _ as _,
                "VFIO_DEVICE_ATTACH_IOMMUFD_PT",
            )
        }?;
        Ok(())
    }

    fn detach(&mut self, dev: DeviceId, _domain: DomainId) -> Result<(), BackendError> {
        let cdev = self
            .device(dev, "VFIO_DEVICE_DETACH_IOMMUFD_PT")?
            .cdev
            .as_fd();
        let mut arg = detach_arg();
        // SAFETY: VFIO_DEVICE_DETACH_IOMMUFD_PT takes a `struct vfio_device_detach_iommufd_pt`
        // of at least `argsz` (without `pasid`, whose flag is not set), read only; `arg`
        // lives across the call.
        unsafe {
            ioctl(
                cdev,
                VFIO_DEVICE_DETACH_IOMMUFD_PT,
                &mut arg as *mut _ as _,
                "VFIO_DEVICE_DETACH_IOMMUFD_PT",
            )
        }?;
        Ok(())
    }

    /// A DIRTY_TRACKING HWPT refuses (EINVAL) any device whose IOMMU cannot track, so one
    /// that has its devices attached can; any other HWPT cannot.
    fn domain_dirty_capable(&mut self, domain: DomainId) -> Result<bool, BackendError> {
        self.hwpts
            .get(&domain)
            .copied()
            .ok_or(refused("domain_dirty_capable", libc::ENOENT))
    }

    fn set_tracking(&mut self, domain: DomainId, enable: bool) -> Result<(), BackendError> {
        let mut arg = set_dirty_tracking_arg(domain, enable);
        // SAFETY: IOMMU_HWPT_SET_DIRTY_TRACKING takes a
        // `struct iommu_hwpt_set_dirty_tracking` of `size` bytes, read only; `arg` lives
        // across the call.
        unsafe {
            ioctl(
                self.fd.as_fd(),
                IOMMU_HWPT_SET_DIRTY_TRACKING,
                &mut arg as *mut _ as _,
                "IOMMU_HWPT_SET_DIRTY_TRACKING",
            )
        }?;
        Ok(())
    }

    fn read_dirty(
        &mut self,
        domain: DomainId,
        bitmap: &mut DirtyBitmap,
        no_clear: bool,
    ) -> Result<(), BackendError> {
        const OP: &str = "IOMMU_HWPT_GET_DIRTY_BITMAP";
        if bitmap.length() == 0 || bitmap.page_size() == 0 {
            // Not prepared: nothing to describe to the kernel.
            return Err(refused(OP, libc::EINVAL));
        }
        let mut arg = get_dirty_bitmap_arg(domain, bitmap, no_clear);
        // SAFETY: IOMMU_HWPT_GET_DIRTY_BITMAP takes a `struct iommu_hwpt_get_dirty_bitmap` of
        // `size` bytes. `data` points at the bitmap's words, which `prepare` sized to
        // DIV_ROUND_UP(length / page_size, 64) u64s for exactly this iova/length/page_size,
        // the most the kernel writes; the bitmap is mutably borrowed, so neither moved nor
        // reallocated, until the call returns.
        unsafe {
            ioctl(
                self.fd.as_fd(),
                IOMMU_HWPT_GET_DIRTY_BITMAP,
                &mut arg as *mut _ as _,
                OP,
            )
        }?;
        Ok(())
    }

    fn map(&mut self, iova: u64, length: u64, gpa: u64) -> Result<(), BackendError> {
        let user_va = self
            .gpa_to_hva
            .hva(gpa, length)
            .ok_or(refused("IOMMU_IOAS_MAP", libc::EFAULT))?;
        let mut arg = ioas_map_arg(self.ioas_id, iova, length, user_va);
        // SAFETY: IOMMU_IOAS_MAP takes a `struct iommu_ioas_map` of `size` bytes; the kernel
        // pins `[user_va, user_va + length)` of this process (failing with EFAULT where it is
        // not mapped) and writes only `iova` back in `arg`, which lives across the call.
        unsafe {
            ioctl(
                self.fd.as_fd(),
                IOMMU_IOAS_MAP,
                &mut arg as *mut _ as _,
                "IOMMU_IOAS_MAP",
            )
        }?;
        Ok(())
    }

    fn unmap(&mut self, iova: u64, length: u64) -> Result<u64, BackendError> {
        let mut arg = ioas_unmap_arg(self.ioas_id, iova, length);
        // SAFETY: IOMMU_IOAS_UNMAP takes a `struct iommu_ioas_unmap` of `size` bytes; the
        // kernel writes the unmapped length back in `arg`, which lives across the call.
        unsafe {
            ioctl(
                self.fd.as_fd(),
                IOMMU_IOAS_UNMAP,
                &mut arg as *mut _ as _,
                "IOMMU_IOAS_UNMAP",
            )
        }?;
        Ok(arg.length)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn layouts_of_the_structs_defined_here() {
        // iommu_destroy {u32 size, id}; iommu_ioas_alloc {u32 size, flags, out_ioas_id}
        assert_eq!(size_of::<IommuDestroy>(), 8);
        assert_eq!(size_of::<IommuIoasAlloc>(), 12);
        assert_eq!(offset_of!(IommuIoasAlloc, out_ioas_id), 8);
        // iommu_ioas_map {u32 size, flags, ioas_id, __reserved; u64 user_va, length, iova}
        assert_eq!(size_of::<IommuIoasMap>(), 40);
        assert_eq!(offset_of!(IommuIoasMap, user_va), 16);
        assert_eq!(offset_of!(IommuIoasMap, length), 24);
        assert_eq!(offset_of!(IommuIoasMap, iova), 32);
        assert_eq!(
            (
                IOMMU_IOAS_MAP_FIXED_IOVA,
                IOMMU_IOAS_MAP_WRITEABLE,
                IOMMU_IOAS_MAP_READABLE
            ),
            (1, 2, 4)
        );
        // The VFIO cdev structs up to their minimum sizes (offsetofend of the last field
        // every kernel reads).
        assert_eq!(size_of::<VfioDeviceBindIommufd>(), 16);
        assert_eq!(offset_of!(VfioDeviceBindIommufd, iommufd), 8);
        assert_eq!(offset_of!(VfioDeviceBindIommufd, out_devid), 12);
        assert_eq!(size_of::<VfioDeviceAttachIommufdPt>(), 12);
        assert_eq!(offset_of!(VfioDeviceAttachIommufdPt, pt_id), 8);
        assert_eq!(size_of::<VfioDeviceDetachIommufdPt>(), 8);
    }

    #[test]
    fn ioas_args() {
        let a = ioas_alloc_arg();
        assert_eq!((a.size, a.flags, a.out_ioas_id), (12, 0, 0));
        let d = destroy_arg(9);
        assert_eq!((d.size, d.id), (8, 9));
        let m = ioas_map_arg(3, 0x10_0000, 0x20_0000, 0x7f00_0000_0000);
        assert_eq!(m.size, 40);
        assert_eq!(m.flags, 0b111, "fixed iova, writeable, readable");
        assert_eq!(m.ioas_id, 3);
        assert_eq!(m.reserved, 0);
        assert_eq!(m.user_va, 0x7f00_0000_0000);
        assert_eq!(m.length, 0x20_0000);
        assert_eq!(m.iova, 0x10_0000);
        let u = ioas_unmap_arg(3, 0x10_0000, 0x1000);
        assert_eq!(
            (u.size, u.ioas_id, u.iova, u.length),
            (24, 3, 0x10_0000, 0x1000)
        );
    }

    #[test]
    fn hw_info_asks_for_capabilities_only() {
        let h = hw_info_arg(5);
        assert_eq!(h.size, 40);
        assert_eq!(h.flags, 0);
        assert_eq!(h.dev_id, 5);
        assert_eq!((h.data_len, h.data_uptr, h.data_type), (0, 0, 0));
        assert_eq!(h.out_capabilities, 0);
    }

    #[test]
    fn hwpt_alloc_asks_for_dirty_tracking_only_when_told() {
        let d = hwpt_alloc_arg(5, 2, true);
        assert_eq!(d.size, 48);
        assert_eq!(d.flags, IOMMU_HWPT_ALLOC_DIRTY_TRACKING);
        assert_eq!(d.dev_id, 5);
        assert_eq!(d.pt_id, 2);
        assert_eq!(d.out_hwpt_id, 0);
        assert_eq!(
            (d.reserved, d.data_type, d.data_len, d.data_uptr),
            (0, 0, 0, 0)
        );
        assert_eq!((d.fault_id, d.reserved2), (0, 0));
        let n = hwpt_alloc_arg(5, 2, false);
        assert_eq!(n.flags, 0);
        assert_eq!(n, IommuHwptAlloc { flags: 0, ..d });
    }

    #[test]
    fn set_dirty_tracking_args() {
        let on = set_dirty_tracking_arg(7, true);
        assert_eq!((on.size, on.flags, on.hwpt_id, on.reserved), (16, 1, 7, 0));
        let off = set_dirty_tracking_arg(7, false);
        assert_eq!(
            (off.size, off.flags, off.hwpt_id, off.reserved),
            (16, 0, 7, 0)
        );
    }

    #[test]
    fn get_dirty_bitmap_describes_the_prepared_range_and_leaves_it_alone() {
        let mut b = DirtyBitmap::default();
        b.prepare(0x4000_0000, 130 * 0x1000, 0x1000).unwrap();
        b.set(0x4000_0000 + 0x1000);
        let g = get_dirty_bitmap_arg(7, &mut b, false);
        assert_eq!(g.size, 48);
        assert_eq!(g.hwpt_id, 7);
        assert_eq!(g.flags, 0);
        assert_eq!(g.reserved, 0);
        assert_eq!(g.iova, 0x4000_0000);
        assert_eq!(g.length, 130 * 0x1000);
        assert_eq!(g.page_size, 0x1000);
        assert_eq!(g.data, b.words_mut().as_mut_ptr() as u64);
        // The caller zeroes; building the argument does not.
        assert_eq!(b.runs(), vec![(0x4000_1000, 0x1000)]);
        let nc = get_dirty_bitmap_arg(7, &mut b, true);
        assert_eq!(nc.flags, IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR);
        assert_eq!(nc, IommuHwptGetDirtyBitmap { flags: 1, ..g });
    }

    #[test]
    fn cdev_args() {
        let f = std::fs::File::open("/dev/null").unwrap();
        let b = bind_arg(f.as_fd());
        assert_eq!(b.argsz, 16);
        assert_eq!(b.flags, 0);
        assert_eq!(b.iommufd, f.as_raw_fd());
        assert_eq!(b.out_devid, 0);
        let a = attach_arg(11);
        assert_eq!((a.argsz, a.flags, a.pt_id), (12, 0, 11));
        let d = detach_arg();
        assert_eq!((d.argsz, d.flags), (8, 0));
    }

    /// The ioctl path end to end on an fd that is not an iommufd: its errno comes back.
    #[test]
    fn an_fd_that_is_not_an_iommufd() {
        let f = std::fs::File::open("/dev/null").unwrap();
        let e = IommufdBackend::new(f.into(), |_: u64, _: u64| None).err();
        assert_eq!(
            e,
            Some(BackendError {
                op: "IOMMU_IOAS_ALLOC",
                errno: libc::ENOTTY
            })
        );
    }

    #[test]
    fn gpa_to_hva_closure() {
        let base = 0x7f00_0000_0000u64;
        let ram = 0x4000_0000u64;
        let f = move |gpa: u64, len: u64| (gpa.checked_add(len)? <= ram).then_some(base + gpa);
        assert_eq!(f.hva(0x1000, 0x1000), Some(base + 0x1000));
        assert_eq!(f.hva(ram - 0x1000, 0x2000), None);
    }
}
