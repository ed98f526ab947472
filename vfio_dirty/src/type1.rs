// Copyright 2026 Ferry authors
// SPDX-License-Identifier: Apache-2.0

//! [`Type1Backend`]: the [`DirtyBackend`] over a legacy VFIO container (`/dev/vfio/vfio`
//! with groups, the type1v2 IOMMU), using `VFIO_IOMMU_DIRTY_PAGES`.
//!
//! Type1 has one IOMMU context per container, so the backend has exactly one domain,
//! [`TYPE1_DOMAIN`]: "allocating" it is free, attaching a device adds its group to the
//! container. Its dirty capability is the container's `VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION`
//! (absent on iommufd's VFIO compat layer, which has no `VFIO_IOMMU_DIRTY_PAGES`); a START
//! that fails anyway is the policy's "tracking could not be enabled", i.e. rule 4. Type1
//! reads no hardware dirty bits: while any group has not declared pinned-page scope (every
//! real passthrough device), the kernel reports every mapped page dirty.
//!
//! There is no no-clear read in type1: [`DirtyBackend::read_dirty`] ignores `no_clear` (the
//! bits it returns are the caller's to keep). An unmap while tracking uses
//! `VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP`, so what was dirtied between that read and the
//! unmap is not lost: those IOVA runs wait in [`Type1Backend::take_unmap_dirty`].

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use crate::bitmap::DirtyBitmap;
use crate::error::{from_io, ioctl, refused};
use crate::iommufd::GpaToHva;
use crate::policy::{BackendError, DeviceId, DirtyBackend, DomainId, Range};
use crate::uapi::*;

/// The container's one domain.
pub const TYPE1_DOMAIN: DomainId = 1;
/// The tracking granule when the container does not say (no migration capability).
pub const DEFAULT_PAGE_SIZE: u64 = 4096;

// ---- UAPI the crate's `uapi` module does not carry (vfio.h) ----

pub const VFIO_GET_API_VERSION: u64 = io(VFIO_TYPE, VFIO_BASE);
pub const VFIO_CHECK_EXTENSION: u64 = io(VFIO_TYPE, VFIO_BASE + 1);
pub const VFIO_SET_IOMMU: u64 = io(VFIO_TYPE, VFIO_BASE + 2);
pub const VFIO_GROUP_GET_STATUS: u64 = io(VFIO_TYPE, VFIO_BASE + 3);
pub const VFIO_GROUP_SET_CONTAINER: u64 = io(VFIO_TYPE, VFIO_BASE + 4);
pub const VFIO_GROUP_UNSET_CONTAINER: u64 = io(VFIO_TYPE, VFIO_BASE + 5);
pub const VFIO_IOMMU_MAP_DMA: u64 = io(VFIO_TYPE, VFIO_BASE + 13);

pub const VFIO_API_VERSION: i32 = 0;
pub const VFIO_TYPE1V2_IOMMU: i32 = 3;
pub const VFIO_GROUP_FLAGS_VIABLE: u32 = 1 << 0;
pub const VFIO_DMA_MAP_FLAG_READ: u32 = 1 << 0;
pub const VFIO_DMA_MAP_FLAG_WRITE: u32 = 1 << 1;
pub const VFIO_IOMMU_INFO_PGSIZES: u32 = 1 << 0;
pub const VFIO_IOMMU_INFO_CAPS: u32 = 1 << 1;

/// `struct vfio_group_status`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VfioGroupStatus {
    pub argsz: u32,
    pub flags: u32,
}

/// `struct vfio_iommu_type1_dma_map`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VfioIommuType1DmaMap {
    pub argsz: u32,
    pub flags: u32,
    pub vaddr: u64,
    pub iova: u64,
    pub size: u64,
}

/// `struct vfio_iommu_type1_info`; capabilities follow at `cap_offset` when `argsz` allows.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VfioIommuType1Info {
    pub argsz: u32,
    pub flags: u32,
    pub iova_pgsizes: u64,
    pub cap_offset: u32,
    pub pad: u32,
}

