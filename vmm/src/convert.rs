//! Integer conversions the VMM makes again and again, each written once with the reason it
//! cannot lose anything.

// spanvm runs only on x86-64 Linux hosts (KVM), where a usize is as wide as a u64; guest sizes,
// offsets and page indices are u64 and host pointers and slices take usize.
const _: () = assert!(usize::BITS == u64::BITS);

/// A guest size, offset or page index as a host `usize`: lossless, because a usize is 64 bits
/// wide on every host spanvm runs on (checked at compile time above).
#[allow(clippy::cast_possible_truncation)]
pub(crate) const fn usize_from(value: u64) -> usize {
    value as usize
}

/// Bits 31:0 of `value`: the low half of a field the boot protocol or a register splits into
/// two 32-bit halves (the high half is `value >> 32`).
pub(crate) const fn low_u32(value: u64) -> u32 {
    (value & 0xFFFF_FFFF) as u32
}

/// The two's complement bits of `value`, as KVM and the hardware keep signed 64-bit values
/// (TSC offsets, sign-extended addresses) in unsigned fields.
pub(crate) const fn bits_of_i64(value: i64) -> u64 {
    u64::from_ne_bytes(value.to_ne_bytes())
}

/// The signed value whose two's complement bits are `bits`; the inverse of [`bits_of_i64`].
pub(crate) const fn i64_of_bits(bits: u64) -> i64 {
    i64::from_ne_bytes(bits.to_ne_bytes())
}
