//! The RDMA backend above the verbs, on the in-memory fake pair: framing through real
//! registered buffers, credits, staging, the handshake, the barrier and lost peers.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use super::conn::{Conn, ConnError, ConnEvents, BACKLOG_LIMIT, RECV_RING, STAGING_SLOTS};
use super::fake::{self, FakeWire};
use super::stream::HandshakeStream;
use super::RdmaMesh;
use crate::api::{FrameHandler, Transport};
use crate::channel::{Channel, NodeId};
use crate::config::{Liveness, MeshConfig};
use crate::error::TransportError;
use crate::frame::{Frame, FrameRef, MAX_PAYLOAD};
use crate::handshake::{self, Admission, Credentials};
use crate::handshake_wire::Refusal;
use crate::test_recorder::Recorder;

const LAYOUT: &str = "spanvm-layout 1\nnodes 2\nvcpu 0 node 0\nvcpu 1 node 1\n";

fn config(me: NodeId, secret: &[u8], layout: &str) -> MeshConfig {
    let other = 1 - me;
    MeshConfig {
        me,
        listen: SocketAddr::from(([10, 0, 0, 1 + u8::try_from(me).unwrap()], 7000)),
        peers: vec![(
            other,
            SocketAddr::from(([10, 0, 0, 1 + u8::try_from(other).unwrap()], 7000)),
        )],
        secret: secret.to_vec(),
        layout_canonical: layout.to_string(),
        connect_timeout: Duration::from_secs(5),
        busy_poll: false,
        service_priority: crate::ServicePriority::Normal,
        liveness: Liveness::default(),
        socket_buffer: None,
    }
}

/// Lets anyone in: the tests here are about the stream, not about who may connect.
struct Open;

impl Admission for Open {
    fn screen(&self, _: NodeId, _: Channel) -> Result<(), Refusal> {
        Ok(())
    }

    fn claim(&self, _: NodeId, _: Channel) -> Result<(), Refusal> {
        Ok(())
    }
}

/// Node 1's connection to node 0 and node 0's from node 1 on `channel`, over a fake pair,
/// handshaken (node 1 dials) and advertised; or both ends' handshake errors.
fn connect(
    channel: Channel,
    creds0: &Credentials,
    creds1: &Credentials,
) -> Result<(Conn, Conn, FakeWire), Box<(TransportError, TransportError)>> {
    let (end1, end0) = fake::pair();
    let wire = end1.wire_handle();
    let conn1 = Conn::new(0, channel, Box::new(end1)).unwrap();
    let conn0 = Conn::new(1, channel, Box::new(end0)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    let addr0 = SocketAddr::from(([10, 0, 0, 1], 7000));
    let addr1 = SocketAddr::from(([10, 0, 0, 2], 7000));
    let (dialed, accepted) = thread::scope(|s| {
        let dialer = s.spawn(|| {
            let mut stream = HandshakeStream::new(&conn1);
            handshake::dial(&mut stream, creds1, 0, addr0, channel, deadline)
        });
        let mut stream = HandshakeStream::new(&conn0);
        let accepted = handshake::accept(&mut stream, creds0, addr1, deadline, &Open);
        (dialer.join().unwrap(), accepted)
    });
    match (dialed, accepted) {
        (Ok(()), Ok((peer, got))) => {
            assert_eq!((peer, got), (1, channel));
            conn1.advertise().unwrap();
            conn0.advertise().unwrap();
            Ok((conn1, conn0, wire))
        }
        (Err(d), Err(a)) => Err(Box::new((d, a))),
        (d, a) => panic!("one end succeeded and the other not: {d:?} / {a:?}"),
    }
}

/// Both ends of `channel`, connected with the same secret and layout.
fn connected(channel: Channel) -> (Conn, Conn, FakeWire) {
    connect(
        channel,
        &creds(0, b"secret", LAYOUT),
        &creds(1, b"secret", LAYOUT),
    )
    .unwrap()
}

/// The dialer's and the acceptor's errors of a connection that must be refused (`what` says
/// what was accepted, if it was).
fn refused(
    channel: Channel,
    creds0: &Credentials,
    creds1: &Credentials,
    what: &str,
) -> (TransportError, TransportError) {
    match connect(channel, creds0, creds1) {
        Err(refused) => *refused,
        Ok(_) => panic!("{what}"),
    }
}

fn creds(me: NodeId, secret: &[u8], layout: &str) -> Credentials {
    Credentials::new(&config(me, secret, layout))
}

/// Collects what a connection hands over.
#[derive(Default)]
struct Collected {
    frames: RefCell<Vec<(Channel, Frame)>>,
    ready: RefCell<bool>,
}

impl ConnEvents for Collected {
    fn heard(&self) {}

    fn deliver(&self, channel: Channel, frame: FrameRef<'_>) -> Result<(), String> {
        self.frames.borrow_mut().push((channel, frame.to_frame()));
        Ok(())
    }

    fn mesh_ready(&self) {
        *self.ready.borrow_mut() = true;
    }
}

/// Makes progress on both connections until `done` or 5 s.
fn run_until(a: (&Conn, &Collected), b: (&Conn, &Collected), done: impl Fn() -> bool) {
    let until = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < until, "no progress within 5 s");
        a.0.progress(a.1).unwrap();
        b.0.progress(b.1).unwrap();
    }
}

