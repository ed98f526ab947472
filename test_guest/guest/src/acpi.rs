//! The CPUs, from the ACPI MADT: RSDP (from the start info, else found in the BIOS area)
//! -> XSDT (or RSDT) -> "APIC". Processor local APIC entries (type 0) and x2APIC entries
//! (type 9) with the enabled flag each name one CPU by APIC ID; the first I/O APIC entry
//! (type 1) says where `irq=intx` routes the device's pin.

use crate::arch::phys_read;

/// APIC IDs kept from the MADT.
pub const MAX_MADT_CPUS: usize = 256;

pub struct Madt {
    /// Enabled CPUs' APIC IDs in table order, without duplicates.
    pub apic_ids: [u32; MAX_MADT_CPUS],
    pub count: usize,
    /// Enabled CPUs beyond `MAX_MADT_CPUS`.
    pub dropped: usize,
    /// The local APIC base the table gives (informational: the MSR is what counts).
    pub lapic_addr: u64,
    /// The first I/O APIC: its MMIO address and first GSI.
    pub ioapic: Option<(u64, u32)>,
}

impl Madt {
    pub fn ids(&self) -> &[u32] {
        &self.apic_ids[..self.count]
    }

    fn add(&mut self, id: u32) {
        if self.ids().contains(&id) {
            return;
        }
        if self.count == MAX_MADT_CPUS {
            self.dropped += 1;
        } else {
            self.apic_ids[self.count] = id;
            self.count += 1;
        }
    }
}

/// Why no CPU list was found.
pub enum Error {
    NoRsdp,
    BadRsdp(u64),
    BadRoot(u64),
    NoMadt,
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Error::NoRsdp => write!(f, "no ACPI RSDP in start_info or 0xe0000-0xfffff"),
            Error::BadRsdp(a) => write!(f, "the ACPI RSDP at {a:#x} is invalid"),
            Error::BadRoot(a) => write!(f, "the ACPI XSDT/RSDT at {a:#x} is invalid"),
            Error::NoMadt => write!(f, "no ACPI MADT (\"APIC\" table)"),
        }
    }
}

fn bytes_sum(addr: u64, len: u64) -> u8 {
    (0..len).fold(0u8, |s, i| s.wrapping_add(phys_read::<u8>(addr + i)))
}

fn signature(addr: u64) -> [u8; 4] {
    phys_read::<u32>(addr).to_le_bytes()
}

/// A valid RSDP at `addr`?
fn rsdp_ok(addr: u64) -> bool {
    phys_read::<u64>(addr) == u64::from_le_bytes(*b"RSD PTR ")
        && bytes_sum(addr, 20) == 0
        && (phys_read::<u8>(addr + 15) < 2 || {
            let len = u64::from(phys_read::<u32>(addr + 20));
            (36..4096).contains(&len) && bytes_sum(addr, len) == 0
        })
}

fn find_rsdp(hint: u64) -> Result<u64, Error> {
    if hint != 0 {
        return if rsdp_ok(hint) {
            Ok(hint)
        } else {
            Err(Error::BadRsdp(hint))
        };
    }
    // The first KiB of the EBDA, then the BIOS area, on 16-byte boundaries.
    let ebda = u64::from(phys_read::<u16>(0x40e)) << 4;
    let ebda_range = if (0x400..0xa0000).contains(&ebda) {
        ebda..ebda + 1024
    } else {
        0..0
    };
    ebda_range
        .step_by(16)
        .chain((0xe0000..0x100000).step_by(16))
        .find(|&a| rsdp_ok(a))
        .ok_or(Error::NoRsdp)
}

/// A table with a sane length and checksum? Returns its length.
fn table_len(addr: u64) -> Option<u64> {
    if addr == 0 || addr.checked_add(36)? > crate::paging::mapped_limit() {
        return None;
    }
    let len = u64::from(phys_read::<u32>(addr + 4));
    let fits = addr
        .checked_add(len)
        .is_some_and(|e| e <= crate::paging::mapped_limit());
    ((36..1 << 20).contains(&len) && fits && bytes_sum(addr, len) == 0).then_some(len)
}

/// Finds the MADT and lists its enabled CPUs.
pub fn find_cpus(rsdp_hint: u64) -> Result<Madt, Error> {
    let madt = find_table(rsdp_hint, b"APIC")?.ok_or(Error::NoMadt)?;
    Ok(parse_madt(madt))
}

/// The address of the first valid table with signature `sig`, if the root lists one.
pub fn find_table(rsdp_hint: u64, sig: &[u8; 4]) -> Result<Option<u64>, Error> {
    let rsdp = find_rsdp(rsdp_hint)?;
    let xsdt = if phys_read::<u8>(rsdp + 15) >= 2 {
        phys_read::<u64>(rsdp + 24)
    } else {
        0
    };
    let (root, entry_size) = if xsdt != 0 {
        (xsdt, 8)
    } else {
        (u64::from(phys_read::<u32>(rsdp + 16)), 4)
    };
    let root_len = table_len(root).ok_or(Error::BadRoot(root))?;
    Ok((0..(root_len - 36) / entry_size)
        .map(|i| {
            let at = root + 36 + i * entry_size;
            if entry_size == 8 {
                phys_read::<u64>(at)
            } else {
                u64::from(phys_read::<u32>(at))
            }
        })
        .find(|&t| table_len(t).is_some() && signature(t) == *sig))
}

fn parse_madt(madt: u64) -> Madt {
    let len = u64::from(phys_read::<u32>(madt + 4));
    let mut m = Madt {
        apic_ids: [0; MAX_MADT_CPUS],
        count: 0,
        dropped: 0,
        lapic_addr: u64::from(phys_read::<u32>(madt + 36)),
        ioapic: None,
    };
    let mut at = madt + 44;
    while at + 2 <= madt + len {
        let kind = phys_read::<u8>(at);
        let elen = u64::from(phys_read::<u8>(at + 1));
        if elen < 2 || at + elen > madt + len {
            break;
        }
        match (kind, elen) {
            // Processor local APIC: ACPI id u8, APIC id u8, flags u32 (bit 0 enabled).
            (0, 8..) if phys_read::<u32>(at + 4) & 1 != 0 => {
                m.add(u32::from(phys_read::<u8>(at + 3)));
            }
            // Processor local x2APIC: reserved u16, x2APIC id u32, flags u32, uid u32.
            (9, 16..) if phys_read::<u32>(at + 8) & 1 != 0 => m.add(phys_read::<u32>(at + 4)),
            // I/O APIC: id u8, reserved u8, address u32, GSI base u32.
            (1, 12..) if m.ioapic.is_none() => {
                m.ioapic = Some((
                    u64::from(phys_read::<u32>(at + 4)),
                    phys_read::<u32>(at + 8),
                ));
            }
            // Local APIC address override.
            (5, 12..) => m.lapic_addr = phys_read::<u64>(at + 4),
            _ => {}
        }
        at += elen;
    }
    m
}
