//! The statistics protocol spoken on a node's control socket: small, versioned, line-oriented
//! text, so that `socat - UNIX-CONNECT:...` shows it too.
//!
//! The client sends one line, `spanvm-stats 1`. The node answers:
//!
//! ```text
//! spanvm-stats 1            magic and protocol version
//! node 1                    body: one `key value` per line; the key is lower case with dots,
//! phase running             the value one token (a decimal number unless said otherwise)
//! dsm.faults.read 1234
//! ...
//! end 57                    how many body lines came: an answer cut short is never taken
//! ```
//!
//! or, to a request it does not understand, `spanvm-stats 1`, `error <text>`, `end 1`. Within
//! one version, keys are only ever added (a reader ignores keys it does not know); removing or
//! changing one bumps the version. Nothing a peer sends can make either end panic.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use dsm::stats::LATENCY_BUCKETS;
use dsm::StatsSnapshot;
use forward::{ForwardStats, VcpuInterrupts};
use transport::TransportStats;

use crate::distributed::shadow_zap::ZapStats;
use crate::stats::report::{NodeReport, Phase, VcpuReport};
use crate::vcpu::exit_counters::ExitReason;

/// The first word of every request and answer.
pub const MAGIC: &str = "spanvm-stats";
/// The version of the protocol this spanvm speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// The largest answer a reader accepts (a v1 answer for 256 vCPUs is about 200 KiB).
pub const MAX_ANSWER_BYTES: usize = 1 << 20;
/// The longest request line a node reads.
pub const MAX_REQUEST_BYTES: usize = 128;

/// What is wrong with a request or an answer.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Nothing came back.
    #[error("the node closed the connection without answering (it may be stopping)")]
    Empty,
    /// The first line is not a statistics header.
    #[error(
        "this is not a spanvm statistics socket (it sent `{first_line}`); \
         is another program using the path?"
    )]
    NotStats {
        /// What came instead, shortened and escaped.
        first_line: String,
    },
    /// The other end speaks another version of the protocol.
    #[error(
        "the node speaks statistics protocol version {theirs} and this spanvm version {ours}: \
         use the spanvm binary the node runs"
    )]
    Version {
        /// Their version.
        theirs: u32,
        /// Ours.
        ours: u32,
    },
    /// The node did not understand the request.
    #[error("the node refused the request: {0}")]
    Refused(String),
    /// A line does not have the `key value` form.
    #[error("line {line} of the answer is malformed (`{text}`): the node, or something in between, sent garbage")]
    BadLine {
        /// Its number, from 1.
        line: usize,
        /// Its text, shortened and escaped.
        text: String,
    },
    /// A key came twice.
    #[error("the answer has `{key}` twice: the node, or something in between, sent garbage")]
    Duplicate {
        /// The key.
        key: String,
    },
    /// The answer ended before its end line.
    #[error(
        "the answer was cut short after {got} lines, before its end line: the node stopped \
         while answering; ask again"
    )]
    Truncated {
        /// Body lines that came.
        got: usize,
    },
    /// The end line announces another number of lines than came.
    #[error(
        "the answer has {got} lines but announces {expected}: it was cut or garbled on the \
         way; ask again"
    )]
    Miscounted {
        /// Body lines that came.
        got: usize,
        /// Body lines the end line announced.
        expected: usize,
    },
    /// A key every version-1 answer has is missing.
    #[error("the answer lacks `{key}`: the node runs a different spanvm build; use the same one")]
    Missing {
        /// The key.
        key: String,
    },
    /// A value is not what its key needs.
    #[error("`{key}` has the value `{value}`, which is not {expected}")]
    BadValue {
        /// The key.
        key: String,
        /// The value, shortened and escaped.
        value: String,
        /// What it should be.
        expected: &'static str,
    },
    /// The answer is larger than any node sends.
    #[error("the answer is larger than {MAX_ANSWER_BYTES} bytes: not a spanvm node")]
    TooLarge,
}

/// Text from the other end, made safe to show: escaped and at most 60 characters.
fn shown(text: &str) -> String {
    let mut out: String = text.chars().take(60).flat_map(char::escape_debug).collect();
    if text.chars().count() > 60 {
        out.push_str("...");
    }
    out
}

/// The request line a client sends.
pub fn request() -> String {
    format!("{MAGIC} {PROTOCOL_VERSION}\n")
}

/// Checks a request line (without its newline); returns the version it asks for.
pub fn parse_request(line: &str) -> Result<u32, WireError> {
    parse_header(line)
}

fn parse_header(line: &str) -> Result<u32, WireError> {
    let not_stats = || WireError::NotStats {
        first_line: shown(line),
    };
    let mut words = line.split(' ');
    match (words.next(), words.next(), words.next()) {
        (Some(MAGIC), Some(version), None) => version.parse().map_err(|_| not_stats()),
        _ => Err(not_stats()),
    }
}

