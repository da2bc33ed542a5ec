//! The home's directory: for each page it is home of, who holds valid copies and whose copy is
//! authoritative, and the serialisation of requests for the page.
//!
//! A pure state machine: requests and confirmations go in, messages come out. An entry is busy
//! from the moment it starts serving a request until the requester's [`DsmMessage::Confirm`];
//! requests arriving meanwhile wait in FIFO order. Because every change of a copy's state is
//! caused by the home and the home waits for the confirmation, the directory knows every node's
//! state exactly whenever it decides how to serve a request.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use thiserror::Error;

use crate::protocol::{Access, DsmMessage, GrantData, Outgoing, RequestId};
use crate::stats::NodeStats;
use crate::{NodeId, NodeSet};

/// Errors of the directory. [`DirectoryError::is_fatal`] says whether the node must stop.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DirectoryError {
    /// A node asked for a page while a request of its own for that page is already waiting, or
    /// repeated the request being served: a misbehaving peer.
    #[error("node {node} asked for page {page:#x} again (request {id}) while its request {previous} is still open; ignored")]
    AlreadyRequesting {
        /// The page.
        page: u64,
        /// The requesting node.
        node: NodeId,
        /// The new request.
        id: RequestId,
        /// The open request.
        previous: RequestId,
    },
    /// A confirmation for a request that the entry is not serving.
    #[error("confirmation of request {id} for page {page:#x} does not match the request being served ({serving:?}); ignored")]
    UnexpectedConfirm {
        /// The page.
        page: u64,
        /// The confirmation's request.
        id: RequestId,
        /// The request being served, if any.
        serving: Option<RequestId>,
    },
    /// The directory has no node with a valid copy to serve the request from: the page's content
    /// would be lost, so the node must stop.
    #[error("page {page:#x} has no valid copy besides requester {requester}'s (copyset {copyset:?}, owner {owner:?}): directory state lost")]
    NoValidCopy {
        /// The page.
        page: u64,
        /// The requester.
        requester: NodeId,
        /// The copyset at that moment.
        copyset: NodeSet,
        /// The owner at that moment.
        owner: Option<NodeId>,
    },
}

impl DirectoryError {
    /// Whether the node must stop: data would be lost or the protocol cannot go on.
    pub fn is_fatal(&self) -> bool {
        matches!(self, DirectoryError::NoValidCopy { .. })
    }
}

#[derive(Default)]
struct DirEntry {
    /// The node whose copy is authoritative; `None` while the page was never written (all zero).
    owner: Option<NodeId>,
    /// Nodes holding a valid copy (Shared, or the owner in Modified).
    copyset: NodeSet,
    /// The request being served; the entry is busy while it is `Some`.
    serving: Option<(RequestId, Access)>,
    /// Requests waiting for the entry, in arrival order.
    queue: VecDeque<(RequestId, Access)>,
}

/// What the directory knows of one page (for tests and diagnostics).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirectoryView {
    /// The node whose copy is authoritative (`None`: never written).
    pub owner: Option<NodeId>,
    /// Nodes holding valid copies.
    pub copyset: NodeSet,
    /// The request being served.
    pub serving: Option<RequestId>,
    /// Requests waiting.
    pub queued: usize,
}

/// The directory of the pages a node is home of.
pub struct HomeDirectory {
    me: NodeId,
    entries: HashMap<u64, DirEntry>,
    stats: Arc<NodeStats>,
}

impl HomeDirectory {
    /// The directory of node `me`; every page starts never written, with no copies.
    pub fn new(me: NodeId, stats: Arc<NodeStats>) -> HomeDirectory {
        HomeDirectory {
            me,
            entries: HashMap::new(),
            stats,
        }
    }

