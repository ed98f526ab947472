//! KVM, and only KVM: VM and vCPU construction in the order KVM requires, dirty rings,
//! the dirty bitmap fallback, and their harvest. Nothing here knows about migration.

mod caps;
mod dirty_ring;
mod dirty_rings;
mod dirty_set;
mod error;
mod irq_routes;
#[cfg(test)]
mod kvm_ring_model;
mod state;
mod vcpu;
mod vm;

pub use caps::{CapabilityProbe, DirtyCaps, RingFlavor, MIN_RING_ENTRIES, RING_ENTRY_BYTES};
pub use dirty_ring::{DirtyRing, RingHarvest, RingIndexes};
pub use dirty_set::{count_bits, DirtyPageSet, SlotDirtyBits};
pub use error::{HypervisorError, Result};
pub use irq_routes::{IrqRoutes, FIRST_MSI_GSI};
pub use state::{VcpuState, VmState};
pub use vcpu::{install_kick_handler, kick_signal, kick_thread, Vcpu, VcpuExit};
pub use vm::{
    bitmap_setup_plan, ring_setup_plan, CapStep, DirtyStats, DirtyTracking, MemorySlot, SyncKind,
    TrackedVmBuilder, Vm, VmBuilder, VmWithMemory,
};

pub use kvm_bindings;
pub use kvm_ioctls;
