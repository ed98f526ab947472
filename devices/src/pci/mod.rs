//! PCI: configuration space, bus 0 with its host bridge, the two ways a guest reaches
//! configuration space (ports 0xCF8/0xCFC and ECAM), and MSI-X. Virtio and other PCI
//! devices build on [`PciDevice`].

mod bus;
mod config;
mod msix;

pub use bus::{
    BarHit, ConfigAddress, PciBarWindow, PciBus, PciBusError, PciConfigIo, PciDevice, PciEcam,
    PciHostBridge, CONFIG_IO_LEN, CONFIG_IO_PORT, ECAM_BUS_SIZE, SLOTS,
};
pub use config::{
    declare_device_bars, Bar, BarKind, DeviceBarError, PciConfig, PciConfigError, PciConfigState,
    PciIds, BAR_SLOTS, COMMAND_BUS_MASTER, COMMAND_INTX_DISABLE, COMMAND_IO, COMMAND_MEMORY,
    CONFIG_SIZE, CONFIG_STATE_VERSION,
};
pub use msix::{
    MsiMessage, Msix, MsixEffect, MsixEntry, MsixError, MsixState, MsixTrigger, MSIX_CAP_ID,
    MSIX_ENTRY_SIZE, MSIX_MAX_VECTORS, MSIX_STATE_VERSION,
};
