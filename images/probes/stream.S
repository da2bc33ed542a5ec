# stream: a checked value stream from vCPU 1 (the writer) to vCPU 0 (the reader) through a ring
# of 64 pages, so that in a distributed guest the ring's pages keep moving between the two nodes.
# Made to prove, with a node killed mid-run, that the surviving reader never accepted a page it
# should not have: a zero page or a stale copy fails the check of the very record it holds.
#
# Record n (n = 1, 2, ...; never 0) lives in slot n mod 16384 and is two words: n, then
# checksum(n, slot). The writer stores a record, then publishes it by storing n to `head` (x86
# stores are seen in order); it reuses a slot only after the reader has published, through
# `tail`, that it checked the slot's previous record. The reader reads `head`, then every record
# up to that head and never past it (loads are seen in order too), and checks both words:
#   - a zero page reads as (0, 0): never a record, since n != 0;
#   - a stale copy of a slot holds record n - 16384 (or the zeros from before the first lap):
#     its first word is not n, and the checksum, a bijection of n for a given slot, differs too;
#   - a torn or foreign record fails the checksum.
# A `head` lower than one read before is a stale (or, if 0, a zero) copy of the head's page.
#
# probe_arg = records to stream (0 = endless). Reports, every 1024 records: the writer WROT
# (records written and published), the reader RDOK (records checked, all good). On the first
# bad record or head the reader reports what it read and exits 1:
#   BADK kind: 1 zero, 2 stale, 3 garbage     BADO object: 0 a record, 1 the head
#   BADQ the sequence number (or least head) expected    BADS the slot (records only)
#   BADW the first word (or head) read        BADC the checksum word read (records only)
#   RDOK the records checked before
# Needs 2 vCPUs; any others just exit 0.
.include "rt.S"

.equ HEAD, PROBE_DATA_ADDR + 0x10000    # own page: only the writer stores
.equ TAIL, PROBE_DATA_ADDR + 0x11000    # own page: only the reader stores
.equ RING, PROBE_DATA_ADDR + 0x20000
.equ RING_PAGES, 64
.equ RECORD_BYTES, 16
.equ RECORDS, RING_PAGES * 4096 / RECORD_BYTES
.equ REPORT_EVERY, 1024
# The reader publishes its tail once per page of records: a store per record would move the
# tail's page to the reader and back for every record while the writer waits for room.
.equ TAIL_EVERY, 4096 / RECORD_BYTES
.equ MIX_SEQ, 0x9e3779b97f4a7c15
.equ MIX_SLOT, 0xc2b2ae3d27d4eb4f
.equ SALT, 0x53545245414d2121

.equ KEY_WROT, 0x544f5257
.equ KEY_RDOK, 0x4b4f4452
.equ KEY_BADK, 0x4b444142
.equ KEY_BADO, 0x4f444142
.equ KEY_BADQ, 0x51444142
.equ KEY_BADS, 0x53444142
.equ KEY_BADW, 0x57444142
.equ KEY_BADC, 0x43444142

.equ BAD_ZERO, 1
.equ BAD_STALE, 2
.equ BAD_GARBAGE, 3

cpl0_init:
    ret

# rdi = sequence number, rsi = slot -> rax = checksum; clobbers rdx. For a fixed slot it is a
# bijection of the sequence number (odd multiplier, rotation, xor), so no other record of the
# same slot can carry the checksum of the expected one.
record_checksum:
    movabs rax, MIX_SEQ
    imul rax, rdi
    rol rax, 23
    movabs rdx, MIX_SLOT
    imul rdx, rsi
    xor rax, rdx
    movabs rdx, SALT
    xor rax, rdx
    ret

# rdi = sequence number -> rsi = its slot, r14 = the slot's address
record_slot:
    mov rsi, rdi
    and rsi, RECORDS - 1
    mov r14, rsi
    shl r14, 4
    add r14, RING
    ret

