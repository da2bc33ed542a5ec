# ipi-x2apic: the same ping-pong with the APIC in x2APIC mode: x2APIC is enabled through
# IA32_APIC_BASE, the ICR is MSR 0x830 (written through the runtime's #UD call from CPL3), EOI is
# MSR 0x80b in the handler.
.include "rt.S"

.equ ROUNDS, 1000
.equ PING_VECTOR, 0x41
.equ RECEIVED, PROBE_DATA_ADDR

cpl0_init:
    RT_SET_HANDLER PING_VECTOR, on_ping
    mov ecx, 0x1b                       # IA32_APIC_BASE: set EN and EXTD
    rdmsr
    or eax, (1 << 11) | (1 << 10)
    wrmsr
    mov ecx, 0x80f                      # SVR
    mov eax, 0x1ff
    xor edx, edx
    wrmsr
    ret

on_ping:
    shl rdx, 6
    add rdx, RECEIVED
    inc qword ptr [rdx]
    mov ecx, 0x80b                      # EOI
    xor eax, eax
    xor edx, edx
    wrmsr
    ret

send_ping:                              # rdi = destination x2APIC ID
    mov rsi, rdi
    shl rsi, 32
    or rsi, PING_VECTOR | (1 << 14)
    mov edi, 0x830                      # ICR
    call rt_wrmsr
    ret

.include "ipi_common.inc"
