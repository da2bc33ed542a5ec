//! Decoding of the few 64-bit-mode instructions the repair knows, from the bytes at RIP.
//!
//! Only what the repair can carry out is recognised; every other byte sequence, and every
//! prefix combination that would change an instruction's meaning (`F3 0F AE /5` is `incsspd`,
//! not `lfence`; `F3 0F C7 /6` is `senduipi`, not `rdrand`), is [`DecodeError::Unknown`] so
//! that the guest stops instead of running the wrong thing.

/// Longest legal x86 instruction.
pub const MAX_INSTRUCTION_LEN: usize = 15;

/// Why a byte sequence did not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not an instruction the repair implements (or an encoding of one that changes its
    /// meaning).
    #[error("not an instruction the kvm_pvm repair implements")]
    Unknown,
    /// The bytes end before the instruction does; fetch more and decode again.
    #[error("the instruction bytes end before the instruction does")]
    Truncated,
}

/// Operand size of an instruction with a general-purpose register operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OperandSize {
    /// 16 bits (`66` prefix): writes merge into the low word.
    Word,
    /// 32 bits (default): writes zero-extend to 64 bits.
    Dword,
    /// 64 bits (`REX.W`).
    Qword,
}

impl OperandSize {
    /// Width in bytes.
    pub fn bytes(self) -> usize {
        match self {
            OperandSize::Word => 2,
            OperandSize::Dword => 4,
            OperandSize::Qword => 8,
        }
    }

    /// Mask of the bits the size covers.
    pub fn mask(self) -> u64 {
        match self {
            OperandSize::Word => 0xffff,
            OperandSize::Dword => 0xffff_ffff,
            OperandSize::Qword => u64::MAX,
        }
    }
}

/// A general-purpose register in encoding order: 0 = RAX, 1 = RCX, 2 = RDX, 3 = RBX,
/// 4 = RSP, 5 = RBP, 6 = RSI, 7 = RDI, 8..=15 = R8..R15.
pub type Gpr = u8;

/// A segment whose base takes part in address computation in 64-bit mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentBase {
    /// `64` prefix.
    Fs,
    /// `65` prefix.
    Gs,
}

/// The base of a memory operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Base {
    /// No base register (SIB with base 101 and mod 00).
    None,
    /// A register.
    Reg(Gpr),
    /// RIP-relative: the address of the next instruction.
    Rip,
}

/// A memory operand: `segment:[base + index * scale + displacement]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryOperand {
    /// FS or GS override (CS/DS/ES/SS overrides have base 0 in 64-bit mode).
    pub segment: Option<SegmentBase>,
    /// Base register, RIP or none.
    pub base: Base,
    /// Index register and scale (1, 2, 4 or 8).
    pub index: Option<(Gpr, u8)>,
    /// Sign-extended displacement.
    pub displacement: i64,
    /// `67` prefix: the effective address is computed in 32 bits.
    pub address_32: bool,
}

/// The source of `popcnt`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operand {
    /// A register.
    Reg(Gpr),
    /// Memory.
    Memory(MemoryOperand),
}

/// Which FS/GS base instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsGsBaseOp {
    /// `rdfsbase`: register = FS.base.
    ReadFs,
    /// `rdgsbase`: register = GS.base.
    ReadGs,
    /// `wrfsbase`: FS.base = register.
    WriteFs,
    /// `wrgsbase`: GS.base = register.
    WriteGs,
}

/// A decoded instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Instruction {
    /// `int3` (`CC`).
    Int3,
    /// `clac` (`0F 01 CA`).
    Clac,
    /// `stac` (`0F 01 CB`).
    Stac,
    /// `fwait` (`9B`).
    Fwait,
    /// `lfence`, `mfence` or `sfence` (`0F AE /5../7`, mod 11).
    Fence,
    /// `serialize` (`0F 01 E8`).
    Serialize,
    /// `swapgs` (`0F 01 F8`).
    Swapgs,
    /// `sysret` (`0F 07`); `to_64_bit` with `REX.W` (`sysretq`).
    Sysret { to_64_bit: bool },
    /// `popcnt` (`F3 [REX] 0F B8 /r`).
    Popcnt {
        size: OperandSize,
        dst: Gpr,
        src: Operand,
    },
    /// `rdpid` (`F3 0F C7 /7`, mod 11): register = TSC_AUX.
    Rdpid { dst: Gpr },
    /// `rdrand` (`0F C7 /6`, mod 11).
    Rdrand { size: OperandSize, dst: Gpr },
    /// `rdseed` (`0F C7 /7`, mod 11).
    Rdseed { size: OperandSize, dst: Gpr },
    /// `rdfsbase`/`rdgsbase`/`wrfsbase`/`wrgsbase` (`F3 [REX.W] 0F AE /0../3`, mod 11).
    FsGsBase {
        op: FsGsBaseOp,
        size: OperandSize,
        reg: Gpr,
    },
}

