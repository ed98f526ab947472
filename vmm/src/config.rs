//! The VM configuration: cloud-hypervisor's `VmConfig` field names (so its JSON bodies
//! work unchanged), plus Ferry's `dirty_tracking`. The command line is parsed into it.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Largest vCPU count: APIC ids are 8 bits in the MADT entries Ferry writes.
pub const MAX_VCPUS: u32 = 254;
/// Default dirty ring size in entries: the largest KVM allows on x86 (1 MiB per vCPU).
/// This machine's KVM only exits on a completely full ring, so a ring that fills
/// between two harvests loses entries and forces an all-RAM resend; a big ring makes
/// that rare (see the hypervisor crate).
pub const DEFAULT_RING_ENTRIES: u32 = 65536;
/// A disk's size must be a multiple of this (virtio-blk counts 512-byte sectors).
pub const SECTOR_SIZE: u64 = 512;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--{option}: unknown parameter '{param}' (accepted: {accepted})")]
    UnknownParam {
        option: &'static str,
        param: String,
        accepted: &'static str,
    },
    #[error("--{option}: '{value}' is not a valid value for {param}: {why}")]
    BadValue {
        option: &'static str,
        param: &'static str,
        value: String,
        why: String,
    },
    #[error("--{option}: {param}= is required (in '{value}')")]
    MissingParam {
        option: &'static str,
        param: &'static str,
        value: String,
    },
    #[error("cpus: boot_vcpus={0} is out of range (accepted: 1 to {MAX_VCPUS})")]
    BootVcpus(u32),
    #[error("cpus: max_vcpus={max} is smaller than boot_vcpus={boot}")]
    MaxVcpus { boot: u32, max: u32 },
    #[error("memory: size={0} is too small (at least 2 MiB, a multiple of 4 KiB)")]
    MemorySize(u64),
    #[error("serial: mode File needs a file path")]
    SerialFileMissing,
    #[error("missing --kernel (or start with --api-socket and create the VM through the API)")]
    NoKernel,
    /// A disk file that cannot be used: not there, not openable as asked, not a file or
    /// block device, or a size that is not whole sectors. `reason` names the OS error.
    #[error("disk {}: {reason}", .path.display())]
    Disk { path: PathBuf, reason: String },
    #[error("disks: the id '{0}' is given to more than one disk")]
    DuplicateDiskId(String),
    /// An entropy source that cannot be opened for reading.
    #[error("rng {}: {reason}", .path.display())]
    Rng { path: PathBuf, reason: String },
    #[error("user device {}: {reason}", .socket.display())]
    UserDevice { socket: PathBuf, reason: String },
    #[error("device {}: {reason}", .path.display())]
    Device { path: PathBuf, reason: String },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpusConfig {
    pub boot_vcpus: u32,
    #[serde(default)]
    pub max_vcpus: u32,
}

