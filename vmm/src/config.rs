//! The VM configuration: cloud-hypervisor's `VmConfig` field names (so its JSON bodies
//! work unchanged), plus Ferry's `dirty_tracking`. The command line is parsed into it.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Largest vCPU count: APIC ids are 8 bits in the MADT entries Ferry writes.
pub const MAX_VCPUS: u32 = 254;
/// Default dirty ring size in entries: the largest KVM allows on x86 (1 MiB per vCPU).
/// This machine's KVM only exits on a completely full ring, so a ring that fills
/// between two harvests loses entries and forces an all-RAM resend; a big ring makes
/// that rare (see the hypervisor crate).
pub const DEFAULT_RING_ENTRIES: u32 = 65536;

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
    #[serde(default)]
    pub iommu: bool,
    #[serde(default)]
    pub dirty_tracking: DirtyTrackingConfig,
}

impl VmConfig {
    /// Checks what can be checked without touching KVM or files; fills defaults.
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
) -> Result<Vec<(&'a str, &'a str)>, ConfigError> {
    let names: Vec<&str> = accepted.split(", ").collect();
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            if names.contains(&k) {
                Ok((k, v))
            } else {
                Err(ConfigError::UnknownParam {
                    option,
                    param: k.to_string(),
                    accepted,
                })
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
    let onoff = |p: &'static str, v: &str| match v {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err(bad("memory", p, v, "expected on or off")),
    };
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
        let e = serde_json::from_str::<VmConfig>(r#"{"payload":{},"disks":[]}"#).unwrap_err();
        assert!(e.to_string().contains("disks"), "{e}");
    }
}
