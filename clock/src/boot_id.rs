//! The host's boot id: two nodes with the same one run on the same host (one TSC, one
//! `CLOCK_REALTIME`).

use std::fmt;

use crate::ClockError;

/// Where Linux publishes the boot id.
pub const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";

/// A host's boot id (a random UUID, new at every boot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BootId(pub [u8; 16]);

impl BootId {
    /// This host's boot id.
    pub fn read() -> Result<Self, ClockError> {
        let text = std::fs::read_to_string(BOOT_ID_PATH).map_err(|e| ClockError::BootId {
            path: BOOT_ID_PATH.into(),
            why: e.to_string(),
        })?;
        Self::parse(&text).ok_or_else(|| ClockError::BootId {
            path: BOOT_ID_PATH.into(),
            why: format!("`{}` is not a UUID", text.trim()),
        })
    }

    /// Parses `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` (surrounding whitespace allowed).
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        let groups: Vec<&str> = text.split('-').collect();
        let lengths: Vec<usize> = groups.iter().map(|g| g.len()).collect();
        if lengths != [8, 4, 4, 4, 12] {
            return None;
        }
        let hex: String = groups.concat();
        let mut out = [0u8; 16];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Self(out))
    }
}

impl fmt::Display for BootId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_a_uuid() {
        let text = "7c5c600e-dd48-4777-960b-5018c5a14a37\n";
        let id = BootId::parse(text).unwrap();
        assert_eq!(id.0[0], 0x7c);
        assert_eq!(id.0[15], 0x37);
        assert_eq!(id.to_string(), text.trim());
    }

    #[test]
    fn refuses_what_is_not_a_uuid() {
        for bad in [
            "",
            "7c5c600e-dd48-4777-960b",
            "7c5c600edd484777960b5018c5a14a37",
            "7c5c600e-dd48-4777-960b-5018c5a14a3g",
            "7c5c600é-dd48-4777-960b-5018c5a14a3",
        ] {
            assert_eq!(BootId::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn this_hosts_boot_id_reads() {
        let id = BootId::read().unwrap();
        assert_eq!(BootId::read().unwrap(), id);
    }
}
