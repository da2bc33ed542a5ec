# ioapic: vCPU 1 (on node 1 in a cluster: every IOAPIC access and every line change is
# forwarded to the master) programs IOAPIC redirection entries and drives the pins through the
# master's IRQ line driver (port IRQ_DRIVER_PORT: `out` of pin | op << 8, op 0 low, 1 high,
# 2 pulse). Every vCPU counts, in its own page, the interrupts it took per vector, and EOIs
# them (a level vector's EOI goes back to the master's IOAPIC, forwarded from other nodes).
#   edge:   pin 10, vector 0x60, edge, to each vCPU in turn (physical): EDGE_N pulses each,
#           the next only once the last was counted (or after 2 s: LOST += 1). Key EDGE.
#   level:  pin 11, vector 0x61, level, to each vCPU in turn: the line is raised and held; the
#           IOAPIC must deliver it again once per EOI (Remote IRR). The handler lowers the line
#           when it has counted LEVEL_N, before its EOI, so exactly LEVEL_N arrive. Key LEVL;
#           vCPU 1 reports RIRR, the Remote IRR bit left over at the end (must be 0).
#   masked: pin 12, vector 0x62, edge, masked, to vCPU 1: 5 pulses, 50 ms, count (MSK0, must be
#           0); unmask: the held edge arrives once (MSK1). Pin 13, vector 0x63, level, masked:
#           raised, 50 ms, count (MLV0, 0); unmask: delivered once, the handler lowers the line
#           (MLV1, 1).
# vCPU 1 also reports the IOAPIC version register read from its node (IOVR) and LOST. Needs
# >= 2 vCPUs.
.include "rt.S"

.equ EDGE_N, 100
.equ LEVEL_N, 50
.equ BARRIER, PROBE_DATA_ADDR + 0x8000
.equ DONE, PROBE_DATA_ADDR + 0x9000
.equ PAGES, PROBE_DATA_ADDR + 0x10000  # per vCPU: u64 count per vector 0x60..0x63
.equ LOST, 0x100                        # in vCPU 1's page
.equ TIMEOUT_NS, 2000000000
.equ SETTLE_NS, 50000000
.equ VEC, 0x60
.equ PIN_EDGE, 10
.equ PIN_LEVEL, 11
.equ PIN_MEDGE, 12
.equ PIN_MLEVEL, 13
.equ RTE_LEVEL, 1 << 15
.equ RTE_MASKED, 1 << 16

cpl0_init:
    RT_SET_HANDLER VEC, on_irq
    RT_SET_HANDLER 0x61, on_irq
    RT_SET_HANDLER 0x62, on_irq
    RT_SET_HANDLER 0x63, on_irq
    movabs rax, LAPIC_ADDR
    mov dword ptr [rax + 0xf0], 0x1ff
    ret

on_irq:                                 # rdi = vector, rdx = vCPU index
    shl rdx, 12
    add rdx, PAGES
    sub rdi, VEC
    inc qword ptr [rdx + rdi*8]
    cmp rdi, 1
    jne 1f
    cmp qword ptr [rdx + 8], LEVEL_N
    jb 9f
    mov eax, PIN_LEVEL                  # enough: lower the held line before the EOI
    jmp 2f
1:  cmp rdi, 3
    jne 9f
    mov eax, PIN_MLEVEL
2:  mov dx, IRQ_DRIVER_PORT
    out dx, eax
9:  movabs rax, LAPIC_ADDR
    mov dword ptr [rax + 0xb0], 0       # EOI
    ret

ioapic_write:                           # edi = register, esi = value
    movabs rax, IOAPIC_ADDR
    mov [rax], edi
    mov [rax + 0x10], esi
    ret

ioapic_read:                            # edi = register -> eax
    movabs rcx, IOAPIC_ADDR
    mov [rcx], edi
    mov eax, [rcx + 0x10]
    ret

# edi = pin, esi = low half, edx = destination APIC ID: writes the high half, then the low.
program_pin:
    push rbx
    push rbp
    lea ebx, [edi*2 + 0x10]
    mov ebp, esi
    lea edi, [ebx + 1]
    mov esi, edx
    shl esi, 24
    call ioapic_write
    mov edi, ebx
    mov esi, ebp
    call ioapic_write
    pop rbp
    pop rbx
    ret

line:                                   # edi = pin | op << 8
    mov eax, edi
    mov dx, IRQ_DRIVER_PORT
    out dx, eax
    ret

count_addr:                             # edi = vCPU, esi = vector index -> rax = its counter
    mov eax, edi
    shl rax, 12
    lea rax, [rax + rsi*8 + PAGES]
    ret

# rdi = counter address, rsi = value: waits until [rdi] >= rsi, at most TIMEOUT_NS (LOST += 1).
wait_count:
    push rbx
    push rbp
    push r13
    mov rbx, rdi
    mov rbp, rsi
    mov rdi, r15
    call rt_clock_ns
    mov r13, rax