impl Default for CpusConfig {
    fn default() -> Self {
        CpusConfig {
            boot_vcpus: 1,
            max_vcpus: 1,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {
    /// Bytes.
    pub size: u64,
    /// Back guest RAM with shared memory (memfd), needed for `MemFDs` migration.
    #[serde(default)]
    pub shared: bool,
    #[serde(default)]
    pub hugepages: bool,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            size: 512 << 20,
            shared: false,
            hugepages: false,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PayloadConfig {
    pub kernel: Option<PathBuf>,
    #[serde(default)]
    pub cmdline: Option<String>,
    #[serde(default)]
    pub initramfs: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConsoleMode {
    Off,
    #[default]
    Null,
    Tty,
    File,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    pub mode: ConsoleMode,
    #[serde(default)]
    pub file: Option<PathBuf>,
}

impl Default for SerialConfig {
    fn default() -> Self {
        SerialConfig {
            mode: ConsoleMode::Null,
            file: None,
        }
    }
}

/// A virtio-blk disk backed by a file or block device (cloud-hypervisor's `DiskConfig`,
/// the fields Ferry supports).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    pub path: PathBuf,
    /// The guest sees a read-only disk and the file is opened read-only.
    #[serde(default)]
    pub readonly: bool,
    /// Unique among the disks when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The disk's DMA goes through the virtio-iommu (cloud-hypervisor's field). Left out
    /// of the JSON when false, so a configuration without it reads as before everywhere
    /// (a migration to a Ferry that predates the field included).
    #[serde(default, skip_serializing_if = "is_false")]
    pub iommu: bool,
}

/// For `skip_serializing_if`: a device's `iommu` is written only when on.
fn is_false(b: &bool) -> bool {
    !*b
}

impl DiskConfig {
    /// Opens the disk as the device will use it: read-write, or read-only when
    /// `readonly`. Refuses what is not a regular file or block device, and a size that is
    /// not a multiple of [`SECTOR_SIZE`]. The file is positioned at its start.
    pub fn open(&self) -> Result<File, ConfigError> {
        let err = |reason: String| ConfigError::Disk {
            path: self.path.clone(),
            reason,
        };
        if self.path.as_os_str().is_empty() {
            return Err(err("the path is empty".into()));
        }
        let mode = if self.readonly {
            "read-only"
        } else {
            "read-write"
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(!self.readonly)
            .open(&self.path)
            .map_err(|e| err(format!("cannot open {mode}: {e}")))?;
        let kind = file
            .metadata()
            .map_err(|e| err(format!("cannot stat: {e}")))?
            .file_type();
        if kind.is_dir() {
            return Err(err("is a directory, not a file or block device".into()));
        }
        if !kind.is_file() && !kind.is_block_device() {
            return Err(err("not a regular file or block device".into()));
        }
        let size = disk_size(&mut file).map_err(|e| err(format!("cannot find its size: {e}")))?;
        if !size.is_multiple_of(SECTOR_SIZE) {
            return Err(err(format!(
                "its size, {size} bytes, is not a multiple of {SECTOR_SIZE}"
            )));
        }
        Ok(file)
    }
}

/// The size in bytes of an open disk file or block device (whose metadata says 0); the
/// file is left positioned at its start.
pub fn disk_size(file: &mut File) -> std::io::Result<u64> {
    let size = file.seek(SeekFrom::End(0))?;
    file.seek(SeekFrom::Start(0))?;
    Ok(size)
}

/// A virtio-rng device fed from `src` (cloud-hypervisor's `RngConfig`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RngConfig {
    /// The host file read for entropy, e.g. /dev/urandom.
    pub src: PathBuf,
    /// The device's DMA goes through the virtio-iommu (cloud-hypervisor's field); left
    /// out of the JSON when false, as for [`DiskConfig::iommu`].
    #[serde(default, skip_serializing_if = "is_false")]
    pub iommu: bool,
}

impl RngConfig {
    /// Opens the entropy source for reading; refuses a directory.
    pub fn open(&self) -> Result<File, ConfigError> {
        let err = |reason: String| ConfigError::Rng {
            path: self.src.clone(),
            reason,
        };
        if self.src.as_os_str().is_empty() {
            return Err(err("the path is empty".into()));
        }
        let file =
            File::open(&self.src).map_err(|e| err(format!("cannot open for reading: {e}")))?;
        let meta = file
            .metadata()
            .map_err(|e| err(format!("cannot stat: {e}")))?;
        if meta.is_dir() {
            return Err(err("is a directory".into()));
        }
        Ok(file)
    }
}

/// A vfio-user device served by another process on the UNIX socket `socket`
/// (cloud-hypervisor's `UserDeviceConfig`). Guest RAM is shared with it by file
/// descriptor, so a VM with one always has shared RAM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserDeviceConfig {
    pub socket: PathBuf,
    /// Unique among the devices when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The device's DMA goes through the virtio-iommu (Ferry's; cloud-hypervisor refuses
    /// vfio-user behind a vIOMMU).
    #[serde(default, skip_serializing_if = "is_false")]
    pub iommu: bool,
}

/// A host PCI device passed through with VFIO, named by its sysfs directory
/// (`/sys/bus/pci/devices/0000:01:00.0`), bound to vfio-pci (cloud-hypervisor's
/// `DeviceConfig`, without the fields Ferry has no use for: `pci_segment`,
/// `x_nv_gpudirect_clique`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    pub path: PathBuf,
    /// The device's DMA goes through the virtio-iommu.
    #[serde(default)]
    pub iommu: bool,
    /// Unique among the devices when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// Ferry's extension: how KVM reports dirty pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirtyTrackingConfig {
    /// Per-vCPU ring entries; 0 = rings off, use the dirty bitmap.
    pub ring_entries: u32,
}

impl Default for DirtyTrackingConfig {
    fn default() -> Self {
        DirtyTrackingConfig {
            ring_entries: DEFAULT_RING_ENTRIES,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    #[serde(default)]
    pub cpus: CpusConfig,
    #[serde(default)]
    pub memory: MemoryConfig,
    pub payload: PayloadConfig,
    #[serde(default)]
    pub serial: SerialConfig,
    /// A virtio-iommu in the VM even when no device is behind it (cloud-hypervisor's
    /// field); a device with `iommu` on asks for one too ([`VmConfig::viommu_needed`]).
    #[serde(default)]
    pub iommu: bool,
    #[serde(default)]
    pub dirty_tracking: DirtyTrackingConfig,
    /// virtio-blk disks, in the order their devices are made.
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// A virtio-rng device, when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rng: Option<RngConfig>,
    /// vfio-user devices, in the order their functions are placed (after the virtio ones).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub user_devices: Vec<UserDeviceConfig>,
    /// VFIO devices, in the order their functions are placed (after the vfio-user ones).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<DeviceConfig>,
}

impl VmConfig {
    /// Whether the VM gets a virtio-iommu: the top-level `iommu` is on, or a disk or the
    /// rng has its `iommu` on.
    pub fn viommu_needed(&self) -> bool {
        self.iommu
            || self.disks.iter().any(|d| d.iommu)
            || self.rng.as_ref().is_some_and(|r| r.iommu)
            || self.user_devices.iter().any(|u| u.iommu)
            || self.devices.iter().any(|d| d.iommu)
    }

    /// Whether guest RAM must be shared memory: asked for, or a vfio-user device needs it.
    pub fn shared_memory(&self) -> bool {
        self.memory.shared || !self.user_devices.is_empty()
    }

    /// Checks what can be checked without touching KVM, including that the disk and rng
    /// files can be opened as the devices will ([`VmConfig::check_files`]); fills defaults.
    pub fn validate(&mut self) -> Result<(), ConfigError> {
        let c = &mut self.cpus;
        if c.boot_vcpus == 0 || c.boot_vcpus > MAX_VCPUS {
            return Err(ConfigError::BootVcpus(c.boot_vcpus));
        }
        if c.max_vcpus == 0 {
            c.max_vcpus = c.boot_vcpus;
        }
        if c.max_vcpus < c.boot_vcpus {
            return Err(ConfigError::MaxVcpus {
                boot: c.boot_vcpus,
                max: c.max_vcpus,
            });
        }
        if self.memory.size < (2 << 20) || !self.memory.size.is_multiple_of(4096) {
            return Err(ConfigError::MemorySize(self.memory.size));
        }
        if self.serial.mode == ConsoleMode::File && self.serial.file.is_none() {
            return Err(ConfigError::SerialFileMissing);
        }
        let mut ids = std::collections::HashSet::new();
        for d in &self.disks {
            match d.id.as_deref() {
                Some("") => {
                    return Err(ConfigError::Disk {
                        path: d.path.clone(),
                        reason: "the id is empty".into(),
                    })
                }
                Some(id) if !ids.insert(id) => {
                    return Err(ConfigError::DuplicateDiskId(id.to_string()))
                }
                _ => {}
            }
        }
        let mut user_ids = std::collections::HashSet::new();
        for u in &self.user_devices {
            let err = |reason: &str| ConfigError::UserDevice {
                socket: u.socket.clone(),
                reason: reason.to_string(),
            };
            if u.socket.as_os_str().is_empty() {
                return Err(err("the socket path is empty"));
            }
            match u.id.as_deref() {
                Some("") => return Err(err("the id is empty")),
                Some(id) if !user_ids.insert(id) => {
                    return Err(err(&format!("the id '{id}' is given twice")))
                }
                _ => {}
            }
        }
        let mut device_ids = std::collections::HashSet::new();
        for d in &self.devices {
            let err = |reason: &str| ConfigError::Device {
                path: d.path.clone(),
                reason: reason.to_string(),
            };
            if d.path.as_os_str().is_empty() {
                return Err(err("the path is empty"));
            }
            match d.id.as_deref() {
                Some("") => return Err(err("the id is empty")),
                Some(id) if !device_ids.insert(id) => {
                    return Err(err(&format!("the id '{id}' is given twice")))
                }
                _ => {}
            }
        }
        self.check_files()
    }

    /// Opens every disk and the rng source as [`DiskConfig::open`] and
    /// [`RngConfig::open`] do (and closes them): the first that cannot be used is the error.
    pub fn check_files(&self) -> Result<(), ConfigError> {
        for d in &self.disks {
            d.open()?;
        }
        if let Some(r) = &self.rng {
            r.open()?;
        }
        Ok(())
    }
}

/// Parses sizes like `512M`, `4G`, `1048576`, `64K` (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, shift) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 30),
        Some(b'T' | b't') => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| "expected a number with an optional K, M, G or T suffix".to_string())?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| "too large".to_string())
}

/// Splits `a=1,b=2` (cloud-hypervisor's option syntax) into pairs, checking names.
fn params<'a>(
    option: &'static str,
    s: &'a str,
    accepted: &'static str,
) -> Result<Vec<(&'static str, &'a str)>, ConfigError> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            match accepted.split(", ").find(|name| *name == k) {
                Some(name) => Ok((name, v)),
                None => Err(ConfigError::UnknownParam {
                    option,
                    param: k.to_string(),
                    accepted,
                }),
            }
        })
        .collect()
}

