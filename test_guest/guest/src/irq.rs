//! Interrupts from the `dma-verify` / `dma-bench` device, counted (`irq=`):
//!
//! * `irq=msix`: the virtio driver aims MSI-X table entry `q` (queue `q`'s) at the boot
//!   vCPU's local APIC with IDT vector [`queue_vector`]`(q)` (0x40 + q); the handler
//!   counts per queue.
//! * `irq=intx`: the driver leaves MSI-X off and has [`route_intx`] send its pin's line
//!   (the interrupt line register: an I/O APIC input) to the boot vCPU with vector
//!   [`INTX_VECTOR`], level-triggered; the handler reads the device's ISR (which
//!   acknowledges it and lowers the line) and counts when it was set.
//!
//! Every handler then signals EOI to the local APIC. Nothing else in the guest takes
//! interrupts.
//!
//! Where they are taken: in ring 3. With `irq=` every vCPU enters its workload with IF=1
//! (`boot::enter_user`), while ring 0 keeps running with IF=0 (the entry is made with
//! interrupts off and every gate is an interrupt gate), so an interrupt can only arrive in
//! ring 3, through an interrupt gate onto the vCPU's kernel stack (TSS.RSP0). Completion
//! stays by polling: the handlers are not in the workload's path, they only count. They
//! are a handful of instructions, because ring 0 may be emulated instruction by
//! instruction (see `sys`).
//!
//! Before that, [`setup`] keeps everything else out: the local APIC's LINT0 (where the
//! legacy PIC's INTR arrives as ExtINT; QEMU's firmware leaves the PIT ticking into it)
//! is masked and so is every PIC line, the local APIC's spurious vector (0xff, set by
//! `apic::init`) gets a gate that just returns, and any other vector still finds no gate
//! (an exception that fails the run, naming it).

use core::arch::global_asm;
use core::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use guest_pattern::cmdline::Irq;

use crate::boot::MAX_CPUS;
use crate::{apic, arch, boot, timer};

/// IDT vector of queue 0's MSI-X messages; queue `q` has `FIRST_QUEUE_VECTOR + q`.
const FIRST_QUEUE_VECTOR: u8 = 0x40;
/// IDT vector of the device's INTx line (`irq=intx`).
pub const INTX_VECTOR: u8 = 0x60;
/// The local APIC's spurious-interrupt vector (`apic::init` programs it).
const SPURIOUS_VECTOR: u8 = 0xff;
/// Queues that can have a vector (one per vCPU at most).
const QUEUES: usize = MAX_CPUS;
const _: () = assert!(FIRST_QUEUE_VECTOR as usize + QUEUES <= INTX_VECTOR as usize);

/// The IDT vector of queue `q`'s MSI-X messages.
pub fn queue_vector(q: u32) -> u8 {
    assert!((q as usize) < QUEUES, "queue {q} has no vector");
    FIRST_QUEUE_VECTOR + q as u8
}

/// MSI-X interrupts taken per queue (written by the handlers, read from ring 3).
static COUNTS: [AtomicU64; QUEUES] = [const { AtomicU64::new(0) }; QUEUES];
/// INTx interrupts taken with the device's ISR set.
static INTX_COUNT: AtomicU64 = AtomicU64::new(0);
/// Where the handlers write EOI: the xAPIC EOI register, or 0 for x2APIC (MSR 0x80b).
static EOI_ADDR: AtomicU64 = AtomicU64::new(0);
/// The device's ISR byte (`irq=intx`).
static ISR_ADDR: AtomicU64 = AtomicU64::new(0);
/// The I/O APIC from the MADT: MMIO address (0: none) and first GSI.
static IOAPIC: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];
/// `irq=`: 0 off, 1 msix, 2 intx; the workloads run in ring 3 with IF=1 unless off.
static MODE: AtomicU8 = AtomicU8::new(0);

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

    .balign 16
irq_intx:
    pushq %rax
    movq {isr}(%rip), %rax
    movzbl (%rax), %eax
    testl %eax, %eax
    jz irq_eoi
    lock incq {intx}(%rip)

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
    .quad irq_intx
    .set q, 0
    .rept {queues}
    IRQ_QUEUE_ADDR %q
    .set q, q+1
    .endr
    .noaltmacro
    .popsection
"#,
    counts = sym COUNTS,
    intx = sym INTX_COUNT,
    isr = sym ISR_ADDR,
    eoi = sym EOI_ADDR,
    queues = const QUEUES,
    options(att_syntax)
);

