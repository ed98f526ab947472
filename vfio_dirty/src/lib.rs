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
//!
//! The ioctl backends themselves are not here yet (issue 14): the policy is tested against
//! fake backends, and what needs `/dev/iommu` or `/dev/vfio` skips where they are missing.

pub mod bitmap;
pub mod policy;
pub mod uapi;
pub mod vfio_user;

pub use bitmap::{BitmapError, DirtyBitmap};
pub use policy::{
    BackendError, DeviceId, DirtyBackend, DmaTracker, DomainId, Harvest, Identity, IovaTranslator,
    PolicyError, Range, Scope,
};
