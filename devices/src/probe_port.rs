//! The probe device: a port range through which probe guests (no OS, see `images/probes/`)
//! report values and their exit status to the host.
//!
//! Ports (32-bit `out`): `base+0` selects a key (four ASCII bytes, little-endian), `base+4`
//! sets the low half of the value, `base+8` the high half and commits the report, `base+0xc`
//! ends the probe on that vCPU with a status (0 = success). `base+0x10` accepts anything and
//! does nothing (the cheapest exit, for benchmarks). Latches are per vCPU.

use std::sync::Mutex;

use crate::bus::BusDevice;

/// First port of the probe device.
pub const PROBE_PORT: u64 = 0x500;
/// Number of ports claimed.
pub const PROBE_PORT_LEN: u64 = 0x14;

/// Something a probe told the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeEvent {
    /// A value under a key.
    Report {
        /// The vCPU the probe ran on.
        vcpu: usize,
        /// Four ASCII bytes naming what is reported.
        key: [u8; 4],
        /// The reported value.
        value: u64,
    },
    /// The probe finished on `vcpu` with `status` (0 = success).
    Exit {
        /// The vCPU the probe ran on.
        vcpu: usize,
        /// The probe's exit status, 0 for success.
        status: u32,
    },
}

impl ProbeEvent {
    /// The key as text (non-printable bytes as `?`).
    pub fn key_text(key: &[u8; 4]) -> String {
        key.iter()
            .map(|&b| if b.is_ascii_graphic() { b as char } else { '?' })
            .collect()
    }
}

#[derive(Default, Clone, Copy)]
struct Latch {
    key: [u8; 4],
    low: u32,
}

/// The probe device on the port bus; `sink` receives every event.
pub struct ProbePort {
    latches: Mutex<Vec<Latch>>,
    sink: Box<dyn Fn(ProbeEvent) + Send + Sync>,
}

impl ProbePort {
    /// A device for `vcpus` vCPUs.
    pub fn new(vcpus: usize, sink: Box<dyn Fn(ProbeEvent) + Send + Sync>) -> Self {
        Self {
            latches: Mutex::new(vec![Latch::default(); vcpus]),
            sink,
        }
    }
}

fn u32_of(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(b)
}

impl BusDevice for ProbePort {
    fn read(&self, _vcpu: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&self, vcpu: usize, offset: u64, data: &[u8]) {
        let value = u32_of(data);
        let event = {
            let mut latches = self.latches.lock().unwrap_or_else(|p| p.into_inner());
            let Some(latch) = latches.get_mut(vcpu) else {
                return;
            };
            match offset {
                0 => {
                    latch.key = value.to_le_bytes();
                    None
                }
                4 => {
                    latch.low = value;
                    None
                }
                8 => Some(ProbeEvent::Report {
                    vcpu,
                    key: latch.key,
                    value: (u64::from(value) << 32) | u64::from(latch.low),
                }),
                0xc => Some(ProbeEvent::Exit {
                    vcpu,
                    status: value,
                }),
                _ => None,
            }
        };
        if let Some(e) = event {
            (self.sink)(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn reports_and_exits_per_vcpu() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let dev = ProbePort::new(2, Box::new(move |e| s.lock().unwrap().push(e)));
        dev.write(0, 0, &0x4f4c4548u32.to_le_bytes());
        dev.write(1, 0, b"CNTR");
        dev.write(0, 4, &5u32.to_le_bytes());
        dev.write(1, 4, &1u32.to_le_bytes());
        dev.write(0, 8, &0u32.to_le_bytes());
        dev.write(1, 8, &2u32.to_le_bytes());
        dev.write(1, 0xc, &3u32.to_le_bytes());
        dev.write(5, 0xc, &0u32.to_le_bytes()); // no such vCPU: ignored
        let seen = seen.lock().unwrap();
        assert_eq!(
            seen.as_slice(),
            &[
                ProbeEvent::Report {
                    vcpu: 0,
                    key: *b"HELO",
                    value: 5
                },
                ProbeEvent::Report {
                    vcpu: 1,
                    key: *b"CNTR",
                    value: (2 << 32) | 1
                },
                ProbeEvent::Exit { vcpu: 1, status: 3 },
            ]
        );
        assert_eq!(ProbeEvent::key_text(b"HE\x01O"), "HE?O");
    }
}
