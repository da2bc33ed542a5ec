//! The forwarding messages as they travel on the Forward connection, and their checks.
//!
//! Every message is one transport frame: `kind`, `flags`, `id`, `arg` and a short payload.
//! Decoding checks the shape of a frame (lengths, reserved bits, sizes); [`crate::Forwarder`]
//! checks what a frame may do (which node may speak for which vCPU).

use devices::interrupt::{ApicAddressing, InterruptError, InterruptMessage};

/// Frame kinds on the Forward connection.
pub mod kind {
    /// An interrupt for vCPUs of the receiving node.
    pub const INTERRUPT: u16 = 1;
    /// A vCPU's new APIC addressing state; answered by [`ADDRESSING_ACK`].
    pub const ADDRESSING: u16 = 2;
    /// The receiver's replica holds the announced addressing state.
    pub const ADDRESSING_ACK: u16 = 3;
    /// A port or MMIO access for the master's devices; answered by [`IO_REPLY`].
    pub const IO_REQUEST: u16 = 4;
    /// The master carried out an access.
    pub const IO_REPLY: u16 = 5;
    /// A level-triggered vector was retired by an EOI: for the master's IOAPIC.
    pub const EOI: u16 = 6;
}

/// Largest number of target vCPUs one interrupt frame names (one per vCPU of the guest at most).
pub const MAX_TARGETS: usize = 1024;

/// What address space an access is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Space {
    /// Port I/O (`in`/`out`), 16-bit addresses.
    Port,
    /// Memory-mapped I/O, guest-physical addresses.
    Mmio,
}

/// One port or MMIO access of a vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoAccess {
    /// Port or MMIO.
    pub space: Space,
    /// The port number or guest-physical address.
    pub address: u64,
    /// A write (true) or a read.
    pub write: bool,
    /// Access size in bytes: 1, 2, 4 or 8.
    pub len: u8,
    /// The written bytes, or where the read bytes go (first `len` bytes).
    pub data: [u8; 8],
}

impl IoAccess {
    /// The access's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.data[..usize::from(self.len)]
    }

    /// The access's bytes, for a device to fill.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.data[..usize::from(self.len)]
    }

    /// A read of `len` bytes; `None` if `len` is not an access size.
    pub fn read(space: Space, address: u64, len: usize) -> Option<Self> {
        access_len(len).map(|len| Self {
            space,
            address,
            write: false,
            len,
            data: [0; 8],
        })
    }

    /// A write of `bytes`; `None` if their length is not an access size.
    pub fn write(space: Space, address: u64, bytes: &[u8]) -> Option<Self> {
        let len = access_len(bytes.len())?;
        let mut data = [0; 8];
        data[..bytes.len()].copy_from_slice(bytes);
        Some(Self {
            space,
            address,
            write: true,
            len,
            data,
        })
    }
}

fn valid_len(len: usize) -> bool {
    matches!(len, 1 | 2 | 4 | 8)
}

/// `len` as the access's length field, if it is an access size.
fn access_len(len: usize) -> Option<u8> {
    valid_len(len).then(|| u8::try_from(len).ok()).flatten()
}

/// A frame as the transport hands it over (the transport's own frame type, decoupled).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WireFrame {
    /// Frame kind (see [`kind`]).
    pub kind: u16,
    /// Per-kind flags.
    pub flags: u16,
    /// First argument.
    pub id: u64,
    /// Second argument.
    pub arg: u64,
    /// Payload bytes.
    pub payload: Vec<u8>,
}

/// A decoded forwarding message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardMessage {
    /// `msg` for the listed vCPUs of the receiver; `source` is the sending vCPU (IPIs) or
    /// `None` (IOAPIC, MSI).
    Interrupt {
        /// The sending vCPU, if an APIC sent it.
        source: Option<usize>,
        /// The message.
        msg: InterruptMessage,
        /// Target vCPUs, all owned by the receiver.
        targets: Vec<usize>,
    },
    /// vCPU `vcpu`'s addressing is now `state`; acknowledge with `seq`.
    Addressing {
        /// The vCPU.
        vcpu: usize,
        /// Sequence number of this change (per vCPU).
        seq: u64,
        /// The new state.
        state: ApicAddressing,
    },
    /// The replica of `vcpu` holds change `seq`.
    AddressingAck {
        /// The vCPU.
        vcpu: usize,
        /// The acknowledged change.
        seq: u64,
    },
    /// vCPU `vcpu` makes `access`; answer with the same `seq`.
    IoRequest {
        /// The accessing vCPU.
        vcpu: usize,
        /// Sequence number of the access (per vCPU).
        seq: u64,
        /// The access (for a read, `data` is zero).
        access: IoAccess,
    },
    /// The answer to request `seq` of `vcpu`: the read bytes (empty for a write).
    IoReply {
        /// The accessing vCPU.
        vcpu: usize,
        /// The request answered.
        seq: u64,
        /// Read bytes (as many as the request's size), or none for a write.
        data: Vec<u8>,
    },
    /// A level-triggered `vector` was retired on the sender.
    Eoi {
        /// The vector.
        vector: u8,
    },
}

