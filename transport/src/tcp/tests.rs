//! A real mesh node against a hand-driven peer that authenticates properly and then breaks
//! the rules: malformed frames, reserved kinds, silence, a duplicate connection.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use super::connection::prepare_socket;
use super::*;
use crate::api::Transport;
use crate::channel::NodeId;
use crate::config::Liveness;
use crate::frame::{Frame, FrameHeader, KIND_MESH_READY, MAX_PAYLOAD};
use crate::handshake;
use crate::test_recorder::Recorder;

const LAYOUT: &str = "spanvm-layout 1\nnodes 2\n";

/// Heartbeats, but a silence limit no test reaches: losses seen are for the reason tested.
fn patient() -> Liveness {
    Liveness {
        heartbeat_interval: Duration::from_millis(100),
        silence_timeout: Duration::from_secs(30),
    }
}

fn config(me: NodeId, listen: SocketAddr, peers: Vec<(NodeId, SocketAddr)>) -> MeshConfig {
    MeshConfig {
        me,
        listen,
        peers,
        secret: b"unit-test-secret".to_vec(),
        layout_canonical: LAYOUT.to_string(),
        connect_timeout: Duration::from_secs(10),
        busy_poll: false,
        service_priority: crate::ServicePriority::Normal,
        liveness: patient(),
        socket_buffer: None,
    }
}

/// Node 0 as a real mesh, and node 1 played by hand: all four channels authenticated and the
/// mesh-ready signal sent. Returns node 1's streams in channel order.
fn mesh_with_hand_peer(liveness: Liveness) -> (Arc<TcpMesh>, Arc<Recorder>, Vec<TcpStream>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr0 = listener.local_addr().unwrap();
    let addr1: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let mut cfg0 = config(0, addr0, vec![(1, addr1)]);
    cfg0.liveness = liveness;
    let cfg1 = config(1, addr1, vec![(0, addr0)]);
    let recorder = Arc::new(Recorder::default());
    let handler: Arc<dyn FrameHandler> = recorder.clone();
    let node0 = thread::spawn(move || TcpMesh::establish_on(listener, cfg0, handler));

    let creds1 = Credentials::new(&cfg1);
    let mut streams = Vec::new();
    for channel in Channel::ALL {
        let mut stream = TcpStream::connect(addr0).unwrap();
        prepare_socket(&stream).unwrap();
        handshake::dial(&mut stream, &creds1, 0, addr0, channel, soon()).unwrap();
        streams.push(stream);
    }
    write_frame(&mut streams[Channel::Control.index()], KIND_MESH_READY, 0);
    let mesh = node0.join().unwrap().unwrap();
    (mesh, recorder, streams)
}

/// The deadline the mesh gives a handshake starting now.
fn soon() -> Instant {
    Instant::now() + handshake::HANDSHAKE_DEADLINE
}

fn write_frame(stream: &mut TcpStream, kind: u16, payload_len: u32) {
    let header = FrameHeader {
        kind,
        flags: 0,
        payload_len,
        id: 7,
        arg: 0,
    };
    stream.write_all(&header.encode()).unwrap();
}

#[test]
fn frames_from_a_hand_driven_peer_are_delivered() {
    let (mesh, recorder, mut streams) = mesh_with_hand_peer(patient());
    let frame = Frame {
        kind: 3,
        flags: 1,
        id: 99,
        arg: 5,
        payload: vec![0x5A; 4096],
    };
    let mut bytes = Vec::new();
    frame.encode_into(&mut bytes);
    streams[Channel::DsmBulk.index()].write_all(&bytes).unwrap();
    assert_eq!(
        recorder.wait_for_frame(),
        vec![(1, Channel::DsmBulk, frame)]
    );
    mesh.shutdown();
}

