//! Virtio over PCI (virtio 1.2 §4.1). The pieces the transport is built from live here;
//! the queues themselves are rust-vmm's `virtio-queue`.

mod common_config;
mod pci_transport;

pub use common_config::{
    CommonConfig, CommonConfigError, StatusChange, COMMON_CONFIG_SIZE, NO_VECTOR,
};
pub use pci_transport::{
    InterruptSink, TransportError, VirtioDevice, VirtioPciDevice, BAR, NOTIFY_MULTIPLIER,
    VIRTIO_PCI_VENDOR,
};
