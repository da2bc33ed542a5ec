//! The APIC timer of one vCPU: a thread that sleeps until the programmed deadline (a guest TSC
//! value), then fires the timer in the APIC and wakes the vCPU.

use std::sync::Arc;
use std::time::Duration;

use crate::stop::Stop;
use crate::tsc;
use crate::vcpu::VcpuShared;

/// Runs until `stop` is requested and the vCPU's timer condvar is signalled.
pub fn run_timer(vcpu: Arc<VcpuShared>, stop: Arc<Stop>, tsc_khz: u32) {
    let mut apic = vcpu.lock_apic();
    while !stop.requested() {
        match apic.timer_deadline() {
            None => {
                apic = vcpu
                    .timer_changed
                    .wait(apic)
                    .unwrap_or_else(|p| p.into_inner());
            }
            Some(deadline) => {
                let now = tsc::now();
                if now >= deadline {
                    let _ = apic.timer_expired(now);
                    let wake = apic.has_injectable().is_some();
                    drop(apic);
                    if wake {
                        vcpu.notify();
                    }
                    apic = vcpu.lock_apic();
                } else {
                    let wait = tsc::ticks_to_duration(deadline - now, tsc_khz);
                    // Never sleep for ages on a far deadline: re-check now and then so a stop
                    // is seen promptly even if nobody signals.
                    let wait = wait.min(Duration::from_millis(200));
                    apic = vcpu
                        .timer_changed
                        .wait_timeout(apic, wait)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
    }
}
