//! The VM configuration: cloud-hypervisor's `VmConfig` field names (so its JSON bodies
//! work unchanged), plus Ferry's `dirty_tracking`. The command line is parsed into it.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

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
    /// A cloud-hypervisor field with a value Ferry cannot honour: `value` is the JSON
    /// given (shortened when long).
    #[error("{field}: {value} is not supported by Ferry: {why}")]
    Unsupported {
        field: String,
        value: String,
        why: &'static str,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpusConfig {
    pub boot_vcpus: u32,
    #[serde(default)]
    pub max_vcpus: u32,
    /// cloud-hypervisor's other fields: read, checked by [`VmConfig::validate`], never written.
    #[serde(flatten, skip_serializing)]
    pub ch: CpusCompat,
}

impl Default for CpusConfig {
    fn default() -> Self {
        CpusConfig {
            boot_vcpus: 1,
            max_vcpus: 1,
            ch: CpusCompat::default(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryConfig {
    /// Bytes.
    pub size: u64,
    /// Back guest RAM with shared memory (memfd), needed for `MemFDs` migration.
    #[serde(default)]
    pub shared: bool,
    /// cloud-hypervisor's: hugetlbfs-backed RAM, which Ferry refuses (true).
    #[serde(default)]
    pub hugepages: bool,
    #[serde(flatten, skip_serializing)]
    pub ch: MemoryCompat,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            size: 512 << 20,
            shared: false,
            hugepages: false,
            ch: MemoryCompat::default(),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayloadConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<PathBuf>,
    #[serde(flatten, skip_serializing)]
    pub ch: PayloadCompat,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConsoleMode {
    Off,
    #[default]
    Null,
    Tty,
    File,
    /// cloud-hypervisor's; refused by [`VmConfig::validate`].
    Pty,
    /// cloud-hypervisor's; refused by [`VmConfig::validate`].
    Socket,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialConfig {
    pub mode: ConsoleMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    /// cloud-hypervisor's socket path for mode Socket, refused when given.
    #[serde(default, skip_serializing)]
    pub socket: Option<PathBuf>,
}

impl Default for SerialConfig {
    fn default() -> Self {
        SerialConfig {
            mode: ConsoleMode::Null,
            file: None,
            socket: None,
        }
    }
}

/// A virtio-blk disk backed by a file or block device (cloud-hypervisor's `DiskConfig`,
/// the fields Ferry supports).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
    #[serde(flatten, skip_serializing)]
    pub ch: DiskCompat,
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
    /// virtio-blk disks, in the order their devices are made (null reads as none).
    #[serde(default, deserialize_with = "null_as_empty")]
    pub disks: Vec<DiskConfig>,
    /// A virtio-rng device, when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rng: Option<RngConfig>,
    /// vfio-user devices, in the order their functions are placed (after the virtio ones).
    #[serde(
        default,
        deserialize_with = "null_as_empty",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub user_devices: Vec<UserDeviceConfig>,
    /// VFIO devices, in the order their functions are placed (after the vfio-user ones).
    #[serde(
        default,
        deserialize_with = "null_as_empty",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub devices: Vec<DeviceConfig>,
    /// cloud-hypervisor's other top-level fields: read, checked, never written.
    #[serde(flatten, skip_serializing)]
    pub ch: VmCompat,
}

/// For `deserialize_with`: a list that cloud-hypervisor writes as `null` when empty.
fn null_as_empty<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
}

// cloud-hypervisor's `VmConfig` fields that Ferry has no equivalent for. vm.create reads
// them so that cloud-hypervisor's own configuration (what its vm.info reports) is
// accepted: absent, null, an empty list or cloud-hypervisor's default value is taken
// silently; anything else is refused by [`VmConfig::validate`] with the field and the
// value ([`ConfigError::Unsupported`]). They are never written back (vm.info, a
// migration's configuration), so Ferry's own JSON is unchanged.

/// cloud-hypervisor's `CpusConfig` fields beyond the vCPU counts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct CpusCompat {
    pub topology: Option<Value>,
    pub kvm_hyperv: Option<bool>,
    pub max_phys_bits: Option<u64>,
    pub affinity: Option<Vec<Value>>,
    pub features: Option<CpuFeatures>,
    pub nested: Option<bool>,
    pub core_scheduling: Option<String>,
    pub profile: Option<String>,
}

/// cloud-hypervisor's `CpuFeatures`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuFeatures {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amx: Option<bool>,
}

/// cloud-hypervisor's `MemoryConfig` fields beyond `size`, `shared` and `hugepages`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct MemoryCompat {
    pub hotplug_size: Option<u64>,
    pub hotplugged_size: Option<u64>,
    pub mergeable: Option<bool>,
    pub hotplug_method: Option<String>,
    pub hugepage_size: Option<u64>,
    pub prefault: Option<bool>,
    pub reserve: Option<bool>,
    pub thp: Option<bool>,
    pub zones: Option<Vec<Value>>,
}

/// cloud-hypervisor's `PayloadConfig` fields beyond kernel, cmdline and initramfs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct PayloadCompat {
    pub firmware: Option<PathBuf>,
    pub igvm: Option<PathBuf>,
    pub host_data: Option<String>,
}

