// Copyright 2026 Ferry authors
// SPDX-License-Identifier: Apache-2.0

//! Kernel UAPI of DMA dirty tracking, written from the facts in
//! `shared/reference/dma-dirty-tracking-uapi.md` (`include/uapi/linux/iommufd.h` and
//! `include/uapi/linux/vfio.h`). Neither `iommufd-bindings` nor `vfio-bindings` is in
//! Ferry's Cargo.lock or available offline, so the definitions are ours; the tests below
//! check every number and layout against the reference's values.

/// `_IO(type, nr)`: direction and size are zero, so the number is `type << 8 | nr`
/// (`_IOC(dir, type, nr, size) = dir << 30 | size << 16 | type << 8 | nr`).
pub const fn io(ty: u8, nr: u8) -> u64 {
    ((ty as u64) << 8) | nr as u64
}

// ---- iommufd (`include/uapi/linux/iommufd.h`) ----

/// `IOMMUFD_TYPE`: every iommufd ioctl is `_IO(';', nr)`; sizes travel in the structs.
pub const IOMMUFD_TYPE: u8 = b';';
/// `IOMMUFD_CMD_BASE`.
pub const IOMMUFD_CMD_BASE: u8 = 0x80;

pub const IOMMUFD_CMD_DESTROY: u8 = 0x80;
pub const IOMMUFD_CMD_IOAS_ALLOC: u8 = 0x81;
pub const IOMMUFD_CMD_IOAS_MAP: u8 = 0x85;
pub const IOMMUFD_CMD_IOAS_UNMAP: u8 = 0x86;
pub const IOMMUFD_CMD_HWPT_ALLOC: u8 = 0x89;
pub const IOMMUFD_CMD_GET_HW_INFO: u8 = 0x8a;
pub const IOMMUFD_CMD_HWPT_SET_DIRTY_TRACKING: u8 = 0x8b;
pub const IOMMUFD_CMD_HWPT_GET_DIRTY_BITMAP: u8 = 0x8c;

pub const IOMMU_DESTROY: u64 = io(IOMMUFD_TYPE, IOMMUFD_CMD_DESTROY);
pub const IOMMU_IOAS_ALLOC: u64 = io(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_ALLOC);
pub const IOMMU_IOAS_MAP: u64 = io(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_MAP);
pub const IOMMU_IOAS_UNMAP: u64 = io(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_UNMAP);
pub const IOMMU_HWPT_ALLOC: u64 = io(IOMMUFD_TYPE, IOMMUFD_CMD_HWPT_ALLOC);
pub const IOMMU_GET_HW_INFO: u64 = io(IOMMUFD_TYPE, IOMMUFD_CMD_GET_HW_INFO);
pub const IOMMU_HWPT_SET_DIRTY_TRACKING: u64 =
    io(IOMMUFD_TYPE, IOMMUFD_CMD_HWPT_SET_DIRTY_TRACKING);
pub const IOMMU_HWPT_GET_DIRTY_BITMAP: u64 = io(IOMMUFD_TYPE, IOMMUFD_CMD_HWPT_GET_DIRTY_BITMAP);

/// `iommu_hw_info.out_capabilities`: the device's IOMMU can track dirty IOPTEs.
pub const IOMMU_HW_CAP_DIRTY_TRACKING: u64 = 1 << 0;
pub const IOMMU_HW_CAP_PCI_PASID_EXEC: u64 = 1 << 1;
pub const IOMMU_HW_CAP_PCI_PASID_PRIV: u64 = 1 << 2;
/// `iommu_hw_info.flags`.
pub const IOMMU_HW_INFO_FLAG_INPUT_TYPE: u32 = 1 << 0;

/// `iommu_hwpt_alloc.flags`.
pub const IOMMU_HWPT_ALLOC_NEST_PARENT: u32 = 1 << 0;
/// Asks for a dirty-tracking HWPT: -EOPNOTSUPP when the device cannot track, and a device
/// that cannot track is refused (-EINVAL) when attached to such an HWPT.
pub const IOMMU_HWPT_ALLOC_DIRTY_TRACKING: u32 = 1 << 1;
pub const IOMMU_HWPT_FAULT_ID_VALID: u32 = 1 << 2;
pub const IOMMU_HWPT_ALLOC_PASID: u32 = 1 << 3;

