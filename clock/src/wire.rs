//! The clock messages on the wire: the master's clock in the START payload, and the master's
//! answer to a sample request. Little-endian, fixed size, every field checked on decode.
//!
//! ```text
//! MasterClock (64 bytes)                 ClockReply (56 bytes)
//!  0 magic "SVMC"                          0 magic "SVCR"
//!  4 version u16 (1)                       4 version u16 (1)
//!  6 TSC mode u8 (0 fixed, 1 offset)       6 TSC mode u8
//!  7 reserved u8 (0)                       7 reserved u8 (0)
//!  8 boot id [16]                          8 sample sequence u64
//! 24 kvmclock ns u64                      16 kvmclock ns u64
//! 32 KVM_CLOCK_* flags u32                24 KVM_CLOCK_* flags u32
//! 36 TSC kHz u32 (> 0)                    28 reserved u32 (0)
//! 40 realtime ns u64                      32 realtime ns u64
//! 48 host TSC u64                         40 host TSC u64
//! 56 guest TSC offset i64 (0 if fixed)    48 guest TSC offset i64 (0 if fixed)
//! ```

use transport::NodeId;

use crate::{BootId, ClockError, ClockReading, KNOWN_CLOCK_FLAGS};

const VERSION: u16 = 1;
const MASTER_MAGIC: &[u8; 4] = b"SVMC";
const REPLY_MAGIC: &[u8; 4] = b"SVCR";
/// Size of an encoded [`MasterClock`].
pub const MASTER_CLOCK_LEN: usize = 64;
/// Size of an encoded [`ClockReply`].
pub const REPLY_LEN: usize = 56;

/// The master's guest TSC, as other nodes need to know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MasterTsc {
    /// The master's host cannot offset the guest TSC: its guest TSC is its host TSC.
    Fixed,
    /// The master's guest TSC is its host TSC plus this offset.
    Offset(i64),
}

impl MasterTsc {
    /// Guest TSC minus host TSC on the master.
    pub fn guest_offset(self) -> i64 {
        match self {
            MasterTsc::Fixed => 0,
            MasterTsc::Offset(o) => o,
        }
    }

    fn encode(self) -> (u8, i64) {
        match self {
            MasterTsc::Fixed => (0, 0),
            MasterTsc::Offset(o) => (1, o),
        }
    }

    fn decode(mode: u8, offset: i64) -> Result<Self, String> {
        match (mode, offset) {
            (0, 0) => Ok(MasterTsc::Fixed),
            (0, o) => Err(format!("a fixed TSC with offset {o}")),
            (1, o) => Ok(MasterTsc::Offset(o)),
            (m, _) => Err(format!("unknown TSC mode {m}")),
        }
    }
}

/// What the master tells every node in START: its kvmclock with the host's realtime and TSC
/// at that instant, its boot id, and its guest TSC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MasterClock {
    /// The master host's boot id.
    pub boot_id: BootId,
    /// The master's `KVM_GET_CLOCK`.
    pub reading: ClockReading,
    /// The master's TSC frequency.
    pub tsc_khz: u32,
    /// The master's guest TSC.
    pub tsc: MasterTsc,
}

/// The master's answer to one clock sample request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockReply {
    /// The request it answers.
    pub seq: u64,
    /// The master's `KVM_GET_CLOCK` when it answered.
    pub reading: ClockReading,
    /// The master's guest TSC.
    pub tsc: MasterTsc,
}

