//! `ferry-remote`: drives a running `ferry` through its API socket, as `ch-remote` drives
//! cloud-hypervisor. Prints JSON answers on stdout; on failure prints the server's error
//! message on stderr and exits with status 1 (2 for usage errors).

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use serde_json::{json, Map, Value};
use vmm::api::client::{Client, Reply};

#[derive(Parser, Debug)]
#[command(
    name = "ferry-remote",
    version,
    about = "Control a running ferry through its API socket"
)]
struct Cli {
    /// The API socket of the ferry process (its --api-socket).
    #[arg(long = "api-socket", value_name = "PATH")]
    api_socket: PathBuf,
    /// Give up on an answer after this many seconds (default: wait as long as it takes).
    #[arg(long = "request-timeout-s", value_name = "N")]
    request_timeout_s: Option<u64>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Check that the VMM answers (version, pid, features).
    Ping,
    /// VM config and state.
    Info,
    /// VM counters (serial, vCPU exits, dirty tracking).
    Counters,
    /// Create the VM from a JSON VmConfig file ('-' for stdin).
    Create { config: PathBuf },
    /// Boot the created (or shut down) VM.
    Boot,
    /// Pause the running VM.
    Pause,
    /// Resume the paused VM.
    Resume,
    /// Shut the VM down (it can be booted again).
    Shutdown,
    /// Reboot the VM.
    Reboot,
    /// Inject an NMI into every vCPU.
    Nmi,
    /// Press the VM's ACPI power button.
    PowerButton,
    /// Add a disk to a VM not yet booted.
    AddDisk {
        /// The disk image (raw) or block device.
        path: PathBuf,
        #[arg(long)]
        id: Option<String>,
        #[arg(long)]
        readonly: bool,
    },
    /// Remove a device (by id) from a VM not yet booted.
    RemoveDevice { id: String },
    /// Change the vCPU count and/or RAM size of a VM not yet booted.
    Resize {
        #[arg(long)]
        vcpus: Option<u32>,
        /// Bytes.
        #[arg(long)]
        ram: Option<u64>,
    },
    /// Delete the VM.
    Delete,
    /// End the ferry process.
    ShutdownVmm,
    /// Live-migrate the VM to a ferry waiting in receive-migration. Waits for the end,
    /// showing progress on stderr (from migration-info); exits 1 with the reason if the
    /// migration fails or is cancelled.
    SendMigration {
        /// tcp:HOST:PORT or unix:/path.
        destination_url: String,
        /// Longest pause of the guest to aim for.
        #[arg(long = "downtime-ms", value_name = "N")]
        downtime_ms: Option<u64>,
        /// Longest total duration.
        #[arg(long = "timeout-s", value_name = "N")]
        timeout_s: Option<u64>,
        /// What to do at the timeout: Cancel or Ignore (the downtime target).
        #[arg(long = "timeout-strategy", value_name = "STRATEGY")]
        timeout_strategy: Option<String>,
        /// Parallel connections (tcp: only; up to 128 taken, at most 16 used).
        #[arg(long, value_name = "N")]
        connections: Option<u64>,
        /// Memory mode: Precopy, MemFDs or Postcopy.
        #[arg(long = "memory-mode", value_name = "MODE")]
        memory_mode: Option<String>,
        /// Postcopy after N precopy passes (0: at once; implies --memory-mode Postcopy).
        #[arg(long = "postcopy-after-passes", value_name = "N")]
        postcopy_after_passes: Option<u32>,
        /// Take up a postcopy migration whose link broke (migration-info: postcopy-paused).
        #[arg(long)]
        resume: bool,
        /// Same-host migration handing guest RAM over as files (cloud-hypervisor's `local`).
        #[arg(long)]
        local: bool,
        /// Never throttle the vCPUs, even when the migration does not converge.
        #[arg(long = "no-auto-converge")]
        no_auto_converge: bool,
        /// Keep the vCPU threads at their own priority while the migration runs (by
        /// default they yield to it until the pause, nice +10: see the README).
        #[arg(long = "no-yield-vcpus")]
        no_yield_vcpus: bool,
        /// When to pause for the last pass: Fits (as soon as the rest fits the downtime,
        /// QEMU's rule) or MinDowntime (go on while the rest still shrinks; the default).
        #[arg(long = "switch-over", value_name = "RULE")]
        switch_over: Option<String>,
        /// Migrate over TLS (tcp: only): DIR holds ca-cert.pem, client-cert.pem and
        /// client-key.pem; the destination's certificate must be for the URL's host.
        #[arg(long = "tls-dir", value_name = "DIR")]
        tls_dir: Option<PathBuf>,
        /// Return once the migration has started (follow it with migration-info).
        #[arg(long = "no-wait")]
        no_wait: bool,
    },
    /// Wait for a migrated VM on URL (tcp:HOST:PORT or unix:/path).
    ReceiveMigration {
        receiver_url: String,
        /// Take the migration over TLS only (tcp: only): DIR holds ca-cert.pem,
        /// server-cert.pem and server-key.pem; the source must present a certificate
        /// signed by that CA.
        #[arg(long = "tls-dir", value_name = "DIR")]
        tls_dir: Option<PathBuf>,
    },
    /// Progress of the running or last migration.
    MigrationInfo,
    /// Cancel the running migration.
    CancelMigration,
    /// Switch the running outgoing migration to postcopy after its current pass.
    StartPostcopy,
    /// Write the paused VM's memory and registers to an ELF core file.
    Coredump {
        /// file:///path/to/core (absolute path).
        destination_url: String,
    },
    /// Save the paused VM (configuration, state, RAM) into an existing directory.
    Snapshot {
        /// file:///path/to/directory (absolute path).
        destination_url: String,
    },
    /// Build the VM saved in a snapshot directory (paused unless --resume).
    Restore {
        /// file:///path/to/directory (absolute path).
        source_url: String,
        /// Run the VM at once.
        #[arg(long)]
        resume: bool,
    },
}

