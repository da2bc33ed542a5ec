//! A node's side of the protocol: the local state of each page, the requests this node has in
//! flight, and what it does when the home asks it to give up or send a copy.
//!
//! A pure state machine over a [`GuestPages`]: local faults and pins go in and become requests;
//! incoming fetches, invalidations, acknowledgements and grants become memory operations and
//! replies. Outgoing messages are appended to a caller's buffer and sent by the caller after it
//! releases its lock.
//!
//! One request per page is in flight at a time: later faults on the page join it (a write fault
//! joining a read request makes the node ask for the write as soon as the read is installed). A
//! request completes when the home's grant, the page data from the source it names (if any) and
//! one invalidation acknowledgement from each sharer it names have arrived, in whatever order;
//! then the page is installed and the home is told.
//!
//! Only the home knows who may answer a request, and it says so in the grant. Page data and
//! acknowledgements travel from other nodes on other connections, so they may arrive before it:
//! they are kept, per sender, and checked when the grant arrives (rather than fixing the order,
//! which would cost the data source's answer a wait for the home's). Anything that contradicts
//! the grant (a grant not from the home, data from a node that is not the named source, an
//! acknowledgement from a node that is not a named sharer, a second one from the same node) is
//! [`NodeError::Violation`]: never counted, and fatal, since the peer breaks single-writer.
//!
//! Pins keep a page in the state the VMM needs: a fetch or invalidation that would take that
//! state away waits in `deferred` until the last conflicting pin ends (at most one can wait per
//! page, since the home serves one request per page at a time). While it waits, no new pin that
//! it would also wait for is granted: otherwise pins of overlapping users, each taken before the
//! previous one ends, could keep it waiting forever, and the remote request behind it with it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use thiserror::Error;

use crate::memory::{GuestPages, MemoryError, PageContent};
use crate::protocol::{
    new_page_buf, Access, DsmMessage, GrantData, Outgoing, PageBuf, RequestId, RequestIds,
};
use crate::stats::{NodeStats, RequestKind};
use crate::{HomeFn, NodeId, NodeSet};

/// The local state of a page on a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PageState {
    /// Not mapped; any access faults.
    Invalid,
    /// Mapped and write-protected: one of possibly several identical copies.
    Shared,
    /// Mapped writable: the only valid copy.
    Modified,
}

impl PageState {
    /// Whether an access of this kind can proceed without the DSM.
    pub fn allows(self, access: Access) -> bool {
        match access {
            Access::Read => self != PageState::Invalid,
            Access::Write => self == PageState::Modified,
        }
    }
}

/// What became of a local access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocalOutcome {
    /// The page already allows the access: wake whoever faulted.
    Satisfied,
    /// A request for the page is already in flight; its completion wakes the faulting threads.
    Joined,
    /// A new request went out (in the caller's buffer).
    Requested,
}

/// What became of a pin attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PinOutcome {
    /// The page is pinned in a state allowing the access.
    Pinned,
    /// A request is in flight; try again when it completes.
    Waiting,
    /// The home is taking the access away (an invalidation or downgrade waits for the pins
    /// already held); try again once it has run, which may then need a new request.
    Revoking,
}

/// A request of this node that completed: the page is now installed in `state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The page.
    pub page: u64,
    /// Its new local state.
    pub state: PageState,
}

/// Errors of the node state machine. [`NodeError::is_fatal`] says whether the node must stop.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum NodeError {
    /// The page is not one this state machine covers.
    #[error("page {page:#x} is outside the {page_count} pages this node's DSM covers")]
    PageOutOfRange {
        /// The page.
        page: u64,
        /// Pages covered.
        page_count: u64,
    },
    /// The layout names a home node that does not exist.
    #[error("the layout says node {home} is home of page {page:#x}, but the cluster has {node_count} nodes")]
    BadHome {
        /// The page.
        page: u64,
        /// The home the layout returned.
        home: NodeId,
        /// Nodes in the cluster.
        node_count: NodeId,
    },
    /// A reply names a request this node does not have in flight (stale, duplicated or forged).
    #[error("{what} for page {page:#x} names request {id}, which this node does not have in flight; ignored")]
    UnknownRequest {
        /// The message.
        what: &'static str,
        /// The page.
        page: u64,
        /// The request it names.
        id: RequestId,
    },
    /// A second grant for one request, or a grant of another access than requested.
    #[error("unexpected grant for page {page:#x}, request {id}: {reason}; ignored")]
    BadGrant {
        /// The page.
        page: u64,
        /// The request.
        id: RequestId,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A message meant for the page's home reached the node state machine.
    #[error("{what} for page {page:#x} is for the home directory, not a node's pages")]
    NotForNode {
        /// The message.
        what: &'static str,
        /// The page.
        page: u64,
    },
    /// An unpin without a matching pin.
    #[error("unpin of page {page:#x} for {access} without a matching pin")]
    NotPinned {
        /// The page.
        page: u64,
        /// The access of the unpin.
        access: Access,
    },
    /// Too many concurrent pins of one page.
    #[error("page {page:#x} is pinned {count} times for {access}: too many concurrent pins")]
    TooManyPins {
        /// The page.
        page: u64,
        /// The access.
        access: Access,
        /// Pins already held.
        count: u16,
    },
    /// A reply to a live request of this node came from a node the home's grant does not name
    /// for it, or came twice: a peer (or an attacker on the network) is trying to break
    /// single-writer. It is not counted, and the node stops rather than trust the peers further.
    #[error("{what} for page {page:#x}, request {id}, from node {from} refused: {reason}; a peer breaks the DSM protocol (check that node, and the network between the nodes)")]
    Violation {
        /// The message.
        what: &'static str,
        /// The page.
        page: u64,
        /// The request it names.
        id: RequestId,
        /// The node it came from.
        from: NodeId,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// What the home asked contradicts this node's state: continuing could lose data.
    #[error("page {page:#x} is {state:?} here, but {what}: the DSM state is inconsistent")]
    Inconsistent {
        /// The page.
        page: u64,
        /// This node's state of it.
        state: PageState,
        /// What contradicts it.
        what: &'static str,
    },
    /// A local memory operation failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

impl NodeError {
    /// Whether the node must stop: its memory or the protocol state can no longer be trusted.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            NodeError::BadHome { .. }
                | NodeError::Violation { .. }
                | NodeError::Inconsistent { .. }
                | NodeError::Memory(_)
        )
    }
}