/// cloud-hypervisor's `DiskConfig` fields beyond path, readonly, id and iommu.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct DiskCompat {
    pub direct: Option<bool>,
    pub num_queues: Option<u64>,
    pub queue_size: Option<u64>,
    pub vhost_user: Option<bool>,
    pub vhost_socket: Option<String>,
    pub rate_limiter_config: Option<Value>,
    pub pci_segment: Option<u64>,
    pub pci_device_id: Option<u64>,
    pub serial: Option<String>,
    pub rate_limit_group: Option<String>,
    pub queue_affinity: Option<Vec<Value>>,
    pub backing_files: Option<bool>,
    pub sparse: Option<bool>,
    pub image_type: Option<String>,
    pub lock_granularity: Option<String>,
    /// Host I/O engine choices: Ferry uses neither io_uring nor AIO, so either value holds.
    pub disable_io_uring: Option<bool>,
    pub disable_aio: Option<bool>,
}

/// cloud-hypervisor's console-like device (`console`, `debug_console`): `Off` (or absent)
/// is accepted, and `console`'s default `Tty` with a warning; Ferry has neither a
/// virtio-console nor a debug port.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct ConsoleCompat {
    pub mode: Option<String>,
}

/// cloud-hypervisor's top-level `VmConfig` fields Ferry does not have.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct VmCompat {
    pub console: Option<ConsoleCompat>,
    pub debug_console: Option<ConsoleCompat>,
    pub pvpanic: Option<bool>,
    pub watchdog: Option<bool>,
    pub landlock_enable: Option<bool>,
    pub landlock_rules: Option<Vec<Value>>,
    pub rate_limit_groups: Option<Vec<Value>>,
    pub net: Option<Vec<Value>>,
    pub fs: Option<Vec<Value>>,
    pub pmem: Option<Vec<Value>>,
    pub vdpa: Option<Vec<Value>>,
    pub generic_vhost_user: Option<Vec<Value>>,
    pub numa: Option<Vec<Value>>,
    pub pci_segments: Option<Vec<Value>>,
    pub sgx_epc: Option<Vec<Value>>,
    pub preserved_fds: Option<Vec<Value>>,
    pub balloon: Option<Value>,
    pub vsock: Option<Value>,
    pub tpm: Option<Value>,
    pub rtc: Option<Value>,
    pub platform: Option<serde_json::Map<String, Value>>,
}

/// The JSON of a refused value, at most 200 characters.
fn shown<T: Serialize + ?Sized>(v: &T) -> String {
    let s = serde_json::to_string(v).unwrap_or_default();
    if s.chars().count() <= 200 {
        return s;
    }
    let head: String = s.chars().take(200).collect();
    format!("{head}...")
}

fn unsupported<T: Serialize + ?Sized>(field: &str, v: &T, why: &'static str) -> ConfigError {
    ConfigError::Unsupported {
        field: field.to_string(),
        value: shown(v),
        why,
    }
}

