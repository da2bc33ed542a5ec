//! The page-sized request/response round trip between two meshes on this machine: the floor
//! under every remote page fault, measured with and without busy polling of the fault-path
//! sockets. `spanvm bench dsm` reports it as the anchor for the DSM's own numbers.
//!
//! Node 1 sends an empty request on [`Channel::DsmRequest`]; node 0's handler answers on the
//! same channel with a page-sized payload; node 1's receiver thread hands the answer to the
//! waiting thread through a condition variable, as a fault thread would be woken.

use std::fmt;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError, Weak};
use std::thread;
use std::time::{Duration, Instant};

use crate::api::{FrameHandler, Transport};
use crate::channel::{Channel, NodeId, TransportKind};
use crate::config::{Liveness, MeshConfig};
use crate::error::TransportError;
use crate::frame::{FrameRef, MAX_PAYLOAD};
use crate::select::establish_on;
use crate::ServicePriority;

const KIND_REQUEST: u16 = 1;
const KIND_REPLY: u16 = 2;
/// A reply slower than this means something is broken, not slow.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundTripBench {
    /// Round trips measured.
    pub samples: usize,
    /// Round trips run first and not measured (connection and cache warm-up).
    pub warmup: usize,
    /// Bytes in each reply (a page: 4096).
    pub payload_len: usize,
    /// Whether both meshes busy-poll their [`Channel::DsmRequest`] sockets.
    pub busy_poll: bool,
    /// The backend measured.
    pub kind: TransportKind,
    /// How both meshes' receivers are scheduled (the DSM's default, so that the anchor
    /// matches the fault path it stands beside).
    pub service_priority: ServicePriority,
}

impl Default for RoundTripBench {
    fn default() -> Self {
        RoundTripBench {
            samples: 2000,
            warmup: 200,
            payload_len: 4096,
            busy_poll: false,
            kind: TransportKind::Tcp,
            service_priority: ServicePriority::default(),
        }
    }
}

/// The measured distribution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundTripReport {
    /// The backend measured.
    pub kind: TransportKind,
    /// Whether the fault-path sockets were busy-polled.
    pub busy_poll: bool,
    /// Bytes in each reply.
    pub payload_len: usize,
    /// Round trips measured.
    pub samples: usize,
    /// Fastest round trip.
    pub min: Duration,
    /// Median round trip.
    pub median: Duration,
    /// 90th percentile.
    pub p90: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Slowest round trip.
    pub max: Duration,
    /// Mean round trip.
    pub mean: Duration,
}

impl fmt::Display for RoundTripReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        write!(
            f,
            "{}-byte request/response over loopback {}, busy-poll {}: median {:.1} µs, \
             p90 {:.1} µs, p99 {:.1} µs, min {:.1} µs, max {:.1} µs, mean {:.1} µs ({} samples)",
            self.payload_len,
            self.kind,
            if self.busy_poll { "on" } else { "off" },
            us(self.median),
            us(self.p90),
            us(self.p99),
            us(self.min),
            us(self.max),
            us(self.mean),
            self.samples
        )
    }
}

/// Why the benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Setting up or using the meshes failed.
    #[error("round-trip benchmark: {0}")]
    Transport(#[from] TransportError),
    /// No loopback port could be bound.
    #[error("round-trip benchmark: cannot listen on {ip}: {source}")]
    Listen {
        /// The address asked for.
        ip: IpAddr,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// RDMA does not run over loopback: the benchmark needs the RDMA interface's address.
    #[error(
        "benchmarks over RDMA need SPANVM_RDMA_ADDR=<IP address of the RDMA interface> \
         (RDMA does not run over loopback){0}"
    )]
    NoRdmaAddress(String),
    /// Nothing to measure, or a reply too large for a frame.
    #[error("round-trip benchmark: need at least 1 sample and a reply of at most {MAX_PAYLOAD} bytes (asked for {samples} samples of {payload_len} bytes)")]
    BadParameters {
        /// Asked samples.
        samples: usize,
        /// Asked reply size.
        payload_len: usize,
    },
    /// The responding node was lost during the measurement.
    #[error("round-trip benchmark: the responding node was lost: {why}")]
    ResponderLost {
        /// Why.
        why: String,
    },
    /// A reply did not come back.
    #[error("round-trip benchmark: no reply to request {id} within {waited:?}")]
    NoReply {
        /// The request.
        id: u64,
        /// How long it was awaited.
        waited: Duration,
    },
}