/// `iommu_hwpt_set_dirty_tracking.flags`.
pub const IOMMU_HWPT_DIRTY_TRACKING_ENABLE: u32 = 1;
/// `iommu_hwpt_get_dirty_bitmap.flags`: read without clearing (before an unmap).
pub const IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR: u32 = 1;

/// `struct iommu_hw_info` (IOMMU_GET_HW_INFO).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IommuHwInfo {
    pub size: u32,
    pub flags: u32,
    pub dev_id: u32,
    pub data_len: u32,
    pub data_uptr: u64,
    /// `in_data_type` / `out_data_type` (a union of two u32).
    pub data_type: u32,
    pub out_max_pasid_log2: u8,
    pub reserved: [u8; 3],
    pub out_capabilities: u64,
}

/// `struct iommu_hwpt_alloc` (IOMMU_HWPT_ALLOC).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IommuHwptAlloc {
    pub size: u32,
    pub flags: u32,
    pub dev_id: u32,
    pub pt_id: u32,
    pub out_hwpt_id: u32,
    pub reserved: u32,
    pub data_type: u32,
    pub data_len: u32,
    pub data_uptr: u64,
    pub fault_id: u32,
    pub reserved2: u32,
}

/// `struct iommu_hwpt_set_dirty_tracking` (IOMMU_HWPT_SET_DIRTY_TRACKING), 16 bytes.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IommuHwptSetDirtyTracking {
    pub size: u32,
    pub flags: u32,
    pub hwpt_id: u32,
    pub reserved: u32,
}

/// `struct iommu_hwpt_get_dirty_bitmap` (IOMMU_HWPT_GET_DIRTY_BITMAP), 48 bytes. `data`
/// points at a `u64[]` the kernel only sets bits in: bit `(a - iova) / page_size` for IOVA `a`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IommuHwptGetDirtyBitmap {
    pub size: u32,
    pub hwpt_id: u32,
    pub flags: u32,
    pub reserved: u32,
    pub iova: u64,
    pub length: u64,
    pub page_size: u64,
    pub data: u64,
}

/// `struct iommu_ioas_unmap` (IOMMU_IOAS_UNMAP): `length` comes back as what was unmapped.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IommuIoasUnmap {
    pub size: u32,
    pub ioas_id: u32,
    pub iova: u64,
    pub length: u64,
}

// ---- VFIO (`include/uapi/linux/vfio.h`) ----

pub const VFIO_TYPE: u8 = b';';
pub const VFIO_BASE: u8 = 100;

pub const VFIO_IOMMU_GET_INFO: u64 = io(VFIO_TYPE, VFIO_BASE + 12);
pub const VFIO_IOMMU_UNMAP_DMA: u64 = io(VFIO_TYPE, VFIO_BASE + 14);
/// On the type1 container fd. The same number as [`VFIO_DEVICE_FEATURE`], on another fd.
pub const VFIO_IOMMU_DIRTY_PAGES: u64 = io(VFIO_TYPE, VFIO_BASE + 17);
/// On the device fd.
pub const VFIO_DEVICE_FEATURE: u64 = io(VFIO_TYPE, VFIO_BASE + 17);
pub const VFIO_DEVICE_BIND_IOMMUFD: u64 = io(VFIO_TYPE, VFIO_BASE + 18);
pub const VFIO_DEVICE_ATTACH_IOMMUFD_PT: u64 = io(VFIO_TYPE, VFIO_BASE + 19);
pub const VFIO_DEVICE_DETACH_IOMMUFD_PT: u64 = io(VFIO_TYPE, VFIO_BASE + 20);
/// On the migration data fd.
pub const VFIO_MIG_GET_PRECOPY_INFO: u64 = io(VFIO_TYPE, VFIO_BASE + 21);

/// `vfio_iommu_type1_dirty_bitmap.flags` (exactly one per call).
pub const VFIO_IOMMU_DIRTY_PAGES_FLAG_START: u32 = 1 << 0;
pub const VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP: u32 = 1 << 1;
pub const VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP: u32 = 1 << 2;
/// `vfio_iommu_type1_dma_unmap.flags`.
pub const VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP: u32 = 1 << 0;
pub const VFIO_DMA_UNMAP_FLAG_ALL: u32 = 1 << 1;
pub const VFIO_DMA_UNMAP_FLAG_VADDR: u32 = 1 << 2;
/// Capability id in VFIO_IOMMU_GET_INFO: `{hdr; u32 flags; u64 pgsize_bitmap; u64 max_dirty_bitmap_size}`.
pub const VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION: u16 = 2;