/// `dir` as the ferry process must see it: relative to this command's directory, not
/// ferry's.
fn absolute(what: &str, dir: &std::path::Path) -> Result<String, String> {
    let abs = std::path::absolute(dir).map_err(|e| format!("{what} {}: {e}", dir.display()))?;
    abs.to_str()
        .map(str::to_string)
        .ok_or_else(|| format!("{what} {}: not UTF-8", dir.display()))
}

/// The request a command makes: method, endpoint, body.
fn request_of(cmd: &Command) -> Result<(&'static str, &'static str, Option<Vec<u8>>), String> {
    Ok(match cmd {
        Command::Ping => ("GET", "vmm.ping", None),
        Command::Info => ("GET", "vm.info", None),
        Command::Counters => ("GET", "vm.counters", None),
        Command::Create { config } => {
            let mut body = Vec::new();
            let read = if config.as_os_str() == "-" {
                std::io::stdin().read_to_end(&mut body)
            } else {
                std::fs::File::open(config).and_then(|mut f| f.read_to_end(&mut body))
            };
            read.map_err(|e| format!("cannot read {}: {e}", config.display()))?;
            ("PUT", "vm.create", Some(body))
        }
        Command::Boot => ("PUT", "vm.boot", None),
        Command::Pause => ("PUT", "vm.pause", None),
        Command::Resume => ("PUT", "vm.resume", None),
        Command::Shutdown => ("PUT", "vm.shutdown", None),
        Command::Reboot => ("PUT", "vm.reboot", None),
        Command::Nmi => ("PUT", "vm.nmi", None),
        Command::PowerButton => ("PUT", "vm.power-button", None),
        Command::AddDisk { path, id, readonly } => {
            let mut b = serde_json::Map::new();
            b.insert("path".into(), json!(absolute("add-disk", path)?));
            if let Some(id) = id {
                b.insert("id".into(), json!(id));
            }
            if *readonly {
                b.insert("readonly".into(), json!(true));
            }
            let body = serde_json::to_vec(&Value::Object(b)).map_err(|e| e.to_string())?;
            ("PUT", "vm.add-disk", Some(body))
        }
        Command::RemoveDevice { id } => {
            let body = serde_json::to_vec(&json!({ "id": id })).map_err(|e| e.to_string())?;
            ("PUT", "vm.remove-device", Some(body))
        }
        Command::Resize { vcpus, ram } => {
            let body = serde_json::to_vec(&json!({ "desired_vcpus": vcpus, "desired_ram": ram }))
                .map_err(|e| e.to_string())?;
            ("PUT", "vm.resize", Some(body))
        }
        Command::Delete => ("PUT", "vm.delete", None),
        Command::ShutdownVmm => ("PUT", "vmm.shutdown", None),
        Command::SendMigration {
            destination_url,
            downtime_ms,
            timeout_s,
            timeout_strategy,
            connections,
            memory_mode,
            postcopy_after_passes,
            resume,
            local,
            no_auto_converge,
            no_yield_vcpus,
            switch_over,
            tls_dir,
            no_wait: _,
        } => {
            // Only what was given: the server fills in its defaults.
            let mut b = Map::new();
            b.insert("destination_url".into(), json!(destination_url));
            if let Some(v) = downtime_ms {
                b.insert("downtime_ms".into(), json!(v));
            }
            if let Some(v) = timeout_s {
                b.insert("timeout_s".into(), json!(v));
            }
            if let Some(v) = timeout_strategy {
                b.insert("timeout_strategy".into(), json!(v));
            }
            if let Some(v) = connections {
                b.insert("connections".into(), json!(v));
            }
            if let Some(v) = memory_mode {
                b.insert("memory_mode".into(), json!(v));
            }
            if let Some(n) = postcopy_after_passes {
                b.insert("postcopy_after_passes".into(), json!(n));
            }
            if *resume {
                b.insert("resume".into(), json!(true));
            }
            if *local {
                b.insert("local".into(), json!(true));
            }
            if *no_auto_converge {
                b.insert("auto_converge".into(), json!(false));
            }
            if *no_yield_vcpus {
                b.insert("yield_vcpus".into(), json!(false));
            }
            if let Some(v) = switch_over {
                b.insert("switch_over".into(), json!(v));
            }
            if let Some(d) = tls_dir {
                b.insert("tls_dir".into(), json!(absolute("--tls-dir", d)?));
            }
            let body = serde_json::to_vec(&Value::Object(b)).map_err(|e| e.to_string())?;
            ("PUT", "vm.send-migration", Some(body))
        }
        Command::ReceiveMigration {
            receiver_url,
            tls_dir,
        } => {
            let mut b = Map::new();
            b.insert("receiver_url".into(), json!(receiver_url));
            if let Some(d) = tls_dir {
                b.insert("tls_dir".into(), json!(absolute("--tls-dir", d)?));
            }
            let body = serde_json::to_vec(&Value::Object(b)).map_err(|e| e.to_string())?;
            ("PUT", "vm.receive-migration", Some(body))
        }
        Command::MigrationInfo => ("GET", "vm.migration-info", None),
        Command::CancelMigration => ("PUT", "vm.cancel-migration", None),
        Command::StartPostcopy => ("PUT", "vm.migrate-start-postcopy", None),
        Command::Coredump { destination_url } => {
            let body = serde_json::to_vec(&json!({ "destination_url": destination_url }))
                .map_err(|e| e.to_string())?;
            ("PUT", "vm.coredump", Some(body))
        }
        Command::Snapshot { destination_url } => {
            let body = serde_json::to_vec(&json!({ "destination_url": destination_url }))
                .map_err(|e| e.to_string())?;
            ("PUT", "vm.snapshot", Some(body))
        }
        Command::Restore { source_url, resume } => {
            let body = serde_json::to_vec(&json!({ "source_url": source_url, "resume": resume }))
                .map_err(|e| e.to_string())?;
            ("PUT", "vm.restore", Some(body))
        }
    })
}