/// Runs two meshes on loopback and measures `params.samples` round trips.
pub fn loopback_round_trip(params: &RoundTripBench) -> Result<RoundTripReport, BenchError> {
    if params.samples == 0 || params.payload_len > MAX_PAYLOAD {
        return Err(BenchError::BadParameters {
            samples: params.samples,
            payload_len: params.payload_len,
        });
    }
    let responder = Arc::new(Responder {
        mesh: OnceLock::new(),
        page: vec![0xA5; params.payload_len],
    });
    let requester = Arc::new(Requester::default());
    let [mesh0, mesh1] = establish_pair(params, responder.clone(), requester.clone())?;
    // The transport owns the handler, so the handler only holds a weak reference back.
    let _ = responder.mesh.set(Arc::downgrade(&mesh0));

    let mut times = Vec::with_capacity(params.samples);
    let total = params.warmup + params.samples;
    let mut outcome = Ok(());
    for i in 0..total {
        let id = i as u64;
        let request = FrameRef {
            kind: KIND_REQUEST,
            flags: 0,
            id,
            arg: 0,
            payload: &[],
        };
        let started = Instant::now();
        if let Err(e) = mesh1.send_ref(0, Channel::DsmRequest, request) {
            outcome = Err(e.into());
            break;
        }
        if let Err(e) = requester.wait_for(id) {
            outcome = Err(e);
            break;
        }
        if i >= params.warmup {
            times.push(started.elapsed());
        }
    }
    mesh1.shutdown();
    mesh0.shutdown();
    outcome?;
    Ok(summarise(params, times))
}

fn establish_pair(
    params: &RoundTripBench,
    responder: Arc<Responder>,
    requester: Arc<Requester>,
) -> Result<[Arc<dyn Transport>; 2], BenchError> {
    let RoundTripBench {
        busy_poll,
        kind,
        service_priority,
        ..
    } = *params;
    let ip = bench_ip(kind)?;
    let listen = || -> Result<(TcpListener, SocketAddr), BenchError> {
        let failed = |source| BenchError::Listen { ip, source };
        let listener = TcpListener::bind((ip, 0)).map_err(failed)?;
        let addr = listener.local_addr().map_err(failed)?;
        Ok((listener, addr))
    };
    let (listener0, addr0) = listen()?;
    let (listener1, addr1) = listen()?;
    let config = |me: NodeId, listen: SocketAddr, peer: (NodeId, SocketAddr)| MeshConfig {
        me,
        listen,
        peers: vec![peer],
        secret: b"spanvm round-trip benchmark".to_vec(),
        layout_canonical: "round-trip benchmark\n".to_string(),
        connect_timeout: Duration::from_secs(10),
        busy_poll,
        service_priority,
        liveness: Liveness::default(),
        socket_buffer: None,
    };
    let cfg0 = config(0, addr0, (1, addr1));
    let cfg1 = config(1, addr1, (0, addr0));
    thread::scope(|s| {
        let node0 = s.spawn(move || establish_on(kind, listener0, cfg0, responder));
        let mesh1 = establish_on(kind, listener1, cfg1, requester);
        let mesh0 = node0.join().unwrap_or(Err(TransportError::SetupAbandoned));
        Ok([mesh0?, mesh1?])
    })
}

