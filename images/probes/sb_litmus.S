# sb-litmus: the store-buffer litmus test with mfence, streamed. vCPUs pair up (0,1), (2,3)...;
# in iteration n = 1..N (N = probe_arg, default 50000) each stores n to its own flag, runs
# mfence, and records the partner's flag. Sequential consistency (which the DSM must give, and
# x86-TSO gives with the fence) forbids a pair of iterations (n, m) in which each side missed the
# other's store. With r_me[n] the value read in iteration n (non-decreasing, by coherence), that
# is checked in O(N): for every m, with k = r_partner[m], r_me[k+1] >= m. Reports violations of
# that (SBVI) and of monotonicity (SBMO); exit 1 if any. An unpaired last vCPU just exits.
.include "rt.S"

.equ BARRIER, PROBE_DATA_ADDR
.equ FLAGS, PROBE_DATA_ADDR + 0x10000   # one page per vCPU
.equ RESULTS, 0x1000000                 # 8 MiB per vCPU: r[0..=N], u64 each
.equ RESULT_STRIDE, 0x800000
.equ LOCAL_WORK, 500

cpl0_init:
    ret

user_main:
    mov r12, [rip + rt_probe_arg]
    test r12, r12
    jnz 1f
    mov r12, 50000
1:  mov rdi, BARRIER
    mov rsi, 1
    call rt_barrier
    mov rax, r15
    or rax, 1
    cmp rax, [rip + rt_vcpu_count]
    jae sb_unpaired
    mov r13, r15
    xor r13, 1                          # partner
    mov r8, r15
    shl r8, 12
    add r8, FLAGS                       # my flag
    mov r9, r13
    shl r9, 12
    add r9, FLAGS                       # partner's flag
    mov r10, r15
    imul r10, r10, RESULT_STRIDE
    add r10, RESULTS                    # my results
    mov r11, r13
    imul r11, r11, RESULT_STRIDE
    add r11, RESULTS                    # partner's results
    mov qword ptr [r10], 0
    mov rcx, 1
2:  mov [r8], rcx
    mfence
    mov rax, [r9]
    mov [r10 + rcx*8], rax
    mov rax, LOCAL_WORK                 # keep the two sides' iterations overlapping in time
3:  dec rax
    jnz 3b
    inc rcx
    cmp rcx, r12
    jbe 2b
    mov rdi, BARRIER
    mov rsi, 2
    call rt_barrier
    # check: rbx violations, r14 monotonicity errors
    xor rbx, rbx
    xor r14, r14
    mov rcx, 1
6:  mov rax, [r10 + rcx*8]
    cmp rax, [r10 + rcx*8 - 8]
    jae 4f
    inc r14
4:  mov rax, [r11 + rcx*8]              # k = r_partner[m], m = rcx
    inc rax
    cmp rax, r12
    ja 5f
    cmp [r10 + rax*8], rcx
    jae 5f
    inc rbx
5:  inc rcx
    cmp rcx, r12
    jbe 6b
    mov edi, 0x4e4e4253                 # "SBNN": iterations
    mov rsi, r12
    call rt_report
    mov edi, 0x49564253                 # "SBVI"
    mov rsi, rbx
    call rt_report
    mov edi, 0x4f4d4253                 # "SBMO"
    mov rsi, r14
    call rt_report
    xor edi, edi
    or rbx, r14
    setnz dil
    call rt_exit
sb_unpaired:
    mov rdi, BARRIER
    mov rsi, 2
    call rt_barrier
    xor edi, edi
    call rt_exit
