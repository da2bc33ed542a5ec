//! Tests of the instruction semantics against the SDM's definitions.

use super::super::decode::SegmentBase;
use super::*;

/// Registers where register n holds 0x1111_1111_1111_1111 * (n + 1) (wrapping), so every
/// register has a distinct value.
fn numbered_regs() -> kvm_regs {
    let mut regs = kvm_regs::default();
    for n in 0..16u8 {
        *gpr_mut(&mut regs, n) = 0x0101_0101_0101_0101u64.wrapping_mul(u64::from(n) + 1);
    }
    regs
}

#[test]
fn registers_are_numbered_as_the_encoding_numbers_them() {
    let regs = kvm_regs {
        rax: 0,
        rcx: 1,
        rdx: 2,
        rbx: 3,
        rsp: 4,
        rbp: 5,
        rsi: 6,
        rdi: 7,
        r8: 8,
        r9: 9,
        r10: 10,
        r11: 11,
        r12: 12,
        r13: 13,
        r14: 14,
        r15: 15,
        ..Default::default()
    };
    for n in 0..16u8 {
        assert_eq!(gpr(&regs, n), u64::from(n));
    }
}

#[test]
fn register_writes_follow_the_operand_size_rules() {
    for n in 0..16u8 {
        let before = numbered_regs();
        let old = gpr(&before, n);
        for (size, expected) in [
            (OperandSize::Word, (old & !0xffff) | 0xbeef),
            (OperandSize::Dword, 0xdead_beef),
            (OperandSize::Qword, 0xffff_ffff_dead_beef),
        ] {
            let mut regs = before;
            write_gpr(&mut regs, n, size, 0xffff_ffff_dead_beef);
            assert_eq!(gpr(&regs, n), expected, "r{n} {size:?}");
            for other in (0..16u8).filter(|&o| o != n) {
                assert_eq!(gpr(&regs, other), gpr(&before, other), "r{other} changed");
            }
        }
    }
}

fn memory(base: Base, index: Option<(Gpr, u8)>, displacement: i64) -> MemoryOperand {
    MemoryOperand {
        segment: None,
        base,
        index,
        displacement,
        address_32: false,
    }
}

#[test]
fn linear_addresses() {
    let mut regs = kvm_regs {
        rsi: 0x1000,
        rdi: 3,
        r12: 0xffff_ffff_ffff_fff0,
        rbx: 0x1_0000_0010,
        ..Default::default()
    };
    let bases = SegmentBases {
        fs: 0x7000_0000,
        gs: 0xffff_8880_0000_0000,
    };
    let next_rip = 0xffff_ffff_8100_0010;
    let at = |m: MemoryOperand, regs: &kvm_regs| linear_address(&m, regs, next_rip, bases);
    // 8(%rsi,%rdi,8)
    assert_eq!(at(memory(Base::Reg(6), Some((7, 8)), 8), &regs), 0x1020);
    // -0x10(%rsi)
    assert_eq!(at(memory(Base::Reg(6), None, -0x10), &regs), 0xff0);
    // 0x20(%r12): wraps around the top of the address space.
    assert_eq!(at(memory(Base::Reg(12), None, 0x20), &regs), 0x10);
    // RIP-relative, both directions.
    assert_eq!(
        at(memory(Base::Rip, None, 0x100), &regs),
        0xffff_ffff_8100_0110
    );
    assert_eq!(
        at(memory(Base::Rip, None, -0x20), &regs),
        0xffff_ffff_80ff_fff0
    );
    // No base: disp32 plus scaled index.
    assert_eq!(at(memory(Base::None, Some((7, 4)), 0x40), &regs), 0x4c);
    // 32-bit addressing truncates the effective address, then adds the segment base.
    let mut m = memory(Base::Reg(3), None, 0);
    m.address_32 = true;
    assert_eq!(at(m, &regs), 0x10);
    m.segment = Some(SegmentBase::Fs);
    assert_eq!(at(m, &regs), 0x7000_0010);
    let mut rip32 = memory(Base::Rip, None, 0x10);
    rip32.address_32 = true;
    assert_eq!(at(rip32, &regs), 0x8100_0020);
    // %gs:0x10
    let mut g = memory(Base::None, None, 0x10);
    g.segment = Some(SegmentBase::Gs);
    assert_eq!(at(g, &regs), 0xffff_8880_0000_0010);
    // The value of RSP is used as is (no push/pop adjustment).
    regs.rsp = 0x8000;
    assert_eq!(at(memory(Base::Reg(4), None, 8), &regs), 0x8008);
}

const ALL_ARITHMETIC: u64 = RFLAGS_CF | RFLAGS_PF | RFLAGS_AF | RFLAGS_ZF | RFLAGS_SF | RFLAGS_OF;

