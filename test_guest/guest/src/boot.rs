//! Entry points, descriptor tables, privilege levels, and the memory the guest reserves
//! for itself.
//!
//! * `pvh_start32`: the PVH entry (named by the `XEN_ELFNOTE_PHYS32_ENTRY` note). The
//!   boot vCPU arrives in 32-bit protected mode, paging off, `ebx` = `hvm_start_info`,
//!   at the image's load address (1 MiB, see link.ld). It copies the image to where it
//!   runs (0x20000) and continues there: loads our GDT, zeroes .bss, identity-maps
//!   0-4 GiB with 2 MiB pages, turns on SSE and long mode and calls [`crate::bsp_main`]
//!   on CPU 0's stack.
//! * `ap_trampoline` (at 0x20000, SIPI vector 0x20): application processors arrive in real
//!   mode, go to protected mode, then take the same road to long mode on the same page
//!   tables, claim the ticket [`AP_TICKET`] the boot CPU set for them, and call
//!   [`crate::smp::ap_main`] on their own stack.
//! * [`enter_user`]: every vCPU runs its workload in ring 3 (see `sys` for why), with a
//!   per-CPU TSS giving the kernel stack for exceptions, system calls among them.
//! * Exception stubs for vectors 0-31: a system call returns, anything else prints what
//!   happened and exits with failure.
//!
//! GDT (the layout Linux uses, so selectors look familiar to any hypervisor):
//! 0x08 32-bit code, 0x10 64-bit kernel code, 0x18 kernel data, 0x20 32-bit user code
//! (unused), 0x28 user data, 0x30 64-bit user code, 0x40 + 16*cpu that CPU's TSS.

use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;
use core::sync::atomic::AtomicU32;

use crate::arch::rdmsr;

/// Most vCPUs the guest runs (each needs stacks below 1 MiB).
pub const MAX_CPUS: usize = 24;
/// Stack bytes per vCPU for booting (ring 0) and then the workload (ring 3).
pub const STACK_SIZE: usize = 8192;
/// Kernel stack bytes per vCPU for system calls and exceptions once in ring 3.
pub const KSTACK_SIZE: usize = 4096;
/// Page directories for RAM above 4 GiB when 1 GiB pages are not available: with the four
/// for the low 4 GiB, 2 MiB pages then reach 20 GiB of address space (16 GiB of RAM with
/// a 3 GiB hole below 4 GiB).
pub const PD_POOL: usize = 16;
/// Page holding the AP real-mode entry; the SIPI vector is its page number.
pub const TRAMPOLINE_ADDR: u64 = 0x20000;

const KERNEL_CS: u64 = 0x10;
const USER_DS: u64 = 0x28 | 3;
const USER_CS: u64 = 0x30 | 3;
const TSS_SELECTOR_BASE: u16 = 0x40;

/// A page-aligned page of page-table entries.
#[repr(C, align(4096))]
pub struct Page(pub [u64; 512]);

/// Memory shared with assembly code or other vCPUs that Rust's aliasing rules cannot
/// describe; users go through raw pointers and say why each access is safe.
#[repr(transparent)]
pub struct Shared<T>(UnsafeCell<T>);

// SAFETY: every access goes through `get()` raw pointers, under the protocol documented
// at each use (boot CPU only before other vCPUs run, or per-vCPU disjoint parts).
unsafe impl<T> Sync for Shared<T> {}

impl<T> Shared<T> {
    pub const fn new(v: T) -> Self {
        Shared(UnsafeCell::new(v))
    }
    pub fn get(&self) -> *mut T {
        self.0.get()
    }
}

const ZERO_PAGE: Page = Page([0; 512]);

/// PML4 of the identity map; every vCPU loads it into CR3.
#[no_mangle]
pub static BOOT_PML4: Shared<Page> = Shared::new(ZERO_PAGE);
/// The one PDPT (512 GiB).
#[no_mangle]
pub static BOOT_PDPT: Shared<Page> = Shared::new(ZERO_PAGE);
/// Page directories for 0-4 GiB (2 MiB pages), filled by the entry code.
#[no_mangle]
pub static BOOT_PD: Shared<[Page; 4]> = Shared::new([ZERO_PAGE; 4]);
/// Page directories for RAM above 4 GiB, see [`PD_POOL`].
pub static PD_POOL_PAGES: Shared<[Page; PD_POOL]> = Shared::new([ZERO_PAGE; PD_POOL]);