/// The answer to a request the node does not understand.
pub fn encode_refusal(why: &str) -> String {
    let why: String = why.chars().filter(|c| !c.is_control()).collect();
    format!("{MAGIC} {PROTOCOL_VERSION}\nerror {why}\nend 1\n")
}

/// Body lines in order.
struct Body(String, usize);

impl Body {
    fn put(&mut self, key: &str, value: impl std::fmt::Display) {
        // Writing to a String cannot fail.
        let _ = writeln!(self.0, "{key} {value}");
        self.1 += 1;
    }
}

/// A node's answer.
pub fn encode(report: &NodeReport) -> String {
    let mut body = Body(String::new(), 0);
    body.put("node", report.node);
    body.put("nodes", report.nodes);
    body.put("phase", report.phase.name());
    body.put("uptime_ms", report.uptime.as_millis());
    for v in &report.vcpus {
        for (reason, count) in ExitReason::ALL.iter().zip(v.exits) {
            body.put(&format!("vcpu.{}.exit.{}", v.index, reason.name()), count);
        }
        body.put(&format!("vcpu.{}.ipi.sent", v.index), v.interrupts.sent);
        body.put(
            &format!("vcpu.{}.ipi.received", v.index),
            v.interrupts.received,
        );
    }
    if let Some(d) = &report.dsm {
        for (key, value) in dsm_fields(d) {
            body.put(&format!("dsm.{key}"), value);
        }
        for (bucket, &count) in d.latency_log2_us.iter().enumerate() {
            if count > 0 {
                body.put(&format!("dsm.latency_us.{bucket}"), count);
            }
        }
        for (page, count) in &d.top_pages {
            body.put(&format!("dsm.hot_page.{page}"), count);
        }
    }
    if let Some(f) = &report.forward {
        for (key, value) in forward_fields(f) {
            body.put(&format!("forward.{key}"), value);
        }
    }
    if let Some(t) = &report.transport {
        body.put("transport.frames_sent", t.frames_sent);
        body.put("transport.frames_queued", t.frames_queued);
        body.put("transport.peak_backlog_bytes", t.peak_backlog_bytes);
    }
    if let Some(z) = &report.shadow_zap {
        for (key, value) in zap_fields(z) {
            body.put(&format!("shadow_zap.{key}"), value);
        }
    }
    let Body(text, lines) = body;
    format!("{MAGIC} {PROTOCOL_VERSION}\n{text}end {lines}\n")
}

/// The DSM's single-valued fields under their wire names (without the `dsm.` prefix).
fn dsm_fields(d: &StatsSnapshot) -> [(&'static str, u64); 23] {
    [
        ("faults.read", d.faults_read),
        ("faults.write", d.faults_write),
        ("faults.merged", d.faults_merged),
        ("faults.resolved", d.faults_resolved),
        ("pins", d.pins),
        ("requests.read.local", d.reads[0]),
        ("requests.read.remote", d.reads[1]),
        ("requests.write.local", d.writes[0]),
        ("requests.write.remote", d.writes[1]),
        ("requests.upgrade.local", d.upgrades[0]),
        ("requests.upgrade.remote", d.upgrades[1]),
        ("served_as_home", d.served_as_home),
        ("served_as_source", d.served_as_source),
        ("invalidations", d.invalidations),
        ("deferred_by_pin", d.deferred_by_pin),
        ("zero_pages_received", d.zero_pages_received),
        ("messages.sent", d.messages_sent),
        ("messages.received", d.messages_received),
        ("pages.sent", d.pages_sent),
        ("pages.received", d.pages_received),
        ("bytes.sent", d.bytes_sent),
        ("bytes.received", d.bytes_received),
        ("frames_rejected", d.frames_rejected),
    ]
}

fn forward_fields(f: &ForwardStats) -> [(&'static str, u64); 6] {
    [
        ("interrupts_sent", f.interrupts_sent),
        ("interrupts_received", f.interrupts_received),
        ("io_forwarded", f.io_forwarded),
        ("io_served", f.io_served),
        ("addressing_updates", f.addressing_updates),
        ("eois_sent", f.eois_sent),
    ]
}

fn zap_fields(z: &ZapStats) -> [(&'static str, u64); 6] {
    [
        ("drops", z.drops),
        ("zaps", z.zaps),
        ("calls", z.calls),
        ("pages", z.pages),
        ("tables_read", z.tables_read),
        ("nanos", z.nanos),
    ]
}

/// The body of an answer, by key.
struct Fields(BTreeMap<String, String>);

impl Fields {
    fn text(&self, key: &str) -> Result<&str, WireError> {
        self.0
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| WireError::Missing { key: key.into() })
    }

    fn number<T: TryFrom<u64>>(&self, key: &str) -> Result<T, WireError> {
        let value = self.text(key)?;
        value
            .parse::<u64>()
            .ok()
            .and_then(|n| T::try_from(n).ok())
            .ok_or_else(|| WireError::BadValue {
                key: key.into(),
                value: shown(value),
                expected: "a number in range",
            })
    }

    fn has_section(&self, prefix: &str) -> bool {
        self.0
            .range(prefix.to_string()..)
            .next()
            .is_some_and(|(k, _)| k.starts_with(prefix))
    }

    /// `(index, rest of the key, value)` of every key `prefix<index>.<rest>`.
    fn indexed<'a>(
        &'a self,
        prefix: &'a str,
    ) -> impl Iterator<Item = Result<(u64, &'a str, &'a str), WireError>> + 'a {
        self.0
            .iter()
            .filter_map(move |(k, v)| Some((k, k.strip_prefix(prefix)?, v)))
            .map(|(key, rest, value)| {
                let (index, tail) = rest.split_once('.').unwrap_or((rest, ""));
                index
                    .parse::<u64>()
                    .map(|i| (i, tail, value.as_str()))
                    .map_err(|_| WireError::BadValue {
                        key: shown(key),
                        value: shown(index),
                        expected: "an index in the key",
                    })
            })
    }
}

