//! `ferry`: boot a VM from the command line (cloud-hypervisor's flag style), and/or serve
//! the REST API on `--api-socket PATH` and/or QEMU's QMP on `--qmp unix:PATH` (both act
//! on the same VM; "the API" below is either).
//!
//! Without the API the process lives as long as the guest and exits with its status
//! (debug-exit value, 0 for power-off/reset, 1 on failure). With the API, `--kernel` is
//! optional (the VM then comes from `vm.create` + `vm.boot`, or `vm.receive-migration`), a
//! guest that powers off, resets or fails leaves the VM in state Shutdown, and the process
//! ends on `vmm.shutdown` (status 0) or on a guest debug-exit (its status).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use vmm::api::{describe, ApiServer, Vmm};
use vmm::config::{self, PayloadConfig, VmConfig};
use vmm::events;
use vmm::vm::{exit_status, Machine};

/// How long the end of the process waits for the event monitor to write what is queued.
const EVENT_FLUSH_LIMIT: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Parser, Debug)]
#[command(
    name = "ferry",
    version,
    about = "Ferry: a KVM VMM built for live migration"
)]
struct Cli {
    /// Kernel: a PVH ELF or a Linux bzImage.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long)]
    cmdline: Option<String>,
    /// Initramfs image.
    #[arg(long)]
    initramfs: Option<PathBuf>,
    /// vCPUs: boot=N[,max=M].
    #[arg(long, default_value = "boot=1")]
    cpus: String,
    /// Memory: size=SIZE[,shared=on|off][,hugepages=on|off]; SIZE like 512M, 4G.
    #[arg(long, default_value = "size=512M")]
    memory: String,
    /// Serial (COM1) output: tty, off, null or file=PATH.
    #[arg(long, default_value = "null")]
    serial: String,
    /// Dirty tracking: entries=N (ring of N entries per vCPU) or off (bitmap).
    #[arg(long = "dirty-ring", default_value = "entries=65536")]
    dirty_ring: String,
    /// A virtio-blk disk: path=FILE[,readonly=on|off][,id=NAME][,iommu=on|off]; repeat
    /// for more disks. iommu=on puts the disk's DMA behind the virtio-iommu.
    #[arg(
        long,
        value_name = "path=FILE[,readonly=on|off][,id=NAME][,iommu=on|off]",
        action = clap::ArgAction::Append
    )]
    disk: Vec<String>,
    /// A virtio-rng device reading src=PATH (without a value: src=/dev/urandom);
    /// iommu=on puts its DMA behind the virtio-iommu.
    #[arg(
        long,
        value_name = "src=PATH[,iommu=on|off]",
        num_args = 0..=1,
        default_missing_value = "src=/dev/urandom"
    )]
    rng: Option<String>,
    /// A vfio-user device served on the UNIX socket socket=PATH; repeat for more.
    /// iommu=on puts its DMA behind the virtio-iommu. Guest RAM is then shared memory.
    #[arg(
        long = "user-device",
        value_name = "socket=PATH[,id=NAME][,iommu=on|off]",
        action = clap::ArgAction::Append
    )]
    user_device: Vec<String>,
    /// A host PCI device passed through with VFIO, named by its sysfs directory
    /// (path=/sys/bus/pci/devices/0000:01:00.0) and bound to vfio-pci; repeat for more.
    /// iommu=on puts its DMA behind the virtio-iommu.
    #[arg(
        long,
        value_name = "path=SYSFS_PATH[,iommu=on|off][,id=NAME]",
        action = clap::ArgAction::Append
    )]
    device: Vec<String>,
    /// cloud-hypervisor's virtio-console option: Ferry has no virtio-console, so off and
    /// null are taken, tty (cloud-hypervisor's default) with a warning, the others
    /// refused. The guest's console is --serial.
    #[arg(long, value_name = "off|null|tty|pty|file=PATH|socket=PATH")]
    console: Option<String>,
    /// REST API socket (HTTP on a UNIX socket).
    #[arg(long = "api-socket")]
    api_socket: Option<PathBuf>,
    /// QEMU's monitor protocol (QMP) on a UNIX socket, for QEMU's migration tools.
    #[arg(long, value_name = "unix:PATH")]
    qmp: Option<String>,
    /// System call filters per thread: true (a call outside its thread's filter ends the
    /// process, naming thread and call), log (the kernel logs it, the call goes through)
    /// or false (no filters).
    #[arg(long, default_value = "true", value_name = "true|false|log")]
    seccomp: String,
    /// cloud-hypervisor's event monitor: lifecycle events (boot, pause, migration...) as
    /// JSON objects to a file (created or appended to) or an inherited descriptor.
    #[arg(long = "event-monitor", value_name = "path=FILE|fd=N")]
    event_monitor: Option<String>,
    /// Restore the VM saved by vm.snapshot in a directory (cloud-hypervisor's option);
    /// it stays paused until vm.resume unless resume=true. Needs --api-socket or --qmp;
    /// not with --kernel (the snapshot has the configuration).
    #[arg(
        long,
        value_name = "source_url=file:///DIR[,resume=true|false][,prefault=on|off]"
    )]
    restore: Option<String>,
    /// Write the log to this file (created or appended to) instead of standard error.
    #[arg(long = "log-file", value_name = "FILE")]
    log_file: Option<PathBuf>,
    /// More log detail: -v debug, -vv trace (default info; RUST_LOG, when set, decides).
    #[arg(short = 'v', action = clap::ArgAction::Count)]
    verbose: u8,
}

