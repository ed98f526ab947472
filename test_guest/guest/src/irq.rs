//! Interrupts for `irq=msix`: the virtio driver aims one MSI-X table entry per queue at
//! the boot vCPU's local APIC with IDT vector [`QUEUE_VECTOR`], and the handler here counts
//! them ([`DMA_IRQS`]) and signals EOI. Nothing else in the guest takes interrupts.
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

use crate::{apic, arch, boot, timer};

/// IDT vector of the virtio queues' MSI-X messages.
pub const QUEUE_VECTOR: u8 = 0x40;
/// The local APIC's spurious-interrupt vector (`apic::init` programs it).
pub const SPURIOUS_VECTOR: u8 = 0xff;

/// Queue interrupts taken so far (all vCPUs; written by the handler, read from ring 3).
pub static DMA_IRQS: AtomicU64 = AtomicU64::new(0);
/// Where the handler writes EOI: the xAPIC EOI register, or 0 for x2APIC (MSR 0x80b).
static EOI_ADDR: AtomicU64 = AtomicU64::new(0);
/// Whether the workloads run in ring 3 with interrupts enabled.
static USER_IF: AtomicBool = AtomicBool::new(false);

global_asm!(
    r#"
    .pushsection .text.irq, "ax", @progbits
    .balign 16
irq_queue:
    pushq %rax
    lock incq {count}(%rip)
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
IRQ_STUBS:
    .quad irq_queue
    .quad irq_spurious
    .popsection
"#,
    count = sym DMA_IRQS,
    eoi = sym EOI_ADDR,
    options(att_syntax)
);

extern "C" {
    /// The queue handler and the spurious handler above.
    static IRQ_STUBS: [u64; 2];
}

/// Makes the boot vCPU ready to take queue interrupts in ring 3 (boot CPU, ring 0, after
/// `apic::init` and before the workload starts): LINT0 and the PIC masked, the two gates
/// installed, IF=1 for the workloads.
pub fn setup() {
    apic::mask_lint0();
    // Every line of both PICs masked (their vector bases are whatever firmware chose).
    arch::outb(0x21, 0xff);
    arch::outb(0xa1, 0xff);
    EOI_ADDR.store(apic::eoi_address().unwrap_or(0), Ordering::Relaxed);
    // SAFETY: IRQ_STUBS is initialized data from the assembly above.
    let [queue, spurious] = unsafe { IRQ_STUBS };
    boot::set_gate(QUEUE_VECTOR, queue);
    boot::set_gate(SPURIOUS_VECTOR, spurious);
    USER_IF.store(true, Ordering::Relaxed);
}

/// Whether `boot::enter_user` sets IF (published with the plan, before `smp::GO`).
pub fn user_interrupts() -> bool {
    USER_IF.load(Ordering::Relaxed)
}

/// Queue interrupts taken so far.
pub fn count() -> u64 {
    DMA_IRQS.load(Ordering::Relaxed)
}

/// Prints `guest: dma interrupts <n> (irq=<msix|off>, <k> completions)` at the end of a
/// `dma-verify` or `dma-bench` run (ring 3, boot vCPU, once every vCPU is done); with
/// `irq=msix`, no interrupt after a completed request fails the run (after waiting a
/// second for one still on its way).
pub fn report() {
    let completions = crate::virtio::queue::completions();
    let msix = user_interrupts();
    let mut n = count();
    if msix && completions > 0 && n == 0 {
        let end = timer::now() + timer::hz();
        while count() == 0 && timer::now() < end {
            core::hint::spin_loop();
        }
        n = count();
    }
    say!(
        "dma interrupts {n} (irq={}, {completions} completions)",
        if msix { "msix" } else { "off" }
    );
    if msix && completions > 0 && n == 0 {
        crate::workload::fail(format_args!(
            "no MSI-X interrupt after {completions} completions"
        ));
    }
}
