/*
 * Guests for the kvm_pvm repair tests (kvm_tests.rs), assembled and linked when the tests
 * run: .text at 0x10000 on supervisor pages, .utext at 0x200000 on user pages. Each entry
 * point runs at CPL0 in 64-bit mode and ends with hlt; what it observed goes to `results`
 * (slot numbers are the RESULT_* constants of kvm_tests.rs).
 */
    .code64
    .text

.macro save slot, reg
    mov \reg, (results + 8 * \slot)(%rip)
.endm

/* Every instruction the repair knows, executed at CPL0. RDI: feature bits from the test
 * (0 rdrand, 1 rdseed, 2 rdpid, 3 fsgsbase, 4 serialize). */
    .globl insns
insns:
    mov %rdi, %r15
    stac
    pushfq
    pop %rax
    save 0, %rax
    clac
    pushfq
    pop %rax
    save 1, %rax
    int3
    .globl after_int3
after_int3:
    movabs $0xf0f0f0f0f0f0f0f0, %rbx
    popcnt %rbx, %r11
    save 3, %r11
    mov $-1, %r12
    xor %ecx, %ecx
    stc
    popcnt %ecx, %r12d
    pushfq
    pop %rax
    save 4, %r12
    save 5, %rax
    mov $-1, %rdx
    popcnt word16(%rip), %dx
    save 6, %rdx
    lea table(%rip), %rsi
    mov $2, %rdi
    popcnt 8(%rsi,%rdi,8), %rax
    save 7, %rax
    popcnt %gs:0x10, %rbp
    save 8, %rbp
    popcnt across_pages(%rip), %rax
    save 9, %rax
    fwait
    lfence
    mfence
    sfence
    /* swapgs, observed through the MSRs (GS_BASE 0xc0000101, KERNEL_GS_BASE 0xc0000102) */
    swapgs
    mov $0xc0000101, %ecx
    rdmsr
    shl $32, %rdx
    or %rdx, %rax
    save 10, %rax
    mov $0xc0000102, %ecx
    rdmsr
    shl $32, %rdx
    or %rdx, %rax
    save 12, %rax
    swapgs
    mov $0xc0000101, %ecx
    rdmsr
    shl $32, %rdx
    or %rdx, %rax
    save 11, %rax

    bt $4, %r15
    jnc 1f
    serialize
1:
    bt $0, %r15
    jnc 1f
    rdrand %rax
    pushfq
    pop %rbx
    rdrand %rcx
    mov $-1, %r9
    rdrand %r9w
    save 13, %rax
    save 14, %rbx
    save 15, %rcx
    save 16, %r9
1:
    bt $1, %r15
    jnc 1f
    xor %eax, %eax              /* CF clear before */
    rdseed %r10
    pushfq
    pop %rbx
    save 17, %rbx
1:
    bt $2, %r15
    jnc 1f
    rdpid %rax
    save 18, %rax
1:
    bt $3, %r15
    jnc 1f
    rdfsbase %rax
    save 19, %rax
    movabs $0x0000777700001000, %rax
    wrfsbase %rax
    rdfsbase %rbx
    save 20, %rbx
    mov $-1, %rax
    rdfsbase %eax
    save 21, %rax
1:
    movabs $0x600d, %rax
    save 22, %rax
    hlt

/* A syscall from CPL3 and back: iretq to user_entry, which makes two system calls. */
    .globl syscall_test
syscall_test:
    mov %rdi, %r15              /* bit 5: stop before sysretq so the repair does it */
    pushq $0x2b                 /* user SS */
    pushq $0x3ff000             /* user RSP */
    pushq $0x202                /* RFLAGS: IF */
    pushq $0x33                 /* user CS */
    pushq $user_entry
    iretq

    .globl lstar_entry
lstar_entry:
    pushfq                      /* on the user stack: SMAP is off */
    pop %rbx
    cmp $2, %rax
    je 2f
    save 37, %rbx
    mov %cs, %rbx
    save 32, %rbx
    mov %ss, %rbx
    save 33, %rbx
    save 34, %rsp
    save 35, %rcx
    save 36, %r11
    mov $0x77, %eax
    bt $5, %r15
    jnc 3f
    hlt
3:
    .globl sysret_insn
sysret_insn:
    sysretq
2:
    save 38, %rcx
    mov %cs, %rbx
    save 39, %rbx
    hlt
    .globl syscall_end
syscall_end:

/* An instruction KVM's emulator fails on here and the repair does not know. */
    .globl unknown_test