/// Refuses `v` unless it is absent or `ok` holds for it.
fn only<T: Serialize>(
    field: &str,
    v: &Option<T>,
    ok: impl Fn(&T) -> bool,
    why: &'static str,
) -> Result<(), ConfigError> {
    match v {
        Some(x) if !ok(x) => Err(unsupported(field, x, why)),
        _ => Ok(()),
    }
}

/// Refuses `v` unless it is absent (or null).
fn absent<T: Serialize>(field: &str, v: &Option<T>, why: &'static str) -> Result<(), ConfigError> {
    only(field, v, |_| false, why)
}

/// Refuses a list unless it is absent, null or empty.
fn empty<T: Serialize>(
    field: &str,
    v: &Option<Vec<T>>,
    why: &'static str,
) -> Result<(), ConfigError> {
    only(field, v, |l| l.is_empty(), why)
}

/// A platform field and the values taken as its default.
fn platform_default(key: &str, v: &Value) -> bool {
    match key {
        "num_pci_segments" => v.is_null() || v.as_u64() == Some(1),
        "iommu_segments" | "oem_strings" => {
            v.is_null() || v.as_array().is_some_and(|a| a.is_empty())
        }
        "tdx" | "sev_snp" | "iommufd" => v.is_null() || *v == Value::Bool(false),
        "vfio_p2p_dma" => v.is_null() || *v == Value::Bool(true),
        // Identity strings (SMBIOS), the IOMMU address width, and anything newer.
        _ => v.is_null(),
    }
}

impl CpusCompat {
    fn check(&self) -> Result<(), ConfigError> {
        absent(
            "cpus.topology",
            &self.topology,
            "Ferry gives each vCPU its own core and socket layout",
        )?;
        only(
            "cpus.kvm_hyperv",
            &self.kvm_hyperv,
            |v| !v,
            "Ferry offers no Hyper-V enlightenments",
        )?;
        only(
            "cpus.max_phys_bits",
            &self.max_phys_bits,
            |&v| v == 46,
            "Ferry does not limit the guest's physical address width (46, the default, is taken)",
        )?;
        empty(
            "cpus.affinity",
            &self.affinity,
            "Ferry does not pin vCPU threads",
        )?;
        only(
            "cpus.features",
            &self.features,
            |f| f.amx != Some(true),
            "Ferry does not enable AMX tile state for the guest",
        )?;
        only(
            "cpus.nested",
            &self.nested,
            |&v| v,
            "Ferry gives the guest KVM's supported CPUID, virtualisation extensions included",
        )?;
        only(
            "cpus.core_scheduling",
            &self.core_scheduling,
            |v| v == "Vm" || v == "Off",
            "Ferry sets no core-scheduling cookies per vCPU",
        )?;
        only(
            "cpus.profile",
            &self.profile,
            |v| v == "Host" || v == "host",
            "Ferry gives the guest the host's CPU model",
        )
    }
}

impl MemoryCompat {
    fn check(&self) -> Result<(), ConfigError> {
        let zero = |v: &u64| *v == 0;
        let hotplug = "Ferry has no memory hotplug";
        only("memory.hotplug_size", &self.hotplug_size, zero, hotplug)?;
        only(
            "memory.hotplugged_size",
            &self.hotplugged_size,
            zero,
            hotplug,
        )?;
        only(
            "memory.hotplug_method",
            &self.hotplug_method,
            |v| v == "Acpi",
            hotplug,
        )?;
        only(
            "memory.mergeable",
            &self.mergeable,
            |v| !v,
            "Ferry does not mark guest RAM mergeable (KSM)",
        )?;
        absent(
            "memory.hugepage_size",
            &self.hugepage_size,
            "Ferry does not back guest RAM with hugetlbfs",
        )?;
        only(
            "memory.prefault",
            &self.prefault,
            |v| !v,
            "Ferry does not prefault guest RAM",
        )?;
        only(
            "memory.reserve",
            &self.reserve,
            |v| !v,
            "Ferry does not reserve swap space for guest RAM",
        )?;
        only(
            "memory.thp",
            &self.thp,
            |&v| v,
            "Ferry always asks for transparent huge pages on private guest RAM",
        )?;
        empty("memory.zones", &self.zones, "Ferry has no memory zones")
    }
}

