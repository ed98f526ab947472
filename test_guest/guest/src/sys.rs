//! System calls from the ring-3 workloads to the ring-0 rest of the guest.
//!
//! Why ring 3 at all: on some hypervisors — this project's nested, PVM-based KVM among
//! them — guest ring-0 code runs instruction by instruction through KVM's instruction
//! emulator (microseconds per instruction, and no SSE), while ring-3 code runs natively.
//! So every vCPU boots in ring 0 and then runs its workload loop in ring 3, coming back to
//! ring 0 only to print a line, exit or halt.
//!
//! How: `ud2` with `rax` = [`MAGIC`]. The #UD goes through the IDT to ring 0 on every
//! hypervisor; the handler sees the magic, does the work and returns past the `ud2`.
//! (Under PVM, `syscall` from ring 3 does not reach ring 0 and `int 0x80` raises #UD, so
//! neither is usable.) `rdi` = number, `rsi`, `rdx` = arguments; every register is kept.

use core::arch::asm;

use crate::boot::Trap;

/// `rax` of a system call: "FerrySys".
pub const MAGIC: u64 = u64::from_le_bytes(*b"FerrySys");
/// Print the bytes `[rsi, rsi + rdx)` as one line (adds `\r\n`).
pub const PRINT: u64 = 1;
/// Exit with status `rsi` through the debug-exit port.
pub const EXIT: u64 = 2;
/// Halt this vCPU for good.
pub const HALT: u64 = 3;

const VECTOR_UD: u64 = 6;
const UD2: [u8; 2] = [0x0f, 0x0b];

/// Whether this code runs in ring 3.
pub fn user_mode() -> bool {
    let cs: u16;
    // SAFETY: reading CS has no side effects.
    unsafe { asm!("mov {0:x}, cs", out(reg) cs, options(nomem, nostack, preserves_flags)) };
    cs & 3 == 3
}

/// Makes a system call (from ring 3).
pub fn call(nr: u64, a0: u64, a1: u64) {
    // SAFETY: the #UD is handled in ring 0 on this CPU's kernel stack (the user stack is
    // not touched) and returns after the `ud2` with every register restored; the call
    // may read memory the arguments point to.
    unsafe {
        asm!("ud2", in("rax") MAGIC, in("rdi") nr, in("rsi") a0, in("rdx") a1, options(nostack))
    }
}

/// Whether trap `t` is a system call: #UD from ring 3 on a `ud2` with the magic.
pub fn is_call(t: &Trap) -> bool {
    t.vector == VECTOR_UD
        && t.cs & 3 == 3
        && t.rax == MAGIC
        && crate::arch::phys_read::<u8>(t.rip) == UD2[0]
        && crate::arch::phys_read::<u8>(t.rip + 1) == UD2[1]
}

/// Runs system call `t` (ring 0) and sets it up to return past the `ud2`.
pub fn handle(t: &mut Trap) {
    match t.rdi {
        PRINT => {
            // SAFETY: the caller is this guest's own ring-3 code passing a line buffer on
            // its stack, in the same (identity) address space; it is not touched while the
            // caller waits for this call to return.
            let bytes = unsafe { core::slice::from_raw_parts(t.rsi as *const u8, t.rdx as usize) };
            crate::serial::send_line(bytes);
        }
        EXIT => crate::exit(t.rsi as u8),
        HALT => crate::arch::halt_forever(),
        nr => crate::serial::print_line_forced(format_args!("FAIL unknown system call {nr}")),
    }
    t.rip += UD2.len() as u64;
}