/// Formats a byte count with a binary unit.
fn bytes(n: f64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", units[u])
}

/// One progress line from a `vm.migration-info` answer; None when it has nothing known.
///
/// Reads QEMU's `query-migrate` names: `status`, `ram.dirty-sync-count` (the iteration),
/// `ram.transferred`, `ram.remaining` and `ram.mbps`.
fn progress_line(info: &Value) -> Option<String> {
    let ram = |k: &str| {
        info.get("ram")
            .and_then(|r| r.get(k))
            .and_then(Value::as_f64)
    };
    let mut parts = Vec::new();
    if let Some(s) = info.get("status").and_then(Value::as_str) {
        parts.push(s.to_string());
    }
    if let Some(i) = ram("dirty-sync-count") {
        parts.push(format!("iteration {i}"));
    }
    if let Some(t) = ram("transferred") {
        parts.push(format!("sent {}", bytes(t)));
    }
    if let Some(r) = ram("remaining") {
        parts.push(format!("remaining {}", bytes(r)));
    }
    if let Some(r) = ram("mbps") {
        parts.push(format!("{r:.0} Mbit/s"));
    }
    (!parts.is_empty()).then(|| parts.join(", "))
}

/// How often a waiting `send-migration` reads `vm.migration-info`.
const POLL: Duration = Duration::from_millis(200);
/// Without a terminal, a progress line at most this often (and on each status change).
const LINE_EVERY: Duration = Duration::from_secs(1);

