# bench-exits: timed loops of the cheapest exits, for `spanvm bench exits`. At CPL0 (cpl0_init):
# port I/O, MMIO and MSR reads; then at CPL3: port I/O and MMIO (rdmsr is privileged at CPL3).
# Each result is the mean TSC ticks per exit round trip, measured by vCPU 0 (others exit).
.include "rt.S"

.equ CPL0_ROUNDS, 20000
.equ CPL3_ROUNDS, 20000

# \body runs \rounds times between two TSC reads; the mean goes out under \key. Uses r12-r14.
.macro TIMED key, rounds, body
    call rt_rdtsc
    mov r13, rax
    mov r12, \rounds
1:  \body
    dec r12
    jnz 1b
    call rt_rdtsc
    sub rax, r13
    xor edx, edx
    mov rcx, \rounds
    div rcx
    mov rsi, rax
    mov edi, \key
    call rt_report
.endm

.macro PORT_EXIT
    mov dx, PROBE_PORT_NOP
    out dx, eax
.endm
.macro MMIO_EXIT
    mov dword ptr [r14], eax
.endm
.macro MSR_EXIT
    mov ecx, 0x6e0
    rdmsr
.endm

cpl0_init:
    test rdi, rdi
    jnz 9f
    push r12
    push r13
    push r14
    mov r14, PROBE_MMIO_NOP
    TIMED 0x4f493050, CPL0_ROUNDS, PORT_EXIT      # "P0IO"
    TIMED 0x4d4d3050, CPL0_ROUNDS, MMIO_EXIT      # "P0MM"
    TIMED 0x534d3050, CPL0_ROUNDS, MSR_EXIT       # "P0MS"
    pop r14
    pop r13
    pop r12
9:  ret

user_main:
    test r15, r15
    jnz 9f
    mov r14, PROBE_MMIO_NOP
    TIMED 0x4f493350, CPL3_ROUNDS, PORT_EXIT      # "P3IO"
    TIMED 0x4d4d3350, CPL3_ROUNDS, MMIO_EXIT      # "P3MM"
9:  mov edi, 0
    call rt_exit
