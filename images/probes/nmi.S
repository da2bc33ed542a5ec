# nmi: vCPU 0 sends NMIs (xAPIC ICR, delivery mode NMI, physical) to every other vCPU in turn,
# ROUNDS to each (probe_arg, default 1000), one at a time: the next only once the target's NMI
# handler (vector 2) counted the last, read from the target's own page, or after 10 s (then
# LOST += 1). A target keeps its APIC software-disabled for the first half (an NMI must still
# arrive, SDM 10.4.7.2) and enables it for the second. Every vCPU reports NMIN (NMIs its
# handler saw) and NMIE (1 if its APIC was enabled by the end); vCPU 0 reports NMIS (sent) and
# LOST.
.include "rt.S"

.equ BARRIER, PROBE_DATA_ADDR + 0x8000
.equ DONE, PROBE_DATA_ADDR + 0x9000
.equ PAGES, PROBE_DATA_ADDR + 0x10000  # one page per vCPU: +0 NMIs received
.equ TIMEOUT_NS, 10000000000       # NMIs take milliseconds here (see the test)

cpl0_init:
    RT_SET_HANDLER 2, on_nmi
    test rdi, rdi
    jnz 1f
    movabs rax, LAPIC_ADDR
    mov dword ptr [rax + 0xf0], 0x1ff   # the sender's APIC is enabled
1:  ret

on_nmi:                                 # rdx = vCPU index
    shl rdx, 12
    add rdx, PAGES
    inc qword ptr [rdx]
    ret

rounds:                                 # rax = rounds per target
    mov rax, [rip + rt_probe_arg]
    test rax, rax
    jnz 1f
    mov eax, 1000
1:  ret

user_main:
    cmp qword ptr [rip + rt_vcpu_count], 2
    jb too_few
    mov r12, r15
    shl r12, 12
    add r12, PAGES
    mov rdi, BARRIER
    mov rsi, 1
    call rt_barrier
    test r15, r15
    jnz target

    xor r13, r13                        # LOST
    xor r14, r14                        # sent
    mov ebx, 1                          # target
1:  xor ebp, ebp                        # rounds to this target
2:  movabs rax, LAPIC_ADDR
    mov ecx, ebx
    shl ecx, 24
    mov [rax + 0x310], ecx
    mov dword ptr [rax + 0x300], 0x4400 # NMI, physical, assert
    inc r14
    inc rbp
    mov rdi, r15
    call rt_clock_ns
    mov [r12 + 8], rax                  # start
    mov rcx, rbx
    shl rcx, 12
    add rcx, PAGES
    mov [r12 + 16], rcx                 # the target's page
3:  mov rcx, [r12 + 16]
    cmp [rcx], rbp
    jae 4f
    pause
    mov rdi, r15
    call rt_clock_ns
    sub rax, [r12 + 8]
    movabs rcx, TIMEOUT_NS
    cmp rax, rcx
    jb 3b
    inc r13
    mov rcx, [r12 + 16]
    mov rbp, [rcx]                      # go on from what arrived
4:  call rounds
    cmp rbp, rax
    jb 2b
    inc rbx
    cmp rbx, [rip + rt_vcpu_count]
    jb 1b
    mov qword ptr [DONE], 1
    mov edi, 0x53494d4e                 # "NMIS"
    mov rsi, r14
    call rt_report
    mov edi, 0x54534f4c                 # "LOST"
    mov rsi, r13
    call rt_report
    jmp report

target:
    call rounds                         # enable the APIC after half the NMIs
    shr rax, 1
1:  cmp [r12], rax
    jae 2f
    cmp qword ptr [DONE], 0
    jne 2f
    pause
    jmp 1b
2:  movabs rax, LAPIC_ADDR
    mov dword ptr [rax + 0xf0], 0x1ff
3:  cmp qword ptr [DONE], 0
    jne report
    pause
    jmp 3b

report:
    mov edi, 0x4e494d4e                 # "NMIN"
    mov rsi, [r12]
    call rt_report
    movabs rax, LAPIC_ADDR
    mov esi, [rax + 0xf0]
    shr esi, 8
    and esi, 1
    mov edi, 0x45494d4e                 # "NMIE"
    call rt_report
    mov edi, 0
    call rt_exit

too_few:
    mov edi, 2
    call rt_exit