#[repr(C, align(4096))]
pub struct Stacks<const N: usize>(pub [[u8; N]; MAX_CPUS]);
/// vCPU `i` boots and then runs its workload on `CPU_STACKS[i]` (the boot vCPU is 0).
#[no_mangle]
pub static CPU_STACKS: Shared<Stacks<STACK_SIZE>> =
    Shared::new(Stacks([[0; STACK_SIZE]; MAX_CPUS]));
/// vCPU `i`'s ring-0 stack once it runs in ring 3 (its TSS's RSP0).
static KERNEL_STACKS: Shared<Stacks<KSTACK_SIZE>> =
    Shared::new(Stacks([[0; KSTACK_SIZE]; MAX_CPUS]));

/// A 64-bit TSS: only RSP0 and the I/O map base (none) are used.
#[repr(C, align(16))]
struct Tss([u8; 104]);
static TSS: Shared<[Tss; MAX_CPUS]> = Shared::new([const { Tss([0; 104]) }; MAX_CPUS]);

/// The CPU index (1..) the next AP to wake takes; 0 when there is none to take. An AP
/// that finds 0 (it came up after the boot CPU gave up on it) halts.
#[no_mangle]
pub static AP_TICKET: AtomicU32 = AtomicU32::new(0);

global_asm!(
    r#"
    /* ---- PVH entry note: Xen, XEN_ELFNOTE_PHYS32_ENTRY (18), 8-byte address ---- */
    .pushsection .note.pvh, "a", @note
    .balign 4
    .long 4
    .long 8
    .long 18
    .asciz "Xen"
    .balign 4
    .quad pvh_start32
    .popsection

    /* ---- GDT shared by all vCPUs (layout in the module docs) ---- */
    .pushsection .data.boot_gdt, "aw", @progbits
    .balign 16
    .global BOOT_GDT
BOOT_GDT:
    .quad 0
    .quad 0x00cf9b000000ffff
    .quad 0x00af9b000000ffff
    .quad 0x00cf93000000ffff
    .quad 0x00cffb000000ffff
    .quad 0x00cff3000000ffff
    .quad 0x00affb000000ffff
    .quad 0
    .fill {tss_words}, 8, 0
boot_gdt_end:
    .balign 8
boot_gdt_desc:
    .word boot_gdt_end - BOOT_GDT - 1
    .quad BOOT_GDT
    .balign 4
pvh_start_info_ptr:
    .long 0
    .popsection

    /* ---- 32-bit to 64-bit: PAE, SSE, CR3, EFER.LME, paging ---- */
    .macro ENTER_LONG_MODE target
    movl %cr4, %eax
    orl $0x620, %eax            /* PAE | OSFXSR | OSXMMEXCPT */
    movl %eax, %cr4
    movl $BOOT_PML4, %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx      /* EFER */
    rdmsr
    orl $0x100, %eax            /* LME */
    wrmsr
    movl $0x80000033, %eax      /* PG | NE | ET | MP | PE: caches on, no EM/TS */
    movl %eax, %cr0
    ljmpl $0x10, $\target
    .endm

    .macro LOAD_DATA_SEGMENTS
    movl $0x18, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl %eax, %fs
    movl %eax, %gs
    .endm

    /* ---- AP trampoline: real mode, CS = 0x2000, IP = 0 ---- */
    .pushsection .trampoline, "ax", @progbits
    .balign 4096
    .code16
    .global ap_trampoline
ap_trampoline:
    cli
    cld
    movw %cs, %ax
    movw %ax, %ds
    lgdtl (ap_gdt_desc - ap_trampoline)
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $0x08, $ap_start32
    .balign 8
ap_gdt_desc:
    .word boot_gdt_end - BOOT_GDT - 1
    .long BOOT_GDT
    .code64
    .popsection

    /* ---- PVH entry, at the load address (1 MiB): copy the image down, jump there ---- */
    .pushsection .text.pvh_entry, "ax", @progbits
    .code32
    .global pvh_start32
pvh_start32:
    cli
    cld
    /* The PVH ABI gives flat 32-bit ds/es; ebx (start info) is kept. */
    movl $__load_image, %esi
    movl $__image_start, %edi
    movl $__copy_end, %ecx
    subl %edi, %ecx
    rep movsb
    movl $pvh_low32, %eax
    jmp *%eax
    .code64
    .popsection

    .pushsection .text.boot, "ax", @progbits
    .code32
pvh_low32:
    movl %ebx, pvh_start_info_ptr
    lgdtl boot_gdt_desc
    ljmpl $0x08, $1f
1:
    LOAD_DATA_SEGMENTS
    /* Zero .bss (page tables, stacks): the loader may not have. */
    movl $__bss_start, %edi
    movl $__bss_end, %ecx
    subl %edi, %ecx
    xorl %eax, %eax
    rep stosb
    /* 2048 PD entries: 2 MiB pages over 0-4 GiB, present + writable + user + large. */
    movl $BOOT_PD, %edi
    xorl %ecx, %ecx
2:
    movl %ecx, %eax
    shll $21, %eax
    orl $0x87, %eax
    movl %eax, (%edi,%ecx,8)
    incl %ecx
    cmpl $2048, %ecx
    jb 2b
    movl $BOOT_PDPT, %edi
    movl $BOOT_PD + 7, %eax
    movl %eax, 0(%edi)
    addl $4096, %eax
    movl %eax, 8(%edi)
    addl $4096, %eax
    movl %eax, 16(%edi)
    addl $4096, %eax
    movl %eax, 24(%edi)
    movl $BOOT_PDPT + 7, %eax
    movl %eax, BOOT_PML4
    ENTER_LONG_MODE bsp_start64

ap_start32:
    LOAD_DATA_SEGMENTS
    ENTER_LONG_MODE ap_start64

    .code64
bsp_start64:
    LOAD_DATA_SEGMENTS
    leaq CPU_STACKS+{stack_size}(%rip), %rsp
    movl pvh_start_info_ptr(%rip), %edi
    call {bsp_main}
    jmp guest_halt

ap_start64:
    LOAD_DATA_SEGMENTS
    xorl %eax, %eax
    xchgl %eax, AP_TICKET(%rip)
    testl %eax, %eax
    jz guest_halt
    movl %eax, %edi
    leal 1(%rax), %ecx
    imulq ${stack_size}, %rcx, %rcx
    leaq CPU_STACKS(%rip), %rsp
    addq %rcx, %rsp
    call {ap_main}
guest_halt:
    cli
    hlt
    jmp guest_halt

    /* ---- exception stubs: push [error code,] vector; frame pointer to Rust ---- */
    .macro ISR_NOERR vec
isr_\vec:
    pushq $0
    pushq $\vec
    jmp isr_common
    .endm
    .macro ISR_ERR vec
isr_\vec:
    pushq $\vec
    jmp isr_common
    .endm
    .irp v, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31
    ISR_NOERR \v
    .endr
    /* The ACPI SCI (`power_button::SCI_VECTOR`): an interrupt, handled in `trap`. */
    ISR_NOERR 97
    .irp v, 8,10,11,12,13,14,17,21,29,30
    ISR_ERR \v
    .endr
isr_common:
    /* Save every register: a trap from ring 3 may be a system call that returns. */
    pushq %rax
    pushq %rbx
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %rbp
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    cld
    movq %rsp, %rdi
    movq %rsp, %rbx
    andq $-16, %rsp
    call {trap}
    movq %rbx, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rbp
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rbx
    popq %rax
    addq $16, %rsp
    iretq
    .popsection

    .pushsection .rodata.isr_table, "a", @progbits
    .balign 8
    .global ISR_TABLE
ISR_TABLE:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad isr_\v
    .endr
    .global ISR_SCI
ISR_SCI:
    .quad isr_97
    .popsection
"#,
    stack_size = const STACK_SIZE,
    tss_words = const 2 * MAX_CPUS,
    bsp_main = sym crate::bsp_main,
    ap_main = sym crate::smp::ap_main,
    trap = sym trap,
    options(att_syntax)
);

