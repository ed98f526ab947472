//! The PVH `struct hvm_start_info` (Xen's `arch-x86/hvm/start_info.h`, version 1) the VMM
//! hands over in `ebx`, and the memory map it points to.
//!
//! ```text
//! offset  field
//!  0      u32 magic (0x336ec578)     4  u32 version       8  u32 flags
//! 12      u32 nr_modules            16  u64 modlist_paddr
//! 24      u64 cmdline_paddr         32  u64 rsdp_paddr
//! 40      u64 memmap_paddr          48  u32 memmap_entries   (version >= 1)
//! memmap entry (24 bytes): u64 addr, u64 size, u32 type (1 = RAM), u32 reserved
//! ```

use core::ops::Range;

use crate::arch::phys_read;

const MAGIC: u32 = 0x336e_c578;
const TYPE_RAM: u32 = 1;
/// Memory map entries kept; more is unheard of for a VM.
pub const MAX_RAM_RANGES: usize = 64;

/// What the guest takes from the start info.
pub struct StartInfo {
    pub cmdline_paddr: u64,
    pub rsdp_paddr: u64,
    /// RAM ranges of the memory map, in the map's order.
    pub ram: [Range<u64>; MAX_RAM_RANGES],
    pub ram_count: usize,
    /// RAM entries beyond `MAX_RAM_RANGES`, ignored.
    pub ram_dropped: usize,
}

impl StartInfo {
    pub fn ram(&self) -> &[Range<u64>] {
        &self.ram[..self.ram_count]
    }

    /// One past the highest RAM address.
    pub fn ram_top(&self) -> u64 {
        self.ram().iter().map(|r| r.end).max().unwrap_or(0)
    }
}

/// Why the start info is unusable.
pub enum Error {
    Null,
    /// A boot structure the VMM wrote where the guest image now is: the image was copied
    /// over it at entry (see link.ld), so it is gone.
    InImage(&'static str, u64),
    Magic(u32),
    Version0,
    NoRam,
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Error::Null => write!(
                f,
                "no PVH start_info (ebx = 0): boot this ELF through its PVH note"
            ),
            Error::InImage(what, a) => {
                let r = crate::boot::image_range();
                write!(f, "the VMM put the PVH {what} at {a:#x}, inside the guest image {:#x}-{:#x}: keep boot data out of it", r.start, r.end)
            }
            Error::Magic(m) => write!(f, "PVH start_info magic is {m:#x}, expected {MAGIC:#x}"),
            Error::Version0 => write!(
                f,
                "PVH start_info version 0 has no memory map (need version 1)"
            ),
            Error::NoRam => write!(f, "the PVH memory map has no RAM"),
        }
    }
}

/// Reads the start info at `addr` (below 4 GiB: it came in a 32-bit register).
pub fn parse(addr: u32) -> Result<StartInfo, Error> {
    let a = u64::from(addr);
    if a == 0 {
        return Err(Error::Null);
    }
    let image = crate::boot::image_range();
    let overlaps = |at: u64, len: u64| at < image.end && image.start < at.saturating_add(len);
    if overlaps(a, 56) {
        return Err(Error::InImage("start_info", a));
    }
    let magic: u32 = phys_read(a);
    if magic != MAGIC {
        return Err(Error::Magic(magic));
    }
    let version: u32 = phys_read(a + 4);
    if version < 1 {
        return Err(Error::Version0);
    }
    let mut info = StartInfo {
        cmdline_paddr: phys_read(a + 24),
        rsdp_paddr: phys_read(a + 32),
        ram: core::array::from_fn(|_| 0..0),
        ram_count: 0,
        ram_dropped: 0,
    };
    let memmap: u64 = phys_read(a + 40);
    let entries: u32 = phys_read(a + 48);
    if overlaps(memmap, u64::from(entries) * 24) {
        return Err(Error::InImage("memory map", memmap));
    }
    if info.cmdline_paddr != 0 && overlaps(info.cmdline_paddr, 1) {
        return Err(Error::InImage("command line", info.cmdline_paddr));
    }
    for i in 0..u64::from(entries) {
        let e = memmap + i * 24;
        let (base, size, kind): (u64, u64, u32) =
            (phys_read(e), phys_read(e + 8), phys_read(e + 16));
        if kind != TYPE_RAM || size == 0 {
            continue;
        }
        if info.ram_count == MAX_RAM_RANGES {
            info.ram_dropped += 1;
            continue;
        }
        info.ram[info.ram_count] = base..base.saturating_add(size);
        info.ram_count += 1;
    }
    if info.ram_count == 0 {
        return Err(Error::NoRam);
    }
    Ok(info)
}

/// The NUL-terminated command line at `addr` (at most 4 KiB), empty when `addr` is 0 or
/// not mapped.
pub fn cmdline(addr: u64) -> &'static [u8] {
    const MAX: u64 = 4096;
    if addr == 0 || addr.saturating_add(MAX) > crate::paging::mapped_limit() {
        return &[];
    }
    // SAFETY: `addr..addr + MAX` is mapped (checked above) and holds the command line the
    // VMM wrote; nothing writes there while the guest parses it (the workload region,
    // which might overlap it, is written only after parsing is over).
    let bytes = unsafe { core::slice::from_raw_parts(addr as *const u8, MAX as usize) };
    let len = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    &bytes[..len]
}
