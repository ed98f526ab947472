//! The VMM's side of live migration: transports, and the glue between a running
//! [`crate::vm::Machine`] and the `vm-migration` engine.

pub mod destination;
pub mod handler;
pub mod postcopy;
pub mod source;
pub mod tls;
pub mod transport;

pub use destination::MachineDestination;
pub use handler::LiveMigration;
pub use source::MachineSource;