/// Splits an answer into its checked body lines.
fn parse_lines(text: &str) -> Result<Fields, WireError> {
    if text.is_empty() {
        return Err(WireError::Empty);
    }
    // The newline that ends the last line does not start another.
    let mut lines = text.strip_suffix('\n').unwrap_or(text).split('\n');
    let header = lines.next().unwrap_or_default();
    let version = parse_header(header)?;
    if version != PROTOCOL_VERSION {
        return Err(WireError::Version {
            theirs: version,
            ours: PROTOCOL_VERSION,
        });
    }
    let mut fields = BTreeMap::new();
    let mut body_lines = 0;
    for (i, line) in lines.enumerate() {
        let number = i + 2;
        let bad = || WireError::BadLine {
            line: number,
            text: shown(line),
        };
        if let Some(why) = line.strip_prefix("error ") {
            return Err(WireError::Refused(shown(why)));
        }
        if let Some(count) = line.strip_prefix("end ") {
            let expected: usize = count.parse().map_err(|_| bad())?;
            if expected != body_lines {
                return Err(WireError::Miscounted {
                    got: body_lines,
                    expected,
                });
            }
            return Ok(Fields(fields));
        }
        let mut words = line.split(' ');
        let (Some(key), Some(value), None) = (words.next(), words.next(), words.next()) else {
            return Err(bad());
        };
        let key_ok = !key.is_empty()
            && key
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._".contains(&b));
        if !key_ok || value.is_empty() || value.chars().any(char::is_control) {
            return Err(bad());
        }
        if fields.insert(key.to_string(), value.to_string()).is_some() {
            return Err(WireError::Duplicate { key: key.into() });
        }
        body_lines += 1;
    }
    Err(WireError::Truncated { got: body_lines })
}

/// Reads a node's answer.
pub fn decode(answer: &[u8]) -> Result<NodeReport, WireError> {
    if answer.len() > MAX_ANSWER_BYTES {
        return Err(WireError::TooLarge);
    }
    let text = std::str::from_utf8(answer).map_err(|_| WireError::NotStats {
        first_line: shown(&String::from_utf8_lossy(
            answer.split(|&b| b == b'\n').next().unwrap_or_default(),
        )),
    })?;
    let fields = parse_lines(text)?;
    let phase = fields.text("phase")?;
    let phase = Phase::from_name(phase).ok_or_else(|| WireError::BadValue {
        key: "phase".into(),
        value: shown(phase),
        expected: "`starting`, `running` or `stopping`",
    })?;
    Ok(NodeReport {
        node: fields.number("node")?,
        nodes: fields.number("nodes")?,
        phase,
        uptime: Duration::from_millis(fields.number("uptime_ms")?),
        vcpus: decode_vcpus(&fields)?,
        dsm: fields
            .has_section("dsm.")
            .then(|| decode_dsm(&fields))
            .transpose()?,
        forward: fields
            .has_section("forward.")
            .then(|| decode_forward(&fields))
            .transpose()?,
        transport: fields
            .has_section("transport.")
            .then(|| decode_transport(&fields))
            .transpose()?,
        shadow_zap: fields
            .has_section("shadow_zap.")
            .then(|| decode_zap(&fields))
            .transpose()?,
    })
}

