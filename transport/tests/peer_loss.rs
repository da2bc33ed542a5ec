//! Lost peers: one whose mesh is dropped, one whose process is killed, one whose process is
//! frozen (sockets open, nothing sent). The survivors must hear of each exactly once.

mod common;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::{config, free_port, mesh, Recorder, PATIENCE, SECRET};
use transport::{Channel, Frame, FrameHandler, FrameRef, TcpMesh, Transport, TransportError};

#[test]
fn a_dropped_mesh_is_reported_lost_once_by_each_survivor_and_the_rest_goes_on() {
    let (mut meshes, recorders) = mesh(3, |_| {});
    let gone = meshes.pop().unwrap();
    drop(gone);
    for (survivor, recorder) in recorders.iter().enumerate().take(2) {
        let seen = recorder.wait_until(|seen| !seen.lost.is_empty());
        assert_eq!(seen.lost.len(), 1, "node {survivor}: {:?}", seen.lost);
        assert_eq!(seen.lost[0].0, 2);
    }
    // Every connection of node 2 broke and the watchdog kept running: still one report each.
    thread::sleep(Duration::from_millis(500));
    for (recorder, survivor) in recorders.iter().zip(&meshes) {
        assert_eq!(recorder.seen().lost.len(), 1);
        assert!(survivor.is_lost(2));
    }
    // A node that shut down reports nobody lost.
    assert!(recorders[2].seen().lost.is_empty());
    assert!(matches!(
        meshes[0].send(2, Channel::Control, &Frame::default()),
        Err(TransportError::PeerLost { peer: 2 })
    ));
    let frame = Frame {
        kind: 1,
        id: 42,
        payload: vec![1; 4096],
        ..Frame::default()
    };
    meshes[0].send(1, Channel::DsmRequest, &frame).unwrap();
    let seen = recorders[1].wait_until(|seen| !seen.frames.is_empty());
    assert_eq!(seen.frames, vec![(0, Channel::DsmRequest, frame)]);
}

/// A `transport-peer` child process, killed when the test ends however it ends.
struct PeerProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
}

impl PeerProcess {
    fn start(args: &[String]) -> PeerProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_transport-peer"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        PeerProcess {
            child,
            stdin,
            lines,
        }
    }

    fn expect_line(&self, wanted: &str) {
        let line = self.lines.recv_timeout(PATIENCE).unwrap();
        assert_eq!(line, wanted);
    }

    fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: kill(2) only sends a signal; the pid is our own child, not yet reaped (its
        // `Child` is alive and has not been waited for), so it names no other process.
        let sent = unsafe { libc::kill(pid, signal) };
        assert_eq!(sent, 0, "kill({pid}, {signal}) failed");
    }
}

impl Drop for PeerProcess {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn peer_args(me: u32, listen: SocketAddr, peer: (u32, SocketAddr), layout: &str) -> Vec<String> {
    vec![
        "--me".into(),
        me.to_string(),
        "--listen".into(),
        listen.to_string(),
        "--peer".into(),
        format!("{}={}", peer.0, peer.1),
        "--secret".into(),
        String::from_utf8(SECRET.to_vec()).unwrap(),
        "--layout".into(),
        layout.into(),
        "--connect-timeout-ms".into(),
        "15000".into(),
        "--echo".into(),
    ]
}

/// This process is node 0; the child is node 1 and dials it.
fn with_child_as_node_1() -> (Arc<TcpMesh>, Arc<Recorder>, PeerProcess) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addrs: Vec<SocketAddr> = vec![
        listener.local_addr().unwrap(),
        format!("127.0.0.1:{}", free_port()).parse().unwrap(),
    ];
    let cfg = config(0, &addrs);
    let child = PeerProcess::start(&peer_args(
        1,
        addrs[1],
        (0, addrs[0]),
        &cfg.layout_canonical,
    ));
    let recorder = Arc::new(Recorder::default());
    let handler: Arc<dyn FrameHandler> = recorder.clone();
    let mesh = TcpMesh::establish_on(listener, cfg, handler).unwrap();
    child.expect_line("ready");
    (mesh, recorder, child)
}