/// Where a benchmark's nodes listen: loopback for TCP; for RDMA the interface that
/// `SPANVM_RDMA_ADDR` names.
pub fn bench_ip(kind: TransportKind) -> Result<IpAddr, BenchError> {
    match kind {
        TransportKind::Tcp => Ok(IpAddr::from([127, 0, 0, 1])),
        TransportKind::Rdma => {
            let text = std::env::var("SPANVM_RDMA_ADDR")
                .map_err(|_| BenchError::NoRdmaAddress(String::new()))?;
            text.parse()
                .map_err(|e| BenchError::NoRdmaAddress(format!("; {text:?} is not one: {e}")))
        }
    }
}

fn summarise(params: &RoundTripBench, mut times: Vec<Duration>) -> RoundTripReport {
    times.sort_unstable();
    // The sample at `per_mille` thousandths of the sorted run, in integers so that no
    // sample count is rounded through f64.
    let at = |per_mille: usize| {
        let index = (times.len() * per_mille / 1000).min(times.len() - 1);
        times[index]
    };
    let sum: Duration = times.iter().sum();
    RoundTripReport {
        kind: params.kind,
        busy_poll: params.busy_poll,
        payload_len: params.payload_len,
        samples: times.len(),
        min: times[0],
        median: at(500),
        p90: at(900),
        p99: at(990),
        max: times[times.len() - 1],
        // More than u32::MAX samples would not fit in memory as Durations.
        mean: sum / u32::try_from(times.len()).unwrap_or(u32::MAX),
    }
}

/// Node 0: answers every request with a page.
struct Responder {
    mesh: OnceLock<Weak<dyn Transport>>,
    page: Vec<u8>,
}

impl FrameHandler for Responder {
    fn on_frame(&self, from: NodeId, channel: Channel, frame: FrameRef<'_>) {
        if channel != Channel::DsmRequest || frame.kind != KIND_REQUEST {
            return;
        }
        let Some(mesh) = self.mesh.get().and_then(Weak::upgrade) else {
            return;
        };
        let reply = FrameRef {
            kind: KIND_REPLY,
            flags: 0,
            id: frame.id,
            arg: 0,
            payload: &self.page,
        };
        if let Err(e) = mesh.send_ref(from, Channel::DsmRequest, reply) {
            eprintln!("round-trip benchmark: replying failed: {e}");
        }
    }

    /// The requester sees the same loss from its side and reports it.
    fn on_peer_lost(&self, _peer: NodeId, _why: &str) {}
}

/// Node 1: wakes the measuring thread when the reply it waits for arrives, or the responder
/// is lost.
#[derive(Default)]
struct Requester {
    state: Mutex<RequesterState>,
    changed: Condvar,
}

#[derive(Default)]
struct RequesterState {
    last_reply: Option<u64>,
    lost: Option<String>,
}

impl Requester {
    fn wait_for(&self, id: u64) -> Result<(), BenchError> {
        let guard = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let (guard, _) = self
            .changed
            .wait_timeout_while(guard, REPLY_TIMEOUT, |state| {
                state.last_reply != Some(id) && state.lost.is_none()
            })
            .unwrap_or_else(PoisonError::into_inner);
        if guard.last_reply == Some(id) {
            return Ok(());
        }
        Err(match &guard.lost {
            Some(why) => BenchError::ResponderLost { why: why.clone() },
            None => BenchError::NoReply {
                id,
                waited: REPLY_TIMEOUT,
            },
        })
    }
}

impl FrameHandler for Requester {
    fn on_frame(&self, _from: NodeId, channel: Channel, frame: FrameRef<'_>) {
        if channel == Channel::DsmRequest && frame.kind == KIND_REPLY {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            state.last_reply = Some(frame.id);
            self.changed.notify_one();
        }
    }

    fn on_peer_lost(&self, _peer: NodeId, why: &str) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.lost = Some(why.to_string());
        self.changed.notify_one();
    }
}
