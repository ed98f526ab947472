//! `vm.add-disk`, `vm.add-device`, `vm.add-user-device`, `vm.remove-device` and
//! `vm.resize` (cloud-hypervisor's bodies) on a VM that is not running (created and not
//! yet booted, or shut down): they change its configuration, as cloud-hypervisor does
//! then, and the next `vm.boot` builds the VM with it. Ferry has no PCI, vCPU or memory
//! hotplug: on a running or paused VM they answer 405 saying so, except a `vm.resize` to
//! the sizes the VM already has, which changes nothing.

use std::sync::Arc;

use serde::Deserialize;

use super::{json_object, ApiError, VmState, Vmm};
use crate::config::{DeviceConfig, DiskConfig, UserDeviceConfig, VmConfig};

const NO_HOTPLUG: &str =
    "Ferry has no PCI hotplug: add or remove devices before vm.boot (or after vm.shutdown)";
const NO_RESIZE: &str =
    "Ferry has no vCPU or memory hotplug: resize before vm.boot (or after vm.shutdown)";

fn body<T: serde::de::DeserializeOwned>(action: &str, body: &[u8]) -> Result<T, ApiError> {
    json_object(body).map_err(|e| ApiError::BadRequest(format!("{action}: invalid JSON body: {e}")))
}

/// `vm.add-disk`: a virtio-blk disk (cloud-hypervisor's `DiskConfig`).
pub fn add_disk(vmm: &Arc<Vmm>, b: &[u8]) -> Result<(), ApiError> {
    const ACTION: &str = "vm.add-disk";
    let disk: DiskConfig = body(ACTION, b)?;
    vmm.edit_config(ACTION, NO_HOTPLUG, |c| {
        c.disks.push(disk);
        Ok(())
    })
}

/// `vm.add-device`: a VFIO device (cloud-hypervisor's `DeviceConfig`).
pub fn add_device(vmm: &Arc<Vmm>, b: &[u8]) -> Result<(), ApiError> {
    const ACTION: &str = "vm.add-device";
    let dev: DeviceConfig = body(ACTION, b)?;
    vmm.edit_config(ACTION, NO_HOTPLUG, |c| {
        c.devices.push(dev);
        Ok(())
    })
}

/// `vm.add-user-device`: a vfio-user device (cloud-hypervisor's `VmAddUserDevice`).
pub fn add_user_device(vmm: &Arc<Vmm>, b: &[u8]) -> Result<(), ApiError> {
    const ACTION: &str = "vm.add-user-device";
    let dev: UserDeviceConfig = body(ACTION, b)?;
    vmm.edit_config(ACTION, NO_HOTPLUG, |c| {
        c.user_devices.push(dev);
        Ok(())
    })
}

#[derive(Debug, Deserialize)]
struct RemoveDevice {
    id: String,
}

/// Every device of `c` with the id it has in logs and migrations (its own, or the
/// default `diskN`, `userN`, `vfioN`, `rng`), and how to take it out.
fn remove_by_id(c: &mut VmConfig, id: &str) -> Result<(), Vec<String>> {
    let disk = |i: usize, d: &DiskConfig| d.id.clone().unwrap_or_else(|| format!("disk{i}"));
    let user = |i: usize, u: &UserDeviceConfig| u.id.clone().unwrap_or_else(|| format!("user{i}"));
    let vfio = |i: usize, d: &DeviceConfig| d.id.clone().unwrap_or_else(|| format!("vfio{i}"));
    if let Some(i) = c
        .disks
        .iter()
        .enumerate()
        .position(|(i, d)| disk(i, d) == id)
    {
        c.disks.remove(i);
        return Ok(());
    }
    if let Some(i) = c
        .user_devices
        .iter()
        .enumerate()
        .position(|(i, u)| user(i, u) == id)
    {
        c.user_devices.remove(i);
        return Ok(());
    }
    if let Some(i) = c
        .devices
        .iter()
        .enumerate()
        .position(|(i, d)| vfio(i, d) == id)
    {
        c.devices.remove(i);
        return Ok(());
    }
    if id == "rng" && c.rng.is_some() {
        c.rng = None;
        return Ok(());
    }
    let mut ids: Vec<String> = c
        .disks
        .iter()
        .enumerate()
        .map(|(i, d)| disk(i, d))
        .collect();
    ids.extend(c.user_devices.iter().enumerate().map(|(i, u)| user(i, u)));
    ids.extend(c.devices.iter().enumerate().map(|(i, d)| vfio(i, d)));
    if c.rng.is_some() {
        ids.push("rng".into());
    }
    Err(ids)
}

