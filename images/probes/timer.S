# timer: the local APIC timer in its three modes on every vCPU, each counted against kvmclock:
# one-shot (re-armed in the handler), periodic, and TSC-deadline (IA32_TSC_DEADLINE re-armed in
# the handler). For each mode it reports the ticks seen and the kvmclock nanoseconds they took;
# the host checks them against the period.
.include "rt.S"

.equ TICKS_WANTED, 20
.equ PERIOD_NS, 2000000                 # 2 ms; the APIC bus runs at 1 GHz, divide by 1
.equ TIMER_VECTOR, 0x50
.equ STATE, PROBE_DATA_ADDR             # per vCPU, 64 bytes: +0 ticks, +8 mode
.equ MODE_ONESHOT, 0
.equ MODE_PERIODIC, 1
.equ MODE_DEADLINE, 2

cpl0_init:
    RT_SET_HANDLER TIMER_VECTOR, on_tick
    movabs rax, LAPIC_ADDR
    mov dword ptr [rax + 0xf0], 0x1ff   # SVR: enable
    mov dword ptr [rax + 0x3e0], 0xb    # divide by 1
    ret

on_tick:                                # rdx = vCPU index
    mov r8, rdx
    shl r8, 6
    add r8, STATE
    # A periodic timer keeps ticking until `measure` stops it, and on a busy host a tick can
    # land between the loop seeing the last wanted one and the count being read: count only
    # the wanted ticks (a timer running fast still fails the host's check that they took at
    # least TICKS_WANTED periods).
    cmp qword ptr [r8], TICKS_WANTED
    jae 8f
    inc qword ptr [r8]
    cmp qword ptr [r8], TICKS_WANTED
    jae 8f
    mov rax, [r8 + 8]
    cmp rax, MODE_ONESHOT
    je 1f
    cmp rax, MODE_DEADLINE
    je 2f
    jmp 8f
1:  movabs rax, LAPIC_ADDR
    mov dword ptr [rax + 0x380], PERIOD_NS
    jmp 8f
2:  call deadline_from_now
    mov rdx, rax
    shr rdx, 32
    mov ecx, 0x6e0
    wrmsr
8:  movabs rax, LAPIC_ADDR
    mov dword ptr [rax + 0xb0], 0       # EOI
    ret

deadline_from_now:                      # rax = TSC now + one period; clobbers rcx, rdx
    mov rax, [rip + rt_tsc_khz]
    imul rax, rax, PERIOD_NS / 1000000
    mov rcx, rax
    call rt_rdtsc
    add rax, rcx
    ret

# rdi = mode: runs one measurement, leaves ticks in r13 and elapsed ns in r14.
measure:
    push rbx
    mov rbx, rdi
    mov r12, r15
    shl r12, 6
    add r12, STATE
    mov qword ptr [r12], 0
    mov [r12 + 8], rbx
    movabs rax, LAPIC_ADDR
    mov ecx, ebx
    shl ecx, 17
    or ecx, TIMER_VECTOR
    mov [rax + 0x320], ecx              # LVT timer: mode, vector, unmasked
    mov rdi, r15
    call rt_clock_ns
    mov r14, rax
    cmp rbx, MODE_DEADLINE
    je 1f
    movabs rax, LAPIC_ADDR
    mov dword ptr [rax + 0x380], PERIOD_NS
    jmp 2f
1:  call deadline_from_now
    mov rsi, rax
    mov edi, 0x6e0
    call rt_wrmsr
2:  cmp qword ptr [r12], TICKS_WANTED
    jae 3f
    pause
    jmp 2b
3:  mov rdi, r15
    call rt_clock_ns
    sub rax, r14
    mov r14, rax
    mov r13, [r12]
    movabs rax, LAPIC_ADDR
    mov dword ptr [rax + 0x380], 0      # stop
    mov dword ptr [rax + 0x320], 0x10000 | TIMER_VECTOR   # masked
    pop rbx
    ret

user_main:
    mov edi, 0x52455054                 # "TPER": the period, ns
    mov rsi, PERIOD_NS
    call rt_report
    mov rdi, MODE_ONESHOT
    call measure
    mov edi, 0x4e534f54                 # "TOSN"
    mov rsi, r13
    call rt_report
    mov edi, 0x44534f54                 # "TOSD"
    mov rsi, r14
    call rt_report
    mov rdi, MODE_PERIODIC
    call measure
    mov edi, 0x4e455054                 # "TPEN"
    mov rsi, r13
    call rt_report
    mov edi, 0x44455054                 # "TPED"
    mov rsi, r14
    call rt_report
    mov rdi, MODE_DEADLINE
    call measure
    mov edi, 0x4e4c4454                 # "TDLN"
    mov rsi, r13
    call rt_report
    mov edi, 0x444c4454                 # "TDLD"
    mov rsi, r14
    call rt_report
    mov edi, 0
    call rt_exit