extern "C" {
    /// Addresses of the 32 exception stubs.
    static ISR_TABLE: [u64; 32];
    /// Address of the SCI's stub (vector 97, through `trap`).
    static ISR_SCI: u64;
    static mut BOOT_GDT: [u64; 8 + 2 * MAX_CPUS];
    static __image_start: u8;
    static __image_end: u8;
}

/// The guest's own memory: `[start, end)` (code, data, page tables, stacks).
pub fn image_range() -> core::ops::Range<u64> {
    // Only the addresses of the linker-script symbols are taken, never their contents.
    (core::ptr::addr_of!(__image_start) as u64)..(core::ptr::addr_of!(__image_end) as u64)
}

/// 256 gates, 16 bytes each: the exceptions (0-31), then only what `irq` installs
/// (`irq=msix`); the others are not present.
static IDT: Shared<[u64; 512]> = Shared::new([0; 512]);

fn gate(handler: u64) -> (u64, u64) {
    // Interrupt gate (IF cleared on entry), present, DPL 0, selector = 64-bit kernel code.
    let low =
        (handler & 0xffff) | KERNEL_CS << 16 | 0x8e00 << 32 | ((handler >> 16) & 0xffff) << 48;
    (low, handler >> 32)
}

/// Loads the IDT (filling its exception gates on the first call): exceptions print and
/// fail instead of triple-faulting into a silent reset.
pub fn load_idt() {
    // SAFETY: ISR_TABLE is initialized data from the assembly above. The exception gates
    // are written by the boot CPU before any AP runs, and each AP writes the same values
    // again, so there is no conflicting access (`set_gate` writes only gates from 32 up).
    // The gates are written through a raw pointer, never through a reference to the
    // whole table. `lidt` takes a valid descriptor of a static table whose present gates
    // all point at stubs.
    unsafe {
        let idt = IDT.get() as *mut u64;
        for (v, &addr) in ISR_TABLE.iter().enumerate() {
            let (low, high) = gate(addr);
            idt.add(2 * v).write_volatile(low);
            idt.add(2 * v + 1).write_volatile(high);
        }
        let base = IDT.get() as u64;
        let desc: [u16; 5] = [
            (512 * 8 - 1) as u16,
            base as u16,
            (base >> 16) as u16,
            (base >> 32) as u16,
            (base >> 48) as u16,
        ];
        asm!("lidt [{}]", in(reg) &desc, options(readonly, nostack, preserves_flags));
    }
}

