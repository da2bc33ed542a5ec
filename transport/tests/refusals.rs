//! Nodes that must not form a mesh: wrong secret, different layout, a peer that never comes,
//! a node that is not in the cluster. Each side must get an error that names the cause.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::{config, free_port, Recorder};
use transport::{FrameHandler, MeshConfig, NodeId, TcpMesh, TransportError};

const SHORT: Duration = Duration::from_millis(1500);

fn handler() -> Arc<dyn FrameHandler> {
    Arc::new(Recorder::default())
}

fn listeners(n: usize) -> (Vec<TcpListener>, Vec<SocketAddr>) {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addrs = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    (listeners, addrs)
}

/// Sets up every node concurrently and returns each one's error.
fn setup_errors(nodes: Vec<(TcpListener, MeshConfig)>) -> Vec<TransportError> {
    let setups: Vec<_> = nodes
        .into_iter()
        .map(|(listener, cfg)| {
            thread::spawn(move || TcpMesh::establish_on(listener, cfg, handler()))
        })
        .collect();
    setups
        .into_iter()
        .enumerate()
        .map(|(node, setup)| match setup.join().unwrap() {
            Ok(_) => panic!("node {node} formed a mesh it should have refused"),
            Err(e) => e,
        })
        .collect()
}

fn pair(adjust: impl Fn(&mut MeshConfig)) -> Vec<(TcpListener, MeshConfig)> {
    let (listeners, addrs) = listeners(2);
    listeners
        .into_iter()
        .enumerate()
        .map(|(me, listener)| {
            let mut cfg = config(NodeId::try_from(me).unwrap(), &addrs);
            cfg.connect_timeout = SHORT;
            adjust(&mut cfg);
            (listener, cfg)
        })
        .collect()
}

#[test]
fn a_wrong_secret_is_refused_on_both_sides_naming_the_peer() {
    let errors = setup_errors(pair(|cfg| {
        if cfg.me == 1 {
            cfg.secret = b"not the cluster secret".to_vec();
        }
    }));
    assert!(
        matches!(errors[0], TransportError::WrongSecret { peer: 1, .. }),
        "{}",
        errors[0]
    );
    assert!(errors[0]
        .to_string()
        .starts_with("node 1 and this node do not share the cluster secret"));
    assert!(
        matches!(errors[1], TransportError::WrongSecret { peer: 0, .. }),
        "{}",
        errors[1]
    );
    assert!(errors[1]
        .to_string()
        .starts_with("node 0 and this node do not share the cluster secret"));
}

#[test]
fn a_layout_mismatch_names_the_first_differing_line() {
    let errors = setup_errors(pair(|cfg| {
        if cfg.me == 1 {
            cfg.layout_canonical = cfg
                .layout_canonical
                .replace("vcpu 1 node 1", "vcpu 1 node 0");
        }
    }));
    match &errors[1] {
        TransportError::LayoutMismatch {
            peer: 0,
            difference,
        } => assert_eq!(
            difference,
            "layout differs from node 0 at line 4: here `vcpu 1 node 0`, node 0 has `vcpu 1 node 1`"
        ),
        other => panic!("node 1: expected a layout mismatch, got {other}"),
    }
    match &errors[0] {
        TransportError::LayoutMismatch {
            peer: 1,
            difference,
        } => assert_eq!(
            difference,
            "layout differs from node 1 at line 4: here `vcpu 1 node 1`, node 1 has `vcpu 1 node 0`"
        ),
        other => panic!("node 0: expected a layout mismatch, got {other}"),
    }
}

#[test]
fn a_peer_that_never_comes_up_is_unreachable_after_the_timeout() {
    // Node 1 dials node 0, which never listens.
    let addrs: Vec<SocketAddr> = vec![
        format!("127.0.0.1:{}", free_port()).parse().unwrap(),
        "127.0.0.1:0".parse().unwrap(),
    ];
    let mut cfg = config(1, &addrs);
    cfg.connect_timeout = Duration::from_millis(600);
    match TcpMesh::establish(cfg, handler()) {
        Err(TransportError::PeerUnreachable {
            peer: 0,
            addr,
            waited,
            detail,
        }) => {
            assert_eq!(addr, addrs[0]);
            assert_eq!(waited, Duration::from_millis(600));
            assert!(detail.contains("connecting failed"), "{detail}");
        }
        Err(other) => panic!("expected node 0 unreachable, got {other}"),
        Ok(_) => panic!("a mesh formed without node 0"),
    }

    // Node 0 waits for node 1, which never dials.
    let (mut listeners, mut addrs) = listeners(1);
    addrs.push(format!("127.0.0.1:{}", free_port()).parse().unwrap());
    let mut cfg = config(0, &addrs);
    cfg.connect_timeout = Duration::from_millis(600);
    match TcpMesh::establish_on(listeners.remove(0), cfg, handler()) {
        Err(TransportError::PeerUnreachable {
            peer: 1, detail, ..
        }) => {
            assert!(
                detail.contains("did not connect to this node's listen address"),
                "{detail}"
            );
            assert!(detail.contains("0 of 4 connections made"), "{detail}");
        }
        Err(other) => panic!("expected node 1 unreachable, got {other}"),
        Ok(_) => panic!("a mesh formed without node 1"),
    }
}

#[test]
fn a_node_outside_the_cluster_is_refused_and_the_right_peer_still_awaited() {
    // Node 0 knows nodes 0 and 1; a node 2 (started from another cluster description) dials it.
    let (mut listeners, addrs) = listeners(3);
    let mut cfg0 = config(0, &addrs[..2]);
    cfg0.connect_timeout = SHORT;
    let mut cfg2 = config(2, &addrs);
    cfg2.connect_timeout = SHORT;
    let listener2 = listeners.remove(2);
    let listener0 = listeners.remove(0);
    let errors = setup_errors(vec![(listener0, cfg0), (listener2, cfg2)]);
    assert!(
        matches!(errors[1], TransportError::UnexpectedNode { .. }),
        "{}",
        errors[1]
    );
    assert!(
        errors[1]
            .to_string()
            .contains("node 2 is not among node 0's peers"),
        "{}",
        errors[1]
    );
    match &errors[0] {
        TransportError::PeerUnreachable {
            peer: 1, detail, ..
        } => {
            assert!(detail.contains("refused a connection"), "{detail}");
            assert!(
                detail.contains("node 2 is not among node 0's peers"),
                "{detail}"
            );
        }
        other => panic!("node 0: expected node 1 unreachable, got {other}"),
    }
}
