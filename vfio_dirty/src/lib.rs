// Copyright 2026 Ferry authors
// SPDX-License-Identifier: Apache-2.0

//! DMA dirty tracking for devices the VMM does not see writing: VFIO devices behind
//! iommufd (HWPT dirty tracking), VFIO type1 dirty pages and VFIO device DMA logging.
//!
//! Where to look:
//! - [`uapi`]: the kernel's constants, ioctl numbers and `#[repr(C)]` structs.
//! - [`bitmap`]: the set-only kernel bitmap, one mapped range at a time.
//! - [`policy`]: the rules (DESIGN.md 4–8) applied over a [`policy::DirtyBackend`], the
//!   trait a hardware tracker implements, producing guest-physical dirty ranges.
//! - [`iommufd`]: [`iommufd::IommufdBackend`], the `DirtyBackend` over `/dev/iommu` (IOAS,
//!   HWPTs, VFIO cdevs).
//! - [`type1`]: [`type1::Type1Backend`], the `DirtyBackend` over a VFIO type1 container.
//! - [`device_log`]: VFIO device DMA logging and the migration v2 state steps.
//! - [`error`]: errno → [`BackendError`], the raw ioctl call, [`error::MigrationError`].
//!
//! The policy is tested against fake backends; the ioctl backends' arguments are unit-tested,
//! and what needs `/dev/iommu` or `/dev/vfio` (`tests/hardware.rs`) skips where they are
//! missing.

pub mod bitmap;
pub mod device_log;
pub mod error;
pub mod iommufd;
pub mod policy;
pub mod type1;
pub mod uapi;
pub mod vfio_user;

pub use bitmap::{BitmapError, DirtyBitmap};
pub use policy::{
    BackendError, DeviceId, DirtyBackend, DmaTracker, DomainId, Harvest, Identity, IovaTranslator,
    PolicyError, Range, Scope,
};