/// `VFIO_IOMMU_DIRTY_PAGES` with GET_BITMAP: the header and its `data[]` in one struct (the
/// kernel reads the range right after the 8-byte header).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DirtyPagesGetArg {
    pub hdr: VfioIommuType1DirtyBitmap,
    pub get: VfioIommuType1DirtyBitmapGet,
}

/// `VFIO_IOMMU_UNMAP_DMA` with GET_DIRTY_BITMAP: the header and the `vfio_bitmap` that
/// follows it.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DmaUnmapBitmapArg {
    pub hdr: VfioIommuType1DmaUnmap,
    pub bitmap: VfioBitmap,
}

const fn size32<T>() -> u32 {
    std::mem::size_of::<T>() as u32
}

// ---- argument building ----

/// START or STOP (exactly one flag per call; the kernel refuses more).
pub fn dirty_pages_arg(start: bool) -> VfioIommuType1DirtyBitmap {
    VfioIommuType1DirtyBitmap {
        argsz: size32::<VfioIommuType1DirtyBitmap>(),
        flags: if start {
            VFIO_IOMMU_DIRTY_PAGES_FLAG_START
        } else {
            VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP
        },
    }
}

/// GET_BITMAP of `bitmap`'s range at its page size into its buffer (left as the caller
/// zeroed it).
pub fn dirty_pages_get_arg(bitmap: &mut DirtyBitmap) -> DirtyPagesGetArg {
    DirtyPagesGetArg {
        hdr: VfioIommuType1DirtyBitmap {
            argsz: size32::<DirtyPagesGetArg>(),
            flags: VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP,
        },
        get: VfioIommuType1DirtyBitmapGet {
            iova: bitmap.iova(),
            size: bitmap.length(),
            bitmap: VfioBitmap {
                pgsize: bitmap.page_size(),
                size: DirtyBitmap::bytes_for(bitmap.length(), bitmap.page_size()),
                data: bitmap.words_mut().as_mut_ptr() as u64,
            },
        },
    }
}

pub fn dma_map_arg(iova: u64, size: u64, vaddr: u64) -> VfioIommuType1DmaMap {
    VfioIommuType1DmaMap {
        argsz: size32::<VfioIommuType1DmaMap>(),
        flags: VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
        vaddr,
        iova,
        size,
    }
}

pub fn dma_unmap_arg(iova: u64, size: u64) -> VfioIommuType1DmaUnmap {
    VfioIommuType1DmaUnmap {
        argsz: size32::<VfioIommuType1DmaUnmap>(),
        flags: 0,
        iova,
        size,
    }
}

/// An unmap of `bitmap`'s range that also returns its dirty bits into the bitmap.
pub fn dma_unmap_bitmap_arg(bitmap: &mut DirtyBitmap) -> DmaUnmapBitmapArg {
    DmaUnmapBitmapArg {
        hdr: VfioIommuType1DmaUnmap {
            argsz: size32::<DmaUnmapBitmapArg>(),
            flags: VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP,
            iova: bitmap.iova(),
            size: bitmap.length(),
        },
        bitmap: VfioBitmap {
            pgsize: bitmap.page_size(),
            size: DirtyBitmap::bytes_for(bitmap.length(), bitmap.page_size()),
            data: bitmap.words_mut().as_mut_ptr() as u64,
        },
    }
}

/// `VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION`'s content.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MigrationCap {
    pub flags: u32,
    /// The smallest IOMMU page size only (the kernel reports just that one).
    pub pgsize_bitmap: u64,
    /// The largest bitmap, in bytes, one GET_BITMAP or unmap may return.
    pub max_dirty_bitmap_size: u64,
}

impl MigrationCap {
    /// The tracking granule: the smallest page size in `pgsize_bitmap`.
    pub fn page_size(&self) -> Option<u64> {
        (self.pgsize_bitmap != 0).then(|| 1 << self.pgsize_bitmap.trailing_zeros())
    }
}

/// What `VFIO_IOMMU_GET_INFO` said.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Type1Info {
    pub iova_pgsizes: Option<u64>,
    pub migration: Option<MigrationCap>,
}

