//! A PCI function served by a vfio-user device process. Ferry keeps the function's
//! configuration header itself (identity read from the device once, BARs placed by the
//! VMM as for every other function), so a device cannot move its own BARs or lie about
//! them later; accesses inside BARs go to the device as REGION_READ/WRITE.
//!
//! The device writes guest RAM by DMA into memory shared with it by file descriptor,
//! which Ferry never sees: its writes reach the migration through its own DMA log
//! (`vfio_dirty::vfio_user::log`), never through this type.

use std::sync::{Arc, Mutex, MutexGuard};

use vfio_dirty::vfio_user::client::{Client, ClientError};
use vfio_dirty::vfio_user::wire::PCI_CONFIG_REGION;

use crate::pci::{declare_device_bars, DeviceBarError, PciConfig, PciDevice, PciIds};

#[derive(Debug, thiserror::Error)]
pub enum UserDeviceError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{path}: BAR {index} of {size:#x} bytes: {reason}")]
    Bar {
        path: String,
        index: usize,
        size: u64,
        reason: String,
    },
}

/// A vfio-user device as a PCI function on Ferry's bus.
pub struct UserPciFunction {
    config: PciConfig,
    client: Arc<Mutex<Client>>,
    /// (BAR index, size) the device declared, in index order.
    bars: Vec<(usize, u64)>,
    /// Set when the device stopped answering: guest reads get all-ones from then on.
    broken: bool,
    name: String,
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

impl UserPciFunction {
    /// Reads the device's identity and BAR sizes: memory BARs are taken, 32-bit ones as
    /// 32-bit, 64-bit as 64-bit; I/O BARs are refused.
    pub fn new(client: Arc<Mutex<Client>>) -> Result<Self, UserDeviceError> {
        let mut c = client.lock().unwrap_or_else(|p| p.into_inner());
        let path = c.path().display().to_string();
        let mut header = [0u8; 64];
        c.region_read(PCI_CONFIG_REGION, 0, &mut header)?;
        let ids = PciIds {
            vendor: u16::from_le_bytes([header[0], header[1]]),
            device: u16::from_le_bytes([header[2], header[3]]),
            class: le32(&header, 8) >> 8,
            revision: header[8],
            subsystem_vendor: u16::from_le_bytes([header[0x2c], header[0x2d]]),
            subsystem: u16::from_le_bytes([header[0x2e], header[0x2f]]),
            interrupt_pin: 0,
        };
        let mut config = PciConfig::new(ids);
        let bars = declare_device_bars(&mut config, &header, |index| {
            c.region_info(index as u32).map(|r| r.size)
        })
        .map_err(|e| match e {
            DeviceBarError::Size(e) => UserDeviceError::Client(e),
            DeviceBarError::Bar {
                index,
                size,
                reason,
            } => UserDeviceError::Bar {
                path: path.clone(),
                index,
                size,
                reason,
            },
        })?;
        drop(c);
        Ok(UserPciFunction {
            config,
            client,
            bars,
            broken: false,
            name: path,
        })
    }

    /// BARs the device declared: (index, size).
    pub fn bars(&self) -> &[(usize, u64)] {
        &self.bars
    }

    fn client(&self) -> MutexGuard<'_, Client> {
        self.client.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn failed(&mut self, what: &str, e: ClientError) {
        if !self.broken {
            log::error!(
                "{}: {what}: {e}; the device is unusable until the VM is restarted",
                self.name
            );
        }
        self.broken = true;
    }
}

impl PciDevice for UserPciFunction {
    fn config(&self) -> &PciConfig {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
        // The device learns of memory and bus-master enable; its BAR addresses are Ferry's.
        if offset < 6 && offset + data.len() > 4 && !self.broken {
            let command = self.config.command().to_le_bytes();
            let r = self.client().region_write(PCI_CONFIG_REGION, 4, &command);
            if let Err(e) = r {
                self.failed("writing the command register", e);
            }
        }
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if self.broken {
            return;
        }
        let r = self.client().region_read(bar as u32, offset, data);
        if let Err(e) = r {
            data.fill(0xff);
            self.failed(&format!("reading BAR {bar} at {offset:#x}"), e);
        }
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if self.broken {
            return;
        }
        let r = self.client().region_write(bar as u32, offset, data);
        if let Err(e) = r {
            self.failed(&format!("writing BAR {bar} at {offset:#x}"), e);
        }
    }
}
