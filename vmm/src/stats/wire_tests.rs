//! The statistics protocol against what a broken, foreign or different node could send.

use super::*;

fn full_report() -> NodeReport {
    let mut latency_log2_us = [0; LATENCY_BUCKETS];
    latency_log2_us[0] = 3;
    latency_log2_us[7] = 1200;
    latency_log2_us[LATENCY_BUCKETS - 1] = 1;
    let dsm = StatsSnapshot {
        node: 1,
        faults_read: 1000,
        faults_write: 200,
        faults_merged: 3,
        faults_resolved: 4,
        pins: 5,
        reads: [6, 900],
        writes: [7, 150],
        upgrades: [8, 34],
        served_as_home: 9,
        served_as_source: 10,
        invalidations: 11,
        deferred_by_pin: 12,
        zero_pages_received: 13,
        messages_sent: 14,
        messages_received: 15,
        pages_sent: 16,
        pages_received: 17,
        bytes_sent: 18 * 4096,
        bytes_received: 19 * 4096,
        frames_rejected: 0,
        latency_log2_us,
        top_pages: vec![(0x1234, 500), (0x7, 20), (0x10, 20)],
    };
    let vcpu = |index, base: u64| VcpuReport {
        index,
        exits: std::array::from_fn(|i| base + i as u64),
        interrupts: VcpuInterrupts {
            sent: base,
            received: base + 1,
        },
    };
    NodeReport {
        node: 1,
        nodes: 3,
        phase: Phase::Running,
        uptime: Duration::from_millis(12_345),
        // Indices 2 and 10 sort the other way round as text.
        vcpus: vec![vcpu(2, 100), vcpu(10, 7)],
        dsm: Some(dsm),
        forward: Some(ForwardStats {
            interrupts_sent: 1,
            interrupts_received: 2,
            io_forwarded: 3,
            io_served: 4,
            addressing_updates: 5,
            eois_sent: 6,
        }),
        transport: Some(TransportStats {
            frames_sent: 7,
            frames_queued: 8,
            peak_backlog_bytes: 9,
        }),
        shadow_zap: Some(ZapStats {
            drops: 1,
            zaps: 2,
            calls: 3,
            pages: 4,
            tables_read: 5,
            nanos: 6,
        }),
    }
}

/// `text` with its end line's count recomputed, for answers edited by hand.
fn with_fixed_end(text: &str) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with("end ")).collect();
    format!("{}\nend {}\n", lines.join("\n"), lines.len() - 1)
}

#[test]
fn a_report_survives_the_round_trip() {
    let report = full_report();
    let text = encode(&report);
    assert!(text.starts_with("spanvm-stats 1\nnode 1\n"), "{text}");
    assert!(text.contains("\ndsm.requests.read.remote 900\n"), "{text}");
    assert!(text.contains("\nvcpu.10.exit.hlt "), "{text}");
    assert_eq!(decode(text.as_bytes()), Ok(report));
}

#[test]
fn a_starting_node_has_no_sections() {
    let report = NodeReport::starting(0, 2, Duration::from_millis(70));
    let text = encode(&report);
    assert_eq!(
        text,
        "spanvm-stats 1\nnode 0\nnodes 2\nphase starting\nuptime_ms 70\nend 4\n"
    );
    assert_eq!(decode(text.as_bytes()), Ok(report));
}

#[test]
fn garbage_is_not_a_statistics_socket() {
    for garbage in [
        &b"HTTP/1.1 400 Bad Request\r\n\r\n"[..],
        b"\xff\xfe\x00\x01binary",
        b"\n",
        b"spanvm-stats\n",
        b"spanvm-stats one\nend 0\n",
        b"spanvm-statistics 1\nend 0\n",
    ] {
        match decode(garbage) {
            Err(WireError::NotStats { first_line }) => {
                assert!(first_line.len() <= 4 * 63, "{first_line}");
            }
            other => panic!("{garbage:?}: {other:?}"),
        }
    }
    assert_eq!(decode(b""), Err(WireError::Empty));
    let message = decode(b"\x1b[2Jhello").unwrap_err().to_string();
    assert!(
        !message.contains('\x1b'),
        "control characters are escaped: {message}"
    );
}

#[test]
fn another_protocol_version_is_named() {
    let text = encode(&full_report()).replacen("spanvm-stats 1", "spanvm-stats 2", 1);
    let err = decode(text.as_bytes()).unwrap_err();
    assert_eq!(err, WireError::Version { theirs: 2, ours: 1 });
    assert!(err.to_string().contains("version 2"), "{err}");
    // Even an answer whose body this version could not read.
    assert_eq!(
        decode(b"spanvm-stats 7\n{\"json\": true}\n"),
        Err(WireError::Version { theirs: 7, ours: 1 })
    );
}

