//! Meshes of 2, 3 and 4 nodes on loopback: every channel, both directions, order per
//! (peer, channel), page-sized payloads, concurrent senders, busy polling, and what `send`
//! refuses.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::thread;

use common::{mesh, Recorder};
use transport::{
    Channel, Frame, NodeId, TcpMesh, Transport, TransportError, FIRST_RESERVED_KIND, MAX_PAYLOAD,
};

const FRAMES_PER_CHANNEL: u64 = 40;
const PAYLOAD_LENS: [usize; 5] = [0, 1, 100, 4096, MAX_PAYLOAD];

/// A frame whose every field and byte says where it comes from and where it goes.
fn frame_for(from: NodeId, to: NodeId, channel: Channel, id: u64) -> Frame {
    let len = PAYLOAD_LENS[usize::try_from(id).unwrap() % PAYLOAD_LENS.len()];
    let seed = u64::from(from) * 31 + u64::from(to) * 17 + channel as u64 * 7 + id;
    Frame {
        kind: 100 + channel as u16,
        flags: u16::try_from(from).unwrap(),
        id,
        arg: u64::from(to),
        payload: (0..len)
            .map(|i| (seed.wrapping_mul(131) + i as u64).to_le_bytes()[0])
            .collect(),
    }
}

/// Every node sends to every peer on every channel, interleaved, from its own thread; every
/// node must then hold, per (sender, channel), exactly the frames sent, in order.
fn all_to_all(meshes: &[Arc<TcpMesh>], recorders: &[Arc<Recorder>]) {
    let n = NodeId::try_from(meshes.len()).unwrap();
    thread::scope(|s| {
        for mesh in meshes {
            s.spawn(move || {
                let me = mesh.me();
                for id in 0..FRAMES_PER_CHANNEL {
                    for to in mesh.peers() {
                        for channel in Channel::ALL {
                            mesh.send(to, channel, &frame_for(me, to, channel, id))
                                .unwrap();
                        }
                    }
                }
            });
        }
    });
    let expected_total =
        (n as usize - 1) * Channel::COUNT * usize::try_from(FRAMES_PER_CHANNEL).unwrap();
    for (me, recorder) in recorders.iter().enumerate() {
        let me = NodeId::try_from(me).unwrap();
        let seen = recorder.wait_until(|seen| seen.frames.len() >= expected_total);
        assert_eq!(
            seen.frames.len(),
            expected_total,
            "node {me} got too few or too many frames"
        );
        assert!(
            seen.lost.is_empty(),
            "node {me} lost peers: {:?}",
            seen.lost
        );
        let mut per_stream: BTreeMap<(NodeId, Channel), Vec<&Frame>> = BTreeMap::new();
        for (from, channel, frame) in &seen.frames {
            per_stream.entry((*from, *channel)).or_default().push(frame);
        }
        assert_eq!(per_stream.len(), (n as usize - 1) * Channel::COUNT);
        for ((from, channel), frames) in per_stream {
            for (i, frame) in frames.iter().enumerate() {
                assert_eq!(
                    **frame,
                    frame_for(from, me, channel, i as u64),
                    "frame {i} from node {from} on {channel} at node {me}"
                );
            }
        }
    }
}

#[test]
fn two_nodes_exchange_frames_on_every_channel_in_order() {
    let (meshes, recorders) = mesh(2, |_| {});
    assert_eq!(meshes[0].peers(), vec![1]);
    assert_eq!(meshes[1].peers(), vec![0]);
    all_to_all(&meshes, &recorders);
}

#[test]
fn three_nodes_exchange_frames_on_every_channel_in_order() {
    let (meshes, recorders) = mesh(3, |_| {});
    assert_eq!(meshes[1].peers(), vec![0, 2]);
    all_to_all(&meshes, &recorders);
}

