//! The round-trip benchmark helper runs end to end and reports a coherent distribution (what
//! the numbers are is for `spanvm bench dsm` to show, not for a test to judge).

use transport::bench::{loopback_round_trip, BenchError, RoundTripBench};

#[test]
fn the_round_trip_benchmark_measures_every_sample_in_both_modes() {
    for busy_poll in [false, true] {
        let params = RoundTripBench {
            samples: 50,
            warmup: 5,
            payload_len: 4096,
            busy_poll,
            kind: transport::TransportKind::Tcp,
            service_priority: transport::ServicePriority::default(),
        };
        let report = loopback_round_trip(&params).unwrap();
        assert_eq!(report.samples, 50);
        assert_eq!(report.busy_poll, busy_poll);
        assert!(report.min <= report.median && report.median <= report.p90);
        assert!(report.p90 <= report.p99 && report.p99 <= report.max);
        assert!(report.min <= report.mean && report.mean <= report.max);
        assert!(report.to_string().starts_with("4096-byte request/response"));
    }
}

#[test]
fn the_round_trip_benchmark_refuses_impossible_parameters() {
    let params = RoundTripBench {
        samples: 0,
        ..RoundTripBench::default()
    };
    assert!(matches!(
        loopback_round_trip(&params),
        Err(BenchError::BadParameters { samples: 0, .. })
    ));
    let params = RoundTripBench {
        payload_len: transport::MAX_PAYLOAD + 1,
        ..RoundTripBench::default()
    };
    assert!(matches!(
        loopback_round_trip(&params),
        Err(BenchError::BadParameters { .. })
    ));
}