#[derive(Clone, Copy, Debug)]
struct PageEntry {
    state: PageState,
    read_pins: u16,
    write_pins: u16,
}

/// What the home's grant said.
struct ReceivedGrant {
    sharers: NodeSet,
    data: GrantData,
}

struct Pending {
    id: RequestId,
    access: Access,
    grant: Option<ReceivedGrant>,
    /// Page data and its sender. Before the grant there is room for one sender only: two
    /// different senders of data for one request mean one of them lies, whoever it is.
    copy: Option<(NodeId, PageBuf)>,
    /// Nodes whose acknowledgement arrived (before the grant: checked against it on arrival).
    acked: NodeSet,
    started: Instant,
    /// A write fault arrived while this read request was in flight.
    then_write: bool,
    /// Some message of this request crossed the network.
    remote: bool,
}

/// A fetch or invalidation waiting for pins to end.
enum Deferred {
    Fetch {
        id: RequestId,
        access: Access,
        sharers: NodeSet,
    },
    Invalidate {
        id: RequestId,
    },
}

/// The local pages of one node (or one shard of them: pages `p` with `p % stride == offset`).
pub struct NodePages {
    me: NodeId,
    node_count: NodeId,
    page_count: u64,
    stride: u64,
    offset: u64,
    home_of: HomeFn,
    entries: Vec<PageEntry>,
    pending: HashMap<u64, Pending>,
    deferred: HashMap<u64, Deferred>,
    /// Counter of this shard's requests (`offset`, then steps of `stride`), made an id by `ids`.
    next_seq: u64,
    ids: RequestIds,
    stats: Arc<NodeStats>,
}

impl NodePages {
    /// All `page_count` pages of node `me`, every one Invalid.
    pub fn new(
        me: NodeId,
        node_count: NodeId,
        page_count: u64,
        home_of: HomeFn,
        stats: Arc<NodeStats>,
    ) -> NodePages {
        let ids = RequestIds::new();
        Self::new_shard(me, node_count, page_count, 1, 0, home_of, ids, stats)
    }

    /// The pages `p < page_count` with `p % stride == offset`, every one Invalid. Request ids of
    /// different shards of one node made with the same `ids` never collide.
    #[allow(clippy::too_many_arguments)]
    pub fn new_shard(
        me: NodeId,
        node_count: NodeId,
        page_count: u64,
        stride: u64,
        offset: u64,
        home_of: HomeFn,
        ids: RequestIds,
        stats: Arc<NodeStats>,
    ) -> NodePages {
        let stride = stride.max(1);
        let len = page_count.saturating_sub(offset).div_ceil(stride);
        NodePages {
            me,
            node_count,
            page_count,
            stride,
            offset,
            home_of,
            entries: (0..len)
                .map(|_| PageEntry {
                    state: PageState::Invalid,
                    read_pins: 0,
                    write_pins: 0,
                })
                .collect(),
            pending: HashMap::new(),
            deferred: HashMap::new(),
            next_seq: offset,
            ids,
            stats,
        }
    }

    /// The local state of `page` (Invalid for pages outside this machine).
    pub fn state(&self, page: u64) -> PageState {
        self.index(page)
            .map_or(PageState::Invalid, |i| self.entries[i].state)
    }

    /// Whether a request for `page` is in flight.
    pub fn has_pending(&self, page: u64) -> bool {
        self.pending.contains_key(&page)
    }

    /// Pages with a request in flight.
    pub fn pending_pages(&self) -> Vec<u64> {
        let mut pages: Vec<u64> = self.pending.keys().copied().collect();
        pages.sort_unstable();
        pages
    }

    /// Pages with a fetch or invalidation waiting for a pin to end.
    pub fn deferred_pages(&self) -> Vec<u64> {
        let mut pages: Vec<u64> = self.deferred.keys().copied().collect();
        pages.sort_unstable();
        pages
    }

    /// Whether a fetch or invalidation of `page` waits for pins to end.
    pub fn has_deferred(&self, page: u64) -> bool {
        self.deferred.contains_key(&page)
    }

    /// Pins held on `page`: `(read, write)`.
    pub fn pins(&self, page: u64) -> (u16, u16) {
        self.index(page).map_or((0, 0), |i| {
            (self.entries[i].read_pins, self.entries[i].write_pins)
        })
    }

    /// A local thread faulted on `page` needing `access`.
    pub fn fault(
        &mut self,
        page: u64,
        access: Access,
        now: Instant,
        out: &mut Vec<Outgoing>,
    ) -> Result<LocalOutcome, NodeError> {
        let index = self.index_checked(page)?;
        self.stats.record_fault(page, access == Access::Write);
        if self.entries[index].state.allows(access) {
            self.stats.record_resolved();
            return Ok(LocalOutcome::Satisfied);
        }
        let outcome = self.request(page, access, now, out)?;
        if outcome == LocalOutcome::Joined {
            self.stats.record_merged();
        }
        Ok(outcome)
    }

    /// The VMM wants `page` kept in a state allowing `access`: pins it if it already is and
    /// nothing waits to take that state away, else makes sure a request is in flight (try again
    /// after it completes) or says that a revocation goes first (try again after it ran).
    pub fn try_pin(
        &mut self,
        page: u64,
        access: Access,
        now: Instant,
        out: &mut Vec<Outgoing>,
    ) -> Result<PinOutcome, NodeError> {
        let index = self.index_checked(page)?;
        let entry = &mut self.entries[index];
        if !entry.state.allows(access) {
            self.request(page, access, now, out)?;
            return Ok(PinOutcome::Waiting);
        }
        if let Some(deferred) = self.deferred.get(&page) {
            if Self::pin_holds_up(access, deferred) {
                return Ok(PinOutcome::Revoking);
            }
        }
        let count = match access {
            Access::Read => &mut entry.read_pins,
            Access::Write => &mut entry.write_pins,
        };
        *count = count.checked_add(1).ok_or(NodeError::TooManyPins {
            page,
            access,
            count: *count,
        })?;
        self.stats.record_pin();
        Ok(PinOutcome::Pinned)
    }