fn config_from(cli: &Cli) -> Result<VmConfig, config::ConfigError> {
    Ok(VmConfig {
        cpus: config::parse_cpus(&cli.cpus)?,
        memory: config::parse_memory(&cli.memory)?,
        payload: PayloadConfig {
            kernel: cli.kernel.clone(),
            cmdline: cli.cmdline.clone(),
            initramfs: cli.initramfs.clone(),
            ..Default::default()
        },
        serial: config::parse_serial(&cli.serial)?,
        iommu: false,
        dirty_tracking: config::parse_dirty_ring(&cli.dirty_ring)?,
        disks: cli
            .disk
            .iter()
            .map(|d| config::parse_disk(d))
            .collect::<Result<_, _>>()?,
        rng: cli.rng.as_deref().map(config::parse_rng).transpose()?,
        user_devices: cli
            .user_device
            .iter()
            .map(|u| config::parse_user_device(u))
            .collect::<Result<_, _>>()?,
        devices: cli
            .device
            .iter()
            .map(|d| config::parse_device(d))
            .collect::<Result<_, _>>()?,
        ch: config::VmCompat {
            console: cli
                .console
                .as_deref()
                .map(config::parse_console)
                .transpose()?,
            ..Default::default()
        },
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let mut logger =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level));
    logger
        .format_target(false)
        // Microseconds: a migration's pause and resume, logged by two processes on one
        // host, can then be set against each other.
        .format_timestamp_micros();
    if let Some(path) = &cli.log_file {
        match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            Ok(f) => {
                logger.target(env_logger::Target::Pipe(Box::new(f)));
            }
            Err(e) => {
                eprintln!("ferry: error: --log-file {}: {e}", path.display());
                return ExitCode::from(2);
            }
        }
    }
    logger.init();
    // Before any other thread exists: every thread inherits the VMM filter.
    if let Err(e) = cli.seccomp.parse().and_then(ferry_seccomp::init) {
        eprintln!("ferry: error: {e}");
        return ExitCode::from(2);
    }
    // After the filter: the writer thread inherits it.
    if let Some(target) = &cli.event_monitor {
        if let Err(e) = events::open_target(target).and_then(events::start) {
            eprintln!("ferry: error: {e}");
            return ExitCode::from(2);
        }
    }
    events::emit("vmm", "starting", &[]);
    let config = match config_from(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ferry: error: {e}");
            return ExitCode::from(2);
        }
    };
    let qmp = match cli.qmp.as_deref().map(vmm::qmp::parse_option).transpose() {
        Ok(q) => q,
        Err(e) => {
            eprintln!("ferry: error: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(opt) = &cli.restore {
        let req = match vmm::api::snapshot::parse_restore_option(opt) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("ferry: error: {e}");
                return ExitCode::from(2);
            }
        };
        if cli.kernel.is_some() {
            eprintln!("ferry: error: --restore takes the VM's configuration from the snapshot: drop --kernel");
            return ExitCode::from(2);
        }
        if cli.api_socket.is_none() && qmp.is_none() {
            eprintln!("ferry: error: --restore needs --api-socket or --qmp (to resume, watch or stop the VM)");
            return ExitCode::from(2);
        }
        return serve_api(
            cli.api_socket.as_deref(),
            qmp.as_deref(),
            Start::Restore(req),
        );
    }
    if cli.api_socket.is_some() || qmp.is_some() {
        let start = match cli.kernel.is_some() {
            true => Start::Boot(Box::new(config)),
            false => Start::Empty,
        };
        return serve_api(cli.api_socket.as_deref(), qmp.as_deref(), start);
    }
    let machine = match Machine::boot(config) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("ferry: error: {}", describe(&e));
            return ExitCode::from(1);
        }
    };
    let ev = machine.wait_event(None);
    let status = ev.as_ref().map_or(1, exit_status);
    match &ev {
        Some(vmm::vcpu::VmEvent::Failed(why)) => eprintln!("ferry: error: {why}"),
        Some(e) => log::info!("guest ended: {e:?}, exit status {status}"),
        None => eprintln!("ferry: error: all vCPU threads ended"),
    }
    // Flush serial output the guest wrote before its exit, and the last events.
    use std::io::Write;
    let _ = std::io::stdout().flush();
    events::emit("vm", "shutdown", &[]);
    events::flush(EVENT_FLUSH_LIMIT);
    // vCPU threads may sit in KVM_RUN; exiting the process ends them.
    std::process::exit(status);
}