/// Why a frame is not a valid forwarding message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The kind is not a forwarding message.
    #[error("unknown forwarding frame kind {0}")]
    UnknownKind(u16),
    /// The payload length does not fit the kind.
    #[error("forwarding frame kind {kind} has a payload of {len} bytes, expected {expected}")]
    PayloadLength {
        /// The frame kind.
        kind: u16,
        /// The payload length received.
        len: usize,
        /// What the kind needs.
        expected: &'static str,
    },
    /// The packed interrupt message is malformed.
    #[error("bad interrupt message: {0}")]
    Interrupt(#[from] InterruptError),
    /// A field is out of its range.
    #[error("forwarding frame kind {kind}: {what}")]
    Field {
        /// The frame kind.
        kind: u16,
        /// What is wrong.
        what: String,
    },
}

const FLAG_WRITE: u16 = 1 << 0;
const FLAG_MMIO: u16 = 1 << 1;
const SIZE_SHIFT: u16 = 8;
const ADDR_ENABLED: u8 = 1 << 0;
const ADDR_GLOBAL: u8 = 1 << 1;
const ADDR_X2APIC: u8 = 1 << 2;
const ADDRESSING_LEN: usize = 13;
const SEQ_LEN: usize = 8;
/// `id` of an interrupt frame without a source vCPU.
const NO_SOURCE: u64 = u64::MAX;