    /// Ends one pin of `page`; a fetch or invalidation that waited for it runs now.
    pub fn unpin(
        &mut self,
        page: u64,
        access: Access,
        memory: &dyn GuestPages,
        out: &mut Vec<Outgoing>,
    ) -> Result<(), NodeError> {
        let index = self.index_checked(page)?;
        let entry = &mut self.entries[index];
        let count = match access {
            Access::Read => &mut entry.read_pins,
            Access::Write => &mut entry.write_pins,
        };
        *count = count
            .checked_sub(1)
            .ok_or(NodeError::NotPinned { page, access })?;
        let entry = *entry;
        let runnable = match self.deferred.get(&page) {
            Some(deferred) => !Self::blocked_by_pins(entry, deferred),
            None => false,
        };
        if runnable {
            if let Some(deferred) = self.deferred.remove(&page) {
                match deferred {
                    Deferred::Fetch {
                        id,
                        access,
                        sharers,
                    } => self.send_copy(page, index, id, access, sharers, memory, out)?,
                    Deferred::Invalidate { id } => self.drop_copy(page, index, id, memory, out)?,
                }
            }
        }
        Ok(())
    }

    /// A message from node `from` (possibly this node) that concerns this node's pages.
    pub fn on_message(
        &mut self,
        from: NodeId,
        msg: DsmMessage,
        now: Instant,
        memory: &dyn GuestPages,
        out: &mut Vec<Outgoing>,
    ) -> Result<Option<Completion>, NodeError> {
        match msg {
            DsmMessage::Fetch {
                page,
                id,
                access,
                sharers,
            } => {
                let index = self.index_checked(page)?;
                let deferred = Deferred::Fetch {
                    id,
                    access,
                    sharers,
                };
                if self.defer_if_pinned(page, index, deferred)? {
                    return Ok(None);
                }
                self.send_copy(page, index, id, access, sharers, memory, out)?;
                Ok(None)
            }
            DsmMessage::Invalidate { page, id } => {
                let index = self.index_checked(page)?;
                if self.defer_if_pinned(page, index, Deferred::Invalidate { id })? {
                    return Ok(None);
                }
                self.drop_copy(page, index, id, memory, out)?;
                Ok(None)
            }
            DsmMessage::InvalidateAck { page, id } => {
                let (me, node_count) = (self.me, self.node_count);
                let pending = self.pending_for(page, id, "invalidation acknowledgement")?;
                let violation = |reason| NodeError::Violation {
                    what: "invalidation acknowledgement",
                    page,
                    id,
                    from,
                    reason,
                };
                if from >= node_count || from == me {
                    return Err(violation("no node of the cluster but this one sent it"));
                }
                if pending.acked.contains(from) {
                    return Err(violation("that node acknowledged already"));
                }
                if let Some(grant) = &pending.grant {
                    if !grant.sharers.contains(from) {
                        return Err(violation("the home's grant does not name it as a sharer"));
                    }
                }
                pending.acked.insert(from);
                pending.remote = true;
                self.try_complete(page, now, memory, out)
            }
            DsmMessage::PageData { page, id, data } => {
                let pending = self.pending_for(page, id, "page data")?;
                let violation = |reason| NodeError::Violation {
                    what: "page data",
                    page,
                    id,
                    from,
                    reason,
                };
                if let Some(grant) = &pending.grant {
                    if grant.data != GrantData::Source(from) {
                        return Err(violation("the home's grant does not name it as the source"));
                    }
                }
                if pending.copy.is_some() {
                    return Err(violation("page data for the request arrived already"));
                }
                pending.copy = Some((from, data));
                pending.remote = true;
                self.try_complete(page, now, memory, out)
            }
            DsmMessage::Grant {
                page,
                id,
                access,
                sharers,
                data,
            } => {
                let (me, home) = (self.me, self.home(page)?);
                let pending = self.pending_for(page, id, "grant")?;
                let violation = |reason| NodeError::Violation {
                    what: "grant",
                    page,
                    id,
                    from,
                    reason,
                };
                if from != home {
                    return Err(violation("only the page's home grants"));
                }
                if pending.grant.is_some() {
                    return Err(NodeError::BadGrant {
                        page,
                        id,
                        reason: "the request was already granted",
                    });
                }
                if pending.access != access {
                    return Err(NodeError::BadGrant {
                        page,
                        id,
                        reason: "it grants another access than requested",
                    });
                }
                // What came before the grant is checked against it now, as if it came after.
                if !pending.acked.is_subset(sharers) {
                    return Err(violation(
                        "a node it does not name as a sharer acknowledged before it",
                    ));
                }
                if let Some((sender, _)) = &pending.copy {
                    if data != GrantData::Source(*sender) {
                        return Err(violation(
                            "a node it does not name as the source sent page data before it",
                        ));
                    }
                }
                pending.grant = Some(ReceivedGrant { sharers, data });
                pending.remote |= from != me;
                self.try_complete(page, now, memory, out)
            }
            DsmMessage::Request { page, .. } | DsmMessage::Confirm { page, .. } => {
                Err(NodeError::NotForNode {
                    what: msg.name(),
                    page,
                })
            }
        }
    }

    fn index(&self, page: u64) -> Option<usize> {
        (page < self.page_count && page % self.stride == self.offset)
            .then(|| usize::try_from(page / self.stride).ok())
            .flatten()
    }

    fn index_checked(&self, page: u64) -> Result<usize, NodeError> {
        self.index(page).ok_or(NodeError::PageOutOfRange {
            page,
            page_count: self.page_count,
        })
    }

    fn home(&self, page: u64) -> Result<NodeId, NodeError> {
        let home = (self.home_of)(page);
        if home < self.node_count {
            Ok(home)
        } else {
            Err(NodeError::BadHome {
                page,
                home,
                node_count: self.node_count,
            })
        }
    }

    /// Makes sure a request covering `access` is in flight for `page`.
    fn request(
        &mut self,
        page: u64,
        access: Access,
        now: Instant,
        out: &mut Vec<Outgoing>,
    ) -> Result<LocalOutcome, NodeError> {
        if let Some(pending) = self.pending.get_mut(&page) {
            if access == Access::Write && pending.access == Access::Read {
                pending.then_write = true;
            }
            return Ok(LocalOutcome::Joined);
        }
        let home = self.home(page)?;
        let id = self.ids.id(self.me, self.next_seq);
        self.next_seq += self.stride;
        self.pending.insert(
            page,
            Pending {
                id,
                access,
                grant: None,
                copy: None,
                acked: NodeSet::EMPTY,
                started: now,
                then_write: false,
                remote: home != self.me,
            },
        );
        out.push(Outgoing {
            to: home,
            msg: DsmMessage::Request { page, id, access },
        });
        Ok(LocalOutcome::Requested)
    }