/// Collectors for both ends, once both pool adverts have arrived.
fn past_adverts(conn1: &Conn, conn0: &Conn) -> (Collected, Collected) {
    let (got1, got0) = (Collected::default(), Collected::default());
    run_until((conn1, &got1), (conn0, &got0), || {
        conn1.progress(&got1).unwrap() == 0 && conn0.progress(&got0).unwrap() == 0
    });
    (got1, got0)
}

fn frame(id: u64, payload: Vec<u8>) -> Frame {
    Frame {
        kind: 3,
        flags: 0,
        id,
        arg: id * 2,
        payload,
    }
}

#[test]
fn the_tcp_handshake_passes_over_rdma_with_the_right_secret_and_layout() {
    let (conn1, conn0, _) = connected(Channel::DsmRequest);
    assert_eq!((conn1.peer, conn0.peer), (0, 1));
}

#[test]
fn a_wrong_secret_is_refused_on_both_ends_as_on_tcp() {
    let (dialer, acceptor) = refused(
        Channel::Control,
        &creds(0, b"secret", LAYOUT),
        &creds(1, b"other", LAYOUT),
        "a wrong secret was accepted",
    );
    assert!(
        matches!(dialer, TransportError::WrongSecret { peer: 0, .. }),
        "{dialer}"
    );
    assert!(
        matches!(acceptor, TransportError::WrongSecret { peer: 1, .. }),
        "{acceptor}"
    );
}

#[test]
fn a_layout_mismatch_names_the_first_differing_line_on_both_ends() {
    let theirs = LAYOUT.replace("vcpu 1 node 1", "vcpu 1 node 0");
    let (dialer, acceptor) = refused(
        Channel::Forward,
        &creds(0, b"secret", LAYOUT),
        &creds(1, b"secret", &theirs),
        "a different layout was accepted",
    );
    let TransportError::LayoutMismatch { difference, .. } = &dialer else {
        panic!("dialer: {dialer}");
    };
    assert!(
        difference.contains("line 4: here `vcpu 1 node 0`, node 0 has `vcpu 1 node 1`"),
        "{difference}"
    );
    assert!(
        matches!(acceptor, TransportError::LayoutMismatch { peer: 1, .. }),
        "{acceptor}"
    );
}

#[test]
fn a_large_layout_text_crosses_in_many_sends() {
    let ours = format!("{LAYOUT}{}", "memory 0x1000\n".repeat(2000));
    let theirs = format!("{LAYOUT}{}x\n", "memory 0x1000\n".repeat(2000));
    let (dialer, _) = refused(
        Channel::Forward,
        &creds(0, b"secret", &ours),
        &creds(1, b"secret", &theirs),
        "a different layout was accepted",
    );
    assert!(dialer.to_string().contains("line 2005"), "{dialer}");
}

#[test]
fn frames_and_pages_arrive_whole_and_in_order_past_every_ring_and_pool() {
    let (conn1, conn0, wire) = connected(Channel::DsmBulk);
    // Both pool adverts arrive first.
    let (got1, got0) = past_adverts(&conn1, &conn0);
    let not_ready_before = wire.not_ready();

    // Far more than the receive ring and the staging ring hold, mixed, sent without the
    // receiver making progress: what has no credit waits in the backlog.
    let count = 4 * u64::from(RECV_RING + STAGING_SLOTS);
    let sent: Vec<Frame> = (0..count)
        .map(|i| {
            let len = if i % 3 == 0 {
                4096
            } else {
                usize::try_from(i * 7 % 200).unwrap()
            };
            frame(
                i,
                (0..len)
                    .map(|b: usize| u8::try_from(b % 251).unwrap() ^ i.to_le_bytes()[0])
                    .collect(),
            )
        })
        .collect();
    for f in &sent {
        conn1.send(f.view()).unwrap();
    }
    assert!(
        conn1.stats().frames_queued > 0,
        "nothing waited for credits"
    );
    run_until((&conn1, &got1), (&conn0, &got0), || {
        got0.frames.borrow().len() == sent.len()
    });
    let received: Vec<Frame> = got0
        .frames
        .borrow()
        .iter()
        .map(|(_, f)| f.clone())
        .collect();
    assert_eq!(received, sent);
    assert_eq!(
        wire.not_ready(),
        not_ready_before,
        "a SEND found no receive posted: the credits let it go too early"
    );
    assert_eq!(conn1.stats().frames_sent, count);

    // And back the other way, on the same connection.
    conn0.send(frame(7, vec![9; MAX_PAYLOAD]).view()).unwrap();
    run_until((&conn1, &got1), (&conn0, &got0), || {
        !got1.frames.borrow().is_empty()
    });
    assert_eq!(got1.frames.borrow()[0].1, frame(7, vec![9; MAX_PAYLOAD]));
}

