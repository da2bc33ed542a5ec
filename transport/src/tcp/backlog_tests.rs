//! Sends that never wait for a peer to read: a ring of meshes whose receivers pass every frame
//! on to the next node, through socket buffers far smaller than the traffic.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, OnceLock, Weak};
use std::thread;
use std::time::{Duration, Instant};

use super::*;
use crate::api::Transport;
use crate::channel::NodeId;
use crate::config::Liveness;
use crate::frame::{Frame, FrameRef};

const NODES: u32 = 3;
/// Frames each node starts, each a page-sized payload.
const FRAMES_PER_NODE: u64 = 150;
/// How many times each frame goes round the ring's edges.
const HOPS: u64 = 24;
const PAYLOAD: usize = 4096;

/// One ring node: passes a frame to the next node until its hop count runs out, then checks
/// and counts it. The pass happens on the receiver thread, as the DSM's replies do.
struct RingNode {
    me: NodeId,
    mesh: OnceLock<Weak<TcpMesh>>,
    arrived: AtomicU64,
    corrupt: AtomicU64,
    losses: Mutex<Vec<String>>,
    done: Condvar,
}

impl RingNode {
    fn next(&self) -> NodeId {
        (self.me + 1) % NODES
    }
}

/// The payload of frame `id`: every byte depends on the frame and its position.
fn pattern(id: u64) -> Vec<u8> {
    (0..PAYLOAD)
        .map(|i| (id.wrapping_mul(31).wrapping_add(i as u64 * 7) & 0xFF) as u8)
        .collect()
}

impl FrameHandler for RingNode {
    fn on_frame(&self, _from: NodeId, channel: Channel, frame: FrameRef<'_>) {
        let frame = frame.to_frame();
        if frame.arg > 0 {
            let Some(mesh) = self.mesh.get().and_then(Weak::upgrade) else {
                return;
            };
            let onward = Frame {
                arg: frame.arg - 1,
                ..frame
            };
            if let Err(e) = mesh.send(self.next(), channel, &onward) {
                self.losses
                    .lock()
                    .unwrap()
                    .push(format!("send failed: {e}"));
                self.done.notify_all();
            }
            return;
        }
        if frame.payload != pattern(frame.id) {
            self.corrupt.fetch_add(1, Ordering::Relaxed);
        }
        self.arrived.fetch_add(1, Ordering::Relaxed);
        self.done.notify_all();
    }

    fn on_peer_lost(&self, peer: NodeId, why: &str) {
        self.losses
            .lock()
            .unwrap()
            .push(format!("lost {peer}: {why}"));
        self.done.notify_all();
    }
}

/// Three nodes, socket buffers smaller than one flood, every receiver forwarding: with writes that block, the
/// three receivers end up each waiting for the next node's full buffer, a cycle that only the
/// write timeout broke (by declaring a healthy peer lost). Now every frame arrives intact.
#[test]
fn a_ring_of_receivers_that_forward_through_small_buffers_never_stalls() {
    let listeners: Vec<TcpListener> = (0..NODES)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addrs: Vec<_> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let nodes: Vec<Arc<RingNode>> = (0..NODES)
        .map(|me| {
            Arc::new(RingNode {
                me,
                mesh: OnceLock::new(),
                arrived: AtomicU64::new(0),
                corrupt: AtomicU64::new(0),
                losses: Mutex::new(Vec::new()),
                done: Condvar::new(),
            })
        })
        .collect();
    let setups: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(i, listener)| {
            let me = NodeId::try_from(i).unwrap();
            let cfg = MeshConfig {
                me,
                listen: addrs[i],
                peers: (0..NODES)
                    .filter(|&p| p != me)
                    .map(|p| (p, addrs[p as usize]))
                    .collect(),
                secret: b"ring-test-secret".to_vec(),
                layout_canonical: "ring\n".to_string(),
                connect_timeout: Duration::from_secs(20),
                busy_poll: false,
                service_priority: crate::ServicePriority::Normal,
                liveness: Liveness::default(),
                socket_buffer: Some(64 << 10),
            };
            let handler: Arc<dyn FrameHandler> = nodes[i].clone();
            thread::spawn(move || TcpMesh::establish_on(listener, cfg, handler))
        })
        .collect();
    let meshes: Vec<Arc<TcpMesh>> = setups
        .into_iter()
        .map(|setup| setup.join().unwrap().unwrap())
        .collect();
    for (node, mesh) in nodes.iter().zip(&meshes) {
        node.mesh.set(Arc::downgrade(mesh)).unwrap();
    }

    // Every node floods the next one; each frame then makes HOPS more passes round the ring.
    let floods: Vec<_> = meshes
        .iter()
        .zip(&nodes)
        .map(|(mesh, node)| {
            let mesh = mesh.clone();
            let next = node.next();
            let me = u64::from(node.me);
            thread::spawn(move || {
                for n in 0..FRAMES_PER_NODE {
                    let id = me * FRAMES_PER_NODE + n;
                    let frame = Frame {
                        kind: 1,
                        flags: 0,
                        id,
                        arg: HOPS,
                        payload: pattern(id),
                    };
                    mesh.send(next, Channel::DsmBulk, &frame).unwrap();
                }
            })
        })
        .collect();
    for flood in floods {
        flood.join().unwrap();
    }

    let total = u64::from(NODES) * FRAMES_PER_NODE;
    let deadline = Instant::now() + Duration::from_secs(60);
    let arrived = || {
        nodes
            .iter()
            .map(|n| n.arrived.load(Ordering::Relaxed))
            .sum::<u64>()
    };
    let losses = || {
        nodes
            .iter()
            .flat_map(|n| n.losses.lock().unwrap().clone())
            .collect::<Vec<_>>()
    };
    while arrived() < total && losses().is_empty() && Instant::now() < deadline {
        let guard = nodes[0].losses.lock().unwrap();
        let _ = nodes[0]
            .done
            .wait_timeout(guard, Duration::from_millis(50))
            .unwrap();
    }
    let corrupt: u64 = nodes
        .iter()
        .map(|n| n.corrupt.load(Ordering::Relaxed))
        .sum();
    let (arrived, losses) = (arrived(), losses());
    let queued: u64 = meshes.iter().map(|m| m.stats().frames_queued).sum();
    for mesh in &meshes {
        mesh.shutdown();
    }
    assert!(losses.is_empty(), "healthy peers were lost: {losses:?}");
    assert_eq!(arrived, total, "frames went missing in the ring");
    assert_eq!(corrupt, 0, "frames arrived with other payloads than sent");
    assert!(
        queued > 0,
        "the socket buffers never filled: the test proved nothing"
    );
}

