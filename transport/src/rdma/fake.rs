//! Two [`Verbs`] endpoints wired back to back in memory, for the unit tests: a SEND lands in
//! the peer's oldest posted receive (or waits for one, as a real reliable connection retries
//! on "receiver not ready"), an RDMA WRITE lands in the peer's registered region if the range
//! and key are right, and each produces the completions a device would. Work requests of one
//! end are carried out in the order they were posted.
//!
//! Faults: [`FakeEnd::fail`] puts the pair in the error state (every outstanding and later post
//! completes with an error on both ends, like a queue pair gone to the error state), and
//! dropping an end makes the other end's later posts fail (retries exceeded), while its posted
//! receives stay quiet, as on a real link whose peer died: only traffic finds it out.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use super::region::Region;
use super::verbs::{Completion, Keys, Local, Op, RemoteRange, Verbs, VerbsError};

enum Work {
    Send {
        wr_id: u64,
        data: Vec<u8>,
    },
    Write {
        wr_id: u64,
        data: Vec<u8>,
        to: RemoteRange,
    },
}

#[derive(Default)]
struct Side {
    region: Option<Arc<Region>>,
    keys: Option<Keys>,
    /// The bytes registered for the peer's writes.
    remote: Range<usize>,
    recvs: VecDeque<(u64, Local)>,
    outbound: VecDeque<Work>,
    completions: VecDeque<Completion>,
    gone: bool,
    /// A frozen process: its posts wait and its polls find nothing, while its adapter still
    /// takes what the other end sends into its posted receives.
    frozen: bool,
}

#[derive(Default)]
struct Wire {
    sides: [Side; 2],
    /// SENDs that found no posted receive (a real queue pair would retry them, slowly).
    not_ready: u64,
    /// Why the pair is in the error state.
    error: Option<String>,
}

struct Shared {
    wire: Mutex<Wire>,
    changed: Condvar,
}

/// One end of a fake reliable connection.
pub(crate) struct FakeEnd {
    shared: Arc<Shared>,
    side: usize,
    peer_addr: SocketAddr,
}

/// A handle on a pair that outlives handing its ends to connections: for injecting faults and
/// looking at what happened on the wire.
#[derive(Clone)]
pub(crate) struct FakeWire {
    shared: Arc<Shared>,
}

impl FakeWire {
    /// Puts the pair into the error state, as a queue pair fault would.
    pub(crate) fn fail(&self, why: &str) {
        let mut wire = self
            .shared
            .wire
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        wire.error.get_or_insert_with(|| why.to_string());
        flush(&mut wire);
        self.shared.changed.notify_all();
    }

    /// Freezes (or thaws) end `side` (0 is the first end [`pair`] returns), as a stopped
    /// process would be: no error anywhere, only silence.
    pub(crate) fn freeze(&self, side: usize, frozen: bool) {
        let mut wire = self
            .shared
            .wire
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        wire.sides[side].frozen = frozen;
        pump(&mut wire);
        self.shared.changed.notify_all();
    }

    /// How many SENDs found no receive posted so far (each one a "receiver not ready" retry
    /// on real hardware).
    pub(crate) fn not_ready(&self) -> u64 {
        self.shared
            .wire
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .not_ready
    }
}

/// Two ends wired to each other.
pub(crate) fn pair() -> (FakeEnd, FakeEnd) {
    let shared = Arc::new(Shared {
        wire: Mutex::new(Wire::default()),
        changed: Condvar::new(),
    });
    let end = |side| FakeEnd {
        shared: Arc::clone(&shared),
        side,
        peer_addr: SocketAddr::from(([10, 0, 0, u8::try_from(2 - side).unwrap_or(0)], 7000)),
    };
    (end(0), end(1))
}

impl FakeEnd {
    fn wire(&self) -> MutexGuard<'_, Wire> {
        self.shared
            .wire
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// A handle on the pair.
    pub(crate) fn wire_handle(&self) -> FakeWire {
        FakeWire {
            shared: Arc::clone(&self.shared),
        }
    }

    fn post(&self, work: Work) {
        let mut wire = self.wire();
        wire.sides[self.side].outbound.push_back(work);
        pump(&mut wire);
        self.shared.changed.notify_all();
    }
}

/// The bytes of a posted range, copied out as the device would read them.
fn read(region: &Region, buf: Local) -> Option<Vec<u8>> {
    let offset = region.offset_of(buf.addr, buf.len as usize)?;
    // SAFETY: the range was posted, so the device (this fake) owns it until its completion.
    Some(unsafe { region.bytes(offset, buf.len as usize) }.to_vec())
}