1:  cmp [rbx], rbp
    jae 9f
    pause
    mov rdi, r15
    call rt_clock_ns
    sub rax, r13
    cmp rax, TIMEOUT_NS
    jb 1b
    inc qword ptr [r12 + LOST]
9:  pop r13
    pop rbp
    pop rbx
    ret

settle:                                 # waits SETTLE_NS
    push rbx
    mov rdi, r15
    call rt_clock_ns
    mov rbx, rax
1:  pause
    mov rdi, r15
    call rt_clock_ns
    sub rax, rbx
    cmp rax, SETTLE_NS
    jb 1b
    pop rbx
    ret

user_main:
    cmp qword ptr [rip + rt_vcpu_count], 2
    jb too_few
    mov r12, r15
    shl r12, 12
    add r12, PAGES
    mov rdi, BARRIER
    mov rsi, 1
    call rt_barrier
    cmp r15, 1
    je driver
1:  cmp qword ptr [DONE], 0
    jne report
    pause
    jmp 1b

driver:
    mov edi, 1                          # version
    call ioapic_read
    mov esi, eax
    mov edi, 0x52564f49                 # "IOVR"
    call rt_report

    # edge, to every vCPU
    xor ebx, ebx                        # target
1:  mov edi, PIN_EDGE
    mov esi, VEC
    mov edx, ebx
    call program_pin
    xor r14d, r14d                      # pulses
2:  inc r14
    mov edi, PIN_EDGE | 2 << 8
    call line
    mov edi, ebx
    xor esi, esi
    call count_addr
    mov rdi, rax
    mov rsi, r14
    call wait_count
    cmp r14, EDGE_N
    jb 2b
    mov edi, PIN_EDGE
    mov esi, VEC | RTE_MASKED
    mov edx, ebx
    call program_pin
    inc ebx
    cmp rbx, [rip + rt_vcpu_count]
    jb 1b

    # level, held, to every vCPU
    xor ebx, ebx
3:  mov edi, PIN_LEVEL
    mov esi, (VEC + 1) | RTE_LEVEL
    mov edx, ebx
    call program_pin
    mov edi, PIN_LEVEL | 1 << 8
    call line
    mov edi, ebx
    mov esi, 1
    call count_addr
    mov rdi, rax
    mov rsi, LEVEL_N
    call wait_count
    call settle
    mov edi, 0x10 + 2 * PIN_LEVEL       # Remote IRR, left over?
    call ioapic_read
    shr eax, 14
    and eax, 1
    add [r12 + 0x200], rax
    inc ebx
    cmp rbx, [rip + rt_vcpu_count]
    jb 3b
    mov edi, 0x52524952                 # "RIRR"
    mov rsi, [r12 + 0x200]
    call rt_report

    # masked edge
    mov edi, PIN_MEDGE
    mov esi, (VEC + 2) | RTE_MASKED
    mov edx, 1
    call program_pin
    mov ebx, 5
4:  mov edi, PIN_MEDGE | 2 << 8
    call line
    dec ebx
    jnz 4b
    call settle
    mov edi, 0x304b534d                 # "MSK0"
    mov rsi, [r12 + 16]
    call rt_report
    mov edi, PIN_MEDGE
    mov esi, VEC + 2
    mov edx, 1
    call program_pin
    lea rdi, [r12 + 16]
    mov esi, 1
    call wait_count
    call settle
    mov edi, 0x314b534d                 # "MSK1"
    mov rsi, [r12 + 16]
    call rt_report

    # masked level
    mov edi, PIN_MLEVEL
    mov esi, (VEC + 3) | RTE_LEVEL | RTE_MASKED
    mov edx, 1
    call program_pin
    mov edi, PIN_MLEVEL | 1 << 8
    call line
    call settle
    mov edi, 0x30564c4d                 # "MLV0"
    mov rsi, [r12 + 24]
    call rt_report
    mov edi, PIN_MLEVEL
    mov esi, (VEC + 3) | RTE_LEVEL
    mov edx, 1
    call program_pin
    lea rdi, [r12 + 24]
    mov esi, 1
    call wait_count
    call settle
    mov edi, 0x31564c4d                 # "MLV1"
    mov rsi, [r12 + 24]
    call rt_report

    mov edi, 0x54534f4c                 # "LOST"
    mov rsi, [r12 + LOST]
    call rt_report
    mov qword ptr [DONE], 1

report:
    mov edi, 0x45474445                 # "EDGE"
    mov rsi, [r12]
    call rt_report
    mov edi, 0x4c56454c                 # "LEVL"
    mov rsi, [r12 + 8]
    call rt_report
    mov edi, 0
    call rt_exit

too_few:
    mov edi, 2
    call rt_exit
