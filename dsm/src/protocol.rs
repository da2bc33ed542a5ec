//! The DSM messages and their wire frames.
//!
//! A frame is `(kind: u16, flags: u16, id: u64, arg: u64, payload)`. `arg` is the guest-physical
//! address of the page (page-aligned), `id` the request the message belongs to: the requester's
//! node id in the top 8 bits and its sequence number in the low 56. The payload is the page's
//! bytes (a data grant, page data), then, when the flags say so, an 8-byte set of the sharers
//! that will acknowledge an invalidation (a write's fetch or grant); nothing else. Decoding checks
//! every field against the layout ([`WireLimits`]) and rejects anything else with a
//! [`ProtocolError`]; nothing a peer sends can make it panic.
//!
//! Which connection a message should travel on is [`DsmMessage::is_bulk`]: only messages that
//! carry page bytes are bulk; everything else is small and latency-critical. The protocol's
//! correctness does not depend on ordering between the two classes (the requester collects the
//! parts of a reply in any order; see `README.md`).

use std::borrow::Cow;
use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};

use thiserror::Error;

use crate::{NodeId, NodeSet, PAGE_SHIFT, PAGE_SIZE};

/// The frame kind of [`DsmMessage::Request`].
pub const KIND_REQUEST: u16 = 1;
/// The frame kind of [`DsmMessage::Fetch`].
pub const KIND_FETCH: u16 = 2;
/// The frame kind of [`DsmMessage::Invalidate`].
pub const KIND_INVALIDATE: u16 = 3;
/// The frame kind of [`DsmMessage::InvalidateAck`].
pub const KIND_INVALIDATE_ACK: u16 = 4;
/// The frame kind of [`DsmMessage::Grant`].
pub const KIND_GRANT: u16 = 5;
/// The frame kind of [`DsmMessage::Confirm`].
pub const KIND_CONFIRM: u16 = 6;
/// The frame kind of [`DsmMessage::PageData`].
pub const KIND_PAGE_DATA: u16 = 7;

const FLAG_WRITE: u16 = 1 << 0;
const DATA_SHIFT: u16 = 1;
const DATA_MASK: u16 = 0b11 << DATA_SHIFT;
const DATA_ZERO: u16 = 0;
const DATA_KEEP: u16 = 1;
const DATA_BYTES: u16 = 2;
const DATA_SOURCE: u16 = 3;
/// The payload ends with the sharer set (little-endian `u64`, bit `n` for node `n`). Absent
/// means the set is empty, so that every message has exactly one frame.
const FLAG_SHARERS: u16 = 1 << 3;
const SOURCE_SHIFT: u16 = 8;
const SOURCE_MASK: u16 = 0xff << SOURCE_SHIFT;
const SHARERS_LEN: usize = 8;

/// The access a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    /// A readable copy (Shared or better).
    Read,
    /// The only, writable copy (Modified).
    Write,
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Access::Read => "read",
            Access::Write => "write",
        })
    }
}

/// A request of one node for one page; every message that serves it carries its id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RequestId {
    /// The requesting node.
    pub node: NodeId,
    /// The requester's sequence number (56 bits on the wire).
    pub seq: u64,
}

impl RequestId {
    /// Bits of the sequence number on the wire.
    pub const SEQ_BITS: u32 = 56;
    const SEQ_MASK: u64 = (1 << Self::SEQ_BITS) - 1;

    /// The wire form: node in the top 8 bits, sequence in the low 56.
    pub fn to_wire(self) -> u64 {
        (u64::from(self.node) << Self::SEQ_BITS) | (self.seq & Self::SEQ_MASK)
    }

    fn from_wire(wire: u64, limits: &WireLimits) -> Result<RequestId, ProtocolError> {
        let node = NodeId::try_from(wire >> Self::SEQ_BITS)
            .expect("a u64 shifted right by SEQ_BITS keeps 8 bits");
        limits.check_node(node)?;
        Ok(RequestId {
            node,
            seq: wire & Self::SEQ_MASK,
        })
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.node, self.seq)
    }
}

/// Makes a node's request ids: a keyed permutation of a counter, so that ids never repeat within
/// a run yet a peer cannot predict them from the ids it has seen.
///
/// Replies are matched to a request by its id, so a peer that could guess the id of a request it
/// takes no part in could answer it in the requester's place before the real answer arrives. The
/// permutation is a four-round Feistel network over the 56 sequence bits whose round function is
/// the standard library's keyed hasher (SipHash with keys drawn from the operating system's
/// randomness, fresh in every process): without the keys, seeing ids does not tell the next one.
#[derive(Clone)]
pub struct RequestIds {
    keys: RandomState,
}

impl RequestIds {
    const HALF_BITS: u32 = RequestId::SEQ_BITS / 2;
    const HALF_MASK: u64 = (1 << Self::HALF_BITS) - 1;
    const ROUNDS: u64 = 4;

    /// Ids under fresh random keys.
    pub fn new() -> RequestIds {
        RequestIds {
            keys: RandomState::new(),
        }
    }

    /// The id of request number `counter` (below 2^56) of `node`; distinct counters give
    /// distinct ids.
    pub fn id(&self, node: NodeId, counter: u64) -> RequestId {
        let counter = counter & RequestId::SEQ_MASK;
        let mut left = counter >> Self::HALF_BITS;
        let mut right = counter & Self::HALF_MASK;
        for round in 0..Self::ROUNDS {
            let mut hasher = self.keys.build_hasher();
            hasher.write_u64((round << Self::HALF_BITS) | right);
            let mixed = left ^ (hasher.finish() & Self::HALF_MASK);
            left = right;
            right = mixed;
        }
        RequestId {
            node,
            seq: (left << Self::HALF_BITS) | right,
        }
    }
}

