//! `vm.add-disk`, `vm.add-device`, `vm.add-user-device`, `vm.remove-device` and
//! `vm.resize` (cloud-hypervisor's bodies) on a VM that is not running (created and not
//! yet booted, or shut down): they change its configuration, as cloud-hypervisor does
//! then, and the next `vm.boot` builds the VM with it. Ferry has no PCI, vCPU or memory
//! hotplug: on a running or paused VM they answer 405 saying so, except a `vm.resize` to
//! the sizes the VM already has, which changes nothing.

use std::sync::Arc;

use serde::Deserialize;

use super::{json_body, ApiError, VmState, Vmm};
use crate::config::{DeviceConfig, DiskConfig, UserDeviceConfig, VmConfig};

const NO_HOTPLUG: &str =
    "Ferry has no PCI hotplug: add or remove devices before vm.boot (or after vm.shutdown)";
const NO_RESIZE: &str =
    "Ferry has no vCPU or memory hotplug: resize before vm.boot (or after vm.shutdown)";

/// Adds the device in body `b` (a `T`) to the list `list` picks from the configuration.
fn add<T: serde::de::DeserializeOwned>(
    vmm: &Arc<Vmm>,
    action: &'static str,
    b: &[u8],
    list: impl FnOnce(&mut VmConfig) -> &mut Vec<T>,
) -> Result<(), ApiError> {
    let dev: T = json_body(action, b)?;
    vmm.edit_config(action, NO_HOTPLUG, |c| {
        list(c).push(dev);
        Ok(())
    })
}

/// `vm.add-disk`: a virtio-blk disk (cloud-hypervisor's `DiskConfig`).
pub fn add_disk(vmm: &Arc<Vmm>, b: &[u8]) -> Result<(), ApiError> {
    add::<DiskConfig>(vmm, "vm.add-disk", b, |c| &mut c.disks)
}

/// `vm.add-device`: a VFIO device (cloud-hypervisor's `DeviceConfig`).
pub fn add_device(vmm: &Arc<Vmm>, b: &[u8]) -> Result<(), ApiError> {
    add::<DeviceConfig>(vmm, "vm.add-device", b, |c| &mut c.devices)
}

/// `vm.add-user-device`: a vfio-user device (cloud-hypervisor's `VmAddUserDevice`).
pub fn add_user_device(vmm: &Arc<Vmm>, b: &[u8]) -> Result<(), ApiError> {
    add::<UserDeviceConfig>(vmm, "vm.add-user-device", b, |c| &mut c.user_devices)
}

#[derive(Debug, Deserialize)]
struct RemoveDevice {
    id: String,
}

/// Why `vm.remove-device` removes nothing.
#[derive(Debug, PartialEq, Eq)]
enum NotRemoved {
    /// No device has the id; the VM's ids.
    NotFound(Vec<String>),
    /// More than one has it (an explicit id equal to another's default one): the count.
    Ambiguous(usize),
}

/// Removes the device of `c` whose id (its own, or the default `diskN`, `userN`, `vfioN`,
/// `rng` that logs and migrations use) is `id`.
fn remove_by_id(c: &mut VmConfig, id: &str) -> Result<(), NotRemoved> {
    let disk = |i: usize, d: &DiskConfig| d.id.clone().unwrap_or_else(|| format!("disk{i}"));
    let user = |i: usize, u: &UserDeviceConfig| u.id.clone().unwrap_or_else(|| format!("user{i}"));
    let vfio = |i: usize, d: &DeviceConfig| d.id.clone().unwrap_or_else(|| format!("vfio{i}"));
    let disks: Vec<String> = c
        .disks
        .iter()
        .enumerate()
        .map(|(i, d)| disk(i, d))
        .collect();
    let users: Vec<String> = c
        .user_devices
        .iter()
        .enumerate()
        .map(|(i, u)| user(i, u))
        .collect();
    let vfios: Vec<String> = c
        .devices
        .iter()
        .enumerate()
        .map(|(i, d)| vfio(i, d))
        .collect();
    let rng: Vec<String> = c.rng.iter().map(|_| "rng".to_string()).collect();
    let all: Vec<&String> = disks
        .iter()
        .chain(&users)
        .chain(&vfios)
        .chain(&rng)
        .collect();
    match all.iter().filter(|x| x.as_str() == id).count() {
        0 => return Err(NotRemoved::NotFound(all.into_iter().cloned().collect())),
        1 => {}
        n => return Err(NotRemoved::Ambiguous(n)),
    }
    if let Some(i) = disks.iter().position(|x| x == id) {
        c.disks.remove(i);
    } else if let Some(i) = users.iter().position(|x| x == id) {
        c.user_devices.remove(i);
    } else if let Some(i) = vfios.iter().position(|x| x == id) {
        c.devices.remove(i);
    } else {
        c.rng = None;
    }
    Ok(())
}

/// `vm.remove-device`: the device with that id.
pub fn remove_device(vmm: &Arc<Vmm>, b: &[u8]) -> Result<(), ApiError> {
    const ACTION: &str = "vm.remove-device";
    let r: RemoveDevice = json_body(ACTION, b)?;
    vmm.edit_config(ACTION, NO_HOTPLUG, |c| {
        remove_by_id(c, &r.id).map_err(|e| match e {
            NotRemoved::NotFound(ids) => ApiError::NotFound(format!(
                "{ACTION}: no device with id {:?} (the VM's devices: {ids:?})",
                r.id
            )),
            NotRemoved::Ambiguous(n) => ApiError::BadRequest(format!(
                "{ACTION}: {n} devices answer to id {:?} (an id given equals another \
                 device's default one): remove by the other id, or give each an id",
                r.id
            )),
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
    let r: Resize = json_body(ACTION, b)?;
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
            NotRemoved::NotFound(
                ["disk0", "data", "u", "vfio0", "rng"]
                    .map(String::from)
                    .to_vec()
            )
        );
        remove_by_id(&mut c, "data").unwrap();
        remove_by_id(&mut c, "disk0").unwrap();
        remove_by_id(&mut c, "vfio0").unwrap();
        remove_by_id(&mut c, "u").unwrap();
        remove_by_id(&mut c, "rng").unwrap();
        assert!(c.disks.is_empty() && c.devices.is_empty() && c.user_devices.is_empty());
        assert!(c.rng.is_none());
    }

    #[test]
    fn an_id_two_devices_answer_to_removes_nothing() {
        let mut c: VmConfig = serde_json::from_str(
            r#"{"payload":{},"disks":[{"path":"/a"},{"path":"/b","id":"disk0"}]}"#,
        )
        .unwrap();
        assert_eq!(
            remove_by_id(&mut c, "disk0").unwrap_err(),
            NotRemoved::Ambiguous(2)
        );
        assert_eq!(c.disks.len(), 2);
    }
}
