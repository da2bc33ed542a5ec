//! Node identities and the classes of connection between two nodes.

use std::fmt;

/// Identifier of a spanvm node within one cluster (node 0 is the master).
pub use resources::NodeId;

/// Which backend carries the frames (`transport = "tcp" | "rdma"` in the node config; every
/// node of a cluster agrees on it, since it is part of the layout compared at the handshake).
pub use resources::TransportKind;

/// The class of a connection. Two nodes share one TCP connection per class, so that traffic of
/// one class never queues behind another's (a page request never waits behind bulk data).
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Channel {
    /// Page requests and their answers: the latency-critical fault path.
    DsmRequest = 0,
    /// Bulk page transfers and invalidations.
    DsmBulk = 1,
    /// IPIs, interrupts and forwarded port/MMIO accesses.
    Forward = 2,
    /// Cluster control: start/stop, clock samples, and the transport's own heartbeats.
    Control = 3,
}

impl Channel {
    /// Every channel, in wire order (the index of a channel is its wire value).
    pub const ALL: [Channel; 4] = [
        Channel::DsmRequest,
        Channel::DsmBulk,
        Channel::Forward,
        Channel::Control,
    ];

    /// How many channels connect two nodes.
    pub const COUNT: usize = Self::ALL.len();

    /// The channel with this wire value, or `None` if no channel has it.
    pub fn from_u8(value: u8) -> Option<Channel> {
        Self::ALL.get(usize::from(value)).copied()
    }

    /// Position of this channel in [`Channel::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// Short human name, as used in messages.
    pub fn name(self) -> &'static str {
        match self {
            Channel::DsmRequest => "dsm-request",
            Channel::DsmBulk => "dsm-bulk",
            Channel::Forward => "forward",
            Channel::Control => "control",
        }
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_values_round_trip_and_unknown_values_are_refused() {
        for channel in Channel::ALL {
            assert_eq!(Channel::from_u8(channel as u8), Some(channel));
            assert_eq!(Channel::ALL[channel.index()], channel);
        }
        assert_eq!(Channel::from_u8(4), None);
        assert_eq!(Channel::from_u8(255), None);
    }
}