#[test]
fn an_oversized_length_is_rejected_and_the_peer_dropped() {
    let (mesh, recorder, mut streams) = mesh_with_hand_peer(patient());
    write_frame(
        &mut streams[Channel::DsmBulk.index()],
        1,
        u32::try_from(MAX_PAYLOAD).unwrap() + 1,
    );
    let losses = recorder.wait_for_loss();
    assert_eq!(losses.len(), 1);
    assert_eq!(losses[0].0, 1);
    assert!(losses[0].1.contains("malformed frame"), "{}", losses[0].1);
    assert!(
        losses[0].1.contains("exceeds the maximum of 4352"),
        "{}",
        losses[0].1
    );
    assert!(mesh.is_lost(1));
    assert!(matches!(
        mesh.send(1, Channel::Forward, &Frame::default()),
        Err(TransportError::PeerLost { peer: 1 })
    ));
    assert!(recorder.frames().is_empty());
}

#[test]
fn a_reserved_kind_on_a_data_channel_is_rejected() {
    let (_mesh, recorder, mut streams) = mesh_with_hand_peer(patient());
    write_frame(&mut streams[Channel::Forward.index()], 0xFF10, 0);
    let losses = recorder.wait_for_loss();
    assert_eq!(losses.len(), 1);
    assert!(
        losses[0]
            .1
            .contains("reserved kind 0xff10 on the forward channel"),
        "{}",
        losses[0].1
    );
}

#[test]
fn a_peer_that_stops_talking_without_closing_is_lost_after_the_silence_limit() {
    let liveness = Liveness {
        heartbeat_interval: Duration::from_millis(50),
        silence_timeout: Duration::from_millis(400),
    };
    let (mesh, recorder, streams) = mesh_with_hand_peer(liveness);
    // The hand-driven peer keeps every socket open and sends nothing, not even heartbeats.
    let losses = recorder.wait_for_loss();
    assert_eq!(losses.len(), 1);
    assert_eq!(losses[0].0, 1);
    assert!(losses[0].1.contains("no heartbeat"), "{}", losses[0].1);
    assert!(mesh.is_lost(1));
    drop(streams);
}

#[test]
fn a_second_connection_for_the_same_channel_is_refused_as_a_duplicate() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr0 = listener.local_addr().unwrap();
    let addr1: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let mut cfg0 = config(0, addr0, vec![(1, addr1)]);
    cfg0.connect_timeout = Duration::from_secs(2);
    let creds0 = Credentials::new(&cfg0);
    let creds1 = Credentials::new(&config(1, addr1, vec![(0, addr0)]));
    thread::scope(|s| {
        let acceptor = s.spawn(|| {
            let deadline = Instant::now() + cfg0.connect_timeout;
            setup::connect_all(&listener, &cfg0, &creds0, deadline)
        });
        let mut first = TcpStream::connect(addr0).unwrap();
        prepare_socket(&first).unwrap();
        handshake::dial(&mut first, &creds1, 0, addr0, Channel::DsmRequest, soon()).unwrap();
        let mut second = TcpStream::connect(addr0).unwrap();
        prepare_socket(&second).unwrap();
        let err = handshake::dial(&mut second, &creds1, 0, addr0, Channel::DsmRequest, soon())
            .unwrap_err();
        assert!(
            matches!(err, TransportError::DuplicateConnection { peer: 0, .. }),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("is a second process running as node 1?"),
            "{err}"
        );
        // The other three channels never come: the acceptor gives up naming the duplicate.
        let err = acceptor.join().unwrap().unwrap_err();
        assert!(
            matches!(err, TransportError::DuplicateConnection { peer: 1, .. }),
            "{err}"
        );
    });
}

/// Closes a socket when dropped, on every path out of a test, so that a thread writing to it
/// sees its write fail and ends.
struct CloseOnDrop<'a>(&'a TcpStream);

impl Drop for CloseOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.0.shutdown(std::net::Shutdown::Both);
    }
}

