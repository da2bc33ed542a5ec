# multicast: IPIs from every vCPU to sets of vCPUs, in every addressing mode, counted exactly.
# Needs 2..16 vCPUs; APIC ID = vCPU index.
#
# Every vCPU counts, in its own page, the IPIs it received per (phase, sender): sender s sends
# with vector 0x40 + s, so IPIs of different senders never coalesce, and s sends its next IPI
# only once every receipt it expects was counted (it reads the receivers' pages), or after 2 s
# (then it counts one LOST). Phases are separated by two barriers: after the first, every vCPU
# switches its counters to the new phase and sets up its addressing; after the second, it
# sends. Phases (report key = name + sender digit, e.g. FLT0 = IPIs from vCPU 0 in FLT):
#   RAC  late-enable race: vCPU 1 starts software-disabled; RACE_ROUNDS times it enables its
#        APIC, sets LDR (flat, bit 1), then sets a flag in memory; vCPU 0 spins on the flag and
#        at once sends a flat logical fixed IPI to 0x02. vCPU 1 waits for it (10 s), then
#        disables again (LDR 0, SVR 0xff). A receipt that did not come is counted in RMIS, one
#        that came after more than 500 ms in RLAT.
#   PHY  xAPIC physical, to every other vCPU, K each.
#   FLT  xAPIC flat logical (LDR = 1 << index): to all others at once, K; to the next vCPU
#        ((s+1) mod n), K.
#   CLU  xAPIC cluster logical (DFR 0x0fffffff, cluster index/2, bit index%2): to each cluster's
#        members other than the sender, K; to the next vCPU, K.
#   ALI  shorthand all-including-self, K.     ALX  shorthand all-excluding-self, K.
#   SLF  shorthand self, K.
#   LOW  lowest priority, flat logical to all others, K: exactly one receipt per IPI.
#   X2C  x2APIC (switched through IA32_APIC_BASE) cluster logical, LDR derived: to all others,
#        K; to the next vCPU, K.
#   X2P  x2APIC physical to every other vCPU, K; x2APIC broadcast 0xffffffff, K.
# Also reports LOST (receipts that never came within 2 s), RMIS (race rounds missed) and RLAT
# (race rounds whose IPI came late).
.include "rt.S"

.equ K, 16
.equ RACE_ROUNDS, 200
.equ BASE_VECTOR, 0x40
.equ MAX_VCPUS, 16
.equ BARRIER, PROBE_DATA_ADDR + 0x8000
.equ RACE_FLAG, PROBE_DATA_ADDR + 0x9000
.equ PAGES, PROBE_DATA_ADDR + 0x10000  # one page per vCPU, written only by it
.equ CNT, 0                             # u64 [16 phases][16 senders]
.equ PHASE, 0x800                       # the phase the counters go to
.equ X2MODE, 0x808                      # 1 once in x2APIC mode
.equ EXPECT, 0x810                      # receipts of this phase's own IPIs expected so far
.equ LOST, 0x818
.equ RMIS, 0x820
.equ RLAT, 0x828
.equ TIMEOUT_NS, 2000000000
.equ RACE_TIMEOUT_NS, 10000000000     # never arrived: RMIS
.equ RACE_LATE_NS, 500000000          # arrived, but after this: RLAT

.equ ICR_LOWPRI, 0x100
.equ ICR_LOGICAL, 0x800
.equ ICR_ASSERT, 0x4000
.equ ICR_SELF, 0x40000
.equ ICR_ALLI, 0x80000
.equ ICR_ALLX, 0xC0000

.equ PH_RAC, 0
.equ PH_PHY, 1
.equ PH_FLT, 2
.equ PH_CLU, 3
.equ PH_ALI, 4
.equ PH_ALX, 5
.equ PH_SLF, 6
.equ PH_LOW, 7
.equ PH_X2C, 8
.equ PH_X2P, 9
.equ PHASES, 10

cpl0_init:
    .set mc_v, BASE_VECTOR
    .rept MAX_VCPUS
    RT_SET_HANDLER %mc_v, on_ipi
    .set mc_v, mc_v + 1
    .endr
    # vCPU 1 stays software-disabled for the race; everyone else is enabled from the start.
    cmp rdi, 1
    je 1f
    movabs rax, LAPIC_ADDR
    mov dword ptr [rax + 0xf0], 0x1ff
1:  ret