impl Default for RequestIds {
    fn default() -> RequestIds {
        RequestIds::new()
    }
}

impl fmt::Debug for RequestIds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The keys are the secret: never in a log.
        f.write_str("RequestIds(..)")
    }
}

/// One page of guest memory, boxed so that it moves without copying.
pub type PageBuf = Box<[u8; PAGE_SIZE]>;

/// A zero-filled page buffer.
pub fn new_page_buf() -> PageBuf {
    Box::new([0u8; PAGE_SIZE])
}

/// What a grant gives the requester to install.
#[derive(Clone, PartialEq, Eq)]
pub enum GrantData {
    /// The page was never written: install zeros (no bytes travel).
    Zero,
    /// The requester's own copy is valid (an upgrade Shared -> Modified): keep it.
    Keep,
    /// The page's current content (the home holds a copy and sends it with the grant).
    Bytes(PageBuf),
    /// The page's content comes from this node (never the home nor the requester) in a
    /// [`DsmMessage::PageData`]; page data from any other node is refused.
    Source(NodeId),
}

impl fmt::Debug for GrantData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GrantData::Zero => f.write_str("Zero"),
            GrantData::Keep => f.write_str("Keep"),
            GrantData::Bytes(_) => f.write_str("Bytes(4096)"),
            GrantData::Source(node) => write!(f, "Source({node})"),
        }
    }
}

/// A DSM message between two nodes (or a node and itself).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DsmMessage {
    /// Requester -> home: "I need `page` for `access`". The requester is `id.node`.
    Request {
        /// The page number.
        page: u64,
        /// The request.
        id: RequestId,
        /// What the requester needs.
        access: Access,
    },
    /// Home -> the node whose copy will be the data source: "send your copy to `id.node`".
    /// For a read, downgrade Modified to Shared first; for a write, also drop the copy. A source
    /// other than the home sends [`DsmMessage::PageData`] (the home grants separately); the home
    /// as its own source sends the grant with the bytes, naming `sharers`.
    Fetch {
        /// The page number.
        page: u64,
        /// The request being served.
        id: RequestId,
        /// The access being granted.
        access: Access,
        /// For the home's own fetch: the sharers its grant names. Empty for any other source.
        sharers: NodeSet,
    },
    /// Home -> a sharer: "drop your copy and acknowledge to `id.node`".
    Invalidate {
        /// The page number.
        page: u64,
        /// The request being served.
        id: RequestId,
    },
    /// Sharer -> requester: "my copy is gone".
    InvalidateAck {
        /// The page number.
        page: u64,
        /// The request being served.
        id: RequestId,
    },
    /// Home -> requester, and only the home: the access is granted once every node of `sharers`
    /// has acknowledged and, for [`GrantData::Source`], the page data has arrived from that node.
    /// It is the requester's only word on who may answer the request.
    Grant {
        /// The page number.
        page: u64,
        /// The request being served.
        id: RequestId,
        /// The access granted (always the one requested).
        access: Access,
        /// The nodes that will acknowledge an invalidation, each exactly once (never the
        /// requester, never the data source; empty for a read).
        sharers: NodeSet,
        /// What to install, or who sends it.
        data: GrantData,
    },
    /// Data source (not the home) -> requester: the page's content, as the home's grant names.
    PageData {
        /// The page number.
        page: u64,
        /// The request being served.
        id: RequestId,
        /// The page's content.
        data: PageBuf,
    },
    /// Requester -> home: "installed"; the home may serve the next request for the page.
    Confirm {
        /// The page number.
        page: u64,
        /// The request that completed.
        id: RequestId,
    },
}

/// A message and the node it goes to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    /// Destination node (may be the sender itself).
    pub to: NodeId,
    /// The message.
    pub msg: DsmMessage,
}

/// The layout facts a frame is checked against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WireLimits {
    /// Pages of guest-physical address space covered by the DSM.
    pub page_count: u64,
    /// Nodes in the cluster.
    pub node_count: NodeId,
}

impl WireLimits {
    fn check_node(&self, node: NodeId) -> Result<(), ProtocolError> {
        if node < self.node_count {
            Ok(())
        } else {
            Err(ProtocolError::NodeOutOfRange {
                node,
                node_count: self.node_count,
            })
        }
    }

    fn page_of(&self, gpa: u64) -> Result<u64, ProtocolError> {
        if gpa & (PAGE_SIZE as u64 - 1) != 0 {
            return Err(ProtocolError::UnalignedAddress { gpa });
        }
        let page = gpa >> PAGE_SHIFT;
        if page >= self.page_count {
            return Err(ProtocolError::AddressOutOfRange {
                gpa,
                page_count: self.page_count,
            });
        }
        Ok(page)
    }
}

