//! The test guest's command line: `workload=idle|dirty|verify|dma-verify|dma-bench
//! start=ADDR size=SIZE passes=N rate=PAGES_PER_SEC pci=scan|off dma=blk|rng|vfio-user vstart=ADDR
//! vsize=SIZE bs=BYTES secs=N irq=off|msix|intx iommu=on|off remap=on|off detach=on|off
//! nested-dirty=on|off fault=on|off`, and the rules its workload regions must follow.
//!
//! Words are separated by whitespace. Words that are not `key=value` with one of the keys
//! above are ignored (VMMs add their own, e.g. `console=ttyS0`); a known key with a value
//! that does not parse is a [`BadArgument`]. When a key is given twice the last one wins.
//!
//! Numbers are decimal or `0x` hexadecimal, optionally followed by `K`, `M`, `G` or `T`
//! (binary multiples, either case): `1M`, `0x100000` and `1048576` are the same.

use core::fmt;
use core::ops::Range;

use crate::PAGE_SIZE;

/// Default start of the workload region: 1 MiB.
pub const DEFAULT_START: u64 = 1 << 20;
/// Default size of the workload region: 100 MiB.
pub const DEFAULT_SIZE: u64 = 100 << 20;
/// `dma-bench`: default request size (`bs=`).
pub const DEFAULT_BS: u64 = 4 << 10;
/// `dma-bench`: largest request size (`bs=`).
pub const MAX_BS: u64 = 1 << 20;
/// `dma-bench`: default run time in seconds (`secs=`) when `passes=` is not given.
pub const DEFAULT_SECS: u64 = 5;

/// What the vCPUs do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// Print the ready line and halt every vCPU.
    Idle,
    /// Increment the first byte of every page of the share, forever or `passes` times.
    Dirty,
    /// Check then rewrite every page of the share with the next generation's pattern.
    Verify,
    /// Check every page of the share still holds what a DMA device (virtio-blk,
    /// virtio-rng or `ferry-dma-device`) last wrote into it, then have the device
    /// overwrite it (`dma=`), pass after pass; optionally `verify` on a second region at
    /// the same time (`vsize=`).
    DmaVerify,
    /// Throughput: the boot vCPU has virtio-blk read the disk sequentially into the region,
    /// `bs=` bytes a request, the queue kept full, for `secs=` seconds or `passes=` passes
    /// over the disk, and reports requests, bytes, MiB/s and requests/s.
    DmaBench,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::Idle => "idle",
            Workload::Dirty => "dirty",
            Workload::Verify => "verify",
            Workload::DmaVerify => "dma-verify",
            Workload::DmaBench => "dma-bench",
        }
    }
}

/// The device `dma-verify` or `dma-bench` drives (`dma=`; `dma-bench`: `blk` only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dma {
    /// virtio-blk: pages are read from disk blocks the guest wrote at start.
    Blk,
    /// virtio-rng: pages are filled with random bytes.
    Rng,
    /// `ferry-dma-device`, an out-of-process PCI device (vfio-user server): pages are
    /// written with [`crate::fill_page`] of a generation the device picks per job (see
    /// [`crate::user_device`]). `dma-verify` only; no interrupts, no `fault=on`.
    VfioUser,
}

impl Dma {
    /// Every device, in the order of their `as u8` values.
    pub const ALL: [Dma; 3] = [Dma::Blk, Dma::Rng, Dma::VfioUser];

    pub fn name(self) -> &'static str {
        match self {
            Dma::Blk => "blk",
            Dma::Rng => "rng",
            Dma::VfioUser => "vfio-user",
        }
    }

    /// The device whose `as u8` value is `v` (for keeping a `Dma` in an atomic).
    pub fn from_u8(v: u8) -> Option<Dma> {
        Dma::ALL.get(usize::from(v)).copied()
    }
}

/// How the virtio driver of `dma-verify` / `dma-bench` hears of completed requests
/// (`irq=`). It always polls the used rings; interrupts are taken and counted on top.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Irq {
    /// No interrupts: MSI-X disabled, every queue says NO_INTERRUPT.
    #[default]
    Off,
    /// MSI-X: one table entry per queue, aimed at the boot vCPU, taken in ring 3 and
    /// counted.
    Msix,
    /// INTx: MSI-X left off, pin A's line (the interrupt line register) routed through
    /// the IOAPIC to the boot vCPU, acknowledged by reading the ISR, counted.
    Intx,
}

impl Irq {
    pub fn name(self) -> &'static str {
        match self {
            Irq::Off => "off",
            Irq::Msix => "msix",
            Irq::Intx => "intx",
        }
    }
}