unknown_test:
    lea cx16_target(%rip), %rdi
    xor %eax, %eax
    xor %edx, %edx
    mov $1, %ebx
    xor %ecx, %ecx
    .globl cx16_insn
cx16_insn:
    cmpxchg16b (%rdi)
    movabs $0x600d, %rax
    save 22, %rax
    hlt

/* The safety net: instructions this kvm_pvm's emulator runs itself. Each follows a hlt, and
 * at that stop the test has the repair carry the instruction out, so the processor never
 * runs it (on any host). */
    .globl safety_net
safety_net:
    hlt
    lfence
    hlt
    mfence
    hlt
    sfence
    hlt
    serialize
    hlt
    swapgs
    mov $0xc0000101, %ecx
    rdmsr
    shl $32, %rdx
    or %rdx, %rax
    save 40, %rax
    mov $0xc0000102, %ecx
    rdmsr
    shl $32, %rdx
    or %rdx, %rax
    save 41, %rax
    hlt
    swapgs
    mov $0xc0000101, %ecx
    rdmsr
    shl $32, %rdx
    or %rdx, %rax
    save 42, %rax
    mov $-1, %r9
    xor %eax, %eax              /* CF clear before */
    hlt
    rdrand %r9d
    pushfq
    pop %rbx
    save 43, %rbx
    save 44, %r9
    mov $-1, %r10
    xor %eax, %eax
    hlt
    rdseed %r10w
    pushfq
    pop %rbx
    save 45, %rbx
    save 46, %r10
    hlt
    rdpid %r11
    save 47, %r11
    hlt
    rdfsbase %rax
    save 48, %rax
    movabs $0x0000777700002000, %rcx
    hlt
    wrfsbase %rcx
    hlt
    rdfsbase %rdx
    save 49, %rdx
    mov $-1, %rcx
    mov $0x12345678, %ecx
    hlt
    wrgsbase %ecx
    hlt
    rdgsbase %rsi
    save 50, %rsi
    /* A non-canonical base: #GP(0), and gp_handler resumes at R8. */
    lea 1f(%rip), %r8
    movabs $0x0000800000000000, %rcx
    hlt
    .globl wrfsbase_bad
wrfsbase_bad:
    wrfsbase %rcx
1:
    hlt
    rdfsbase %rdx
    save 51, %rdx
    /* fwait with CR0.TS and CR0.MP: #NM, and nm_handler clears TS and resumes at R8. */
    mov %cr0, %rax
    or $8, %rax
    mov %rax, %cr0
    lea 2f(%rip), %r8
    hlt
    .globl fwait_nm
fwait_nm:
    fwait
2:
    movabs $0x600d, %rax
    save 22, %rax
    hlt
    .globl safety_net_end
safety_net_end:

/* Exception handlers (the test points the IDT at them). */
    .globl nm_handler
nm_handler:
    mov (%rsp), %rax
    save 52, %rax
    clts
    mov %r8, (%rsp)
    iretq

    .globl gp_handler
gp_handler:
    pop %rax
    save 53, %rax
    mov (%rsp), %rax
    save 54, %rax
    mov %r8, (%rsp)
    iretq

    .globl bp_handler
bp_handler:
    mov (%rsp), %rax
    save 2, %rax
    iretq

    .globl pf_handler
pf_handler:
    clac
    /* Reached only when the repair did not take this fault for a half-done syscall. */
    mov (%rsp), %rax
    save 60, %rax
    mov 8(%rsp), %rax
    save 61, %rax
    mov 16(%rsp), %rax
    save 62, %rax
    movabs $0xdead, %rax
    save 63, %rax
    hlt

    .globl unexpected
unexpected:
    mov (%rsp), %rax
    save 60, %rax
    mov 8(%rsp), %rax
    save 61, %rax
    mov 16(%rsp), %rax
    save 62, %rax
    movabs $0xbad, %rax
    save 63, %rax
    hlt

/* Data. */
    .balign 8
word16:
    .word 0x1f00
    .balign 8
    .globl table
table:
    .quad 0x1, 0x3, 0xff, 0xffffffffffffffff
    .balign 16
cx16_target:
    .quad 0, 0
    .globl results
results:
    .fill 64, 8, 0
    .balign 4096
    .skip 4092
across_pages:
    .quad 0x0f0f0f0f0f0f0f0f

    .section .utext, "ax"
    .globl user_entry
user_entry:
    mov $1, %eax
    stc
    syscall
    .globl after_syscall1
after_syscall1:
    mov %rax, %r14
    mov %cs, %r13
    pushfq
    pop %r12
    mov $2, %eax
    syscall
    .globl after_syscall2
after_syscall2:
    ud2
