//! Both ends of the handshake over real loopback sockets.

use std::io::Write as _;
use std::net::{TcpListener, TcpStream};
use std::thread;

use super::*;

/// The deadline the mesh gives a handshake starting now.
fn soon() -> Instant {
    Instant::now() + HANDSHAKE_DEADLINE
}

fn creds(me: NodeId, secret: &[u8], layout: &str) -> Credentials {
    Credentials {
        me,
        secret: secret.to_vec(),
        layout: layout.to_string(),
        layout_hash: Sha256::digest(layout.as_bytes()).into(),
    }
}

/// A connected (dialer, acceptor) pair.
fn socket_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let dialer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (acceptor, _) = listener.accept().unwrap();
    (dialer, acceptor)
}

fn admit_any(_: NodeId, _: Channel) -> Result<(), Refusal> {
    Ok(())
}

/// A closure decides both at the hello and at the verdict.
impl<F: Fn(NodeId, Channel) -> Result<(), Refusal>> Admission for F {
    fn screen(&self, peer: NodeId, channel: Channel) -> Result<(), Refusal> {
        self(peer, channel)
    }
    fn claim(&self, peer: NodeId, channel: Channel) -> Result<(), Refusal> {
        self(peer, channel)
    }
}

/// Runs `dial` from node `d` to node `a` and `accept` on node `a` concurrently.
fn run(
    d: &Credentials,
    a: &Credentials,
    dialed_as: NodeId,
    admit: &(dyn Admission + Sync),
) -> (
    Result<(), TransportError>,
    Result<(NodeId, Channel), TransportError>,
) {
    let (mut dialer, mut acceptor) = socket_pair();
    let dial_addr = dialer.peer_addr().unwrap();
    let accept_from = acceptor.peer_addr().unwrap();
    thread::scope(|s| {
        let accepted = s.spawn(move || accept(&mut acceptor, a, accept_from, soon(), admit));
        let dialed = dial(
            &mut dialer,
            d,
            dialed_as,
            dial_addr,
            Channel::Forward,
            soon(),
        );
        (dialed, accepted.join().unwrap())
    })
}

#[test]
fn matching_nodes_agree_on_who_and_which_channel() {
    let (dialed, accepted) = run(
        &creds(1, b"s3cret", "layout\n"),
        &creds(0, b"s3cret", "layout\n"),
        0,
        &admit_any,
    );
    dialed.unwrap();
    assert_eq!(accepted.unwrap(), (1, Channel::Forward));
}

#[test]
fn a_wrong_secret_is_refused_on_both_ends_naming_the_other_node() {
    let (dialed, accepted) = run(
        &creds(1, b"secret-one", "layout\n"),
        &creds(0, b"secret-two", "layout\n"),
        0,
        &admit_any,
    );
    let dialed = dialed.unwrap_err();
    assert!(
        matches!(dialed, TransportError::WrongSecret { peer: 0, .. }),
        "{dialed}"
    );
    assert!(dialed
        .to_string()
        .contains("node 0 and this node do not share the cluster secret"));
    let accepted = accepted.unwrap_err();
    assert!(
        matches!(accepted, TransportError::WrongSecret { peer: 1, .. }),
        "{accepted}"
    );
    assert!(
        accepted
            .to_string()
            .contains("node 1 refused this node's proof"),
        "{accepted}"
    );
}

#[test]
fn a_layout_mismatch_names_the_first_differing_line_on_both_ends() {
    let (dialed, accepted) = run(
        &creds(1, b"s", "nodes 2\nvcpus 2\nvcpu 0 node 0\nvcpu 1 node 1\n"),
        &creds(0, b"s", "nodes 2\nvcpus 2\nvcpu 0 node 0\nvcpu 1 node 0\n"),
        0,
        &admit_any,
    );
    match dialed.unwrap_err() {
        TransportError::LayoutMismatch { peer, difference } => {
            assert_eq!(peer, 0);
            assert_eq!(
                difference,
                "layout differs from node 0 at line 4: here `vcpu 1 node 1`, node 0 has `vcpu 1 node 0`"
            );
        }
        other => panic!("expected a layout mismatch, got {other}"),
    }
    match accepted.unwrap_err() {
        TransportError::LayoutMismatch { peer, difference } => {
            assert_eq!(peer, 1);
            assert_eq!(
                difference,
                "layout differs from node 1 at line 4: here `vcpu 1 node 0`, node 1 has `vcpu 1 node 1`"
            );
        }
        other => panic!("expected a layout mismatch, got {other}"),
    }
}

