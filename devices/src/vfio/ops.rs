//! What a VFIO PCI function model needs from the device: its regions (BARs and config
//! space, read and written at offsets), its interrupts (eventfds per MSI-X vector) and a
//! reset. [`VfioOps`] is that, small enough for a fake in the tests; the kernel's device
//! fd implements it in [`super::kernel`].

use std::os::fd::RawFd;

/// Region indexes of a vfio-pci device (`VFIO_PCI_*_REGION_INDEX`): BARs 0-5, then these.
pub const ROM_REGION: u32 = 6;
pub const CONFIG_REGION: u32 = 7;
/// IRQ indexes of a vfio-pci device (`VFIO_PCI_*_IRQ_INDEX`).
pub const INTX_IRQ: u32 = 0;
pub const MSI_IRQ: u32 = 1;
pub const MSIX_IRQ: u32 = 2;

/// `vfio_region_info.flags`.
pub const REGION_READ: u32 = 1 << 0;
pub const REGION_WRITE: u32 = 1 << 1;
pub const REGION_MMAP: u32 = 1 << 2;

/// `vfio_irq_info.flags`.
pub const IRQ_EVENTFD: u32 = 1 << 0;

/// One region as the device describes it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegionInfo {
    pub index: u32,
    pub flags: u32,
    /// Bytes; 0 for a region the device does not have.
    pub size: u64,
    /// Where the region starts in the device fd (pread/pwrite offset).
    pub offset: u64,
}

/// One interrupt index as the device describes it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IrqInfo {
    pub index: u32,
    pub flags: u32,
    /// Vectors (MSI-X) or lines (INTx) the index has.
    pub count: u32,
}

/// A device operation that failed: which, on what, and why.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum VfioOpsError {
    #[error("{op} failed with errno {errno} ({})", std::io::Error::from_raw_os_error(*errno))]
    Kernel { op: &'static str, errno: i32 },
    #[error("region {index}: {len} bytes at {offset:#x} do not fit its {size:#x} bytes")]
    OutOfRegion {
        index: u32,
        offset: u64,
        len: usize,
        size: u64,
    },
    #[error("region {index}: {op} of {len} bytes at {offset:#x} ran past what the device has")]
    Short {
        op: &'static str,
        index: u32,
        offset: u64,
        len: usize,
    },
    #[error("{what}: the device answered {value:#x}, which cannot be right")]
    BadAnswer { what: &'static str, value: u64 },
}

/// The device operations a [`super::VfioPciFunction`] uses. `&self` throughout: the kernel
/// serialises what needs it, and the VMM shares the device with the function.
pub trait VfioOps: Send + Sync {
    /// Region `index` (BAR 0-5, [`ROM_REGION`], [`CONFIG_REGION`]).
    fn region_info(&self, index: u32) -> Result<RegionInfo, VfioOpsError>;
    /// Interrupt index `index` ([`INTX_IRQ`], [`MSI_IRQ`], [`MSIX_IRQ`]).
    fn irq_info(&self, index: u32) -> Result<IrqInfo, VfioOpsError>;
    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), VfioOpsError>;
    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<(), VfioOpsError>;
    /// Vectors `start..start + fds.len()` of `index` signal these eventfds (-1: none).
    /// For MSI-X the first call enables it on the device with that many vectors.
    fn set_irq_eventfds(&self, index: u32, start: u32, fds: &[RawFd]) -> Result<(), VfioOpsError>;
    /// Every vector of `index` off (MSI-X disabled on the device).
    fn disable_irqs(&self, index: u32) -> Result<(), VfioOpsError>;
    /// A function-level reset (`VFIO_DEVICE_RESET`).
    fn reset(&self) -> Result<(), VfioOpsError>;
}
