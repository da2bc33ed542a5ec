# touch: every page of guest RAM above the probe's own area is written by one vCPU (page p by
# vCPU p mod n) with a pattern derived from its address, then, after a barrier, every vCPU checks
# the pages of the next vCPU. Reports pages written, pages verified, and mismatches (exit 1 if
# any). RAM beyond 3 GiB continues at 4 GiB, past the MMIO gap.
.include "rt.S"

.equ BARRIER, PROBE_DATA_ADDR
.equ FIRST_PAGE, PROBE_DATA_ADDR + 0x10000
.equ LOW_RAM_MAX, 0xC0000000
.equ HIGH_RAM_BASE, 0x100000000
.equ PATTERN, 0x5350414e564d2121

cpl0_init:
    ret

# rdi = linear RAM offset -> rax = guest-physical address (skips the MMIO gap)
linear_to_gpa:
    mov rax, rdi
    mov rcx, LOW_RAM_MAX
    cmp rax, rcx
    jb 1f
    sub rax, rcx
    mov rcx, HIGH_RAM_BASE
    add rax, rcx
1:  ret

# rdi = owner vCPU, rsi = 1 to write, 0 to verify -> rax = pages handled, rdx = mismatches
walk:
    push rbx
    push r12
    push r13
    push r14
    mov r12, rsi
    mov r13, [rip + rt_vcpu_count]
    mov rbx, rdi
    shl rbx, 12
    add rbx, FIRST_PAGE                 # linear offset of this owner's first page
    xor r14, r14                        # pages
    xor r8, r8                          # mismatches
1:  mov rax, [rip + rt_ram_bytes]
    cmp rbx, rax
    jae 9f
    mov rdi, rbx
    call linear_to_gpa
    mov r9, rax
    movabs r10, PATTERN
    xor r10, r9                         # pattern for this page
    test r12, r12
    jz 2f
    mov [r9], r10
    lea r11, [r10 + 1]
    mov [r9 + 4088], r11
    jmp 3f
2:  cmp [r9], r10
    je 4f
    inc r8
4:  lea r11, [r10 + 1]
    cmp [r9 + 4088], r11
    je 3f
    inc r8
3:  inc r14
    mov rax, r13
    shl rax, 12
    add rbx, rax
    jmp 1b
9:  mov rax, r14
    mov rdx, r8
    pop r14
    pop r13
    pop r12
    pop rbx
    ret

user_main:
    mov rdi, r15
    mov rsi, 1
    call walk
    mov rsi, rax
    mov edi, 0x52574750                 # "PGWR"
    call rt_report
    mov rdi, BARRIER
    mov rsi, 1
    call rt_barrier
    mov rax, r15
    inc rax
    xor edx, edx
    div qword ptr [rip + rt_vcpu_count]
    mov rdi, rdx                        # the next vCPU
    mov rsi, 0
    call walk
    mov rbx, rdx
    mov rsi, rax
    mov edi, 0x46564750                 # "PGVF"
    call rt_report
    mov rsi, rbx
    mov edi, 0x44414250                 # "PBAD"
    call rt_report
    xor edi, edi
    test rbx, rbx
    setnz dil
    call rt_exit