#[test]
fn a_node_dialing_the_wrong_address_is_told_who_answered() {
    let (dialed, accepted) = run(&creds(3, b"s", "l"), &creds(0, b"s", "l"), 2, &admit_any);
    let dialed = dialed.unwrap_err();
    assert!(
        matches!(dialed, TransportError::UnexpectedNode { .. }),
        "{dialed}"
    );
    assert!(
        dialed
            .to_string()
            .contains("expecting node 2, but this is node 0"),
        "{dialed}"
    );
    assert!(matches!(
        accepted.unwrap_err(),
        TransportError::UnexpectedNode {
            remote: Remote { id: Some(3), .. },
            ..
        }
    ));
}

#[test]
fn a_refused_admission_reaches_the_dialer_as_a_duplicate() {
    let duplicate = |peer: NodeId, channel: Channel| {
        Err(Refusal {
            code: RefusalCode::DuplicateConnection,
            message: format!("node 0 already has a {channel} connection from node {peer}"),
        })
    };
    let (dialed, accepted) = run(&creds(1, b"s", "l"), &creds(0, b"s", "l"), 0, &duplicate);
    let dialed = dialed.unwrap_err();
    assert!(
        matches!(
            dialed,
            TransportError::DuplicateConnection {
                peer: 0,
                channel: Channel::Forward,
                ..
            }
        ),
        "{dialed}"
    );
    assert!(dialed
        .to_string()
        .contains("already has a forward connection from node 1"));
    assert!(matches!(
        accepted.unwrap_err(),
        TransportError::DuplicateConnection { peer: 1, .. }
    ));
}

