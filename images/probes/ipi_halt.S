# ipi-halt: IPI ping-pong between vCPUs 0 and 1 where both wait in `hlt` (at CPL0, interrupts
# on) instead of spinning, as an idle Linux CPU does: every IPI then wakes a halted vCPU rather
# than kicking a running one out of the guest. vCPU 0 reports the mean round trip in TSC ticks
# (IPRT) and the pongs it got (IPIN). xAPIC mode; needs >= 2 vCPUs.
.include "rt.S"

.equ ROUNDS, 1000
.equ PING_VECTOR, 0x42
.equ RECEIVED, PROBE_DATA_ADDR          # u64 per vCPU, 64 bytes apart
.equ BARRIER, PROBE_DATA_ADDR + 0x8000

cpl0_init:
    RT_SET_HANDLER PING_VECTOR, on_ping
    movabs rax, LAPIC_ADDR
    mov dword ptr [rax + 0xf0], 0x1ff   # SVR: software enable
    cmp qword ptr [rip + rt_vcpu_count], 2
    jb 9f
    cmp rdi, 1
    ja 9f
    mov r15, rdi
    mov rdi, BARRIER
    mov rsi, 1
    call rt_barrier
    test r15, r15
    jnz responder
    # vCPU 0: ping, halt until the pong's handler ran, repeat.
    call rt_rdtsc
    mov r13, rax
    xor rbx, rbx
1:  mov edi, 1
    call send_ping
2:  sti
    hlt
    cli
    lea rax, [rbx + 1]
    cmp [RECEIVED], rax
    jb 2b
    inc rbx
    cmp rbx, ROUNDS
    jb 1b
    call rt_rdtsc
    sub rax, r13
    xor edx, edx
    mov rcx, ROUNDS
    div rcx
    mov rsi, rax
    mov edi, 0x54525049                 # "IPRT"
    call rt_report
    mov rsi, [RECEIVED]
    mov edi, 0x4e495049                 # "IPIN"
    call rt_report
    mov edi, 0
    call rt_exit
responder:
    # vCPU 1: everything happens in the handler; it exits after the last pong.
3:  sti
    hlt
    jmp 3b
9:  ret

on_ping:                                # rdx = vCPU index
    mov r8, rdx
    shl r8, 6
    add r8, RECEIVED
    inc qword ptr [r8]
    movabs rax, LAPIC_ADDR
    mov dword ptr [rax + 0xb0], 0       # EOI
    test rdx, rdx
    jz 1f
    mov edi, 0
    call send_ping                      # pong
    cmp qword ptr [r8], ROUNDS
    jb 1f
    mov edi, 0
    call rt_exit
1:  ret

send_ping:                              # rdi = destination APIC ID
    movabs rax, LAPIC_ADDR
    shl edi, 24
    mov [rax + 0x310], edi
    mov dword ptr [rax + 0x300], PING_VECTOR | (1 << 14)
    ret

user_main:
    mov edi, 0
    call rt_exit
