# stop-fault: vCPU 1 writes a non-zero pattern into one page, then raises a flag in another and
# finishes; vCPU 0 waits for the flag, reports SEEN, waits probe_arg milliseconds (default 1000)
# and only then reads the pattern page: exit 1 at once unless it holds the pattern, else report
# it (RVAL) and exit 0. Other vCPUs finish at once. A test hangs node 1 while vCPU 0 waits: the
# read then faults on a page only node 1 has, and stays in that DSM fault while node 0 stops.
# Whatever ends node 0, vCPU 0 must report nothing more (no EXIT, no RVAL): the only value it
# could read is made up.
.include "rt.S"

.equ DATA, PROBE_DATA_ADDR + 0x1000
.equ FLAG, PROBE_DATA_ADDR + 0x2000
.equ PATTERN, 0x544c554146504f54

cpl0_init:
    ret

user_main:
    cmp r15, 1
    je writer
    test r15, r15
    jnz done
1:  mov rax, [FLAG]
    test rax, rax
    jnz 2f
    pause
    jmp 1b
2:  mov edi, 0x4e454553                 # "SEEN"
    mov esi, 1
    call rt_report
    mov r12, [rip + rt_probe_arg]
    test r12, r12
    jnz 3f
    mov r12, 1000
3:  imul r12, [rip + rt_tsc_khz]        # milliseconds -> TSC ticks
    call rt_rdtsc
    mov r13, rax
4:  pause
    call rt_rdtsc
    sub rax, r13
    cmp rax, r12
    jb 4b
    mov r13, [DATA]
    # The verdict first, in one exit: a vCPU let through its fault at a stop gets back into the
    # VMM once before it sees the stop, and that exit alone says it read a made-up page.
    movabs rax, PATTERN
    cmp r13, rax
    je 5f
    mov edi, 1
    call rt_exit
5:  mov rsi, r13
    mov edi, 0x4c415652                 # "RVAL"
    call rt_report
    xor edi, edi
    call rt_exit

writer:
    movabs rax, PATTERN
    mov [DATA], rax
    mov qword ptr [FLAG], 1
    mov rsi, rax
    mov edi, 0x544f5257                 # "WROT"
    call rt_report
done:
    xor edi, edi
    call rt_exit