/// The stub of the SCI's vector (97), which saves every register and calls `trap`.
pub fn sci_stub() -> u64 {
    // SAFETY: ISR_SCI is initialized data from the assembly above.
    unsafe { ISR_SCI }
}

/// Points IDT vector `vector` (32 or more) at `handler`, an interrupt gate (IF cleared on
/// entry) to ring 0. Boot CPU, before the workload starts.
pub fn set_gate(vector: u8, handler: u64) {
    assert!(vector >= 32, "vector {vector} is an exception");
    let v = usize::from(vector);
    let (low, high) = gate(handler);
    // SAFETY: gate `v` (< 256) of the static IDT, written through a raw pointer; only the
    // boot CPU writes gates from 32 up, and no CPU can take that vector yet (interrupts
    // are off until the workloads run in ring 3, after `smp::GO` publishes this).
    unsafe {
        let idt = IDT.get() as *mut u64;
        idt.add(2 * v).write_volatile(low);
        idt.add(2 * v + 1).write_volatile(high);
    }
}

/// Drops this vCPU (index `cpu`) to ring 3 at `entry(cpu)`, on a fresh copy of its stack,
/// with interrupts off (on with `irq=msix`, see `irq`). System calls, exceptions and
/// interrupts come back to ring 0 on the CPU's kernel stack (TSS.RSP0).
pub fn enter_user(cpu: u32, entry: extern "C" fn(u32) -> !) -> ! {
    let i = cpu as usize;
    assert!(i < MAX_CPUS);
    let rflags: u64 = if crate::irq::user_interrupts() {
        0x202
    } else {
        2
    };
    // SAFETY: each CPU writes only its own TSS and its own GDT slot (index 8 + 2 * cpu),
    // before loading it with `ltr`; nobody else reads them. The kernel and user stack
    // tops are the ends of this CPU's own static stacks. The iretq frame is the ring-3
    // selectors of the static GDT, a 16-byte aligned stack and `entry`, a function that
    // never returns; RFLAGS = 2 keeps interrupts off and IOPL 0 (0x202: interrupts on,
    // for `irq=msix`, whose gates `irq::setup` installed).
    unsafe {
        let tss = &mut (*TSS.get())[i].0;
        let kstack_top = (*KERNEL_STACKS.get()).0[i].as_ptr() as u64 + KSTACK_SIZE as u64;
        tss[4..12].copy_from_slice(&kstack_top.to_le_bytes());
        tss[102..104].copy_from_slice(&104u16.to_le_bytes()); // no I/O permission map
        let base = tss.as_ptr() as u64;
        let limit = 103u64;
        let gdt = core::ptr::addr_of_mut!(BOOT_GDT) as *mut u64;
        *gdt.add(8 + 2 * i) = (limit & 0xffff)
            | (base & 0xff_ffff) << 16
            | 0x89 << 40 // present, 64-bit TSS (available)
            | ((limit >> 16) & 0xf) << 48
            | ((base >> 24) & 0xff) << 56;
        *gdt.add(9 + 2 * i) = base >> 32;
        let selector = TSS_SELECTOR_BASE + 16 * cpu as u16;
        asm!("ltr {0:x}", in(reg) selector, options(nostack, preserves_flags));
        let user_stack_top = (*CPU_STACKS.get()).0[i].as_ptr() as u64 + STACK_SIZE as u64;
        asm!(
            "push {ss}",
            "push {rsp}",
            "push {rflags}",
            "push {cs}",
            "push {rip}",
            "iretq",
            ss = in(reg) USER_DS,
            rsp = in(reg) user_stack_top,
            rflags = in(reg) rflags,
            cs = in(reg) USER_CS,
            rip = in(reg) entry as usize as u64,
            in("rdi") cpu,
            options(noreturn)
        )
    }
}

