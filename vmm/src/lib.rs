//! The Ferry VMM: configuration, machine assembly, vCPU threads, and the dirty set the
//! migration engine consumes.

pub mod api;
pub mod boot;
pub mod config;
pub mod coredump;
pub mod dirty;
pub mod dirty_rate;
pub mod events;
pub mod memory;
pub mod migration;
pub mod outside_dma;
pub mod pci_devices;
pub mod qmp;
pub mod snapshot;
pub mod throttle;
pub mod user_devices;
pub mod vcpu;
pub mod vfio_devices;
pub mod vm;