extern "C" {
    /// The spurious handler, the INTx handler, then the handler of each queue vector.
    static IRQ_STUBS: [u64; 2 + QUEUES];
}

/// Makes the boot vCPU ready to take the device's interrupts in ring 3 (boot CPU, ring 0,
/// after `apic::init` and before the workload starts): LINT0 and the PIC masked, the gates
/// installed, IF=1 for the workloads. `ioapic`: the MADT's I/O APIC (address, first GSI),
/// for `irq=intx`.
pub fn setup(mode: Irq, ioapic: Option<(u64, u32)>) {
    apic::mask_lint0();
    // Every line of both PICs masked (their vector bases are whatever firmware chose).
    arch::outb(0x21, 0xff);
    arch::outb(0xa1, 0xff);
    EOI_ADDR.store(apic::eoi_address().unwrap_or(0), Ordering::Relaxed);
    if let Some((addr, gsi_base)) = ioapic {
        IOAPIC[0].store(addr, Ordering::Relaxed);
        IOAPIC[1].store(u64::from(gsi_base), Ordering::Relaxed);
    }
    // SAFETY: IRQ_STUBS is initialized data from the assembly above.
    let stubs = unsafe { &IRQ_STUBS };
    boot::set_gate(SPURIOUS_VECTOR, stubs[0]);
    boot::set_gate(INTX_VECTOR, stubs[1]);
    for (q, &stub) in stubs[2..].iter().enumerate() {
        boot::set_gate(queue_vector(q as u32), stub);
    }
    MODE.store(
        match mode {
            Irq::Off => 0,
            Irq::Msix => 1,
            Irq::Intx => 2,
        },
        Ordering::Relaxed,
    );
}

fn mode() -> Irq {
    match MODE.load(Ordering::Relaxed) {
        1 => Irq::Msix,
        2 => Irq::Intx,
        _ => Irq::Off,
    }
}

/// Whether `boot::enter_user` sets IF (published with the plan, before `smp::GO`).
pub fn user_interrupts() -> bool {
    mode() != Irq::Off || crate::power_button::enabled()
}

/// Where `irq=intx` sent the device's line.
#[derive(Clone, Copy)]
pub struct IntxRoute {
    pub ioapic: u64,
    /// The I/O APIC input (the GSI less the I/O APIC's first GSI).
    pub input: u32,
}

const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
const IOAPIC_VER: u32 = 0x01;
const IOREDTBL: u32 = 0x10;
const REDIR_LEVEL: u32 = 1 << 15;

fn ioapic_write(base: u64, reg: u32, value: u32) {
    // SAFETY: `base` is the I/O APIC the MADT names, below 4 GiB (checked by the caller),
    // identity-mapped and made uncached; its two registers select and carry an indirect
    // register, device state only.
    unsafe {
        core::ptr::write_volatile((base + IOREGSEL) as *mut u32, reg);
        core::ptr::write_volatile((base + IOWIN) as *mut u32, value);
    }
}

fn ioapic_read(base: u64, reg: u32) -> u32 {
    // SAFETY: as for `ioapic_write`.
    unsafe {
        core::ptr::write_volatile((base + IOREGSEL) as *mut u32, reg);
        core::ptr::read_volatile((base + IOWIN) as *const u32)
    }
}

/// `irq=intx` (boot CPU, ring 0, after [`setup`]): routes GSI `gsi` (the device's
/// interrupt line) through the I/O APIC to local APIC `apic_id` with [`INTX_VECTOR`],
/// level-triggered, fixed delivery, physical destination, unmasked; the handler reads
/// the ISR byte at `isr`. An error says why it cannot be done.
pub fn route_intx(gsi: u32, isr: u64, apic_id: u32) -> Result<IntxRoute, &'static str> {
    let route = route_level(gsi, INTX_VECTOR, apic_id)?;
    ISR_ADDR.store(isr, Ordering::Relaxed);
    Ok(route)
}

