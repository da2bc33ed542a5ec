//! Decoder tests. Byte sequences are what GNU as emits for the mnemonic in the comment; the
//! ModRM/SIB sweep at the end assembles thousands of `popcnt` forms at test time (binutils
//! are needed to build the crate anyway, see build.rs) and checks each decodes to exactly the
//! operands it was written with, with the assembler's length.

use super::*;

fn decoded(bytes: &[u8]) -> Decoded {
    decode_64(bytes).unwrap_or_else(|e| panic!("{bytes:02x?}: {e}"))
}

fn insn(bytes: &[u8]) -> Instruction {
    let d = decoded(bytes);
    assert_eq!(d.len, bytes.len(), "length of {bytes:02x?}");
    d.instruction
}

fn mem(base: Base, index: Option<(Gpr, u8)>, displacement: i64) -> Operand {
    Operand::Memory(MemoryOperand {
        segment: None,
        base,
        index,
        displacement,
        address_32: false,
    })
}

#[test]
fn single_byte_and_system_instructions() {
    assert_eq!(insn(&[0xcc]), Instruction::Int3);
    assert_eq!(insn(&[0x9b]), Instruction::Fwait);
    assert_eq!(insn(&[0x0f, 0x01, 0xca]), Instruction::Clac);
    assert_eq!(insn(&[0x0f, 0x01, 0xcb]), Instruction::Stac);
    assert_eq!(insn(&[0x0f, 0x01, 0xe8]), Instruction::Serialize);
    assert_eq!(insn(&[0x0f, 0x01, 0xf8]), Instruction::Swapgs);
    // lfence, mfence, sfence, and the other mod-11 forms of /5../7 the processor accepts.
    for modrm in [0xe8, 0xf0, 0xf8, 0xef, 0xf7, 0xff] {
        assert_eq!(insn(&[0x0f, 0xae, modrm]), Instruction::Fence, "{modrm:#x}");
    }
    // sysretq, sysretl
    assert_eq!(
        insn(&[0x48, 0x0f, 0x07]),
        Instruction::Sysret { to_64_bit: true }
    );
    assert_eq!(
        insn(&[0x0f, 0x07]),
        Instruction::Sysret { to_64_bit: false }
    );
}

#[test]
fn trailing_bytes_are_not_part_of_the_instruction() {
    // clac followed by stac, int3 followed by junk: only the first instruction counts.
    assert_eq!(decoded(&[0x0f, 0x01, 0xca, 0x0f, 0x01, 0xcb]).len, 3);
    assert_eq!(decoded(&[0xcc, 0xff, 0xff]).len, 1);
}

#[test]
fn mode_independent_fast_path_agrees_with_the_full_decoder() {
    for bytes in [
        &[0xcc][..],
        &[0x9b],
        &[0x0f, 0x01, 0xca],
        &[0x0f, 0x01, 0xcb, 0x90],
    ] {
        assert_eq!(
            decode_mode_independent(bytes),
            Some(decoded(bytes)),
            "{bytes:02x?}"
        );
    }
    // Anything prefixed or mode-dependent goes to the full decoder.
    for bytes in [
        &[0xf3, 0x48, 0x0f, 0xb8, 0xc3][..],
        &[0x48, 0x0f, 0x07],
        &[0x0f, 0xae, 0xe8],
        &[0x66, 0xcc],
        &[0x0f, 0x01],
    ] {
        assert_eq!(decode_mode_independent(bytes), None, "{bytes:02x?}");
    }
}

#[test]
fn popcnt_register_forms_and_operand_sizes() {
    // popcnt %rbx,%rax
    assert_eq!(
        insn(&[0xf3, 0x48, 0x0f, 0xb8, 0xc3]),
        Instruction::Popcnt {
            size: OperandSize::Qword,
            dst: 0,
            src: Operand::Reg(3)
        }
    );
    // popcnt %ecx,%r12d (REX.R)
    assert_eq!(
        insn(&[0xf3, 0x44, 0x0f, 0xb8, 0xe1]),
        Instruction::Popcnt {
            size: OperandSize::Dword,
            dst: 12,
            src: Operand::Reg(1)
        }
    );
    // popcnt %r9w,%dx (66 before F3, as gas emits it; REX.B)
    let word = Instruction::Popcnt {
        size: OperandSize::Word,
        dst: 2,
        src: Operand::Reg(9),
    };
    assert_eq!(insn(&[0x66, 0xf3, 0x41, 0x0f, 0xb8, 0xd1]), word);
    // The same with F3 first: legacy prefixes may come in any order.
    assert_eq!(insn(&[0xf3, 0x66, 0x41, 0x0f, 0xb8, 0xd1]), word);
    // REX.W wins over 66.
    assert!(matches!(
        insn(&[0x66, 0xf3, 0x48, 0x0f, 0xb8, 0xc3]),
        Instruction::Popcnt {
            size: OperandSize::Qword,
            ..
        }
    ));
}

