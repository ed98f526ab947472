//! Interrupts for `irq=msix`: the virtio driver aims MSI-X table entry `q` (queue `q`'s)
//! at the boot vCPU's local APIC with IDT vector [`queue_vector`]`(q)` (0x40 + q), and the
//! handler here counts them per queue and signals EOI. Nothing else in the guest takes
//! interrupts.
//!
//! Where they are taken: in ring 3. With `irq=msix` every vCPU enters its workload with
//! IF=1 (`boot::enter_user`), while ring 0 keeps running with IF=0 (the entry is made with
//! interrupts off and every gate is an interrupt gate), so an interrupt can only arrive in
//! ring 3, through an interrupt gate onto the vCPU's kernel stack (TSS.RSP0). Completion
//! stays by polling: the handler is not in the workload's path, it only counts. It is a
//! handful of instructions, because ring 0 may be emulated instruction by instruction
//! (see `sys`).
//!
//! Before that, [`setup`] keeps everything else out: the local APIC's LINT0 (where the
//! legacy PIC's INTR arrives as ExtINT; QEMU's firmware leaves the PIT ticking into it)
//! is masked and so is every PIC line, the local APIC's spurious vector (0xff, set by
//! `apic::init`) gets a gate that just returns, and any other vector still finds no gate
//! (a #GP that fails the run, naming it).

use core::arch::global_asm;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::boot::MAX_CPUS;
use crate::{apic, arch, boot, timer};

/// IDT vector of queue 0's MSI-X messages; queue `q` has `FIRST_QUEUE_VECTOR + q`.
const FIRST_QUEUE_VECTOR: u8 = 0x40;
/// The local APIC's spurious-interrupt vector (`apic::init` programs it).
const SPURIOUS_VECTOR: u8 = 0xff;
/// Queues that can have a vector (one per vCPU at most).
const QUEUES: usize = MAX_CPUS;

/// The IDT vector of queue `q`'s MSI-X messages.
pub fn queue_vector(q: u32) -> u8 {
    assert!((q as usize) < QUEUES, "queue {q} has no vector");
    FIRST_QUEUE_VECTOR + q as u8
}

/// Interrupts taken per queue (written by the handlers, read from ring 3).
static COUNTS: [AtomicU64; QUEUES] = [const { AtomicU64::new(0) }; QUEUES];
/// Where the handlers write EOI: the xAPIC EOI register, or 0 for x2APIC (MSR 0x80b).
static EOI_ADDR: AtomicU64 = AtomicU64::new(0);
/// Whether the workloads run in ring 3 with interrupts enabled.
static USER_IF: AtomicBool = AtomicBool::new(false);

// A stub per queue vector: count, then EOI and return in `irq_eoi`. As few instructions
// as will do: ring 0 may be emulated one instruction at a time.
global_asm!(
    r#"
    .pushsection .text.irq, "ax", @progbits
    .altmacro
    .macro IRQ_QUEUE q
    .balign 16
irq_queue_\q:
    pushq %rax
    lock incq {counts}+8*\q(%rip)
    jmp irq_eoi
    .endm
    .set q, 0
    .rept {queues}
    IRQ_QUEUE %q
    .set q, q+1
    .endr

irq_eoi:
    movq {eoi}(%rip), %rax
    testq %rax, %rax
    jz 1f
    movl $0, (%rax)
    popq %rax
    iretq
1:
    pushq %rcx
    pushq %rdx
    movl $0x80b, %ecx
    xorl %eax, %eax
    xorl %edx, %edx
    wrmsr
    popq %rdx
    popq %rcx
    popq %rax
    iretq

    .balign 16
irq_spurious:
    iretq
    .popsection

    .pushsection .rodata.irq_stubs, "a", @progbits
    .balign 8
    .macro IRQ_QUEUE_ADDR q
    .quad irq_queue_\q
    .endm
IRQ_STUBS:
    .quad irq_spurious
    .set q, 0
    .rept {queues}
    IRQ_QUEUE_ADDR %q
    .set q, q+1
    .endr
    .noaltmacro
    .popsection
"#,
    counts = sym COUNTS,
    eoi = sym EOI_ADDR,
    queues = const QUEUES,
    options(att_syntax)
);