on_ipi:                                 # rdi = vector, rdx = vCPU index
    mov rax, rdx
    shl rax, 12
    add rax, PAGES
    mov rcx, [rax + PHASE]
    shl rcx, 4
    sub rdi, BASE_VECTOR
    add rcx, rdi
    inc qword ptr [rax + rcx*8]
    cmp qword ptr [rax + X2MODE], 0
    jne 1f
    movabs rcx, LAPIC_ADDR
    mov dword ptr [rcx + 0xb0], 0       # EOI
    ret
1:  mov ecx, 0x80b                      # x2APIC EOI
    xor eax, eax
    xor edx, edx
    wrmsr
    ret

barrier:                                # r13 = generation
    inc r13
    mov rdi, BARRIER
    mov rsi, r13
    jmp rt_barrier

# Ends the phase before (every vCPU got every receipt it waited for) and starts phase rdi.
next_phase:
    mov [r12 + PHASE], rdi
    mov qword ptr [r12 + EXPECT], 0
    ret

# rax = receipts of this phase's IPIs from me, summed over every vCPU; clobbers rcx, rdx
sum_receipts:
    mov rcx, [r12 + PHASE]
    shl rcx, 4
    add rcx, r15
    lea rdx, [rcx*8 + PAGES]
    xor eax, eax
    mov rcx, [rip + rt_vcpu_count]
1:  add rax, [rdx]
    add rdx, 0x1000
    dec rcx
    jnz 1b
    ret

# Waits until sum_receipts reaches EXPECT, at most TIMEOUT_NS (then LOST += 1).
wait_receipts:
    push rbx
    mov rdi, r15
    call rt_clock_ns
    mov rbx, rax
1:  call sum_receipts
    cmp rax, [r12 + EXPECT]
    jae 9f
    pause
    mov rdi, r15
    call rt_clock_ns
    sub rax, rbx
    cmp rax, TIMEOUT_NS
    jb 1b
    inc qword ptr [r12 + LOST]
    call sum_receipts
    mov [r12 + EXPECT], rax
9:  pop rbx
    ret

# edi = ICR low bits (without the vector), esi = destination, edx = receipts it must cause.
# Sends one IPI with vector BASE_VECTOR + me, then waits for the receipts.
send_ipi:
    add [r12 + EXPECT], rdx
    lea eax, [r15 + BASE_VECTOR]
    or edi, eax
    cmp qword ptr [r12 + X2MODE], 0
    jne 1f
    movabs rax, LAPIC_ADDR
    shl esi, 24
    mov [rax + 0x310], esi
    mov [rax + 0x300], edi
    jmp wait_receipts
1:  mov esi, esi
    shl rsi, 32
    mov eax, edi
    or rsi, rax
    mov edi, 0x830
    call rt_wrmsr
    jmp wait_receipts

# The same as send_ipi, K times.
send_k:
    push rbx
    push rbp
    push r14
    push r13
    mov ebx, edi
    mov ebp, esi
    mov r14d, edx
    mov r13, K
1:  mov edi, ebx
    mov esi, ebp
    mov edx, r14d
    call send_ipi
    dec r13
    jnz 1b
    pop r13
    pop r14
    pop rbp
    pop rbx
    ret

# Sends K physical IPIs to every vCPU but me (edi = extra ICR bits).
send_k_each_other:
    push rbx
    push rbp
    mov ebp, edi
    xor ebx, ebx
1:  cmp rbx, r15
    je 2f
    mov edi, ebp
    mov esi, ebx
    mov edx, 1
    call send_k
2:  inc rbx
    cmp rbx, [rip + rt_vcpu_count]
    jb 1b
    pop rbp
    pop rbx
    ret

all_mask:                               # rax = (1 << n) - 1; clobbers rcx
    mov rcx, [rip + rt_vcpu_count]
    mov eax, 1
    shl eax, cl
    dec eax
    ret

others_mask:                            # rax = all but me
    call all_mask
    btr eax, r15d
    ret

next_vcpu:                              # rax = (me + 1) mod n
    lea rax, [r15 + 1]
    cmp rax, [rip + rt_vcpu_count]
    jb 1f
    xor eax, eax
1:  ret

xapic_set_ldr_dfr:                      # edi = LDR, esi = DFR
    movabs rax, LAPIC_ADDR
    mov [rax + 0xe0], esi
    mov [rax + 0xd0], edi
    ret

# rax = the number of set bits of edi (no popcnt: the emulator may lack it); clobbers rcx
popcount:
    xor eax, eax