/// The parsed command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// `workload=`; `idle` when absent.
    pub workload: Workload,
    /// `start=`: guest-physical start of the workload region.
    pub start: u64,
    /// `size=`: bytes in the workload region.
    pub size: u64,
    /// `passes=`: passes per vCPU before `guest: PASS`; `None` = forever.
    pub passes: Option<u64>,
    /// `rate=`: pages per second per vCPU; `None` = as fast as possible.
    pub rate: Option<u64>,
    /// `pci=scan`: list PCI bus 0 at boot, through ports 0xCF8/0xCFC and through ECAM.
    pub pci_scan: bool,
    /// `dma=`: the device of `workload=dma-verify` / `dma-bench` (required with them,
    /// refused with the others).
    pub dma: Option<Dma>,
    /// `vstart=`: start of the `verify` region run alongside `dma-verify`; `None` = right
    /// after the `dma-verify` region. Only with `vsize=`.
    pub vstart: Option<u64>,
    /// `vsize=`: bytes in the `verify` region run alongside `dma-verify`; `None` = no such
    /// region.
    pub vsize: Option<u64>,
    /// `bs=`: `dma-bench`'s request size; `None` = [`DEFAULT_BS`].
    pub bs: Option<u64>,
    /// `secs=`: how long `dma-bench` runs; `None` = [`DEFAULT_SECS`] unless `passes=`.
    pub secs: Option<u64>,
    /// `irq=`: interrupts from the `dma-verify` / `dma-bench` device; `off` by default.
    pub irq: Irq,
    /// `iommu=on`: `dma-verify` or `dma-bench` drives its device through a virtio-iommu:
    /// the device's endpoint is attached to a domain and sees only IOVAs (see
    /// [`crate::viommu`]).
    pub iommu: bool,
    /// `remap=on` (with `iommu=on`): windows of the region are unmapped and mapped again
    /// while the device works.
    pub remap: bool,
    /// `detach=on` (with `iommu=on`): between passes the endpoint is detached and attached
    /// again, and everything mapped again.
    pub detach: bool,
    /// `nested-dirty=on` (with `iommu=on`): the domain's dirty tracking (Ferry's
    /// virtio-iommu extension, feature bit 10) is turned on and checked every pass.
    pub nested_dirty: bool,
    /// `fault=on` (with `iommu=on`): once, at boot, the device gets a buffer at an
    /// unmapped IOVA; the request must fail and a fault record arrive.
    pub fault: bool,
    /// `power-button=on`: the ACPI fixed-feature power button's event is enabled; its SCI
    /// makes the guest say so and power off (S5). Any workload.
    pub power_button: bool,
}

impl Config {
    /// `dma-bench`'s request size in bytes.
    pub fn bench_bs(&self) -> u64 {
        self.bs.unwrap_or(DEFAULT_BS)
    }

    /// `dma-bench`'s run time in seconds: `None` when it runs `passes=` passes instead.
    pub fn bench_secs(&self) -> Option<u64> {
        match (self.secs, self.passes) {
            (Some(s), _) => Some(s),
            (None, Some(_)) => None,
            (None, None) => Some(DEFAULT_SECS),
        }
    }

    /// The region `verify` runs on alongside `dma-verify`, if `vsize=` was given (it may
    /// be empty or run past the address space: see [`check_verify_region`]).
    pub fn verify_region(&self) -> Option<Range<u64>> {
        let size = self.vsize?;
        let start = self.vstart.unwrap_or(self.start.saturating_add(self.size));
        Some(start..start.saturating_add(size))
    }

    /// The value in effect for region key `key` (`start`, `size`, `vstart`, `vsize`).
    pub fn region_value(&self, key: &str) -> u64 {
        match key {
            "start" => self.start,
            "size" => self.size,
            "vstart" => self.verify_region().map_or(0, |r| r.start),
            "vsize" => self.vsize.unwrap_or(0),
            _ => 0,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            workload: Workload::Idle,
            start: DEFAULT_START,
            size: DEFAULT_SIZE,
            passes: None,
            rate: None,
            pci_scan: false,
            dma: None,
            vstart: None,
            vsize: None,
            bs: None,
            secs: None,
            irq: Irq::Off,
            iommu: false,
            remap: false,
            detach: false,
            nested_dirty: false,
            fault: false,
            power_button: false,
        }
    }
}

/// A known key whose value is not acceptable, as written on the command line (an empty
/// value for a key that is missing), and why when the value alone does not say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadArgument<'a> {
    pub key: &'a [u8],
    pub value: &'a [u8],
    pub why: Option<&'static str>,
}

impl fmt::Display for BadArgument<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bad argument ")?;
        write_lossy(f, self.key)?;
        write!(f, "=")?;
        write_lossy(f, self.value)?;
        match self.why {
            Some(why) => write!(f, " ({why})"),
            None => Ok(()),
        }
    }
}

/// Writes bytes as text, printable ASCII as is and anything else as `?`.
pub fn write_lossy(f: &mut dyn fmt::Write, bytes: &[u8]) -> fmt::Result {
    for &b in bytes {
        f.write_char(if (0x20..0x7f).contains(&b) {
            b as char
        } else {
            '?'
        })?;
    }
    Ok(())
}

/// The words of a command line: split on ASCII whitespace, ending at the first NUL.
fn words(cmdline: &[u8]) -> impl Iterator<Item = &[u8]> {
    let end = cmdline
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(cmdline.len());
    cmdline[..end]
        .split(|b| b.is_ascii_whitespace())
        .filter(|w| !w.is_empty())
}

/// Splits `key=value`; a word without `=` is a key with an empty value.
fn split_word(word: &[u8]) -> (&[u8], &[u8]) {
    match word.iter().position(|&b| b == b'=') {
        Some(i) => (&word[..i], &word[i + 1..]),
        None => (word, &[]),
    }
}