fn u16_at(buf: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(buf.get(off..off + 2)?.try_into().ok()?))
}
fn u32_at(buf: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(buf.get(off..off + 4)?.try_into().ok()?))
}
fn u64_at(buf: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(buf.get(off..off + 8)?.try_into().ok()?))
}

/// Parse a `VFIO_IOMMU_GET_INFO` answer: the fixed part, then the capability chain
/// (`{u16 id, u16 version, u32 next}` headers, offsets from the buffer's start, 0 ends it).
/// A chain that points outside the buffer or backwards ends the walk.
pub fn parse_info(buf: &[u8]) -> Type1Info {
    let mut out = Type1Info::default();
    let Some(flags) = u32_at(buf, 4) else {
        return out;
    };
    if flags & VFIO_IOMMU_INFO_PGSIZES != 0 {
        out.iova_pgsizes = u64_at(buf, 8);
    }
    if flags & VFIO_IOMMU_INFO_CAPS == 0 {
        return out;
    }
    let mut off = u32_at(buf, 16).unwrap_or(0) as usize;
    let min = std::mem::size_of::<VfioIommuType1Info>();
    while off >= min {
        let (Some(id), Some(next)) = (u16_at(buf, off), u32_at(buf, off + 4)) else {
            break;
        };
        if id == VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION {
            // {hdr (8); u32 flags; u32 pad; u64 pgsize_bitmap; u64 max_dirty_bitmap_size}
            if let (Some(flags), Some(pgsize_bitmap), Some(max_dirty_bitmap_size)) = (
                u32_at(buf, off + 8),
                u64_at(buf, off + 16),
                u64_at(buf, off + 24),
            ) {
                out.migration = Some(MigrationCap {
                    flags,
                    pgsize_bitmap,
                    max_dirty_bitmap_size,
                });
            }
        }
        let next = next as usize;
        if next <= off {
            break;
        }
        off = next;
    }
    out
}

// ---- the backend ----

#[derive(Debug)]
struct Group {
    fd: OwnedFd,
    attached: bool,
}

/// The [`DirtyBackend`] over a type1v2 VFIO container. Devices are VFIO groups
/// (`/dev/vfio/N`), added with [`Type1Backend::add_group`]; attaching one puts it in the
/// container (the first one also sets the IOMMU type).
pub struct Type1Backend<T: GpaToHva> {
    // Dropped before the container: closing a group takes it out of the container.
    groups: BTreeMap<DeviceId, Group>,
    container: OwnedFd,
    gpa_to_hva: T,
    iommu_set: bool,
    info: Type1Info,
    tracking: bool,
    unmap_dirty: Vec<Range>,
}

