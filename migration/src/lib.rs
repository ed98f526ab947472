//! `vm-migration`: Ferry's live-migration wire protocol, precopy engine and statistics.
//!
//! Nothing here knows about KVM. The vmm plugs its VM in through two traits,
//! [`engine::SourceVm`] and [`engine::DestinationVm`], and hands the engine a connected
//! stream; the engine moves RAM and state and keeps a [`stats::MigrationProgress`] current
//! for `vm.migration-info`.
//!
//! - [`protocol`]: message framing, encoder and streaming decoder (see `PROTOCOL.md`).
//! - [`stats`]: `query-migrate`-shaped statistics and the shared live progress object.
//! - [`engine`]: the precopy source and the receiving destination.
//! - [`crc`]: the chunks' crc32c, folded with carry-less multiplication where the CPU can.

pub mod crc;
pub mod engine;
pub mod page_set;
pub mod priority;
pub mod protocol;
pub mod stats;
pub mod transport;

pub use engine::{
    receive_migration, receive_migration_from, send_migration, send_migration_parallel,
    AcceptChannel, DestinationVm, HookResult, PostcopyRam, ReceiveError, ReceiveOptions, SendError,
    SendOptions, SourceVm, SwitchOver, TimeoutStrategy, TEST_SPARSE_NEVER_CLEARED_ENV,
};
pub use protocol::{RamRange, PAGE_SIZE};
pub use stats::{MigrationInfo, MigrationProgress, MigrationStatus};
pub use transport::MigrationStream;
