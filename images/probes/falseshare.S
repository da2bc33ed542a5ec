# falseshare: all vCPUs hammer one page, each incrementing its own 8-byte slot in it with plain
# (non-atomic) adds, probe_arg times (default 100000). No vCPU may lose an update because another
# wrote elsewhere in the page: each checks its slot (FSVL); vCPU 0 also checks every slot after a
# barrier (FSBD = slots that are wrong). Exit 1 on any loss. As in `counter`, some local work
# between increments makes the vCPUs' increments overlap in time.
.include "rt.S"

.equ BARRIER, PROBE_DATA_ADDR
.equ PAGE, PROBE_DATA_ADDR + 0x20000
.equ LOCAL_WORK, 2000

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
    lea rdi, [PAGE + r15*8]
    mov rcx, r12
2:  add qword ptr [rdi], 1
    mov r8, LOCAL_WORK
3:  dec r8
    jnz 3b
    dec rcx
    jnz 2b
    mov rdi, BARRIER
    mov rsi, 2
    call rt_barrier
    mov r13, [PAGE + r15*8]
    mov edi, 0x4c565346                 # "FSVL"
    mov rsi, r13
    call rt_report
    xor rbx, rbx
    test r15, r15
    jnz 4f
    xor rcx, rcx
3:  cmp [PAGE + rcx*8], r12
    je 5f
    inc rbx
5:  inc rcx
    cmp rcx, [rip + rt_vcpu_count]
    jb 3b
    mov edi, 0x44425346                 # "FSBD"
    mov rsi, rbx
    call rt_report
4:  xor edi, edi
    cmp r13, r12
    setne dil
    or rdi, rbx
    setnz dil
    call rt_exit