/// Errors of decoding or validating a DSM frame.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProtocolError {
    /// The frame kind is none of the DSM message kinds.
    #[error("unknown DSM frame kind {kind}: the peer runs an incompatible spanvm")]
    UnknownKind {
        /// The kind received.
        kind: u16,
    },
    /// Flag bits that the kind does not use, or a combination it forbids, are set.
    #[error("DSM frame of kind {kind} has invalid flags {flags:#06x}")]
    BadFlags {
        /// The kind received.
        kind: u16,
        /// The flags received.
        flags: u16,
    },
    /// The payload is not what the kind and flags require (page bytes, sharer set, nothing).
    #[error("DSM frame of kind {kind} has a {len}-byte payload, expected {expected}")]
    BadPayloadLength {
        /// The kind received.
        kind: u16,
        /// Payload bytes received.
        len: usize,
        /// Payload bytes the kind and flags require.
        expected: usize,
    },
    /// The page address is not page-aligned.
    #[error("DSM frame names guest address {gpa:#x}, which is not page-aligned")]
    UnalignedAddress {
        /// The address received.
        gpa: u64,
    },
    /// The page address is beyond guest memory.
    #[error(
        "DSM frame names guest address {gpa:#x}, beyond the {page_count} pages of guest memory"
    )]
    AddressOutOfRange {
        /// The address received.
        gpa: u64,
        /// Pages of guest memory in the layout.
        page_count: u64,
    },
    /// A node id is not in the cluster.
    #[error("DSM frame names node {node}, but the cluster has {node_count} nodes")]
    NodeOutOfRange {
        /// The node id received.
        node: NodeId,
        /// Nodes in the layout.
        node_count: NodeId,
    },
    /// A node is named in a role the protocol never gives it (the requester as a sharer or as
    /// its own data source, the data source also as a sharer, the home as a remote source).
    #[error("DSM frame for page {page:#x}, request {id}, names node {node} as {role}, which it can never be: the sender is broken or hostile")]
    ImpossibleRole {
        /// The page.
        page: u64,
        /// The request.
        id: RequestId,
        /// The node named.
        node: NodeId,
        /// The role it was named in.
        role: &'static str,
    },
    /// A byte frame is shorter than its header.
    #[error(
        "DSM frame of {len} bytes is shorter than the {} byte header",
        Frame::HEADER_LEN
    )]
    Truncated {
        /// Bytes received.
        len: usize,
    },
    /// A byte frame's declared payload length differs from the bytes that follow the header.
    #[error("DSM frame declares a {declared}-byte payload but carries {actual}")]
    LengthMismatch {
        /// The declared length.
        declared: u64,
        /// The bytes present.
        actual: usize,
    },
    /// The message came from a node that has no business sending it.
    #[error("DSM {what} for page {page:#x} came from node {from}, expected node {expected}")]
    WrongSender {
        /// Which message.
        what: &'static str,
        /// The page it names.
        page: u64,
        /// The node it came from.
        from: NodeId,
        /// The node that may send it.
        expected: NodeId,
    },
    /// The message is addressed to a role this node does not have for the page.
    #[error("DSM {what} for page {page:#x} reached node {me}, which is not {role}")]
    WrongReceiver {
        /// Which message.
        what: &'static str,
        /// The page it names.
        page: u64,
        /// This node.
        me: NodeId,
        /// The role the message needs ("its home", "the requester", ...).
        role: &'static str,
    },
}

/// A DSM frame in its field form (the transport carries these fields in its own header).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Message kind (`KIND_*`).
    pub kind: u16,
    /// Kind-specific flags: access, grant data, data source, whether a sharer set follows.
    pub flags: u16,
    /// The request id in wire form ([`RequestId::to_wire`]).
    pub id: u64,
    /// The guest-physical address of the page.
    pub arg: u64,
    /// Empty, one page, an 8-byte sharer set, or one page then a sharer set.
    pub payload: Vec<u8>,
}

/// A received DSM frame whose payload is lent by the transport's receive buffer: decoding
/// copies the page bytes once, into the [`PageBuf`] the message keeps, and nothing else.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameView<'a> {
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

impl Frame {
    /// The frame with its payload borrowed.
    pub fn view(&self) -> FrameView<'_> {
        FrameView {
            kind: self.kind,
            flags: self.flags,
            id: self.id,
            arg: self.arg,
            payload: &self.payload,
        }
    }

    /// Bytes of the little-endian header of [`Frame::encode_into`]:
    /// kind u16, flags u16, payload length u32, id u64, arg u64.
    pub const HEADER_LEN: usize = 24;

    /// Appends the frame as bytes (header, then payload).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.reserve(Self::HEADER_LEN + self.payload.len());
        out.extend_from_slice(&self.kind.to_le_bytes());
        out.extend_from_slice(&self.flags.to_le_bytes());
        // Payloads are at most a page and a sharer set, so the length fits.
        let len = u32::try_from(self.payload.len())
            .expect("payloads are at most a page and a sharer set");
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&self.id.to_le_bytes());
        out.extend_from_slice(&self.arg.to_le_bytes());
        out.extend_from_slice(&self.payload);
    }

    /// Parses bytes written by [`Frame::encode_into`] (fields only; see
    /// [`DsmMessage::from_frame`] for validation).
    pub fn parse(bytes: &[u8]) -> Result<Frame, ProtocolError> {
        let header: &[u8; Self::HEADER_LEN] = bytes
            .get(..Self::HEADER_LEN)
            .and_then(|h| h.try_into().ok())
            .ok_or(ProtocolError::Truncated { len: bytes.len() })?;
        let u16_at = |i: usize| u16::from_le_bytes([header[i], header[i + 1]]);
        let u32_at =
            |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&header[i..i + 8]);
            u64::from_le_bytes(b)
        };
        let declared = u64::from(u32_at(4));
        let payload = &bytes[Self::HEADER_LEN..];
        if declared != payload.len() as u64 {
            return Err(ProtocolError::LengthMismatch {
                declared,
                actual: payload.len(),
            });
        }
        Ok(Frame {
            kind: u16_at(0),
            flags: u16_at(2),
            id: u64_at(8),
            arg: u64_at(16),
            payload: payload.to_vec(),
        })
    }
}

