//! The records of the connection handshake and their encoding.
//!
//! Every record is `tag u8, len u32 (little-endian), len bytes of body`. Each tag has its own
//! length limit, checked before anything is allocated. This framing must never change between
//! versions, so that nodes of different versions can still refuse each other clearly.

use std::io::{self, Read, Write};

use crate::channel::NodeId;

/// First bytes of every hello.
pub(crate) const MAGIC: [u8; 6] = *b"SPANVM";
/// Version of the handshake and frame protocol; both ends must speak the same.
pub(crate) const PROTOCOL_VERSION: u16 = 1;
/// Length of a handshake nonce.
pub(crate) const NONCE_LEN: usize = 32;
/// Length of an HMAC-SHA256 proof and of a layout hash.
pub(crate) const DIGEST_LEN: usize = 32;
/// Longest canonical layout text the handshake carries.
pub(crate) const MAX_LAYOUT_TEXT: usize = 1 << 20;

/// magic, version u16, from u32, to u32, channel u8, nonce.
const HELLO_LEN: usize = MAGIC.len() + 2 + 4 + 4 + 1 + NONCE_LEN;
/// Longest hello read, so that a later version's longer hello can still be told apart.
const MAX_HELLO_LEN: usize = 256;
/// Longest refusal (code and message) read.
const MAX_REFUSAL_LEN: usize = 4096;
const RECORD_HEADER_LEN: usize = 5;

const TAG_HELLO: u8 = 1;
const TAG_PROOF: u8 = 2;
const TAG_LAYOUT_HASH: u8 = 3;
const TAG_LAYOUT_TEXT: u8 = 4;
const TAG_ACCEPTED: u8 = 5;
const TAG_REFUSED: u8 = 6;

/// The first record each end sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Hello {
    pub from: NodeId,
    pub to: NodeId,
    /// Wire value of the channel; checked by the handshake, not here.
    pub channel: u8,
    pub nonce: [u8; NONCE_LEN],
}

/// Why a node refuses a connection; tells the refused end which error to report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum RefusalCode {
    WrongSecret = 1,
    UnexpectedNode = 2,
    DuplicateConnection = 3,
    VersionMismatch = 4,
    Protocol = 5,
}

impl RefusalCode {
    fn from_u8(value: u8) -> RefusalCode {
        match value {
            1 => RefusalCode::WrongSecret,
            2 => RefusalCode::UnexpectedNode,
            3 => RefusalCode::DuplicateConnection,
            4 => RefusalCode::VersionMismatch,
            _ => RefusalCode::Protocol,
        }
    }
}

/// A refusal and the refusing node's explanation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub code: RefusalCode,
    pub message: String,
}

/// One handshake record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Record {
    Hello(Hello),
    /// A hello of another protocol version: only what every version has is decoded.
    ForeignHello {
        version: u16,
        from: Option<NodeId>,
    },
    Proof([u8; DIGEST_LEN]),
    LayoutHash([u8; DIGEST_LEN]),
    LayoutText(String),
    Accepted,
    Refused(Refusal),
}

/// Why a record could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WireError {
    /// The connection failed or timed out.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The bytes do not start with the spanvm hello.
    #[error("it is not a spanvm node (its hello does not start with the spanvm magic)")]
    NotSpanvm,
    /// A record type no version defines.
    #[error("it sent an unknown handshake record type {0}")]
    UnknownTag(u8),
    /// A record longer than its type allows.
    #[error("it sent a {name} record of {len} bytes, more than the {max} allowed")]
    TooLong {
        name: &'static str,
        len: usize,
        max: usize,
    },
    /// A record whose length does not fit its type.
    #[error("it sent a {name} record of {len} bytes, expected {expected}")]
    BadLength {
        name: &'static str,
        len: usize,
        expected: usize,
    },
    /// The layout text is not UTF-8.
    #[error("its layout text is not valid UTF-8")]
    NotUtf8,
}