    fn pending_for(
        &mut self,
        page: u64,
        id: RequestId,
        what: &'static str,
    ) -> Result<&mut Pending, NodeError> {
        match self.pending.get_mut(&page) {
            Some(pending) if pending.id == id => Ok(pending),
            _ => Err(NodeError::UnknownRequest { what, page, id }),
        }
    }

    /// Whether a pin for `access` must wait for the fetch or invalidation `deferred`.
    fn pin_holds_up(access: Access, deferred: &Deferred) -> bool {
        match deferred {
            // A downgrade keeps the page readable: only a write pin stops it.
            Deferred::Fetch {
                access: Access::Read,
                ..
            } => access == Access::Write,
            _ => true,
        }
    }

    fn blocked_by_pins(entry: PageEntry, deferred: &Deferred) -> bool {
        (entry.read_pins > 0 && Self::pin_holds_up(Access::Read, deferred))
            || (entry.write_pins > 0 && Self::pin_holds_up(Access::Write, deferred))
    }

    fn defer_if_pinned(
        &mut self,
        page: u64,
        index: usize,
        deferred: Deferred,
    ) -> Result<bool, NodeError> {
        if !Self::blocked_by_pins(self.entries[index], &deferred) {
            return Ok(false);
        }
        if self.deferred.contains_key(&page) {
            return Err(NodeError::Inconsistent {
                page,
                state: self.entries[index].state,
                what: "the home sent a second downgrade or invalidation while one waits for a pin",
            });
        }
        self.deferred.insert(page, deferred);
        self.stats.record_deferred();
        Ok(true)
    }

    /// Serves a fetch: write-protect first if Modified (no write may slip in after the copy),
    /// copy, and for a write also drop the page, then send the copy to the requester.
    #[allow(clippy::too_many_arguments)]
    fn send_copy(
        &mut self,
        page: u64,
        index: usize,
        id: RequestId,
        access: Access,
        sharers: NodeSet,
        memory: &dyn GuestPages,
        out: &mut Vec<Outgoing>,
    ) -> Result<(), NodeError> {
        let home = self.home(page)?;
        let entry = &mut self.entries[index];
        if entry.state == PageState::Invalid {
            return Err(NodeError::Inconsistent {
                page,
                state: entry.state,
                what: "the home asked this node for a copy",
            });
        }
        if entry.state == PageState::Modified {
            memory.write_protect(page)?;
            entry.state = PageState::Shared;
        }
        let mut bytes = new_page_buf();
        memory.read_page(page, &mut bytes)?;
        if access == Access::Write {
            memory.drop_page(page)?;
            entry.state = PageState::Invalid;
            self.stats.record_invalidation();
        }
        self.stats.record_served_as_source();
        // The home grants with its bytes; any other source only sends them, as the home's
        // grant tells the requester to expect.
        let msg = if home == self.me {
            DsmMessage::Grant {
                page,
                id,
                access,
                sharers,
                data: GrantData::Bytes(bytes),
            }
        } else {
            DsmMessage::PageData {
                page,
                id,
                data: bytes,
            }
        };
        out.push(Outgoing { to: id.node, msg });
        Ok(())
    }

    /// Serves an invalidation of a Shared copy: drop it and acknowledge to the requester.
    fn drop_copy(
        &mut self,
        page: u64,
        index: usize,
        id: RequestId,
        memory: &dyn GuestPages,
        out: &mut Vec<Outgoing>,
    ) -> Result<(), NodeError> {
        let entry = &mut self.entries[index];
        if entry.state != PageState::Shared {
            return Err(NodeError::Inconsistent {
                page,
                state: entry.state,
                what: "the home asked this node to drop a shared copy",
            });
        }
        memory.drop_page(page)?;
        entry.state = PageState::Invalid;
        self.stats.record_invalidation();
        out.push(Outgoing {
            to: id.node,
            msg: DsmMessage::InvalidateAck { page, id },
        });
        Ok(())
    }