/// This process is node 1 and dials the child, node 0.
fn with_child_as_node_0() -> (Arc<TcpMesh>, Arc<Recorder>, PeerProcess) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addrs: Vec<SocketAddr> = vec![
        format!("127.0.0.1:{}", free_port()).parse().unwrap(),
        listener.local_addr().unwrap(),
    ];
    let cfg = config(1, &addrs);
    let child = PeerProcess::start(&peer_args(
        0,
        addrs[0],
        (1, addrs[1]),
        &cfg.layout_canonical,
    ));
    let recorder = Arc::new(Recorder::default());
    let handler: Arc<dyn FrameHandler> = recorder.clone();
    let mesh = TcpMesh::establish_on(listener, cfg, handler).unwrap();
    child.expect_line("ready");
    (mesh, recorder, child)
}

/// Proves the child is alive and serving: a page sent on each channel comes back echoed.
fn check_echo(mesh: &TcpMesh, recorder: &Recorder, child_id: u32) {
    for channel in Channel::ALL {
        let frame = Frame {
            kind: 9,
            flags: 1,
            id: channel as u64,
            arg: 77,
            payload: vec![channel as u8 + 1; 4096],
        };
        mesh.send(child_id, channel, &frame).unwrap();
    }
    let seen = recorder.wait_until(|seen| seen.frames.len() >= Channel::COUNT);
    assert_eq!(seen.frames.len(), Channel::COUNT);
    for (from, channel, frame) in &seen.frames {
        assert_eq!(*from, child_id);
        assert_eq!(frame.id, *channel as u64);
        assert_eq!(frame.payload, vec![*channel as u8 + 1; 4096]);
    }
}

#[test]
fn a_killed_peer_process_is_reported_lost() {
    for (mesh, recorder, child, child_id) in [
        {
            let (m, r, c) = with_child_as_node_1();
            (m, r, c, 1)
        },
        {
            let (m, r, c) = with_child_as_node_0();
            (m, r, c, 0)
        },
    ] {
        check_echo(&mesh, &recorder, child_id);
        let killed = Instant::now();
        child.signal(libc::SIGKILL);
        let seen = recorder.wait_until(|seen| !seen.lost.is_empty());
        eprintln!(
            "node {child_id} killed; reported lost after {:?}",
            killed.elapsed()
        );
        assert_eq!(seen.lost.len(), 1, "{:?}", seen.lost);
        assert_eq!(seen.lost[0].0, child_id);
        // The kernel closed its sockets: the loss is seen on a connection, not by silence.
        assert!(seen.lost[0].1.contains("connection"), "{}", seen.lost[0].1);
        drop(seen);
        assert!(mesh.is_lost(child_id));
    }
}

#[test]
fn a_frozen_peer_process_is_reported_lost_by_silence() {
    let (mesh, recorder, child) = with_child_as_node_0();
    check_echo(&mesh, &recorder, 0);
    // SIGSTOP keeps every socket open and the kernel acknowledging data; only the heartbeats
    // stop, as with a hung process or a half-open connection.
    child.signal(libc::SIGSTOP);
    let frozen = Instant::now();
    let seen = recorder.wait_until(|seen| !seen.lost.is_empty());
    eprintln!("node 0 frozen; reported lost after {:?}", frozen.elapsed());
    assert_eq!(seen.lost.len(), 1, "{:?}", seen.lost);
    assert_eq!(seen.lost[0].0, 0);
    assert!(
        seen.lost[0].1.contains("no heartbeat"),
        "{}",
        seen.lost[0].1
    );
    drop(seen);
    assert!(mesh.is_lost(0));
    // A stopped process still dies of SIGKILL; the guard reaps it.
    drop(child);
}