impl<T: GpaToHva> Type1Backend<T> {
    /// Open `/dev/vfio/vfio` and check it speaks the VFIO API with type1v2.
    pub fn open(gpa_to_hva: T) -> Result<Self, BackendError> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/vfio/vfio")
            .map_err(|e| from_io("open /dev/vfio/vfio", &e))?;
        Self::new(f.into(), gpa_to_hva)
    }

    /// Over an open, empty container.
    pub fn new(container: OwnedFd, gpa_to_hva: T) -> Result<Self, BackendError> {
        // SAFETY: VFIO_GET_API_VERSION takes no argument and writes no memory.
        let v = unsafe {
            ioctl(
                container.as_fd(),
                VFIO_GET_API_VERSION,
                0,
                "VFIO_GET_API_VERSION",
            )
        }?;
        if v != VFIO_API_VERSION {
            return Err(refused("VFIO_GET_API_VERSION", libc::EPROTO));
        }
        // SAFETY: VFIO_CHECK_EXTENSION takes an integer (the IOMMU type) and writes no memory.
        let ok = unsafe {
            ioctl(
                container.as_fd(),
                VFIO_CHECK_EXTENSION,
                VFIO_TYPE1V2_IOMMU as _,
                "VFIO_CHECK_EXTENSION",
            )
        }?;
        if ok == 0 {
            return Err(refused("VFIO_CHECK_EXTENSION", libc::EOPNOTSUPP));
        }
        Ok(Type1Backend {
            groups: BTreeMap::new(),
            container,
            gpa_to_hva,
            iommu_set: false,
            info: Type1Info::default(),
            tracking: false,
            unmap_dirty: Vec::new(),
        })
    }

    /// Know the opened group `/dev/vfio/N` as device `id`; it must be viable (all its
    /// devices bound to VFIO drivers). Not in the container until attached.
    pub fn add_group(&mut self, id: DeviceId, group: OwnedFd) -> Result<(), BackendError> {
        if self.groups.contains_key(&id) {
            return Err(refused("VFIO_GROUP_GET_STATUS", libc::EEXIST));
        }
        let mut st = VfioGroupStatus {
            argsz: size32::<VfioGroupStatus>(),
            flags: 0,
        };
        // SAFETY: VFIO_GROUP_GET_STATUS takes a `struct vfio_group_status` of `argsz` bytes
        // and writes `flags` in `st`, which lives across the call.
        unsafe {
            ioctl(
                group.as_fd(),
                VFIO_GROUP_GET_STATUS,
                &mut st as *mut _ as _,
                "VFIO_GROUP_GET_STATUS",
            )
        }?;
        if st.flags & VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(refused("VFIO_GROUP_GET_STATUS", libc::EPERM));
        }
        self.groups.insert(
            id,
            Group {
                fd: group,
                attached: false,
            },
        );
        Ok(())
    }

    /// Forget the group and hand its fd back. Detach it first.
    pub fn remove_group(&mut self, id: DeviceId) -> Option<OwnedFd> {
        self.groups.remove(&id).map(|g| g.fd)
    }

    pub fn container(&self) -> std::os::fd::BorrowedFd<'_> {
        self.container.as_fd()
    }

    /// The tracking granule: the migration capability's smallest page size, or 4096.
    /// Known once a group is attached; a [`crate::DmaTracker`] over this backend must use it.
    pub fn page_size(&self) -> u64 {
        self.info
            .migration
            .and_then(|m| m.page_size())
            .unwrap_or(DEFAULT_PAGE_SIZE)
    }

    pub fn info(&self) -> Type1Info {
        self.info
    }

    /// The IOVA runs an unmap while tracking found dirty (bits set after the last read of
    /// the range), taken. They are IOVAs of mappings that are gone now: translate them with
    /// the translator as it was before the unmap.
    pub fn take_unmap_dirty(&mut self) -> Vec<Range> {
        std::mem::take(&mut self.unmap_dirty)
    }

    /// `VFIO_IOMMU_GET_INFO`, twice when the capabilities do not fit the first buffer.
    pub fn query_info(&mut self) -> Result<Type1Info, BackendError> {
        let hdr_words = std::mem::size_of::<VfioIommuType1Info>() / 8;
        // u64s: 8-aligned for the header, whatever length the kernel asks for.
        let mut words: Vec<u64> = vec![0; hdr_words];
        for _ in 0..2 {
            words.fill(0);
            let argsz = (words.len() * 8) as u32;
            let hdr = VfioIommuType1Info {
                argsz,
                ..Default::default()
            };
            // SAFETY: `words` is 8-aligned and at least size_of::<VfioIommuType1Info>() bytes.
            unsafe { std::ptr::write(words.as_mut_ptr().cast::<VfioIommuType1Info>(), hdr) };
            // SAFETY: VFIO_IOMMU_GET_INFO takes a `struct vfio_iommu_type1_info` followed by
            // room for capabilities, `argsz` bytes in all: `words` is exactly that long, and
            // the kernel writes no further than `argsz` (it reports a larger need in `argsz`).
            unsafe {
                ioctl(
                    self.container.as_fd(),
                    VFIO_IOMMU_GET_INFO,
                    words.as_mut_ptr() as _,
                    "VFIO_IOMMU_GET_INFO",
                )
            }?;
            // SAFETY: as above; the header is plain integers, every bit pattern valid.
            let out = unsafe { std::ptr::read(words.as_ptr().cast::<VfioIommuType1Info>()) };
            if out.argsz <= argsz {
                break;
            }
            words.resize((out.argsz as usize).div_ceil(8), 0);
        }
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
        self.info = parse_info(&bytes);
        Ok(self.info)
    }

    fn group_fd(&self, dev: DeviceId, op: &'static str) -> Result<&Group, BackendError> {
        self.groups.get(&dev).ok_or(refused(op, libc::ENOENT))
    }
}

