//! virtio-iommu (virtio 1.2 §5.13), with Ferry's dirty-tracking extension
//! (`DIRTY_TRACKING.md` in this folder). Devices put behind it reach guest RAM through the
//! IOVA domains the guest's driver builds; every DMA is translated ([`IommuTable`]),
//! refused with a fault record where the mapping says no, and every write is marked by
//! guest-physical page in the VMM's DMA log and, when the guest tracks the domain, by IOVA
//! page in the domain's dirty bits.
//!
//! - `domain.rs`: one domain's mappings (MAP/UNMAP rules, translation).
//! - `dirty.rs`: a domain's dirty bits for the guest.
//! - `table.rs`: endpoints, domains, faults; the lock every DMA holds.
//! - `requests.rs`: the request queue's requests and their status codes.
//! - `device.rs`: the virtio device (config space, request and event queues).
//! - `state.rs`: the state a migration carries.

mod device;
mod dirty;
mod domain;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
mod requests;
mod state;
mod table;
#[cfg(test)]
mod tests;

use std::ops::RangeInclusive;

pub use device::{VirtioIommu, IOMMU_DEVICE_TYPE, IOMMU_PCI_CLASS};
pub use dirty::{DirtyPages, DirtyPagesState};
pub use domain::{
    DmaFault, DomainError, IovaDomain, Mapping, GRANULE, MAP_F_MMIO, MAP_F_READ, MAP_F_WRITE,
};
pub use requests::*;
pub use state::{ViommuState, VIOMMU_STATE_VERSION};
pub use table::{
    DmaWindow, Domain, Endpoint, ExternalEndpoint, FaultRecord, IommuEndpoint, IommuTable, Tables,
    FAULT_F_ADDRESS, FAULT_F_READ, FAULT_F_WRITE, FAULT_R_DOMAIN, FAULT_R_MAPPING, FAULT_R_UNKNOWN,
};

/// Feature bits (virtio 1.2 §5.13.3).
pub const F_INPUT_RANGE: u32 = 0;
pub const F_DOMAIN_RANGE: u32 = 1;
pub const F_MAP_UNMAP: u32 = 2;
pub const F_BYPASS: u32 = 3;
pub const F_PROBE: u32 = 4;
pub const F_MMIO: u32 = 5;
pub const F_BYPASS_CONFIG: u32 = 6;
/// Ferry's extension (DIRTY_TRACKING.md); 6-9 are taken by the spec and its drafts.
pub const F_DIRTY_TRACKING: u32 = 10;

/// IOVAs a domain may map: 48 bits, what x86 page tables (and so a guest's IOMMU code)
/// expect.
pub const INPUT_RANGE: RangeInclusive<u64> = 0..=(1 << 48) - 1;
/// Domain IDs the driver may use.
pub const DOMAIN_RANGE: RangeInclusive<u32> = 1..=0xffff;
/// The x86 MSI doorbell: reserved in every endpoint's address space (PROBE RESV_MEM MSI).
pub const MSI_RANGE: RangeInclusive<u64> = 0xfee0_0000..=0xfeef_ffff;
/// Bytes of PROBE properties per request (RESV_MEM 24, dirty tracking 12, then zeros).
pub const PROBE_SIZE: u32 = 64;