#[test]
fn four_nodes_exchange_frames_on_every_channel_in_order() {
    let (meshes, recorders) = mesh(4, |_| {});
    assert_eq!(meshes[3].peers(), vec![0, 1, 2]);
    all_to_all(&meshes, &recorders);
}

#[test]
fn busy_polled_request_channels_deliver_and_shut_down() {
    let (meshes, recorders) = mesh(2, |cfg| cfg.busy_poll = true);
    all_to_all(&meshes, &recorders);
    // The spinning receivers must notice the shutdown and end, or this would hang.
    meshes[0].shutdown();
    meshes[1].shutdown();
    // The node that shut down first reports nobody; the other may have seen it go first.
    assert!(recorders[0].seen().lost.is_empty());
    assert!(recorders[1].seen().lost.iter().all(|(peer, _)| *peer == 0));
}

#[test]
fn concurrent_senders_on_one_connection_never_interleave_frames() {
    const THREADS: u64 = 4;
    const PER_THREAD: u64 = 100;
    let (meshes, recorders) = mesh(2, |_| {});
    let sender = &meshes[1];
    thread::scope(|s| {
        for t in 0..THREADS {
            s.spawn(move || {
                for seq in 0..PER_THREAD {
                    let id = t << 32 | seq;
                    let frame = Frame {
                        kind: 7,
                        flags: 0,
                        id,
                        arg: !id,
                        payload: vec![(t * 37 + seq).to_le_bytes()[0]; 4096],
                    };
                    sender.send(0, Channel::DsmBulk, &frame).unwrap();
                }
            });
        }
    });
    let total = usize::try_from(THREADS * PER_THREAD).unwrap();
    let seen = recorders[0].wait_until(|seen| seen.frames.len() >= total);
    assert_eq!(seen.frames.len(), total);
    let mut next_seq = vec![0u64; usize::try_from(THREADS).unwrap()];
    for (from, channel, frame) in &seen.frames {
        assert_eq!((*from, *channel), (1, Channel::DsmBulk));
        let (t, seq) = (frame.id >> 32, frame.id & 0xFFFF_FFFF);
        let t_index = usize::try_from(t).unwrap();
        assert_eq!(seq, next_seq[t_index], "thread {t}'s frames out of order");
        next_seq[t_index] += 1;
        assert_eq!(frame.arg, !frame.id);
        assert_eq!(frame.payload, vec![(t * 37 + seq).to_le_bytes()[0]; 4096]);
    }
}

#[test]
fn send_refuses_what_the_wire_cannot_carry() {
    let (meshes, _recorders) = mesh(2, |_| {});
    let node = &meshes[0];
    let oversized = Frame {
        payload: vec![0; MAX_PAYLOAD + 1],
        ..Frame::default()
    };
    assert!(matches!(
        node.send(1, Channel::DsmBulk, &oversized),
        Err(TransportError::PayloadTooLarge { len }) if len == MAX_PAYLOAD + 1
    ));
    let reserved = Frame {
        kind: FIRST_RESERVED_KIND,
        ..Frame::default()
    };
    assert!(matches!(
        node.send(1, Channel::Control, &reserved),
        Err(TransportError::ReservedKind {
            kind: FIRST_RESERVED_KIND
        })
    ));
    assert!(matches!(
        node.send(5, Channel::Control, &Frame::default()),
        Err(TransportError::UnknownPeer { peer: 5 })
    ));
    node.shutdown();
    assert!(matches!(
        node.send(1, Channel::Control, &Frame::default()),
        Err(TransportError::ShutDown)
    ));
}

#[test]
fn a_single_node_cluster_forms_an_empty_mesh() {
    let (meshes, _recorders) = mesh(1, |_| {});
    assert_eq!(meshes[0].me(), 0);
    assert!(meshes[0].peers().is_empty());
    assert!(matches!(
        meshes[0].send(1, Channel::Control, &Frame::default()),
        Err(TransportError::UnknownPeer { peer: 1 })
    ));
}