/// Follows the migration `send-migration` started through `vm.migration-info` until it
/// ends, showing progress on stderr (rewriting one line on a terminal): success once it
/// completed, else the error to report.
fn follow_migration(client: &Client) -> Result<(), String> {
    let tty = std::io::stderr().is_terminal();
    let mut shown: Option<(String, Instant)> = None;
    let mut last_status = String::new();
    let result = loop {
        let info = match client.get("vm.migration-info") {
            Ok(r) if r.is_success() => r.json().map_err(|e| format!("vm.migration-info: {e}")),
            Ok(r) => Err(format!(
                "vm.migration-info: {} (HTTP {})",
                r.error_message(),
                r.status
            )),
            // The source ends only some time after reporting a completion (read below).
            Err(e) => Err(format!(
                "the source ferry stopped answering before the migration ended: {}",
                vmm::api::describe(&e)
            )),
        };
        let info = match info {
            Ok(i) => i,
            Err(e) => break Err(e),
        };
        let status = info["status"].as_str().unwrap_or_default().to_string();
        if let s @ ("failed" | "cancelled") = status.as_str() {
            let why = info["error-desc"].as_str().unwrap_or("no reason given");
            break Err(format!("migration {s}: {why}"));
        }
        if let Some(line) = progress_line(&info) {
            let due = match &shown {
                None => true,
                Some((_, at)) => tty || status != last_status || at.elapsed() >= LINE_EVERY,
            };
            if due && shown.as_ref().map(|(l, _)| l) != Some(&line) {
                let mut e = std::io::stderr().lock();
                let _ = if tty {
                    write!(e, "\r\x1b[2K{line}")
                } else {
                    writeln!(e, "{line}")
                };
                let _ = e.flush();
                shown = Some((line, Instant::now()));
            }
        }
        if status == "completed" {
            break Ok(());
        }
        last_status = status;
        std::thread::sleep(POLL);
    };
    if tty && shown.is_some() {
        eprintln!();
    }
    result
}

