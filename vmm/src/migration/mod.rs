//! The VMM's side of live migration: transports, and the glue between a running
//! [`crate::vm::Machine`] and the `vm-migration` engine.

pub mod destination;
pub mod source;
pub mod transport;

pub use destination::MachineDestination;
pub use source::MachineSource;