#[test]
fn a_peer_process_that_exits_cleanly_is_reported_lost() {
    let (mesh, recorder, mut child) = with_child_as_node_1();
    check_echo(&mesh, &recorder, 1);
    // Closing its stdin makes transport-peer shut its mesh down and exit 0.
    drop(child.stdin.take());
    let status = child.child.wait().unwrap();
    assert!(status.success(), "{status}");
    let seen = recorder.wait_until(|seen| !seen.lost.is_empty());
    assert_eq!(seen.lost.len(), 1);
    assert_eq!(seen.lost[0].0, 1);
    assert!(seen.lost[0].1.contains("closed"), "{}", seen.lost[0].1);
}

/// Panics on every frame, records losses.
struct PanickingHandler(Recorder);

impl FrameHandler for PanickingHandler {
    fn on_frame(&self, _: u32, _: Channel, _: FrameRef<'_>) {
        panic!("handler bug (this panic is part of the test)");
    }
    fn on_peer_lost(&self, peer: u32, why: &str) {
        self.0.on_peer_lost(peer, why);
    }
}

#[test]
fn a_panicking_handler_makes_the_peer_lost_instead_of_leaving_a_channel_unread() {
    let listeners: Vec<TcpListener> = (0..2)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let panicking = Arc::new(PanickingHandler(Recorder::default()));
    let handler0: Arc<dyn FrameHandler> = panicking.clone();
    let mut listeners = listeners.into_iter();
    let (l0, l1) = (listeners.next().unwrap(), listeners.next().unwrap());
    let cfg0 = config(0, &addrs);
    let node0 = thread::spawn(move || TcpMesh::establish_on(l0, cfg0, handler0));
    let node1 =
        TcpMesh::establish_on(l1, config(1, &addrs), Arc::new(Recorder::default())).unwrap();
    let node0 = node0.join().unwrap().unwrap();
    node1.send(0, Channel::Forward, &Frame::default()).unwrap();
    let seen = panicking.0.wait_until(|seen| !seen.lost.is_empty());
    assert_eq!(seen.lost.len(), 1);
    assert_eq!(seen.lost[0].0, 1);
    assert!(
        seen.lost[0].1.contains("frame handler panicked"),
        "{}",
        seen.lost[0].1
    );
    drop(seen);
    assert!(node0.is_lost(1));
}

/// A peer that connected and then died while the mesh was still forming (a third node has not
/// come yet) ends setup at once as a lost peer, instead of the node waiting out its connect
/// timeout for a mesh that can no longer complete.
#[test]
fn a_peer_killed_while_the_mesh_forms_ends_setup_at_once_as_lost() {
    let addrs: Vec<SocketAddr> = (0..3)
        .map(|_| SocketAddr::from(([127, 0, 0, 1], free_port())))
        .collect();
    let cfg0 = config(0, &addrs);
    let setup_timeout = cfg0.connect_timeout;
    let node0 = thread::spawn(move || {
        let result = TcpMesh::establish(cfg0, Arc::new(Recorder::default()));
        (result.err(), Instant::now())
    });
    let mut args = peer_args(1, addrs[1], (0, addrs[0]), &common::layout(3));
    args.extend(["--peer".to_string(), format!("2={}", addrs[2])]);
    let node1 = PeerProcess::start(&args);
    // Node 1 dials node 0 as soon as it runs; node 2 never comes, so setup cannot finish.
    thread::sleep(Duration::from_millis(1500));
    node1.signal(libc::SIGKILL);
    let killed_at = Instant::now();
    let (error, ended_at) = node0.join().unwrap();
    let took = ended_at.saturating_duration_since(killed_at);
    println!("node 0 gave up setup {took:?} after node 1 was killed");
    assert!(
        matches!(error, Some(TransportError::LostDuringSetup { peer: 1, .. })),
        "expected node 1 lost during setup, got {error:?}"
    );
    assert!(
        took < Duration::from_secs(2),
        "setup took {took:?} to notice (its timeout is {setup_timeout:?})"
    );
}