fn bad(option: &'static str, param: &'static str, value: &str, why: impl ToString) -> ConfigError {
    ConfigError::BadValue {
        option,
        param,
        value: value.to_string(),
        why: why.to_string(),
    }
}

fn missing(option: &'static str, param: &'static str, value: &str) -> ConfigError {
    ConfigError::MissingParam {
        option,
        param,
        value: value.to_string(),
    }
}

fn number(option: &'static str, param: &'static str, v: &str) -> Result<u32, ConfigError> {
    v.parse().map_err(|e| bad(option, param, v, e))
}

/// `--cpus boot=N[,max=M]`.
pub fn parse_cpus(s: &str) -> Result<CpusConfig, ConfigError> {
    let mut c = CpusConfig {
        boot_vcpus: 1,
        max_vcpus: 0,
    };
    for (k, v) in params("cpus", s, "boot, max")? {
        match k {
            "boot" => c.boot_vcpus = number("cpus", "boot", v)?,
            _ => c.max_vcpus = number("cpus", "max", v)?,
        }
    }
    Ok(c)
}

/// `--memory size=SIZE[,shared=on|off][,hugepages=on|off]`.
pub fn parse_memory(s: &str) -> Result<MemoryConfig, ConfigError> {
    let mut m = MemoryConfig::default();
    let onoff = |p: &'static str, v: &str| on_off("memory", p, v);
    for (k, v) in params("memory", s, "size, shared, hugepages")? {
        match k {
            "size" => m.size = parse_size(v).map_err(|e| bad("memory", "size", v, e))?,
            "shared" => m.shared = onoff("shared", v)?,
            _ => m.hugepages = onoff("hugepages", v)?,
        }
    }
    Ok(m)
}