#[test]
fn popcnt_counts_and_flags() {
    let others = RFLAGS_FIXED | RFLAGS_IF | RFLAGS_AC | (1 << 10);
    for (source, size, count) in [
        (0u64, OperandSize::Qword, 0u64),
        (u64::MAX, OperandSize::Qword, 64),
        (u64::MAX, OperandSize::Dword, 32),
        (u64::MAX, OperandSize::Word, 16),
        (0xf0f0_0000_0000_8001, OperandSize::Qword, 10),
        (0xf0f0_0000_0000_8001, OperandSize::Dword, 2),
        // The bits above the operand size are not the source's.
        (0xffff_ffff_ffff_0000, OperandSize::Word, 0),
        (0xffff_ffff_0000_0000, OperandSize::Dword, 0),
    ] {
        for before in [others, others | ALL_ARITHMETIC] {
            let (n, flags) = popcnt(source, size, before);
            assert_eq!(n, count, "popcnt {source:#x} {size:?}");
            assert_eq!(flags & others, others, "non-arithmetic flags kept");
            let expected_arith = if count == 0 { RFLAGS_ZF } else { 0 };
            assert_eq!(
                flags & ALL_ARITHMETIC,
                expected_arith,
                "flags of popcnt {source:#x} {size:?} from {before:#x}"
            );
        }
    }
}

#[test]
fn random_success_sets_only_cf() {
    let flags = random_success_flags(RFLAGS_FIXED | RFLAGS_IF | ALL_ARITHMETIC);
    assert_eq!(flags, RFLAGS_FIXED | RFLAGS_IF | RFLAGS_CF);
    assert_eq!(random_success_flags(RFLAGS_FIXED), RFLAGS_FIXED | RFLAGS_CF);
}

#[test]
fn canonical_addresses() {
    for (address, la48, la57) in [
        (0u64, true, true),
        (0x0000_7fff_ffff_ffff, true, true),
        (0x0000_8000_0000_0000, false, true),
        (0xffff_8000_0000_0000, true, true),
        (0xffff_7fff_ffff_ffff, false, true),
        (0x00ff_ffff_ffff_ffff, false, true),
        (0x0100_0000_0000_0000, false, false),
        (0xff00_0000_0000_0000, false, true),
        (0xfeff_ffff_ffff_ffff, false, false),
        (u64::MAX, true, true),
    ] {
        assert_eq!(is_canonical(address, false), la48, "{address:#x} 48-bit");
        assert_eq!(is_canonical(address, true), la57, "{address:#x} 57-bit");
    }
}

/// A 64-bit IDT gate to `handler` with attribute byte `attributes`.
fn gate(handler: u64, attributes: u8) -> [u8; 16] {
    let low = (handler & 0xffff)
        | (0x10 << 16)
        | (u64::from(attributes) << 40)
        | (((handler >> 16) & 0xffff) << 48);
    let mut g = [0u8; 16];
    g[..8].copy_from_slice(&low.to_le_bytes());
    g[8..].copy_from_slice(&(handler >> 32).to_le_bytes());
    g
}

#[test]
fn idt_gates() {
    let handler = 0xffff_ffff_8160_1230;
    assert_eq!(gate_target(&gate(handler, 0x8e)), Some(handler)); // interrupt gate
    assert_eq!(gate_target(&gate(handler, 0x8f)), Some(handler)); // trap gate
    assert_eq!(gate_target(&gate(handler, 0xee)), Some(handler)); // DPL 3
    assert_eq!(gate_target(&gate(handler, 0x0e)), None); // not present
    assert_eq!(gate_target(&gate(handler, 0x8c)), None); // call gate
    assert_eq!(gate_target(&[0u8; 16]), None);
}

#[test]
fn entry_positions() {
    let entry = 0xffff_ffff_8160_1230;
    assert_eq!(entry_position(entry, entry), EntryPosition::AtEntry);
    assert_eq!(
        entry_position(entry + 4, entry),
        EntryPosition::AfterEndbr64
    );
    for rip in [entry + 1, entry + 3, entry + 5, entry - 4, 0] {
        assert_eq!(
            entry_position(rip, entry),
            EntryPosition::Elsewhere,
            "{rip:#x}"
        );
    }
}

