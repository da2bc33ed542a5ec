# bench-inject: the guest side of the raw injection round trip in `spanvm bench exits`: vCPU 0
# halts at CPL0 with interrupts on; the handler of vector 0x60 writes the no-op port, which is
# where the host stops its clock. It never reaches CPL3.
.include "rt.S"

.equ INJECT_VECTOR, 0x60

cpl0_init:
    RT_SET_HANDLER INJECT_VECTOR, on_inject
    sti
1:  hlt
    jmp 1b

on_inject:
    mov dx, PROBE_PORT_NOP
    out dx, al
    ret

user_main:
    mov edi, 1
    call rt_exit
