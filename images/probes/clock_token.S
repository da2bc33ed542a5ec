# clock-token: a token passes round the vCPUs (0 -> 1 -> ... -> n-1 -> 0) through memory,
# HOPS times in all (probe_arg, default 2000). The holder stamps kvmclock (its own pvclock
# structure, rt_clock_ns) into the token, then hands it on; the next vCPU reads kvmclock as
# soon as it sees the token. A receive earlier than its send means the nodes' clocks disagree.
# Every vCPU reports RECV (tokens received), BACK (receives earlier than the send: must be 0),
# SKEW (the worst such difference, send - receive, ns; 0 if none) and MINL (the smallest
# receive - send seen, ns: an upper bound of how far the clocks can be apart the other way).
.include "rt.S"

.equ BARRIER, PROBE_DATA_ADDR + 0x8000
.equ TOKEN, PROBE_DATA_ADDR + 0x9000    # +0 hop number (holder = hop mod n), +8 send stamp
.equ PAGES, PROBE_DATA_ADDR + 0x10000  # per vCPU: RECV, BACK, SKEW, MINL

cpl0_init:
    ret

user_main:
    mov r12, r15
    shl r12, 12
    add r12, PAGES
    mov qword ptr [r12 + 24], -1        # MINL: none yet
    mov r13, [rip + rt_probe_arg]
    test r13, r13
    jnz 1f
    mov r13, 2000
1:  mov rdi, BARRIER
    mov rsi, 1
    call rt_barrier
    mov rbx, r15                        # the next hop that is mine
    test r15, r15
    jnz wait_token
    # vCPU 0 starts: the first hop carries a stamp but no receive to check.
    jmp send_token

wait_token:
    cmp rbx, r13
    jae done
1:  mov rax, [TOKEN]
    cmp rax, r13
    jae done
    cmp rax, rbx
    je 2f
    pause
    jmp 1b
2:  mov rdi, r15
    call rt_clock_ns
    mov rcx, [TOKEN + 8]                # the sender's stamp
    inc qword ptr [r12]
    mov rdx, rax
    sub rdx, rcx                        # receive - send
    jns 3f
    inc qword ptr [r12 + 8]
    neg rdx
    cmp rdx, [r12 + 16]
    jbe 4f
    mov [r12 + 16], rdx
    jmp 4f
3:  cmp rdx, [r12 + 24]
    jae 4f
    mov [r12 + 24], rdx
4:
send_token:
    mov rdi, r15
    call rt_clock_ns
    mov [TOKEN + 8], rax
    lea rax, [rbx + 1]
    mov [TOKEN], rax                    # hand it on (after the stamp: stores stay in order)
    add rbx, [rip + rt_vcpu_count]
    jmp wait_token

done:
    mov rdi, BARRIER
    mov rsi, 2
    call rt_barrier
    mov edi, 0x56434552                 # "RECV"
    mov rsi, [r12]
    call rt_report
    mov edi, 0x4b434142                 # "BACK"
    mov rsi, [r12 + 8]
    call rt_report
    mov edi, 0x57454b53                 # "SKEW"
    mov rsi, [r12 + 16]
    call rt_report
    mov edi, 0x4c4e494d                 # "MINL"
    mov rsi, [r12 + 24]
    call rt_report
    mov edi, 0
    call rt_exit
