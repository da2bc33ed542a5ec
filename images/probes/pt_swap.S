# pt-swap: another node rewrites a page-table entry that this node's CPL3 code uses, then IPIs
# it; the IPI handler flushes the translation (probe argument 0: `invlpg`, 1: CR3 reload), and
# the CPL3 code must then read through the new entry. This is the case HOST.md warns about on
# kvm_pvm (KVM shadows guest page tables, and a page-table page replaced by the DSM can leave a
# stale shadow translation behind).
#
# vCPU 0 builds a window at WINDOW (PML4 slot 1) whose one leaf entry points at FRAME_A or
# FRAME_B, each holding its own marker. Per round vCPU 0 reads the window at CPL3 (so KVM
# shadows the entry), vCPU 1 points the entry at the other frame (a CPL3 write through the
# identity map) and sends the IPI, vCPU 0's handler flushes, and vCPU 0 reads again. Reports on
# vCPU 0: PTRN rounds, PTST reads that returned the old frame (exit 1 if any); on vCPU 1: PTWR
# entries rewritten. Needs >= 2 vCPUs; the others only take part in the start barrier.
.include "rt.S"

.equ ROUNDS, 200
.equ FLUSH_VECTOR, 0x41
.equ BARRIER, PROBE_DATA_ADDR
.equ READY, PROBE_DATA_ADDR + 0x1000    # last round whose first read vCPU 0 has done
.equ DONE, PROBE_DATA_ADDR + 0x2000     # flush IPIs vCPU 0's handler has completed
.equ W_PDPT, PROBE_DATA_ADDR + 0x10000
.equ W_PD, PROBE_DATA_ADDR + 0x11000
.equ W_PT, PROBE_DATA_ADDR + 0x12000
.equ FRAME_A, PROBE_DATA_ADDR + 0x13000
.equ FRAME_B, PROBE_DATA_ADDR + 0x14000
.equ WINDOW, 0x8000000000
.equ TABLE_FLAGS, 0x27                  # present, writable, user, accessed
.equ LEAF_FLAGS, 0x67                   # and dirty
.equ MARK_A, 0x415f50415753545f         # "_TSWAP_A"
.equ MARK_B, 0x425f50415753545f         # "_TSWAP_B"

cpl0_init:
    RT_SET_HANDLER FLUSH_VECTOR, on_flush
    movabs rax, LAPIC_ADDR
    mov dword ptr [rax + 0xf0], 0x1ff   # SVR: software enable, spurious vector 0xff
    test rdi, rdi
    jnz 1f
    mov rax, W_PDPT | TABLE_FLAGS
    mov [PML4_ADDR + 8], rax
    mov rax, W_PD | TABLE_FLAGS
    mov [W_PDPT], rax
    mov rax, W_PT | TABLE_FLAGS
    mov [W_PD], rax
    mov rax, FRAME_A | LEAF_FLAGS
    mov [W_PT], rax
    movabs rax, MARK_A
    mov [FRAME_A], rax
    movabs rax, MARK_B
    mov [FRAME_B], rax
1:  ret

on_flush:
    cmp qword ptr [rip + rt_probe_arg], 1
    je 1f
    movabs rax, WINDOW
    invlpg [rax]
    jmp 2f
1:  mov rax, cr3
    mov cr3, rax
2:  inc qword ptr [DONE]
    movabs rax, LAPIC_ADDR
    mov dword ptr [rax + 0xb0], 0       # EOI
    ret

# rdi = round -> rax = the marker the window shows in that round (A in odd rounds)
marker_of:
    movabs rax, MARK_A
    test rdi, 1
    jnz 1f
    movabs rax, MARK_B
1:  ret

user_main:
    cmp qword ptr [rip + rt_vcpu_count], 2
    jb 9f
    # The window and every APIC are ready before anyone reads or sends.
    mov rdi, BARRIER
    mov rsi, 1
    call rt_barrier
    cmp r15, 1
    je writer
    ja 8f

    mov rbx, 1                          # round
    xor r12, r12                        # stale reads
    movabs r13, WINDOW
1:  mov rdi, rbx
    call marker_of
    cmp [r13], rax
    je 2f
    inc r12
2:  cmp rbx, ROUNDS
    ja 4f
    mov [READY], rbx
3:  cmp [DONE], rbx
    jae 5f
    pause
    jmp 3b
5:  inc rbx
    jmp 1b
4:  mov edi, 0x4e525450                 # "PTRN"
    lea rsi, [rbx - 1]
    call rt_report
    mov edi, 0x54535450                 # "PTST"
    mov rsi, r12
    call rt_report
    xor edi, edi
    test r12, r12
    setnz dil
    call rt_exit

writer:
    mov rbx, 1
1:  cmp [READY], rbx
    jae 2f
    pause
    jmp 1b
2:  mov rax, FRAME_B | LEAF_FLAGS       # odd rounds showed A: point at B, even ones at A
    test rbx, 1
    jnz 4f
    mov rax, FRAME_A | LEAF_FLAGS
4:  mov [W_PT], rax
    movabs rax, LAPIC_ADDR
    mov dword ptr [rax + 0x310], 0      # ICR high: APIC ID 0
    mov dword ptr [rax + 0x300], FLUSH_VECTOR | (1 << 14)   # fixed, physical, assert
    inc rbx
    cmp rbx, ROUNDS
    jbe 1b
    mov edi, 0x52575450                 # "PTWR"
    mov rsi, ROUNDS
    call rt_report
8:  xor edi, edi
    call rt_exit
9:  mov edi, 1
    call rt_exit
