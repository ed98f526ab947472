//! `vm.snapshot` and `vm.restore` (cloud-hypervisor's bodies), over [`crate::snapshot`].

use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;

use super::migration::{log_unknown, UnknownFields};
use super::{begin_on_paused, begin_without_vm, json_body, ApiError, Vmm};
use crate::events;
use crate::migration::{MachineDestination, MachineSource};
use crate::snapshot;
use crate::vm::Machine;

/// cloud-hypervisor's `VmSnapshotConfig`.
#[derive(Debug, Deserialize)]
struct SnapshotBody {
    destination_url: String,
    #[serde(flatten)]
    unknown: UnknownFields,
}

/// cloud-hypervisor's `MemoryRestoreMode`.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
pub enum MemoryRestoreMode {
    #[default]
    Copy,
    OnDemand,
}

/// cloud-hypervisor's `RestoreConfig`, as its `ch-remote restore` sends it.
#[derive(Debug, Deserialize)]
struct RestoreBody {
    source_url: String,
    #[serde(default)]
    prefault: bool,
    #[serde(default)]
    memory_restore_mode: MemoryRestoreMode,
    #[serde(default)]
    net_fds: Option<Vec<serde_json::Value>>,
    #[serde(default)]
    vfio_fds: Option<Vec<serde_json::Value>>,
    #[serde(default)]
    iommufd_fd: Option<i64>,
    #[serde(default)]
    resume: bool,
    #[serde(default)]
    zone_updates: Option<Vec<serde_json::Value>>,
    #[serde(flatten)]
    unknown: UnknownFields,
}

/// A checked `vm.restore` request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Restore {
    pub dir: PathBuf,
    /// Run the VM at once (otherwise it is Paused until `vm.resume`).
    pub resume: bool,
}

fn bad(action: &str, e: impl std::fmt::Display) -> ApiError {
    ApiError::BadRequest(format!("{action}: {e}"))
}

/// Parses a `vm.snapshot` body: the directory its `file://` URL names.
pub fn parse_snapshot(body: &[u8]) -> Result<PathBuf, ApiError> {
    const ACTION: &str = "vm.snapshot";
    let b: SnapshotBody = json_body(ACTION, body)?;
    log_unknown(ACTION, &b.unknown);
    snapshot::dir_from_url(&b.destination_url).map_err(|e| bad(ACTION, e))
}

/// Parses a `vm.restore` body. What Ferry cannot do is refused naming field and value.
pub fn parse_restore(body: &[u8]) -> Result<Restore, ApiError> {
    const ACTION: &str = "vm.restore";
    let b: RestoreBody = json_body(ACTION, body)?;
    log_unknown(ACTION, &b.unknown);
    if b.memory_restore_mode == MemoryRestoreMode::OnDemand {
        return Err(bad(
            ACTION,
            "memory_restore_mode OnDemand is not supported (Copy is: every page is read and \
             checked before the VM may run)",
        ));
    }
    if let Some(n) = b.net_fds.as_ref().filter(|n| !n.is_empty()) {
        return Err(bad(
            ACTION,
            format!("net_fds ({} given): Ferry has no network devices", n.len()),
        ));
    }
    if let Some(v) = b.vfio_fds.as_ref().filter(|v| !v.is_empty()) {
        return Err(bad(
            ACTION,
            format!(
                "vfio_fds ({} given): Ferry opens VFIO devices from the configuration",
                v.len()
            ),
        ));
    }
    if let Some(fd) = b.iommufd_fd {
        return Err(bad(
            ACTION,
            format!("iommufd_fd {fd}: Ferry takes no iommufd descriptor"),
        ));
    }
    if let Some(z) = b.zone_updates.as_ref().filter(|z| !z.is_empty()) {
        return Err(bad(
            ACTION,
            format!(
                "zone_updates ({} given): Ferry has no memory zones",
                z.len()
            ),
        ));
    }
    if b.prefault {
        // Every page the snapshot holds is written before the VM runs: that is a prefault.
        log::info!("{ACTION}: prefault asked; Copy writes every saved page before the VM runs");
    }
    let dir = snapshot::dir_from_url(&b.source_url).map_err(|e| bad(ACTION, e))?;
    Ok(Restore {
        dir,
        resume: b.resume,
    })
}

