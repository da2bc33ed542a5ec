//! The frame: the unit carried on every connection once the handshake is done.
//!
//! Wire format, little-endian: `kind u16, flags u16, payload_len u32, id u64, arg u64`
//! (24 bytes), then `payload_len` raw bytes. No general-purpose serialisation: a page travels
//! as its 4096 bytes.

/// Size of the fixed frame header in bytes.
pub const HEADER_LEN: usize = 24;

/// Largest payload a frame may carry: one page plus room for a small descriptor.
pub const MAX_PAYLOAD: usize = 4096 + 256;

/// Frame kinds from this value up belong to the transport itself (heartbeats, the mesh-ready
/// barrier). [`crate::Transport::send`] refuses them and receivers never deliver them.
pub const FIRST_RESERVED_KIND: u16 = 0xFF00;

/// Heartbeat on the control channel; consumed by the transport.
pub(crate) const KIND_HEARTBEAT: u16 = 0xFFFF;

/// "All my connections are up"; sent once on the control channel during setup.
pub(crate) const KIND_MESH_READY: u16 = 0xFFFE;

/// A frame whose payload is owned; what receivers deliver.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Frame {
    /// Message type, defined by the consumer (below [`FIRST_RESERVED_KIND`]).
    pub kind: u16,
    /// Consumer-defined flags.
    pub flags: u16,
    /// Request id, page number or similar, defined by the consumer.
    pub id: u64,
    /// Second consumer-defined argument.
    pub arg: u64,
    /// Raw payload, at most [`MAX_PAYLOAD`] bytes.
    pub payload: Vec<u8>,
}

/// A frame whose payload is borrowed, so that a page can be sent without copying it into a
/// `Vec` first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameRef<'a> {
    /// See [`Frame::kind`].
    pub kind: u16,
    /// See [`Frame::flags`].
    pub flags: u16,
    /// See [`Frame::id`].
    pub id: u64,
    /// See [`Frame::arg`].
    pub arg: u64,
    /// See [`Frame::payload`].
    pub payload: &'a [u8],
}

/// The decoded fixed header of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// See [`Frame::kind`].
    pub kind: u16,
    /// See [`Frame::flags`].
    pub flags: u16,
    /// Number of payload bytes that follow the header; at most [`MAX_PAYLOAD`] once decoded.
    pub payload_len: u32,
    /// See [`Frame::id`].
    pub id: u64,
    /// See [`Frame::arg`].
    pub arg: u64,
}

/// Why bytes are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The header announces more payload than any frame may carry: the sender is broken or
    /// hostile.
    #[error("frame payload length {len} exceeds the maximum of {MAX_PAYLOAD} bytes")]
    PayloadTooLong {
        /// The announced payload length.
        len: u64,
    },
    /// The bytes end before the header or the announced payload does.
    #[error("frame truncated: {needed} bytes needed, only {available} available")]
    Truncated {
        /// Bytes the frame needs (header, or header plus payload).
        needed: usize,
        /// Bytes that were given.
        available: usize,
    },
}

impl FrameHeader {
    /// The 24 header bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..2].copy_from_slice(&self.kind.to_le_bytes());
        out[2..4].copy_from_slice(&self.flags.to_le_bytes());
        out[4..8].copy_from_slice(&self.payload_len.to_le_bytes());
        out[8..16].copy_from_slice(&self.id.to_le_bytes());
        out[16..24].copy_from_slice(&self.arg.to_le_bytes());
        out
    }

    /// Payload length as a `usize`.
    pub fn payload_len(&self) -> usize {
        self.payload_len as usize
    }
}

