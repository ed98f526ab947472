//! Thin wrappers over the x86 instructions the guest needs: port I/O, MSRs, CPUID, TSC,
//! halting, and physical memory access (all RAM is identity-mapped).

use core::arch::asm;

/// Writes a byte to an I/O port.
pub fn outb(port: u16, value: u8) {
    // SAFETY: the guest owns the whole machine; port writes touch device state only (no
    // memory Rust knows about). Every caller names a device it means to program.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

/// Reads a byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as for `outb`: a port read has no effect on memory.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags))
    }
    value
}

/// Writes a word to an I/O port.
pub fn outw(port: u16, value: u16) {
    // SAFETY: as for `outb`: a port write touches device state only.
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") value, options(nomem, nostack, preserves_flags))
    }
}

/// Reads a word from an I/O port.
pub fn inw(port: u16) -> u16 {
    let value: u16;
    // SAFETY: as for `outb`: a port read has no effect on memory.
    unsafe {
        asm!("in ax, dx", in("dx") port, out("ax") value, options(nomem, nostack, preserves_flags))
    }
    value
}

/// Writes a dword to an I/O port.
pub fn outl(port: u16, value: u32) {
    // SAFETY: as for `outb`: a port write touches device state only.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    }
}

/// Reads a dword from an I/O port.
pub fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: as for `outb`: a port read has no effect on memory.
    unsafe {
        asm!("in eax, dx", in("dx") port, out("eax") value, options(nomem, nostack, preserves_flags))
    }
    value
}

/// Reads a model-specific register.
pub fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: callers only read architectural MSRs that exist on every x86-64 CPU
    // (APIC base, EFER) or that CPUID said exist.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    }
    u64::from(hi) << 32 | u64::from(lo)
}

/// Writes a model-specific register.
pub fn wrmsr(msr: u32, value: u64) {
    // SAFETY: callers only write the APIC base and x2APIC registers with values that keep
    // memory where it is (no change to paging or segmentation).
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32,
             options(nostack, preserves_flags))
    }
}

/// CPUID leaf `leaf`, subleaf `sub`: `[eax, ebx, ecx, edx]`.
pub fn cpuid(leaf: u32, sub: u32) -> [u32; 4] {
    let (a, b, c, d): (u32, u32, u32, u32);
    // SAFETY: CPUID only reads; rbx (reserved by LLVM) is saved and restored around it.
    unsafe {
        asm!("mov {t:r}, rbx", "cpuid", "xchg {t:r}, rbx", t = out(reg) b,
             inout("eax") leaf => a, inout("ecx") sub => c, out("edx") d,
             options(nomem, nostack, preserves_flags))
    }
    [a, b, c, d]
}

/// The time-stamp counter.
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: RDTSC only reads the counter (CR4.TSD is clear: we never set it).
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) }
    u64::from(hi) << 32 | u64::from(lo)
}

/// Reloads CR3 with itself: flushes the TLB after page-table changes.
pub fn flush_tlb() {
    // SAFETY: CR3 gets the value it already has; only cached translations are dropped.
    unsafe {
        asm!("mov {t}, cr3", "mov cr3, {t}", t = out(reg) _, options(nostack, preserves_flags))
    }
}

/// Stops this CPU for good: interrupts off, `hlt` forever (the VMM sees HLT exits).
pub fn halt_forever() -> ! {
    if crate::sys::user_mode() {
        crate::sys::call(crate::sys::HALT, 0, 0);
    }
    loop {
        // SAFETY: CLI/HLT only stop this CPU; nothing is expected of it any more.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
    }
}

/// Integer types: every bit pattern is a valid value.
pub trait Plain: Copy {}
impl Plain for u8 {}
impl Plain for u16 {}
impl Plain for u32 {}
impl Plain for u64 {}

/// Reads an integer from guest-physical address `addr` (firmware tables, boot info).
///
/// # Panics
/// If the address is not identity-mapped (see `paging::mapped_limit`).
pub fn phys_read<T: Plain>(addr: u64) -> T {
    let end = addr.checked_add(core::mem::size_of::<T>() as u64);
    assert!(
        end.is_some_and(|e| e <= crate::paging::mapped_limit()),
        "read of unmapped address {addr:#x}"
    );
    // SAFETY: the range is identity-mapped (checked above) and `T` is an integer, so any
    // bits are a valid value; the read makes no alignment assumption.
    unsafe { core::ptr::read_unaligned(addr as *const T) }
}