/// `vm.snapshot`: the paused VM's configuration, state and RAM into a directory. The VM
/// stays paused; lifecycle requests answer 405 while the files are written.
pub fn snapshot(vmm: &Arc<Vmm>, body: &[u8]) -> Result<(), ApiError> {
    const ACTION: &str = "vm.snapshot";
    let dir = parse_snapshot(body)?;
    let _op = begin_on_paused(vmm, ACTION)?;
    let machine = vmm.machine(ACTION)?;
    let url = format!("file://{}", dir.display());
    events::emit("vm", "snapshotting", &[("destination_url", &url)]);
    let saved =
        snapshot::save(&MachineSource::new(machine).with_json_state(), &dir).map_err(|e| {
            ApiError::Failed {
                action: ACTION,
                reason: e.to_string(),
            }
        })?;
    log::info!(
        "{ACTION}: {} MiB of RAM, {} pages of data, in {}",
        saved.ram_bytes >> 20,
        saved.data_pages,
        dir.display()
    );
    events::emit("vm", "snapshotted", &[("destination_url", &url)]);
    Ok(())
}

/// Builds the machine saved in `req.dir`: running, or paused unless `req.resume`.
pub fn restore_machine(req: &Restore) -> Result<Machine, String> {
    let mut dest = MachineDestination::default();
    dest.start_paused = !req.resume;
    snapshot::restore(&mut dest, &req.dir).map_err(|e| e.to_string())?;
    vm_migration::DestinationVm::resume(&mut dest)?;
    dest.take_started()
}

/// `vm.restore`: a VM from a snapshot directory, where no VM exists yet.
pub fn restore(vmm: &Arc<Vmm>, body: &[u8]) -> Result<(), ApiError> {
    const ACTION: &str = "vm.restore";
    let req = parse_restore(body)?;
    let _op = begin_without_vm(vmm, ACTION)?;
    install_restored(vmm, &req).map_err(|reason| ApiError::Failed {
        action: ACTION,
        reason,
    })
}

/// Restores `req` and makes it the VMM's VM (for `vm.restore` and `--restore`).
pub fn install_restored(vmm: &Vmm, req: &Restore) -> Result<(), String> {
    let url = format!("file://{}", req.dir.display());
    events::emit("vm", "restoring", &[("source_url", &url)]);
    let machine = restore_machine(req)?;
    log::info!(
        "restored the VM from {}; it is {}",
        req.dir.display(),
        if req.resume {
            "running"
        } else {
            "paused (vm.resume runs it)"
        }
    );
    vmm.install(machine.config.clone(), Arc::new(machine));
    events::emit("vm", "restored", &[("source_url", &url)]);
    Ok(())
}

/// `--restore source_url=file:///DIR[,resume=true|false][,prefault=on|off]
/// [,memory_restore_mode=copy]` (cloud-hypervisor's option), checked as `vm.restore`'s
/// body is.
pub fn parse_restore_option(s: &str) -> Result<Restore, String> {
    const ACCEPTED: &str = "source_url, resume, prefault, memory_restore_mode";
    let toggle = |k: &str, v: &str| match v {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err(format!(
            "--restore {k}={v:?}: expected on, off, true or false"
        )),
    };
    let mut body = serde_json::Map::new();
    for p in s.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = p.split_once('=').unwrap_or((p, ""));
        let value = match k {
            "source_url" => serde_json::Value::from(v),
            "resume" | "prefault" => serde_json::Value::from(toggle(k, v)?),
            "memory_restore_mode" => match v.to_ascii_lowercase().as_str() {
                "copy" => "Copy".into(),
                "ondemand" => "OnDemand".into(),
                _ => {
                    return Err(format!(
                        "--restore memory_restore_mode={v:?}: expected copy or ondemand"
                    ))
                }
            },
            _ => {
                return Err(format!(
                    "--restore: unknown parameter {k:?} (accepted: {ACCEPTED})"
                ))
            }
        };
        body.insert(k.to_string(), value);
    }
    if !body.contains_key("source_url") {
        return Err("--restore needs source_url=file:///path/to/snapshot".into());
    }
    let bytes = serde_json::to_vec(&body).map_err(|e| e.to_string())?;
    parse_restore(&bytes).map_err(|e| format!("--restore: {e}"))
}
