//! The pool advert: sent once on every connection right after the handshake, it tells the
//! peer where it may RDMA WRITE (this end's staging pool and credit mailbox, with their key)
//! and how many receives this end has posted so far (the peer's first send credits).

use super::verbs::RemoteRange;

/// Encoded length.
pub(crate) const ADVERT_LEN: usize = 40;

/// What one end lets the other write, and its receive count when it said so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Advert {
    /// Start of the staging pool.
    pub staging: RemoteRange,
    /// Slots in the staging pool.
    pub staging_slots: u32,
    /// The two mailbox words: receives posted in total, staged payloads freed in total.
    pub mailbox: RemoteRange,
    /// Receives posted in total when the advert was sent.
    pub recvs_posted: u64,
}

/// Why an advert is refused (the peer is then treated as lost).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum AdvertError {
    /// The advert has the wrong length: the peer runs another version or misbehaves.
    #[error("its RDMA pool advert is {len} bytes, expected {ADVERT_LEN}; run the same spanvm build on every node")]
    Length {
        /// Bytes received.
        len: usize,
    },
    /// The advert has no staging slot.
    #[error("its RDMA pool advert has no staging slot")]
    NoSlots,
}

impl Advert {
    pub(crate) fn encode(&self) -> [u8; ADVERT_LEN] {
        let mut out = [0u8; ADVERT_LEN];
        out[0..8].copy_from_slice(&self.staging.addr.to_le_bytes());
        out[8..12].copy_from_slice(&self.staging.rkey.to_le_bytes());
        out[12..16].copy_from_slice(&self.staging_slots.to_le_bytes());
        out[16..24].copy_from_slice(&self.mailbox.addr.to_le_bytes());
        out[24..28].copy_from_slice(&self.mailbox.rkey.to_le_bytes());
        out[32..40].copy_from_slice(&self.recvs_posted.to_le_bytes());
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Advert, AdvertError> {
        let b: &[u8; ADVERT_LEN] = bytes
            .try_into()
            .map_err(|_| AdvertError::Length { len: bytes.len() })?;
        let u64_at = |at: usize| {
            let mut word = [0u8; 8];
            word.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(word)
        };
        let u32_at = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let advert = Advert {
            staging: RemoteRange {
                addr: u64_at(0),
                rkey: u32_at(8),
            },
            staging_slots: u32_at(12),
            mailbox: RemoteRange {
                addr: u64_at(16),
                rkey: u32_at(24),
            },
            recvs_posted: u64_at(32),
        };
        if advert.staging_slots == 0 {
            return Err(AdvertError::NoSlots);
        }
        Ok(advert)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_wrong_lengths() {
        let advert = Advert {
            staging: RemoteRange {
                addr: 0x7f00_0000_1000,
                rkey: 0x1234,
            },
            staging_slots: 32,
            mailbox: RemoteRange {
                addr: 0x7f00_0000_9000,
                rkey: 0x1234,
            },
            recvs_posted: 64,
        };
        assert_eq!(Advert::decode(&advert.encode()), Ok(advert));
        assert_eq!(
            Advert::decode(&[0; 12]),
            Err(AdvertError::Length { len: 12 })
        );
        let none = Advert {
            staging_slots: 0,
            ..advert
        };
        assert_eq!(Advert::decode(&none.encode()), Err(AdvertError::NoSlots));
    }
}
