# hotpage: what a benchmark's per-thread bookkeeping does to a distributed guest. Each event is
# probe_arg thousand loop iterations of local work (default 1600: about 0.6 ms here, one
# sysbench cpu event) followed by a store to the vCPU's own counter; every vCPU's counter sits in
# one 4 KiB page, as sysbench's per-thread statistics do. Each vCPU runs 3.2e9 / (probe_arg *
# 1000) events (the same work whatever the event size) and reports how many (HPEV) and the
# kvmclock nanoseconds they took (HPNS); `spanvm bench sharing` turns them into events per
# second. Exit 1 if a counter is wrong.
.include "rt.S"

.equ BARRIER, PROBE_DATA_ADDR
.equ PAGE, PROBE_DATA_ADDR + 0x20000
.equ TOTAL_WORK_K, 3200000

cpl0_init:
    ret

user_main:
    mov r12, [rip + rt_probe_arg]
    test r12, r12
    jnz 1f
    mov r12, 1600
1:  imul r10, r12, 1000                 # iterations per event
    mov rax, TOTAL_WORK_K
    xor edx, edx
    div r12
    mov r12, rax                        # events
    test r12, r12
    jnz 2f
    mov r12, 1
2:  mov rdi, BARRIER
    mov rsi, 1
    call rt_barrier
    mov rdi, r15
    call rt_clock_ns
    mov r14, rax
    mov rbx, r15
    shl rbx, 6                          # one 64-byte line per vCPU, all in one page
    lea rdi, [PAGE + rbx]
    mov rcx, r12
3:  mov r8, r10
4:  dec r8
    jnz 4b
    add qword ptr [rdi], 1
    dec rcx
    jnz 3b
    mov rdi, r15
    call rt_clock_ns
    sub rax, r14
    mov edi, 0x534e5048                 # "HPNS"
    mov rsi, rax
    call rt_report
    mov r13, [PAGE + rbx]
    mov edi, 0x56455048                 # "HPEV"
    mov rsi, r13
    call rt_report
    xor edi, edi
    cmp r13, r12
    setne dil
    call rt_exit