#[test]
fn another_protocol_version_is_refused_with_both_versions() {
    let (mut dialer, mut acceptor) = socket_pair();
    let from = acceptor.peer_addr().unwrap();
    let a = creds(0, b"s", "l");
    thread::scope(|s| {
        let accepted = s.spawn(|| accept(&mut acceptor, &a, from, soon(), &admit_any));
        write_records(
            &mut dialer,
            &[Record::ForeignHello {
                version: 99,
                from: Some(1),
            }],
        )
        .unwrap();
        match read_record(&mut dialer).unwrap() {
            Record::Refused(refusal) => {
                assert_eq!(refusal.code, RefusalCode::VersionMismatch);
                assert!(refusal
                    .message
                    .contains("version 1, the other end version 99"));
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        drop(dialer);
        let err = accepted.join().unwrap().unwrap_err();
        assert!(
            matches!(
                err,
                TransportError::VersionMismatch {
                    remote: Remote { id: Some(1), .. },
                    ..
                }
            ),
            "{err}"
        );
    });
}

#[test]
fn an_unknown_channel_and_a_stranger_are_refused() {
    let a = creds(0, b"s", "l");
    let (mut dialer, mut acceptor) = socket_pair();
    let from = acceptor.peer_addr().unwrap();
    write_records(
        &mut dialer,
        &[Record::Hello(Hello {
            from: 1,
            to: 0,
            channel: 9,
            nonce: [0; NONCE_LEN],
        })],
    )
    .unwrap();
    dialer.shutdown(Shutdown::Write).unwrap();
    let err = accept(&mut acceptor, &a, from, soon(), &admit_any).unwrap_err();
    assert!(
        err.to_string().contains("channel 9, which does not exist"),
        "{err}"
    );

    let (mut stranger, mut acceptor) = socket_pair();
    let from = acceptor.peer_addr().unwrap();
    std::io::Write::write_all(&mut stranger, b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let err = accept(&mut acceptor, &a, from, soon(), &admit_any).unwrap_err();
    assert!(
        matches!(
            err,
            TransportError::Handshake {
                remote: Remote { id: None, .. },
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn a_proof_is_bound_to_direction_and_channel() {
    let nonce = [5u8; NONCE_LEN];
    let remote = Remote::node(1, "127.0.0.1:1".parse().unwrap());
    let proof = make_proof(b"k", &nonce, 1, 0, Channel::DsmBulk, remote).unwrap();
    assert!(verify_proof(b"k", &nonce, 1, 0, Channel::DsmBulk, &proof));
    assert!(!verify_proof(b"k", &nonce, 0, 1, Channel::DsmBulk, &proof));
    assert!(!verify_proof(b"k", &nonce, 1, 0, Channel::Control, &proof));
    assert!(!verify_proof(
        b"k",
        &[6; NONCE_LEN],
        1,
        0,
        Channel::DsmBulk,
        &proof
    ));
    assert!(!verify_proof(
        b"other",
        &nonce,
        1,
        0,
        Channel::DsmBulk,
        &proof
    ));
}

/// Closes a socket when dropped, on every path out of a test, so that a thread writing to it
/// sees its write fail and ends.
struct CloseOnDrop<'a>(&'a TcpStream);

impl Drop for CloseOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.0.shutdown(Shutdown::Both);
    }
}

/// Sends `bytes` one at a time, `every` apart, until all are sent or the connection is closed.
fn trickle(mut stream: &TcpStream, bytes: &[u8], every: Duration) {
    for byte in bytes {
        if stream.write_all(std::slice::from_ref(byte)).is_err() {
            return;
        }
        thread::sleep(every);
    }
}

/// A whole hello as node 1 would send it to node 0.
fn hello_bytes(to: NodeId) -> Vec<u8> {
    let mut bytes = Vec::new();
    write_records(
        &mut bytes,
        &[Record::Hello(Hello {
            from: 1,
            to,
            channel: Channel::Control as u8,
            nonce: [0; NONCE_LEN],
        })],
    )
    .unwrap();
    bytes
}

/// Each byte comes well within any per-read timeout, so only a deadline for the whole
/// handshake can end it.
const TRICKLE_PACE: Duration = Duration::from_millis(400);

fn assert_ended_by_the_deadline(err: &TransportError, took: Duration, step: &str) {
    assert!(
        matches!(err, TransportError::HandshakeTimeout { step: s, .. } if *s == step),
        "{err}"
    );
    assert!(err.to_string().contains("too slow"), "{err}");
    assert!(
        took >= HANDSHAKE_DEADLINE - Duration::from_millis(100),
        "{took:?}"
    );
    assert!(
        took < HANDSHAKE_DEADLINE + Duration::from_secs(2),
        "{took:?}"
    );
}

#[test]
fn a_dialer_trickling_its_hello_fails_the_accept_by_the_deadline() {
    let (dialer, mut acceptor) = socket_pair();
    let from = acceptor.peer_addr().unwrap();
    let a = creds(0, b"s", "l");
    thread::scope(|s| {
        let _close = CloseOnDrop(&dialer);
        s.spawn(|| trickle(&dialer, &hello_bytes(0), TRICKLE_PACE));
        let started = Instant::now();
        let err = accept(&mut acceptor, &a, from, soon(), &admit_any).unwrap_err();
        assert_ended_by_the_deadline(&err, started.elapsed(), "waiting for its hello");
    });
}

#[test]
fn an_acceptor_trickling_its_hello_fails_the_dial_by_the_deadline() {
    let (mut dialer, acceptor) = socket_pair();
    let addr = dialer.peer_addr().unwrap();
    let d = creds(1, b"s", "l");
    thread::scope(|s| {
        let _close = CloseOnDrop(&acceptor);
        s.spawn(|| trickle(&acceptor, &hello_bytes(1), TRICKLE_PACE));
        let started = Instant::now();
        let err = dial(&mut dialer, &d, 0, addr, Channel::Control, soon()).unwrap_err();
        assert_ended_by_the_deadline(&err, started.elapsed(), "waiting for its hello");
    });
}

/// A stranger whose hello is refused at once and who then sends `chunk` bytes of garbage
/// every `pause` without ever reading: returns the acceptor's error and how long it took.
fn refuse_a_streaming_stranger(chunk: usize, pause: Duration) -> (TransportError, Duration) {
    let (mut stranger, mut acceptor) = socket_pair();
    let from = acceptor.peer_addr().unwrap();
    let a = creds(0, b"s", "l");
    stranger.write_all(&hello_bytes(7)).unwrap();
    thread::scope(|s| {
        let _close = CloseOnDrop(&stranger);
        s.spawn(|| {
            let garbage = vec![0xA5; chunk];
            // Bounded so that the thread ends even if the acceptor never closed.
            for _ in 0..100_000 {
                if (&stranger).write_all(&garbage).is_err() {
                    return;
                }
                thread::sleep(pause);
            }
        });
        let started = Instant::now();
        let err = accept(&mut acceptor, &a, from, soon(), &admit_any).unwrap_err();
        let took = started.elapsed();
        drop(acceptor);
        (err, took)
    })
}

#[test]
fn a_stranger_streaming_after_its_refusal_holds_the_acceptor_no_longer_than_the_linger() {
    // A steady stream (one chunk every 20 ms keeps every read short of any per-read timeout)
    // ends by the linger; a flood ends by the byte budget.
    for (chunk, pause) in [(64, Duration::from_millis(20)), (64 << 10, Duration::ZERO)] {
        let (err, took) = refuse_a_streaming_stranger(chunk, pause);
        assert!(
            matches!(err, TransportError::UnexpectedNode { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("expecting node 7"), "{err}");
        assert!(
            took < REFUSAL_LINGER + Duration::from_secs(1),
            "{chunk} bytes every {pause:?}: {took:?}"
        );
    }
}

/// One channel slot: screening only looks, claiming takes it.
#[derive(Default)]
struct OneSlot {
    taken: std::sync::Mutex<bool>,
}

impl Admission for OneSlot {
    fn screen(&self, peer: NodeId, channel: Channel) -> Result<(), Refusal> {
        if *self.taken.lock().unwrap() {
            return Err(duplicate(peer, channel));
        }
        Ok(())
    }
    fn claim(&self, peer: NodeId, channel: Channel) -> Result<(), Refusal> {
        let mut taken = self.taken.lock().unwrap();
        if *taken {
            return Err(duplicate(peer, channel));
        }
        *taken = true;
        Ok(())
    }
}

fn duplicate(peer: NodeId, channel: Channel) -> Refusal {
    Refusal {
        code: RefusalCode::DuplicateConnection,
        message: format!("node 0 already has a {channel} connection from node {peer}"),
    }
}

#[test]
fn of_two_proven_handshakes_for_one_channel_only_one_is_accepted() {
    let d = creds(1, b"s", "l");
    let a = creds(0, b"s", "l");
    let slot = OneSlot::default();
    let pairs = [socket_pair(), socket_pair()];
    thread::scope(|s| {
        let mut dialers = Vec::new();
        let mut accepts = Vec::new();
        for (dialer, mut acceptor) in pairs {
            let from = acceptor.peer_addr().unwrap();
            let (a, slot) = (&a, &slot);
            accepts.push(s.spawn(move || accept(&mut acceptor, a, from, soon(), slot)));
            dialers.push(dialer);
        }
        // Node 1 played by hand on both connections, step by step, so that both are screened
        // before either proves itself and claims the channel.
        let channel = Channel::Forward;
        let mut their_nonces = Vec::new();
        for dialer in &mut dialers {
            write_records(
                dialer,
                &[Record::Hello(Hello {
                    from: 1,
                    to: 0,
                    channel: channel as u8,
                    nonce: [3; NONCE_LEN],
                })],
            )
            .unwrap();
        }
        for dialer in &mut dialers {
            let Record::Hello(hello) = read_record(dialer).unwrap() else {
                panic!("expected a hello");
            };
            assert!(matches!(read_record(dialer).unwrap(), Record::Proof(_)));
            their_nonces.push(hello.nonce);
        }
        for (dialer, nonce) in dialers.iter_mut().zip(&their_nonces) {
            let remote = Remote::node(0, dialer.peer_addr().unwrap());
            let proof = make_proof(&d.secret, nonce, 1, 0, channel, remote).unwrap();
            write_records(
                dialer,
                &[Record::Proof(proof), Record::LayoutHash(d.layout_hash)],
            )
            .unwrap();
        }
        let verdicts: Vec<Record> = dialers
            .iter_mut()
            .map(|dialer| read_record(dialer).unwrap())
            .collect();
        drop(dialers);
        let results: Vec<_> = accepts.into_iter().map(|a| a.join().unwrap()).collect();

        let accepted = verdicts
            .iter()
            .filter(|v| matches!(v, Record::Accepted))
            .count();
        assert_eq!(accepted, 1, "{verdicts:?}");
        assert!(
            verdicts.iter().any(|v| matches!(
                v,
                Record::Refused(Refusal {
                    code: RefusalCode::DuplicateConnection,
                    ..
                })
            )),
            "{verdicts:?}"
        );
        let ok: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert_eq!(ok, [&(1, channel)]);
        assert!(results
            .iter()
            .any(|r| matches!(r, Err(TransportError::DuplicateConnection { peer: 1, .. }))));
    });
}
