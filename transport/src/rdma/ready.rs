//! The mesh-ready barrier's record: which peers said they have all their connections.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::channel::NodeId;

/// Which peers said they have all their connections (the mesh-ready barrier).
pub(crate) struct ReadyPeers {
    ready: BTreeMap<NodeId, AtomicBool>,
}

impl ReadyPeers {
    pub(crate) fn new(peers: impl IntoIterator<Item = NodeId>) -> ReadyPeers {
        let ready = peers
            .into_iter()
            .map(|peer| (peer, AtomicBool::new(false)))
            .collect();
        ReadyPeers { ready }
    }

    pub(crate) fn mark(&self, peer: NodeId) {
        if let Some(flag) = self.ready.get(&peer) {
            flag.store(true, Ordering::Release);
        }
    }

    /// The first peer not ready yet, if any.
    pub(crate) fn first_waiting(&self) -> Option<NodeId> {
        self.ready
            .iter()
            .find(|(_, flag)| !flag.load(Ordering::Acquire))
            .map(|(&peer, _)| peer)
    }
}
