//! The test guest's command line: `workload=idle|dirty|verify start=ADDR size=SIZE
//! passes=N rate=PAGES_PER_SEC pci=scan|off`, and the rules its workload region must
//! follow.
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

/// What the vCPUs do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// Print the ready line and halt every vCPU.
    Idle,
    /// Increment the first byte of every page of the share, forever or `passes` times.
    Dirty,
    /// Check then rewrite every page of the share with the next generation's pattern.
    Verify,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::Idle => "idle",
            Workload::Dirty => "dirty",
            Workload::Verify => "verify",
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
        }
    }
}

/// A known key whose value is not acceptable, as written on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadArgument<'a> {
    pub key: &'a [u8],
    pub value: &'a [u8],
}

impl fmt::Display for BadArgument<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bad argument ")?;
        write_lossy(f, self.key)?;
        write!(f, "=")?;
        write_lossy(f, self.value)
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
        let bad = BadArgument { key, value };
        match key {
            b"workload" => {
                c.workload = match value {
                    b"idle" => Workload::Idle,
                    b"dirty" => Workload::Dirty,
                    b"verify" => Workload::Verify,
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
            _ => {}
        }
    }
    Ok(c)
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
        let c = parse(b"console=ttyS0 workload=verify start=0x200000 size=64M passes=3 rate=1000 pci=scan quiet\0junk=1").unwrap();
        assert_eq!(
            c,
            Config {
                workload: Workload::Verify,
                start: 0x20_0000,
                size: 64 << 20,
                passes: Some(3),
                rate: Some(1000),
                pci_scan: true,
            }
        );
        assert!(!parse(b"pci=scan pci=off").unwrap().pci_scan);
        assert_eq!(
            parse(b"pci=yes").unwrap_err(),
            BadArgument {
                key: b"pci",
                value: b"yes"
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