extern "C" {
    /// The spurious handler, then the handler of each queue vector.
    static IRQ_STUBS: [u64; 1 + QUEUES];
}

/// Makes the boot vCPU ready to take queue interrupts in ring 3 (boot CPU, ring 0, after
/// `apic::init` and before the workload starts): LINT0 and the PIC masked, the gates
/// installed, IF=1 for the workloads.
pub fn setup() {
    apic::mask_lint0();
    // Every line of both PICs masked (their vector bases are whatever firmware chose).
    arch::outb(0x21, 0xff);
    arch::outb(0xa1, 0xff);
    EOI_ADDR.store(apic::eoi_address().unwrap_or(0), Ordering::Relaxed);
    // SAFETY: IRQ_STUBS is initialized data from the assembly above.
    let stubs = unsafe { &IRQ_STUBS };
    boot::set_gate(SPURIOUS_VECTOR, stubs[0]);
    for (q, &stub) in stubs[1..].iter().enumerate() {
        boot::set_gate(queue_vector(q as u32), stub);
    }
    USER_IF.store(true, Ordering::Relaxed);
}

/// Whether `boot::enter_user` sets IF (published with the plan, before `smp::GO`).
pub fn user_interrupts() -> bool {
    USER_IF.load(Ordering::Relaxed)
}

/// Interrupts taken so far on queue `q`.
fn count(q: usize) -> u64 {
    COUNTS[q].load(Ordering::Relaxed)
}

fn total() -> u64 {
    (0..QUEUES).map(count).sum()
}

/// `dma-verify` with `irq=msix`: a vCPU's queue must have had an interrupt during each of
/// its passes (so a VMM that stops delivering them, e.g. after a migration, is caught).
pub struct PassWatch {
    queue: u32,
    seen: u64,
}

impl PassWatch {
    pub fn new(queue: u32) -> PassWatch {
        PassWatch {
            queue,
            seen: count(queue as usize),
        }
    }

    /// After pass `pass` of vCPU `cpu` (ring 3): with `irq=msix`, fails the run unless the
    /// queue had an interrupt since the last call (after a second's grace).
    pub fn pass_done(&mut self, cpu: u32, pass: u64) {
        if !user_interrupts() {
            return;
        }
        let q = self.queue as usize;
        let end = timer::now() + timer::hz();
        while count(q) == self.seen && timer::now() < end {
            core::hint::spin_loop();
        }
        let now = count(q);
        if now == self.seen {
            crate::workload::fail(format_args!(
                "no MSI-X interrupt on queue {q} during pass {pass} of cpu {cpu}"
            ));
        }
        self.seen = now;
    }
}

/// Prints `guest: dma interrupts <n> (irq=<msix|off>, <k> completions)` at the end of a
/// `dma-verify` or `dma-bench` run (ring 3, boot vCPU, once every vCPU is done). With
/// `irq=msix` every queue that completed requests must have had an interrupt (after a
/// second's grace for one still on its way), else the run fails: `no MSI-X interrupt
/// after <k> completions` when there was none at all, `no MSI-X interrupt on queue <q>
/// after <k> completions` when only that queue had none.
pub fn report() {
    use crate::virtio::queue;
    let msix = user_interrupts();
    let completions = queue::completions();
    let silent = || (0..QUEUES).find(|&q| queue::completions_on(q as u32) > 0 && count(q) == 0);
    if msix && silent().is_some() {
        let end = timer::now() + timer::hz();
        while silent().is_some() && timer::now() < end {
            core::hint::spin_loop();
        }
    }
    let n = total();
    say!(
        "dma interrupts {n} (irq={}, {completions} completions)",
        if msix { "msix" } else { "off" }
    );
    if !msix {
        return;
    }
    if n == 0 && completions > 0 {
        crate::workload::fail(format_args!(
            "no MSI-X interrupt after {completions} completions"
        ));
    }
    if let Some(q) = silent() {
        crate::workload::fail(format_args!(
            "no MSI-X interrupt on queue {q} after {} completions",
            queue::completions_on(q as u32)
        ));
    }
}
