//! PCI configuration through mechanism #1 (ports 0xCF8/0xCFC, ring 0 only): finding a
//! function by its ids, its command register, where its memory BARs are.
//!
//! `pci=scan`: lists PCI bus 0 at boot, function 0 of each device, through configuration
//! mechanism #1, then reads every slot again through ECAM (found in the ACPI MCFG table)
//! and checks that both ways agree. A VMM's PCI emulation and QEMU's are checked by the
//! same code.

use crate::arch::{inl, outl};

const CONFIG_ADDRESS: u16 = 0xcf8;
const CONFIG_DATA: u16 = 0xcfc;
const SLOTS: u8 = 32;

/// A dword of device `dev`'s configuration space (bus 0, function 0), through 0xCF8.
fn read_cf8(dev: u8, reg: u8) -> u32 {
    read_config(dev, 0, reg)
}

fn config_address(dev: u8, func: u8, reg: u8) -> u32 {
    1 << 31 | u32::from(dev & 31) << 11 | u32::from(func & 7) << 8 | u32::from(reg & 0xfc)
}

/// The dword at `reg` (rounded down to 4) of bus 0 device `dev` function `func`, through
/// 0xCF8/0xCFC (ring 0 only).
pub fn read_config(dev: u8, func: u8, reg: u8) -> u32 {
    outl(CONFIG_ADDRESS, config_address(dev, func, reg));
    inl(CONFIG_DATA)
}

/// Writes the dword at `reg` (rounded down to 4) of bus 0 device `dev` function `func`.
pub fn write_config(dev: u8, func: u8, reg: u8, value: u32) {
    outl(CONFIG_ADDRESS, config_address(dev, func, reg));
    outl(CONFIG_DATA, value);
}

// Type 0 header registers and command bits.
const REG_COMMAND: u8 = 0x04;
const REG_HEADER_TYPE: u8 = 0x0c;
const REG_BAR0: u8 = 0x10;
/// Command register: memory space, bus master, INTx disable.
pub const CMD_MEMORY: u32 = 1 << 1;
pub const CMD_BUS_MASTER: u32 = 1 << 2;
pub const CMD_INTX_DISABLE: u32 = 1 << 10;

/// The first function on bus 0 with `vendor`:`device`: (device, function). Ring 0.
pub fn find(vendor: u16, device: u16) -> Option<(u8, u8)> {
    for dev in 0..SLOTS {
        if read_config(dev, 0, 0) & 0xffff == 0xffff {
            continue;
        }
        let multi = read_config(dev, 0, REG_HEADER_TYPE) & (0x80 << 16) != 0;
        for func in 0..if multi { 8 } else { 1 } {
            let id = read_config(dev, func, 0);
            if id as u16 == vendor && (id >> 16) as u16 == device {
                return Some((dev, func));
            }
        }
    }
    None
}

/// Sets `bits` in the command register of `dev`.`func` (only the command half is written:
/// zeros leave the write-1-to-clear status bits alone); returns the command as it reads
/// afterwards. Ring 0.
pub fn enable(dev: u8, func: u8, bits: u32) -> u32 {
    let command = read_config(dev, func, REG_COMMAND) & 0xffff;
    write_config(dev, func, REG_COMMAND, command | bits);
    read_config(dev, func, REG_COMMAND) & 0xffff
}

/// Why a BAR cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarError {
    Io,
    Unassigned,
    /// BAR 5 claiming to be the low half of a 64-bit BAR.
    Bad64,
}

impl core::fmt::Display for BarError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            BarError::Io => "is an I/O BAR",
            BarError::Unassigned => "is unassigned (address 0)",
            BarError::Bad64 => "claims to be 64-bit",
        })
    }
}

/// The address of memory BAR `bar` (0-5) of `dev`.`func`, as the VMM or the firmware
/// assigned it (the guest never moves BARs); a 64-bit BAR's high half included. Ring 0.
pub fn memory_bar(dev: u8, func: u8, bar: u8) -> Result<u64, BarError> {
    let reg = REG_BAR0 + 4 * bar;
    let low = read_config(dev, func, reg);
    if low & 1 != 0 {
        return Err(BarError::Io);
    }
    let mut addr = u64::from(low & !0xf);
    if (low >> 1) & 3 == 2 {
        if bar == 5 {
            return Err(BarError::Bad64);
        }
        addr |= u64::from(read_config(dev, func, reg + 4)) << 32;
    }
    if addr == 0 {
        return Err(BarError::Unassigned);
    }
    Ok(addr)
}

/// The same dword through ECAM at `base`.
fn read_ecam(base: u64, dev: u8, reg: u8) -> u32 {
    let addr = base + (u64::from(dev) << 15) + u64::from(reg & 0xfc);
    assert!(
        addr + 4 <= crate::paging::mapped_limit(),
        "ECAM at {base:#x} is not mapped"
    );
    // SAFETY: the address is identity-mapped (checked above) and 4-byte aligned; it is
    // device memory, read once with a volatile access as MMIO must be.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

/// Prints `guest: pci 00:DD.0 VVVV:DDDD class CCCCCC` per device, then the ECAM check:
/// `guest: pci ecam BASE agrees (N devices)`, `guest: pci ecam none (no MCFG)`, or a
/// `FAIL` naming the first register that differs.
pub fn scan(rsdp_hint: u64) {
    let mut found = 0;
    for dev in 0..SLOTS {
        let id = read_cf8(dev, 0);
        if id & 0xffff == 0xffff {
            continue;
        }
        found += 1;
        let class = read_cf8(dev, 8) >> 8;
        say!(
            "pci 00:{dev:02x}.0 {:04x}:{:04x} class {class:06x}",
            id & 0xffff,
            id >> 16
        );
    }
    let mcfg = match crate::acpi::find_table(rsdp_hint, b"MCFG") {
        Ok(Some(t)) => t,
        Ok(None) => return say!("pci ecam none (no MCFG)"),
        Err(e) => return say!("pci ecam none ({e})"),
    };
    // MCFG: header (36), reserved (8), then allocations of 16 bytes: base u64,
    // segment u16, first bus u8, last bus u8.
    let base = crate::arch::phys_read::<u64>(mcfg + 44);
    let first_bus = crate::arch::phys_read::<u8>(mcfg + 54);
    if first_bus != 0 {
        return say!("pci ecam none (MCFG starts at bus {first_bus})");
    }
    for dev in 0..SLOTS {
        for reg in [0u8, 8, 0x2c] {
            let (io, mm) = (read_cf8(dev, reg), read_ecam(base, dev, reg));
            if io != mm {
                crate::fail(format_args!(
                    "pci 00:{dev:02x}.0 register {reg:#x}: {io:#010x} through 0xCF8, \
                     {mm:#010x} through ECAM at {base:#x}"
                ));
            }
        }
    }
    say!("pci ecam {base:#x} agrees ({found} devices)");
}