impl<T: GpaToHva> DirtyBackend for Type1Backend<T> {
    /// Before any group is in the container nothing is known: "maybe" (the domain's answer
    /// after attach counts). After: whether the container has the migration capability.
    fn device_dirty_capable(&mut self, _dev: DeviceId) -> Result<bool, BackendError> {
        Ok(!self.iommu_set || self.info.migration.is_some())
    }

    fn alloc_domain(&mut self, _dev: DeviceId, _dirty: bool) -> Result<DomainId, BackendError> {
        Ok(TYPE1_DOMAIN)
    }

    /// The container's IOMMU goes when its last group leaves; nothing to free.
    fn free_domain(&mut self, _domain: DomainId) -> Result<(), BackendError> {
        Ok(())
    }

    fn attach(&mut self, dev: DeviceId, _domain: DomainId) -> Result<(), BackendError> {
        let group = self.group_fd(dev, "VFIO_GROUP_SET_CONTAINER")?.fd.as_fd();
        let container: libc::c_int = self.container.as_raw_fd();
        // SAFETY: VFIO_GROUP_SET_CONTAINER takes a pointer to an int holding the container
        // fd, read only; `container` lives across the call.
        unsafe {
            ioctl(
                group,
                VFIO_GROUP_SET_CONTAINER,
                &container as *const libc::c_int as _,
                "VFIO_GROUP_SET_CONTAINER",
            )
        }?;
        if !self.iommu_set {
            // SAFETY: VFIO_SET_IOMMU takes an integer (the IOMMU type), writes no memory.
            let set = unsafe {
                ioctl(
                    self.container.as_fd(),
                    VFIO_SET_IOMMU,
                    VFIO_TYPE1V2_IOMMU as _,
                    "VFIO_SET_IOMMU",
                )
            };
            if let Err(e) = set {
                // SAFETY: VFIO_GROUP_UNSET_CONTAINER takes no argument.
                let _ = unsafe { ioctl(group, VFIO_GROUP_UNSET_CONTAINER, 0, "unset") };
                return Err(e);
            }
            self.iommu_set = true;
            if self.query_info().is_err() {
                // Without the info the container cannot be said to track: carry on untracked.
                self.info = Type1Info::default();
            }
        }
        if let Some(g) = self.groups.get_mut(&dev) {
            g.attached = true;
        }
        Ok(())
    }

    fn detach(&mut self, dev: DeviceId, _domain: DomainId) -> Result<(), BackendError> {
        let group = self.group_fd(dev, "VFIO_GROUP_UNSET_CONTAINER")?.fd.as_fd();
        // SAFETY: VFIO_GROUP_UNSET_CONTAINER takes no argument and writes no memory.
        unsafe {
            ioctl(
                group,
                VFIO_GROUP_UNSET_CONTAINER,
                0,
                "VFIO_GROUP_UNSET_CONTAINER",
            )
        }?;
        if let Some(g) = self.groups.get_mut(&dev) {
            g.attached = false;
        }
        if !self.groups.values().any(|g| g.attached) {
            // The kernel dropped the IOMMU, its mappings and its tracking with the last group.
            self.iommu_set = false;
            self.tracking = false;
            self.info = Type1Info::default();
        }
        Ok(())
    }

    fn domain_dirty_capable(&mut self, _domain: DomainId) -> Result<bool, BackendError> {
        Ok(self.iommu_set && self.info.migration.is_some())
    }

