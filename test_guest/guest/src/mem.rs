//! `memcpy`, `memmove`, `memset`, `memcmp` and `bcmp`: the compiler emits calls to them and
//! on this target nothing else provides them (no libc). String instructions, written in
//! assembly so the compiler cannot turn them back into calls to themselves.

core::arch::global_asm!(
    r#"
    .pushsection .text.mem, "ax", @progbits
    .global memcpy
memcpy:
    movq %rdi, %rax
    movq %rdx, %rcx
    rep movsb
    ret

    .global memmove
memmove:
    movq %rdi, %rax
    movq %rdx, %rcx
    cmpq %rsi, %rdi
    jbe 2f
    leaq (%rsi,%rdx), %r8
    cmpq %r8, %rdi
    jae 2f
    /* Overlapping with the destination above the source: copy backwards. */
    leaq -1(%rsi,%rdx), %rsi
    leaq -1(%rdi,%rdx), %rdi
    std
    rep movsb
    cld
    ret
2:
    rep movsb
    ret

    .global memset
memset:
    movq %rdi, %r8
    movl %esi, %eax
    movq %rdx, %rcx
    rep stosb
    movq %r8, %rax
    ret

    .global memcmp
    .global bcmp
memcmp:
bcmp:
    xorl %eax, %eax
    testq %rdx, %rdx
    jz 4f
3:
    movzbl (%rdi), %eax
    movzbl (%rsi), %ecx
    subl %ecx, %eax
    jnz 4f
    incq %rdi
    incq %rsi
    decq %rdx
    jnz 3b
4:
    ret
    .popsection
"#,
    options(att_syntax)
);