impl Record {
    /// Name used in messages.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Record::Hello(_) | Record::ForeignHello { .. } => "hello",
            Record::Proof(_) => "proof",
            Record::LayoutHash(_) => "layout hash",
            Record::LayoutText(_) => "layout text",
            Record::Accepted => "accepted",
            Record::Refused(_) => "refused",
        }
    }

    fn encode_into(&self, out: &mut Vec<u8>) {
        let mut body = Vec::new();
        let tag = match self {
            Record::Hello(hello) => {
                body.extend_from_slice(&MAGIC);
                body.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
                body.extend_from_slice(&hello.from.to_le_bytes());
                body.extend_from_slice(&hello.to.to_le_bytes());
                body.push(hello.channel);
                body.extend_from_slice(&hello.nonce);
                TAG_HELLO
            }
            Record::ForeignHello { version, from } => {
                // Only tests send these, to play a node of another version.
                body.extend_from_slice(&MAGIC);
                body.extend_from_slice(&version.to_le_bytes());
                body.extend_from_slice(&from.unwrap_or(NodeId::MAX).to_le_bytes());
                TAG_HELLO
            }
            Record::Proof(proof) => {
                body.extend_from_slice(proof);
                TAG_PROOF
            }
            Record::LayoutHash(hash) => {
                body.extend_from_slice(hash);
                TAG_LAYOUT_HASH
            }
            Record::LayoutText(text) => {
                let end = floor_char_boundary(text, MAX_LAYOUT_TEXT);
                body.extend_from_slice(&text.as_bytes()[..end]);
                TAG_LAYOUT_TEXT
            }
            Record::Accepted => TAG_ACCEPTED,
            Record::Refused(refusal) => {
                body.push(refusal.code as u8);
                let end = floor_char_boundary(&refusal.message, MAX_REFUSAL_LEN - 1);
                body.extend_from_slice(&refusal.message.as_bytes()[..end]);
                TAG_REFUSED
            }
        };
        out.push(tag);
        // Bodies are bounded by the limits above, far below u32::MAX.
        let len =
            u32::try_from(body.len()).expect("handshake bodies are bounded far below u32::MAX");
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&body);
    }
}

/// Writes records with one `write_all`, so that a step of the handshake is one TCP segment.
pub(crate) fn write_records(w: &mut impl Write, records: &[Record]) -> io::Result<()> {
    let mut out = Vec::new();
    for record in records {
        record.encode_into(&mut out);
    }
    w.write_all(&out)
}