/// Parses the command line. See the module documentation for the syntax.
pub fn parse(cmdline: &[u8]) -> Result<Config, BadArgument<'_>> {
    let mut c = Config::default();
    for word in words(cmdline) {
        let (key, value) = split_word(word);
        let bad = BadArgument {
            key,
            value,
            why: None,
        };
        match key {
            b"workload" => {
                c.workload = match value {
                    b"idle" => Workload::Idle,
                    b"dirty" => Workload::Dirty,
                    b"verify" => Workload::Verify,
                    b"dma-verify" => Workload::DmaVerify,
                    b"dma-bench" => Workload::DmaBench,
                    _ => return Err(bad),
                }
            }
            b"start" => c.start = parse_number(value).ok_or(bad)?,
            b"size" => c.size = parse_number(value).ok_or(bad)?,
            b"passes" => c.passes = Some(parse_number(value).filter(|&n| n > 0).ok_or(bad)?),
            b"rate" => c.rate = Some(parse_number(value).filter(|&n| n > 0).ok_or(bad)?),
            b"pci" => {
                c.pci_scan = match value {
                    b"scan" => true,
                    b"off" => false,
                    _ => return Err(bad),
                }
            }
            b"dma" => {
                c.dma = Some(match value {
                    b"blk" => Dma::Blk,
                    b"rng" => Dma::Rng,
                    b"vfio-user" => Dma::VfioUser,
                    _ => return Err(bad),
                })
            }
            b"vstart" => c.vstart = Some(parse_number(value).ok_or(bad)?),
            b"vsize" => c.vsize = Some(parse_number(value).ok_or(bad)?),
            b"bs" => {
                c.bs = Some(
                    parse_number(value)
                        .filter(|&n| n > 0 && n <= MAX_BS && n.is_multiple_of(PAGE_SIZE as u64))
                        .ok_or(BadArgument {
                            why: Some("a multiple of 4K from 4K to 1M"),
                            ..bad
                        })?,
                )
            }
            b"secs" => c.secs = Some(parse_number(value).filter(|&n| n > 0).ok_or(bad)?),
            b"irq" => {
                c.irq = match value {
                    b"off" => Irq::Off,
                    b"msix" => Irq::Msix,
                    b"intx" => Irq::Intx,
                    _ => return Err(bad),
                }
            }
            b"iommu" => c.iommu = on_off(value).ok_or(bad)?,
            b"remap" => c.remap = on_off(value).ok_or(bad)?,
            b"detach" => c.detach = on_off(value).ok_or(bad)?,
            b"nested-dirty" => c.nested_dirty = on_off(value).ok_or(bad)?,
            b"fault" => c.fault = on_off(value).ok_or(bad)?,
            b"power-button" => c.power_button = on_off(value).ok_or(bad)?,
            _ => {}
        }
    }
    // Keys that only go with one workload, and keys that need each other.
    let given = |key: &'static str, why| BadArgument {
        key: key.as_bytes(),
        value: raw_value(cmdline, key).unwrap_or_default(),
        why: Some(why),
    };
    let dma_workload = matches!(c.workload, Workload::DmaVerify | Workload::DmaBench);
    if dma_workload && c.dma.is_none() {
        return Err(given(
            "dma",
            if c.workload == Workload::DmaBench {
                "required with workload=dma-bench: blk"
            } else {
                "required with workload=dma-verify: blk or rng"
            },
        ));
    }
    if c.workload == Workload::DmaVerify && c.vstart.is_some() && c.vsize.is_none() {
        return Err(given("vstart", "needs vsize="));
    }
    if c.workload == Workload::DmaBench {
        if matches!(c.dma, Some(Dma::Rng | Dma::VfioUser)) {
            return Err(given("dma", "workload=dma-bench drives blk only"));
        }
        if c.secs.is_some() && c.passes.is_some() {
            return Err(given("secs", "not with passes="));
        }
        if c.rate.is_some() {
            return Err(given("rate", "not with workload=dma-bench"));
        }
        if c.size < c.bench_bs() {
            return Err(given("size", "smaller than bs="));
        }
        // iommu=on: a request's buffer must be one run of IOVAs, inside one window of the
        // region (`crate::viommu::WINDOW_BYTES`); buffers at multiples of `bs` are when `bs`
        // divides the window.
        if c.iommu && !crate::viommu::WINDOW_BYTES.is_multiple_of(c.bench_bs()) {
            return Err(given("bs", "with iommu=on: a power of two, dividing 2M"));
        }
    }
    // dma=vfio-user (dma-verify): the device has no interrupts, and it checks a job's
    // mappings itself (STATUS_UNMAPPED) before any access reaches the IOMMU, so
    // `fault=on`'s test (a fault record from the virtio-iommu) does not apply to it.
    let user_device = c.workload == Workload::DmaVerify && c.dma == Some(Dma::VfioUser);
    for (key, set, why) in [
        (
            "dma",
            c.dma.is_some() && !dma_workload,
            "only with workload=dma-verify or dma-bench",
        ),
        (
            "vstart",
            c.vstart.is_some() && c.workload != Workload::DmaVerify,
            "only with workload=dma-verify",
        ),
        (
            "vsize",
            c.vsize.is_some() && c.workload != Workload::DmaVerify,
            "only with workload=dma-verify",
        ),
        (
            "bs",
            c.bs.is_some() && c.workload != Workload::DmaBench,
            "only with workload=dma-bench",
        ),
        (
            "secs",
            c.secs.is_some() && c.workload != Workload::DmaBench,
            "only with workload=dma-bench",
        ),
        (
            "irq",
            c.irq != Irq::Off && !dma_workload,
            "only with workload=dma-verify or dma-bench",
        ),
        (
            "iommu",
            c.iommu && !dma_workload,
            "only with workload=dma-verify or dma-bench",
        ),
        ("remap", c.remap && !c.iommu, "needs iommu=on"),
        ("detach", c.detach && !c.iommu, "needs iommu=on"),
        ("nested-dirty", c.nested_dirty && !c.iommu, "needs iommu=on"),
        ("fault", c.fault && !c.iommu, "needs iommu=on"),
        (
            "remap",
            c.remap && c.workload == Workload::DmaBench,
            "only with workload=dma-verify",
        ),
        (
            "detach",
            c.detach && c.workload == Workload::DmaBench,
            "only with workload=dma-verify",
        ),
        (
            "nested-dirty",
            c.nested_dirty && c.workload == Workload::DmaBench,
            "only with workload=dma-verify",
        ),
        (
            "fault",
            c.fault && c.workload == Workload::DmaBench,
            "only with workload=dma-verify",
        ),
        (
            "irq",
            user_device && c.irq != Irq::Off,
            "dma=vfio-user has no interrupts",
        ),
        (
            "fault",
            user_device && c.fault,
            "not with dma=vfio-user: the device refuses an unmapped job itself \
             (STATUS_UNMAPPED), so no fault record comes",
        ),
    ] {
        if set {
            return Err(given(key, why));
        }
    }
    Ok(c)
}

