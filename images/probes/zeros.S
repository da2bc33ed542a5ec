# zeros: every vCPU reads, whole, the pages of never-written RAM from 16 MiB to the end of RAM
# that are its own (page p by vCPU p mod n) and checks they are all zero. Reports pages read
# (ZPGS) and non-zero pages (ZBAD); exit 1 if any. In a distributed guest none of these pages
# should travel as 4 KiB of data: a never-written page moves as a flag.
.include "rt.S"

.equ FIRST, 0x1000000

cpl0_init:
    ret

user_main:
    xor r12, r12                        # pages
    xor r13, r13                        # bad pages
    mov rbx, r15
    shl rbx, 12
    add rbx, FIRST
    mov r14, [rip + rt_vcpu_count]
    shl r14, 12
    mov r10, [rip + rt_ram_bytes]
    mov rax, 0xC0000000
    cmp r10, rax
    jbe 1f
    mov r10, rax                        # low RAM only: enough, and no gap to skip
1:  cmp rbx, r10
    jae 4f
    xor rax, rax
    xor rcx, rcx
2:  or rax, [rbx + rcx*8]
    inc rcx
    cmp rcx, 512
    jb 2b
    test rax, rax
    jz 3f
    inc r13
3:  inc r12
    add rbx, r14
    jmp 1b
4:  mov edi, 0x5347505a                 # "ZPGS"
    mov rsi, r12
    call rt_report
    mov edi, 0x4441425a                 # "ZBAD"
    mov rsi, r13
    call rt_report
    xor edi, edi
    test r13, r13
    setnz dil
    call rt_exit