    /// A request of `id.node` for `page`: served now if the entry is free, else queued.
    pub fn on_request(
        &mut self,
        page: u64,
        id: RequestId,
        access: Access,
        out: &mut Vec<Outgoing>,
    ) -> Result<(), DirectoryError> {
        let entry = self.entries.entry(page).or_default();
        // A node has at most one request per page open, except that its next request may
        // overtake the confirmation of the one being served (they are not ordered): queue it.
        let duplicate = entry.serving.filter(|(serving, _)| *serving == id);
        let open = duplicate
            .iter()
            .chain(entry.queue.iter())
            .find(|(open, _)| open.node == id.node);
        if let Some(&(previous, _)) = open {
            return Err(DirectoryError::AlreadyRequesting {
                page,
                node: id.node,
                id,
                previous,
            });
        }
        if entry.serving.is_some() {
            entry.queue.push_back((id, access));
            return Ok(());
        }
        Self::serve(self.me, &self.stats, page, entry, id, access, out)
    }

    /// The requester installed what it was granted: record its new state, free the entry and
    /// serve the next waiting request.
    pub fn on_confirm(
        &mut self,
        page: u64,
        id: RequestId,
        out: &mut Vec<Outgoing>,
    ) -> Result<(), DirectoryError> {
        let Entry::Occupied(mut slot) = self.entries.entry(page) else {
            return Err(DirectoryError::UnexpectedConfirm {
                page,
                id,
                serving: None,
            });
        };
        let entry = slot.get_mut();
        let access = match entry.serving {
            Some((serving, access)) if serving == id => access,
            other => {
                return Err(DirectoryError::UnexpectedConfirm {
                    page,
                    id,
                    serving: other.map(|(s, _)| s),
                })
            }
        };
        match access {
            Access::Read => entry.copyset.insert(id.node),
            Access::Write => {
                entry.owner = Some(id.node);
                entry.copyset = NodeSet::only(id.node);
            }
        }
        entry.serving = None;
        match entry.queue.pop_front() {
            Some((next, access)) => {
                Self::serve(self.me, &self.stats, page, entry, next, access, out)
            }
            None => Ok(()),
        }
    }

    /// What the directory knows of `page`.
    pub fn view(&self, page: u64) -> DirectoryView {
        match self.entries.get(&page) {
            Some(e) => DirectoryView {
                owner: e.owner,
                copyset: e.copyset,
                serving: e.serving.map(|(id, _)| id),
                queued: e.queue.len(),
            },
            None => DirectoryView {
                owner: None,
                copyset: NodeSet::EMPTY,
                serving: None,
                queued: 0,
            },
        }
    }

    /// Pages whose entry is serving a request or has requests waiting.
    pub fn busy_pages(&self) -> Vec<u64> {
        let mut pages: Vec<u64> = self
            .entries
            .iter()
            .filter(|(_, e)| e.serving.is_some() || !e.queue.is_empty())
            .map(|(&p, _)| p)
            .collect();
        pages.sort_unstable();
        pages
    }

    /// Picks the node that sends its copy: the home itself when it holds one (saves a hop), else
    /// the owner, else any holder.
    fn data_source(me: NodeId, owner: Option<NodeId>, holders: NodeSet) -> Option<NodeId> {
        if holders.contains(me) {
            Some(me)
        } else if let Some(owner) = owner.filter(|&o| holders.contains(o)) {
            Some(owner)
        } else {
            holders.first()
        }
    }