impl Frame {
    /// A borrowed view of this frame.
    pub fn view(&self) -> FrameRef<'_> {
        FrameRef {
            kind: self.kind,
            flags: self.flags,
            id: self.id,
            arg: self.arg,
            payload: &self.payload,
        }
    }

    /// Appends the encoded frame (header and payload) to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        self.view().encode_into(out);
    }

    /// Decodes and checks a header. A payload length over [`MAX_PAYLOAD`] is an error: the peer
    /// misbehaves and nothing it announces may be allocated.
    pub fn decode_header(bytes: &[u8; HEADER_LEN]) -> Result<FrameHeader, FrameError> {
        let header = FrameHeader {
            kind: u16::from_le_bytes([bytes[0], bytes[1]]),
            flags: u16::from_le_bytes([bytes[2], bytes[3]]),
            payload_len: u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]),
            id: u64::from_le_bytes([
                bytes[8], bytes[9], bytes[10], bytes[11], bytes[12], bytes[13], bytes[14],
                bytes[15],
            ]),
            arg: u64::from_le_bytes([
                bytes[16], bytes[17], bytes[18], bytes[19], bytes[20], bytes[21], bytes[22],
                bytes[23],
            ]),
        };
        if header.payload_len() > MAX_PAYLOAD {
            return Err(FrameError::PayloadTooLong {
                len: u64::from(header.payload_len),
            });
        }
        Ok(header)
    }

    /// Decodes one whole frame from the start of `bytes`; returns it and how many bytes it took.
    pub fn decode(bytes: &[u8]) -> Result<(Frame, usize), FrameError> {
        let Some(header_bytes) = bytes.first_chunk::<HEADER_LEN>() else {
            return Err(FrameError::Truncated {
                needed: HEADER_LEN,
                available: bytes.len(),
            });
        };
        let header = Self::decode_header(header_bytes)?;
        let total = HEADER_LEN + header.payload_len();
        let Some(payload) = bytes.get(HEADER_LEN..total) else {
            return Err(FrameError::Truncated {
                needed: total,
                available: bytes.len(),
            });
        };
        Ok((Self::from_header(header, payload.to_vec()), total))
    }

    /// Number of bytes [`Frame::encode_into`] appends.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.payload.len()
    }

    pub(crate) fn from_header(header: FrameHeader, payload: Vec<u8>) -> Frame {
        Frame {
            kind: header.kind,
            flags: header.flags,
            id: header.id,
            arg: header.arg,
            payload,
        }
    }
}

impl FrameRef<'_> {
    /// The header of this frame. A payload longer than `u32::MAX` saturates; such a frame is
    /// over [`MAX_PAYLOAD`] anyway and every decoder rejects it.
    pub fn header(&self) -> FrameHeader {
        FrameHeader {
            kind: self.kind,
            flags: self.flags,
            payload_len: u32::try_from(self.payload.len()).unwrap_or(u32::MAX),
            id: self.id,
            arg: self.arg,
        }
    }

    /// Appends the encoded frame to `out`. Does not check the payload length:
    /// [`crate::Transport::send`] does, before anything is written.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.reserve(HEADER_LEN + self.payload.len());
        out.extend_from_slice(&self.header().encode());
        out.extend_from_slice(self.payload);
    }

    /// An owned copy.
    pub fn to_frame(&self) -> Frame {
        Frame::from_header(self.header(), self.payload.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_layout_is_little_endian_in_field_order() {
        let frame = Frame {
            kind: 0x0102,
            flags: 0x0304,
            id: 0x1112_1314_1516_1718,
            arg: 0x2122_2324_2526_2728,
            payload: vec![0xAA, 0xBB, 0xCC],
        };
        let mut bytes = Vec::new();
        frame.encode_into(&mut bytes);
        assert_eq!(
            bytes,
            [
                0x02, 0x01, 0x04, 0x03, 3, 0, 0, 0, 0x18, 0x17, 0x16, 0x15, 0x14, 0x13, 0x12, 0x11,
                0x28, 0x27, 0x26, 0x25, 0x24, 0x23, 0x22, 0x21, 0xAA, 0xBB, 0xCC
            ]
        );
        assert_eq!(Frame::decode(&bytes), Ok((frame, 27)));
    }

    #[test]
    fn payload_of_exactly_max_is_accepted_and_one_more_is_refused() {
        let mut header = FrameHeader {
            kind: 1,
            flags: 0,
            payload_len: u32::try_from(MAX_PAYLOAD).unwrap(),
            id: 0,
            arg: 0,
        };
        assert_eq!(Frame::decode_header(&header.encode()), Ok(header));
        header.payload_len += 1;
        assert_eq!(
            Frame::decode_header(&header.encode()),
            Err(FrameError::PayloadTooLong {
                len: MAX_PAYLOAD as u64 + 1
            })
        );
    }

    #[test]
    fn truncated_input_names_what_is_missing() {
        assert_eq!(
            Frame::decode(&[0; 10]),
            Err(FrameError::Truncated {
                needed: HEADER_LEN,
                available: 10
            })
        );
        let frame = Frame {
            payload: vec![7; 100],
            ..Frame::default()
        };
        let mut bytes = Vec::new();
        frame.encode_into(&mut bytes);
        assert_eq!(
            Frame::decode(&bytes[..50]),
            Err(FrameError::Truncated {
                needed: HEADER_LEN + 100,
                available: 50
            })
        );
    }
}