    fn set_tracking(&mut self, _domain: DomainId, enable: bool) -> Result<(), BackendError> {
        let mut arg = dirty_pages_arg(enable);
        // SAFETY: VFIO_IOMMU_DIRTY_PAGES with START or STOP takes the 8-byte header only,
        // read only; `arg` lives across the call.
        unsafe {
            ioctl(
                self.container.as_fd(),
                VFIO_IOMMU_DIRTY_PAGES,
                &mut arg as *mut _ as _,
                "VFIO_IOMMU_DIRTY_PAGES",
            )
        }?;
        self.tracking = enable;
        Ok(())
    }

    fn read_dirty(
        &mut self,
        _domain: DomainId,
        bitmap: &mut DirtyBitmap,
        _no_clear: bool,
    ) -> Result<(), BackendError> {
        const OP: &str = "VFIO_IOMMU_DIRTY_PAGES";
        if bitmap.length() == 0 || bitmap.page_size() == 0 {
            return Err(refused(OP, libc::EINVAL));
        }
        let mut arg = dirty_pages_get_arg(bitmap);
        // SAFETY: VFIO_IOMMU_DIRTY_PAGES with GET_BITMAP takes the header followed by a
        // `struct vfio_iommu_type1_dirty_bitmap_get`, `argsz` bytes in all, read only. Its
        // `bitmap.data` points at the bitmap's words, `bitmap.size` bytes long, sized by
        // `prepare` for exactly this iova/size/pgsize; the kernel writes no more than
        // `bitmap.size` bytes, and the bitmap is mutably borrowed until the call returns.
        unsafe {
            ioctl(
                self.container.as_fd(),
                VFIO_IOMMU_DIRTY_PAGES,
                &mut arg as *mut _ as _,
                OP,
            )
        }?;
        Ok(())
    }

    fn map(&mut self, iova: u64, length: u64, gpa: u64) -> Result<(), BackendError> {
        let vaddr = self
            .gpa_to_hva
            .hva(gpa, length)
            .ok_or(refused("VFIO_IOMMU_MAP_DMA", libc::EFAULT))?;
        let mut arg = dma_map_arg(iova, length, vaddr);
        // SAFETY: VFIO_IOMMU_MAP_DMA takes a `struct vfio_iommu_type1_dma_map` of `argsz`
        // bytes, read only; the kernel pins `[vaddr, vaddr + size)` of this process (EFAULT
        // where it is not mapped). `arg` lives across the call.
        unsafe {
            ioctl(
                self.container.as_fd(),
                VFIO_IOMMU_MAP_DMA,
                &mut arg as *mut _ as _,
                "VFIO_IOMMU_MAP_DMA",
            )
        }?;
        Ok(())
    }