fn field(kind: u16, what: impl Into<String>) -> WireError {
    WireError::Field {
        kind,
        what: what.into(),
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

fn vcpu_index(kind: u16, raw: u64) -> Result<usize, WireError> {
    usize::try_from(raw)
        .ok()
        .filter(|&v| v < MAX_TARGETS)
        .ok_or_else(|| field(kind, format!("vCPU index {raw} out of range")))
}

impl ForwardMessage {
    /// Encodes the message as a frame.
    pub fn encode(&self) -> WireFrame {
        match self {
            ForwardMessage::Interrupt {
                source,
                msg,
                targets,
            } => WireFrame {
                kind: kind::INTERRUPT,
                flags: 0,
                id: source.map_or(NO_SOURCE, |s| s as u64),
                arg: msg.pack(),
                payload: targets
                    .iter()
                    .flat_map(|&t| {
                        // Targets are vCPU indices, which the configuration numbers as u32
                        // (`resources::VcpuId`), so they fit the four-byte field.
                        u32::try_from(t)
                            .expect("vCPU indices come from u32 vCPU ids")
                            .to_le_bytes()
                    })
                    .collect(),
            },
            ForwardMessage::Addressing { vcpu, seq, state } => {
                let mut payload = Vec::with_capacity(ADDRESSING_LEN);
                payload.extend_from_slice(&state.apic_id.to_le_bytes());
                payload.extend_from_slice(&state.ldr.to_le_bytes());
                payload.extend_from_slice(&state.dfr.to_le_bytes());
                let mut flags = 0u8;
                if state.enabled {
                    flags |= ADDR_ENABLED;
                }
                if state.globally_enabled {
                    flags |= ADDR_GLOBAL;
                }
                if state.x2apic {
                    flags |= ADDR_X2APIC;
                }
                payload.push(flags);
                WireFrame {
                    kind: kind::ADDRESSING,
                    flags: 0,
                    id: *vcpu as u64,
                    arg: *seq,
                    payload,
                }
            }
            ForwardMessage::AddressingAck { vcpu, seq } => WireFrame {
                kind: kind::ADDRESSING_ACK,
                flags: 0,
                id: *vcpu as u64,
                arg: *seq,
                payload: Vec::new(),
            },
            ForwardMessage::IoRequest { vcpu, seq, access } => {
                let mut flags = u16::from(access.len) << SIZE_SHIFT;
                if access.write {
                    flags |= FLAG_WRITE;
                }
                if access.space == Space::Mmio {
                    flags |= FLAG_MMIO;
                }
                let mut payload = seq.to_le_bytes().to_vec();
                if access.write {
                    payload.extend_from_slice(access.bytes());
                }
                WireFrame {
                    kind: kind::IO_REQUEST,
                    flags,
                    id: *vcpu as u64,
                    arg: access.address,
                    payload,
                }
            }
            ForwardMessage::IoReply { vcpu, seq, data } => WireFrame {
                kind: kind::IO_REPLY,
                flags: 0,
                id: *vcpu as u64,
                arg: *seq,
                payload: data.clone(),
            },
            ForwardMessage::Eoi { vector } => WireFrame {
                kind: kind::EOI,
                flags: 0,
                id: u64::from(*vector),
                arg: 0,
                payload: Vec::new(),
            },
        }
    }

    /// Decodes and shape-checks a frame.
    pub fn decode(f: &WireFrame) -> Result<Self, WireError> {
        let len = f.payload.len();
        let expect = |ok: bool, expected: &'static str| {
            if ok {
                Ok(())
            } else {
                Err(WireError::PayloadLength {
                    kind: f.kind,
                    len,
                    expected,
                })
            }
        };
        match f.kind {
            kind::INTERRUPT => {
                expect(
                    len >= 4 && len % 4 == 0 && len / 4 <= MAX_TARGETS,
                    "1 to 1024 four-byte vCPU indices",
                )?;
                let source = match f.id {
                    NO_SOURCE => None,
                    raw => Some(vcpu_index(f.kind, raw)?),
                };
                let msg = InterruptMessage::unpack(f.arg)?;
                let targets = f
                    .payload
                    .chunks_exact(4)
                    .map(|c| vcpu_index(f.kind, u64::from(u32_at(c, 0))))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(ForwardMessage::Interrupt {
                    source,
                    msg,
                    targets,
                })
            }
            kind::ADDRESSING => {
                expect(len == ADDRESSING_LEN, "13")?;
                let p = &f.payload;
                let bits = p[12];
                if bits & !(ADDR_ENABLED | ADDR_GLOBAL | ADDR_X2APIC) != 0 {
                    return Err(field(f.kind, format!("unknown addressing flags {bits:#x}")));
                }
                Ok(ForwardMessage::Addressing {
                    vcpu: vcpu_index(f.kind, f.id)?,
                    seq: f.arg,
                    state: ApicAddressing {
                        apic_id: u32_at(p, 0),
                        ldr: u32_at(p, 4),
                        dfr: u32_at(p, 8),
                        enabled: bits & ADDR_ENABLED != 0,
                        globally_enabled: bits & ADDR_GLOBAL != 0,
                        x2apic: bits & ADDR_X2APIC != 0,
                    },
                })
            }
            kind::ADDRESSING_ACK => {
                expect(len == 0, "0")?;
                Ok(ForwardMessage::AddressingAck {
                    vcpu: vcpu_index(f.kind, f.id)?,
                    seq: f.arg,
                })
            }
            kind::IO_REQUEST => {
                let size = usize::from(f.flags >> SIZE_SHIFT);
                if !valid_len(size) || f.flags & 0xFC != 0 {
                    return Err(field(f.kind, format!("bad access flags {:#x}", f.flags)));
                }
                let write = f.flags & FLAG_WRITE != 0;
                let space = if f.flags & FLAG_MMIO != 0 {
                    Space::Mmio
                } else {
                    Space::Port
                };
                if space == Space::Port && f.arg > 0xFFFF {
                    return Err(field(f.kind, format!("port {:#x} beyond 0xffff", f.arg)));
                }
                if write {
                    expect(len == SEQ_LEN + size, "8 + the access size")?;
                } else {
                    expect(len == SEQ_LEN, "8")?;
                }
                let mut seq = [0u8; 8];
                seq.copy_from_slice(&f.payload[..SEQ_LEN]);
                let access = if write {
                    IoAccess::write(space, f.arg, &f.payload[SEQ_LEN..])
                } else {
                    IoAccess::read(space, f.arg, size)
                };
                Ok(ForwardMessage::IoRequest {
                    vcpu: vcpu_index(f.kind, f.id)?,
                    seq: u64::from_le_bytes(seq),
                    access: access.ok_or_else(|| field(f.kind, "bad access size"))?,
                })
            }
            kind::IO_REPLY => {
                expect(len == 0 || valid_len(len), "0, 1, 2, 4 or 8")?;
                Ok(ForwardMessage::IoReply {
                    vcpu: vcpu_index(f.kind, f.id)?,
                    seq: f.arg,
                    data: f.payload.clone(),
                })
            }
            kind::EOI => {
                expect(len == 0, "0")?;
                let vector = u8::try_from(f.id)
                    .map_err(|_| field(f.kind, format!("vector {} beyond 255", f.id)))?;
                Ok(ForwardMessage::Eoi { vector })
            }
            other => Err(WireError::UnknownKind(other)),
        }
    }
}
