# ipi-xapic: IPI ping-pong between vCPUs 0 and 1 through the user-space local APIC in xAPIC
# mode (ICR writes are MMIO at 0xFEE00300, at CPL3). Each side counts the IPIs it received in
# its CPL0 handler; vCPU 0 reports the mean round trip in TSC ticks. Needs >= 2 vCPUs; others
# just exit.
.include "rt.S"

.equ ROUNDS, 2000
.equ PING_VECTOR, 0x40
.equ RECEIVED, PROBE_DATA_ADDR          # u64 per vCPU, 64 bytes apart

cpl0_init:
    RT_SET_HANDLER PING_VECTOR, on_ping
    movabs rax, LAPIC_ADDR
    mov dword ptr [rax + 0xf0], 0x1ff   # SVR: software enable, spurious vector 0xff
    ret

on_ping:                                # rdx = vCPU index
    shl rdx, 6
    add rdx, RECEIVED
    inc qword ptr [rdx]
    movabs rax, LAPIC_ADDR
    mov dword ptr [rax + 0xb0], 0       # EOI
    ret

send_ping:                              # rdi = destination APIC ID
    movabs rax, LAPIC_ADDR
    shl edi, 24
    mov [rax + 0x310], edi              # ICR high: destination
    mov dword ptr [rax + 0x300], PING_VECTOR | (1 << 14)   # fixed, physical, assert
    ret

.include "ipi_common.inc"
