//! What a node needs to know to join the mesh. The VMM builds it from the cluster layout; this
//! crate does not read config files.

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use resources::ServicePriority;

use crate::channel::NodeId;
use crate::error::TransportError;
use crate::handshake_wire::MAX_LAYOUT_TEXT;

/// How a frozen or half-open peer is detected: heartbeats on the control channel, and a
/// silence limit after which the peer is declared lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    /// How often a heartbeat is sent to every peer.
    pub heartbeat_interval: Duration,
    /// A peer from which nothing (no frame, no heartbeat) arrived for this long is lost. A
    /// peer that reads slowly is not lost while it still sends: only a backlog past the
    /// connection's limit (a receiver stuck for good) drops it.
    pub silence_timeout: Duration,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness {
            heartbeat_interval: Duration::from_millis(200),
            silence_timeout: Duration::from_secs(2),
        }
    }
}

/// One node's view of the mesh.
#[derive(Clone)]
pub struct MeshConfig {
    /// This node.
    pub me: NodeId,
    /// Where this node accepts connections from nodes with a higher id.
    pub listen: SocketAddr,
    /// Every other node of the cluster and where it listens.
    pub peers: Vec<(NodeId, SocketAddr)>,
    /// The cluster secret every node must hold; never sent, only proven.
    pub secret: Vec<u8>,
    /// The canonical text of the guest layout; its SHA-256 is compared with every peer, and on
    /// a mismatch the error names the first differing line, e.g.
    /// ``layout differs from node 1 at line 4: here `vcpu 1 node 1`, node 1 has `vcpu 1 node 0` ``.
    pub layout_canonical: String,
    /// How long to keep retrying to reach peers that are not up yet, and to wait for the whole
    /// mesh to be connected.
    pub connect_timeout: Duration,
    /// Receiver threads of [`crate::Channel::DsmRequest`] poll with non-blocking reads
    /// (yielding the CPU between attempts) instead of sleeping in the kernel: lower fault
    /// latency, for one core per peer kept busy whenever nothing else wants it.
    pub busy_poll: bool,
    /// How the receivers of the fault path (DSM and forwarding channels, not the control
    /// channel) are scheduled; a busy-polling receiver keeps normal priority, since a
    /// real-time spinner would own its core.
    pub service_priority: ServicePriority,
    /// Heartbeat period and silence limit.
    pub liveness: Liveness,
    /// `SO_SNDBUF` and `SO_RCVBUF` of every connection; `None` leaves the kernel's
    /// autotuning. Small buffers make every large frame a partial write: tests use them to
    /// prove that no thread serving the protocol waits for a peer to read.
    pub socket_buffer: Option<usize>,
}

impl fmt::Debug for MeshConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshConfig")
            .field("me", &self.me)
            .field("listen", &self.listen)
            .field("peers", &self.peers)
            .field("secret", &format_args!("<{} bytes>", self.secret.len()))
            .field("layout_canonical", &self.layout_canonical)
            .field("connect_timeout", &self.connect_timeout)
            .field("busy_poll", &self.busy_poll)
            .field("service_priority", &self.service_priority)
            .field("liveness", &self.liveness)
            .field("socket_buffer", &self.socket_buffer)
            .finish()
    }
}

impl MeshConfig {
    /// Checks what the mesh relies on: no node twice, a secret, a layout text that fits the
    /// handshake, a heartbeat faster than the silence limit.
    pub fn validate(&self) -> Result<(), TransportError> {
        let mut seen = BTreeSet::new();
        for &(peer, _) in &self.peers {
            if peer == self.me {
                return Err(TransportError::PeerIsSelf { me: self.me });
            }
            if !seen.insert(peer) {
                return Err(TransportError::DuplicatePeer { peer });
            }
        }
        if self.secret.is_empty() {
            return Err(TransportError::EmptySecret);
        }
        if self.layout_canonical.len() > MAX_LAYOUT_TEXT {
            return Err(TransportError::LayoutTooLarge {
                len: self.layout_canonical.len(),
                max: MAX_LAYOUT_TEXT,
            });
        }
        let Liveness {
            heartbeat_interval,
            silence_timeout,
        } = self.liveness;
        if heartbeat_interval.is_zero() || heartbeat_interval >= silence_timeout {
            return Err(TransportError::BadLiveness {
                heartbeat_interval,
                silence_timeout,
            });
        }
        Ok(())
    }

    /// Where `peer` listens, if it is a peer.
    pub(crate) fn peer_addr(&self, peer: NodeId) -> Option<SocketAddr> {
        self.peers
            .iter()
            .find(|&&(id, _)| id == peer)
            .map(|&(_, addr)| addr)
    }

    /// Peers this node dials (lower ids), in id order.
    pub(crate) fn dialed_peers(&self) -> Vec<(NodeId, SocketAddr)> {
        let mut peers: Vec<_> = self
            .peers
            .iter()
            .copied()
            .filter(|&(id, _)| id < self.me)
            .collect();
        peers.sort_unstable();
        peers
    }

    /// Peers that dial this node (higher ids), in id order.
    pub(crate) fn accepted_peers(&self) -> Vec<NodeId> {
        let mut peers: Vec<_> = self
            .peers
            .iter()
            .map(|&(id, _)| id)
            .filter(|&id| id > self.me)
            .collect();
        peers.sort_unstable();
        peers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> MeshConfig {
        MeshConfig {
            me: 1,
            listen: "127.0.0.1:7001".parse().unwrap(),
            peers: vec![
                (2, "127.0.0.1:7002".parse().unwrap()),
                (0, "127.0.0.1:7000".parse().unwrap()),
            ],
            secret: b"s".to_vec(),
            layout_canonical: "layout\n".into(),
            connect_timeout: Duration::from_secs(1),
            busy_poll: false,
            service_priority: ServicePriority::Normal,
            liveness: Liveness::default(),
            socket_buffer: None,
        }
    }

    #[test]
    fn a_sound_config_passes_and_splits_peers_by_who_dials() {
        let cfg = config();
        cfg.validate().unwrap();
        assert_eq!(
            cfg.dialed_peers(),
            vec![(0, "127.0.0.1:7000".parse().unwrap())]
        );
        assert_eq!(cfg.accepted_peers(), vec![2]);
        assert!(!format!("{cfg:?}").contains("secret: [115]"));
    }

    #[test]
    fn each_broken_rule_is_named() {
        let mut cfg = config();
        cfg.peers.push((1, "127.0.0.1:1".parse().unwrap()));
        assert!(matches!(
            cfg.validate(),
            Err(TransportError::PeerIsSelf { me: 1 })
        ));

        let mut cfg = config();
        cfg.peers.push((2, "127.0.0.1:1".parse().unwrap()));
        assert!(matches!(
            cfg.validate(),
            Err(TransportError::DuplicatePeer { peer: 2 })
        ));

        let mut cfg = config();
        cfg.secret.clear();
        assert!(matches!(cfg.validate(), Err(TransportError::EmptySecret)));

        let mut cfg = config();
        cfg.layout_canonical = "x".repeat(MAX_LAYOUT_TEXT + 1);
        assert!(matches!(
            cfg.validate(),
            Err(TransportError::LayoutTooLarge { .. })
        ));

        let mut cfg = config();
        cfg.liveness.heartbeat_interval = cfg.liveness.silence_timeout;
        assert!(matches!(
            cfg.validate(),
            Err(TransportError::BadLiveness { .. })
        ));
    }
}