fn print_reply(reply: &Reply) {
    if reply.body.is_empty() {
        return;
    }
    match reply.json() {
        Ok(v) => println!(
            "{}",
            serde_json::to_string_pretty(&v).unwrap_or_else(|_| v.to_string())
        ),
        Err(_) => println!("{}", String::from_utf8_lossy(&reply.body)),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (method, endpoint, body) = match request_of(&cli.command) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ferry-remote: error: {e}");
            return ExitCode::from(1);
        }
    };
    let client = Client::new(
        &cli.api_socket,
        cli.request_timeout_s.map(Duration::from_secs),
    );
    let follow = matches!(cli.command, Command::SendMigration { no_wait: false, .. });
    match client.request(method, endpoint, body.as_deref()) {
        Ok(reply) if reply.is_success() => {
            print_reply(&reply);
            if !follow {
                return ExitCode::SUCCESS;
            }
            let poller = Client::new(&cli.api_socket, Some(Duration::from_secs(10)));
            match follow_migration(&poller) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("ferry-remote: error: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Ok(reply) => {
            eprintln!(
                "ferry-remote: error: {} (HTTP {})",
                reply.error_message(),
                reply.status
            );
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("ferry-remote: error: {}", vmm::api::describe(&e));
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body_of(args: &[&str]) -> Value {
        let mut all = vec!["ferry-remote", "--api-socket", "/s"];
        all.extend(args);
        let cli = Cli::try_parse_from(all).unwrap();
        let (_, _, body) = request_of(&cli.command).unwrap();
        serde_json::from_slice(&body.unwrap()).unwrap()
    }

    #[test]
    fn send_migration_sends_only_what_was_given() {
        assert_eq!(
            body_of(&["send-migration", "tcp:h:1"]),
            json!({"destination_url": "tcp:h:1"})
        );
        assert_eq!(
            body_of(&[
                "send-migration",
                "unix:/m",
                "--downtime-ms",
                "50",
                "--timeout-s",
                "9",
                "--connections",
                "1",
                "--timeout-strategy",
                "Ignore",
                "--memory-mode",
                "MemFDs",
                "--local",
                "--no-auto-converge",
                "--no-yield-vcpus",
            ]),
            json!({"destination_url": "unix:/m", "downtime_ms": 50, "timeout_s": 9,
                   "connections": 1, "timeout_strategy": "Ignore", "memory_mode": "MemFDs",
                   "local": true, "auto_converge": false, "yield_vcpus": false})
        );
        assert_eq!(
            body_of(&["receive-migration", "tcp:0.0.0.0:6000"]),
            json!({"receiver_url": "tcp:0.0.0.0:6000"})
        );
        assert_eq!(
            body_of(&["send-migration", "tcp:h:1", "--tls-dir", "/etc/ferry/tls"]),
            json!({"destination_url": "tcp:h:1", "tls_dir": "/etc/ferry/tls"})
        );
        assert_eq!(
            body_of(&["receive-migration", "tcp:0.0.0.0:6000", "--tls-dir", "/t"]),
            json!({"receiver_url": "tcp:0.0.0.0:6000", "tls_dir": "/t"})
        );
        // Waiting is ferry-remote's business: the request is the same.
        assert_eq!(
            body_of(&["send-migration", "tcp:h:1", "--no-wait"]),
            json!({"destination_url": "tcp:h:1"})
        );
        // A relative directory is the caller's, made absolute for ferry.
        let rel = body_of(&["send-migration", "tcp:h:1", "--tls-dir", "tls"]);
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(rel["tls_dir"], json!(cwd.join("tls").to_str().unwrap()));
        assert_eq!(
            body_of(&["coredump", "file:///tmp/vm.core"]),
            json!({"destination_url": "file:///tmp/vm.core"})
        );
        assert_eq!(
            body_of(&["add-disk", "/d.raw", "--id", "data", "--readonly"]),
            json!({"path": "/d.raw", "id": "data", "readonly": true})
        );
        assert_eq!(
            body_of(&["resize", "--vcpus", "2"]),
            json!({"desired_vcpus": 2, "desired_ram": null})
        );
        assert_eq!(body_of(&["remove-device", "data"]), json!({"id": "data"}));
        assert_eq!(
            body_of(&["snapshot", "file:///tmp/snap"]),
            json!({"destination_url": "file:///tmp/snap"})
        );
        assert_eq!(
            body_of(&["restore", "file:///tmp/snap", "--resume"]),
            json!({"source_url": "file:///tmp/snap", "resume": true})
        );
        assert!(Cli::try_parse_from(["ferry-remote", "ping"]).is_err());
        assert!(
            Cli::try_parse_from(["ferry-remote", "--api-socket", "/s", "send-migration"]).is_err()
        );
    }

    #[test]
    fn progress_lines() {
        let line = progress_line(&json!({"status": "active", "ram": {"dirty-sync-count": 3,
            "transferred": 3u64 << 30, "remaining": 1536, "mbps": 10240.4}}))
        .unwrap();
        assert_eq!(
            line,
            "active, iteration 3, sent 3.0 GiB, remaining 1.5 KiB, 10240 Mbit/s"
        );
        assert_eq!(progress_line(&json!({"unrelated": 1})), None);
    }
}
