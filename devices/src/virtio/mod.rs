//! Virtio over PCI (virtio 1.2 §4.1): the transport, the thread that serves a device's
//! queues, and the device models. The queues themselves are rust-vmm's `virtio-queue`.

mod common_config;
mod device;
mod interrupt;
mod pci_transport;
mod state;
mod worker;

pub use common_config::{
    CommonConfig, CommonConfigError, CommonConfigState, StatusChange, COMMON_CONFIG_SIZE, NO_VECTOR,
};
pub use device::VirtioDevice;
pub use interrupt::{InterruptSink, VirtioInterrupt};
pub use pci_transport::{
    RestoreError, TransportError, VirtioPciDevice, VirtioPciState, BAR, NOTIFY_MULTIPLIER,
    VIRTIO_PCI_STATE_VERSION, VIRTIO_PCI_VENDOR,
};
pub use state::QueueState;
pub use worker::QueueWorker;
