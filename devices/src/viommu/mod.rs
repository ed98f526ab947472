//! virtio-iommu (virtio 1.2 §5.13): devices behind it reach guest RAM through IOVA
//! domains. This is its first piece, the domain's mappings and translation; the device
//! model, the request queue and the dirty-tracking rules follow (issue 13).

mod domain;

pub use domain::{
    DmaFault, DomainError, IovaDomain, Mapping, GRANULE, MAP_F_MMIO, MAP_F_READ, MAP_F_WRITE,
};