/// `struct vfio_bitmap`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VfioBitmap {
    pub pgsize: u64,
    /// In bytes.
    pub size: u64,
    pub data: u64,
}

/// `struct vfio_iommu_type1_dirty_bitmap` header; `data[]` follows.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VfioIommuType1DirtyBitmap {
    pub argsz: u32,
    pub flags: u32,
}

/// `struct vfio_iommu_type1_dirty_bitmap_get`, the `data[]` of a GET_BITMAP call.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VfioIommuType1DirtyBitmapGet {
    pub iova: u64,
    pub size: u64,
    pub bitmap: VfioBitmap,
}

/// `struct vfio_iommu_type1_dma_unmap` header; a [`VfioBitmap`] follows with GET_DIRTY_BITMAP.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VfioIommuType1DmaUnmap {
    pub argsz: u32,
    pub flags: u32,
    pub iova: u64,
    pub size: u64,
}

/// `struct vfio_device_feature` header; the feature's payload follows.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VfioDeviceFeature {
    pub argsz: u32,
    pub flags: u32,
}

pub const VFIO_DEVICE_FEATURE_MASK: u32 = 0xffff;
pub const VFIO_DEVICE_FEATURE_GET: u32 = 1 << 16;
pub const VFIO_DEVICE_FEATURE_SET: u32 = 1 << 17;
pub const VFIO_DEVICE_FEATURE_PROBE: u32 = 1 << 18;

pub const VFIO_DEVICE_FEATURE_MIGRATION: u32 = 1;
pub const VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE: u32 = 2;
pub const VFIO_DEVICE_FEATURE_DMA_LOGGING_START: u32 = 6;
pub const VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP: u32 = 7;
pub const VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT: u32 = 8;
pub const VFIO_DEVICE_FEATURE_MIG_DATA_SIZE: u32 = 9;

/// `struct vfio_device_feature_dma_logging_control` (START).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VfioDeviceFeatureDmaLoggingControl {
    pub page_size: u64,
    pub num_ranges: u32,
    pub reserved: u32,
    pub ranges: u64,
}

/// `struct vfio_device_feature_dma_logging_range`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VfioDeviceFeatureDmaLoggingRange {
    pub iova: u64,
    pub length: u64,
}

/// `struct vfio_device_feature_dma_logging_report` (REPORT): reads and clears the log, only
/// sets bits; any error means the log is corrupt (treat everything as dirty).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VfioDeviceFeatureDmaLoggingReport {
    pub iova: u64,
    pub length: u64,
    pub page_size: u64,
    pub bitmap: u64,
}

/// `struct vfio_device_feature_migration`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VfioDeviceFeatureMigration {
    pub flags: u64,
}
pub const VFIO_MIGRATION_STOP_COPY: u64 = 1 << 0;
pub const VFIO_MIGRATION_P2P: u64 = 1 << 1;
pub const VFIO_MIGRATION_PRE_COPY: u64 = 1 << 2;

/// `struct vfio_device_feature_mig_state`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VfioDeviceFeatureMigState {
    pub device_state: u32,
    pub data_fd: i32,
}
pub const VFIO_DEVICE_STATE_ERROR: u32 = 0;
pub const VFIO_DEVICE_STATE_STOP: u32 = 1;
pub const VFIO_DEVICE_STATE_RUNNING: u32 = 2;
pub const VFIO_DEVICE_STATE_STOP_COPY: u32 = 3;
pub const VFIO_DEVICE_STATE_RESUMING: u32 = 4;
pub const VFIO_DEVICE_STATE_RUNNING_P2P: u32 = 5;
pub const VFIO_DEVICE_STATE_PRE_COPY: u32 = 6;
pub const VFIO_DEVICE_STATE_PRE_COPY_P2P: u32 = 7;

