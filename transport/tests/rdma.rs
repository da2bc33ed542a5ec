//! The RDMA backend against the real verbs library (feature `rdma`): on a host without an RDMA
//! device, a node fails at start with one line naming what is missing; where a device exists,
//! two nodes carry frames and report a lost peer over it.

#![cfg(feature = "rdma")]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::{config, Recorder};
use transport::{Channel, Frame, FrameHandler, TransportError, TransportKind};

/// Whether the kernel shows any verbs device (read independently of the code under test).
fn host_has_rdma_device() -> bool {
    std::fs::read_dir("/sys/class/infiniband").is_ok_and(|mut entries| entries.next().is_some())
}

#[test]
fn an_rdma_node_without_a_device_fails_at_once_naming_what_is_missing() {
    let addrs: Vec<SocketAddr> = vec![
        "127.0.0.1:9".parse().unwrap(),
        "127.0.0.1:10".parse().unwrap(),
    ];
    let mut cfg = config(1, &addrs);
    cfg.connect_timeout = Duration::from_secs(1);
    let started = Instant::now();
    let result = transport::establish(TransportKind::Rdma, cfg, Arc::new(Recorder::default()));
    let took = started.elapsed();
    let error = result.err().expect("no mesh can form: node 0 never comes");
    if host_has_rdma_device() {
        // The opposite case: the device check passes, and setup goes on to look for node 0.
        assert!(
            !matches!(error, TransportError::NoRdmaDevice { .. }),
            "this host has an RDMA device, yet: {error}"
        );
        return;
    }
    let TransportError::NoRdmaDevice { .. } = &error else {
        panic!("expected the missing device to be named, got: {error}");
    };
    let message = error.to_string();
    assert!(!message.contains('\n'), "one line: {message}");
    assert!(message.starts_with("no RDMA device: "), "{message}");
    assert!(message.contains("ibv_get_device_list"), "{message}");
    assert!(message.contains("rdma link add"), "{message}");
    // Refused before any connection attempt: well within the connect timeout.
    assert!(took < Duration::from_millis(500), "took {took:?}");
}

/// An IP address of this host's RDMA interface (a RoCE netdev, soft-RoCE's included).
fn rdma_ip() -> std::net::IpAddr {
    let text = std::env::var("SPANVM_RDMA_ADDR")
        .expect("set SPANVM_RDMA_ADDR to an IP address of this host's RDMA interface");
    text.parse().expect("SPANVM_RDMA_ADDR is not an IP address")
}

#[test]
#[ignore = "needs an RDMA device (any verbs device, soft-RoCE included) and SPANVM_RDMA_ADDR; \
            the CI host has none (its kernel has no InfiniBand support)"]
fn two_nodes_carry_frames_on_every_channel_and_report_a_lost_peer_over_rdma() {
    let ip = rdma_ip();
    let addrs: Vec<SocketAddr> = (0..2)
        .map(|_| SocketAddr::new(ip, common::free_port()))
        .collect();
    let recorders = [Arc::new(Recorder::default()), Arc::new(Recorder::default())];
    let setups: Vec<_> = (0..2u32)
        .map(|me| {
            let cfg = config(me, &addrs);
            let handler: Arc<dyn FrameHandler> = recorders[me as usize].clone();
            thread::spawn(move || transport::establish(TransportKind::Rdma, cfg, handler))
        })
        .collect();
    let meshes: Vec<_> = setups
        .into_iter()
        .map(|s| s.join().unwrap().expect("an RDMA mesh of two nodes"))
        .collect();
    assert_eq!(meshes[0].kind(), TransportKind::Rdma);
    for (i, channel) in Channel::ALL.into_iter().enumerate() {
        let page = Frame {
            kind: 1,
            flags: 0,
            id: i as u64,
            arg: 0,
            payload: vec![u8::try_from(i).unwrap(); 4096],
        };
        meshes[1].send(0, channel, &page).unwrap();
    }
    let seen = recorders[0].wait_until(|s| s.frames.len() == Channel::COUNT);
    assert_eq!(seen.frames.len(), Channel::COUNT);
    for (from, channel, frame) in &seen.frames {
        assert_eq!(*from, 1);
        let i = channel.index();
        assert_eq!(frame.payload, vec![u8::try_from(i).unwrap(); 4096]);
    }
    drop(seen);
    meshes[1].shutdown();
    let seen = recorders[0].wait_until(|s| !s.lost.is_empty());
    assert_eq!(seen.lost.len(), 1, "{:?}", seen.lost);
    assert_eq!(seen.lost[0].0, 1);
}
