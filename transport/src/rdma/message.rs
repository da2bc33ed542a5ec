//! How a frame travels in one SEND: the same 24-byte header as on TCP, an 8-byte RDMA trailer,
//! then either the payload itself (small payloads) or nothing, when the payload was written
//! with RDMA WRITE into a slot of the receiver's staging pool just before (page payloads).
//!
//! ```text
//! [frame header: 24][staging slot u32 LE, u32::MAX = inline][reserved u32 = 0][inline payload]
//! ```
//! The receiver checks the header ([`Frame::decode_header`]: no payload over [`MAX_PAYLOAD`])
//! and that the message length matches what the header announces before it uses anything.

use crate::frame::{Frame, FrameError, FrameHeader, FrameRef, HEADER_LEN, MAX_PAYLOAD};

/// Bytes after the frame header.
pub(crate) const TRAILER_LEN: usize = 8;
/// Largest payload sent inside the SEND itself; larger ones are staged.
pub(crate) const INLINE_MAX: usize = 256;
/// Size of every send and receive buffer.
pub(crate) const MESSAGE_LEN: usize = HEADER_LEN + TRAILER_LEN + INLINE_MAX;
/// Size of a staging slot: one whole payload of the largest size.
pub(crate) const STAGING_SLOT_LEN: usize = MAX_PAYLOAD.next_multiple_of(64);

const INLINE: u32 = u32::MAX;

/// A piece of the connection handshake's byte stream (RDMA only; never delivered).
pub(crate) const KIND_RDMA_HANDSHAKE: u16 = 0xFFFC;
/// Where the sender's staging pool and credit mailbox are (RDMA only; sent once, right after
/// the handshake, so that only an authenticated peer learns the keys).
pub(crate) const KIND_RDMA_POOL: u16 = 0xFFFD;

/// Where a received frame's payload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Payload {
    /// In the receive buffer, at this offset from its start.
    Inline { offset: usize },
    /// In this slot of the staging pool.
    Staged { slot: u32 },
}

/// A checked message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Decoded {
    pub header: FrameHeader,
    pub payload: Payload,
}

/// Why a received message is refused (the sender is then treated as lost) or why a frame
/// cannot be framed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum MessageError {
    /// The header is not valid.
    #[error("{0}")]
    Frame(#[from] FrameError),
    /// Fewer bytes arrived than a header and trailer need.
    #[error("an RDMA message of {len} bytes is shorter than the {min}-byte header and trailer")]
    Short {
        /// Bytes received.
        len: usize,
        /// Bytes needed.
        min: usize,
    },
    /// The message length does not match the payload the header announces.
    #[error("an RDMA message of {len} bytes announces {payload} payload bytes {how}")]
    LengthMismatch {
        /// Bytes received.
        len: usize,
        /// Announced payload length.
        payload: usize,
        /// Inline or staged.
        how: &'static str,
    },
    /// The message names a staging slot the receiver does not have.
    #[error("an RDMA message names staging slot {slot}, but there are only {slots}")]
    NoSuchSlot {
        /// The slot named.
        slot: u32,
        /// Slots the receiver has.
        slots: u32,
    },
    /// The payload is larger than any frame may carry.
    #[error("frame payload of {len} bytes exceeds the maximum of {MAX_PAYLOAD} bytes")]
    TooLarge {
        /// The payload length.
        len: usize,
    },
}

/// Whether a payload of this length goes inside the SEND.
pub(crate) fn is_inline(payload_len: usize) -> bool {
    payload_len <= INLINE_MAX
}

/// Frames `frame` into `buf`, its payload inline (`staged == None`) or announced as written
/// to staging slot `staged`; returns the message length.
pub(crate) fn encode(
    frame: FrameRef<'_>,
    staged: Option<u32>,
    buf: &mut [u8; MESSAGE_LEN],
) -> Result<usize, MessageError> {
    let len = frame.payload.len();
    if len > MAX_PAYLOAD {
        return Err(MessageError::TooLarge { len });
    }
    buf[..HEADER_LEN].copy_from_slice(&frame.header().encode());
    buf[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&staged.unwrap_or(INLINE).to_le_bytes());
    buf[HEADER_LEN + 4..HEADER_LEN + TRAILER_LEN].fill(0);
    let start = HEADER_LEN + TRAILER_LEN;
    match staged {
        Some(_) => Ok(start),
        None if is_inline(len) => {
            buf[start..start + len].copy_from_slice(frame.payload);
            Ok(start + len)
        }
        None => Err(MessageError::TooLarge { len }),
    }
}