#[test]
fn a_peer_that_never_reads_is_refused_past_the_backlog_limit() {
    let (conn1, conn0, _wire) = connected(Channel::DsmBulk);
    let (got1, _got0) = past_adverts(&conn1, &conn0);
    let page = frame(1, vec![5; 4096]);
    let mut sent = 0usize;
    let refused = loop {
        match conn1.send(page.view()) {
            Ok(()) => sent += 1,
            Err(e) => break e,
        }
        conn1.progress(&got1).unwrap();
        assert!(sent < 2 * BACKLOG_LIMIT / 4096, "never refused");
    };
    assert!(
        matches!(refused, ConnError::Backlog(queued) if queued + 4096 + 24 > BACKLOG_LIMIT),
        "{refused}"
    );
    assert!(conn1.stats().peak_backlog_bytes > BACKLOG_LIMIT - 4200);
}

#[test]
fn a_queue_pair_error_makes_progress_fail_with_the_reason() {
    let (conn1, conn0, wire) = connected(Channel::Forward);
    wire.fail("injected fault");
    let got = Collected::default();
    let until = Instant::now() + Duration::from_secs(2);
    let why = loop {
        match conn0.progress(&got) {
            Err(why) => break why,
            Ok(_) => assert!(Instant::now() < until, "the fault was never reported"),
        }
    };
    assert!(why.contains("injected fault"), "{why}");
    drop(conn1);
}

struct TwoNodes {
    meshes: [Arc<RdmaMesh>; 2],
    seen: [Arc<Recorder>; 2],
    /// Per channel; side 0 of each is node 1's end.
    wires: BTreeMap<Channel, FakeWire>,
}

/// Nodes 0 and 1 as two meshes on fake queue pairs, past the barrier.
fn two_nodes(configure: impl Fn(&mut MeshConfig)) -> TwoNodes {
    let mut cfgs = [config(0, b"secret", LAYOUT), config(1, b"secret", LAYOUT)];
    for cfg in &mut cfgs {
        configure(cfg);
    }
    let (creds0, creds1) = (Credentials::new(&cfgs[0]), Credentials::new(&cfgs[1]));
    let mut conns0 = Vec::new();
    let mut conns1 = Vec::new();
    let mut wires = BTreeMap::new();
    for channel in Channel::ALL {
        let (c1, c0, wire) = connect(channel, &creds0, &creds1).unwrap();
        conns1.push(c1);
        conns0.push(c0);
        wires.insert(channel, wire);
    }
    let seen = [Arc::new(Recorder::default()), Arc::new(Recorder::default())];
    let deadline = Instant::now() + Duration::from_secs(5);
    let [cfg0, cfg1] = &cfgs;
    let (mesh0, mesh1) = thread::scope(|s| {
        let handler: Arc<dyn FrameHandler> = seen[1].clone();
        let one = s
            .spawn(move || RdmaMesh::start(cfg1, handler, BTreeMap::from([(0, conns1)]), deadline));
        let zero = RdmaMesh::start(
            cfg0,
            seen[0].clone(),
            BTreeMap::from([(1, conns0)]),
            deadline,
        );
        (zero.unwrap(), one.join().unwrap().unwrap())
    });
    TwoNodes {
        meshes: [mesh0, mesh1],
        seen,
        wires,
    }
}

