# reset: the vCPU named by the probe argument pulses the reset line through the i8042
# controller (command 0xFE to port 0x64, at CPL3) after every vCPU has reported; the others
# wait. On a cluster the write from a vCPU on another node is forwarded to the master's i8042,
# and every node must then end with the reset exit code.
.include "rt.S"

cpl0_init:
    ret

user_main:
    mov rdi, PROBE_DATA_ADDR
    mov rsi, 1
    call rt_barrier
    cmp r15, [rip + rt_probe_arg]
    jne 2f
    mov edi, 0x54455352                 # "RSET": this vCPU pulses the reset line
    mov rsi, r15
    call rt_report
    mov al, 0xfe
    out 0x64, al
2:  pause
    jmp 2b
