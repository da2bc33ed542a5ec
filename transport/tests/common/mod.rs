//! Helpers shared by the integration tests: a handler that records, and meshes on loopback.

#![allow(dead_code)] // each test file uses a different part

use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

use transport::{Channel, Frame, FrameHandler, FrameRef, Liveness, MeshConfig, NodeId, TcpMesh};

/// Long enough for a loaded 2-core machine, short enough to fail instead of hanging.
pub const PATIENCE: Duration = Duration::from_secs(20);

pub const SECRET: &[u8] = b"integration-test secret";

/// What a handler saw.
#[derive(Default, Debug)]
pub struct Seen {
    pub frames: Vec<(NodeId, Channel, Frame)>,
    pub lost: Vec<(NodeId, String)>,
}

/// A handler that records everything and lets a test wait for it.
#[derive(Default)]
pub struct Recorder {
    seen: Mutex<Seen>,
    changed: Condvar,
}

impl FrameHandler for Recorder {
    fn on_frame(&self, from: NodeId, channel: Channel, frame: FrameRef<'_>) {
        self.seen
            .lock()
            .unwrap()
            .frames
            .push((from, channel, frame.to_frame()));
        self.changed.notify_all();
    }

    fn on_peer_lost(&self, peer: NodeId, why: &str) {
        self.seen.lock().unwrap().lost.push((peer, why.to_string()));
        self.changed.notify_all();
    }
}

impl Recorder {
    /// Waits until `done` holds (or [`PATIENCE`] passes) and returns what was seen.
    pub fn wait_until(&self, done: impl Fn(&Seen) -> bool) -> MutexGuard<'_, Seen> {
        let guard = self.seen.lock().unwrap();
        let (guard, _) = self
            .changed
            .wait_timeout_while(guard, PATIENCE, |seen| !done(seen))
            .unwrap();
        guard
    }

    pub fn seen(&self) -> MutexGuard<'_, Seen> {
        self.seen.lock().unwrap()
    }
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn layout(nodes: usize) -> String {
    let mut text = format!("spanvm-layout 1\nnodes {nodes}\n");
    for vcpu in 0..nodes {
        text.push_str(&format!("vcpu {vcpu} node {vcpu}\n"));
    }
    text
}

pub fn config(me: NodeId, addrs: &[SocketAddr]) -> MeshConfig {
    MeshConfig {
        me,
        listen: addrs[me as usize],
        peers: addrs
            .iter()
            .enumerate()
            .filter(|&(id, _)| NodeId::try_from(id).unwrap() != me)
            .map(|(id, &addr)| (NodeId::try_from(id).unwrap(), addr))
            .collect(),
        secret: SECRET.to_vec(),
        layout_canonical: layout(addrs.len()),
        connect_timeout: Duration::from_secs(15),
        busy_poll: false,
        service_priority: transport::ServicePriority::Normal,
        liveness: Liveness::default(),
        socket_buffer: None,
    }
}

/// `n` nodes on loopback (listeners bound on free ports first), each set up on its own thread.
/// `adjust` may change each node's config before it starts.
pub fn mesh(n: usize, adjust: impl Fn(&mut MeshConfig)) -> (Vec<Arc<TcpMesh>>, Vec<Arc<Recorder>>) {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let recorders: Vec<Arc<Recorder>> = (0..n).map(|_| Arc::new(Recorder::default())).collect();
    let setups: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(me, listener)| {
            let mut cfg = config(NodeId::try_from(me).unwrap(), &addrs);
            adjust(&mut cfg);
            let handler: Arc<dyn FrameHandler> = recorders[me].clone();
            thread::spawn(move || TcpMesh::establish_on(listener, cfg, handler))
        })
        .collect();
    let meshes = setups
        .into_iter()
        .map(|setup| setup.join().unwrap().unwrap())
        .collect();
    (meshes, recorders)
}
