//! cloud-hypervisor's event monitor: `--event-monitor path=FILE|fd=N` writes one JSON
//! object per lifecycle event, in cloud-hypervisor's shape, so tools that follow its
//! events follow Ferry's:
//!
//! ```json
//! {
//!   "timestamp": { "secs": 0, "nanos": 52710 },
//!   "source": "vm",
//!   "event": "booted",
//!   "properties": null
//! }
//! ```
//!
//! `timestamp` is the time since the monitor started; objects follow each other with a
//! blank line between them. A thread of its own writes them, so that an API or vCPU
//! thread never waits on a slow reader of a pipe.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::{FromRawFd, RawFd};
use std::path::PathBuf;
use std::sync::mpsc::{channel, sync_channel, Sender, SyncSender};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum EventMonitorError {
    #[error("--event-monitor {0:?}: expected path=FILE or fd=N")]
    BadOption(String),
    #[error("--event-monitor: cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--event-monitor fd={fd}: not an open file descriptor of this process")]
    BadFd { fd: RawFd },
    #[error("--event-monitor: cannot start its writer thread: {0}")]
    Thread(std::io::Error),
    #[error("--event-monitor given twice")]
    AlreadyStarted,
}

enum Msg {
    Event(Vec<u8>),
    /// Answered once everything sent before it is written.
    Flush(SyncSender<()>),
}

struct Monitor {
    start: Instant,
    tx: Sender<Msg>,
}

static MONITOR: OnceLock<Monitor> = OnceLock::new();

/// A function that hears every event, monitor or not (the QMP server: its STOP, RESUME,
/// MIGRATION events). Called on the emitting thread, perhaps with the VM lock held.
pub type Listener = fn(source: &str, event: &str, properties: &[(&str, &str)]);

static LISTENER: OnceLock<Listener> = OnceLock::new();

/// Sets the process's [`Listener`] (once; false if one was set already).
pub fn set_listener(f: Listener) -> bool {
    LISTENER.set(f).is_ok()
}

#[derive(serde::Serialize)]
struct Timestamp {
    secs: u64,
    nanos: u32,
}

#[derive(serde::Serialize)]
struct Event<'a> {
    timestamp: Timestamp,
    source: &'a str,
    event: &'a str,
    properties: Option<BTreeMap<&'a str, &'a str>>,
}

/// Opens what `--event-monitor` names: `path=FILE` (created, or appended to) or `fd=N`
/// (an open descriptor this process inherited; it becomes the monitor's).
pub fn open_target(option: &str) -> Result<File, EventMonitorError> {
    if let Some(path) = option.strip_prefix("path=").filter(|p| !p.is_empty()) {
        return OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| EventMonitorError::Open {
                path: path.into(),
                source,
            });
    }
    if let Some(fd) = option.strip_prefix("fd=") {
        let fd: RawFd = fd
            .parse()
            .ok()
            .filter(|fd| *fd >= 0)
            .ok_or_else(|| EventMonitorError::BadOption(option.into()))?;
        // SAFETY: F_GETFD only reads the descriptor's flags; it fails for a closed fd.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(EventMonitorError::BadFd { fd });
        }
        // SAFETY: the descriptor is open (checked above) and was handed to this process
        // for the monitor alone; nothing else in Ferry owns it.
        return Ok(unsafe { File::from_raw_fd(fd) });
    }
    Err(EventMonitorError::BadOption(option.into()))
}

/// Starts the monitor writing to `file`. Call once, from the main thread.
pub fn start(mut file: File) -> Result<(), EventMonitorError> {
    let (tx, rx) = channel::<Msg>();
    MONITOR
        .set(Monitor {
            start: Instant::now(),
            tx,
        })
        .map_err(|_| EventMonitorError::AlreadyStarted)?;
    std::thread::Builder::new()
        .name("event-monitor".into())
        .spawn(move || {
            let mut broken = false;
            for msg in rx {
                match msg {
                    Msg::Event(bytes) if !broken => {
                        if let Err(e) = file.write_all(&bytes) {
                            // One line in the log; later events are dropped, not retried.
                            log::warn!("event monitor: cannot write, events stop here: {e}");
                            broken = true;
                        }
                    }
                    Msg::Event(_) => {}
                    Msg::Flush(done) => {
                        let _ = done.send(());
                    }
                }
            }
        })
        .map_err(EventMonitorError::Thread)?;
    Ok(())
}

/// Records `event` from `source` ("vmm" or "vm"), with optional string properties.
/// Without a monitor, only the [`Listener`] (if any) hears it.
pub fn emit(source: &str, event: &str, properties: &[(&str, &str)]) {
    if let Some(listener) = LISTENER.get() {
        listener(source, event, properties);
    }
    let Some(m) = MONITOR.get() else {
        return;
    };
    let elapsed = m.start.elapsed();
    let e = Event {
        timestamp: Timestamp {
            secs: elapsed.as_secs(),
            nanos: elapsed.subsec_nanos(),
        },
        source,
        event,
        properties: (!properties.is_empty()).then(|| properties.iter().copied().collect()),
    };
    if let Ok(mut bytes) = serde_json::to_vec_pretty(&e) {
        bytes.extend_from_slice(b"\n\n");
        let _ = m.tx.send(Msg::Event(bytes));
    }
}

/// Waits (at most `limit`) until every event emitted so far is written: before the
/// process exits.
pub fn flush(limit: Duration) {
    let Some(m) = MONITOR.get() else {
        return;
    };
    let (done_tx, done_rx) = sync_channel(1);
    if m.tx.send(Msg::Flush(done_tx)).is_ok() {
        let _ = done_rx.recv_timeout(limit);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_named_in_their_errors() {
        for bad in ["", "path=", "fd=", "fd=-1", "fd=x", "file=/tmp/x", "/tmp/x"] {
            let e = open_target(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
        // A descriptor number nothing holds.
        let e = open_target("fd=999999").unwrap_err().to_string();
        assert!(e.contains("fd=999999"), "{e}");
        let e = open_target("path=/nonexistent-ferry-dir/events")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent-ferry-dir/events"), "{e}");
    }

    #[test]
    fn the_event_shape_is_cloud_hypervisors() {
        let e = Event {
            timestamp: Timestamp { secs: 1, nanos: 2 },
            source: "vm",
            event: "booted",
            properties: None,
        };
        let v: serde_json::Value = serde_json::to_value(&e).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "timestamp": {"secs": 1, "nanos": 2},
                "source": "vm",
                "event": "booted",
                "properties": null
            })
        );
        let props = [("id", "disk0")];
        let e = Event {
            properties: Some(props.iter().copied().collect()),
            ..e
        };
        assert_eq!(
            serde_json::to_value(&e).unwrap()["properties"],
            serde_json::json!({"id": "disk0"})
        );
    }
}