1:  test edi, edi
    jz 2f
    mov ecx, edi
    and ecx, 1
    add eax, ecx
    shr edi, 1
    jmp 1b
2:  ret

user_main:
    mov rax, [rip + rt_vcpu_count]
    cmp rax, 2
    jb too_few
    cmp rax, MAX_VCPUS
    ja too_few
    mov r12, r15
    shl r12, 12
    add r12, PAGES
    xor r13, r13

    # ---- RAC ------------------------------------------------------------------------------
    call barrier
    cmp r15, 1
    je race_ap
    test r15, r15
    jnz race_done
    xor ebx, ebx                        # vCPU 0: rounds sent
1:  lea rcx, [rbx + 1]
2:  cmp [RACE_FLAG], rcx
    jae 3f
    pause
    jmp 2b
3:  movabs rax, LAPIC_ADDR
    mov dword ptr [rax + 0x310], 0x02000000
    mov dword ptr [rax + 0x300], BASE_VECTOR | ICR_LOGICAL | ICR_ASSERT
    inc rbx
    cmp rbx, RACE_ROUNDS
    jb 1b
    jmp race_done
race_ap:
    xor ebx, ebx                        # vCPU 1: rounds armed
1:  mov r14, [r12 + CNT]                # receipts from vCPU 0 so far
    movabs rax, LAPIC_ADDR
    mov dword ptr [rax + 0xf0], 0x1ff   # software enable
    mov dword ptr [rax + 0xd0], 0x02000000
    lea rcx, [rbx + 1]
    mov [RACE_FLAG], rcx                # armed: vCPU 0 sends at once
    mov rdi, r15
    call rt_clock_ns
    mov rbp, rax
2:  cmp [r12 + CNT], r14
    ja 3f
    pause
    mov rdi, r15
    call rt_clock_ns
    sub rax, rbp
    movabs rcx, RACE_TIMEOUT_NS
    cmp rax, rcx
    jb 2b
    inc qword ptr [r12 + RMIS]
    jmp 4f
3:  mov rdi, r15                        # arrived: late?
    call rt_clock_ns
    sub rax, rbp
    cmp rax, RACE_LATE_NS
    jb 4f
    inc qword ptr [r12 + RLAT]
4:  movabs rax, LAPIC_ADDR
    mov dword ptr [rax + 0xd0], 0
    mov dword ptr [rax + 0xf0], 0xff    # software disable
    inc rbx
    cmp rbx, RACE_ROUNDS
    jb 1b
    mov dword ptr [rax + 0xf0], 0x1ff
race_done:

    # ---- PHY ------------------------------------------------------------------------------
    call barrier
    mov rdi, PH_PHY
    call next_phase
    call barrier
    mov edi, ICR_ASSERT
    call send_k_each_other

    # ---- FLT ------------------------------------------------------------------------------
    call barrier
    mov rdi, PH_FLT
    call next_phase
    mov edi, 1
    mov ecx, r15d
    shl edi, cl
    shl edi, 24
    mov esi, 0xffffffff
    call xapic_set_ldr_dfr
    call barrier
    call flat_sends

    # ---- CLU ------------------------------------------------------------------------------
    call barrier
    mov rdi, PH_CLU
    call next_phase
    mov rax, r15                        # LDR: cluster index/2 in bits 31:28, bit index%2
    shr eax, 1
    shl eax, 4
    mov ecx, r15d
    and ecx, 1
    mov edi, 1
    shl edi, cl
    or edi, eax
    shl edi, 24
    mov esi, 0x0fffffff
    call xapic_set_ldr_dfr
    call barrier
    xor ebx, ebx                        # cluster
1:  mov eax, ebx
    shl eax, 1                          # first member
    mov r14d, 3                         # members' bits
    lea ecx, [eax + 1]
    cmp rcx, [rip + rt_vcpu_count]
    jb 2f
    and r14d, 1                         # odd count: the last cluster has one member
2:  mov rcx, r15
    shr ecx, 1
    cmp ecx, ebx
    jne 3f
    mov ecx, r15d
    and ecx, 1
    btr r14d, ecx                       # not me
3:  test r14d, r14d
    jz 4f
    mov edi, r14d
    call popcount
    mov edx, eax
    mov esi, ebx
    shl esi, 4
    or esi, r14d
    mov edi, ICR_LOGICAL | ICR_ASSERT
    call send_k
