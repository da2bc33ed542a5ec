//! Measures the 4 KiB request/response round trip between two meshes on loopback, without and
//! with busy polling of the fault-path sockets:
//! `cargo run --release -p transport --example round_trip [SAMPLES]`.

use std::process::ExitCode;

use transport::bench::{loopback_round_trip, RoundTripBench};

fn main() -> ExitCode {
    let samples = match std::env::args().nth(1).map(|a| a.parse::<usize>()) {
        None => 5000,
        Some(Ok(samples)) => samples,
        Some(Err(e)) => {
            eprintln!("round_trip: SAMPLES must be a number: {e}");
            return ExitCode::from(2);
        }
    };
    for busy_poll in [false, true] {
        let params = RoundTripBench {
            samples,
            busy_poll,
            ..RoundTripBench::default()
        };
        match loopback_round_trip(&params) {
            Ok(report) => println!("{report}"),
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}