fn wait_for(what: &str, done: impl Fn() -> bool) {
    let until = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn a_mesh_on_fake_queue_pairs_carries_frames_on_every_channel() {
    let nodes = two_nodes(|cfg| cfg.busy_poll = true);
    for (i, channel) in Channel::ALL.into_iter().enumerate() {
        let page = vec![u8::try_from(i).unwrap(); 4096];
        nodes.meshes[1]
            .send(0, channel, &frame(i as u64, page))
            .unwrap();
        nodes.meshes[0]
            .send(1, channel, &frame(i as u64, b"small".to_vec()))
            .unwrap();
    }
    wait_for("every frame", || {
        nodes.seen[0].frames().len() == Channel::COUNT
            && nodes.seen[1].frames().len() == Channel::COUNT
    });
    let mut at0 = nodes.seen[0].frames();
    at0.sort_by_key(|(_, channel, _)| *channel);
    for (i, (from, channel, got)) in at0.into_iter().enumerate() {
        assert_eq!((from, channel), (1, Channel::ALL[i]));
        assert_eq!(got.payload, vec![u8::try_from(i).unwrap(); 4096]);
    }
    assert!(matches!(
        nodes.meshes[0].send(1, Channel::Control, &frame(0, vec![0; MAX_PAYLOAD + 1])),
        Err(TransportError::PayloadTooLarge { .. })
    ));
    assert!(matches!(
        nodes.meshes[0].send(
            1,
            Channel::Control,
            &Frame {
                kind: 0xFFFF,
                ..Frame::default()
            }
        ),
        Err(TransportError::ReservedKind { kind: 0xFFFF })
    ));
    assert!(nodes.seen[0].lost().is_empty());
    assert!(nodes.meshes[0].stats().frames_sent >= 4);
}

#[test]
fn a_queue_pair_error_is_reported_exactly_once_per_peer() {
    let nodes = two_nodes(|_| {});
    nodes.wires[&Channel::DsmBulk].fail("injected queue pair fault");
    wait_for("both losses", || {
        !nodes.seen[0].lost().is_empty() && !nodes.seen[1].lost().is_empty()
    });
    // The other channels' queue pairs are closed too; none of that is a second report.
    thread::sleep(Duration::from_millis(300));
    for (node, peer) in [(0, 1), (1, 0)] {
        let lost = nodes.seen[node].lost();
        assert_eq!(lost.len(), 1, "node {node}: {lost:?}");
        assert_eq!(lost[0].0, peer);
        assert!(nodes.meshes[node].is_lost(peer));
        assert!(matches!(
            nodes.meshes[node].send(peer, Channel::DsmRequest, &frame(1, vec![])),
            Err(TransportError::PeerLost { .. })
        ));
    }
    // The node that notices the fault first closes its queue pairs; the other may then see
    // that close on another channel before its bulk channel's completion: either reason is
    // the loss, but the first to notice names the fault.
    let whys: Vec<String> = (0..2).map(|n| nodes.seen[n].lost()[0].1.clone()).collect();
    assert!(
        whys.iter()
            .any(|why| why.contains("injected queue pair fault")),
        "{whys:?}"
    );
}

#[test]
fn a_shut_down_peer_is_lost_to_the_other_and_a_shutdown_reports_nothing() {
    let nodes = two_nodes(|cfg| {
        cfg.liveness = Liveness {
            heartbeat_interval: Duration::from_millis(20),
            silence_timeout: Duration::from_millis(200),
        };
    });
    nodes.meshes[1].shutdown();
    wait_for("node 0 to lose node 1", || !nodes.seen[0].lost().is_empty());
    thread::sleep(Duration::from_millis(300));
    assert_eq!(nodes.seen[0].lost().len(), 1);
    assert!(
        nodes.seen[1].lost().is_empty(),
        "a node that shuts down reports no one lost"
    );
}

#[test]
fn a_frozen_peer_is_found_by_its_silence_and_reported_once() {
    let nodes = two_nodes(|cfg| {
        cfg.liveness = Liveness {
            heartbeat_interval: Duration::from_millis(20),
            silence_timeout: Duration::from_millis(300),
        };
    });
    // Node 1 stops as a stopped process would: no error on any queue pair, only silence.
    for wire in nodes.wires.values() {
        wire.freeze(0, true);
    }
    let frozen_at = Instant::now();
    wait_for("node 0 to lose node 1", || !nodes.seen[0].lost().is_empty());
    // Silence counts from node 1's last heartbeat, which went about one interval before the
    // freeze (later on a loaded machine): the loss cannot come much before the limit.
    assert!(frozen_at.elapsed() >= Duration::from_millis(150));
    thread::sleep(Duration::from_millis(200));
    let lost = nodes.seen[0].lost();
    assert_eq!(lost.len(), 1, "{lost:?}");
    assert_eq!(lost[0].0, 1);
    assert!(
        lost[0].1.contains("nothing (no frame, no heartbeat)"),
        "{}",
        lost[0].1
    );
    for wire in nodes.wires.values() {
        wire.freeze(0, false);
    }
}