fn decode_vcpus(fields: &Fields) -> Result<Vec<VcpuReport>, WireError> {
    let mut indices: Vec<u64> = fields
        .indexed("vcpu.")
        .map(|r| r.map(|(i, _, _)| i))
        .collect::<Result<_, _>>()?;
    // Keys sort as text (vcpu.10 before vcpu.2); reports list vCPUs by index.
    indices.sort_unstable();
    indices.dedup();
    indices
        .into_iter()
        .map(|i| {
            let index = usize::try_from(i).map_err(|_| WireError::BadValue {
                key: format!("vcpu.{i}"),
                value: i.to_string(),
                expected: "a vCPU index",
            })?;
            let mut exits = [0; ExitReason::ALL.len()];
            for (slot, reason) in exits.iter_mut().zip(ExitReason::ALL) {
                *slot = fields.number(&format!("vcpu.{i}.exit.{}", reason.name()))?;
            }
            Ok(VcpuReport {
                index,
                exits,
                interrupts: VcpuInterrupts {
                    sent: fields.number(&format!("vcpu.{i}.ipi.sent"))?,
                    received: fields.number(&format!("vcpu.{i}.ipi.received"))?,
                },
            })
        })
        .collect()
}

fn decode_dsm(fields: &Fields) -> Result<StatsSnapshot, WireError> {
    let n = |key: &str| fields.number::<u64>(&format!("dsm.{key}"));
    let mut latency_log2_us = [0; LATENCY_BUCKETS];
    for entry in fields.indexed("dsm.latency_us.") {
        let (bucket, tail, value) = entry?;
        let slot = usize::try_from(bucket)
            .ok()
            .filter(|_| tail.is_empty())
            .and_then(|b| latency_log2_us.get_mut(b))
            .ok_or_else(|| WireError::BadValue {
                key: format!("dsm.latency_us.{bucket}"),
                value: shown(value),
                expected: "a count in one of the 32 latency buckets",
            })?;
        *slot = fields.number(&format!("dsm.latency_us.{bucket}"))?;
    }
    let mut top_pages: Vec<(u64, u64)> = Vec::new();
    for entry in fields.indexed("dsm.hot_page.") {
        let (page, tail, value) = entry?;
        if !tail.is_empty() {
            return Err(WireError::BadValue {
                key: format!("dsm.hot_page.{page}.{}", shown(tail)),
                value: shown(value),
                expected: "a key of the form dsm.hot_page.<page>",
            });
        }
        top_pages.push((page, fields.number(&format!("dsm.hot_page.{page}"))?));
    }
    // Most-faulted first, as the node ranks them.
    top_pages.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let node = fields.number("node")?;
    Ok(StatsSnapshot {
        node,
        faults_read: n("faults.read")?,
        faults_write: n("faults.write")?,
        faults_merged: n("faults.merged")?,
        faults_resolved: n("faults.resolved")?,
        pins: n("pins")?,
        reads: [n("requests.read.local")?, n("requests.read.remote")?],
        writes: [n("requests.write.local")?, n("requests.write.remote")?],
        upgrades: [n("requests.upgrade.local")?, n("requests.upgrade.remote")?],
        served_as_home: n("served_as_home")?,
        served_as_source: n("served_as_source")?,
        invalidations: n("invalidations")?,
        deferred_by_pin: n("deferred_by_pin")?,
        zero_pages_received: n("zero_pages_received")?,
        messages_sent: n("messages.sent")?,
        messages_received: n("messages.received")?,
        pages_sent: n("pages.sent")?,
        pages_received: n("pages.received")?,
        bytes_sent: n("bytes.sent")?,
        bytes_received: n("bytes.received")?,
        frames_rejected: n("frames_rejected")?,
        latency_log2_us,
        top_pages,
    })
}

fn decode_forward(fields: &Fields) -> Result<ForwardStats, WireError> {
    let n = |key: &str| fields.number::<u64>(&format!("forward.{key}"));
    Ok(ForwardStats {
        interrupts_sent: n("interrupts_sent")?,
        interrupts_received: n("interrupts_received")?,
        io_forwarded: n("io_forwarded")?,
        io_served: n("io_served")?,
        addressing_updates: n("addressing_updates")?,
        eois_sent: n("eois_sent")?,
    })
}

fn decode_transport(fields: &Fields) -> Result<TransportStats, WireError> {
    Ok(TransportStats {
        frames_sent: fields.number("transport.frames_sent")?,
        frames_queued: fields.number("transport.frames_queued")?,
        peak_backlog_bytes: fields.number("transport.peak_backlog_bytes")?,
    })
}

fn decode_zap(fields: &Fields) -> Result<ZapStats, WireError> {
    let n = |key: &str| fields.number::<u64>(&format!("shadow_zap.{key}"));
    Ok(ZapStats {
        drops: n("drops")?,
        zaps: n("zaps")?,
        calls: n("calls")?,
        pages: n("pages")?,
        tables_read: n("tables_read")?,
        nanos: n("nanos")?,
    })
}

#[cfg(test)]
#[path = "wire_tests.rs"]
mod tests;