fn put(out: &mut [u8], at: usize, bytes: &[u8]) {
    out[at..at + bytes.len()].copy_from_slice(bytes);
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// A signed field: the offset's two's complement bytes, as `i64::to_le_bytes` wrote them.
fn i64_at(b: &[u8], at: usize) -> i64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    i64::from_le_bytes(a)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

/// Checks the common 8-byte head; returns the TSC mode byte.
fn check_head(b: &[u8], magic: &[u8; 4], len: usize) -> Result<u8, String> {
    if b.len() != len {
        return Err(format!("{} bytes instead of {len}", b.len()));
    }
    if &b[0..4] != magic {
        return Err(format!("bad magic {:02x?}", &b[0..4]));
    }
    let version = u16::from_le_bytes([b[4], b[5]]);
    if version != VERSION {
        return Err(format!(
            "clock protocol version {version}, this node speaks {VERSION}"
        ));
    }
    if b[7] != 0 {
        return Err(format!("reserved byte is {:#x}, not 0", b[7]));
    }
    Ok(b[6])
}

fn check_flags(flags: u32) -> Result<u32, String> {
    if flags & !KNOWN_CLOCK_FLAGS != 0 {
        return Err(format!(
            "unknown clock flags {:#x}",
            flags & !KNOWN_CLOCK_FLAGS
        ));
    }
    Ok(flags)
}

impl MasterClock {
    /// The START payload.
    pub fn encode(&self) -> [u8; MASTER_CLOCK_LEN] {
        let mut out = [0u8; MASTER_CLOCK_LEN];
        let (mode, offset) = self.tsc.encode();
        put(&mut out, 0, MASTER_MAGIC);
        put(&mut out, 4, &VERSION.to_le_bytes());
        out[6] = mode;
        put(&mut out, 8, &self.boot_id.0);
        put(&mut out, 24, &self.reading.clock_ns.to_le_bytes());
        put(
            &mut out,
            32,
            &(self.reading.flags & KNOWN_CLOCK_FLAGS).to_le_bytes(),
        );
        put(&mut out, 36, &self.tsc_khz.to_le_bytes());
        put(&mut out, 40, &self.reading.realtime_ns.to_le_bytes());
        put(&mut out, 48, &self.reading.host_tsc.to_le_bytes());
        put(&mut out, 56, &offset.to_le_bytes());
        out
    }

    /// Decodes a START payload from `from`, refusing anything malformed.
    pub fn decode(from: NodeId, b: &[u8]) -> Result<Self, ClockError> {
        let bad = |why: String| ClockError::BadFrame {
            from,
            what: "START clock",
            why,
        };
        let mode = check_head(b, MASTER_MAGIC, MASTER_CLOCK_LEN).map_err(bad)?;
        let flags = check_flags(u32_at(b, 32)).map_err(bad)?;
        let tsc_khz = u32_at(b, 36);
        if tsc_khz == 0 {
            return Err(bad("a TSC frequency of 0 kHz".into()));
        }
        let tsc = MasterTsc::decode(mode, i64_at(b, 56)).map_err(bad)?;
        let mut boot_id = [0u8; 16];
        boot_id.copy_from_slice(&b[8..24]);
        Ok(Self {
            boot_id: BootId(boot_id),
            reading: ClockReading {
                clock_ns: u64_at(b, 24),
                flags,
                realtime_ns: u64_at(b, 40),
                host_tsc: u64_at(b, 48),
            },
            tsc_khz,
            tsc,
        })
    }
}

impl ClockReply {
    /// The reply payload.
    pub fn encode(&self) -> [u8; REPLY_LEN] {
        let mut out = [0u8; REPLY_LEN];
        let (mode, offset) = self.tsc.encode();
        put(&mut out, 0, REPLY_MAGIC);
        put(&mut out, 4, &VERSION.to_le_bytes());
        out[6] = mode;
        put(&mut out, 8, &self.seq.to_le_bytes());
        put(&mut out, 16, &self.reading.clock_ns.to_le_bytes());
        put(
            &mut out,
            24,
            &(self.reading.flags & KNOWN_CLOCK_FLAGS).to_le_bytes(),
        );
        put(&mut out, 32, &self.reading.realtime_ns.to_le_bytes());
        put(&mut out, 40, &self.reading.host_tsc.to_le_bytes());
        put(&mut out, 48, &offset.to_le_bytes());
        out
    }

    /// Decodes a reply from `from`, refusing anything malformed.
    pub fn decode(from: NodeId, b: &[u8]) -> Result<Self, ClockError> {
        let bad = |why: String| ClockError::BadFrame {
            from,
            what: "clock sample reply",
            why,
        };
        let mode = check_head(b, REPLY_MAGIC, REPLY_LEN).map_err(bad)?;
        let flags = check_flags(u32_at(b, 24)).map_err(bad)?;
        if u32_at(b, 28) != 0 {
            return Err(bad("reserved field is not 0".into()));
        }
        let tsc = MasterTsc::decode(mode, i64_at(b, 48)).map_err(bad)?;
        Ok(Self {
            seq: u64_at(b, 8),
            reading: ClockReading {
                clock_ns: u64_at(b, 16),
                flags,
                realtime_ns: u64_at(b, 32),
                host_tsc: u64_at(b, 40),
            },
            tsc,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{KVM_CLOCK_HOST_TSC, KVM_CLOCK_REALTIME, KVM_CLOCK_TSC_STABLE};

    fn master() -> MasterClock {
        MasterClock {
            boot_id: BootId::parse("7c5c600e-dd48-4777-960b-5018c5a14a37").unwrap(),
            reading: ClockReading {
                clock_ns: 0x0102_0304_0506_0708,
                flags: KVM_CLOCK_TSC_STABLE | KVM_CLOCK_REALTIME | KVM_CLOCK_HOST_TSC,
                realtime_ns: 1_700_000_000_123_456_789,
                host_tsc: 0xfedc_ba98_7654_3210,
            },
            tsc_khz: 2_995_200,
            tsc: MasterTsc::Offset(-123_456_789_012),
        }
    }

    fn reply() -> ClockReply {
        ClockReply {
            seq: 17,
            reading: master().reading,
            tsc: MasterTsc::Fixed,
        }
    }

    #[test]
    fn master_clock_round_trips() {
        let m = master();
        let bytes = m.encode();
        assert_eq!(&bytes[0..4], b"SVMC");
        assert_eq!(MasterClock::decode(0, &bytes).unwrap(), m);
        let fixed = MasterClock {
            tsc: MasterTsc::Fixed,
            ..m
        };
        assert_eq!(MasterClock::decode(0, &fixed.encode()).unwrap(), fixed);
    }

    #[test]
    fn the_layout_is_little_endian_at_fixed_offsets() {
        let bytes = master().encode();
        assert_eq!(&bytes[24..32], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(bytes[6], 1);
        assert_eq!(&bytes[36..40], &2_995_200u32.to_le_bytes());
        let r = reply().encode();
        assert_eq!(&r[8..16], &17u64.to_le_bytes());
        assert_eq!(r[6], 0);
    }

    #[test]
    fn reply_round_trips() {
        let r = reply();
        assert_eq!(ClockReply::decode(0, &r.encode()).unwrap(), r);
        let o = ClockReply {
            tsc: MasterTsc::Offset(42),
            ..r
        };
        assert_eq!(ClockReply::decode(0, &o.encode()).unwrap(), o);
    }

    fn refused(bytes: &[u8], needle: &str) {
        let e = MasterClock::decode(3, bytes).unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, ClockError::BadFrame { from: 3, .. }), "{e:?}");
        assert!(text.contains(needle), "`{needle}` not in: {text}");
        assert!(text.contains("node 3"), "{text}");
    }

    #[test]
    fn malformed_start_payloads_are_refused_with_the_reason() {
        let good = master().encode();
        refused(&[], "0 bytes instead of 64");
        refused(&good[..63], "63 bytes");
        let mut long = good.to_vec();
        long.push(0);
        refused(&long, "65 bytes");
        let mut b = good;
        b[0] = b'X';
        refused(&b, "magic");
        let mut b = good;
        b[4] = 2;
        refused(&b, "version 2");
        let mut b = good;
        b[6] = 7;
        refused(&b, "unknown TSC mode 7");
        let mut b = good;
        b[7] = 1;
        refused(&b, "reserved");
        let mut b = good;
        b[32] |= 0x80;
        refused(&b, "unknown clock flags 0x80");
        let mut b = good;
        b[36..40].copy_from_slice(&0u32.to_le_bytes());
        refused(&b, "0 kHz");
        let mut b = good;
        b[6] = 0; // fixed, but the offset is not 0
        refused(&b, "fixed TSC with offset");
    }

    #[test]
    fn malformed_replies_are_refused() {
        let good = reply().encode();
        let check = |bytes: &[u8], needle: &str| {
            let text = ClockReply::decode(1, bytes).unwrap_err().to_string();
            assert!(text.contains(needle), "`{needle}` not in: {text}");
            assert!(text.contains("clock sample reply"), "{text}");
        };
        check(&good[..10], "10 bytes instead of 56");
        check(&master().encode(), "64 bytes");
        let mut b = good;
        b[1] = 0;
        check(&b, "magic");
        let mut b = good;
        b[28] = 1;
        check(&b, "reserved");
        let mut b = good;
        b[26] = 1;
        check(&b, "unknown clock flags");
        // A START payload is not a reply, and the other way round.
        assert!(MasterClock::decode(0, &good).is_err());
    }

    #[test]
    fn unknown_local_flags_never_reach_the_wire() {
        let mut m = master();
        m.reading.flags |= 0x100;
        let back = MasterClock::decode(0, &m.encode()).unwrap();
        assert_eq!(back.reading.flags, m.reading.flags & KNOWN_CLOCK_FLAGS);
    }
}