/// `on` / `off`.
fn on_off(value: &[u8]) -> Option<bool> {
    match value {
        b"on" => Some(true),
        b"off" => Some(false),
        _ => None,
    }
}

/// The value last given to `key` on the command line, as written.
pub fn raw_value<'a>(cmdline: &'a [u8], key: &str) -> Option<&'a [u8]> {
    words(cmdline)
        .map(split_word)
        .filter(|(k, _)| *k == key.as_bytes())
        .map(|(_, v)| v)
        .last()
}

/// Parses `123`, `0x7b`, `4K`, `0x10M`, `1G`, `2t`. `None` when malformed or over
/// `u64::MAX`.
pub fn parse_number(s: &[u8]) -> Option<u64> {
    let (digits, shift) = match s.last()?.to_ascii_uppercase() {
        b'K' => (&s[..s.len() - 1], 10),
        b'M' => (&s[..s.len() - 1], 20),
        b'G' => (&s[..s.len() - 1], 30),
        b'T' => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    let (digits, radix) = match digits {
        [b'0', b'x' | b'X', rest @ ..] => (rest, 16),
        _ => (digits, 10),
    };
    if digits.is_empty() {
        return None;
    }
    let mut n: u64 = 0;
    for &d in digits {
        let v = (d as char).to_digit(radix)?;
        n = n.checked_mul(u64::from(radix))?.checked_add(u64::from(v))?;
    }
    if n.leading_zeros() < shift {
        return None;
    }
    Some(n << shift)
}

/// Why a workload region is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegionProblem {
    /// `start` is not a multiple of the page size.
    Unaligned,
    /// `size` is zero or not a multiple of the page size.
    BadSize,
    /// The region runs past the end of the address space.
    Overflow,
    /// Part of the region is not RAM in the memory map.
    NotRam,
    /// The region overlaps a range the guest needs for itself (its image).
    Reserved(Range<u64>),
    /// The `verify` region overlaps the `dma-verify` region.
    OverlapsDmaRegion(Range<u64>),
}

/// A refused workload region: the key to blame (`start` or `size`) and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionError {
    pub key: &'static str,
    pub problem: RegionProblem,
}

impl fmt::Display for RegionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.problem {
            RegionProblem::Unaligned => write!(f, "not a multiple of {PAGE_SIZE}"),
            RegionProblem::BadSize => write!(f, "not a non-zero multiple of {PAGE_SIZE}"),
            RegionProblem::Overflow => write!(f, "past the end of the address space"),
            RegionProblem::NotRam => write!(f, "not all RAM in the memory map"),
            RegionProblem::Reserved(r) => {
                write!(f, "overlaps the guest image {:#x}-{:#x}", r.start, r.end)
            }
            RegionProblem::OverlapsDmaRegion(r) => {
                write!(
                    f,
                    "overlaps the dma-verify region {:#x}-{:#x}",
                    r.start, r.end
                )
            }
        }
    }
}

/// Checks that `[start, start + size)` is page-aligned, covered by `ram` (ranges in any
/// order, possibly adjacent) and clear of every range in `reserved`. A problem at the
/// start address blames `start`; one further on blames `size`.
pub fn check_region(
    start: u64,
    size: u64,
    ram: &[Range<u64>],
    reserved: &[Range<u64>],
) -> Result<(), RegionError> {
    let page = PAGE_SIZE as u64;
    let err = |key, problem| Err(RegionError { key, problem });
    if !start.is_multiple_of(page) {
        return err("start", RegionProblem::Unaligned);
    }
    if size == 0 || !size.is_multiple_of(page) {
        return err("size", RegionProblem::BadSize);
    }
    let Some(end) = start.checked_add(size) else {
        return err("size", RegionProblem::Overflow);
    };
    for r in reserved {
        if r.start <= start && start < r.end {
            return err("start", RegionProblem::Reserved(r.clone()));
        }
    }
    for r in reserved {
        if r.start < end && start < r.end {
            return err("size", RegionProblem::Reserved(r.clone()));
        }
    }
    // Walk from `start` through RAM ranges that contain the current address.
    let mut at = start;
    while at < end {
        match ram
            .iter()
            .filter(|r| r.start <= at && at < r.end)
            .map(|r| r.end)
            .max()
        {
            Some(next) => at = next,
            None => {
                let key = if at == start { "start" } else { "size" };
                return err(key, RegionProblem::NotRam);
            }
        }
    }
    Ok(())
}