/// `--serial tty|off|null|file=PATH`.
pub fn parse_serial(s: &str) -> Result<SerialConfig, ConfigError> {
    let mode = |mode| SerialConfig { mode, file: None };
    match s {
        "tty" => Ok(mode(ConsoleMode::Tty)),
        "off" => Ok(mode(ConsoleMode::Off)),
        "null" => Ok(mode(ConsoleMode::Null)),
        _ => match s.strip_prefix("file=") {
            Some(p) if !p.is_empty() => Ok(SerialConfig {
                mode: ConsoleMode::File,
                file: Some(PathBuf::from(p)),
            }),
            _ => Err(bad(
                "serial",
                "mode",
                s,
                "expected tty, off, null or file=PATH",
            )),
        },
    }
}

fn on_off(option: &'static str, param: &'static str, v: &str) -> Result<bool, ConfigError> {
    match v {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err(bad(option, param, v, "expected on or off")),
    }
}

/// `--disk path=FILE[,readonly=on|off][,id=NAME][,iommu=on|off]`.
pub fn parse_disk(s: &str) -> Result<DiskConfig, ConfigError> {
    let mut path = None;
    let mut readonly = false;
    let mut id = None;
    let mut iommu = false;
    let mut seen = Vec::new();
    for (k, v) in params("disk", s, "path, readonly, id, iommu")? {
        if seen.contains(&k) {
            return Err(bad("disk", k, v, "given twice"));
        }
        seen.push(k);
        match k {
            "path" if v.is_empty() => return Err(bad("disk", "path", v, "the path is empty")),
            "path" => path = Some(PathBuf::from(v)),
            "readonly" => readonly = on_off("disk", "readonly", v)?,
            "iommu" => iommu = on_off("disk", "iommu", v)?,
            _ if v.is_empty() => return Err(bad("disk", "id", v, "the id is empty")),
            _ => id = Some(v.to_string()),
        }
    }
    let path = path.ok_or_else(|| missing("disk", "path", s))?;
    Ok(DiskConfig {
        path,
        readonly,
        id,
        iommu,
    })
}

/// `--user-device socket=PATH[,id=NAME][,iommu=on|off]`.
pub fn parse_user_device(s: &str) -> Result<UserDeviceConfig, ConfigError> {
    let mut socket: Option<PathBuf> = None;
    let mut id = None;
    let mut iommu = false;
    for (k, v) in params("user-device", s, "socket, id, iommu")? {
        match k {
            "socket" if v.is_empty() => {
                return Err(bad("user-device", "socket", v, "the path is empty"))
            }
            "socket" => socket = Some(PathBuf::from(v)),
            "id" if v.is_empty() => return Err(bad("user-device", "id", v, "the id is empty")),
            "id" => id = Some(v.to_string()),
            _ => iommu = on_off("user-device", "iommu", v)?,
        }
    }
    let socket = socket.ok_or_else(|| missing("user-device", "socket", s))?;
    Ok(UserDeviceConfig { socket, id, iommu })
}

/// `--device path=SYSFS_PATH[,iommu=on|off][,id=NAME]`.
pub fn parse_device(s: &str) -> Result<DeviceConfig, ConfigError> {
    let mut path: Option<PathBuf> = None;
    let mut id = None;
    let mut iommu = false;
    let mut seen = Vec::new();
    for (k, v) in params("device", s, "path, iommu, id")? {
        if seen.contains(&k) {
            return Err(bad("device", k, v, "given twice"));
        }
        seen.push(k);
        match k {
            "path" if v.is_empty() => return Err(bad("device", "path", v, "the path is empty")),
            "path" => path = Some(PathBuf::from(v)),
            "id" if v.is_empty() => return Err(bad("device", "id", v, "the id is empty")),
            "id" => id = Some(v.to_string()),
            _ => iommu = on_off("device", "iommu", v)?,
        }
    }
    let path = path.ok_or_else(|| missing("device", "path", s))?;
    Ok(DeviceConfig { path, iommu, id })
}