/// An instruction and its length in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoded {
    /// What it is.
    pub instruction: Instruction,
    /// Its length, prefixes included.
    pub len: usize,
}

/// Decodes the instruction at the start of `bytes` if it is one of the mode-independent,
/// prefix-free ones (`int3`, `fwait`, `clac`, `stac`), which mean the same in every processor
/// mode; `None` for anything else. Lets the hot path skip reading the segment registers.
pub fn decode_mode_independent(bytes: &[u8]) -> Option<Decoded> {
    let one = |instruction| {
        Some(Decoded {
            instruction,
            len: 1,
        })
    };
    let three = |instruction| {
        Some(Decoded {
            instruction,
            len: 3,
        })
    };
    match bytes {
        [0xcc, ..] => one(Instruction::Int3),
        [0x9b, ..] => one(Instruction::Fwait),
        [0x0f, 0x01, 0xca, ..] => three(Instruction::Clac),
        [0x0f, 0x01, 0xcb, ..] => three(Instruction::Stac),
        _ => None,
    }
}

/// The prefixes before the opcode.
#[derive(Default, Debug)]
struct Prefixes {
    operand_16: bool,
    address_32: bool,
    /// The last of `F2`/`F3` (the one the processor honours when both are present).
    repeat: Option<u8>,
    /// Both `F2` and `F3` were seen: mandatory-prefix instructions are ambiguous then.
    both_repeats: bool,
    lock: bool,
    segment: Option<SegmentBase>,
    /// REX, if it immediately precedes the opcode (a REX followed by another prefix is
    /// ignored by the processor).
    rex: u8,
}

impl Prefixes {
    fn w(&self) -> bool {
        self.rex & 0x8 != 0
    }
    fn r(&self) -> u8 {
        (self.rex >> 2) & 1
    }
    fn x(&self) -> u8 {
        (self.rex >> 1) & 1
    }
    fn b(&self) -> u8 {
        self.rex & 1
    }
    /// No `66`, `F2` or `F3`: the form of instructions that have no mandatory prefix.
    fn plain(&self) -> bool {
        !self.operand_16 && self.repeat.is_none()
    }
    /// `F3` alone (no `66`, no `F2`).
    fn f3_only(&self) -> bool {
        !self.operand_16 && self.repeat == Some(0xf3) && !self.both_repeats
    }
    /// 16, 32 or 64 bits for instructions whose size follows `66` and `REX.W`.
    fn size(&self) -> OperandSize {
        if self.w() {
            OperandSize::Qword
        } else if self.operand_16 {
            OperandSize::Word
        } else {
            OperandSize::Dword
        }
    }
}

/// A cursor over the instruction bytes that reports running off the end as truncation.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Result<u8, DecodeError> {
        if self.at >= MAX_INSTRUCTION_LEN {
            // Over 15 bytes: the processor raises #GP; not ours to emulate.
            return Err(DecodeError::Unknown);
        }
        self.bytes
            .get(self.at)
            .copied()
            .ok_or(DecodeError::Truncated)
    }

    fn next(&mut self) -> Result<u8, DecodeError> {
        let b = self.peek()?;
        self.at += 1;
        Ok(b)
    }

    fn disp8(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from(i8::from_ne_bytes([self.next()?])))
    }

    fn disp32(&mut self) -> Result<i64, DecodeError> {
        let mut b = [0u8; 4];
        for byte in &mut b {
            *byte = self.next()?;
        }
        Ok(i64::from(i32::from_le_bytes(b)))
    }
}

/// Decodes the instruction at the start of `bytes`, for a vCPU in 64-bit mode.
pub fn decode_64(bytes: &[u8]) -> Result<Decoded, DecodeError> {
    let mut c = Cursor { bytes, at: 0 };
    let p = prefixes(&mut c)?;
    if p.lock {
        // None of these instructions takes LOCK; with it they raise #UD.
        return Err(DecodeError::Unknown);
    }
    let instruction = match c.next()? {
        0xcc if p.plain() => Instruction::Int3,
        0x9b if p.plain() => Instruction::Fwait,
        0x0f => two_byte(&mut c, &p)?,
        _ => return Err(DecodeError::Unknown),
    };
    Ok(Decoded {
        instruction,
        len: c.at,
    })
}

fn prefixes(c: &mut Cursor<'_>) -> Result<Prefixes, DecodeError> {
    let mut p = Prefixes::default();
    loop {
        let b = c.peek()?;
        match b {
            0x66 => p.operand_16 = true,
            0x67 => p.address_32 = true,
            0xf2 | 0xf3 => {
                if p.repeat.is_some_and(|r| r != b) {
                    p.both_repeats = true;
                }
                p.repeat = Some(b);
            }
            0xf0 => p.lock = true,
            // CS, SS, DS, ES overrides: base 0 in 64-bit mode.
            0x2e | 0x36 | 0x3e | 0x26 => p.segment = None,
            0x64 => p.segment = Some(SegmentBase::Fs),
            0x65 => p.segment = Some(SegmentBase::Gs),
            0x40..=0x4f => {
                c.at += 1;
                p.rex = b;
                continue;
            }
            _ => return Ok(p),
        }
        c.at += 1;
        p.rex = 0;
    }
}

