//! `power-button=on`: the ACPI fixed-feature power button, as an OS uses it. From the FADT:
//! the SCI's interrupt, the PM1a event and control blocks, and the ACPI-enable handshake
//! (SMI_CMD); from the DSDT's `_S5_` object: the S5 sleep type. Boot CPU, ring 0: ACPI
//! mode on if firmware left it off, the SCI routed through the I/O APIC (level, active
//! high) to the boot vCPU, a stale power-button status cleared and the event enabled.
//!
//! The SCI arrives in ring 3 (the workloads then run with IF=1, see `irq`) and comes to
//! [`sci`] through `boot::trap`: with PWRBTN_STS set it clears it (which lowers the line),
//! signals EOI, prints `guest: power button pressed: powering off (S5)` and writes
//! SLP_TYP|SLP_EN: the VM ends as an OS's orderly power-off ends it.

use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use crate::acpi;
use crate::arch::{self, phys_read};

/// The IDT vector the SCI is routed to (`boot.rs` has its stub).
pub const SCI_VECTOR: u8 = 97;
/// PM1 status/enable: the power button (ACPI 6, 4.8.3.1).
const PWRBTN: u16 = 1 << 8;
/// PM1 control: SCI_EN (ACPI mode) and SLP_EN; SLP_TYP at bits 10-12.
const SCI_EN: u16 = 1 << 0;
const SLP_EN: u16 = 1 << 13;
const SLP_TYP_SHIFT: u16 = 10;

static ENABLED: AtomicBool = AtomicBool::new(false);
/// PM1a event block port, control block port, S5 sleep type.
static EVT: AtomicU32 = AtomicU32::new(0);
static CNT: AtomicU32 = AtomicU32::new(0);
static S5: AtomicU32 = AtomicU32::new(0);

/// Whether the workloads must run with interrupts on for the SCI.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The first element of the `_S5_` package in the DSDT at `dsdt`: its SLP_TYPa.
fn s5_sleep_type(dsdt: u64) -> Option<u16> {
    let len = u64::from(phys_read::<u32>(dsdt + 4));
    let body = dsdt + 36..dsdt + len;
    // `Name(_S5_, Package(n) { a, ... })`: NameOp 0x08 "_S5_" PackageOp 0x12 PkgLength
    // NumElements, then a as ZeroOp (0), OneOp (1) or BytePrefix (0x0a) byte.
    let at = body
        .clone()
        .find(|&a| a + 4 <= body.end && phys_read::<u32>(a) == u32::from_le_bytes(*b"_S5_"))?;
    let mut p = at + 4;
    if p >= body.end || phys_read::<u8>(p) != 0x12 {
        return None;
    }
    p += 1;
    // PkgLength: the top two bits of the lead byte count the bytes that follow it.
    p += 1 + u64::from(phys_read::<u8>(p) >> 6);
    p += 1; // NumElements
    if p >= body.end {
        return None;
    }
    match phys_read::<u8>(p) {
        0x00 => Some(0),
        0x01 => Some(1),
        0x0a if p + 1 < body.end => Some(u16::from(phys_read::<u8>(p + 1))),
        _ => None,
    }
}