impl DsmMessage {
    /// The page the message is about.
    pub fn page(&self) -> u64 {
        match self {
            DsmMessage::Request { page, .. }
            | DsmMessage::Fetch { page, .. }
            | DsmMessage::Invalidate { page, .. }
            | DsmMessage::InvalidateAck { page, .. }
            | DsmMessage::Grant { page, .. }
            | DsmMessage::PageData { page, .. }
            | DsmMessage::Confirm { page, .. } => *page,
        }
    }

    /// The request the message belongs to.
    pub fn id(&self) -> RequestId {
        match self {
            DsmMessage::Request { id, .. }
            | DsmMessage::Fetch { id, .. }
            | DsmMessage::Invalidate { id, .. }
            | DsmMessage::InvalidateAck { id, .. }
            | DsmMessage::Grant { id, .. }
            | DsmMessage::PageData { id, .. }
            | DsmMessage::Confirm { id, .. } => *id,
        }
    }

    /// A short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            DsmMessage::Request { .. } => "request",
            DsmMessage::Fetch { .. } => "fetch",
            DsmMessage::Invalidate { .. } => "invalidate",
            DsmMessage::InvalidateAck { .. } => "invalidate-ack",
            DsmMessage::Grant { .. } => "grant",
            DsmMessage::PageData { .. } => "page data",
            DsmMessage::Confirm { .. } => "confirm",
        }
    }

    /// Whether the message carries page bytes and belongs on the bulk connection; all others are
    /// small and latency-critical (the request connection).
    pub fn is_bulk(&self) -> bool {
        self.page_bytes().is_some()
    }

    /// Whether the home's directory handles the message (the others go to the node's pages).
    pub fn is_for_home(&self) -> bool {
        matches!(
            self,
            DsmMessage::Request { .. } | DsmMessage::Confirm { .. }
        )
    }

    fn page_bytes(&self) -> Option<&PageBuf> {
        match self {
            DsmMessage::Grant {
                data: GrantData::Bytes(bytes),
                ..
            }
            | DsmMessage::PageData { data: bytes, .. } => Some(bytes),
            _ => None,
        }
    }

    fn sharers(&self) -> NodeSet {
        match self {
            DsmMessage::Fetch { sharers, .. } | DsmMessage::Grant { sharers, .. } => *sharers,
            _ => NodeSet::EMPTY,
        }
    }

    /// The frame payload: page bytes, then the sharer set if there is one. Borrowed (no copy of
    /// the page) unless a set follows the page.
    pub fn payload(&self) -> Cow<'_, [u8]> {
        let bytes = self.page_bytes().map_or(&[][..], |b| &b[..]);
        let sharers = self.sharers();
        if sharers.is_empty() {
            return Cow::Borrowed(bytes);
        }
        let mut payload = Vec::with_capacity(bytes.len() + SHARERS_LEN);
        payload.extend_from_slice(bytes);
        payload.extend_from_slice(&sharers.bits().to_le_bytes());
        Cow::Owned(payload)
    }

    /// Page bytes the message carries: a page or nothing (what the statistics count).
    pub fn page_len(&self) -> usize {
        self.page_bytes().map_or(0, |_| PAGE_SIZE)
    }

    /// The frame kind.
    pub fn kind(&self) -> u16 {
        match self {
            DsmMessage::Request { .. } => KIND_REQUEST,
            DsmMessage::Fetch { .. } => KIND_FETCH,
            DsmMessage::Invalidate { .. } => KIND_INVALIDATE,
            DsmMessage::InvalidateAck { .. } => KIND_INVALIDATE_ACK,
            DsmMessage::Grant { .. } => KIND_GRANT,
            DsmMessage::PageData { .. } => KIND_PAGE_DATA,
            DsmMessage::Confirm { .. } => KIND_CONFIRM,
        }
    }

    /// The frame flags.
    pub fn flags(&self) -> u16 {
        let access_bit = |access: &Access| match access {
            Access::Read => 0,
            Access::Write => FLAG_WRITE,
        };
        let sharers_bit = |sharers: &NodeSet| {
            if sharers.is_empty() {
                0
            } else {
                FLAG_SHARERS
            }
        };
        match self {
            DsmMessage::Request { access, .. } => access_bit(access),
            DsmMessage::Fetch {
                access, sharers, ..
            } => access_bit(access) | sharers_bit(sharers),
            DsmMessage::Grant {
                access,
                sharers,
                data,
                ..
            } => {
                let (data_bits, source) = match data {
                    GrantData::Zero => (DATA_ZERO, 0),
                    GrantData::Keep => (DATA_KEEP, 0),
                    GrantData::Bytes(_) => (DATA_BYTES, 0),
                    // Node ids are below MAX_NODES, so they fit the 8-bit field.
                    GrantData::Source(node) => (
                        DATA_SOURCE,
                        u16::try_from(*node).expect("node ids are below MAX_NODES"),
                    ),
                };
                access_bit(access)
                    | sharers_bit(sharers)
                    | (data_bits << DATA_SHIFT)
                    | ((source << SOURCE_SHIFT) & SOURCE_MASK)
            }
            DsmMessage::Invalidate { .. }
            | DsmMessage::InvalidateAck { .. }
            | DsmMessage::PageData { .. }
            | DsmMessage::Confirm { .. } => 0,
        }
    }

    /// The frame's `arg`: the guest-physical address of the page.
    pub fn arg(&self) -> u64 {
        self.page() << PAGE_SHIFT
    }

    /// The message as a frame (copies the page bytes, if any).
    pub fn to_frame(&self) -> Frame {
        Frame {
            kind: self.kind(),
            flags: self.flags(),
            id: self.id().to_wire(),
            arg: self.arg(),
            payload: self.payload().into_owned(),
        }
    }

    /// Decodes and validates a frame against the layout.
    pub fn from_frame(
        frame: FrameView<'_>,
        limits: &WireLimits,
    ) -> Result<DsmMessage, ProtocolError> {
        let FrameView {
            kind,
            flags,
            id,
            arg,
            mut payload,
        } = frame;
        let bad_flags = || ProtocolError::BadFlags { kind, flags };
        let allowed = match kind {
            KIND_REQUEST => FLAG_WRITE,
            KIND_FETCH => FLAG_WRITE | FLAG_SHARERS,
            KIND_GRANT => FLAG_WRITE | FLAG_SHARERS | DATA_MASK | SOURCE_MASK,
            KIND_INVALIDATE | KIND_INVALIDATE_ACK | KIND_PAGE_DATA | KIND_CONFIRM => 0,
            _ => return Err(ProtocolError::UnknownKind { kind }),
        };
        if flags & !allowed != 0 {
            return Err(bad_flags());
        }
        let page = limits.page_of(arg)?;
        let id = RequestId::from_wire(id, limits)?;
        let access = if flags & FLAG_WRITE != 0 {
            Access::Write
        } else {
            Access::Read
        };
        let has_sharers = flags & FLAG_SHARERS != 0;
        // A read invalidates nobody.
        if has_sharers && access == Access::Read {
            return Err(bad_flags());
        }
        let data_code = (flags & DATA_MASK) >> DATA_SHIFT;
        let source = NodeId::from((flags & SOURCE_MASK) >> SOURCE_SHIFT);
        if (data_code != DATA_SOURCE && source != 0)
            || (data_code == DATA_KEEP && access == Access::Read)
        {
            return Err(bad_flags());
        }
        let carries_page =
            kind == KIND_PAGE_DATA || (kind == KIND_GRANT && data_code == DATA_BYTES);
        let expected_payload =
            if carries_page { PAGE_SIZE } else { 0 } + if has_sharers { SHARERS_LEN } else { 0 };
        if payload.len() != expected_payload {
            return Err(ProtocolError::BadPayloadLength {
                kind,
                len: payload.len(),
                expected: expected_payload,
            });
        }
        let impossible = |node, role| ProtocolError::ImpossibleRole {
            page,
            id,
            node,
            role,
        };
        let sharers = if has_sharers {
            let mut bits = [0u8; SHARERS_LEN];
            let (page_part, sharer_part) = payload.split_at(payload.len() - SHARERS_LEN);
            bits.copy_from_slice(sharer_part);
            payload = page_part;
            let sharers = NodeSet::from_bits(u64::from_le_bytes(bits));
            // An empty set is sent as no set: one frame per message.
            if sharers.is_empty() {
                return Err(bad_flags());
            }
            if let Some(node) = sharers.iter().find(|&n| n >= limits.node_count) {
                limits.check_node(node)?;
            }
            if sharers.contains(id.node) {
                return Err(impossible(
                    id.node,
                    "a sharer acknowledging its own request",
                ));
            }
            sharers
        } else {
            NodeSet::EMPTY
        };
        let page_buf = |payload: &[u8]| -> Result<PageBuf, ProtocolError> {
            let bytes: &[u8; PAGE_SIZE] = payload.try_into().map_err(|_| bad_flags())?;
            Ok(Box::new(*bytes))
        };
        Ok(match kind {
            KIND_REQUEST => DsmMessage::Request { page, id, access },
            KIND_FETCH => DsmMessage::Fetch {
                page,
                id,
                access,
                sharers,
            },
            KIND_INVALIDATE => DsmMessage::Invalidate { page, id },
            KIND_INVALIDATE_ACK => DsmMessage::InvalidateAck { page, id },
            KIND_CONFIRM => DsmMessage::Confirm { page, id },
            KIND_PAGE_DATA => DsmMessage::PageData {
                page,
                id,
                data: page_buf(payload)?,
            },
            _ => {
                let data = match data_code {
                    DATA_ZERO => GrantData::Zero,
                    DATA_KEEP => GrantData::Keep,
                    DATA_BYTES => GrantData::Bytes(page_buf(payload)?),
                    _ => {
                        limits.check_node(source)?;
                        if source == id.node {
                            return Err(impossible(source, "the data source of its own request"));
                        }
                        if sharers.contains(source) {
                            return Err(impossible(source, "both the data source and a sharer"));
                        }
                        GrantData::Source(source)
                    }
                };
                DsmMessage::Grant {
                    page,
                    id,
                    access,
                    sharers,
                    data,
                }
            }
        })
    }

    /// Checks that `from` may send this message to node `me`, given the page's `home`: what can
    /// be known without the state of the request. Who may answer a request of `me` (grant, page
    /// data, acknowledgements) depends on the home's grant and is checked by the node's pages
    /// ([`crate::NodePages`]), where a wrong sender is fatal rather than merely dropped.
    pub fn check_route(&self, from: NodeId, me: NodeId, home: NodeId) -> Result<(), ProtocolError> {
        let page = self.page();
        let id = self.id();
        let wrong_sender = |expected| ProtocolError::WrongSender {
            what: self.name(),
            page,
            from,
            expected,
        };
        let wrong_receiver = |role| ProtocolError::WrongReceiver {
            what: self.name(),
            page,
            me,
            role,
        };
        match self {
            DsmMessage::Request { .. } | DsmMessage::Confirm { .. } => {
                if home != me {
                    return Err(wrong_receiver("its home"));
                }
                if from != id.node {
                    return Err(wrong_sender(id.node));
                }
            }
            DsmMessage::Fetch { sharers, .. } => {
                if from != home {
                    return Err(wrong_sender(home));
                }
                if id.node == me {
                    return Err(wrong_receiver("a holder other than the requester"));
                }
                // Only the home's own fetch names sharers: its grant carries them.
                if !sharers.is_empty() && me != home {
                    return Err(wrong_receiver("the home, the only source told the sharers"));
                }
                if sharers.contains(me) {
                    return Err(wrong_receiver("a source outside the sharers"));
                }
            }
            DsmMessage::Invalidate { .. } => {
                if from != home {
                    return Err(wrong_sender(home));
                }
                if id.node == me {
                    return Err(wrong_receiver("a holder other than the requester"));
                }
            }
            DsmMessage::Grant { data, .. } => {
                if id.node != me {
                    return Err(wrong_receiver("the requester"));
                }
                if *data == GrantData::Source(home) {
                    return Err(ProtocolError::ImpossibleRole {
                        page,
                        id,
                        node: home,
                        role: "a remote data source (the home sends its copy with the grant)",
                    });
                }
            }
            DsmMessage::PageData { .. } | DsmMessage::InvalidateAck { .. } => {
                if id.node != me {
                    return Err(wrong_receiver("the requester"));
                }
                if from == me {
                    return Err(wrong_receiver("a node other than the one answering"));
                }
            }
        }
        Ok(())
    }
}