/// `vm.remove-device`: the device with that id.
pub fn remove_device(vmm: &Arc<Vmm>, b: &[u8]) -> Result<(), ApiError> {
    const ACTION: &str = "vm.remove-device";
    let r: RemoveDevice = body(ACTION, b)?;
    vmm.edit_config(ACTION, NO_HOTPLUG, |c| {
        remove_by_id(c, &r.id).map_err(|ids| {
            ApiError::NotFound(format!(
                "{ACTION}: no device with id {:?} (the VM's devices: {ids:?})",
                r.id
            ))
        })
    })
}

/// cloud-hypervisor's `VmResize`.
#[derive(Debug, Deserialize)]
struct Resize {
    #[serde(default)]
    desired_vcpus: Option<u32>,
    #[serde(default)]
    desired_ram: Option<u64>,
    #[serde(default)]
    desired_balloon: Option<u64>,
}

/// `vm.resize`: the vCPU count and RAM size of a VM not running; on a running one only
/// the sizes it has.
pub fn resize(vmm: &Arc<Vmm>, b: &[u8]) -> Result<(), ApiError> {
    const ACTION: &str = "vm.resize";
    let r: Resize = body(ACTION, b)?;
    if let Some(n) = r.desired_balloon.filter(|&n| n != 0) {
        return Err(ApiError::BadRequest(format!(
            "{ACTION}: desired_balloon {n}: Ferry has no balloon device"
        )));
    }
    if r.desired_vcpus == Some(0) {
        return Err(ApiError::BadRequest(format!(
            "{ACTION}: desired_vcpus 0: a VM needs at least one vCPU"
        )));
    }
    let apply = |c: &mut VmConfig| -> Result<(), ApiError> {
        if let Some(n) = r.desired_vcpus {
            if n > c.cpus.max_vcpus {
                return Err(ApiError::BadRequest(format!(
                    "{ACTION}: desired_vcpus {n} is over the VM's max_vcpus {}",
                    c.cpus.max_vcpus
                )));
            }
            c.cpus.boot_vcpus = n;
        }
        if let Some(bytes) = r.desired_ram {
            c.memory.size = bytes;
        }
        Ok(())
    };
    // A running VM may be "resized" to what it is (a client that sets both values).
    let unchanged = vmm.with_vm(|vm| {
        vm.filter(|v| matches!(v.state(), VmState::Running | VmState::Paused))
            .is_some_and(|v| {
                let mut c = v.config.clone();
                apply(&mut c).is_ok() && c == v.config
            })
    });
    if unchanged {
        return Ok(());
    }
    vmm.edit_config(ACTION, NO_RESIZE, apply)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_are_found_by_their_own_or_default_ids() {
        let mut c: VmConfig = serde_json::from_str(
            r#"{"payload":{},"disks":[{"path":"/a"},{"path":"/b","id":"data"}],
                "devices":[{"path":"/sys/x"}],"user_devices":[{"socket":"/s","id":"u"}],
                "rng":{"src":"/dev/urandom"}}"#,
        )
        .unwrap();
        assert_eq!(
            remove_by_id(&mut c, "nope").unwrap_err(),
            ["disk0", "data", "u", "vfio0", "rng"]
        );
        remove_by_id(&mut c, "data").unwrap();
        remove_by_id(&mut c, "disk0").unwrap();
        remove_by_id(&mut c, "vfio0").unwrap();
        remove_by_id(&mut c, "u").unwrap();
        remove_by_id(&mut c, "rng").unwrap();
        assert!(c.disks.is_empty() && c.devices.is_empty() && c.user_devices.is_empty());
        assert!(c.rng.is_none());
    }
}
