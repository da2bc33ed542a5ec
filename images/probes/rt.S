# Probe runtime: the part every probe guest shares. Included at the top of each probe source,
# which then defines `cpl0_init` (runs at CPL0 with rdi = vCPU index, may clobber caller-saved
# registers) and `user_main` (runs at CPL3 with rdi = r15 = vCPU index, never returns: it ends
# with `rt_exit`).
#
# Registers at the CPL0 entry, set by the loader (vmm/src/probe/loader.rs):
#   rdi vCPU index   rsi vCPU count   rdx guest RAM bytes   rcx TSC kHz
#   r8  node id      r9  node count   r10 user stack top    r11 the probe's argument
#   rsp kernel stack top
# Page tables identity-map all guest-physical memory (2 MiB pages, user-accessible), the GDT and
# a per-vCPU TSS are loaded, and the IDT points at the 256 stubs below.

.intel_syntax noprefix
.include "layout.inc"
.code64
.text

.globl _start
_start:
header:
    .quad PROBE_MAGIC
    .quad rt_entry
    .quad vector_stub_table

# Every vCPU stores the same boot facts; storing only when different keeps the runtime's data
# page shared instead of bouncing it between nodes of a distributed guest.
.macro RT_STORE mem, reg
    cmp [rip + \mem], \reg
    je 1f
    mov [rip + \mem], \reg
1:
.endm

# Registers `\label` as the handler of `\vector` (at CPL0, in cpl0_init). Clobbers rax.
.macro RT_SET_HANDLER vector, label
    lea rax, [rip + \label]
    RT_STORE rt_handlers+\vector*8, rax
.endm

rt_entry:
    RT_STORE rt_vcpu_count, rsi
    RT_STORE rt_ram_bytes, rdx
    RT_STORE rt_tsc_khz, rcx
    RT_STORE rt_node_count, r9
    RT_STORE rt_probe_arg, r11
    mov r15, rdi
    mov r14, r10
    # Every probe says which node it runs on, so that cluster tests can assert the placement.
    mov rsi, r8
    mov edi, 0x45444f4e                 # "NODE"
    call rt_report
    # kvmclock: this vCPU's pvclock structure, enabled (bit 0)
    mov rax, r15
    shl rax, 6
    add rax, PVCLOCK_ADDR + 1
    mov rdx, 0
    mov ecx, 0x4b564d01
    wrmsr
    # the #UD "system call" path is part of the runtime
    RT_SET_HANDLER 6, rt_ud_handler
    mov rdi, r15
    call cpl0_init
    # drop to CPL3: ss, rsp, rflags (IOPL 3 so user code may use in/out, IF set), cs, rip
    push USER_DS
    push r14
    push 0x3202
    push USER_CS
    lea rax, [rip + rt_user_start]
    push rax
    iretq
rt_user_start:
    mov rdi, r15
    jmp user_main

# ---- interrupt entry ---------------------------------------------------------------------
# Every vector has a stub that pushes a dummy error code where the CPU pushes none, then the
# vector, so that `rt_interrupt` sees one frame shape:
#   [frame+0] vector  [+8] error code  [+16] rip  [+24] cs  [+32] rflags  [+40] rsp  [+48] ss
# and below the frame the saved registers: rax at [frame-8], rcx -16, rdx -24, rsi -32,
# rdi -40, r8 -48, r9 -56, r10 -64, r11 -72. A handler is called with rdi = vector,
# rsi = frame, rdx = vCPU index; it may clobber caller-saved registers only.
.altmacro
.macro RT_STUB n
rt_stub_\n:
    .if ((\n == 8) || ((\n >= 10) && (\n <= 14)) || (\n == 17) || (\n == 21) || (\n == 29) || (\n == 30))
    .else
    push 0
    .endif
    push \n
    jmp rt_interrupt
.endm
.macro RT_STUB_ADDR n
    .quad rt_stub_\n
.endm

.set rt_i, 0
.rept 256
    RT_STUB %rt_i
    .set rt_i, rt_i + 1
.endr

.balign 8
vector_stub_table:
.set rt_i, 0
.rept 256
    RT_STUB_ADDR %rt_i
    .set rt_i, rt_i + 1
.endr

rt_interrupt:
    push rax
    push rcx
    push rdx
    push rsi
    push rdi
    push r8
    push r9
    push r10
    push r11
    lea rsi, [rsp + 9*8]
    mov rdi, [rsi]
    and rdi, 0xff
    # vCPU index from the kernel stack pointer: each vCPU's stack lives in its own block
    mov rdx, rsp
    sub rdx, STACKS_ADDR
    shr rdx, 15
    lea rax, [rip + rt_handlers]
    mov rax, [rax + rdi*8]
    test rax, rax
    jz rt_unexpected_vector
    call rax
    pop r11
    pop r10
    pop r9
    pop r8
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rax
    add rsp, 16
    iretq

# An exception or interrupt nobody registered: report what and where, fail the probe.
rt_unexpected_vector:
    mov r12, rdi
    mov r13, rsi
    mov edi, 0x43455655          # "UVEC"
    mov rsi, r12
    call rt_report
    mov edi, 0x50495255          # "URIP"
    mov rsi, [r13 + 16]
    call rt_report
    mov edi, 0x52524555          # "UERR"
    mov rsi, [r13 + 8]
    call rt_report
    mov edi, 0xE000
    or rdi, r12
    call rt_exit

