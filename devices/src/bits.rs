//! Fields cut out of wider register and bus values. x86 registers and interrupt messages pack
//! several fields into one word, so taking the low bits of a value is how a field is decoded,
//! not a lossy conversion; these helpers say so once instead of an `as` at every field.

/// Bits 7:0 of `value`: an 8-bit field such as an interrupt vector or a byte register offset.
pub(crate) const fn low_u8(value: u64) -> u8 {
    (value & 0xFF) as u8
}

/// Bits 31:0 of `value`: the low half of a 64-bit register or message.
pub(crate) const fn low_u32(value: u64) -> u32 {
    (value & 0xFFFF_FFFF) as u32
}