/// Routes GSI `gsi` through the I/O APIC to local APIC `apic_id` with `vector`,
/// level-triggered, active high, fixed delivery, physical destination, unmasked (boot
/// CPU, ring 0, after [`setup`]).
pub fn route_level(gsi: u32, vector: u8, apic_id: u32) -> Result<IntxRoute, &'static str> {
    let base = IOAPIC[0].load(Ordering::Relaxed);
    let first = IOAPIC[1].load(Ordering::Relaxed) as u32;
    if base == 0 {
        return Err("no I/O APIC in the MADT");
    }
    if base + 0x20 > 1 << 32 {
        return Err("the I/O APIC is not below 4 GiB");
    }
    if apic_id > 0xff {
        return Err("the boot vCPU's APIC id does not fit an I/O APIC destination");
    }
    crate::paging::set_uncached(base);
    let inputs = ((ioapic_read(base, IOAPIC_VER) >> 16) & 0xff) + 1;
    let input = gsi.wrapping_sub(first);
    if gsi < first || input >= inputs {
        return Err("the interrupt line is not an input of the I/O APIC");
    }
    ioapic_write(base, IOREDTBL + 2 * input + 1, apic_id << 24);
    ioapic_write(base, IOREDTBL + 2 * input, u32::from(vector) | REDIR_LEVEL);
    Ok(IntxRoute {
        ioapic: base,
        input,
    })
}

/// MSI-X interrupts taken so far on queue `q`.
fn count(q: usize) -> u64 {
    COUNTS[q].load(Ordering::Relaxed)
}

/// Interrupts taken so far (of the mode in use).
fn total() -> u64 {
    (0..QUEUES).map(count).sum::<u64>() + INTX_COUNT.load(Ordering::Relaxed)
}

/// What a vCPU on `queue` watches: its queue's MSI-X count, or the INTx count (one line
/// for every queue).
fn watched(queue: usize) -> u64 {
    match mode() {
        Irq::Intx => INTX_COUNT.load(Ordering::Relaxed),
        _ => count(queue),
    }
}

fn kind() -> &'static str {
    match mode() {
        Irq::Intx => "INTx",
        _ => "MSI-X",
    }
}

/// `dma-verify` with `irq=`: a vCPU's queue must have had an interrupt during each of its
/// passes (so a VMM that stops delivering them, e.g. after a migration, is caught).
pub struct PassWatch {
    queue: u32,
    seen: u64,
}

impl PassWatch {
    pub fn new(queue: u32) -> PassWatch {
        PassWatch {
            queue,
            seen: watched(queue as usize),
        }
    }

    /// After pass `pass` of vCPU `cpu` (ring 3): with `irq=`, fails the run unless the
    /// queue had an interrupt since the last call (after a second's grace).
    pub fn pass_done(&mut self, cpu: u32, pass: u64) {
        if !user_interrupts() {
            return;
        }
        let q = self.queue as usize;
        let end = timer::now() + timer::hz();
        while watched(q) == self.seen && timer::now() < end {
            core::hint::spin_loop();
        }
        let now = watched(q);
        if now == self.seen {
            crate::workload::fail(format_args!(
                "no {} interrupt on queue {q} during pass {pass} of cpu {cpu}",
                kind()
            ));
        }
        self.seen = now;
    }
}

/// Prints `guest: dma interrupts <n> (irq=<off|msix|intx>, <k> completions)` at the end of
/// a `dma-verify` or `dma-bench` run (ring 3, boot vCPU, once every vCPU is done). With
/// `irq=` there must have been interrupts (after a second's grace for one still on its
/// way), else the run fails: `no MSI-X interrupt after <k> completions` (or `INTx`); with
/// `irq=msix` also every queue that completed requests must have had one: `no MSI-X
/// interrupt on queue <q> after <k> completions`.
pub fn report() {
    use crate::virtio::queue;
    let mode = mode();
    let completions = queue::completions();
    let silent = || match mode {
        Irq::Off => None,
        Irq::Msix => (0..QUEUES).find(|&q| queue::completions_on(q as u32) > 0 && count(q) == 0),
        Irq::Intx => (completions > 0 && total() == 0).then_some(0),
    };
    if silent().is_some() {
        let end = timer::now() + timer::hz();
        while silent().is_some() && timer::now() < end {
            core::hint::spin_loop();
        }
    }
    let n = total();
    say!(
        "dma interrupts {n} (irq={}, {completions} completions)",
        mode.name()
    );
    if mode == Irq::Off {
        return;
    }
    if n == 0 && completions > 0 {
        crate::workload::fail(format_args!(
            "no {} interrupt after {completions} completions",
            kind()
        ));
    }
    if let Some(q) = silent() {
        crate::workload::fail(format_args!(
            "no MSI-X interrupt on queue {q} after {} completions",
            queue::completions_on(q as u32)
        ));
    }
}