#[test]
fn popcnt_memory_forms() {
    // popcnt 0x1234(%rip),%rax
    assert_eq!(
        insn(&[0xf3, 0x48, 0x0f, 0xb8, 0x05, 0x34, 0x12, 0x00, 0x00]),
        Instruction::Popcnt {
            size: OperandSize::Qword,
            dst: 0,
            src: mem(Base::Rip, None, 0x1234)
        }
    );
    // popcnt (%rax),%r15
    assert_eq!(
        insn(&[0xf3, 0x4c, 0x0f, 0xb8, 0x38]),
        Instruction::Popcnt {
            size: OperandSize::Qword,
            dst: 15,
            src: mem(Base::Reg(0), None, 0)
        }
    );
    // popcnt 0x8(%rsi,%rdi,8),%rax
    assert_eq!(
        insn(&[0xf3, 0x48, 0x0f, 0xb8, 0x44, 0xfe, 0x08]),
        Instruction::Popcnt {
            size: OperandSize::Qword,
            dst: 0,
            src: mem(Base::Reg(6), Some((7, 8)), 8)
        }
    );
    // popcnt -0x80(%r13),%ax
    assert_eq!(
        insn(&[0x66, 0xf3, 0x41, 0x0f, 0xb8, 0x45, 0x80]),
        Instruction::Popcnt {
            size: OperandSize::Word,
            dst: 0,
            src: mem(Base::Reg(13), None, -0x80)
        }
    );
    // popcnt 0x0(%r13),%eax: R13 as base needs a displacement (mod 00 rm 101 is RIP).
    assert_eq!(
        insn(&[0xf3, 0x41, 0x0f, 0xb8, 0x45, 0x00]),
        Instruction::Popcnt {
            size: OperandSize::Dword,
            dst: 0,
            src: mem(Base::Reg(13), None, 0)
        }
    );
    // popcnt (%r12),%eax: R12 as base needs a SIB byte.
    assert_eq!(
        insn(&[0xf3, 0x41, 0x0f, 0xb8, 0x04, 0x24]),
        Instruction::Popcnt {
            size: OperandSize::Dword,
            dst: 0,
            src: mem(Base::Reg(12), None, 0)
        }
    );
    // popcnt 0x12345678(,%r12,4),%rcx: no base, REX.X index R12.
    assert_eq!(
        insn(&[0xf3, 0x4a, 0x0f, 0xb8, 0x0c, 0xa5, 0x78, 0x56, 0x34, 0x12]),
        Instruction::Popcnt {
            size: OperandSize::Qword,
            dst: 1,
            src: mem(Base::None, Some((12, 4)), 0x1234_5678)
        }
    );
    // A negative disp32: popcnt -0x10000(%rbx),%rax
    assert_eq!(
        insn(&[0xf3, 0x48, 0x0f, 0xb8, 0x83, 0x00, 0x00, 0xff, 0xff]),
        Instruction::Popcnt {
            size: OperandSize::Qword,
            dst: 0,
            src: mem(Base::Reg(3), None, -0x10000)
        }
    );
}

#[test]
fn popcnt_segment_and_address_size_prefixes() {
    // popcnt %gs:0x10,%rbp
    assert_eq!(
        insn(&[0x65, 0xf3, 0x48, 0x0f, 0xb8, 0x2c, 0x25, 0x10, 0x00, 0x00, 0x00]),
        Instruction::Popcnt {
            size: OperandSize::Qword,
            dst: 5,
            src: Operand::Memory(MemoryOperand {
                segment: Some(SegmentBase::Gs),
                base: Base::None,
                index: None,
                displacement: 0x10,
                address_32: false,
            })
        }
    );
    // popcnt %fs:(%rax),%rbx
    assert!(matches!(
        insn(&[0x64, 0xf3, 0x48, 0x0f, 0xb8, 0x18]),
        Instruction::Popcnt {
            src: Operand::Memory(MemoryOperand {
                segment: Some(SegmentBase::Fs),
                base: Base::Reg(0),
                ..
            }),
            ..
        }
    ));
    // A DS override has base 0 in 64-bit mode: ds popcnt (%rax),%rbx
    assert!(matches!(
        insn(&[0x3e, 0xf3, 0x48, 0x0f, 0xb8, 0x18]),
        Instruction::Popcnt {
            src: Operand::Memory(MemoryOperand { segment: None, .. }),
            ..
        }
    ));
    // popcnt (%eax,%ebx,2),%rdx
    assert_eq!(
        insn(&[0x67, 0xf3, 0x48, 0x0f, 0xb8, 0x14, 0x58]),
        Instruction::Popcnt {
            size: OperandSize::Qword,
            dst: 2,
            src: Operand::Memory(MemoryOperand {
                segment: None,
                base: Base::Reg(0),
                index: Some((3, 2)),
                displacement: 0,
                address_32: true,
            })
        }
    );
    // popcnt 0x10(%eip),%esi
    assert_eq!(
        insn(&[0x67, 0xf3, 0x0f, 0xb8, 0x35, 0x10, 0x00, 0x00, 0x00]),
        Instruction::Popcnt {
            size: OperandSize::Dword,
            dst: 6,
            src: Operand::Memory(MemoryOperand {
                segment: None,
                base: Base::Rip,
                index: None,
                displacement: 0x10,
                address_32: true,
            })
        }
    );
}

