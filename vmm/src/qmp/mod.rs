//! QMP, QEMU's monitor protocol, on `--qmp unix:PATH`: the commands a migration user of
//! QEMU reaches for, served by the same [`Vmm`] as the REST API.
//!
//! - [`protocol`]: the wire shapes (greeting, commands, answers, events) and the framing;
//! - [`commands`]: one command -> its answer, acting on the [`Vmm`];
//! - [`dirty`]: the dirty-rate and dirty-limit commands;
//! - [`server`]: the socket, one thread per connection, events to every connection.
//!
//! Events: lifecycle and migration events reach QMP through [`crate::events`]'s listener,
//! so a pause or a migration asked for over the REST API shows here too.

pub mod commands;
pub mod dirty;
pub mod protocol;
pub mod server;

use std::path::PathBuf;

pub use server::QmpServer;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("--qmp {0:?}: expected unix:PATH (a UNIX socket path)")]
    BadOption(String),
    #[error("QMP socket {path}: {reason}")]
    Bind { path: PathBuf, reason: String },
    #[error("QMP socket {path}: cannot start its thread: {source}")]
    Thread {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("only one QMP server per process (already serving {0})")]
    AlreadyStarted(PathBuf),
}

/// The socket path of a `--qmp` value: `unix:PATH` with a non-empty path.
pub fn parse_option(value: &str) -> Result<PathBuf, QmpError> {
    match value.strip_prefix("unix:") {
        Some(p) if !p.is_empty() => Ok(PathBuf::from(p)),
        _ => Err(QmpError::BadOption(value.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_values() {
        assert_eq!(
            parse_option("unix:/tmp/q.sock").unwrap(),
            PathBuf::from("/tmp/q.sock")
        );
        for bad in ["", "unix:", "/tmp/q", "tcp:1.2.3.4:5", "unix"] {
            let e = parse_option(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }
}