/// Carries out every work request that can be carried out now, in order per end.
fn pump(wire: &mut Wire) {
    if wire.error.is_some() {
        flush(wire);
        return;
    }
    for from in 0..2 {
        let to = 1 - from;
        if wire.sides[from].frozen {
            continue;
        }
        while let Some(work) = wire.sides[from].outbound.pop_front() {
            if wire.sides[to].gone {
                let wr_id = match work {
                    Work::Send { wr_id, .. } | Work::Write { wr_id, .. } => wr_id,
                };
                let op = match work {
                    Work::Send { .. } => Op::Send,
                    Work::Write { .. } => Op::Write,
                };
                wire.sides[from].completions.push_back(Completion {
                    wr_id,
                    op,
                    result: Err("transport retry counter exceeded".to_string()),
                });
                continue;
            }
            match work {
                Work::Send { wr_id, data } => {
                    let Some((recv_id, buf)) = wire.sides[to].recvs.pop_front() else {
                        // Receiver not ready: a real RC queue pair retries; so does this.
                        wire.not_ready += 1;
                        wire.sides[from]
                            .outbound
                            .push_front(Work::Send { wr_id, data });
                        break;
                    };
                    if data.len() > buf.len as usize {
                        let why = format!(
                            "local length error: a SEND of {} bytes hit a receive buffer of {}",
                            data.len(),
                            buf.len
                        );
                        fail_with(wire, from, wr_id, Op::Send, why);
                        return;
                    }
                    place(wire, to, buf.addr, &data);
                    let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
                    wire.sides[to].completions.push_back(Completion {
                        wr_id: recv_id,
                        op: Op::Recv,
                        result: Ok(len),
                    });
                    wire.sides[from].completions.push_back(Completion {
                        wr_id,
                        op: Op::Send,
                        result: Ok(len),
                    });
                }
                Work::Write {
                    wr_id,
                    data,
                    to: range,
                } => {
                    let target = &wire.sides[to];
                    let allowed = target.keys.is_some_and(|k| k.rkey == range.rkey)
                        && target.region.as_ref().is_some_and(|r| {
                            r.offset_of(range.addr, data.len()).is_some_and(|offset| {
                                offset >= target.remote.start
                                    && offset + data.len() <= target.remote.end
                            })
                        });
                    if !allowed {
                        let why = format!(
                            "remote access error: an RDMA WRITE of {} bytes to {:#x} with rkey \
                             {:#x} is outside what the peer registered",
                            data.len(),
                            range.addr,
                            range.rkey
                        );
                        fail_with(wire, from, wr_id, Op::Write, why);
                        return;
                    }
                    place(wire, to, range.addr, &data);
                    wire.sides[from].completions.push_back(Completion {
                        wr_id,
                        op: Op::Write,
                        result: Ok(u32::try_from(data.len()).unwrap_or(u32::MAX)),
                    });
                }
            }
        }
    }
}

/// The work request `wr_id` of end `from` failed: it completes with `why`, and the pair goes
/// to the error state.
fn fail_with(wire: &mut Wire, from: usize, wr_id: u64, op: Op, why: String) {
    wire.sides[from].completions.push_back(Completion {
        wr_id,
        op,
        result: Err(why.clone()),
    });
    wire.error = Some(why);
    flush(wire);
}

fn place(wire: &Wire, side: usize, addr: u64, data: &[u8]) {
    let Some(region) = wire.sides[side].region.as_ref() else {
        return;
    };
    let Some(offset) = region.offset_of(addr, data.len()) else {
        return;
    };
    // SAFETY: the range is a posted receive (owned by the device until its completion) or a
    // range the peer handed to the writer for RDMA WRITEs (a staging slot the receiver does
    // not read until the SEND that announces it, or a mailbox word, written whole here while
    // the owner reads it only atomically; this copy of 8 aligned bytes stands for the
    // device's).
    unsafe { region.write(offset, data) };
}

/// Error state: every posted receive and queued request completes with an error.
fn flush(wire: &mut Wire) {
    let why = wire.error.clone().unwrap_or_default();
    for side in &mut wire.sides {
        for (wr_id, _) in side.recvs.drain(..) {
            side.completions.push_back(Completion {
                wr_id,
                op: Op::Recv,
                result: Err(format!("work request flushed: {why}")),
            });
        }
        for work in side.outbound.drain(..) {
            let (wr_id, op) = match work {
                Work::Send { wr_id, .. } => (wr_id, Op::Send),
                Work::Write { wr_id, .. } => (wr_id, Op::Write),
            };
            side.completions.push_back(Completion {
                wr_id,
                op,
                result: Err(format!("work request flushed: {why}")),
            });
        }
    }
}

