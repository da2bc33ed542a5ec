# hello: vCPU 0 greets on the serial port; every vCPU reports its index and exits. The smallest
# probe, and the one `spanvm run` shows first.
.include "rt.S"

cpl0_init:
    ret

user_main:
    test r15, r15
    jnz 1f
    lea rsi, [rip + greeting]
    call rt_puts
    mov rdi, [rip + rt_vcpu_count]
    call rt_putu
    lea rsi, [rip + greeting_end]
    call rt_puts
    # The others report only once the greeting is out, so their report lines (on the same
    # stdout) never cut into it.
1:  mov rdi, PROBE_DATA_ADDR
    mov rsi, 1
    call rt_barrier
    # The last vCPU (on another node in a cluster) greets too, after vCPU 0: its line must come
    # out of the master's UART, the only one there is.
    mov rax, [rip + rt_vcpu_count]
    dec rax
    cmp r15, rax
    jne 2f
    test r15, r15
    jz 2f
    lea rsi, [rip + last_greeting]
    call rt_puts
    mov rdi, r15
    call rt_putu
    lea rsi, [rip + greeting_end]
    call rt_puts
    # Reports (on the same stdout as the console on the master) wait for that line too.
2:  mov rdi, PROBE_DATA_ADDR
    mov rsi, 2
    call rt_barrier
    # Every vCPU reads COM1's line status: the master's UART answers (0x60, transmitter idle),
    # wherever the vCPU runs.
    mov dx, 0x3fd
    in al, dx
    movzx esi, al
    mov edi, 0x52534c55          # "ULSR"
    call rt_report
    mov edi, 0x4f4c4548          # "HELO"
    mov rsi, r15
    call rt_report
    mov edi, 0
    call rt_exit

greeting:     .asciz "hello from a spanvm probe guest, running at CPL3 on vCPU 0 of "
greeting_end: .asciz "\n"
last_greeting: .asciz "hello again, from the last vCPU: "