/// Checks the `verify` region of `dma-verify` (`vstart=`/`vsize=`), if there is one, by
/// the rules of [`check_region`] (problems blame `vstart` or `vsize`), and that it does
/// not overlap the `dma-verify` region.
pub fn check_verify_region(
    cfg: &Config,
    ram: &[Range<u64>],
    reserved: &[Range<u64>],
) -> Result<(), RegionError> {
    let (Some(size), Some(v)) = (cfg.vsize, cfg.verify_region()) else {
        return Ok(());
    };
    check_region(v.start, size, ram, reserved).map_err(|e| RegionError {
        key: if e.key == "start" { "vstart" } else { "vsize" },
        problem: e.problem,
    })?;
    let dma = cfg.start..cfg.start + cfg.size;
    if dma.start < v.end && v.start < dma.end {
        let key = if dma.contains(&v.start) {
            "vstart"
        } else {
            "vsize"
        };
        return Err(RegionError {
            key,
            problem: RegionProblem::OverlapsDmaRegion(dma),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::string::{String, ToString};

    #[test]
    fn defaults() {
        let c = parse(b"").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!((c.start, c.size), (0x10_0000, 0x640_0000));
        assert_eq!(c.workload, Workload::Idle);
    }

    #[test]
    fn all_keys() {
        let c = parse(b"console=ttyS0 workload=verify start=0x200000 size=64M passes=3 rate=1000 pci=scan power-button=on quiet\0junk=1").unwrap();
        assert_eq!(
            c,
            Config {
                workload: Workload::Verify,
                start: 0x20_0000,
                size: 64 << 20,
                passes: Some(3),
                rate: Some(1000),
                pci_scan: true,
                dma: None,
                vstart: None,
                vsize: None,
                bs: None,
                secs: None,
                irq: Irq::Off,
                iommu: false,
                remap: false,
                detach: false,
                nested_dirty: false,
                fault: false,
                power_button: true,
            }
        );
        assert!(!parse(b"pci=scan pci=off").unwrap().pci_scan);
        assert!(parse(b"power-button=maybe").is_err());
        assert_eq!(
            parse(b"pci=yes").unwrap_err(),
            BadArgument {
                key: b"pci",
                value: b"yes",
                why: None,
            }
        );
        assert_eq!(parse(b"workload=dirty").unwrap().workload, Workload::Dirty);
        assert_eq!(
            parse(b"workload=dirty\tworkload=idle\n").unwrap().workload,
            Workload::Idle
        );
    }

    #[test]
    fn numbers() {
        for (s, n) in [
            ("0", 0),
            ("4096", 4096),
            ("0x1000", 4096),
            ("0X1f", 31),
            ("4K", 4096),
            ("4k", 4096),
            ("1M", 1 << 20),
            ("0x10M", 16 << 20),
            ("2G", 2 << 30),
            ("1T", 1 << 40),
            ("18446744073709551615", u64::MAX),
            ("16777215T", 16_777_215 << 40),
        ] {
            assert_eq!(parse_number(s.as_bytes()), Some(n), "{s}");
        }
        for s in [
            "",
            "K",
            "0x",
            "0xK",
            "-1",
            "1.5M",
            "12a",
            "0x1g0",
            "1MB",
            "18446744073709551616",
            "16777216T",
            " 1",
            "1 ",
        ] {
            assert_eq!(parse_number(s.as_bytes()), None, "{s:?}");
        }
    }

    #[test]
    fn bad_values_name_key_and_value() {
        for (line, key, value) in [
            ("workload=fast", "workload", "fast"),
            ("workload", "workload", ""),
            ("start=1Q", "start", "1Q"),
            ("size=", "size", ""),
            ("passes=0", "passes", "0"),
            ("passes=many", "passes", "many"),
            ("rate=0", "rate", "0"),
            ("workload=dirty rate=-5 passes=x", "rate", "-5"),
        ] {
            let e = parse(line.as_bytes()).unwrap_err();
            assert_eq!(
                (e.key, e.value),
                (key.as_bytes(), value.as_bytes()),
                "{line}"
            );
            assert_eq!(e.to_string(), std::format!("bad argument {key}={value}"));
        }
        let e = parse(b"size=\xff\x01").unwrap_err();
        assert_eq!(e.to_string(), "bad argument size=??");
    }

    #[test]
    fn dma_verify_keys() {
        let c = parse(b"workload=dma-verify dma=rng size=64M passes=3").unwrap();
        assert_eq!(
            (c.workload, c.dma, c.vstart, c.vsize),
            (Workload::DmaVerify, Some(Dma::Rng), None, None)
        );
        assert_eq!(c.workload.name(), "dma-verify");
        assert_eq!(c.verify_region(), None);
        let c = parse(b"workload=dma-verify dma=blk size=64M vsize=16M").unwrap();
        assert_eq!(c.dma, Some(Dma::Blk));
        // The verify region follows the dma-verify region unless vstart= says otherwise.
        assert_eq!(c.verify_region(), Some(65 * MB..81 * MB));
        assert_eq!(
            (c.region_value("vstart"), c.region_value("vsize")),
            (65 * MB, 16 * MB)
        );
        let c = parse(b"workload=dma-verify dma=blk vstart=0x10000000 vsize=0x1000").unwrap();
        assert_eq!(c.verify_region(), Some(0x1000_0000..0x1000_1000));
        assert_eq!(
            parse(b"dma=rng dma=blk workload=dma-verify").unwrap().dma,
            Some(Dma::Blk)
        );
    }

    #[test]
    fn dma_verify_bad_arguments() {
        for (line, text) in [
            (
                "workload=dma-verify",
                "bad argument dma= (required with workload=dma-verify: blk or rng)",
            ),
            ("workload=dma-verify dma=net", "bad argument dma=net"),
            ("workload=dma-verify dma=", "bad argument dma="),
            (
                "workload=dma-verify dma=blk vstart=1G",
                "bad argument vstart=1G (needs vsize=)",
            ),
            (
                "workload=dma-verify dma=blk vsize=1Q",
                "bad argument vsize=1Q",
            ),
            (
                "workload=dma-verify dma=blk vstart=x vsize=4K",
                "bad argument vstart=x",
            ),
            (
                "workload=verify dma=blk",
                "bad argument dma=blk (only with workload=dma-verify or dma-bench)",
            ),
            (
                "dma=rng",
                "bad argument dma=rng (only with workload=dma-verify or dma-bench)",
            ),
            (
                "workload=dirty vsize=4M",
                "bad argument vsize=4M (only with workload=dma-verify)",
            ),
            (
                "workload=idle vstart=4M",
                "bad argument vstart=4M (only with workload=dma-verify)",
            ),
        ] {
            assert_eq!(
                parse(line.as_bytes()).unwrap_err().to_string(),
                text,
                "{line}"
            );
        }
    }

    #[test]
    fn vfio_user_keys() {
        let c = parse(b"workload=dma-verify dma=vfio-user size=64M passes=3").unwrap();
        assert_eq!(
            (c.workload, c.dma, c.iommu),
            (Workload::DmaVerify, Some(Dma::VfioUser), false)
        );
        assert_eq!(Dma::VfioUser.name(), "vfio-user");
        // With iommu=on, alone or with remap=, detach=, nested-dirty=; with vsize=.
        for line in [
            "workload=dma-verify dma=vfio-user iommu=on",
            "workload=dma-verify dma=vfio-user iommu=on remap=on detach=on nested-dirty=on",
            "workload=dma-verify dma=vfio-user iommu=on fault=off irq=off",
            "workload=dma-verify dma=vfio-user size=16M vsize=16M",
            "workload=dma-verify dma=blk dma=vfio-user",
        ] {
            let c = parse(line.as_bytes()).unwrap();
            assert_eq!(c.dma, Some(Dma::VfioUser), "{line}");
        }
        for (line, text) in [
            (
                "workload=dma-bench dma=vfio-user",
                "bad argument dma=vfio-user (workload=dma-bench drives blk only)",
            ),
            (
                "workload=verify dma=vfio-user",
                "bad argument dma=vfio-user (only with workload=dma-verify or dma-bench)",
            ),
            ("workload=dma-verify dma=vfio", "bad argument dma=vfio"),
            (
                "workload=dma-verify dma=vfio-user iommu=on fault=on",
                "bad argument fault=on (not with dma=vfio-user: the device refuses an \
                 unmapped job itself (STATUS_UNMAPPED), so no fault record comes)",
            ),
            // The general rule first: fault= needs iommu=on.
            (
                "workload=dma-verify dma=vfio-user fault=on",
                "bad argument fault=on (needs iommu=on)",
            ),
            (
                "workload=dma-verify dma=vfio-user irq=msix",
                "bad argument irq=msix (dma=vfio-user has no interrupts)",
            ),
            (
                "workload=dma-verify dma=vfio-user irq=intx",
                "bad argument irq=intx (dma=vfio-user has no interrupts)",
            ),
        ] {
            assert_eq!(
                parse(line.as_bytes()).unwrap_err().to_string(),
                text,
                "{line}"
            );
        }
    }

    #[test]
    fn dma_round_trips_through_u8() {
        for d in Dma::ALL {
            assert_eq!(Dma::from_u8(d as u8), Some(d));
        }
        assert_eq!(Dma::from_u8(Dma::ALL.len() as u8), None);
    }

    #[test]
    fn dma_bench_keys() {
        let c = parse(b"workload=dma-bench dma=blk").unwrap();
        assert_eq!((c.workload, c.dma), (Workload::DmaBench, Some(Dma::Blk)));
        assert_eq!(c.workload.name(), "dma-bench");
        assert_eq!((c.bench_bs(), c.bench_secs()), (4096, Some(5)));
        let c = parse(b"workload=dma-bench dma=blk bs=64K secs=1 size=16M").unwrap();
        assert_eq!((c.bs, c.secs, c.bench_bs()), (Some(65536), Some(1), 65536));
        assert_eq!(c.bench_secs(), Some(1));
        // passes= instead of a time: passes over the whole disk.
        let c = parse(b"workload=dma-bench dma=blk passes=2").unwrap();
        assert_eq!((c.passes, c.bench_secs()), (Some(2), None));
        for bs in ["4K", "0x1000", "8K", "12K", "1M"] {
            let line = std::format!("workload=dma-bench dma=blk bs={bs}");
            assert!(parse(line.as_bytes()).is_ok(), "{line}");
        }
        // The largest request still fits the smallest region that holds it.
        assert!(parse(b"workload=dma-bench dma=blk bs=1M size=1M").is_ok());
    }

    #[test]
    fn irq_key() {
        assert_eq!(parse(b"workload=dma-verify dma=blk").unwrap().irq, Irq::Off);
        for (line, irq) in [
            ("workload=dma-verify dma=blk irq=msix", Irq::Msix),
            ("workload=dma-bench dma=blk irq=msix", Irq::Msix),
            ("workload=dma-verify dma=rng irq=intx", Irq::Intx),
            ("workload=dma-verify dma=rng irq=msix irq=off", Irq::Off),
            // irq=off is the default and fits every workload.
            ("workload=verify irq=off", Irq::Off),
        ] {
            assert_eq!(parse(line.as_bytes()).unwrap().irq, irq, "{line}");
        }
        assert_eq!(
            (Irq::Off.name(), Irq::Msix.name(), Irq::Intx.name()),
            ("off", "msix", "intx")
        );
        for (line, text) in [
            (
                "workload=dma-verify dma=blk irq=msi",
                "bad argument irq=msi",
            ),
            ("workload=dma-verify dma=blk irq=", "bad argument irq="),
            (
                "workload=verify irq=msix",
                "bad argument irq=msix (only with workload=dma-verify or dma-bench)",
            ),
            (
                "workload=dirty irq=intx",
                "bad argument irq=intx (only with workload=dma-verify or dma-bench)",
            ),
        ] {
            assert_eq!(
                parse(line.as_bytes()).unwrap_err().to_string(),
                text,
                "{line}"
            );
        }
    }

    #[test]
    fn iommu_keys() {
        let c = parse(b"workload=dma-verify dma=rng").unwrap();
        assert!(!c.iommu && !c.remap && !c.detach && !c.nested_dirty && !c.fault);
        let c = parse(
            b"workload=dma-verify dma=blk iommu=on remap=on detach=on nested-dirty=on fault=on",
        )
        .unwrap();
        assert!(c.iommu && c.remap && c.detach && c.nested_dirty && c.fault);
        let c = parse(b"workload=dma-verify dma=blk iommu=on remap=on remap=off").unwrap();
        assert!(c.iommu && !c.remap);
        // dma-bench takes iommu=on alone, with any power-of-two bs up to 1M.
        for bs in ["4K", "8K", "64K", "1M"] {
            let line = std::format!("workload=dma-bench dma=blk iommu=on bs={bs}");
            let c = parse(line.as_bytes()).unwrap();
            assert!(c.iommu && !c.remap && !c.detach && !c.nested_dirty && !c.fault);
        }
        assert!(parse(b"workload=dma-bench dma=blk bs=12K").is_ok());
        // off fits every workload, like irq=off.
        for line in [
            "workload=verify iommu=off",
            "workload=dma-bench dma=blk iommu=off remap=off",
            "workload=dma-verify dma=rng remap=off detach=off nested-dirty=off fault=off",
        ] {
            assert!(parse(line.as_bytes()).is_ok(), "{line}");
        }
        for (line, text) in [
            (
                "workload=dma-verify dma=rng iommu=yes",
                "bad argument iommu=yes",
            ),
            ("workload=dma-verify dma=rng iommu=", "bad argument iommu="),
            (
                "workload=dma-verify dma=rng iommu=on nested-dirty=1",
                "bad argument nested-dirty=1",
            ),
            (
                "workload=verify iommu=on",
                "bad argument iommu=on (only with workload=dma-verify or dma-bench)",
            ),
            (
                "workload=dma-bench dma=blk iommu=on remap=on",
                "bad argument remap=on (only with workload=dma-verify)",
            ),
            (
                "workload=dma-bench dma=blk iommu=on detach=on",
                "bad argument detach=on (only with workload=dma-verify)",
            ),
            (
                "workload=dma-bench dma=blk iommu=on nested-dirty=on",
                "bad argument nested-dirty=on (only with workload=dma-verify)",
            ),
            (
                "workload=dma-bench dma=blk iommu=on fault=on",
                "bad argument fault=on (only with workload=dma-verify)",
            ),
            (
                "workload=dma-bench dma=blk iommu=on bs=12K",
                "bad argument bs=12K (with iommu=on: a power of two, dividing 2M)",
            ),
            (
                "workload=dma-bench dma=blk iommu=on bs=12K size=8K",
                "bad argument size=8K (smaller than bs=)",
            ),
            (
                "workload=dma-verify dma=rng remap=on",
                "bad argument remap=on (needs iommu=on)",
            ),
            (
                "workload=dma-verify dma=rng iommu=off detach=on",
                "bad argument detach=on (needs iommu=on)",
            ),
            (
                "workload=dma-verify dma=blk nested-dirty=on",
                "bad argument nested-dirty=on (needs iommu=on)",
            ),
            (
                "workload=dma-verify dma=blk fault=on",
                "bad argument fault=on (needs iommu=on)",
            ),
        ] {
            assert_eq!(
                parse(line.as_bytes()).unwrap_err().to_string(),
                text,
                "{line}"
            );
        }
    }

    #[test]
    fn dma_bench_bad_arguments() {
        for (line, text) in [
            (
                "workload=dma-bench",
                "bad argument dma= (required with workload=dma-bench: blk)",
            ),
            (
                "workload=dma-bench dma=rng",
                "bad argument dma=rng (workload=dma-bench drives blk only)",
            ),
            (
                "workload=dma-bench dma=blk bs=0",
                "bad argument bs=0 (a multiple of 4K from 4K to 1M)",
            ),
            (
                "workload=dma-bench dma=blk bs=512",
                "bad argument bs=512 (a multiple of 4K from 4K to 1M)",
            ),
            (
                "workload=dma-bench dma=blk bs=2M",
                "bad argument bs=2M (a multiple of 4K from 4K to 1M)",
            ),
            (
                "workload=dma-bench dma=blk bs=64KB",
                "bad argument bs=64KB (a multiple of 4K from 4K to 1M)",
            ),
            ("workload=dma-bench dma=blk secs=0", "bad argument secs=0"),
            ("workload=dma-bench dma=blk secs=x", "bad argument secs=x"),
            (
                "workload=dma-bench dma=blk secs=1 passes=2",
                "bad argument secs=1 (not with passes=)",
            ),
            (
                "workload=dma-bench dma=blk rate=100",
                "bad argument rate=100 (not with workload=dma-bench)",
            ),
            (
                "workload=dma-bench dma=blk bs=64K size=32K",
                "bad argument size=32K (smaller than bs=)",
            ),
            (
                "workload=dma-bench dma=blk vsize=4M",
                "bad argument vsize=4M (only with workload=dma-verify)",
            ),
            (
                "workload=dma-verify dma=blk bs=4K",
                "bad argument bs=4K (only with workload=dma-bench)",
            ),
            (
                "workload=verify secs=3",
                "bad argument secs=3 (only with workload=dma-bench)",
            ),
        ] {
            assert_eq!(
                parse(line.as_bytes()).unwrap_err().to_string(),
                text,
                "{line}"
            );
        }
    }

    #[test]
    fn verify_regions_of_dma_verify() {
        let ram = MB..256 * MB;
        let image = 0x2_0000..0x9_e000;
        let check = |line: &str| {
            check_verify_region(
                &parse(line.as_bytes()).unwrap(),
                std::slice::from_ref(&ram),
                std::slice::from_ref(&image),
            )
            .map_err(|e| (e.key, e.to_string()))
        };
        assert_eq!(check("workload=dma-verify dma=blk"), Ok(()));
        assert_eq!(
            check("workload=dma-verify dma=blk size=64M vsize=64M"),
            Ok(())
        );
        assert_eq!(
            check("workload=dma-verify dma=blk size=64M vstart=200M vsize=64M"),
            Err(("vsize", "not all RAM in the memory map".into()))
        );
        assert_eq!(
            check("workload=dma-verify dma=blk size=64M vstart=0x30000 vsize=4K"),
            Err(("vstart", "overlaps the guest image 0x20000-0x9e000".into()))
        );
        assert_eq!(
            check("workload=dma-verify dma=blk size=64M vsize=0"),
            Err(("vsize", "not a non-zero multiple of 4096".into()))
        );
        assert_eq!(
            check("workload=dma-verify dma=blk size=64M vstart=16M vsize=4M"),
            Err((
                "vstart",
                "overlaps the dma-verify region 0x100000-0x4100000".into()
            ))
        );
        assert_eq!(
            check("workload=dma-verify dma=blk start=16M size=4M vstart=12M vsize=8M"),
            Err((
                "vsize",
                "overlaps the dma-verify region 0x1000000-0x1400000".into()
            ))
        );
        assert_eq!(
            check("workload=dma-verify dma=blk start=16M size=4M vstart=12M vsize=4M"),
            Ok(())
        );
    }

    #[test]
    fn raw_values() {
        let line = b"size=1M console=ttyS0 size=0x2000 start";
        assert_eq!(raw_value(line, "size"), Some(&b"0x2000"[..]));
        assert_eq!(raw_value(line, "start"), Some(&b""[..]));
        assert_eq!(raw_value(line, "rate"), None);
    }

    const MB: u64 = 1 << 20;

    fn check(start: u64, size: u64) -> Result<(), RegionError> {
        // RAM like a VMM with a hole: [0, 0x9fc00), [1M, 3G) in two pieces, [4G, 5G).
        let ram = [
            0..0x9_fc00,
            3 * 1024 * MB..3 * 1024 * MB, // empty entries are harmless
            MB..512 * MB,
            512 * MB..3 * 1024 * MB,
            4096 * MB..5120 * MB,
        ];
        let image = 0x2_0000..0x9_e000;
        check_region(start, size, &ram, std::slice::from_ref(&image))
    }

    fn blame(r: Result<(), RegionError>) -> (&'static str, RegionProblem) {
        let e = r.unwrap_err();
        (e.key, e.problem)
    }

    #[test]
    fn regions() {
        assert!(check(MB, 100 * MB).is_ok());
        assert!(check(MB, 3 * 1024 * MB - MB).is_ok()); // across adjacent entries
        assert!(check(4096 * MB, 1024 * MB).is_ok());
        assert!(check(0x9_e000, 0x1000).is_ok());
        assert_eq!(
            blame(check(MB + 1, MB)),
            ("start", RegionProblem::Unaligned)
        );
        assert_eq!(blame(check(MB, 0)), ("size", RegionProblem::BadSize));
        assert_eq!(blame(check(MB, 4097)), ("size", RegionProblem::BadSize));
        assert_eq!(
            blame(check(!0xfffu64, 0x2000)),
            ("size", RegionProblem::Overflow)
        );
        assert_eq!(
            blame(check(0xa_0000, 0x1000)),
            ("start", RegionProblem::NotRam)
        );
        assert_eq!(
            blame(check(MB, 3 * 1024 * MB)),
            ("size", RegionProblem::NotRam)
        );
        assert_eq!(
            blame(check(4096 * MB, 1025 * MB)),
            ("size", RegionProblem::NotRam)
        );
        assert_eq!(
            blame(check(8192 * MB, 4096)),
            ("start", RegionProblem::NotRam)
        );
        assert_eq!(
            blame(check(0x3_0000, 0x1000)),
            ("start", RegionProblem::Reserved(0x2_0000..0x9_e000))
        );
        assert_eq!(
            blame(check(0x1_0000, 0x1_1000)),
            ("size", RegionProblem::Reserved(0x2_0000..0x9_e000))
        );
        let e = check(0x1_0000, MB).unwrap_err();
        assert_eq!(e.to_string(), "overlaps the guest image 0x20000-0x9e000");
        let mut s = String::new();
        write_lossy(&mut s, b"a\x00b").unwrap();
        assert_eq!(s, "a?b");
    }
}
