//! VFIO PCI passthrough: a host device's PCI function on Ferry's bus.
//!
//! - `ops.rs`: [`VfioOps`], the device operations the function model needs.
//! - `function.rs`: [`VfioPciFunction`], the [`crate::pci::PciDevice`] (what Ferry owns in
//!   config space and what it forwards).
//! - `kernel.rs`: [`KernelDevice`], `VfioOps` over a VFIO device fd.
//!
//! Opening the device (iommufd or a type1 container), mapping guest RAM for its DMA and
//! reading its dirty pages is the VMM's (`vmm/src/vfio_devices.rs`), over `vfio_dirty`.

mod function;
pub mod kernel;
mod ops;
#[cfg(test)]
mod tests;

pub use function::{
    VfioFunctionError, VfioFunctionState, VfioInterrupts, VfioPciFunction, MSI_CAP_ID,
};
pub use kernel::{group_device_fd, irq_set_arg, KernelDevice, VfioDeviceInfo};
pub use ops::{
    IrqInfo, RegionInfo, VfioOps, VfioOpsError, CONFIG_REGION, INTX_IRQ, IRQ_EVENTFD, MSIX_IRQ,
    MSI_IRQ, REGION_MMAP, REGION_READ, REGION_WRITE, ROM_REGION,
};
