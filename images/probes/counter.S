# counter: every vCPU adds 1 to one shared counter with `lock xadd`, probe_arg times (default
# 100000), between two barriers; every vCPU then reports the counter and the expected total.
# Exit 1 if they differ. About a microsecond of local work separates two increments, so that the
# vCPUs' increments overlap in time and, in a distributed guest, the counter's page keeps moving
# between nodes while they run (without it one vCPU would be done before another got the page).
.include "rt.S"

.equ BARRIER, PROBE_DATA_ADDR
.equ COUNTER, PROBE_DATA_ADDR + 0x1000
.equ LOCAL_WORK, 2000                   # loop iterations between increments

cpl0_init:
    ret

user_main:
    mov r12, [rip + rt_probe_arg]
    test r12, r12
    jnz 1f
    mov r12, 100000
1:  mov rdi, BARRIER
    mov rsi, 1
    call rt_barrier
    mov rcx, r12
    mov rdi, COUNTER
2:  mov eax, 1
    lock xadd [rdi], rax
    mov r8, LOCAL_WORK
3:  dec r8
    jnz 3b
    dec rcx
    jnz 2b
    mov rdi, BARRIER
    mov rsi, 2
    call rt_barrier
    mov r13, [COUNTER]
    mov rsi, r13
    mov edi, 0x52544e43                 # "CNTR"
    call rt_report
    mov rax, r12
    imul rax, [rip + rt_vcpu_count]
    mov r14, rax
    mov rsi, rax
    mov edi, 0x50584543                 # "CEXP"
    call rt_report
    xor edi, edi
    cmp r13, r14
    setne dil
    call rt_exit