/// A node whose bulk receiver is stuck (its handler never returns) while its heartbeats flow.
struct StuckReceiver {
    released: Mutex<bool>,
    release: Condvar,
    losses: Mutex<Vec<String>>,
}

impl FrameHandler for StuckReceiver {
    fn on_frame(&self, _from: NodeId, _channel: Channel, _frame: FrameRef<'_>) {
        let released = self.released.lock().unwrap();
        let _ = self
            .release
            .wait_timeout_while(released, Duration::from_secs(60), |r| !*r)
            .unwrap();
    }

    fn on_peer_lost(&self, peer: NodeId, why: &str) {
        self.losses
            .lock()
            .unwrap()
            .push(format!("lost {peer}: {why}"));
    }
}

fn two_nodes(handlers: [Arc<StuckReceiver>; 2]) -> Vec<Arc<TcpMesh>> {
    let listeners: Vec<TcpListener> = (0..2)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addrs: Vec<_> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let setups: Vec<_> = listeners
        .into_iter()
        .zip(handlers)
        .enumerate()
        .map(|(i, (listener, handler))| {
            let me = NodeId::try_from(i).unwrap();
            let cfg = MeshConfig {
                me,
                listen: addrs[i],
                peers: vec![(1 - me, addrs[1 - i])],
                secret: b"stuck-test-secret".to_vec(),
                layout_canonical: "stuck\n".to_string(),
                connect_timeout: Duration::from_secs(20),
                busy_poll: false,
                service_priority: crate::ServicePriority::Normal,
                liveness: Liveness::default(),
                socket_buffer: Some(64 << 10),
            };
            let handler: Arc<dyn FrameHandler> = handler;
            thread::spawn(move || TcpMesh::establish_on(listener, cfg, handler))
        })
        .collect();
    setups
        .into_iter()
        .map(|setup| setup.join().unwrap().unwrap())
        .collect()
}

/// The backlog for a live peer that stopped reading is bounded: once it passes the limit the
/// sender gets an error that says so and the peer is lost, instead of memory growing without
/// end or a sender blocking.
#[test]
fn a_live_peer_that_stops_reading_is_dropped_at_the_backlog_limit() {
    let handlers = [(); 2].map(|()| {
        Arc::new(StuckReceiver {
            released: Mutex::new(false),
            release: Condvar::new(),
            losses: Mutex::new(Vec::new()),
        })
    });
    let meshes = two_nodes(handlers.clone());
    let frame = Frame {
        kind: 1,
        flags: 0,
        id: 0,
        arg: 0,
        payload: vec![0xA5; PAYLOAD],
    };
    let most_frames = 2 * super::connection::OUTBOX_LIMIT / PAYLOAD;
    let started = Instant::now();
    let mut refusal = None;
    for _ in 0..most_frames {
        if let Err(e) = meshes[0].send(1, Channel::DsmBulk, &frame) {
            refusal = Some(e);
            break;
        }
    }
    let took = started.elapsed();
    let losses = handlers[0].losses.lock().unwrap().clone();
    for handler in &handlers {
        *handler.released.lock().unwrap() = true;
        handler.release.notify_all();
    }
    for mesh in &meshes {
        mesh.shutdown();
    }
    assert!(
        matches!(refusal, Some(TransportError::NotReading { peer: 1, .. })),
        "expected the backlog limit, got {refusal:?}"
    );
    assert!(
        took < Duration::from_secs(2),
        "sends blocked: filling the backlog took {took:?}"
    );
    assert_eq!(losses.len(), 1, "{losses:?}");
    assert!(losses[0].contains("receiver is stuck"), "{losses:?}");
}