user_main:
    mov r12, [rip + rt_probe_arg]
    cmp r15, 1
    je writer
    ja stream_done_ok
    cmp qword ptr [rip + rt_vcpu_count], 2
    jae reader
    mov edi, 2                          # no writer: nothing would ever arrive
    call rt_exit

writer:
    xor ebx, ebx                        # last sequence number published
    xor r13d, r13d                      # tail as last read
1:  test r12, r12
    jz 2f
    cmp rbx, r12
    jae writer_done
2:  mov rax, rbx                        # room while the slot's previous record was checked
    sub rax, r13
    cmp rax, RECORDS
    jb 3f
    pause
    mov r13, [TAIL]
    jmp 2b
3:  lea rdi, [rbx + 1]
    call record_slot
    call record_checksum
    mov [r14], rdi
    mov [r14 + 8], rax
    mov [HEAD], rdi                     # publish, after the record's stores
    mov rbx, rdi
    test rbx, REPORT_EVERY - 1
    jnz 1b
    mov edi, KEY_WROT
    mov rsi, rbx
    call rt_report
    jmp 1b
writer_done:
    mov edi, KEY_WROT
    mov rsi, rbx
    call rt_report
stream_done_ok:
    xor edi, edi
    call rt_exit

reader:
    xor ebx, ebx                        # last sequence number checked
    xor r13d, r13d                      # head as last read
1:  test r12, r12
    jz 2f
    cmp rbx, r12
    jae reader_done
2:  cmp rbx, r13
    jb 4f
    mov rax, [HEAD]
    cmp rax, r13
    jb bad_head
    mov r13, rax
    cmp rbx, r13
    jb 4f
    pause
    jmp 2b
4:  lea rdi, [rbx + 1]
    call record_slot
    call record_checksum
    mov r8, [r14]
    mov r9, [r14 + 8]
    cmp r8, rdi
    jne bad_record
    cmp r9, rax
    jne bad_record
    mov rbx, rdi
    test rbx, TAIL_EVERY - 1
    jnz 5f
    mov [TAIL], rbx
5:  test rbx, REPORT_EVERY - 1
    jnz 1b
    mov edi, KEY_RDOK
    mov rsi, rbx
    call rt_report
    jmp 1b
reader_done:
    mov edi, KEY_RDOK
    mov rsi, rbx
    call rt_report
    xor edi, edi
    call rt_exit

# rdi = expected sequence number, rsi = slot, r8 = first word read, r9 = checksum word read
bad_record:
    mov r10, rdi
    mov r11, rsi
    mov r12, BAD_ZERO
    mov rax, r8
    or rax, r9
    jz 6f
    mov r12, BAD_GARBAGE
    test r8, r8
    jz 6f
    cmp r8, r10
    jae 6f
    mov rdi, r8                         # an older sequence number: stale if intact
    mov rsi, r11
    call record_checksum
    cmp rax, r9
    jne 6f
    mov r12, BAD_STALE
6:  xor r13d, r13d
    jmp bad_report

# rax = head read, r13 = the higher head read before
bad_head:
    mov r10, r13
    mov r8, rax
    xor r9d, r9d
    xor r11d, r11d
    mov r12, BAD_STALE
    test rax, rax
    jnz 7f
    mov r12, BAD_ZERO
7:  mov r13, 1

# r12 kind, r13 object, r10 expected, r11 slot, r8 word read, r9 checksum read, rbx checked
bad_report:
    mov edi, KEY_BADK
    mov rsi, r12
    call rt_report
    mov edi, KEY_BADO
    mov rsi, r13
    call rt_report
    mov edi, KEY_BADQ
    mov rsi, r10
    call rt_report
    mov edi, KEY_BADS
    mov rsi, r11
    call rt_report
    mov edi, KEY_BADW
    mov rsi, r8
    call rt_report
    mov edi, KEY_BADC
    mov rsi, r9
    call rt_report
    mov edi, KEY_RDOK
    mov rsi, rbx
    call rt_report
    mov edi, 1
    call rt_exit
