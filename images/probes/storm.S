# storm: an all-to-all IPI storm. Every vCPU sends Q IPIs (Q = probe_arg, default 8334: 100 008
# IPIs on 4 vCPUs) to every other vCPU, all at once, and counts, per sender, the IPIs it
# received. Each (sender, receiver) pair has a mailbox page: the sender writes the IPI's
# sequence number there and sends vector 0x40 + sender (physical, fixed); the receiver's
# handler checks the number is the next one expected (else BADS += 1), counts it, writes it
# back as the acknowledgement and EOIs. A sender sends its next IPI to a receiver only once the
# last one was acknowledged (fixed IPIs of one vector would coalesce in IRR otherwise), going
# round-robin over the receivers. No progress for 20 s: STAL = 1 and the vCPU gives up.
# Every vCPU reports RCVs (IPIs from vCPU s), SENT, BADS and STAL. Needs 2..16 vCPUs.
.include "rt.S"

.equ BASE_VECTOR, 0x40
.equ MAX_VCPUS, 16
.equ BARRIER, PROBE_DATA_ADDR + 0x8000
.equ PAGES, PROBE_DATA_ADDR + 0x10000  # per vCPU: +0 count per sender, +0x80 sent per
                                        # receiver, +0x100 BADS, +0x108 SENT, +0x110 STAL
.equ MAILBOXES, PROBE_DATA_ADDR + 0x100000 # page per (sender * 16 + receiver): +0 seq, +8 ack
.equ STALL_NS, 20000000000

cpl0_init:
    .set st_v, BASE_VECTOR
    .rept MAX_VCPUS
    RT_SET_HANDLER %st_v, on_ipi
    .set st_v, st_v + 1
    .endr
    movabs rax, LAPIC_ADDR
    mov dword ptr [rax + 0xf0], 0x1ff
    ret

on_ipi:                                 # rdi = vector, rdx = vCPU index (the receiver)
    sub rdi, BASE_VECTOR                # sender
    mov rax, rdi
    shl rax, 4
    add rax, rdx
    shl rax, 12
    add rax, MAILBOXES                  # the pair's mailbox
    shl rdx, 12
    add rdx, PAGES                      # my page
    mov rcx, [rdx + rdi*8]
    inc rcx                             # the sequence number expected
    mov rsi, [rax]
    cmp rsi, rcx
    je 1f
    inc qword ptr [rdx + 0x100]
1:  mov [rdx + rdi*8], rcx
    mov [rax + 8], rsi                  # acknowledge
    movabs rax, LAPIC_ADDR
    mov dword ptr [rax + 0xb0], 0       # EOI
    ret

user_main:
    mov rax, [rip + rt_vcpu_count]
    cmp rax, 2
    jb too_few
    cmp rax, MAX_VCPUS
    ja too_few
    mov r12, r15
    shl r12, 12
    add r12, PAGES
    mov r13, [rip + rt_probe_arg]       # Q
    test r13, r13
    jnz 1f
    mov r13, 8334
1:  mov rdi, BARRIER
    mov rsi, 1
    call rt_barrier
    mov rdi, r15
    call rt_clock_ns
    mov rbp, rax                        # last progress

send_round:
    xor r14d, r14d                      # pairs not finished (sent and acknowledged)
    xor ebx, ebx                        # receiver
1:  cmp rbx, r15
    je 5f
    mov rax, r15                        # the pair's mailbox
    shl rax, 4
    add rax, rbx
    shl rax, 12
    add rax, MAILBOXES
    mov rcx, [r12 + 0x80 + rbx*8]       # sent to this receiver
    cmp [rax + 8], rcx
    jne 4f                              # last one not acknowledged yet
    cmp rcx, r13
    jae 5f                              # all sent and acknowledged
    inc rcx
    mov [r12 + 0x80 + rbx*8], rcx
    mov [rax], rcx
    movabs rax, LAPIC_ADDR
    mov ecx, ebx
    shl ecx, 24
    mov [rax + 0x310], ecx
    lea ecx, [r15 + BASE_VECTOR + 0x4000]   # fixed, physical, assert
    mov [rax + 0x300], ecx
    inc qword ptr [r12 + 0x108]
    mov rdi, r15
    call rt_clock_ns
    mov rbp, rax
4:  inc r14
5:  inc rbx
    cmp rbx, [rip + rt_vcpu_count]
    jb 1b
    test r14, r14
    jz done
    mov rdi, r15
    call rt_clock_ns
    sub rax, rbp
    movabs rcx, STALL_NS
    cmp rax, rcx
    jb send_round
    mov qword ptr [r12 + 0x110], 1

done:
    mov rdi, BARRIER
    mov rsi, 2
    call rt_barrier
    xor ebx, ebx
1:  lea edi, [ebx + '0']
    shl edi, 24
    or edi, 0x564352                    # "RCV" + sender digit
    mov rsi, [r12 + rbx*8]
    call rt_report
    inc rbx
    cmp rbx, [rip + rt_vcpu_count]
    jb 1b
    mov edi, 0x544e4553                 # "SENT"
    mov rsi, [r12 + 0x108]
    call rt_report
    mov edi, 0x53444142                 # "BADS"
    mov rsi, [r12 + 0x100]
    call rt_report
    mov edi, 0x4c415453                 # "STAL"
    mov rsi, [r12 + 0x110]
    call rt_report
    mov edi, 0
    call rt_exit

too_few:
    mov edi, 2
    call rt_exit