#[test]
fn rex_counts_only_right_before_the_opcode() {
    // F3 48 66 0F B8 C3: a legacy prefix after REX cancels it: 16-bit popcnt %bx,%ax.
    assert_eq!(
        insn(&[0xf3, 0x48, 0x66, 0x0f, 0xb8, 0xc3]),
        Instruction::Popcnt {
            size: OperandSize::Word,
            dst: 0,
            src: Operand::Reg(3)
        }
    );
    // Two REX prefixes: the last one counts (REX.B here, not REX.W).
    assert_eq!(
        insn(&[0xf3, 0x48, 0x41, 0x0f, 0xb8, 0xc3]),
        Instruction::Popcnt {
            size: OperandSize::Dword,
            dst: 0,
            src: Operand::Reg(11)
        }
    );
}

#[test]
fn random_and_pid_instructions() {
    // rdpid %rax; rdpid %r11
    assert_eq!(
        insn(&[0xf3, 0x0f, 0xc7, 0xf8]),
        Instruction::Rdpid { dst: 0 }
    );
    assert_eq!(
        insn(&[0xf3, 0x41, 0x0f, 0xc7, 0xfb]),
        Instruction::Rdpid { dst: 11 }
    );
    // rdrand %rax; rdrand %r10d; rdrand %cx; rdseed %r8
    assert_eq!(
        insn(&[0x48, 0x0f, 0xc7, 0xf0]),
        Instruction::Rdrand {
            size: OperandSize::Qword,
            dst: 0
        }
    );
    assert_eq!(
        insn(&[0x41, 0x0f, 0xc7, 0xf2]),
        Instruction::Rdrand {
            size: OperandSize::Dword,
            dst: 10
        }
    );
    assert_eq!(
        insn(&[0x66, 0x0f, 0xc7, 0xf1]),
        Instruction::Rdrand {
            size: OperandSize::Word,
            dst: 1
        }
    );
    assert_eq!(
        insn(&[0x49, 0x0f, 0xc7, 0xf8]),
        Instruction::Rdseed {
            size: OperandSize::Qword,
            dst: 8
        }
    );
}

#[test]
fn fs_gs_base_instructions() {
    let cases: [(&[u8], FsGsBaseOp, OperandSize, Gpr); 4] = [
        // rdfsbase %rax
        (
            &[0xf3, 0x48, 0x0f, 0xae, 0xc0],
            FsGsBaseOp::ReadFs,
            OperandSize::Qword,
            0,
        ),
        // rdgsbase %r9d
        (
            &[0xf3, 0x41, 0x0f, 0xae, 0xc9],
            FsGsBaseOp::ReadGs,
            OperandSize::Dword,
            9,
        ),
        // wrfsbase %r12
        (
            &[0xf3, 0x49, 0x0f, 0xae, 0xd4],
            FsGsBaseOp::WriteFs,
            OperandSize::Qword,
            12,
        ),
        // wrgsbase %ebx
        (
            &[0xf3, 0x0f, 0xae, 0xdb],
            FsGsBaseOp::WriteGs,
            OperandSize::Dword,
            3,
        ),
    ];
    for (bytes, op, size, reg) in cases {
        assert_eq!(
            insn(bytes),
            Instruction::FsGsBase { op, size, reg },
            "{bytes:02x?}"
        );
    }
}