    fn unmap(&mut self, iova: u64, length: u64) -> Result<u64, BackendError> {
        const OP: &str = "VFIO_IOMMU_UNMAP_DMA";
        let page_size = self.page_size();
        let max = self.info.migration.map_or(0, |m| m.max_dirty_bitmap_size);
        let mut bitmap = DirtyBitmap::default();
        if self.tracking
            && bitmap.prepare(iova, length, page_size).is_ok()
            && DirtyBitmap::bytes_for(length, page_size) <= max
        {
            let mut arg = dma_unmap_bitmap_arg(&mut bitmap);
            // SAFETY: VFIO_IOMMU_UNMAP_DMA with GET_DIRTY_BITMAP takes the unmap header
            // followed by a `struct vfio_bitmap`, `argsz` bytes in all; the kernel writes the
            // unmapped size back in the header and at most `bitmap.size` bytes at
            // `bitmap.data`, the words `prepare` sized for this iova/size/pgsize, owned by
            // `bitmap`, which lives across the call.
            unsafe {
                ioctl(
                    self.container.as_fd(),
                    VFIO_IOMMU_UNMAP_DMA,
                    &mut arg as *mut _ as _,
                    OP,
                )
            }?;
            self.unmap_dirty.extend(
                bitmap
                    .runs()
                    .into_iter()
                    .map(|(start, length)| Range { start, length }),
            );
            return Ok(arg.hdr.size);
        }
        let mut arg = dma_unmap_arg(iova, length);
        // SAFETY: VFIO_IOMMU_UNMAP_DMA takes a `struct vfio_iommu_type1_dma_unmap` of `argsz`
        // bytes; the kernel writes the unmapped size back in `arg`, which lives across the
        // call.
        unsafe {
            ioctl(
                self.container.as_fd(),
                VFIO_IOMMU_UNMAP_DMA,
                &mut arg as *mut _ as _,
                OP,
            )
        }?;
        Ok(arg.size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn numbers_and_layouts_defined_here() {
        assert_eq!(VFIO_GET_API_VERSION, 0x3b64);
        assert_eq!(VFIO_CHECK_EXTENSION, 0x3b65);
        assert_eq!(VFIO_SET_IOMMU, 0x3b66);
        assert_eq!(VFIO_GROUP_GET_STATUS, 0x3b67);
        assert_eq!(VFIO_GROUP_SET_CONTAINER, 0x3b68);
        assert_eq!(VFIO_GROUP_UNSET_CONTAINER, 0x3b69);
        assert_eq!(VFIO_IOMMU_MAP_DMA, 0x3b71);
        assert_eq!(VFIO_TYPE1V2_IOMMU, 3);
        assert_eq!(size_of::<VfioGroupStatus>(), 8);
        assert_eq!(size_of::<VfioIommuType1DmaMap>(), 32);
        assert_eq!(offset_of!(VfioIommuType1DmaMap, vaddr), 8);
        assert_eq!(offset_of!(VfioIommuType1DmaMap, iova), 16);
        assert_eq!(size_of::<VfioIommuType1Info>(), 24);
        assert_eq!(offset_of!(VfioIommuType1Info, cap_offset), 16);
        // The kernel reads the payload right after the fixed header (minsz).
        assert_eq!(size_of::<DirtyPagesGetArg>(), 48);
        assert_eq!(offset_of!(DirtyPagesGetArg, get), 8);
        assert_eq!(size_of::<DmaUnmapBitmapArg>(), 48);
        assert_eq!(offset_of!(DmaUnmapBitmapArg, bitmap), 24);
    }

    #[test]
    fn start_and_stop_carry_exactly_one_flag() {
        assert_eq!(
            dirty_pages_arg(true),
            VfioIommuType1DirtyBitmap { argsz: 8, flags: 1 }
        );
        assert_eq!(
            dirty_pages_arg(false),
            VfioIommuType1DirtyBitmap { argsz: 8, flags: 2 }
        );
    }

    #[test]
    fn get_bitmap_arg() {
        let mut b = DirtyBitmap::default();
        b.prepare(0x10_0000, 65 * 0x1000, 0x1000).unwrap();
        let a = dirty_pages_get_arg(&mut b);
        assert_eq!(a.hdr.argsz, 48);
        assert_eq!(a.hdr.flags, VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP);
        assert_eq!(a.get.iova, 0x10_0000);
        assert_eq!(a.get.size, 65 * 0x1000);
        assert_eq!(a.get.bitmap.pgsize, 0x1000);
        assert_eq!(a.get.bitmap.size, 16, "65 pages: two u64s");
        assert_eq!(a.get.bitmap.data, b.words_mut().as_mut_ptr() as u64);
    }

    #[test]
    fn map_and_unmap_args() {
        let m = dma_map_arg(0x10_0000, 0x20_0000, 0x7f00_0000_0000);
        assert_eq!(m.argsz, 32);
        assert_eq!(m.flags, 3, "read and write");
        assert_eq!(
            (m.vaddr, m.iova, m.size),
            (0x7f00_0000_0000, 0x10_0000, 0x20_0000)
        );
        let u = dma_unmap_arg(0x10_0000, 0x2000);
        assert_eq!(
            (u.argsz, u.flags, u.iova, u.size),
            (24, 0, 0x10_0000, 0x2000)
        );
        let mut b = DirtyBitmap::default();
        b.prepare(0x10_0000, 0x2000, 0x1000).unwrap();
        let ub = dma_unmap_bitmap_arg(&mut b);
        assert_eq!(ub.hdr.argsz, 48);
        assert_eq!(ub.hdr.flags, VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP);
        assert_eq!((ub.hdr.iova, ub.hdr.size), (0x10_0000, 0x2000));
        assert_eq!((ub.bitmap.pgsize, ub.bitmap.size), (0x1000, 8));
        assert_eq!(ub.bitmap.data, b.words_mut().as_mut_ptr() as u64);
    }

    /// A GET_INFO answer as the kernel lays it out: header, then caps at 24 (IOVA ranges,
    /// id 1, 32 bytes with one range) and 56 (migration, id 2).
    fn info_buf(with_migration: bool) -> Vec<u8> {
        let mut b = vec![0u8; 88];
        let caps = VFIO_IOMMU_INFO_PGSIZES | VFIO_IOMMU_INFO_CAPS;
        b[0..4].copy_from_slice(&88u32.to_ne_bytes());
        b[4..8].copy_from_slice(&caps.to_ne_bytes());
        b[8..16].copy_from_slice(&0x4020_1000u64.to_ne_bytes());
        b[16..20].copy_from_slice(&24u32.to_ne_bytes());
        // cap 1: {id 1, version 1, next 56}; nr_iovas 1; range
        b[24..26].copy_from_slice(&1u16.to_ne_bytes());
        b[26..28].copy_from_slice(&1u16.to_ne_bytes());
        let next: u32 = if with_migration { 56 } else { 0 };
        b[28..32].copy_from_slice(&next.to_ne_bytes());
        // cap 2: {id 2, version 1, next 0}; flags; pgsize_bitmap; max_dirty_bitmap_size
        b[56..58].copy_from_slice(&2u16.to_ne_bytes());
        b[58..60].copy_from_slice(&1u16.to_ne_bytes());
        b[72..80].copy_from_slice(&0x1000u64.to_ne_bytes());
        b[80..88].copy_from_slice(&(256u64 << 20).to_ne_bytes());
        b
    }

    #[test]
    fn info_with_the_migration_capability() {
        let i = parse_info(&info_buf(true));
        assert_eq!(i.iova_pgsizes, Some(0x4020_1000));
        let m = i.migration.unwrap();
        assert_eq!(m.pgsize_bitmap, 0x1000);
        assert_eq!(m.max_dirty_bitmap_size, 256 << 20);
        assert_eq!(m.page_size(), Some(0x1000));
    }

    #[test]
    fn info_without_it_or_garbled() {
        assert_eq!(parse_info(&info_buf(false)).migration, None);
        // Caps flagged but the chain points past the end / backwards / into the header.
        let mut b = info_buf(true);
        b[28..32].copy_from_slice(&4096u32.to_ne_bytes());
        assert_eq!(parse_info(&b).migration, None);
        b[28..32].copy_from_slice(&24u32.to_ne_bytes());
        assert_eq!(parse_info(&b).migration, None, "a loop ends the walk");
        b[16..20].copy_from_slice(&8u32.to_ne_bytes());
        assert_eq!(parse_info(&b).migration, None);
        assert_eq!(parse_info(&[]), Type1Info::default());
        // No CAPS flag: the chain is not read.
        let mut b = info_buf(true);
        b[4..8].copy_from_slice(&VFIO_IOMMU_INFO_PGSIZES.to_ne_bytes());
        assert_eq!(parse_info(&b).migration, None);
    }

    /// The ioctl path end to end on an fd that is not a container: its errno comes back.
    #[test]
    fn an_fd_that_is_not_a_container() {
        let f = std::fs::File::open("/dev/null").unwrap();
        let e = Type1Backend::new(f.into(), |_: u64, _: u64| None).err();
        assert_eq!(
            e,
            Some(BackendError {
                op: "VFIO_GET_API_VERSION",
                errno: libc::ENOTTY
            })
        );
    }

    #[test]
    fn page_size_is_the_smallest_in_the_bitmap() {
        let m = MigrationCap {
            pgsize_bitmap: 0x4020_1000,
            ..Default::default()
        };
        assert_eq!(m.page_size(), Some(0x1000));
        assert_eq!(MigrationCap::default().page_size(), None);
    }
}