impl PayloadCompat {
    fn check(&self) -> Result<(), ConfigError> {
        let direct = "Ferry boots a kernel directly (payload.kernel)";
        absent("payload.firmware", &self.firmware, direct)?;
        absent("payload.igvm", &self.igvm, direct)?;
        absent(
            "payload.host_data",
            &self.host_data,
            "Ferry runs no confidential guests",
        )
    }
}

impl DiskCompat {
    fn check(&self, i: usize) -> Result<(), ConfigError> {
        let f = |name: &str| format!("disks[{i}].{name}");
        only(
            &f("direct"),
            &self.direct,
            |v| !v,
            "Ferry's disks go through the host page cache (no O_DIRECT)",
        )?;
        only(
            &f("num_queues"),
            &self.num_queues,
            |&v| v == 1,
            "Ferry's virtio-blk has one queue",
        )?;
        only(
            &f("queue_size"),
            &self.queue_size,
            |&v| v == 128,
            "Ferry sets the virtio-blk queue size itself (128, the default, is taken)",
        )?;
        let vhost = "Ferry has no vhost-user disks";
        only(&f("vhost_user"), &self.vhost_user, |v| !v, vhost)?;
        absent(&f("vhost_socket"), &self.vhost_socket, vhost)?;
        let limit = "Ferry has no I/O rate limiter";
        absent(&f("rate_limiter_config"), &self.rate_limiter_config, limit)?;
        absent(&f("rate_limit_group"), &self.rate_limit_group, limit)?;
        only(
            &f("pci_segment"),
            &self.pci_segment,
            |&v| v == 0,
            "Ferry has one PCI segment",
        )?;
        absent(
            &f("pci_device_id"),
            &self.pci_device_id,
            "Ferry places the PCI devices itself",
        )?;
        absent(
            &f("serial"),
            &self.serial,
            "Ferry's virtio-blk reports no serial number",
        )?;
        empty(
            &f("queue_affinity"),
            &self.queue_affinity,
            "Ferry does not pin queue threads",
        )?;
        only(
            &f("backing_files"),
            &self.backing_files,
            |v| !v,
            "Ferry reads raw images only",
        )?;
        only(
            &f("image_type"),
            &self.image_type,
            |v| v == "Raw",
            "Ferry reads raw images only",
        )?;
        only(
            &f("sparse"),
            &self.sparse,
            |&v| v,
            "Ferry leaves the image's holes as they are (true, the default, is taken)",
        )?;
        only(
            &f("lock_granularity"),
            &self.lock_granularity,
            |v| v == "ByteRange",
            "Ferry takes no lock on disk images",
        )
    }
}

impl ConsoleCompat {
    /// `Off` is taken; so is `tty_taken` (cloud-hypervisor's default for `console` is
    /// `Tty`, so its own configuration carries it) with a warning: nothing is connected.
    fn check(
        field: &str,
        c: &Option<ConsoleCompat>,
        tty_taken: bool,
        why: &'static str,
    ) -> Result<(), ConfigError> {
        match c.as_ref().and_then(|c| c.mode.as_deref()) {
            // Null: connected to nothing, which is what Ferry has.
            None | Some("Off") | Some("Null") => Ok(()),
            Some("Tty") if tty_taken => {
                log::warn!(
                    "{field}.mode Tty taken, but {why}: the guest's console device is absent"
                );
                Ok(())
            }
            Some(m) => Err(unsupported(&format!("{field}.mode"), m, why)),
        }
    }
}