#[test]
fn look_alikes_and_illegal_forms_are_unknown() {
    let unknown: &[&[u8]] = &[
        &[0x48, 0x0f, 0xc7, 0x0f],       // cmpxchg16b (%rdi)
        &[0x0f, 0xae, 0x27],             // xsave (%rdi)
        &[0xf3, 0x0f, 0xae, 0xe8],       // incsspd %eax (F3 0F AE /5)
        &[0xf3, 0x0f, 0xc7, 0xf0],       // senduipi %rax (F3 0F C7 /6)
        &[0x0f, 0xae, 0x28],             // xrstor (%rax): /5 with a memory operand
        &[0x0f, 0xae, 0xc0],             // 0F AE /0 mod 11 without F3
        &[0x66, 0x0f, 0xae, 0xf8],       // 66 0F AE /7 (pcommit), not sfence
        &[0xf3, 0x0f, 0x01, 0xe8],       // setssbsy, not serialize
        &[0xf2, 0x0f, 0x01, 0xe8],       // xsusldtrk, not serialize
        &[0x0f, 0x01, 0xf9],             // rdtscp (KVM's emulator does it)
        &[0x0f, 0x01, 0xc8],             // monitor
        &[0x0f, 0xb8, 0xc3],             // 0F B8 without F3 (jmpe)
        &[0xf2, 0x0f, 0xb8, 0xc3],       // F2 0F B8
        &[0xf2, 0xf3, 0x0f, 0xb8, 0xc3], // F2 and F3 together
        &[0xf0, 0xf3, 0x0f, 0xb8, 0xc3], // lock popcnt
        &[0xf0, 0x0f, 0x01, 0xca],       // lock clac
        &[0x66, 0xcc],                   // prefixed int3
        &[0xf3, 0x9b],                   // prefixed fwait
        &[0x66, 0x0f, 0x01, 0xca],       // prefixed clac
        &[0xf3, 0x0f, 0x07],             // prefixed sysret
        &[0x0f, 0xc7, 0x30],             // vmptrld (%rax): 0F C7 /6 with memory
        &[0x0f, 0x05],                   // syscall
        &[0x0f, 0xa2],                   // cpuid
        &[0x90],                         // nop
        &[0xcd, 0x03],                   // int $3 (two bytes, not int3)
        &[0xf3, 0x66, 0x0f, 0xc7, 0xf8], // 66 with rdpid
    ];
    for bytes in unknown {
        assert_eq!(
            decode_64(bytes),
            Err(DecodeError::Unknown),
            "{bytes:02x?} should be unknown"
        );
    }
}

#[test]
fn short_byte_runs_are_truncated_and_long_ones_unknown() {
    // Every proper prefix of a known instruction asks for more bytes.
    let full = [
        0x65, 0xf3, 0x48, 0x0f, 0xb8, 0x2c, 0x25, 0x10, 0x00, 0x00, 0x00,
    ];
    for n in 0..full.len() {
        assert_eq!(
            decode_64(&full[..n]),
            Err(DecodeError::Truncated),
            "{n} bytes"
        );
    }
    assert!(decode_64(&full).is_ok());
    // 14 prefixes and an opcode would be 15 bytes + ModRM: over the limit.
    let mut long = vec![0x3e; 13];
    long.extend_from_slice(&[0xf3, 0x0f, 0xb8, 0xc3]);
    assert_eq!(decode_64(&long), Err(DecodeError::Unknown));
    // 11 prefixes: exactly 15 bytes, legal.
    let mut max = vec![0x3e; 11];
    max.extend_from_slice(&[0xf3, 0x0f, 0xb8, 0xc3]);
    assert_eq!(decoded(&max).len, 15);
}

// --- The ModRM/SIB sweep, checked against GNU as. ---

const REGS64: [&str; 16] = [
    "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13",
    "r14", "r15",
];
const REGS32: [&str; 16] = [
    "eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi", "r8d", "r9d", "r10d", "r11d", "r12d",
    "r13d", "r14d", "r15d",
];
const REGS16: [&str; 16] = [
    "ax", "cx", "dx", "bx", "sp", "bp", "si", "di", "r8w", "r9w", "r10w", "r11w", "r12w", "r13w",
    "r14w", "r15w",
];

fn reg_name(size: OperandSize, r: Gpr) -> &'static str {
    let table = match size {
        OperandSize::Word => &REGS16,
        OperandSize::Dword => &REGS32,
        OperandSize::Qword => &REGS64,
    };
    table[usize::from(r)]
}