/// Sets the power button up (boot CPU, ring 0, after `irq::setup`, before `smp::GO`);
/// prints `guest: power button sci=<gsi> pm1a_evt=0x.. pm1a_cnt=0x.. s5=<typ>`. An
/// error says what is missing.
pub fn setup(rsdp_hint: u64, apic_id: u32) -> Result<(), &'static str> {
    let fadt = acpi::find_table(rsdp_hint, b"FACP")
        .map_err(|_| "no ACPI root table")?
        .ok_or("no FADT")?;
    let fadt_len = u64::from(phys_read::<u32>(fadt + 4));
    let sci = u32::from(phys_read::<u16>(fadt + 46));
    let smi_cmd = phys_read::<u32>(fadt + 48);
    let acpi_enable = phys_read::<u8>(fadt + 52);
    let evt = phys_read::<u32>(fadt + 56);
    let cnt = phys_read::<u32>(fadt + 64);
    let flags = phys_read::<u32>(fadt + 112);
    if flags & (1 << 4) != 0 {
        return Err("the FADT says there is no fixed-feature power button (PWR_BUTTON)");
    }
    let (Ok(evt), Ok(cnt)) = (u16::try_from(evt), u16::try_from(cnt)) else {
        return Err("PM1a blocks outside the I/O port space");
    };
    if evt == 0 || cnt == 0 {
        return Err("no PM1a event or control block");
    }
    let x_dsdt = if fadt_len >= 148 {
        phys_read::<u64>(fadt + 140)
    } else {
        0
    };
    let dsdt = if x_dsdt != 0 {
        x_dsdt
    } else {
        u64::from(phys_read::<u32>(fadt + 40))
    };
    let s5 = s5_sleep_type(dsdt).ok_or("no _S5_ package in the DSDT")?;
    // ACPI mode: without SCI_EN the chipset sends its events as SMIs, not SCIs.
    if arch::inw(cnt) & SCI_EN == 0 && smi_cmd != 0 {
        arch::outb(smi_cmd as u16, acpi_enable);
        let mut tries = 0u32;
        while arch::inw(cnt) & SCI_EN == 0 {
            tries += 1;
            if tries > 1_000_000 {
                return Err("SCI_EN did not come on after the ACPI-enable command");
            }
        }
    }
    EVT.store(u32::from(evt), Ordering::Relaxed);
    CNT.store(u32::from(cnt), Ordering::Relaxed);
    S5.store(u32::from(s5), Ordering::Relaxed);
    crate::irq::route_level(sci, SCI_VECTOR, apic_id)?;
    crate::boot::set_gate(SCI_VECTOR, crate::boot::sci_stub());
    // A press from before this boot is not this run's.
    arch::outw(evt, PWRBTN);
    arch::outw(evt + 2, arch::inw(evt + 2) | PWRBTN);
    ENABLED.store(true, Ordering::Relaxed);
    say!("power button sci={sci} pm1a_evt={evt:#x} pm1a_cnt={cnt:#x} s5={s5}");
    Ok(())
}

fn eoi() {
    match crate::apic::eoi_address() {
        // SAFETY: the local APIC's EOI register, identity-mapped and uncached by
        // `apic::init`; writing it has no effect on memory Rust knows about.
        Some(a) => unsafe { core::ptr::write_volatile(a as *mut u32, 0) },
        None => arch::wrmsr(0x80b, 0),
    }
}

/// The SCI (ring 0, from `boot::trap`).
pub fn sci() {
    let evt = EVT.load(Ordering::Relaxed) as u16;
    if arch::inw(evt) & PWRBTN == 0 {
        // Another event, or a line that was already low: nothing of ours.
        eoi();
        return;
    }
    // Clearing the status lowers the line, so the EOI does not bring it back.
    arch::outw(evt, PWRBTN);
    eoi();
    crate::serial::print_line_forced(format_args!(
        "guest: power button pressed: powering off (S5)"
    ));
    let cnt = CNT.load(Ordering::Relaxed) as u16;
    let typ = (S5.load(Ordering::Relaxed) as u16 & 7) << SLP_TYP_SHIFT;
    arch::outw(cnt, (arch::inw(cnt) & !(7 << SLP_TYP_SHIFT)) | typ | SLP_EN);
    // A VMM may end the machine a moment after the write returns: QEMU's vCPU only asks
    // its main loop to, and a CI run under load saw this guest report the failure first.
    crate::timer::delay_us(5_000_000);
    // Still here: S5 did not end the machine.
    crate::serial::print_line_forced(format_args!(
        "guest: FAIL the S5 write to {cnt:#x} did not power off"
    ));
    crate::exit(1)
}