# ---- the #UD system call -------------------------------------------------------------------
# CPL3 code cannot run rdmsr/wrmsr; it executes `ud2` with rax = call number and this handler
# does the privileged work at CPL0, then resumes after the ud2. (`syscall` and `int n` are not
# usable from CPL3 on every host; exceptions are.)
#   rax 0: wrmsr ecx = rdi, value = rsi      rax 1: rax = rdmsr(ecx = rdi)
rt_ud_handler:
    mov rcx, [rsi + 16]
    cmp word ptr [rcx], 0x0b0f
    jne 9f
    mov rax, [rsi - 8]
    mov rcx, [rsi - 40]
    cmp rax, 0
    je 1f
    cmp rax, 1
    je 2f
    jmp 9f
1:  mov rax, [rsi - 32]
    mov rdx, rax
    shr rdx, 32
    wrmsr
    jmp 8f
2:  mov r8, rsi
    rdmsr
    shl rdx, 32
    or rax, rdx
    mov [r8 - 8], rax
    mov rsi, r8
8:  add qword ptr [rsi + 16], 2
    ret
9:  jmp rt_unexpected_vector

rt_wrmsr:                        # rdi = msr, rsi = value; callable at CPL3 or CPL0
    mov eax, 0
    ud2
    ret
rt_rdmsr:                        # rdi = msr -> rax
    mov eax, 1
    ud2
    ret

# ---- reporting through the probe device ----------------------------------------------------
rt_report:                       # edi = key (4 ASCII bytes), rsi = value; clobbers rax, rdx
    mov eax, edi
    mov dx, PROBE_PORT_KEY
    out dx, eax
    mov rax, rsi
    mov dx, PROBE_PORT_VALUE_LO
    out dx, eax
    shr rax, 32
    mov dx, PROBE_PORT_VALUE_HI
    out dx, eax
    ret

rt_exit:                         # edi = status (0 = success); does not return
    mov eax, edi
    mov dx, PROBE_PORT_EXIT
    out dx, eax
1:  pause
    jmp 1b

rt_puts:                         # rsi = NUL-terminated string to COM1; clobbers rax, rdx, rsi
    mov dx, COM1_PORT
1:  mov al, [rsi]
    test al, al
    jz 2f
    out dx, al
    inc rsi
    jmp 1b
2:  ret

rt_putu:                         # rdi = unsigned number to COM1 in decimal; clobbers rax, rcx, rdx, rsi, rdi
    sub rsp, 32
    lea rsi, [rsp + 31]
    mov byte ptr [rsi], 0
    mov rax, rdi
    mov rcx, 10
1:  xor edx, edx
    div rcx
    add dl, '0'
    dec rsi
    mov [rsi], dl
    test rax, rax
    jnz 1b
    call rt_puts
    add rsp, 32
    ret

# ---- time ------------------------------------------------------------------------------------
rt_rdtsc:                        # rax = TSC; clobbers rdx
    lfence
    rdtsc
    shl rdx, 32
    or rax, rdx
    ret

rt_clock_ns:                     # rdi = vCPU index -> rax = kvmclock ns; clobbers rcx, rdx, rsi, r8, r9
    mov rsi, rdi
    shl rsi, 6
    add rsi, PVCLOCK_ADDR
1:  mov r8d, [rsi]               # version: odd while KVM updates the structure
    test r8d, 1
    jnz 1b
    lfence
    rdtsc
    shl rdx, 32
    or rax, rdx
    sub rax, [rsi + 8]           # tsc - tsc_timestamp
    movsx ecx, byte ptr [rsi + 28]
    test ecx, ecx
    js 2f
    shl rax, cl
    jmp 3f
2:  neg ecx
    shr rax, cl
3:  mov r9d, [rsi + 24]          # tsc_to_system_mul
    mul r9
    shrd rax, rdx, 32
    add rax, [rsi + 16]          # + system_time
    cmp r8d, [rsi]
    jne 1b
    ret

# ---- barrier across all vCPUs ---------------------------------------------------------------
# rdi = address of a zeroed u64 used only for this barrier, rsi = generation (1, 2, ...):
# returns when every vCPU has arrived for that generation.
rt_barrier:
    mov rax, 1
    lock xadd [rdi], rax
    mov rax, [rip + rt_vcpu_count]
    imul rax, rsi
1:  cmp [rdi], rax
    jae 2f
    pause
    jmp 1b
2:  ret

# ---- runtime data ----------------------------------------------------------------------------
# On its own page, apart from code, so that code pages stay read-shared in a distributed guest.
.balign 4096
rt_vcpu_count: .quad 0
rt_ram_bytes:  .quad 0
rt_tsc_khz:    .quad 0
rt_node_count: .quad 0
rt_probe_arg:  .quad 0              # guest.probe_arg of the config (0 if not given)
.balign 64
rt_handlers:   .skip 256*8
.balign 4096