/// What `serve_api` has before it serves.
enum Start {
    /// No VM (vm.create, vm.restore or a migration brings one).
    Empty,
    /// The command line's VM, booted.
    Boot(Box<VmConfig>),
    /// The VM of a snapshot (`--restore`).
    Restore(vmm::api::snapshot::Restore),
}

/// Serves the API on `path` and/or QMP on `qmp`, with the VM `start` says first.
/// Returns only when the VM or a socket cannot be set up; otherwise ends the process when
/// `Vmm::run` says so.
fn serve_api(
    path: Option<&std::path::Path>,
    qmp: Option<&std::path::Path>,
    start: Start,
) -> ExitCode {
    let vmm = Vmm::new(Box::new(vmm::migration::LiveMigration::default()));
    let ready = match start {
        Start::Empty => Ok(()),
        Start::Boot(mut config) => config
            .validate()
            .map_err(|e| e.to_string())
            .and_then(|()| vmm.create(*config).map_err(|e| e.to_string()))
            .and_then(|()| vmm.boot().map_err(|e| e.to_string())),
        Start::Restore(req) => vmm::api::snapshot::install_restored(&vmm, &req),
    };
    if let Err(e) = ready {
        eprintln!("ferry: error: {e}");
        return ExitCode::from(1);
    }
    let server = match path.map(|p| ApiServer::start(p, vmm.clone())).transpose() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ferry: error: {}", describe(&e));
            return ExitCode::from(1);
        }
    };
    let qmp_server = match qmp
        .map(|p| vmm::qmp::QmpServer::start(p, vmm.clone()))
        .transpose()
    {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ferry: error: {}", describe(&e));
            return ExitCode::from(1);
        }
    };
    let status = vmm.run();
    drop(server);
    drop(qmp_server);
    use std::io::Write;
    let _ = std::io::stdout().flush();
    events::flush(EVENT_FLUSH_LIMIT);
    // vCPU threads may sit in KVM_RUN; exiting the process ends them.
    std::process::exit(status);
}