impl VmCompat {
    fn check(&self) -> Result<(), ConfigError> {
        ConsoleCompat::check(
            "console",
            &self.console,
            true,
            "Ferry has no virtio-console: use serial (Off, Null and Tty are taken)",
        )?;
        ConsoleCompat::check(
            "debug_console",
            &self.debug_console,
            false,
            "Ferry has no debug I/O port console (Off is taken)",
        )?;
        only(
            "pvpanic",
            &self.pvpanic,
            |v| !v,
            "Ferry has no pvpanic device",
        )?;
        only(
            "watchdog",
            &self.watchdog,
            |v| !v,
            "Ferry has no watchdog device",
        )?;
        only(
            "landlock_enable",
            &self.landlock_enable,
            |v| !v,
            "Ferry confines itself with seccomp (--seccomp), not Landlock",
        )?;
        empty(
            "landlock_rules",
            &self.landlock_rules,
            "Ferry confines itself with seccomp (--seccomp), not Landlock",
        )?;
        empty(
            "rate_limit_groups",
            &self.rate_limit_groups,
            "Ferry has no I/O rate limiter",
        )?;
        empty("net", &self.net, "Ferry has no network device")?;
        empty("fs", &self.fs, "Ferry has no virtio-fs device")?;
        empty("pmem", &self.pmem, "Ferry has no virtio-pmem device")?;
        empty("vdpa", &self.vdpa, "Ferry has no vDPA devices")?;
        empty(
            "generic_vhost_user",
            &self.generic_vhost_user,
            "Ferry has no vhost-user devices",
        )?;
        empty("numa", &self.numa, "Ferry's guest has one NUMA node")?;
        empty(
            "pci_segments",
            &self.pci_segments,
            "Ferry has one PCI segment",
        )?;
        empty("sgx_epc", &self.sgx_epc, "Ferry offers no SGX enclaves")?;
        empty(
            "preserved_fds",
            &self.preserved_fds,
            "Ferry takes no file descriptors with vm.create",
        )?;
        absent("balloon", &self.balloon, "Ferry has no balloon device")?;
        absent("vsock", &self.vsock, "Ferry has no vsock device")?;
        absent("tpm", &self.tpm, "Ferry has no TPM")?;
        absent("rtc", &self.rtc, "Ferry has no virtio RTC device")?;
        if let Some(p) = &self.platform {
            if let Some((k, v)) = p.iter().find(|(k, v)| !platform_default(k, v)) {
                return Err(unsupported(
                    &format!("platform.{k}"),
                    v,
                    "Ferry's platform has one PCI segment, no SMBIOS identity and no confidential computing",
                ));
            }
        }
        Ok(())
    }
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
        self.check_cloud_hypervisor_fields()?;
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