/// The AT&T spelling of a memory operand.
fn spell(m: &MemoryOperand) -> String {
    let regs = if m.address_32 { &REGS32 } else { &REGS64 };
    let seg = match m.segment {
        None => "",
        Some(SegmentBase::Fs) => "%fs:",
        Some(SegmentBase::Gs) => "%gs:",
    };
    let disp = if m.displacement < 0 {
        format!("-{:#x}", -m.displacement)
    } else {
        format!("{:#x}", m.displacement)
    };
    let inner = match (m.base, m.index) {
        (Base::Rip, _) => {
            let rip = if m.address_32 { "eip" } else { "rip" };
            return format!("{seg}{disp}(%{rip})");
        }
        (Base::None, None) => return format!("{seg}{disp}"),
        (Base::None, Some((i, s))) => format!("(,%{},{s})", regs[usize::from(i)]),
        (Base::Reg(b), None) => format!("(%{})", regs[usize::from(b)]),
        (Base::Reg(b), Some((i, s))) => {
            format!("(%{},%{},{s})", regs[usize::from(b)], regs[usize::from(i)])
        }
    };
    format!("{seg}{disp}{inner}")
}

/// Every popcnt form the sweep checks.
fn sweep_cases() -> Vec<Instruction> {
    let sizes = [OperandSize::Word, OperandSize::Dword, OperandSize::Qword];
    let displacements = [0i64, 0x7f, -0x80, 0x1234_5678, -0x8000_0000];
    let mut operands = Vec::new();
    for d in displacements {
        for b in 0..16u8 {
            operands.push((Base::Reg(b), None, d));
            for i in (0..16u8).filter(|&i| i != 4) {
                for s in [1u8, 2, 4, 8] {
                    operands.push((Base::Reg(b), Some((i, s)), d));
                }
            }
        }
        for i in (0..16u8).filter(|&i| i != 4) {
            operands.push((Base::None, Some((i, 8)), d));
        }
        operands.push((Base::None, None, d));
        operands.push((Base::Rip, None, d));
    }
    let mut cases = Vec::new();
    for (n, &(base, index, displacement)) in operands.iter().enumerate() {
        // Spread sizes, destinations, segments and address sizes over the operands.
        let size = sizes[n % 3];
        let dst = Gpr::try_from(n % 16).unwrap();
        let segment = [None, Some(SegmentBase::Fs), Some(SegmentBase::Gs)][(n / 3) % 3];
        // gas picks the address size from the registers, so absolute operands stay 64-bit.
        let address_32 = n % 7 == 0 && (base, index) != (Base::None, None);
        let src = Operand::Memory(MemoryOperand {
            segment,
            base,
            index,
            displacement,
            address_32,
        });
        cases.push(Instruction::Popcnt { size, dst, src });
        cases.push(Instruction::Popcnt {
            size,
            dst,
            src: Operand::Reg(Gpr::try_from((n + 5) % 16).unwrap()),
        });
    }
    cases
}

fn run(cmd: &mut std::process::Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?} (binutils are needed): {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_modrm_and_sib_form_matches_the_assembler() {
    let cases = sweep_cases();
    let mut source = String::from(".code64\n");
    for case in &cases {
        let Instruction::Popcnt { size, dst, src } = case else {
            unreachable!()
        };
        let src = match src {
            Operand::Reg(r) => format!("%{}", reg_name(*size, *r)),
            Operand::Memory(m) => spell(m),
        };
        source.push_str(&format!(
            "1: popcnt {src}, %{}\n2:\n.pushsection .lens, \"a\"\n.byte 2b-1b\n.popsection\n",
            reg_name(*size, *dst)
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let s = dir.path().join("sweep.S");
    let o = dir.path().join("sweep.o");
    let text = dir.path().join("text.bin");
    let lens = dir.path().join("lens.bin");
    std::fs::write(&s, source).unwrap();
    run(std::process::Command::new("as")
        .arg("--64")
        .arg("-o")
        .arg(&o)
        .arg(&s));
    for (section, out) in [(".text", &text), (".lens", &lens)] {
        run(std::process::Command::new("objcopy")
            .args(["-O", "binary", "-j", section])
            .arg(&o)
            .arg(out));
    }
    let text = std::fs::read(text).unwrap();
    let lens = std::fs::read(lens).unwrap();
    assert_eq!(lens.len(), cases.len());
    let mut at = 0;
    for (case, &len) in cases.iter().zip(&lens) {
        let len = usize::from(len);
        let bytes = &text[at..at + len];
        // Give the decoder more bytes than the instruction, as KVM does.
        let window = &text[at..(at + MAX_INSTRUCTION_LEN).min(text.len())];
        let d = decode_64(window).unwrap_or_else(|e| panic!("{case:?} ({bytes:02x?}): {e}"));
        assert_eq!(d.len, len, "length of {case:?} ({bytes:02x?})");
        assert_eq!(d.instruction, *case, "{bytes:02x?}");
        at += len;
    }
    assert!(cases.len() > 9_000, "{} cases", cases.len());
}