/// A grant naming `sharers`, as the unit tests of the directory and the node build them.
#[cfg(test)]
pub(crate) fn test_grant(
    page: u64,
    id: RequestId,
    access: Access,
    sharers: &[NodeId],
    data: GrantData,
) -> DsmMessage {
    let mut set = NodeSet::EMPTY;
    sharers.iter().for_each(|&n| set.insert(n));
    DsmMessage::Grant {
        page,
        id,
        access,
        sharers: set,
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIMITS: WireLimits = WireLimits {
        page_count: 1 << 20,
        node_count: 16,
    };

    fn page_with(b: u8) -> PageBuf {
        let mut buf = new_page_buf();
        buf.iter_mut()
            .enumerate()
            .for_each(|(i, x)| *x = b ^ i.to_le_bytes()[0]);
        buf
    }

    /// Every valid message: sharers only for writes and never naming the requester or the data
    /// source, a data source other than the requester.
    fn message_strategy() -> impl Strategy<Value = DsmMessage> {
        let nodes = LIMITS.node_count;
        let page = 0..LIMITS.page_count;
        let id = (0..nodes, 0..(1u64 << RequestId::SEQ_BITS))
            .prop_map(|(node, seq)| RequestId { node, seq });
        let access = prop_oneof![Just(Access::Read), Just(Access::Write)];
        let sharers =
            any::<u64>().prop_map(move |bits| NodeSet::from_bits(bits & ((1 << nodes) - 1)));
        let data = prop_oneof![
            Just(GrantData::Zero),
            Just(GrantData::Keep),
            any::<u8>().prop_map(|b| GrantData::Bytes(page_with(b))),
            (0..nodes).prop_map(GrantData::Source),
        ];
        (page, id, access, sharers, data, any::<u8>(), 0..7u8).prop_map(
            move |(page, id, access, sharers, data, fill, which)| {
                let data = match (access, data) {
                    (Access::Read, GrantData::Keep) => GrantData::Zero,
                    (_, GrantData::Source(s)) if s == id.node => GrantData::Source((s + 1) % nodes),
                    (_, d) => d,
                };
                let mut sharers = match access {
                    Access::Read => NodeSet::EMPTY,
                    Access::Write => sharers.without(id.node),
                };
                if let GrantData::Source(s) = data {
                    sharers.remove(s);
                }
                match which {
                    0 => DsmMessage::Request { page, id, access },
                    1 => DsmMessage::Fetch {
                        page,
                        id,
                        access,
                        sharers,
                    },
                    2 => DsmMessage::Invalidate { page, id },
                    3 => DsmMessage::InvalidateAck { page, id },
                    4 => DsmMessage::Grant {
                        page,
                        id,
                        access,
                        sharers,
                        data,
                    },
                    5 => DsmMessage::PageData {
                        page,
                        id,
                        data: page_with(fill),
                    },
                    _ => DsmMessage::Confirm { page, id },
                }
            },
        )
    }

    proptest! {
        #[test]
        fn valid_messages_round_trip(msg in message_strategy()) {
            let frame = msg.to_frame();
            prop_assert_eq!(frame.payload.len() >= PAGE_SIZE, msg.is_bulk());
            prop_assert_eq!(msg.page_len(), if msg.is_bulk() { PAGE_SIZE } else { 0 });
            let mut bytes = Vec::new();
            frame.encode_into(&mut bytes);
            let parsed = Frame::parse(&bytes).unwrap();
            prop_assert_eq!(&parsed, &frame);
            let decoded = DsmMessage::from_frame(parsed.view(), &LIMITS).unwrap();
            prop_assert_eq!(decoded, msg);
        }

        #[test]
        fn arbitrary_frames_never_panic(
            kind in 0u16..9,
            flags in any::<u16>(),
            id in any::<u64>(),
            arg in any::<u64>(),
            payload_len in prop_oneof![
                Just(0usize),
                Just(PAGE_SIZE),
                Just(SHARERS_LEN),
                Just(PAGE_SIZE + SHARERS_LEN),
                0usize..5000,
            ],
            fill in any::<u8>(),
            tail in prop_oneof![any::<u64>(), 0u64..(1 << 16)],
        ) {
            // The tail makes sharer sets of the cluster's nodes likely, so that they decode.
            let mut payload = vec![fill; payload_len];
            if let Some(last) = payload_len.checked_sub(SHARERS_LEN) {
                payload[last..].copy_from_slice(&tail.to_le_bytes());
            }
            let frame = Frame { kind, flags, id, arg, payload };
            if let Ok(msg) = DsmMessage::from_frame(frame.view(), &LIMITS) {
                // Whatever decodes is in range, names nodes only in roles they can have, and
                // encodes back to the same frame.
                prop_assert!(msg.page() < LIMITS.page_count);
                let requester = msg.id().node;
                prop_assert!(requester < LIMITS.node_count);
                if let DsmMessage::Fetch { sharers, .. } | DsmMessage::Grant { sharers, .. } = &msg {
                    prop_assert!(sharers.iter().all(|n| n < LIMITS.node_count));
                    prop_assert!(!sharers.contains(requester));
                }
                if let DsmMessage::Grant { sharers, data: GrantData::Source(source), .. } = &msg {
                    prop_assert!(*source < LIMITS.node_count && *source != requester);
                    prop_assert!(!sharers.contains(*source));
                }
                prop_assert_eq!(msg.to_frame(), frame);
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(frame) = Frame::parse(&bytes) {
                let _ = DsmMessage::from_frame(frame.view(), &LIMITS);
            }
        }
    }

    fn frame(kind: u16, flags: u16, node: u64, gpa: u64, payload: usize) -> Frame {
        Frame {
            kind,
            flags,
            id: node << RequestId::SEQ_BITS | 5,
            arg: gpa,
            payload: vec![0; payload],
        }
    }

    #[test]
    fn out_of_range_fields_are_rejected() {
        let decode = |f: Frame| DsmMessage::from_frame(f.view(), &LIMITS);
        assert_eq!(
            decode(frame(KIND_REQUEST, 0, 0, LIMITS.page_count << 12, 0)),
            Err(ProtocolError::AddressOutOfRange {
                gpa: LIMITS.page_count << 12,
                page_count: LIMITS.page_count
            })
        );
        assert_eq!(
            decode(frame(KIND_REQUEST, 0, 0, 0x1008, 0)),
            Err(ProtocolError::UnalignedAddress { gpa: 0x1008 })
        );
        assert_eq!(
            decode(frame(KIND_CONFIRM, 0, 16, 0x1000, 0)),
            Err(ProtocolError::NodeOutOfRange {
                node: 16,
                node_count: 16
            })
        );
        assert_eq!(
            decode(frame(99, 0, 0, 0, 0)),
            Err(ProtocolError::UnknownKind { kind: 99 })
        );
        assert!(matches!(
            decode(frame(KIND_GRANT, DATA_BYTES << DATA_SHIFT, 1, 0, 100)),
            Err(ProtocolError::BadPayloadLength { .. })
        ));
        assert!(matches!(
            decode(frame(KIND_GRANT, 0, 1, 0, PAGE_SIZE)),
            Err(ProtocolError::BadPayloadLength { .. })
        ));
        // Keep is only meaningful for a write grant; sharers only for writes; unknown bits
        // refused.
        assert!(matches!(
            decode(frame(KIND_GRANT, DATA_KEEP << DATA_SHIFT, 1, 0, 0)),
            Err(ProtocolError::BadFlags { .. })
        ));
        assert!(matches!(
            decode(frame(KIND_FETCH, FLAG_SHARERS, 1, 0, SHARERS_LEN)),
            Err(ProtocolError::BadFlags { .. })
        ));
        assert!(matches!(
            decode(frame(KIND_INVALIDATE, FLAG_WRITE, 1, 0, 0)),
            Err(ProtocolError::BadFlags { .. })
        ));
        assert!(matches!(
            decode(frame(KIND_GRANT, 1 << SOURCE_SHIFT, 1, 0, 0)),
            Err(ProtocolError::BadFlags { .. })
        ));
        assert!(matches!(
            decode(frame(KIND_PAGE_DATA, 0, 1, 0, 0)),
            Err(ProtocolError::BadPayloadLength { .. })
        ));
        assert!(matches!(
            Frame::parse(&[1, 0, 0]),
            Err(ProtocolError::Truncated { len: 3 })
        ));
    }

    #[test]
    fn routes_are_checked() {
        let id = RequestId { node: 2, seq: 1 };
        let request = DsmMessage::Request {
            page: 9,
            id,
            access: Access::Read,
        };
        assert!(request.check_route(2, 0, 0).is_ok());
        assert!(request.check_route(3, 0, 0).is_err(), "spoofed requester");
        assert!(request.check_route(2, 1, 0).is_err(), "not the home");
        let invalidate = DsmMessage::Invalidate { page: 9, id };
        assert!(invalidate.check_route(0, 1, 0).is_ok());
        assert!(
            invalidate.check_route(1, 3, 0).is_err(),
            "not from the home"
        );
        assert!(
            invalidate.check_route(0, 2, 0).is_err(),
            "requester invalidated"
        );
        let ack = DsmMessage::InvalidateAck { page: 9, id };
        assert!(ack.check_route(1, 2, 0).is_ok());
        assert!(ack.check_route(1, 3, 0).is_err());
        let grant = DsmMessage::Grant {
            page: 9,
            id,
            access: Access::Read,
            sharers: NodeSet::EMPTY,
            data: GrantData::Zero,
        };
        assert!(!grant.is_for_home());
        assert!(request.is_for_home() && DsmMessage::Confirm { page: 9, id }.is_for_home());
        // Who may grant is the pending request's business (NodePages), not the route's.
        assert!(grant.check_route(0, 2, 0).is_ok());
        assert!(
            grant.check_route(0, 3, 0).is_err(),
            "grant to a non-requester"
        );
        let from_home_as_source = DsmMessage::Grant {
            page: 9,
            id,
            access: Access::Read,
            sharers: NodeSet::EMPTY,
            data: GrantData::Source(0),
        };
        assert!(matches!(
            from_home_as_source.check_route(0, 2, 0),
            Err(ProtocolError::ImpossibleRole { node: 0, .. })
        ));
        let data = DsmMessage::PageData {
            page: 9,
            id,
            data: new_page_buf(),
        };
        assert!(data.check_route(5, 2, 0).is_ok());
        assert!(
            data.check_route(5, 3, 0).is_err(),
            "data to a non-requester"
        );
        assert!(data.check_route(2, 2, 0).is_err(), "data from oneself");
        let fetch = |sharers| DsmMessage::Fetch {
            page: 9,
            id,
            access: Access::Write,
            sharers,
        };
        assert!(fetch(NodeSet::EMPTY).check_route(0, 4, 0).is_ok());
        assert!(fetch(NodeSet::only(3)).check_route(0, 0, 0).is_ok());
        assert!(
            fetch(NodeSet::only(3)).check_route(0, 4, 0).is_err(),
            "sharers told to a remote source"
        );
        assert!(
            fetch(NodeSet::only(0)).check_route(0, 0, 0).is_err(),
            "the source among the sharers"
        );
    }

    #[test]
    fn request_ids_are_distinct_and_unpredictable_from_the_counter() {
        let ids = RequestIds::new();
        let seqs: std::collections::HashSet<u64> =
            (0..10_000u64).map(|c| ids.id(3, c * 64 + 5).seq).collect();
        assert_eq!(seqs.len(), 10_000, "a permutation never repeats an id");
        assert!(seqs.iter().all(|&s| s < 1 << RequestId::SEQ_BITS));
        assert_eq!(ids.id(3, 5).node, 3);
        assert_eq!(ids.id(3, 5), ids.clone().id(3, 5), "shards share the key");
        // Neither the counter nor a fixed offset from it shows through.
        let steps = (0..100u64)
            .filter(|&c| ids.id(0, c + 1).seq.wrapping_sub(ids.id(0, c).seq) == 1)
            .count();
        assert!(steps < 3, "{steps} consecutive ids");
        let other_run = RequestIds::new();
        assert!((0..8).any(|c| other_run.id(0, c) != ids.id(0, c)));
        assert_eq!(format!("{ids:?}"), "RequestIds(..)");
    }

    #[test]
    fn impossible_roles_are_rejected() {
        let id = RequestId { node: 2, seq: 1 };
        let decode = |msg: &DsmMessage| DsmMessage::from_frame(msg.to_frame().view(), &LIMITS);
        let grant = |sharers, data| DsmMessage::Grant {
            page: 1,
            id,
            access: Access::Write,
            sharers,
            data,
        };
        let role = |r: Result<DsmMessage, ProtocolError>| match r {
            Err(ProtocolError::ImpossibleRole { node, .. }) => Some(node),
            _ => None,
        };
        assert_eq!(
            role(decode(&grant(NodeSet::only(2), GrantData::Zero))),
            Some(2)
        );
        assert_eq!(
            role(decode(&grant(NodeSet::EMPTY, GrantData::Source(2)))),
            Some(2)
        );
        assert_eq!(
            role(decode(&grant(NodeSet::only(4), GrantData::Source(4)))),
            Some(4)
        );
        let mut beyond = grant(NodeSet::only(3), GrantData::Keep).to_frame();
        beyond.payload = (1u64 << 20).to_le_bytes().to_vec();
        assert_eq!(
            DsmMessage::from_frame(beyond.view(), &LIMITS),
            Err(ProtocolError::NodeOutOfRange {
                node: 20,
                node_count: 16
            })
        );
        let mut empty = grant(NodeSet::only(3), GrantData::Keep).to_frame();
        empty.payload = 0u64.to_le_bytes().to_vec();
        assert!(matches!(
            DsmMessage::from_frame(empty.view(), &LIMITS),
            Err(ProtocolError::BadFlags { .. })
        ));
        let mut source_beyond = grant(NodeSet::EMPTY, GrantData::Source(3)).to_frame();
        source_beyond.flags |= 16 << SOURCE_SHIFT;
        assert!(matches!(
            DsmMessage::from_frame(source_beyond.view(), &LIMITS),
            Err(ProtocolError::NodeOutOfRange { node: 19, .. })
        ));
        // A data grant naming sharers carries both, and decodes to both.
        let both = grant(NodeSet::only(5), GrantData::Bytes(new_page_buf()));
        assert_eq!(both.to_frame().payload.len(), PAGE_SIZE + SHARERS_LEN);
        assert_eq!(decode(&both), Ok(both));
    }

    #[test]
    fn only_messages_with_page_bytes_are_bulk() {
        let id = RequestId { node: 0, seq: 0 };
        let grant = |data| DsmMessage::Grant {
            page: 0,
            id,
            access: Access::Write,
            sharers: NodeSet::EMPTY,
            data,
        };
        assert!(grant(GrantData::Bytes(new_page_buf())).is_bulk());
        assert!(!grant(GrantData::Source(1)).is_bulk());
        assert!(DsmMessage::PageData {
            page: 0,
            id,
            data: new_page_buf()
        }
        .is_bulk());
        // The common data grant is sent without copying the page.
        assert!(matches!(
            grant(GrantData::Bytes(new_page_buf())).payload(),
            Cow::Borrowed(_)
        ));
        assert!(!grant(GrantData::Zero).is_bulk());
        assert!(!grant(GrantData::Keep).is_bulk());
        assert!(!DsmMessage::Request {
            page: 0,
            id,
            access: Access::Write
        }
        .is_bulk());
    }
}