    /// Refuses a cloud-hypervisor field set to a value Ferry cannot honour (the compat
    /// parts, Ferry's `memory.hugepages`, serial modes Pty and Socket).
    pub fn check_cloud_hypervisor_fields(&self) -> Result<(), ConfigError> {
        self.cpus.ch.check()?;
        if self.memory.hugepages {
            return Err(unsupported(
                "memory.hugepages",
                &true,
                "Ferry does not back guest RAM with hugetlbfs (it uses transparent huge pages)",
            ));
        }
        self.memory.ch.check()?;
        self.payload.ch.check()?;
        match self.serial.mode {
            ConsoleMode::Pty | ConsoleMode::Socket => {
                return Err(unsupported(
                    "serial.mode",
                    &self.serial.mode,
                    "Ferry's serial port goes to Off, Null, Tty or File",
                ))
            }
            _ => {}
        }
        absent(
            "serial.socket",
            &self.serial.socket,
            "Ferry's serial port goes to Off, Null, Tty or File",
        )?;
        for (i, d) in self.disks.iter().enumerate() {
            d.ch.check(i)?;
        }
        self.ch.check()
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
        ch: CpusCompat::default(),
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
    let mode = |mode| SerialConfig {
        mode,
        file: None,
        socket: None,
    };
    match s {
        "tty" => Ok(mode(ConsoleMode::Tty)),
        "off" => Ok(mode(ConsoleMode::Off)),
        "null" => Ok(mode(ConsoleMode::Null)),
        _ => match s.strip_prefix("file=") {
            Some(p) if !p.is_empty() => Ok(SerialConfig {
                mode: ConsoleMode::File,
                file: Some(PathBuf::from(p)),
                socket: None,
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
        ch: DiskCompat::default(),
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

/// `--console off|null|tty|pty|file=PATH|socket=PATH` (cloud-hypervisor's virtio-console
/// option), as its `console.mode`: checked by [`VmConfig::validate`] like `vm.create`'s
/// (Off and Null are taken, Tty with a warning, the others refused: no virtio-console).
pub fn parse_console(s: &str) -> Result<ConsoleCompat, ConfigError> {
    let mode = match s.split_once('=').map_or(s, |(k, _)| k) {
        "off" => "Off",
        "null" => "Null",
        "tty" => "Tty",
        "pty" => "Pty",
        "file" => "File",
        "socket" => "Socket",
        _ => {
            return Err(bad(
                "console",
                "mode",
                s,
                "expected off, null, tty, pty, file=PATH or socket=PATH",
            ))
        }
    };
    Ok(ConsoleCompat {
        mode: Some(mode.into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_option_is_checked_as_vm_create_checks_console() {
        let with = |s: &str| -> Result<(), ConfigError> {
            let mut c: VmConfig = serde_json::from_str(r#"{"payload":{}}"#).unwrap();
            c.ch.console = Some(parse_console(s)?);
            c.ch.check()
        };
        for ok in ["off", "null", "tty"] {
            assert_eq!(with(ok), Ok(()), "{ok}");
        }
        for no in ["pty", "file=/tmp/c", "socket=/tmp/s"] {
            let e = with(no).unwrap_err().to_string();
            assert!(
                e.contains("console.mode") && e.contains("virtio-console"),
                "{no}: {e}"
            );
        }
        let e = parse_console("serial").unwrap_err().to_string();
        assert!(e.contains("serial") && e.contains("expected off"), "{e}");
    }

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
        // cloud-hypervisor's empty or null lists are taken; a device Ferry lacks is not.
        let mut c: VmConfig =
            serde_json::from_str(r#"{"payload":{},"net":[],"disks":null,"devices":null}"#).unwrap();
        c.validate().unwrap();
        let mut c: VmConfig =
            serde_json::from_str(r#"{"payload":{},"net":[{"tap":"tap0"}]}"#).unwrap();
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            r#"net: [{"tap":"tap0"}] is not supported by Ferry: Ferry has no network device"#
        );
    }

    /// cloud-hypervisor's configuration as its vm.info reports it for a default VM: every
    /// field is read, the defaults are taken, and none of them is written back.
    #[test]
    fn cloud_hypervisor_defaults_are_taken() {
        let j = serde_json::json!({
            "cpus": {"boot_vcpus": 1, "max_vcpus": 1, "topology": null, "kvm_hyperv": false,
                "max_phys_bits": 46, "affinity": null, "features": {"amx": false},
                "nested": true, "core_scheduling": "Vm", "profile": "Host"},
            "memory": {"size": 536870912u64, "mergeable": false, "hotplug_method": "Acpi",
                "hotplug_size": null, "hotplugged_size": null, "shared": false,
                "hugepages": false, "hugepage_size": null, "prefault": false,
                "reserve": false, "zones": null, "thp": true},
            "payload": {"firmware": null, "kernel": "/k", "cmdline": "c", "initramfs": null,
                "igvm": null, "host_data": null},
            "rate_limit_groups": null, "disks": null, "net": null,
            "rng": {"src": "/dev/urandom", "iommu": false, "id": null, "pci_segment": 0},
            "balloon": null, "fs": null, "pmem": null,
            "serial": {"file": null, "mode": "Null", "iommu": false, "socket": null},
            "console": {"file": null, "mode": "Off", "iommu": false, "socket": null},
            "debug_console": {"file": null, "mode": "Off", "iobase": 233},
            "devices": null, "user_devices": null, "vdpa": null, "vsock": null,
            "pvpanic": false, "iommu": false, "numa": null, "watchdog": false,
            "pci_segments": null, "platform": {"num_pci_segments": 1, "iommu_segments": null,
                "serial_number": null, "uuid": null, "oem_strings": null, "tdx": false,
                "sev_snp": false}, "tpm": null, "preserved_fds": null,
            "landlock_enable": false, "landlock_rules": null, "sgx_epc": null,
            "some_future_field": {"x": 1}
        });
        let mut c: VmConfig = serde_json::from_value(j).unwrap();
        c.validate().unwrap();
        assert_eq!(c.memory.size, 512 << 20);
        assert_eq!(c.rng.as_ref().unwrap().src, PathBuf::from("/dev/urandom"));
        assert!(c.disks.is_empty() && c.devices.is_empty() && c.user_devices.is_empty());
        // Written back as Ferry's own configuration: no compat field, no null.
        let v = serde_json::to_value(&c).unwrap();
        let mut plain = VmConfig::default();
        plain.payload.kernel = Some("/k".into());
        plain.payload.cmdline = Some("c".into());
        plain.rng = c.rng.clone();
        plain.validate().unwrap();
        assert_eq!(v, serde_json::to_value(&plain).unwrap());
        assert!(!v.to_string().contains("null"), "{v}");
        assert_eq!(
            v["payload"],
            serde_json::json!({"kernel": "/k", "cmdline": "c"})
        );
        assert_eq!(v["serial"], serde_json::json!({"mode": "Null"}));
        assert_eq!(
            v["cpus"],
            serde_json::json!({"boot_vcpus": 1, "max_vcpus": 1})
        );
    }

    /// Each value Ferry cannot honour is refused, naming the field and the value.
    #[test]
    fn cloud_hypervisor_values_ferry_cannot_honour() {
        for (patch, msg) in [
            (r#"{"cpus":{"boot_vcpus":1,"kvm_hyperv":true}}"#, "cpus.kvm_hyperv: true "),
            (r#"{"cpus":{"boot_vcpus":1,"nested":false}}"#, "cpus.nested: false "),
            (r#"{"cpus":{"boot_vcpus":1,"max_phys_bits":40}}"#, "cpus.max_phys_bits: 40 "),
            (r#"{"cpus":{"boot_vcpus":1,"features":{"amx":true}}}"#, r#"cpus.features: {"amx":true} "#),
            (r#"{"cpus":{"boot_vcpus":1,"core_scheduling":"Vcpu"}}"#, r#"cpus.core_scheduling: "Vcpu" "#),
            (r#"{"cpus":{"boot_vcpus":1,"profile":"Skylake"}}"#, r#"cpus.profile: "Skylake" "#),
            (r#"{"cpus":{"boot_vcpus":1,"affinity":[{"vcpu":0,"host_cpus":[1]}]}}"#, "cpus.affinity: "),
            (r#"{"cpus":{"boot_vcpus":1,"topology":{"threads_per_core":1,"cores_per_die":1,"dies_per_package":1,"packages":1}}}"#, "cpus.topology: "),
            (r#"{"memory":{"size":536870912,"hugepages":true}}"#, "memory.hugepages: true is not supported by Ferry: Ferry does not back guest RAM with hugetlbfs"),
            (r#"{"memory":{"size":536870912,"mergeable":true}}"#, "memory.mergeable: true "),
            (r#"{"memory":{"size":536870912,"prefault":true}}"#, "memory.prefault: true "),
            (r#"{"memory":{"size":536870912,"reserve":true}}"#, "memory.reserve: true "),
            (r#"{"memory":{"size":536870912,"thp":false}}"#, "memory.thp: false "),
            (r#"{"memory":{"size":536870912,"hotplug_size":1073741824}}"#, "memory.hotplug_size: 1073741824 "),
            (r#"{"memory":{"size":536870912,"hotplug_method":"VirtioMem"}}"#, r#"memory.hotplug_method: "VirtioMem" "#),
            (r#"{"memory":{"size":536870912,"hugepage_size":2097152}}"#, "memory.hugepage_size: 2097152 "),
            (r#"{"memory":{"size":536870912,"zones":[{"id":"z","size":1}]}}"#, "memory.zones: "),
            (r#"{"payload":{"kernel":"/k","firmware":"/fw"}}"#, r#"payload.firmware: "/fw" "#),
            (r#"{"payload":{"kernel":"/k","igvm":"/i"}}"#, r#"payload.igvm: "/i" "#),
            (r#"{"serial":{"mode":"Pty"}}"#, r#"serial.mode: "Pty" "#),
            (r#"{"serial":{"mode":"Socket","socket":"/s"}}"#, r#"serial.mode: "Socket" "#),
            (r#"{"console":{"mode":"File"}}"#, r#"console.mode: "File" "#),
            (r#"{"debug_console":{"mode":"Tty","iobase":233}}"#, r#"debug_console.mode: "Tty" "#),
            (r#"{"pvpanic":true}"#, "pvpanic: true "),
            (r#"{"watchdog":true}"#, "watchdog: true "),
            (r#"{"landlock_enable":true}"#, "landlock_enable: true "),
            (r#"{"balloon":{"size":0}}"#, r#"balloon: {"size":0} "#),
            (r#"{"vsock":{"cid":3,"socket":"/v"}}"#, "vsock: "),
            (r#"{"fs":[{"tag":"t","socket":"/s"}]}"#, "fs: "),
            (r#"{"pmem":[{"file":"/p"}]}"#, "pmem: "),
            (r#"{"numa":[{"guest_numa_id":0}]}"#, "numa: "),
            (r#"{"tpm":{"socket":"/t"}}"#, "tpm: "),
            (r#"{"platform":{"num_pci_segments":2}}"#, "platform.num_pci_segments: 2 "),
            (r#"{"platform":{"uuid":"u"}}"#, r#"platform.uuid: "u" "#),
            (r#"{"disks":[{"path":"/a","direct":true}]}"#, "disks[0].direct: true "),
            (r#"{"disks":[{"path":"/a"},{"path":"/b","num_queues":4}]}"#, "disks[1].num_queues: 4 "),
            (r#"{"disks":[{"path":"/a","image_type":"Qcow2"}]}"#, r#"disks[0].image_type: "Qcow2" "#),
            (r#"{"disks":[{"path":"/a","vhost_user":true}]}"#, "disks[0].vhost_user: true "),
        ] {
            let mut v: serde_json::Value = serde_json::from_str(patch).unwrap();
            let payload = v.get("payload").cloned();
            v["payload"] = payload.unwrap_or(serde_json::json!({"kernel": "/k"}));
            let mut c: VmConfig = serde_json::from_value(v).unwrap_or_else(|e| panic!("{patch}: {e}"));
            let e = c.validate().unwrap_err();
            assert!(matches!(e, ConfigError::Unsupported { .. }), "{patch}: {e}");
            let e = e.to_string();
            assert!(e.starts_with(msg), "{patch}: {e}");
            assert!(e.contains("is not supported by Ferry: "), "{patch}: {e}");
        }
        // A long value is shortened.
        let long = format!(
            r#"{{"payload":{{"kernel":"/k"}},"net":[{{"tap":"{}"}}]}}"#,
            "t".repeat(500)
        );
        let mut c: VmConfig = serde_json::from_str(&long).unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.len() < 400 && e.contains("..."), "{e}");
        // Ferry's own command line refuses hugepages=on the same way.
        let mut c = VmConfig {
            memory: parse_memory("size=512M,hugepages=on").unwrap(),
            ..Default::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("memory.hugepages: true"));
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
            ch: DiskCompat::default(),
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
                ch: DiskCompat::default(),
            }
        );
        assert_eq!(
            parse_disk("path=/a.raw,readonly=on,id=root").unwrap(),
            DiskConfig {
                path: "/a.raw".into(),
                readonly: true,
                id: Some("root".into()),
                iommu: false,
                ch: DiskCompat::default(),
            }
        );
        assert_eq!(
            parse_disk("iommu=on,path=/a.raw,readonly=off,id=d").unwrap(),
            DiskConfig {
                path: "/a.raw".into(),
                readonly: false,
                id: Some("d".into()),
                iommu: true,
                ch: DiskCompat::default(),
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
            (r#"{"payload":{},"disks":[{"readonly":true}]}"#, "path"),
            (r#"{"payload":{},"rng":{}}"#, "src"),
            (r#"{"payload":{},"rng":{"src":"/r","iommu":"on"}}"#, "on"),
            (
                r#"{"payload":{},"disks":[{"path":"/a","iommu":1}]}"#,
                "boolean",
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
        // Unknown fields are ignored, as cloud-hypervisor does.
        assert!(serde_json::from_str::<VmConfig>(
            r#"{"payload":{"kernel":"/k"},"devices":[{"path":"/a","bogus":1}]}"#
        )
        .is_ok());
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