    /// Installs the page once the grant, its data and an acknowledgement of every sharer it
    /// names are in.
    fn try_complete(
        &mut self,
        page: u64,
        now: Instant,
        memory: &dyn GuestPages,
        out: &mut Vec<Outgoing>,
    ) -> Result<Option<Completion>, NodeError> {
        let Some(pending) = self.pending.get(&page) else {
            return Ok(None);
        };
        let Some(grant) = &pending.grant else {
            return Ok(None);
        };
        // Every early acknowledgement and copy was checked against the grant, so equal sets
        // mean each sharer acknowledged exactly once.
        let data_in = !matches!(grant.data, GrantData::Source(_)) || pending.copy.is_some();
        if pending.acked != grant.sharers || !data_in {
            return Ok(None);
        }
        let index = self.index_checked(page)?;
        let state = self.entries[index].state;
        let expected = match (&grant.data, pending.access) {
            (GrantData::Keep, _) => PageState::Shared,
            _ => PageState::Invalid,
        };
        if state != expected {
            return Err(NodeError::Inconsistent {
                page,
                state,
                what: match expected {
                    PageState::Shared => "the home granted an upgrade of a copy this node lacks",
                    _ => "the home granted a copy while this node holds one",
                },
            });
        }
        if let (GrantData::Keep, Access::Read) = (&grant.data, pending.access) {
            return Err(NodeError::BadGrant {
                page,
                id: pending.id,
                reason: "a read grant cannot keep a copy",
            });
        }
        let Some(done) = self.pending.remove(&page) else {
            return Ok(None);
        };
        let Some(grant) = done.grant else {
            return Ok(None);
        };
        let copy = done.copy.map(|(_, bytes)| bytes);
        let (kind, new_state) = match (&grant.data, done.access) {
            (GrantData::Keep, _) => (RequestKind::Upgrade, PageState::Modified),
            (_, Access::Write) => (RequestKind::Write, PageState::Modified),
            (_, Access::Read) => (RequestKind::Read, PageState::Shared),
        };
        // Count before the memory operation: it wakes the faulting threads, and whoever they
        // tell must find the completion counted.
        self.stats.record_completed(
            kind,
            done.remote,
            now.saturating_duration_since(done.started),
        );
        let writable = new_state == PageState::Modified;
        match (&grant.data, &copy) {
            (GrantData::Keep, _) => memory.make_writable(page)?,
            (GrantData::Bytes(bytes), _) | (GrantData::Source(_), Some(bytes)) => {
                memory.install(page, PageContent::Bytes(bytes), writable)?
            }
            (GrantData::Source(_), None) => {
                return Err(NodeError::Inconsistent {
                    page,
                    state,
                    what: "a grant completed without the page data it names",
                })
            }
            (GrantData::Zero, _) => {
                self.stats.record_zero_page();
                memory.install(page, PageContent::Zero, writable)?
            }
        }
        self.entries[index].state = new_state;
        out.push(Outgoing {
            to: self.home(page)?,
            msg: DsmMessage::Confirm { page, id: done.id },
        });
        if done.then_write && new_state == PageState::Shared {
            self.request(page, Access::Write, now, out)?;
        }
        Ok(Some(Completion {
            page,
            state: new_state,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::heap::{HeapPages, Mapping};
    use crate::protocol::test_grant as grant;

    const ME: NodeId = 1;
    const HOME: NodeId = 0;

    struct Fixture {
        node: NodePages,
        memory: HeapPages,
        out: Vec<Outgoing>,
    }

    fn fixture() -> Fixture {
        fixture_of(3)
    }

    fn fixture_of(nodes: NodeId) -> Fixture {
        let stats = Arc::new(NodeStats::new(8, 0));
        Fixture {
            node: NodePages::new(ME, nodes, 8, Arc::new(|_| HOME), stats),
            memory: HeapPages::new(8),
            out: Vec::new(),
        }
    }

    impl Fixture {
        fn fault(&mut self, page: u64, access: Access) -> LocalOutcome {
            self.node
                .fault(page, access, Instant::now(), &mut self.out)
                .unwrap()
        }

        fn deliver(
            &mut self,
            from: NodeId,
            msg: DsmMessage,
        ) -> Result<Option<Completion>, NodeError> {
            self.node
                .on_message(from, msg, Instant::now(), &self.memory, &mut self.out)
        }

        fn sent(&mut self) -> Vec<(NodeId, DsmMessage)> {
            self.out.drain(..).map(|o| (o.to, o.msg)).collect()
        }

        /// The request id of the single request just sent.
        fn requested(&mut self, page: u64, access: Access) -> RequestId {
            match self.sent().as_slice() {
                [(
                    HOME,
                    DsmMessage::Request {
                        page: p,
                        id,
                        access: a,
                    },
                )] if *p == page && *a == access => *id,
                other => panic!("expected one {access} request for page {page}, got {other:?}"),
            }
        }

        /// Brings `page` to Modified with content `fill`.
        fn make_modified(&mut self, page: u64, fill: u8) {
            self.fault(page, Access::Write);
            let id = self.requested(page, Access::Write);
            let data = GrantData::Bytes(Box::new([fill; crate::PAGE_SIZE]));
            self.deliver(HOME, grant(page, id, Access::Write, &[], data))
                .unwrap();
            self.sent();
        }
    }

    fn page_data(page: u64, id: RequestId, fill: u8) -> DsmMessage {
        DsmMessage::PageData {
            page,
            id,
            data: Box::new([fill; crate::PAGE_SIZE]),
        }
    }

    fn other(seq: u64) -> RequestId {
        RequestId { node: 2, seq }
    }

    #[test]
    fn read_fault_installs_write_protected_and_confirms() {
        let mut f = fixture();
        assert_eq!(f.fault(3, Access::Read), LocalOutcome::Requested);
        let id = f.requested(3, Access::Read);
        let done = f
            .deliver(HOME, grant(3, id, Access::Read, &[], GrantData::Zero))
            .unwrap();
        assert_eq!(
            done,
            Some(Completion {
                page: 3,
                state: PageState::Shared
            })
        );
        assert_eq!(f.sent(), vec![(HOME, DsmMessage::Confirm { page: 3, id })]);
        assert_eq!(f.memory.mapping(3), Mapping::ReadOnly);
        assert_eq!(f.memory.load(3, 0), Some(0));
        assert_eq!(f.fault(3, Access::Read), LocalOutcome::Satisfied);
    }

    #[test]
    fn concurrent_faults_share_one_request() {
        let mut f = fixture();
        assert_eq!(f.fault(2, Access::Read), LocalOutcome::Requested);
        assert_eq!(f.fault(2, Access::Read), LocalOutcome::Joined);
        assert_eq!(f.fault(2, Access::Read), LocalOutcome::Joined);
        assert_eq!(f.sent().len(), 1);
    }

    #[test]
    fn write_fault_during_a_read_asks_for_the_write_after_it() {
        let mut f = fixture();
        f.fault(4, Access::Read);
        let read = f.requested(4, Access::Read);
        assert_eq!(f.fault(4, Access::Write), LocalOutcome::Joined);
        assert!(f.sent().is_empty(), "one request per page in flight");
        f.deliver(HOME, grant(4, read, Access::Read, &[], GrantData::Zero))
            .unwrap();
        let sent = f.sent();
        assert_eq!(sent.len(), 2);
        assert_eq!(sent[0], (HOME, DsmMessage::Confirm { page: 4, id: read }));
        let DsmMessage::Request {
            id: write,
            access: Access::Write,
            ..
        } = sent[1].1
        else {
            panic!("expected the write request after the confirm, got {sent:?}");
        };
        // The upgrade keeps the copy.
        f.deliver(HOME, grant(4, write, Access::Write, &[], GrantData::Keep))
            .unwrap();
        assert_eq!(f.node.state(4), PageState::Modified);
        assert_eq!(f.memory.mapping(4), Mapping::Writable);
    }

    #[test]
    fn acknowledgements_may_arrive_before_the_grant() {
        let mut f = fixture();
        f.fault(1, Access::Write);
        let id = f.requested(1, Access::Write);
        assert_eq!(
            f.deliver(2, DsmMessage::InvalidateAck { page: 1, id }),
            Ok(None)
        );
        assert_eq!(
            f.deliver(0, DsmMessage::InvalidateAck { page: 1, id }),
            Ok(None)
        );
        assert_eq!(f.node.state(1), PageState::Invalid);
        let done = f
            .deliver(HOME, grant(1, id, Access::Write, &[0, 2], GrantData::Zero))
            .unwrap();
        assert_eq!(done.map(|c| c.state), Some(PageState::Modified));
    }

    #[test]
    fn grant_waits_for_every_acknowledgement() {
        let mut f = fixture();
        f.fault(1, Access::Write);
        let id = f.requested(1, Access::Write);
        assert_eq!(
            f.deliver(HOME, grant(1, id, Access::Write, &[2], GrantData::Zero)),
            Ok(None)
        );
        assert_eq!(f.memory.mapping(1), Mapping::NotPresent);
        assert!(f.sent().is_empty());
        assert!(f
            .deliver(2, DsmMessage::InvalidateAck { page: 1, id })
            .unwrap()
            .is_some());
    }

    #[test]
    fn upgrade_that_lost_its_copy_to_an_invalidation_installs_the_data() {
        let mut f = fixture();
        f.fault(5, Access::Read);
        let read = f.requested(5, Access::Read);
        f.deliver(
            HOME,
            grant(5, read, Access::Read, &[], GrantData::Source(2)),
        )
        .unwrap();
        f.deliver(2, page_data(5, read, 1)).unwrap();
        f.sent();
        // Upgrade asked; meanwhile the home serves node 2's write first and invalidates us.
        f.fault(5, Access::Write);
        let write = f.requested(5, Access::Write);
        f.deliver(
            HOME,
            DsmMessage::Invalidate {
                page: 5,
                id: other(9),
            },
        )
        .unwrap();
        assert_eq!(
            f.sent(),
            vec![(
                2,
                DsmMessage::InvalidateAck {
                    page: 5,
                    id: other(9)
                }
            )]
        );
        assert_eq!(f.memory.mapping(5), Mapping::NotPresent);
        // The home now knows we hold nothing and sends the data with the grant.
        let newer = GrantData::Bytes(Box::new([2; crate::PAGE_SIZE]));
        f.deliver(HOME, grant(5, write, Access::Write, &[], newer))
            .unwrap();
        assert_eq!(f.memory.mapping(5), Mapping::Writable);
        assert_eq!(f.memory.load(5, 0), Some(u64::from_le_bytes([2; 8])));
    }

    #[test]
    fn a_keep_grant_without_a_copy_is_fatal() {
        let mut f = fixture();
        f.fault(5, Access::Write);
        let id = f.requested(5, Access::Write);
        let err = f
            .deliver(HOME, grant(5, id, Access::Write, &[], GrantData::Keep))
            .unwrap_err();
        assert!(err.is_fatal(), "{err}");
    }

    #[test]
    fn fetch_for_write_protects_copies_and_drops() {
        let mut f = fixture();
        f.make_modified(6, 7);
        assert!(f.memory.store(6, 8, 99));
        f.deliver(
            HOME,
            DsmMessage::Fetch {
                page: 6,
                id: other(1),
                access: Access::Write,
                sharers: NodeSet::EMPTY,
            },
        )
        .unwrap();
        let sent = f.sent();
        // Not the home: it sends the bytes only; the home's grant names it as their source.
        let [(2, DsmMessage::PageData { data: bytes, .. })] = sent.as_slice() else {
            panic!("expected the page data to the requester, got {sent:?}");
        };
        assert_eq!(bytes[8], 99);
        assert_eq!(bytes[0], 7);
        assert_eq!(f.node.state(6), PageState::Invalid);
        assert_eq!(f.memory.mapping(6), Mapping::NotPresent);
    }

    #[test]
    fn pins_defer_what_would_take_their_access_away() {
        let mut f = fixture();
        f.make_modified(2, 3);
        assert_eq!(
            f.node.try_pin(2, Access::Write, Instant::now(), &mut f.out),
            Ok(PinOutcome::Pinned)
        );
        f.deliver(
            HOME,
            DsmMessage::Fetch {
                page: 2,
                id: other(1),
                access: Access::Read,
                sharers: NodeSet::EMPTY,
            },
        )
        .unwrap();
        assert!(f.sent().is_empty(), "a downgrade waits for the write pin");
        assert_eq!(f.node.deferred_pages(), vec![2]);
        assert!(f.memory.store(2, 0, 42), "still writable while pinned");
        f.node
            .unpin(2, Access::Write, &f.memory, &mut f.out)
            .unwrap();
        let sent = f.sent();
        assert!(
            matches!(sent.as_slice(), [(2, DsmMessage::PageData { .. })]),
            "{sent:?}"
        );
        assert_eq!(f.node.state(2), PageState::Shared);
        // A read pin lets a downgrade through but holds an invalidation.
        f.node
            .try_pin(2, Access::Read, Instant::now(), &mut f.out)
            .unwrap();
        f.deliver(
            HOME,
            DsmMessage::Fetch {
                page: 2,
                id: other(2),
                access: Access::Read,
                sharers: NodeSet::EMPTY,
            },
        )
        .unwrap();
        assert_eq!(f.sent().len(), 1);
        f.deliver(
            HOME,
            DsmMessage::Invalidate {
                page: 2,
                id: other(3),
            },
        )
        .unwrap();
        assert!(f.sent().is_empty());
        assert_eq!(f.memory.load(2, 0), Some(42));
        f.node
            .unpin(2, Access::Read, &f.memory, &mut f.out)
            .unwrap();
        assert_eq!(
            f.sent(),
            vec![(
                2,
                DsmMessage::InvalidateAck {
                    page: 2,
                    id: other(3)
                }
            )]
        );
        assert_eq!(f.node.state(2), PageState::Invalid);
        assert!(matches!(
            f.node.unpin(2, Access::Read, &f.memory, &mut f.out),
            Err(NodeError::NotPinned { .. })
        ));
    }

    #[test]
    fn overlapping_read_pins_do_not_starve_an_invalidation() {
        // Two users of a Shared page pin it in turn, each before the other unpins: without the
        // rule some pin is always held and the invalidation never runs.
        let mut f = fixture();
        f.fault(2, Access::Read);
        let id = f.requested(2, Access::Read);
        f.deliver(HOME, grant(2, id, Access::Read, &[], GrantData::Zero))
            .unwrap();
        f.sent();
        let pin = |f: &mut Fixture| f.node.try_pin(2, Access::Read, Instant::now(), &mut f.out);
        assert_eq!(pin(&mut f), Ok(PinOutcome::Pinned));
        f.deliver(
            HOME,
            DsmMessage::Invalidate {
                page: 2,
                id: other(4),
            },
        )
        .unwrap();
        assert!(f.node.has_deferred(2));
        let mut held = 1;
        let mut cycles = 0;
        while f.node.has_deferred(2) {
            cycles += 1;
            assert!(cycles <= 1, "the invalidation starves behind new pins");
            // The next user arrives while a pin is still held...
            match pin(&mut f).unwrap() {
                PinOutcome::Pinned => held += 1,
                outcome => assert_eq!(outcome, PinOutcome::Revoking),
            }
            // ...and then the oldest pin ends.
            f.node
                .unpin(2, Access::Read, &f.memory, &mut f.out)
                .unwrap();
            held -= 1;
        }
        assert_eq!(held, 0);
        assert_eq!(
            f.sent(),
            vec![(
                2,
                DsmMessage::InvalidateAck {
                    page: 2,
                    id: other(4)
                }
            )]
        );
        assert_eq!(f.node.state(2), PageState::Invalid);
        // The user that gave way asks for the page again.
        assert_eq!(pin(&mut f), Ok(PinOutcome::Waiting));
        assert_eq!(f.requested(2, Access::Read).node, ME);
    }

    #[test]
    fn a_waiting_downgrade_refuses_write_pins_but_not_read_pins() {
        let mut f = fixture();
        f.make_modified(3, 1);
        let pin = |f: &mut Fixture, access| f.node.try_pin(3, access, Instant::now(), &mut f.out);
        assert_eq!(pin(&mut f, Access::Write), Ok(PinOutcome::Pinned));
        f.deliver(
            HOME,
            DsmMessage::Fetch {
                page: 3,
                id: other(5),
                access: Access::Read,
                sharers: NodeSet::EMPTY,
            },
        )
        .unwrap();
        assert_eq!(pin(&mut f, Access::Write), Ok(PinOutcome::Revoking));
        // A read pin survives the downgrade, so it need not wait for it.
        assert_eq!(pin(&mut f, Access::Read), Ok(PinOutcome::Pinned));
        f.node
            .unpin(3, Access::Write, &f.memory, &mut f.out)
            .unwrap();
        assert!(!f.node.has_deferred(3));
        assert_eq!(f.node.state(3), PageState::Shared);
        assert_eq!(f.node.pins(3), (1, 0));
    }

    #[test]
    fn pin_of_an_invalid_page_requests_it() {
        let mut f = fixture();
        assert_eq!(
            f.node.try_pin(7, Access::Read, Instant::now(), &mut f.out),
            Ok(PinOutcome::Waiting)
        );
        let id = f.requested(7, Access::Read);
        assert!(f.node.has_pending(7));
        f.deliver(HOME, grant(7, id, Access::Read, &[], GrantData::Zero))
            .unwrap();
        assert!(!f.node.has_pending(7));
        assert_eq!(
            f.node.try_pin(7, Access::Read, Instant::now(), &mut f.out),
            Ok(PinOutcome::Pinned)
        );
    }

    fn is_violation(result: Result<Option<Completion>, NodeError>) -> bool {
        match result {
            Err(e @ NodeError::Violation { .. }) => e.is_fatal(),
            _ => false,
        }
    }

    /// Nothing installed, nothing confirmed, the request still open.
    fn assert_not_completed(f: &mut Fixture, page: u64) {
        assert_eq!(f.node.state(page), PageState::Invalid);
        assert_eq!(f.memory.mapping(page), Mapping::NotPresent);
        assert!(f.node.has_pending(page));
        assert!(f.sent().is_empty(), "nothing may be confirmed");
    }

    #[test]
    fn a_duplicate_acknowledgement_is_refused_and_does_not_complete() {
        // The attack: sharers {0, 2}; node 2 acknowledges twice while node 0 still holds Shared.
        let mut f = fixture();
        f.fault(1, Access::Write);
        let id = f.requested(1, Access::Write);
        f.deliver(HOME, grant(1, id, Access::Write, &[0, 2], GrantData::Zero))
            .unwrap();
        assert_eq!(
            f.deliver(2, DsmMessage::InvalidateAck { page: 1, id }),
            Ok(None)
        );
        assert!(is_violation(
            f.deliver(2, DsmMessage::InvalidateAck { page: 1, id })
        ));
        assert_not_completed(&mut f, 1);
        // The same before the grant: the second one is refused at once.
        let mut f = fixture();
        f.fault(1, Access::Write);
        let id = f.requested(1, Access::Write);
        f.deliver(2, DsmMessage::InvalidateAck { page: 1, id })
            .unwrap();
        assert!(is_violation(
            f.deliver(2, DsmMessage::InvalidateAck { page: 1, id })
        ));
        assert_eq!(
            f.deliver(HOME, grant(1, id, Access::Write, &[0, 2], GrantData::Zero)),
            Ok(None),
            "one acknowledgement counted, one missing"
        );
        assert_not_completed(&mut f, 1);
    }

    #[test]
    fn an_acknowledgement_from_a_node_that_is_not_a_sharer_is_refused() {
        let mut f = fixture_of(4);
        f.fault(2, Access::Write);
        let id = f.requested(2, Access::Write);
        f.deliver(HOME, grant(2, id, Access::Write, &[2], GrantData::Zero))
            .unwrap();
        assert!(is_violation(
            f.deliver(3, DsmMessage::InvalidateAck { page: 2, id })
        ));
        assert!(
            is_violation(f.deliver(ME, DsmMessage::InvalidateAck { page: 2, id })),
            "the requester never acknowledges itself"
        );
        assert!(
            is_violation(f.deliver(64, DsmMessage::InvalidateAck { page: 2, id })),
            "a node outside the cluster"
        );
        assert_not_completed(&mut f, 2);
        // Before the grant it is kept, and refused when the grant does not name its sender.
        let mut f = fixture_of(4);
        f.fault(2, Access::Write);
        let id = f.requested(2, Access::Write);
        assert_eq!(
            f.deliver(3, DsmMessage::InvalidateAck { page: 2, id }),
            Ok(None)
        );
        assert_eq!(
            f.deliver(2, DsmMessage::InvalidateAck { page: 2, id }),
            Ok(None)
        );
        assert!(is_violation(f.deliver(
            HOME,
            grant(2, id, Access::Write, &[2], GrantData::Zero)
        )));
        assert_not_completed(&mut f, 2);
    }

    #[test]
    fn a_grant_or_page_data_from_a_node_the_home_did_not_name_is_refused() {
        let mut f = fixture_of(4);
        f.fault(3, Access::Read);
        let id = f.requested(3, Access::Read);
        // Only the home grants.
        assert!(is_violation(
            f.deliver(2, grant(3, id, Access::Read, &[], GrantData::Zero))
        ));
        assert!(is_violation(f.deliver(
            2,
            grant(
                3,
                id,
                Access::Read,
                &[],
                GrantData::Bytes(Box::new([9; crate::PAGE_SIZE]))
            )
        )));
        assert_not_completed(&mut f, 3);
        // The home names node 2 as the source: data from node 3 (or the home) is refused.
        f.deliver(HOME, grant(3, id, Access::Read, &[], GrantData::Source(2)))
            .unwrap();
        assert!(is_violation(f.deliver(3, page_data(3, id, 9))));
        assert!(is_violation(f.deliver(HOME, page_data(3, id, 9))));
        assert_not_completed(&mut f, 3);
        // The named source completes it, once; a second copy is refused.
        let done = f.deliver(2, page_data(3, id, 5)).unwrap();
        assert_eq!(done.map(|c| c.state), Some(PageState::Shared));
        assert_eq!(f.memory.load(3, 0), Some(u64::from_le_bytes([5; 8])));
        assert!(matches!(
            f.deliver(2, page_data(3, id, 5)),
            Err(NodeError::UnknownRequest { .. })
        ));
        // Data before the grant from a node the grant then does not name: refused with it.
        let mut f = fixture_of(4);
        f.fault(4, Access::Write);
        let id = f.requested(4, Access::Write);
        assert_eq!(f.deliver(3, page_data(4, id, 9)), Ok(None));
        assert!(
            is_violation(f.deliver(2, page_data(4, id, 5))),
            "two senders"
        );
        assert!(is_violation(f.deliver(
            HOME,
            grant(4, id, Access::Write, &[], GrantData::Source(2))
        )));
        assert_not_completed(&mut f, 4);
        // Data for a grant that names no source at all.
        let mut f = fixture_of(4);
        f.fault(4, Access::Write);
        let id = f.requested(4, Access::Write);
        f.deliver(HOME, grant(4, id, Access::Write, &[3], GrantData::Zero))
            .unwrap();
        assert!(is_violation(f.deliver(3, page_data(4, id, 9))));
        assert_not_completed(&mut f, 4);
    }

    #[test]
    fn multi_sharer_invalidation_completes_in_any_order() {
        // 6 nodes: home 0, requester 1, source 3, sharers 0, 2, 4 and 5.
        let orders: [&[usize]; 4] = [
            &[0, 1, 2, 3, 4, 5], // grant first
            &[1, 2, 3, 4, 5, 0], // grant last: everything else was kept for it
            &[2, 1, 0, 5, 3, 4],
            &[5, 4, 3, 0, 2, 1],
        ];
        for order in orders {
            let mut f = fixture_of(6);
            f.fault(6, Access::Write);
            let id = f.requested(6, Access::Write);
            let ack = DsmMessage::InvalidateAck { page: 6, id };
            let parts = [
                (
                    HOME,
                    grant(6, id, Access::Write, &[0, 2, 4, 5], GrantData::Source(3)),
                ),
                (3, page_data(6, id, 7)),
                (2, ack.clone()),
                (HOME, ack.clone()),
                (4, ack.clone()),
                (5, ack.clone()),
            ];
            let mut done = None;
            for (n, &i) in order.iter().enumerate() {
                let (from, msg) = parts[i].clone();
                let result = f.deliver(from, msg).unwrap();
                if n + 1 < order.len() {
                    assert_eq!(result, None, "{order:?}: completed at step {n}");
                }
                done = result;
            }
            assert_eq!(
                done.map(|c| c.state),
                Some(PageState::Modified),
                "{order:?}"
            );
            assert_eq!(f.memory.mapping(6), Mapping::Writable);
            assert_eq!(f.memory.load(6, 0), Some(u64::from_le_bytes([7; 8])));
            assert_eq!(f.sent(), vec![(HOME, DsmMessage::Confirm { page: 6, id })]);
        }
    }

    #[test]
    fn request_ids_do_not_follow_a_counter() {
        let mut f = fixture();
        let mut seqs = Vec::new();
        for page in 0..4 {
            f.fault(page, Access::Read);
            seqs.push(f.requested(page, Access::Read).seq);
        }
        assert!(seqs.windows(2).all(|w| w[0].abs_diff(w[1]) > 1), "{seqs:?}");
    }

    #[test]
    fn stray_replies_are_refused_without_harm() {
        let mut f = fixture();
        let stray = RequestId { node: ME, seq: 77 };
        let err = f
            .deliver(2, grant(0, stray, Access::Read, &[], GrantData::Zero))
            .unwrap_err();
        assert!(!err.is_fatal());
        assert!(!f
            .deliver(2, DsmMessage::InvalidateAck { page: 0, id: stray })
            .unwrap_err()
            .is_fatal());
        f.fault(0, Access::Read);
        let id = f.requested(0, Access::Read);
        assert!(!f
            .deliver(HOME, grant(0, id, Access::Write, &[], GrantData::Zero))
            .unwrap_err()
            .is_fatal());
        // Asked to drop or send a copy it does not have: the state is not to be trusted.
        assert!(f
            .deliver(
                HOME,
                DsmMessage::Invalidate {
                    page: 3,
                    id: other(1)
                }
            )
            .unwrap_err()
            .is_fatal());
        assert_eq!(f.memory.mapping(0), Mapping::NotPresent);
    }
}
