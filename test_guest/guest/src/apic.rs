//! The local APIC: just enough to send INIT and STARTUP IPIs, and (`irq=msix`) to keep
//! the legacy PIC out and say where EOI goes. xAPIC (MMIO at the base the APIC base MSR
//! gives, normally 0xfee00000, mapped uncached); x2APIC through MSRs if the VMM left the
//! APIC in that mode.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::arch::{cpuid, rdmsr, wrmsr};

const IA32_APIC_BASE: u32 = 0x1b;
const BASE_ENABLE: u64 = 1 << 11;
const BASE_X2APIC: u64 = 1 << 10;
const REG_SVR: u64 = 0xf0;
const REG_ICR_LOW: u64 = 0x300;
const REG_ICR_HIGH: u64 = 0x310;
const REG_EOI: u64 = 0xb0;
const REG_LVT_LINT0: u64 = 0x350;
const LVT_MASKED: u32 = 1 << 16;
const X2APIC_LVT_LINT0: u32 = 0x835;
const ICR_PENDING: u32 = 1 << 12;
const X2APIC_ICR: u32 = 0x830;
const X2APIC_SVR: u32 = 0x80f;

static BASE: AtomicU64 = AtomicU64::new(0xfee0_0000);
static X2APIC: AtomicBool = AtomicBool::new(false);

/// This CPU's initial APIC ID (CPUID leaf 1), usable before the APIC is set up.
pub fn current_id() -> u32 {
    cpuid(1, 0)[1] >> 24
}

fn mmio_read(reg: u64) -> u32 {
    // SAFETY: the xAPIC register page is identity-mapped and uncached (`init`), and
    // `reg` is one of its 16-byte aligned registers.
    unsafe { core::ptr::read_volatile((BASE.load(Ordering::Relaxed) + reg) as *const u32) }
}

fn mmio_write(reg: u64, v: u32) {
    // SAFETY: as for `mmio_read`; writes go to the APIC, not to memory Rust owns.
    unsafe { core::ptr::write_volatile((BASE.load(Ordering::Relaxed) + reg) as *mut u32, v) }
}

/// This CPU's APIC ID from the APIC itself (after `init`).
pub fn id() -> u32 {
    if X2APIC.load(Ordering::Relaxed) {
        rdmsr(0x802) as u32
    } else {
        mmio_read(0x20) >> 24
    }
}

/// Enables this CPU's local APIC (boot CPU; APs never need theirs). Returns the base and
/// whether it is in x2APIC mode.
pub fn init() -> (u64, bool) {
    let mut msr = rdmsr(IA32_APIC_BASE);
    if msr & BASE_ENABLE == 0 {
        msr |= BASE_ENABLE;
        wrmsr(IA32_APIC_BASE, msr);
    }
    let base = msr & 0x000f_ffff_ffff_f000;
    let x2 = msr & BASE_X2APIC != 0;
    BASE.store(base, Ordering::Relaxed);
    X2APIC.store(x2, Ordering::Relaxed);
    if x2 {
        wrmsr(X2APIC_SVR, 0x1ff);
    } else {
        crate::paging::set_uncached(base);
        // Software-enable, spurious vector 0xff (interrupts stay off anyway).
        mmio_write(REG_SVR, 0x1ff);
    }
    (base, x2)
}

/// Masks this CPU's LINT0, where the legacy PIC's interrupts arrive (as ExtINT on the
/// boot CPU, as firmware and KVM leave it). Boot CPU, after `init`.
pub fn mask_lint0() {
    if X2APIC.load(Ordering::Relaxed) {
        wrmsr(X2APIC_LVT_LINT0, u64::from(LVT_MASKED));
    } else {
        mmio_write(REG_LVT_LINT0, LVT_MASKED);
    }
}

/// The address of the xAPIC EOI register; `None` in x2APIC mode (EOI is MSR 0x80b).
pub fn eoi_address() -> Option<u64> {
    (!X2APIC.load(Ordering::Relaxed)).then(|| BASE.load(Ordering::Relaxed) + REG_EOI)
}

/// Sends an IPI: `low` is the ICR's low word (vector, delivery mode, level).
pub fn send_ipi(apic_id: u32, low: u32) {
    if X2APIC.load(Ordering::Relaxed) {
        wrmsr(X2APIC_ICR, u64::from(apic_id) << 32 | u64::from(low));
        return;
    }
    mmio_write(REG_ICR_HIGH, apic_id << 24);
    mmio_write(REG_ICR_LOW, low);
    for _ in 0..1_000_000 {
        if mmio_read(REG_ICR_LOW) & ICR_PENDING == 0 {
            break;
        }
        core::hint::spin_loop();
    }
}

/// Whether `apic_id` can be addressed (xAPIC destinations are 8 bits).
pub fn reachable(apic_id: u32) -> bool {
    X2APIC.load(Ordering::Relaxed) || apic_id < 0xff
}
