# forward-in: the last vCPU reads COM1's line status register (a port of the master's UART, so
# on any other node every read is forwarded to the master and the vCPU waits for the answer)
# in a loop that never ends; after 1000 reads it reports INRD=1000 so that a test knows it is
# under way. Every other vCPU spins. Used to kill the master while a vCPU waits on it.
.include "rt.S"

cpl0_init:
    ret

user_main:
    mov rax, [rip + rt_vcpu_count]
    dec rax
    cmp r15, rax
    jne spin
    xor ebx, ebx
1:  mov dx, COM1_PORT + 5
    in al, dx
    inc rbx
    cmp rbx, 1000
    jne 1b
    mov edi, 0x44524e49                 # "INRD"
    mov rsi, rbx
    call rt_report
    jmp 1b
spin:
    pause
    jmp spin