/// Checks a received message of `bytes` (exactly what arrived) against a staging pool of
/// `staging_slots` slots.
pub(crate) fn decode(bytes: &[u8], staging_slots: u32) -> Result<Decoded, MessageError> {
    let min = HEADER_LEN + TRAILER_LEN;
    let (Some(header_bytes), Some(trailer)) = (
        bytes.first_chunk::<HEADER_LEN>(),
        bytes.get(HEADER_LEN..min),
    ) else {
        return Err(MessageError::Short {
            len: bytes.len(),
            min,
        });
    };
    let header = Frame::decode_header(header_bytes)?;
    let slot = u32::from_le_bytes([trailer[0], trailer[1], trailer[2], trailer[3]]);
    let payload = header.payload_len();
    if slot == INLINE {
        if bytes.len() != min + payload {
            return Err(MessageError::LengthMismatch {
                len: bytes.len(),
                payload,
                how: "inline",
            });
        }
        return Ok(Decoded {
            header,
            payload: Payload::Inline { offset: min },
        });
    }
    if bytes.len() != min {
        return Err(MessageError::LengthMismatch {
            len: bytes.len(),
            payload,
            how: "in a staging slot",
        });
    }
    if slot >= staging_slots {
        return Err(MessageError::NoSuchSlot {
            slot,
            slots: staging_slots,
        });
    }
    Ok(Decoded {
        header,
        payload: Payload::Staged { slot },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(payload: &[u8]) -> FrameRef<'_> {
        FrameRef {
            kind: 7,
            flags: 1,
            id: 0x1122_3344_5566_7788,
            arg: 9,
            payload,
        }
    }

    #[test]
    fn small_payloads_travel_inline_with_the_tcp_header() {
        let mut buf = [0u8; MESSAGE_LEN];
        let len = encode(frame(b"hello"), None, &mut buf).unwrap();
        assert_eq!(len, HEADER_LEN + TRAILER_LEN + 5);
        assert_eq!(&buf[..HEADER_LEN], &frame(b"hello").header().encode());
        let decoded = decode(&buf[..len], 4).unwrap();
        assert_eq!(decoded.header, frame(b"hello").header());
        let Payload::Inline { offset } = decoded.payload else {
            panic!("expected an inline payload, got {decoded:?}");
        };
        assert_eq!(&buf[offset..len], b"hello");
    }

    #[test]
    fn pages_are_announced_by_slot() {
        let page = vec![3u8; 4096];
        assert!(!is_inline(page.len()));
        let mut buf = [0u8; MESSAGE_LEN];
        let len = encode(frame(&page), Some(2), &mut buf).unwrap();
        assert_eq!(len, HEADER_LEN + TRAILER_LEN);
        let decoded = decode(&buf[..len], 4).unwrap();
        assert_eq!(decoded.payload, Payload::Staged { slot: 2 });
        assert_eq!(decoded.header.payload_len(), 4096);
        assert_eq!(
            decode(&buf[..len], 2),
            Err(MessageError::NoSuchSlot { slot: 2, slots: 2 })
        );
    }

    #[test]
    fn oversize_and_inconsistent_messages_are_refused() {
        let mut buf = [0u8; MESSAGE_LEN];
        let too_big = vec![0u8; MAX_PAYLOAD + 1];
        assert_eq!(
            encode(frame(&too_big), Some(0), &mut buf),
            Err(MessageError::TooLarge {
                len: MAX_PAYLOAD + 1
            })
        );
        assert_eq!(
            encode(frame(&[0u8; INLINE_MAX + 1]), None, &mut buf),
            Err(MessageError::TooLarge {
                len: INLINE_MAX + 1
            })
        );
        // A header announcing more than MAX_PAYLOAD is refused before anything else.
        let mut header = frame(&[]).header();
        header.payload_len = u32::try_from(MAX_PAYLOAD + 1).unwrap();
        buf[..HEADER_LEN].copy_from_slice(&header.encode());
        buf[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&0u32.to_le_bytes());
        assert!(matches!(
            decode(&buf[..HEADER_LEN + TRAILER_LEN], 4),
            Err(MessageError::Frame(FrameError::PayloadTooLong { .. }))
        ));
        // An inline message shorter than its header says.
        let len = encode(frame(b"abcdef"), None, &mut buf).unwrap();
        assert!(matches!(
            decode(&buf[..len - 1], 4),
            Err(MessageError::LengthMismatch { how: "inline", .. })
        ));
        assert!(matches!(
            decode(&buf[..10], 4),
            Err(MessageError::Short { len: 10, .. })
        ));
    }
}