#[test]
fn every_truncation_is_refused() {
    let text = encode(&full_report());
    let bytes = text.as_bytes();
    // Without its last newline the answer is still whole; any shorter prefix is not.
    assert!(decode(&bytes[..bytes.len() - 1]).is_ok());
    for cut in 0..bytes.len() - 1 {
        let result = decode(&bytes[..cut]);
        assert!(result.is_err(), "a cut at byte {cut} was accepted");
    }
    // Cut after a whole body line: the missing end line tells.
    let before_end = text.find("\nend ").unwrap() + 1;
    assert!(matches!(
        decode(&bytes[..before_end]),
        Err(WireError::Truncated { .. })
    ));
}

#[test]
fn an_end_line_that_does_not_match_is_refused() {
    let text = encode(&full_report());
    let lines = text.lines().count() - 2;
    let wrong = text.replace(&format!("end {lines}"), &format!("end {}", lines + 1));
    assert_eq!(
        decode(wrong.as_bytes()),
        Err(WireError::Miscounted {
            got: lines,
            expected: lines + 1
        })
    );
}

#[test]
fn malformed_lines_duplicates_and_bad_values_are_refused() {
    let base = encode(&NodeReport::starting(0, 2, Duration::from_millis(70)));
    let edit = |from: &str, to: &str| with_fixed_end(&base.replacen(from, to, 1));
    assert!(matches!(
        decode(edit("nodes 2", "nodes 2 3").as_bytes()),
        Err(WireError::BadLine { line: 3, .. })
    ));
    assert!(matches!(
        decode(edit("nodes 2", "Nodes 2").as_bytes()),
        Err(WireError::BadLine { .. })
    ));
    assert!(matches!(
        decode(edit("nodes 2", "nodes").as_bytes()),
        Err(WireError::BadLine { .. })
    ));
    assert_eq!(
        decode(edit("nodes 2", "nodes 2\nnode 0").as_bytes()),
        Err(WireError::Duplicate { key: "node".into() })
    );
    assert!(matches!(
        decode(edit("node 0", "node -1").as_bytes()),
        Err(WireError::BadValue { .. })
    ));
    // A node id must fit the node id type.
    assert!(matches!(
        decode(edit("node 0", "node 4294967296").as_bytes()),
        Err(WireError::BadValue { .. })
    ));
    assert!(matches!(
        decode(edit("phase starting", "phase dancing").as_bytes()),
        Err(WireError::BadValue { .. })
    ));
    assert!(matches!(
        decode(edit("nodes 2", "nodes 2\ndsm.latency_us.40 1").as_bytes()),
        Err(WireError::BadValue { .. })
    ));
    assert!(matches!(
        decode(edit("nodes 2", "nodes 2\nvcpu.x.ipi.sent 1").as_bytes()),
        Err(WireError::BadValue { .. })
    ));
}

#[test]
fn a_missing_key_is_named_and_unknown_keys_are_ignored() {
    let full = encode(&full_report());
    let without = with_fixed_end(&full.replacen("dsm.pins 5\n", "", 1));
    assert_eq!(
        decode(without.as_bytes()),
        Err(WireError::Missing {
            key: "dsm.pins".into()
        })
    );
    let without = with_fixed_end(&full.replacen("uptime_ms 12345\n", "", 1));
    assert!(matches!(
        decode(without.as_bytes()),
        Err(WireError::Missing { .. })
    ));
    // A later spanvm of the same protocol version may add keys.
    let more = with_fixed_end(&full.replacen("node 1\n", "node 1\nfuture.figure 5\n", 1));
    assert_eq!(decode(more.as_bytes()), Ok(full_report()));
}

#[test]
fn a_refusal_and_an_oversized_answer() {
    assert_eq!(
        decode(encode_refusal("not a statistics request").as_bytes()),
        Err(WireError::Refused("not a statistics request".into()))
    );
    let huge = vec![b'a'; MAX_ANSWER_BYTES + 1];
    assert_eq!(decode(&huge), Err(WireError::TooLarge));
}

#[test]
fn requests() {
    assert_eq!(parse_request(request().trim_end()), Ok(PROTOCOL_VERSION));
    assert_eq!(parse_request("spanvm-stats 2"), Ok(2));
    for bad in [
        "GET / HTTP/1.1",
        "spanvm-stats",
        "spanvm-stats x",
        "",
        "spanvm-stats 1 2",
    ] {
        assert!(
            matches!(parse_request(bad), Err(WireError::NotStats { .. })),
            "{bad}"
        );
    }
}

#[test]
fn random_damage_never_panics() {
    let text = encode(&full_report()).into_bytes();
    // A fixed pseudo-random sequence (xorshift), so that a failure repeats.
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..2000 {
        let mut damaged = text.clone();
        for _ in 0..=next() % 4 {
            let at = crate::convert::usize_from(next() % damaged.len() as u64);
            damaged[at] = next().to_le_bytes()[0];
        }
        let _ = decode(&damaged);
    }
}