fn two_byte(c: &mut Cursor<'_>, p: &Prefixes) -> Result<Instruction, DecodeError> {
    match c.next()? {
        0x01 => {
            let modrm = c.next()?;
            if !p.plain() {
                return Err(DecodeError::Unknown);
            }
            match modrm {
                0xca => Ok(Instruction::Clac),
                0xcb => Ok(Instruction::Stac),
                0xe8 => Ok(Instruction::Serialize),
                0xf8 => Ok(Instruction::Swapgs),
                _ => Err(DecodeError::Unknown),
            }
        }
        0x07 if p.plain() => Ok(Instruction::Sysret { to_64_bit: p.w() }),
        0xae => {
            let modrm = c.next()?;
            let (md, reg, rm) = split_modrm(modrm);
            if md != 3 {
                return Err(DecodeError::Unknown);
            }
            if p.plain() && (5..=7).contains(&reg) {
                return Ok(Instruction::Fence);
            }
            if p.f3_only() && reg <= 3 {
                let op = [
                    FsGsBaseOp::ReadFs,
                    FsGsBaseOp::ReadGs,
                    FsGsBaseOp::WriteFs,
                    FsGsBaseOp::WriteGs,
                ][usize::from(reg)];
                let size = if p.w() {
                    OperandSize::Qword
                } else {
                    OperandSize::Dword
                };
                return Ok(Instruction::FsGsBase {
                    op,
                    size,
                    reg: rm | p.b() << 3,
                });
            }
            Err(DecodeError::Unknown)
        }
        0xb8 if p.repeat == Some(0xf3) && !p.both_repeats => {
            let modrm = c.next()?;
            let (_, reg, _) = split_modrm(modrm);
            let src = modrm_operand(c, p, modrm)?;
            Ok(Instruction::Popcnt {
                size: p.size(),
                dst: reg | p.r() << 3,
                src,
            })
        }
        0xc7 => {
            let modrm = c.next()?;
            let (md, reg, rm) = split_modrm(modrm);
            if md != 3 {
                // cmpxchg8b/16b, vmptrld and friends.
                return Err(DecodeError::Unknown);
            }
            let dst = rm | p.b() << 3;
            let no_repeat = p.repeat.is_none();
            match reg {
                6 if no_repeat => Ok(Instruction::Rdrand {
                    size: p.size(),
                    dst,
                }),
                7 if no_repeat => Ok(Instruction::Rdseed {
                    size: p.size(),
                    dst,
                }),
                7 if p.f3_only() => Ok(Instruction::Rdpid { dst }),
                _ => Err(DecodeError::Unknown),
            }
        }
        _ => Err(DecodeError::Unknown),
    }
}

/// (mod, reg, rm) of a ModRM byte, without REX extension.
fn split_modrm(modrm: u8) -> (u8, u8, u8) {
    (modrm >> 6, (modrm >> 3) & 7, modrm & 7)
}

/// The r/m operand of `modrm`, consuming SIB and displacement bytes.
fn modrm_operand(c: &mut Cursor<'_>, p: &Prefixes, modrm: u8) -> Result<Operand, DecodeError> {
    let (md, _, rm) = split_modrm(modrm);
    if md == 3 {
        return Ok(Operand::Reg(rm | p.b() << 3));
    }
    let mut index = None;
    let base = if rm == 4 {
        let sib = c.next()?;
        let scale = 1u8 << (sib >> 6);
        let idx = ((sib >> 3) & 7) | p.x() << 3;
        // Index 100 without REX.X means "no index"; with REX.X it is R12.
        if idx != 4 {
            index = Some((idx, scale));
        }
        let base = sib & 7;
        if base == 5 && md == 0 {
            Base::None
        } else {
            Base::Reg(base | p.b() << 3)
        }
    } else if rm == 5 && md == 0 {
        Base::Rip
    } else {
        Base::Reg(rm | p.b() << 3)
    };
    let displacement = match (md, base) {
        (0, Base::None | Base::Rip) => c.disp32()?,
        (0, _) => 0,
        (1, _) => c.disp8()?,
        _ => c.disp32()?,
    };
    Ok(Operand::Memory(MemoryOperand {
        segment: p.segment,
        base,
        index,
        displacement,
        address_32: p.address_32,
    }))
}

#[cfg(test)]
#[path = "decode_tests.rs"]
mod tests;
