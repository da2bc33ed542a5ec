# msgring: message passing through a ring buffer. vCPUs pair up (2k producer, 2k+1 consumer);
# the producer writes N messages (N = probe_arg, default 100000) of 7 words derived from the
# message number plus a checksum word into a 256-slot ring and publishes them by advancing
# `head`; the consumer waits for `head`, checks every word and the checksum, and advances `tail`
# so the producer can reuse the slot. Reports messages sent (MSGS) / received (MSGN) and bad
# ones (MBAD); exit 1 if any is bad. An unpaired last vCPU just exits.
.include "rt.S"

.equ RINGS, PROBE_DATA_ADDR + 0x40000   # 64 KiB per pair: head page, tail page, slots
.equ RING_SIZE, 0x10000
.equ SLOTS, 256
.equ SLOT_BYTES, 64
.equ MIX, 0x9e3779b97f4a7c15

cpl0_init:
    ret

# rdi = message number, rsi = word index -> rax = the word; clobbers rdx
message_word:
    movabs rax, MIX
    imul rax, rdi
    add rax, rsi
    mov rdx, rax
    shr rdx, 29
    xor rax, rdx
    ret

user_main:
    mov r12, [rip + rt_probe_arg]
    test r12, r12
    jnz 1f
    mov r12, 100000
1:  mov rax, r15
    or rax, 1
    cmp rax, [rip + rt_vcpu_count]
    jae ring_done_ok
    mov r13, r15
    shr r13, 1
    imul r13, r13, RING_SIZE
    add r13, RINGS                      # r13 = ring: +0 head, +0x1000 tail, +0x2000 slots
    xor rbx, rbx                        # message number
    test r15, 1
    jnz ring_consumer

ring_producer:
2:  mov rax, [r13]                      # head (ours)
    sub rax, [r13 + 0x1000]             # - tail
    cmp rax, SLOTS
    jb 3f
    pause
    jmp 2b
3:  mov r14, rbx
    and r14, SLOTS - 1
    shl r14, 6
    lea r14, [r13 + r14 + 0x2000]       # slot
    xor r8, r8                          # checksum
    xor rsi, rsi
4:  mov rdi, rbx
    call message_word
    mov [r14 + rsi*8], rax
    xor r8, rax
    inc rsi
    cmp rsi, 7
    jb 4b
    xor r8, rbx
    mov [r14 + 56], r8
    inc rbx
    mov [r13], rbx                      # publish
    cmp rbx, r12
    jb 2b
    mov edi, 0x5347534d                 # "MSGS"
    mov rsi, rbx
    call rt_report
    jmp ring_done_ok

ring_consumer:
    xor r9, r9                          # bad messages
2:  cmp [r13], rbx                      # head > message number?
    ja 3f
    pause
    jmp 2b
3:  mov r14, rbx
    and r14, SLOTS - 1
    shl r14, 6
    lea r14, [r13 + r14 + 0x2000]
    xor r8, r8
    xor r10, r10                        # word mismatches in this message
    xor rsi, rsi
4:  mov rdi, rbx
    call message_word
    mov rcx, [r14 + rsi*8]
    xor r8, rcx
    cmp rax, rcx
    je 5f
    inc r10
5:  inc rsi
    cmp rsi, 7
    jb 4b
    xor r8, rbx
    cmp r8, [r14 + 56]
    je 6f
    inc r10
6:  test r10, r10
    jz 7f
    inc r9
7:  inc rbx
    mov [r13 + 0x1000], rbx             # free the slot
    cmp rbx, r12
    jb 2b
    mov edi, 0x4e47534d                 # "MSGN"
    mov rsi, rbx
    call rt_report
    mov edi, 0x4441424d                 # "MBAD"
    mov rsi, r9
    call rt_report
    xor edi, edi
    test r9, r9
    setnz dil
    call rt_exit
ring_done_ok:
    xor edi, edi
    call rt_exit