/// `--rng src=PATH[,iommu=on|off]`.
pub fn parse_rng(s: &str) -> Result<RngConfig, ConfigError> {
    let mut src = None;
    let mut iommu = false;
    let mut seen = Vec::new();
    for (k, v) in params("rng", s, "src, iommu")? {
        if seen.contains(&k) {
            return Err(bad("rng", k, v, "given twice"));
        }
        seen.push(k);
        match k {
            "src" if v.is_empty() => return Err(bad("rng", "src", v, "the path is empty")),
            "src" => src = Some(PathBuf::from(v)),
            _ => iommu = on_off("rng", "iommu", v)?,
        }
    }
    let src = src.ok_or_else(|| missing("rng", "src", s))?;
    Ok(RngConfig { src, iommu })
}

/// `--dirty-ring entries=N|off`.
pub fn parse_dirty_ring(s: &str) -> Result<DirtyTrackingConfig, ConfigError> {
    if s == "off" {
        return Ok(DirtyTrackingConfig { ring_entries: 0 });
    }
    let mut d = DirtyTrackingConfig::default();
    for (_, v) in params("dirty-ring", s, "entries")? {
        d.ring_entries = number("dirty-ring", "entries", v)?;
        if d.ring_entries == 0 {
            return Err(bad(
                "dirty-ring",
                "entries",
                v,
                "use --dirty-ring off for bitmap mode",
            ));
        }
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn options() {
        assert_eq!(parse_cpus("boot=4").unwrap().boot_vcpus, 4);
        let e = parse_cpus("boot=x").unwrap_err().to_string();
        assert!(e.contains("'x'") && e.contains("boot"), "{e}");
        let e = parse_cpus("nodes=2").unwrap_err().to_string();
        assert!(e.contains("nodes"), "{e}");
        assert_eq!(parse_memory("size=1G,shared=on").unwrap().size, 1 << 30);
        assert!(parse_memory("size=1G,shared=maybe").is_err());
        assert_eq!(parse_serial("tty").unwrap().mode, ConsoleMode::Tty);
        assert_eq!(
            parse_serial("file=/tmp/x").unwrap().file,
            Some(PathBuf::from("/tmp/x"))
        );
        assert!(parse_serial("file=").is_err());
        assert!(parse_serial("pty").is_err());
        assert_eq!(parse_dirty_ring("off").unwrap().ring_entries, 0);
        assert_eq!(parse_dirty_ring("entries=1024").unwrap().ring_entries, 1024);
        assert!(parse_dirty_ring("entries=0").is_err());
    }

    #[test]
    fn validation() {
        let mut c = VmConfig::default();
        c.validate().unwrap();
        assert_eq!(c.cpus.max_vcpus, 1);
        c.cpus.boot_vcpus = 0;
        assert_eq!(c.validate(), Err(ConfigError::BootVcpus(0)));
        let mut c = VmConfig::default();
        c.memory.size = 4095;
        assert!(c.validate().unwrap_err().to_string().contains("4095"));
    }

    #[test]
    fn cloud_hypervisor_json_shape() {
        let j = r#"{"cpus":{"boot_vcpus":2,"max_vcpus":2},"memory":{"size":536870912},
            "payload":{"kernel":"/k","cmdline":"console=ttyS0"},"serial":{"mode":"Tty"}}"#;
        let c: VmConfig = serde_json::from_str(j).unwrap();
        assert_eq!(c.cpus.boot_vcpus, 2);
        assert_eq!(c.serial.mode, ConsoleMode::Tty);
        let e = serde_json::from_str::<VmConfig>(r#"{"payload":{},"net":[]}"#).unwrap_err();
        assert!(e.to_string().contains("net"), "{e}");
    }

    /// A temporary directory for one test, removed on drop.
    struct Dir(PathBuf);

    impl Dir {
        fn new(tag: &str) -> Dir {
            let p = std::env::temp_dir().join(format!("ferry-config-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }

        /// A file of `len` zero bytes.
        fn file(&self, name: &str, len: u64) -> PathBuf {
            let p = self.0.join(name);
            File::create(&p).unwrap().set_len(len).unwrap();
            p
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn disk(path: &std::path::Path) -> DiskConfig {
        DiskConfig {
            path: path.to_path_buf(),
            readonly: false,
            id: None,
            iommu: false,
        }
    }

    #[test]
    fn disk_and_rng_options() {
        assert_eq!(
            parse_disk("path=/a.raw").unwrap(),
            DiskConfig {
                path: "/a.raw".into(),
                readonly: false,
                id: None,
                iommu: false,
            }
        );
        assert_eq!(
            parse_disk("path=/a.raw,readonly=on,id=root").unwrap(),
            DiskConfig {
                path: "/a.raw".into(),
                readonly: true,
                id: Some("root".into()),
                iommu: false,
            }
        );
        assert_eq!(
            parse_disk("iommu=on,path=/a.raw,readonly=off,id=d").unwrap(),
            DiskConfig {
                path: "/a.raw".into(),
                readonly: false,
                id: Some("d".into()),
                iommu: true,
            }
        );
        assert!(parse_disk("path=/a,iommu=true").unwrap().iommu);
        assert!(!parse_disk("path=/a,iommu=off").unwrap().iommu);
        assert!(!parse_disk("path=/a,iommu=false").unwrap().iommu);
        assert!(!parse_disk("readonly=off,path=/a").unwrap().readonly);
        assert!(parse_disk("path=/a,readonly=true").unwrap().readonly);
        let err = |s: &str| parse_disk(s).unwrap_err().to_string();
        assert_eq!(
            err("path=/a,direct=on"),
            "--disk: unknown parameter 'direct' (accepted: path, readonly, id, iommu)"
        );
        assert_eq!(
            err("path=/a,readonly=yes"),
            "--disk: 'yes' is not a valid value for readonly: expected on or off"
        );
        assert_eq!(
            err("path="),
            "--disk: '' is not a valid value for path: the path is empty"
        );
        assert_eq!(
            err("readonly=on"),
            "--disk: path= is required (in 'readonly=on')"
        );
        assert_eq!(err(""), "--disk: path= is required (in '')");
        assert!(err("path=/a,id=").contains("id"));
        assert!(err("path=/a,path=/b").contains("given twice"));
        assert_eq!(
            err("path=/a,iommu=yes"),
            "--disk: 'yes' is not a valid value for iommu: expected on or off"
        );
        assert_eq!(
            err("path=/a,iommu="),
            "--disk: '' is not a valid value for iommu: expected on or off"
        );
        assert!(err("path=/a,iommu=on,iommu=off").contains("given twice"));

        assert_eq!(
            parse_rng("src=/dev/urandom").unwrap().src,
            PathBuf::from("/dev/urandom")
        );
        assert!(!parse_rng("src=/dev/urandom").unwrap().iommu);
        assert_eq!(
            parse_rng("src=/r,iommu=on").unwrap(),
            RngConfig {
                src: "/r".into(),
                iommu: true
            }
        );
        assert!(parse_rng("iommu=true,src=/r").unwrap().iommu);
        assert!(!parse_rng("src=/r,iommu=off").unwrap().iommu);
        assert_eq!(
            parse_rng("src=/r,iommu=maybe").unwrap_err().to_string(),
            "--rng: 'maybe' is not a valid value for iommu: expected on or off"
        );
        assert!(parse_rng("src=/r,src=/s")
            .unwrap_err()
            .to_string()
            .contains("given twice"));
        assert_eq!(
            parse_rng("iommu=on").unwrap_err().to_string(),
            "--rng: src= is required (in 'iommu=on')"
        );
        assert_eq!(
            parse_rng("file=/x").unwrap_err().to_string(),
            "--rng: unknown parameter 'file' (accepted: src, iommu)"
        );
        assert!(parse_rng("src=").unwrap_err().to_string().contains("empty"));
        assert_eq!(
            parse_rng("").unwrap_err(),
            ConfigError::MissingParam {
                option: "rng",
                param: "src",
                value: String::new()
            }
        );
    }

    #[test]
    fn disk_files_are_checked() {
        let dir = Dir::new("disks");
        let missing = dir.0.join("x.raw");
        assert_eq!(
            disk(&missing).open().unwrap_err().to_string(),
            format!(
                "disk {}: cannot open read-write: No such file or directory (os error 2)",
                missing.display()
            )
        );
        let ro = DiskConfig {
            readonly: true,
            ..disk(&missing)
        };
        assert!(ro
            .open()
            .unwrap_err()
            .to_string()
            .contains("cannot open read-only"));

        let odd = dir.file("odd.raw", 1000);
        let e = disk(&odd).open().unwrap_err().to_string();
        assert!(e.contains("odd.raw") && e.contains("1000 bytes"), "{e}");
        let e = DiskConfig {
            readonly: true,
            ..disk(&dir.0)
        }
        .open()
        .unwrap_err()
        .to_string();
        assert!(e.contains("is a directory"), "{e}");
        assert!(disk(std::path::Path::new("/dev/null")).open().is_err());
        assert!(disk(std::path::Path::new("")).open().is_err());

        // A good disk opens as asked, at its start; readonly=on cannot write.
        use std::io::{Read, Write};
        let good = dir.file("good.raw", 1 << 20);
        let mut f = disk(&good).open().unwrap();
        assert_eq!(disk_size(&mut f).unwrap(), 1 << 20);
        f.write_all(b"ferry").unwrap();
        let mut f = DiskConfig {
            readonly: true,
            ..disk(&good)
        }
        .open()
        .unwrap();
        let mut head = [0u8; 5];
        f.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"ferry");
        assert!(f.write_all(b"x").is_err());
        assert!(disk(&dir.file("empty.raw", 0)).open().is_ok());
    }

    #[test]
    fn rng_source_is_checked() {
        let dir = Dir::new("rng");
        let rng = |p: &std::path::Path| RngConfig {
            src: p.to_path_buf(),
            iommu: false,
        };
        assert!(rng("/dev/urandom".as_ref()).open().is_ok());
        let missing = dir.0.join("nope");
        assert_eq!(
            rng(&missing).open().unwrap_err().to_string(),
            format!(
                "rng {}: cannot open for reading: No such file or directory (os error 2)",
                missing.display()
            )
        );
        assert!(rng(&dir.0)
            .open()
            .unwrap_err()
            .to_string()
            .contains("is a directory"));
    }

    #[test]
    fn validation_checks_disks_and_rng() {
        let dir = Dir::new("validate");
        let a = dir.file("a.raw", 4096);
        let b = dir.file("b.raw", 4096);
        let mut c = VmConfig {
            disks: vec![
                DiskConfig {
                    id: Some("root".into()),
                    ..disk(&a)
                },
                DiskConfig {
                    readonly: true,
                    ..disk(&b)
                },
            ],
            rng: Some(RngConfig {
                src: "/dev/urandom".into(),
                iommu: false,
            }),
            ..Default::default()
        };
        c.validate().unwrap();

        let mut dup = c.clone();
        dup.disks[1].id = Some("root".into());
        assert_eq!(
            dup.validate(),
            Err(ConfigError::DuplicateDiskId("root".into()))
        );
        let mut empty = c.clone();
        empty.disks[0].id = Some(String::new());
        assert!(empty
            .validate()
            .unwrap_err()
            .to_string()
            .contains("id is empty"));
        let mut gone = c.clone();
        gone.disks[1].path = dir.0.join("gone.raw");
        assert!(gone
            .validate()
            .unwrap_err()
            .to_string()
            .contains("gone.raw: cannot open read-only"));
        let mut bad_rng = c.clone();
        bad_rng.rng = Some(RngConfig {
            src: dir.0.join("entropy"),
            iommu: false,
        });
        assert!(matches!(bad_rng.validate(), Err(ConfigError::Rng { .. })));
    }

    #[test]
    fn disks_and_rng_in_json() {
        let j = r#"{"payload":{"kernel":"/k"},"disks":[{"path":"/a.raw"},
            {"path":"/b.raw","readonly":true,"id":"data"}],"rng":{"src":"/dev/urandom"}}"#;
        let c: VmConfig = serde_json::from_str(j).unwrap();
        assert_eq!(c.disks.len(), 2);
        assert_eq!(c.disks[1].id.as_deref(), Some("data"));
        assert!(c.disks[1].readonly && !c.disks[0].readonly);
        assert_eq!(c.rng.as_ref().unwrap().src, PathBuf::from("/dev/urandom"));
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(
            v["disks"],
            serde_json::json!([{"path": "/a.raw", "readonly": false},
                {"path": "/b.raw", "readonly": true, "id": "data"}])
        );
        assert_eq!(v["rng"], serde_json::json!({"src": "/dev/urandom"}));

        // Unset: no disks, no rng key (not null).
        let v = serde_json::to_value(VmConfig::default()).unwrap();
        assert_eq!(v["disks"], serde_json::json!([]));
        assert!(v.get("rng").is_none(), "{v}");
        let c: VmConfig = serde_json::from_str(r#"{"payload":{}}"#).unwrap();
        assert!(c.disks.is_empty() && c.rng.is_none());

        for (j, needle) in [
            (
                r#"{"payload":{},"disks":[{"path":"/a","direct":true}]}"#,
                "direct",
            ),
            (r#"{"payload":{},"disks":[{"readonly":true}]}"#, "path"),
            (r#"{"payload":{},"rng":{}}"#, "src"),
            (r#"{"payload":{},"rng":{"src":"/r","iommu":"on"}}"#, "on"),
            (
                r#"{"payload":{},"disks":[{"path":"/a","iommu":1}]}"#,
                "boolean",
            ),
            (
                r#"{"payload":{},"rng":{"src":"/r","iommu":false,"x":1}}"#,
                "x",
            ),
        ] {
            let e = serde_json::from_str::<VmConfig>(j).unwrap_err().to_string();
            assert!(e.contains(needle), "{j}: {e}");
        }
    }

    /// cloud-hypervisor's `iommu` on a disk and on the rng: read when given, false when
    /// not, written only when on (so a configuration without it is the same JSON as
    /// before the field existed, and a migration source's config still parses here).
    #[test]
    fn device_iommu_in_json() {
        let j = r#"{"payload":{"kernel":"/k"},"disks":[{"path":"/a.raw","iommu":true},
            {"path":"/b.raw","iommu":false},{"path":"/c.raw"}],
            "rng":{"src":"/dev/urandom","iommu":true}}"#;
        let c: VmConfig = serde_json::from_str(j).unwrap();
        let iommu: Vec<bool> = c.disks.iter().map(|d| d.iommu).collect();
        assert_eq!(iommu, [true, false, false]);
        assert!(c.rng.as_ref().unwrap().iommu);
        assert!(!c.iommu, "the top-level field is its own");
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(
            v["disks"],
            serde_json::json!([{"path": "/a.raw", "readonly": false, "iommu": true},
                {"path": "/b.raw", "readonly": false},
                {"path": "/c.raw", "readonly": false}])
        );
        assert_eq!(
            v["rng"],
            serde_json::json!({"src": "/dev/urandom", "iommu": true})
        );
        let back: VmConfig = serde_json::from_value(v).unwrap();
        assert_eq!(back, c, "round trip");

        // A configuration written before the fields existed reads with them off.
        let old = r#"{"payload":{"kernel":"/k"},"iommu":false,"disks":[{"path":"/a.raw",
            "readonly":true}],"rng":{"src":"/dev/urandom"}}"#;
        let c: VmConfig = serde_json::from_str(old).unwrap();
        assert!(!c.disks[0].iommu && !c.rng.as_ref().unwrap().iommu);
        assert!(!c.viommu_needed());
    }

    #[test]
    fn viommu_needed_by_the_vm_or_any_device() {
        let d = |iommu| DiskConfig {
            iommu,
            ..disk("/a.raw".as_ref())
        };
        let rng = |iommu| {
            Some(RngConfig {
                src: "/dev/urandom".into(),
                iommu,
            })
        };
        assert!(!VmConfig::default().viommu_needed());
        let none = VmConfig {
            disks: vec![d(false), d(false)],
            rng: rng(false),
            ..Default::default()
        };
        assert!(!none.viommu_needed());
        assert!(VmConfig {
            iommu: true,
            ..Default::default()
        }
        .viommu_needed());
        assert!(VmConfig {
            disks: vec![d(false), d(true)],
            ..none.clone()
        }
        .viommu_needed());
        assert!(VmConfig {
            rng: rng(true),
            ..none.clone()
        }
        .viommu_needed());
        assert!(VmConfig {
            rng: rng(true),
            disks: vec![],
            ..Default::default()
        }
        .viommu_needed());
    }

    #[test]
    fn parse_device_takes_path_iommu_and_id() {
        let d = parse_device("path=/sys/bus/pci/devices/0000:01:00.0,iommu=on,id=nic").unwrap();
        assert_eq!(
            d,
            DeviceConfig {
                path: "/sys/bus/pci/devices/0000:01:00.0".into(),
                iommu: true,
                id: Some("nic".into()),
            }
        );
        let d = parse_device("path=/sys/bus/pci/devices/0000:01:00.0").unwrap();
        assert!(!d.iommu && d.id.is_none());
        assert!(!VmConfig {
            devices: vec![d.clone()],
            ..Default::default()
        }
        .viommu_needed());
        assert!(VmConfig {
            devices: vec![d, parse_device("path=/x,iommu=on").unwrap()],
            ..Default::default()
        }
        .viommu_needed());
    }

    #[test]
    fn parse_device_errors_name_the_value() {
        for (arg, needle) in [
            ("iommu=on", "path= is required"),
            ("path=", "the path is empty"),
            ("path=/a,id=", "the id is empty"),
            ("path=/a,iommu=maybe", "maybe"),
            ("path=/a,path=/b", "given twice"),
            ("path=/a,pci_segment=1", "pci_segment"),
        ] {
            let e = parse_device(arg).unwrap_err().to_string();
            assert!(e.contains(needle), "{arg}: {e}");
            assert!(e.contains("--device"), "{arg}: {e}");
        }
    }

    #[test]
    fn devices_in_json_and_validation() {
        let c: VmConfig = serde_json::from_str(
            r#"{"payload":{"kernel":"/k"},"devices":[{"path":"/sys/bus/pci/devices/0000:01:00.0","iommu":true,"id":"gpu"}]}"#,
        )
        .unwrap();
        assert_eq!(c.devices.len(), 1);
        assert!(c.devices[0].iommu && c.viommu_needed());
        // Absent when empty, so older peers read it.
        let j = serde_json::to_string(&VmConfig::default()).unwrap();
        assert!(!j.contains("\"devices\""), "{j}");
        assert!(serde_json::from_str::<VmConfig>(
            r#"{"payload":{"kernel":"/k"},"devices":[{"path":"/a","bogus":1}]}"#
        )
        .is_err());
        let twice = VmConfig {
            devices: vec![
                parse_device("path=/a,id=x").unwrap(),
                parse_device("path=/b,id=x").unwrap(),
            ],
            ..Default::default()
        };
        let e = twice.clone().validate().unwrap_err().to_string();
        assert!(e.contains("/b") && e.contains("'x' is given twice"), "{e}");
    }
}