/// Reads one record, checking its length against its type before reading the body.
pub(crate) fn read_record(r: &mut impl Read) -> Result<Record, WireError> {
    let mut header = [0u8; RECORD_HEADER_LEN];
    r.read_exact(&mut header)?;
    let tag = header[0];
    let len = u32::from_le_bytes([header[1], header[2], header[3], header[4]]) as usize;
    let (name, max) = match tag {
        TAG_HELLO => ("hello", MAX_HELLO_LEN),
        TAG_PROOF => ("proof", DIGEST_LEN),
        TAG_LAYOUT_HASH => ("layout hash", DIGEST_LEN),
        TAG_LAYOUT_TEXT => ("layout text", MAX_LAYOUT_TEXT),
        TAG_ACCEPTED => ("accepted", 0),
        TAG_REFUSED => ("refused", MAX_REFUSAL_LEN),
        other => return Err(WireError::UnknownTag(other)),
    };
    if len > max {
        return Err(WireError::TooLong { name, len, max });
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    match tag {
        TAG_HELLO => parse_hello(&body),
        TAG_PROOF => Ok(Record::Proof(digest(name, &body)?)),
        TAG_LAYOUT_HASH => Ok(Record::LayoutHash(digest(name, &body)?)),
        TAG_LAYOUT_TEXT => String::from_utf8(body)
            .map(Record::LayoutText)
            .map_err(|_| WireError::NotUtf8),
        TAG_ACCEPTED => Ok(Record::Accepted),
        _ => {
            let Some((&code, message)) = body.split_first() else {
                return Err(WireError::BadLength {
                    name,
                    len,
                    expected: 1,
                });
            };
            Ok(Record::Refused(Refusal {
                code: RefusalCode::from_u8(code),
                message: String::from_utf8_lossy(message).into_owned(),
            }))
        }
    }
}

fn parse_hello(body: &[u8]) -> Result<Record, WireError> {
    if body.len() < MAGIC.len() + 2 || body[..MAGIC.len()] != MAGIC {
        return Err(WireError::NotSpanvm);
    }
    let field = |at: usize, len: usize| body.get(at..at + len);
    let version = u16::from_le_bytes([body[6], body[7]]);
    let from = field(8, 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    if version != PROTOCOL_VERSION {
        return Ok(Record::ForeignHello { version, from });
    }
    if body.len() != HELLO_LEN {
        return Err(WireError::BadLength {
            name: "hello",
            len: body.len(),
            expected: HELLO_LEN,
        });
    }
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&body[17..17 + NONCE_LEN]);
    Ok(Record::Hello(Hello {
        from: from.unwrap_or(NodeId::MAX),
        to: u32::from_le_bytes([body[12], body[13], body[14], body[15]]),
        channel: body[16],
        nonce,
    }))
}

fn digest(name: &'static str, body: &[u8]) -> Result<[u8; DIGEST_LEN], WireError> {
    body.try_into().map_err(|_| WireError::BadLength {
        name,
        len: body.len(),
        expected: DIGEST_LEN,
    })
}

/// Largest index `<= max` that is a char boundary of `text`.
fn floor_char_boundary(text: &str, max: usize) -> usize {
    if text.len() <= max {
        return text.len();
    }
    (0..=max)
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn round_trip(record: Record) {
        let mut bytes = Vec::new();
        write_records(&mut bytes, std::slice::from_ref(&record)).unwrap();
        assert_eq!(read_record(&mut bytes.as_slice()).unwrap(), record);
    }

    #[test]
    fn every_record_round_trips() {
        round_trip(Record::Hello(Hello {
            from: 3,
            to: 1,
            channel: 2,
            nonce: [9; NONCE_LEN],
        }));
        round_trip(Record::ForeignHello {
            version: 7,
            from: Some(4),
        });
        round_trip(Record::Proof([1; DIGEST_LEN]));
        round_trip(Record::LayoutHash([2; DIGEST_LEN]));
        round_trip(Record::LayoutText("vcpu 0 node 0\n".into()));
        round_trip(Record::Accepted);
        round_trip(Record::Refused(Refusal {
            code: RefusalCode::DuplicateConnection,
            message: "already have one".into(),
        }));
    }

    #[test]
    fn lengths_are_checked_before_the_body_is_read() {
        let mut bytes = vec![TAG_LAYOUT_TEXT];
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            read_record(&mut bytes.as_slice()),
            Err(WireError::TooLong {
                name: "layout text",
                ..
            })
        ));
        let mut bytes = vec![TAG_PROOF];
        bytes.extend_from_slice(&3u32.to_le_bytes());
        bytes.extend_from_slice(&[0; 3]);
        assert!(matches!(
            read_record(&mut bytes.as_slice()),
            Err(WireError::BadLength { name: "proof", .. })
        ));
    }

    #[test]
    fn a_foreign_greeting_is_not_spanvm() {
        let mut bytes = vec![TAG_HELLO];
        bytes.extend_from_slice(&10u32.to_le_bytes());
        bytes.extend_from_slice(b"GET / HTTP");
        assert!(matches!(
            read_record(&mut bytes.as_slice()),
            Err(WireError::NotSpanvm)
        ));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
            let mut input = bytes.as_slice();
            while read_record(&mut input).is_ok() {}
        }
    }
}