/// Whether the other end closed `stream` within `within` (rather than leaving it open).
fn closed_by_the_other_end(mut stream: &TcpStream, within: Duration) -> bool {
    stream.set_read_timeout(Some(within)).unwrap();
    let mut byte = [0u8; 1];
    match std::io::Read::read(&mut stream, &mut byte) {
        Ok(n) => n == 0,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

#[test]
fn a_trickling_and_a_silent_stranger_do_not_delay_the_mesh() {
    let listeners: Vec<TcpListener> = (0..3)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    // Both strangers reach the listeners of nodes 0 and 1 before any real peer does.
    let strangers: Vec<(TcpStream, TcpStream)> = addrs[..2]
        .iter()
        .map(|&addr| {
            (
                TcpStream::connect(addr).unwrap(),
                TcpStream::connect(addr).unwrap(),
            )
        })
        .collect();
    thread::scope(|s| {
        let _close: Vec<CloseOnDrop> = strangers
            .iter()
            .flat_map(|(trickling, silent)| [CloseOnDrop(trickling), CloseOnDrop(silent)])
            .collect();
        for (trickling, _) in &strangers {
            s.spawn(move || {
                let mut trickling = trickling;
                // The start of a hello, so that it is not refused as garbage; bounded, and it
                // stops at the first write that fails once its connection is closed.
                for &byte in b"\x01\x31\x00\x00\x00SPANVM".iter() {
                    if trickling.write_all(&[byte]).is_err() {
                        return;
                    }
                    thread::sleep(Duration::from_secs(1));
                }
            });
        }
        let started = Instant::now();
        let nodes: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(me, listener)| {
                let peers = (0..3)
                    .filter(|&p| p != me)
                    .map(|p| (NodeId::try_from(p).unwrap(), addrs[p]))
                    .collect();
                let cfg = config(NodeId::try_from(me).unwrap(), addrs[me], peers);
                let handler: Arc<dyn FrameHandler> = Arc::new(Recorder::default());
                s.spawn(move || TcpMesh::establish_on(listener, cfg, handler))
            })
            .collect();
        let meshes: Vec<Arc<TcpMesh>> = nodes
            .into_iter()
            .map(|node| node.join().unwrap().unwrap())
            .collect();
        let took = started.elapsed();
        // The strangers would have been given up only at the handshake deadline.
        assert!(took < handshake::HANDSHAKE_DEADLINE, "{took:?}");
        // And they were not left hanging: setup closed them when it ended.
        for (trickling, silent) in &strangers {
            assert!(closed_by_the_other_end(silent, Duration::from_secs(1)));
            assert!(closed_by_the_other_end(trickling, Duration::from_secs(1)));
        }
        drop(meshes);
    });
}

#[test]
fn connections_past_the_handshake_limit_are_closed_at_once_and_the_rest_when_setup_ends() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr0 = listener.local_addr().unwrap();
    let addr1: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let mut cfg0 = config(0, addr0, vec![(1, addr1)]);
    // Shorter than the handshake deadline, so that ending on time means cutting handshakes off.
    cfg0.connect_timeout = Duration::from_millis(1500);
    let creds0 = Credentials::new(&cfg0);
    let silent: Vec<TcpStream> = (0..setup::MAX_HANDSHAKES)
        .map(|_| TcpStream::connect(addr0).unwrap())
        .collect();
    let started = Instant::now();
    thread::scope(|s| {
        let acceptor = s.spawn(|| {
            let deadline = Instant::now() + cfg0.connect_timeout;
            setup::connect_all(&listener, &cfg0, &creds0, deadline)
        });
        let one_too_many = TcpStream::connect(addr0).unwrap();
        assert!(closed_by_the_other_end(
            &one_too_many,
            Duration::from_secs(1)
        ));
        assert!(!closed_by_the_other_end(
            &silent[0],
            Duration::from_millis(100)
        ));
        let err = acceptor.join().unwrap().unwrap_err();
        assert!(
            matches!(err, TransportError::PeerUnreachable { peer: 1, .. }),
            "{err}"
        );
        let took = started.elapsed();
        assert!(
            took < cfg0.connect_timeout + Duration::from_secs(1),
            "{took:?}"
        );
    });
    for stream in &silent {
        assert!(closed_by_the_other_end(stream, Duration::from_secs(1)));
    }
}
