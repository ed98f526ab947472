//! Device models. They know nothing of KVM: interrupts are `EventFd`s the VMM wires to
//! the irqchip, and platform events (exit, reset, power-off) are values they return.

mod bus;
mod debug_exit;
pub mod dirty_log;
pub mod guest_ram;
mod i8042;
pub mod pci;
mod pm;
mod serial;
pub mod user_device;
pub mod vfio;
pub mod viommu;
pub mod virtio;

pub use bus::{MmioBus, MmioDevice, PioBus, PioDevice, PlatformEvent};
pub use debug_exit::{DebugExit, DEBUG_EXIT_PORT};
pub use i8042::{I8042, I8042_PORT};
pub use pm::{
    AcpiPm, AcpiPmState, SciLine, ACPI_PM1A_CNT_PORT, ACPI_PM1A_EVT_PORT, ACPI_PM_PORTS, PWRBTN,
    S5_SLP_TYP,
};
pub use serial::{IrqLine, Serial, SerialCounters, SerialSnapshot, COM1_IRQ, COM1_PORT};