impl Verbs for FakeEnd {
    fn register(&self, region: &Arc<Region>, remote: Range<usize>) -> Result<Keys, VerbsError> {
        let keys = Keys {
            lkey: 0x100 + u32::try_from(self.side).unwrap_or(0),
            rkey: 0x200 + u32::try_from(self.side).unwrap_or(0),
        };
        let mut wire = self.wire();
        wire.sides[self.side].region = Some(Arc::clone(region));
        wire.sides[self.side].keys = Some(keys);
        wire.sides[self.side].remote = remote;
        Ok(keys)
    }

    unsafe fn post_recv(&self, wr_id: u64, buf: Local) -> Result<(), VerbsError> {
        let mut wire = self.wire();
        wire.sides[self.side].recvs.push_back((wr_id, buf));
        pump(&mut wire);
        self.shared.changed.notify_all();
        Ok(())
    }

    unsafe fn post_send(&self, wr_id: u64, buf: Local) -> Result<(), VerbsError> {
        let data = self.local_bytes(buf);
        self.post(Work::Send { wr_id, data });
        Ok(())
    }

    unsafe fn post_write(&self, wr_id: u64, buf: Local, to: RemoteRange) -> Result<(), VerbsError> {
        let data = self.local_bytes(buf);
        self.post(Work::Write { wr_id, data, to });
        Ok(())
    }

    fn poll(&self, out: &mut Vec<Completion>, max: usize) -> Result<(), VerbsError> {
        let mut wire = self.wire();
        if wire.sides[self.side].frozen {
            return Ok(());
        }
        let completions = &mut wire.sides[self.side].completions;
        let n = max.min(completions.len());
        out.extend(completions.drain(..n));
        Ok(())
    }

    fn wait(&self, timeout: Duration) {
        let wire = self.wire();
        let _ = self
            .shared
            .changed
            .wait_timeout_while(wire, timeout, |w| w.sides[self.side].completions.is_empty());
    }

    fn connect(&self) -> std::io::Result<()> {
        Ok(())
    }

    fn disconnect(&self) {
        if self.wire().sides[self.side].frozen {
            // A stopped process disconnects nothing (its own watchdog does not run either).
            return;
        }
        self.wire_handle().fail("disconnected");
    }

    fn peer_addr(&self) -> SocketAddr {
        self.peer_addr
    }
}

impl FakeEnd {
    fn local_bytes(&self, buf: Local) -> Vec<u8> {
        let wire = self.wire();
        let region = wire.sides[self.side].region.as_ref();
        region.and_then(|r| read(r, buf)).unwrap_or_default()
    }
}

impl Drop for FakeEnd {
    fn drop(&mut self) {
        let mut wire = self.wire();
        wire.sides[self.side].gone = true;
        pump(&mut wire);
        self.shared.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_land_only_where_the_peer_registered_them_for_remote_access() {
        let (a, b) = pair();
        let (ra, rb) = (Arc::new(Region::new(8192)), Arc::new(Region::new(8192)));
        let ka = a.register(&ra, 0..0).unwrap();
        let kb = b.register(&rb, 0..4096).unwrap();
        // SAFETY: nothing is posted from this range yet.
        unsafe { ra.write(100, b"page") };
        let src = Local {
            addr: ra.addr(100),
            len: 4,
            lkey: ka.lkey,
        };
        let inside = RemoteRange {
            addr: rb.addr(4092),
            rkey: kb.rkey,
        };
        // SAFETY: the source stays untouched until the completions are read below.
        unsafe { a.post_write(1, src, inside).unwrap() };
        let mut done = Vec::new();
        a.poll(&mut done, 8).unwrap();
        assert_eq!(done[0].result, Ok(4));
        // SAFETY: the write completed; nothing else writes there.
        assert_eq!(unsafe { rb.bytes(4092, 4) }, b"page");

        let outside = RemoteRange {
            addr: rb.addr(4094),
            rkey: kb.rkey,
        };
        // SAFETY: as above.
        unsafe { a.post_write(2, src, outside).unwrap() };
        done.clear();
        a.poll(&mut done, 8).unwrap();
        let error = done[0].result.clone().unwrap_err();
        assert!(error.contains("remote access error"), "{error}");
    }
}