4:  inc ebx
    lea eax, [ebx*2]
    cmp rax, [rip + rt_vcpu_count]
    jb 1b
    call next_vcpu                      # and K to the next vCPU alone
    mov ecx, eax
    and ecx, 1
    mov esi, 1
    shl esi, cl
    shr eax, 1
    shl eax, 4
    or esi, eax
    mov edi, ICR_LOGICAL | ICR_ASSERT
    mov edx, 1
    call send_k

    # ---- ALI, ALX, SLF ----------------------------------------------------------------------
    call barrier
    mov rdi, PH_ALI
    call next_phase
    call barrier
    mov edi, ICR_ALLI | ICR_ASSERT
    xor esi, esi
    mov rdx, [rip + rt_vcpu_count]
    call send_k

    call barrier
    mov rdi, PH_ALX
    call next_phase
    call barrier
    mov edi, ICR_ALLX | ICR_ASSERT
    xor esi, esi
    mov rdx, [rip + rt_vcpu_count]
    dec rdx
    call send_k

    call barrier
    mov rdi, PH_SLF
    call next_phase
    call barrier
    mov edi, ICR_SELF | ICR_ASSERT
    xor esi, esi
    mov edx, 1
    call send_k

    # ---- LOW --------------------------------------------------------------------------------
    call barrier
    mov rdi, PH_LOW
    call next_phase
    mov edi, 1
    mov ecx, r15d
    shl edi, cl
    shl edi, 24
    mov esi, 0xffffffff
    call xapic_set_ldr_dfr
    call barrier
    call others_mask
    mov esi, eax
    mov edi, ICR_LOWPRI | ICR_LOGICAL | ICR_ASSERT
    mov edx, 1
    call send_k

    # ---- X2C --------------------------------------------------------------------------------
    call barrier
    mov rdi, PH_X2C
    call next_phase
    mov edi, 0x1b                       # IA32_APIC_BASE: EXTD
    call rt_rdmsr
    or rax, 1 << 10
    mov rsi, rax
    mov edi, 0x1b
    call rt_wrmsr
    mov qword ptr [r12 + X2MODE], 1
    mov edi, 0x80f                      # SVR, enabled
    mov esi, 0x1ff
    call rt_wrmsr
    call barrier
    call flat_sends                     # x2APIC cluster 0: bit = ID, the same masks as flat

    # ---- X2P --------------------------------------------------------------------------------
    call barrier
    mov rdi, PH_X2P
    call next_phase
    call barrier
    mov edi, ICR_ASSERT
    call send_k_each_other
    mov edi, ICR_ASSERT
    mov esi, 0xffffffff
    mov rdx, [rip + rt_vcpu_count]
    call send_k

    # ---- report -----------------------------------------------------------------------------
    call barrier
    xor ebx, ebx                        # phase
1:  xor r14d, r14d                      # sender
2:  lea rax, [rip + phase_names]
    mov edi, [rax + rbx*4]
    lea eax, [r14 + '0']
    shl eax, 24
    or edi, eax
    mov rax, rbx
    shl rax, 4
    add rax, r14
    mov rsi, [r12 + rax*8]
    call rt_report
    inc r14
    cmp r14, [rip + rt_vcpu_count]
    jb 2b
    inc rbx
    cmp rbx, PHASES
    jb 1b
    mov edi, 0x54534f4c                 # "LOST"
    mov rsi, [r12 + LOST]
    call rt_report
    mov edi, 0x53494d52                 # "RMIS"
    mov rsi, [r12 + RMIS]
    call rt_report
    mov edi, 0x54414c52                 # "RLAT"
    mov rsi, [r12 + RLAT]
    call rt_report
    mov edi, 0
    call rt_exit

# Logical IPIs with one bit per vCPU (flat xAPIC, or x2APIC cluster 0): all others, then the
# next vCPU alone, K each.
flat_sends:
    call others_mask
    mov esi, eax
    mov rdx, [rip + rt_vcpu_count]
    dec rdx
    mov edi, ICR_LOGICAL | ICR_ASSERT
    call send_k
    call next_vcpu
    mov ecx, eax
    mov esi, 1
    shl esi, cl
    mov edi, ICR_LOGICAL | ICR_ASSERT
    mov edx, 1
    jmp send_k

too_few:
    mov edi, 2
    call rt_exit

.balign 4
phase_names:
    .ascii "RAC\0PHY\0FLT\0CLU\0ALI\0ALX\0SLF\0LOW\0X2C\0X2P\0"
