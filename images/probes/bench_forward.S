# bench-forward: timed loops of device accesses at CPL3, for `spanvm bench exits` on a 2-node
# cluster. vCPU 1 (on node 1, whose accesses are forwarded to the master and answered over TCP)
# reports the mean TSC ticks per round trip of a port read of COM1's scratch register (FWIO)
# and of an MMIO read nobody claims (FWMM, answered with all ones by the master). The others
# exit at once, so that no spinning vCPU competes for the host's cores.
.include "rt.S"

.equ ROUNDS, 2000

# \body runs ROUNDS times between two TSC reads; the mean goes out under \key. Uses r12, r13.
.macro TIMED key, body
    call rt_rdtsc
    mov r13, rax
    mov r12, ROUNDS
1:  \body
    dec r12
    jnz 1b
    call rt_rdtsc
    sub rax, r13
    xor edx, edx
    mov rcx, ROUNDS
    div rcx
    mov rsi, rax
    mov edi, \key
    call rt_report
.endm

.macro PORT_READ
    mov dx, 0x3ff
    in al, dx
.endm
.macro MMIO_READ
    mov eax, dword ptr [r14]
.endm

cpl0_init:
    ret

user_main:
    cmp r15, 1
    jne 9f
    mov r14, PROBE_MMIO_NOP
    TIMED 0x4f495746, PORT_READ                 # "FWIO"
    TIMED 0x4d4d5746, MMIO_READ                 # "FWMM"
9:  mov edi, 0
    call rt_exit