/// `struct vfio_precopy_info` (VFIO_MIG_GET_PRECOPY_INFO).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VfioPrecopyInfo {
    pub argsz: u32,
    pub flags: u32,
    pub initial_bytes: u64,
    pub dirty_bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    // Values from shared/reference/dma-dirty-tracking-uapi.md §1-3 and
    // virtio-iommu-and-dma-dirty.md §E, written out as literals on purpose.
    #[test]
    fn iommufd_ioctl_numbers() {
        assert_eq!(IOMMUFD_TYPE, 0x3b);
        assert_eq!(IOMMUFD_CMD_BASE, IOMMUFD_CMD_DESTROY);
        assert_eq!(IOMMU_DESTROY, 0x3b80);
        assert_eq!(IOMMU_IOAS_ALLOC, 0x3b81);
        assert_eq!(IOMMU_IOAS_MAP, 0x3b85);
        assert_eq!(IOMMU_IOAS_UNMAP, 0x3b86);
        assert_eq!(IOMMU_HWPT_ALLOC, 0x3b89);
        assert_eq!(IOMMU_GET_HW_INFO, 0x3b8a);
        assert_eq!(IOMMU_HWPT_SET_DIRTY_TRACKING, 0x3B8B);
        assert_eq!(IOMMU_HWPT_GET_DIRTY_BITMAP, 0x3B8C);
        // IOMMU_TEST_CMD = _IO(';', 0x80 + 32) = 0x3BA0 (selftest mock).
        assert_eq!(io(IOMMUFD_TYPE, IOMMUFD_CMD_BASE + 32), 0x3ba0);
    }

    #[test]
    fn iommufd_flags() {
        assert_eq!(IOMMU_HW_CAP_DIRTY_TRACKING, 1);
        assert_eq!(IOMMU_HWPT_ALLOC_NEST_PARENT, 1);
        assert_eq!(IOMMU_HWPT_ALLOC_DIRTY_TRACKING, 2);
        assert_eq!(IOMMU_HWPT_FAULT_ID_VALID, 4);
        assert_eq!(IOMMU_HWPT_ALLOC_PASID, 8);
        assert_eq!(IOMMU_HWPT_DIRTY_TRACKING_ENABLE, 1);
        assert_eq!(IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR, 1);
    }

    #[test]
    fn iommufd_layouts() {
        assert_eq!(size_of::<IommuHwptSetDirtyTracking>(), 16);
        assert_eq!(offset_of!(IommuHwptSetDirtyTracking, hwpt_id), 8);
        assert_eq!(size_of::<IommuHwptGetDirtyBitmap>(), 48);
        assert_eq!(offset_of!(IommuHwptGetDirtyBitmap, hwpt_id), 4);
        assert_eq!(offset_of!(IommuHwptGetDirtyBitmap, flags), 8);
        assert_eq!(offset_of!(IommuHwptGetDirtyBitmap, iova), 16);
        assert_eq!(offset_of!(IommuHwptGetDirtyBitmap, length), 24);
        assert_eq!(offset_of!(IommuHwptGetDirtyBitmap, page_size), 32);
        assert_eq!(offset_of!(IommuHwptGetDirtyBitmap, data), 40);
        // {u32 size, flags, dev_id, data_len; u64 data_uptr; u32 type; u8; u8[3]; u64 caps}
        assert_eq!(size_of::<IommuHwInfo>(), 40);
        assert_eq!(offset_of!(IommuHwInfo, data_uptr), 16);
        assert_eq!(offset_of!(IommuHwInfo, data_type), 24);
        assert_eq!(offset_of!(IommuHwInfo, out_max_pasid_log2), 28);
        assert_eq!(offset_of!(IommuHwInfo, out_capabilities), 32);
        // {u32 size, flags, dev_id, pt_id, out_hwpt_id, rsvd, data_type, data_len; u64; u32, u32}
        assert_eq!(size_of::<IommuHwptAlloc>(), 48);
        assert_eq!(offset_of!(IommuHwptAlloc, out_hwpt_id), 16);
        assert_eq!(offset_of!(IommuHwptAlloc, data_uptr), 32);
        assert_eq!(offset_of!(IommuHwptAlloc, fault_id), 40);
        assert_eq!(size_of::<IommuIoasUnmap>(), 24);
        assert_eq!(offset_of!(IommuIoasUnmap, length), 16);
    }

    #[test]
    fn vfio_ioctl_numbers() {
        assert_eq!(VFIO_IOMMU_GET_INFO, 0x3b70);
        assert_eq!(VFIO_IOMMU_UNMAP_DMA, 0x3b72);
        assert_eq!(VFIO_IOMMU_DIRTY_PAGES, 0x3b75);
        assert_eq!(VFIO_DEVICE_FEATURE, 0x3b75);
        assert_eq!(VFIO_DEVICE_BIND_IOMMUFD, io(b';', 118));
        assert_eq!(VFIO_DEVICE_ATTACH_IOMMUFD_PT, io(b';', 119));
        assert_eq!(VFIO_DEVICE_DETACH_IOMMUFD_PT, io(b';', 120));
        assert_eq!(VFIO_MIG_GET_PRECOPY_INFO, io(b';', 121));
    }

    #[test]
    fn vfio_flags_and_features() {
        assert_eq!(VFIO_IOMMU_DIRTY_PAGES_FLAG_START, 1);
        assert_eq!(VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP, 2);
        assert_eq!(VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP, 4);
        assert_eq!(VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP, 1);
        assert_eq!(VFIO_DMA_UNMAP_FLAG_ALL, 2);
        assert_eq!(VFIO_DMA_UNMAP_FLAG_VADDR, 4);
        assert_eq!(VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION, 2);
        assert_eq!(VFIO_DEVICE_FEATURE_MASK, 0xffff);
        assert_eq!(VFIO_DEVICE_FEATURE_GET, 0x1_0000);
        assert_eq!(VFIO_DEVICE_FEATURE_SET, 0x2_0000);
        assert_eq!(VFIO_DEVICE_FEATURE_PROBE, 0x4_0000);
        assert_eq!(VFIO_DEVICE_FEATURE_MIGRATION, 1);
        assert_eq!(VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, 2);
        assert_eq!(VFIO_DEVICE_FEATURE_DMA_LOGGING_START, 6);
        assert_eq!(VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP, 7);
        assert_eq!(VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT, 8);
        assert_eq!(VFIO_DEVICE_FEATURE_MIG_DATA_SIZE, 9);
        assert_eq!(
            (
                VFIO_MIGRATION_STOP_COPY,
                VFIO_MIGRATION_P2P,
                VFIO_MIGRATION_PRE_COPY
            ),
            (1, 2, 4)
        );
        assert_eq!(
            [
                VFIO_DEVICE_STATE_ERROR,
                VFIO_DEVICE_STATE_STOP,
                VFIO_DEVICE_STATE_RUNNING,
                VFIO_DEVICE_STATE_STOP_COPY,
                VFIO_DEVICE_STATE_RESUMING,
                VFIO_DEVICE_STATE_RUNNING_P2P,
                VFIO_DEVICE_STATE_PRE_COPY,
                VFIO_DEVICE_STATE_PRE_COPY_P2P
            ],
            [0, 1, 2, 3, 4, 5, 6, 7]
        );
    }

    #[test]
    fn vfio_layouts() {
        assert_eq!(size_of::<VfioBitmap>(), 24);
        assert_eq!(size_of::<VfioIommuType1DirtyBitmap>(), 8);
        assert_eq!(size_of::<VfioIommuType1DirtyBitmapGet>(), 40);
        assert_eq!(offset_of!(VfioIommuType1DirtyBitmapGet, bitmap), 16);
        assert_eq!(size_of::<VfioIommuType1DmaUnmap>(), 24);
        assert_eq!(offset_of!(VfioIommuType1DmaUnmap, iova), 8);
        assert_eq!(size_of::<VfioDeviceFeature>(), 8);
        assert_eq!(size_of::<VfioDeviceFeatureDmaLoggingControl>(), 24);
        assert_eq!(offset_of!(VfioDeviceFeatureDmaLoggingControl, ranges), 16);
        assert_eq!(size_of::<VfioDeviceFeatureDmaLoggingRange>(), 16);
        assert_eq!(size_of::<VfioDeviceFeatureDmaLoggingReport>(), 32);
        assert_eq!(offset_of!(VfioDeviceFeatureDmaLoggingReport, bitmap), 24);
        assert_eq!(size_of::<VfioDeviceFeatureMigration>(), 8);
        assert_eq!(size_of::<VfioDeviceFeatureMigState>(), 8);
        assert_eq!(size_of::<VfioPrecopyInfo>(), 24);
    }
}