/// The registers the exception stubs save, lowest address first, then what the CPU
/// pushed. A system call (see `sys`) reads its arguments here and returns through it.
#[repr(C)]
pub struct Trap {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

const NAMES: [&str; 32] = [
    "#DE divide error",
    "#DB debug",
    "NMI",
    "#BP breakpoint",
    "#OF overflow",
    "#BR bound range",
    "#UD invalid opcode",
    "#NM device not available",
    "#DF double fault",
    "coprocessor overrun",
    "#TS invalid TSS",
    "#NP segment not present",
    "#SS stack fault",
    "#GP general protection",
    "#PF page fault",
    "reserved",
    "#MF x87 error",
    "#AC alignment check",
    "#MC machine check",
    "#XM SIMD error",
    "#VE virtualization",
    "#CP control protection",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "#HV hypervisor injection",
    "#VC VMM communication",
    "#SX security",
    "reserved",
];

/// Every exception lands here, in ring 0. System calls return; anything else is fatal.
extern "C" fn trap(t: &mut Trap) {
    if crate::sys::is_call(t) {
        crate::sys::handle(t);
        return;
    }
    if t.vector == u64::from(crate::power_button::SCI_VECTOR) {
        crate::power_button::sci();
        return;
    }
    if t.vector == 2 {
        // The VMM's vm.nmi: say so and go on where the CPU was.
        crate::serial::print_line_forced(format_args!(
            "guest: NMI on apic_id {} at rip={:#x}",
            crate::apic::current_id(),
            t.rip
        ));
        return;
    }
    let cr2: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack, preserves_flags)) };
    crate::serial::print_line_forced(format_args!(
        "FAIL exception {} ({}) error={:#x} rip={:#x} cs={:#x} rsp={:#x} cr2={:#x} apic_id={} efer={:#x}",
        t.vector,
        NAMES[(t.vector & 31) as usize],
        t.error,
        t.rip,
        t.cs,
        t.rsp,
        cr2,
        crate::apic::current_id(),
        rdmsr(0xc000_0080),
    ));
    crate::exit(1)
}
