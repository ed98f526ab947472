//! Virtio over PCI (virtio 1.2 §4.1): the transport, the thread that serves a device's
//! queues, and the device models. The queues themselves are rust-vmm's `virtio-queue`.

mod block;
pub(crate) mod chains;
mod common_config;
mod device;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
mod interrupt;
mod pci_transport;
mod rng;
mod state;
mod worker;

pub use block::{
    Block, BlockError, BLOCK_DEVICE_TYPE, BLOCK_PCI_CLASS, BLOCK_QUEUE_SIZE, ID_BYTES, SECTOR_SIZE,
    SEG_MAX,
};
pub use common_config::{
    CommonConfig, CommonConfigError, CommonConfigState, StatusChange, COMMON_CONFIG_SIZE, NO_VECTOR,
};
pub use device::VirtioDevice;
pub use interrupt::{InterruptSink, VirtioInterrupt};
pub use pci_transport::{
    RestoreError, TransportError, VirtioPciDevice, VirtioPciState, BAR, NOTIFY_MULTIPLIER,
    VIRTIO_PCI_STATE_VERSION, VIRTIO_PCI_VENDOR,
};
pub use rng::{Rng, RNG_DEVICE_TYPE, RNG_MAX_REQUEST, RNG_PCI_CLASS, RNG_QUEUE_SIZE};
pub use state::QueueState;
pub use worker::QueueWorker;