fn frame_bytes(words: [u64; 6]) -> [u8; EXCEPTION_FRAME_LEN] {
    let mut b = [0u8; EXCEPTION_FRAME_LEN];
    for (i, w) in words.iter().enumerate() {
        b[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
    }
    b
}

const LSTAR: u64 = 0xffff_ffff_8160_0080;
/// STAR as Linux sets it: SYSCALL CS 0x10, SYSRET base 0x23 (user CS 0x33, SS 0x2b).
const STAR: u64 = 0x0023_0010_0000_0000;
/// FMASK as Linux sets it (CF PF AF ZF SF TF IF DF OF IOPL NT RF AC ID).
const FMASK: u64 = 0x0025_7fd5;

#[test]
fn exception_frames() {
    let frame = ExceptionFrame::parse(&frame_bytes([0x15, LSTAR, 0x33, 0x246, 0x7ffc_0000, 0x2b]));
    assert_eq!(
        frame,
        ExceptionFrame {
            error_code: 0x15,
            rip: LSTAR,
            cs: 0x33,
            rflags: 0x246,
            rsp: 0x7ffc_0000,
            ss: 0x2b,
        }
    );
    assert!(frame.is_partial_syscall(LSTAR));
    // Any user CS with RPL 3 (a 32-bit one too).
    assert!(ExceptionFrame { cs: 0x23, ..frame }.is_partial_syscall(LSTAR));
    // A fault from kernel mode at LSTAR is a kernel bug, not a half-done syscall.
    assert!(!ExceptionFrame { cs: 0x10, ..frame }.is_partial_syscall(LSTAR));
    // A user fault elsewhere is an ordinary page fault.
    assert!(!ExceptionFrame {
        rip: 0x40_1000,
        ..frame
    }
    .is_partial_syscall(LSTAR));
    assert!(!frame.is_partial_syscall(LSTAR + 1));
}

#[test]
fn completing_a_syscall() {
    let user_rflags = 0x246 | RFLAGS_AC | RFLAGS_RF | (1 << 8); // with TF and RF
    let regs = kvm_regs {
        rip: 0xffff_ffff_8160_1230,
        rsp: 0xffff_c900_0000_3f58,
        rflags: 0x86,
        rcx: 0x40_1234,
        r11: user_rflags,
        rax: 39,
        rdi: 7,
        ..numbered_regs()
    };
    let frame = ExceptionFrame {
        error_code: 0x15,
        rip: LSTAR,
        cs: 0x33,
        rflags: 0x246,
        rsp: 0x7ffc_1230,
        ss: 0x2b,
    };
    let msrs = SyscallMsrs {
        star: STAR,
        lstar: LSTAR,
        fmask: FMASK,
    };
    let (out, cs, ss) = complete_syscall(&regs, &frame, &msrs);
    assert_eq!(out.rip, LSTAR);
    assert_eq!(out.rsp, 0x7ffc_1230, "the user RSP, frame dropped");
    // Linux's FMASK clears everything but bit 1 here.
    assert_eq!(out.rflags, RFLAGS_FIXED);
    // Everything else, RCX and R11 included, as the user left it.
    assert_eq!(
        kvm_regs {
            rip: regs.rip,
            rsp: regs.rsp,
            rflags: regs.rflags,
            ..out
        },
        regs
    );
    assert_eq!(
        (cs.selector, cs.dpl, cs.l, cs.db, cs.type_),
        (0x10, 0, 1, 0, 0xb)
    );
    assert_eq!(
        (ss.selector, ss.dpl, ss.l, ss.db, ss.type_),
        (0x18, 0, 0, 1, 0x3)
    );
    for s in [cs, ss] {
        assert_eq!(
            (s.base, s.limit, s.present, s.s, s.g),
            (0, 0xffff_ffff, 1, 1, 1)
        );
        assert_eq!(s.unusable, 0);
    }
    // A narrower FMASK leaves the other flags; RF is cleared regardless; RPL bits in STAR's
    // SYSCALL selector are ignored for CS.
    let narrow = SyscallMsrs {
        star: 0x0023_0013_0000_0000,
        fmask: RFLAGS_IF,
        ..msrs
    };
    let (out, cs, ss) = complete_syscall(&regs, &frame, &narrow);
    assert_eq!(
        out.rflags,
        (user_rflags & !RFLAGS_IF & !RFLAGS_RF) | RFLAGS_FIXED
    );
    assert_eq!(cs.selector, 0x10);
    assert_eq!(ss.selector, 0x1b);
}

#[test]
fn sysret_to_64_and_32_bit_mode() {
    let regs = kvm_regs {
        rip: 0xffff_ffff_8160_0100,
        rcx: 0x0000_7f00_1234_5678,
        r11: 0x246 | RFLAGS_RF | (1 << 17) | (1 << 3),
        ..numbered_regs()
    };
    let (out, cs, ss) = sysret(&regs, STAR, true);
    assert_eq!(out.rip, 0x0000_7f00_1234_5678);
    // RF, VM and the reserved bit 3 are not loaded; bit 1 is set.
    assert_eq!(out.rflags, 0x246);
    assert_eq!((cs.selector, cs.dpl, cs.l, cs.db), (0x33, 3, 1, 0));
    assert_eq!((ss.selector, ss.dpl, ss.db, ss.type_), (0x2b, 3, 1, 0x3));
    assert_eq!(
        kvm_regs {
            rip: regs.rip,
            rflags: regs.rflags,
            ..out
        },
        regs
    );
    let (out, cs, ss) = sysret(&regs, STAR, false);
    assert_eq!(out.rip, 0x1234_5678, "ECX, zero-extended");
    assert_eq!((cs.selector, cs.dpl, cs.l, cs.db), (0x23, 3, 0, 1));
    assert_eq!(ss.selector, 0x2b);
}