    fn serve(
        me: NodeId,
        stats: &NodeStats,
        page: u64,
        entry: &mut DirEntry,
        id: RequestId,
        access: Access,
        out: &mut Vec<Outgoing>,
    ) -> Result<(), DirectoryError> {
        let requester = id.node;
        let no_valid_copy = |entry: &DirEntry| DirectoryError::NoValidCopy {
            page,
            requester,
            copyset: entry.copyset,
            owner: entry.owner,
        };
        let others = entry.copyset.without(requester);
        // The grant always comes from the home: it is the requester's only word on which nodes
        // may answer (the data source, the sharers), so no other node can vouch for itself.
        let grant = |sharers: NodeSet, data| Outgoing {
            to: requester,
            msg: DsmMessage::Grant {
                page,
                id,
                access,
                sharers,
                data,
            },
        };
        // A source other than the home sends page data beside the home's grant; the home as its
        // own source grants with the bytes (one message), so its fetch carries the sharers.
        let fetch_from = |source: NodeId, sharers: NodeSet, out: &mut Vec<Outgoing>| {
            if source == me {
                out.push(Outgoing {
                    to: me,
                    msg: DsmMessage::Fetch {
                        page,
                        id,
                        access,
                        sharers,
                    },
                });
            } else {
                out.push(Outgoing {
                    to: source,
                    msg: DsmMessage::Fetch {
                        page,
                        id,
                        access,
                        sharers: NodeSet::EMPTY,
                    },
                });
                out.push(grant(sharers, GrantData::Source(source)));
            }
        };
        match access {
            Access::Read if entry.owner.is_none() => {
                out.push(grant(NodeSet::EMPTY, GrantData::Zero))
            }
            Access::Read => {
                let source = Self::data_source(me, entry.owner, others)
                    .ok_or_else(|| no_valid_copy(entry))?;
                fetch_from(source, NodeSet::EMPTY, out);
            }
            Access::Write => {
                // An upgrade keeps the requester's copy; a never-written page moves as the zero
                // flag; otherwise one holder sends its copy and the rest only drop theirs.
                let source = if entry.copyset.contains(requester) || entry.owner.is_none() {
                    None
                } else {
                    Some(
                        Self::data_source(me, entry.owner, others)
                            .ok_or_else(|| no_valid_copy(entry))?,
                    )
                };
                let sharers = match source {
                    Some(source) => others.without(source),
                    None => others,
                };
                for sharer in sharers.iter() {
                    out.push(Outgoing {
                        to: sharer,
                        msg: DsmMessage::Invalidate { page, id },
                    });
                }
                match source {
                    Some(source) => fetch_from(source, sharers, out),
                    None if entry.copyset.contains(requester) => {
                        out.push(grant(sharers, GrantData::Keep))
                    }
                    None => out.push(grant(sharers, GrantData::Zero)),
                }
            }
        }
        entry.serving = Some((id, access));
        stats.record_served_as_home();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::test_grant as grant;

    const HOME: NodeId = 0;

    fn dir() -> HomeDirectory {
        HomeDirectory::new(HOME, Arc::new(NodeStats::new(16, 0)))
    }

    fn id(node: NodeId, seq: u64) -> RequestId {
        RequestId { node, seq }
    }

    fn msgs(out: &mut Vec<Outgoing>) -> Vec<(NodeId, DsmMessage)> {
        out.drain(..).map(|o| (o.to, o.msg)).collect()
    }

    /// A fetch to a source other than the home (which the home's own grant accompanies).
    fn fetch(page: u64, id: RequestId, access: Access) -> DsmMessage {
        DsmMessage::Fetch {
            page,
            id,
            access,
            sharers: NodeSet::EMPTY,
        }
    }

    fn set(nodes: &[NodeId]) -> NodeSet {
        let mut set = NodeSet::EMPTY;
        nodes.iter().for_each(|&n| set.insert(n));
        set
    }

    #[test]
    fn never_written_page_is_granted_as_zero_flag() {
        let mut d = dir();
        let mut out = Vec::new();
        d.on_request(3, id(1, 1), Access::Read, &mut out).unwrap();
        assert_eq!(
            msgs(&mut out),
            vec![(1, grant(3, id(1, 1), Access::Read, &[], GrantData::Zero))]
        );
        d.on_confirm(3, id(1, 1), &mut out).unwrap();
        // A second reader still gets the flag: nobody has written.
        d.on_request(3, id(2, 1), Access::Read, &mut out).unwrap();
        assert_eq!(
            msgs(&mut out),
            vec![(2, grant(3, id(2, 1), Access::Read, &[], GrantData::Zero))]
        );
        d.on_confirm(3, id(2, 1), &mut out).unwrap();
        // A writer that holds no copy: zero flag, and both readers invalidated.
        d.on_request(3, id(3, 1), Access::Write, &mut out).unwrap();
        assert_eq!(
            msgs(&mut out),
            vec![
                (
                    1,
                    DsmMessage::Invalidate {
                        page: 3,
                        id: id(3, 1)
                    }
                ),
                (
                    2,
                    DsmMessage::Invalidate {
                        page: 3,
                        id: id(3, 1)
                    }
                ),
                (
                    3,
                    grant(3, id(3, 1), Access::Write, &[1, 2], GrantData::Zero)
                ),
            ]
        );
        d.on_confirm(3, id(3, 1), &mut out).unwrap();
        let view = d.view(3);
        assert_eq!(view.owner, Some(3));
        assert_eq!(view.copyset, NodeSet::only(3));
    }

    #[test]
    fn queued_requests_are_served_in_order_after_each_confirm() {
        let mut d = dir();
        let mut out = Vec::new();
        d.on_request(0, id(1, 1), Access::Write, &mut out).unwrap();
        assert_eq!(out.len(), 1);
        out.clear();
        d.on_request(0, id(2, 1), Access::Read, &mut out).unwrap();
        d.on_request(0, id(3, 1), Access::Write, &mut out).unwrap();
        d.on_request(0, id(4, 1), Access::Read, &mut out).unwrap();
        assert!(out.is_empty(), "entry busy: everything waits");
        assert_eq!(d.view(0).queued, 3);
        // Node 1 owns it now: reader 2 is served from node 1 (downgrade).
        d.on_confirm(0, id(1, 1), &mut out).unwrap();
        assert_eq!(
            msgs(&mut out),
            vec![
                (1, fetch(0, id(2, 1), Access::Read)),
                (
                    2,
                    grant(0, id(2, 1), Access::Read, &[], GrantData::Source(1))
                ),
            ]
        );
        d.on_confirm(0, id(2, 1), &mut out).unwrap();
        // Writer 3: owner 1 sends data and drops, sharer 2 drops.
        assert_eq!(
            msgs(&mut out),
            vec![
                (
                    2,
                    DsmMessage::Invalidate {
                        page: 0,
                        id: id(3, 1)
                    }
                ),
                (1, fetch(0, id(3, 1), Access::Write)),
                (
                    3,
                    grant(0, id(3, 1), Access::Write, &[2], GrantData::Source(1))
                ),
            ]
        );
        d.on_confirm(0, id(3, 1), &mut out).unwrap();
        assert_eq!(
            msgs(&mut out),
            vec![
                (3, fetch(0, id(4, 1), Access::Read)),
                (
                    4,
                    grant(0, id(4, 1), Access::Read, &[], GrantData::Source(3))
                ),
            ]
        );
        d.on_confirm(0, id(4, 1), &mut out).unwrap();
        assert!(out.is_empty());
        assert!(d.busy_pages().is_empty());
        let view = d.view(0);
        assert_eq!((view.owner, view.copyset.len()), (Some(3), 2));
    }

    #[test]
    fn upgrade_racing_an_invalidation_gets_data() {
        // Nodes 1 and 2 share the page (1 owns it); both try to upgrade at once. The first
        // served upgrade invalidates the other, whose request then needs data, not a "keep".
        let mut d = dir();
        let mut out = Vec::new();
        d.on_request(5, id(1, 1), Access::Write, &mut out).unwrap();
        d.on_confirm(5, id(1, 1), &mut out).unwrap();
        d.on_request(5, id(2, 1), Access::Read, &mut out).unwrap();
        d.on_confirm(5, id(2, 1), &mut out).unwrap();
        out.clear();
        d.on_request(5, id(2, 2), Access::Write, &mut out).unwrap();
        d.on_request(5, id(1, 2), Access::Write, &mut out).unwrap();
        assert_eq!(
            msgs(&mut out),
            vec![
                (
                    1,
                    DsmMessage::Invalidate {
                        page: 5,
                        id: id(2, 2)
                    }
                ),
                (2, grant(5, id(2, 2), Access::Write, &[1], GrantData::Keep)),
            ]
        );
        d.on_confirm(5, id(2, 2), &mut out).unwrap();
        assert_eq!(
            msgs(&mut out),
            vec![
                (2, fetch(5, id(1, 2), Access::Write)),
                (
                    1,
                    grant(5, id(1, 2), Access::Write, &[], GrantData::Source(2))
                ),
            ]
        );
    }

    #[test]
    fn home_holding_a_copy_serves_it_itself() {
        let mut d = dir();
        let mut out = Vec::new();
        d.on_request(1, id(2, 1), Access::Write, &mut out).unwrap();
        d.on_confirm(1, id(2, 1), &mut out).unwrap();
        d.on_request(1, id(HOME, 1), Access::Read, &mut out)
            .unwrap();
        d.on_confirm(1, id(HOME, 1), &mut out).unwrap();
        out.clear();
        // Home and owner 2 both hold it: the home is the source for reader 3.
        d.on_request(1, id(3, 1), Access::Read, &mut out).unwrap();
        // The home's grant will carry the bytes: no separate grant, nothing to name.
        assert_eq!(
            msgs(&mut out),
            vec![(HOME, fetch(1, id(3, 1), Access::Read))]
        );
        d.on_confirm(1, id(3, 1), &mut out).unwrap();
        // A writer: the home sends its copy with a grant naming the other holders, which its
        // own fetch therefore carries; nobody else is told who acknowledges.
        d.on_request(1, id(4, 1), Access::Write, &mut out).unwrap();
        assert_eq!(
            msgs(&mut out),
            vec![
                (
                    2,
                    DsmMessage::Invalidate {
                        page: 1,
                        id: id(4, 1)
                    }
                ),
                (
                    3,
                    DsmMessage::Invalidate {
                        page: 1,
                        id: id(4, 1)
                    }
                ),
                (
                    HOME,
                    DsmMessage::Fetch {
                        page: 1,
                        id: id(4, 1),
                        access: Access::Write,
                        sharers: set(&[2, 3]),
                    }
                ),
            ]
        );
    }

    #[test]
    fn misbehaving_peers_are_refused_without_harm() {
        let mut d = dir();
        let mut out = Vec::new();
        assert!(matches!(
            d.on_confirm(2, id(1, 1), &mut out),
            Err(DirectoryError::UnexpectedConfirm { .. })
        ));
        d.on_request(2, id(1, 1), Access::Read, &mut out).unwrap();
        let err = d
            .on_request(2, id(1, 1), Access::Read, &mut out)
            .unwrap_err();
        assert!(matches!(err, DirectoryError::AlreadyRequesting { .. }));
        assert!(!err.is_fatal());
        // The node's next request overtook its confirmation: it waits its turn.
        d.on_request(2, id(1, 2), Access::Write, &mut out).unwrap();
        assert!(matches!(
            d.on_request(2, id(1, 3), Access::Write, &mut out),
            Err(DirectoryError::AlreadyRequesting { .. })
        ));
        assert!(matches!(
            d.on_confirm(2, id(1, 2), &mut out),
            Err(DirectoryError::UnexpectedConfirm { .. })
        ));
        out.clear();
        d.on_confirm(2, id(1, 1), &mut out).unwrap();
        assert_eq!(d.view(2).copyset, NodeSet::only(1));
        assert_eq!(
            msgs(&mut out),
            vec![(1, grant(2, id(1, 2), Access::Write, &[], GrantData::Keep))]
        );
    }
}
