//! The APIC timer (SDM 10.5.4): one-shot, periodic and TSC-deadline, on guest TSC time.
//!
//! The counter runs on a 1 GHz APIC bus clock (one bus tick = 1 ns) divided by the divide
//! configuration. Deadlines are kept exactly: the n-th expiry of a countdown anchored at TSC
//! `a` is at `a + ceil((first + n * period) ns * tsc_khz / 10^6)`, computed in u128 from the
//! anchor, so a periodic timer never drifts from its grid however often it is re-armed, and
//! never fires before the counter would have reached zero.

use super::lvt::Lvt;
use super::{ApicEffects, LocalApic};

const NS_PER_MS: u128 = 1_000_000;

/// The timer mode field of LVT timer, bits 18:17.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TimerMode {
    /// 00: count down once from the initial count.
    OneShot,
    /// 01: count down and reload from the initial count.
    Periodic,
    /// 10: fire when the TSC reaches IA32_TSC_DEADLINE.
    TscDeadline,
    /// 11: reserved; the timer never fires.
    Reserved,
}

impl TimerMode {
    /// The mode an LVT timer value selects.
    pub(crate) const fn from_lvt(lvt: u32) -> Self {
        match (lvt >> 17) & 3 {
            0 => Self::OneShot,
            1 => Self::Periodic,
            2 => Self::TscDeadline,
            _ => Self::Reserved,
        }
    }
}

/// A running one-shot or periodic countdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Countdown {
    /// Guest TSC when the countdown (re)started.
    anchor_tsc: u64,
    /// Bus ns from the anchor to the first expiry.
    first_ns: u64,
    /// Bus ns between later expiries; 0 for one-shot.
    period_ns: u64,
    /// Expiries already handled: the next deadline is number `expirations`.
    expirations: u64,
}

/// The timer's registers and countdown state.
#[derive(Debug, Clone)]
pub(crate) struct ApicTimer {
    tsc_khz: u128,
    mode: TimerMode,
    initial_count: u32,
    divide_config: u32,
    /// IA32_TSC_DEADLINE; 0 = disarmed.
    tsc_deadline: u64,
    countdown: Option<Countdown>,
}

/// Bits of the divide configuration register the guest can write (bits 0, 1 and 3).
pub(crate) const DIVIDE_CONFIG_WRITABLE: u32 = 0xB;

impl ApicTimer {
    pub(crate) fn new(tsc_khz: u32) -> Self {
        Self {
            tsc_khz: u128::from(tsc_khz.max(1)),
            mode: TimerMode::OneShot,
            initial_count: 0,
            divide_config: 0,
            tsc_deadline: 0,
            countdown: None,
        }
    }

    /// Registers and countdown as after reset (the TSC rate is kept).
    pub(crate) fn reset(&mut self) {
        *self = Self {
            tsc_khz: self.tsc_khz,
            ..Self::new(0)
        };
    }

    /// The divisor the divide configuration selects: bits (3, 1, 0) = 111 -> 1, else
    /// 2 << value (000 -> 2 ... 110 -> 128).
    pub(crate) fn divisor(&self) -> u64 {
        let value = (self.divide_config & 8) >> 1 | self.divide_config & 3;
        1 << ((value + 1) & 7)
    }

    pub(crate) fn divide_config(&self) -> u32 {
        self.divide_config
    }

    pub(crate) fn initial_count(&self) -> u32 {
        self.initial_count
    }

    /// Follows a write of the LVT timer mode. A change of mode disarms the timer and clears
    /// the initial count and IA32_TSC_DEADLINE (as KVM does); returns whether it changed.
    pub(crate) fn set_mode(&mut self, mode: TimerMode) -> bool {
        if mode == self.mode {
            return false;
        }
        self.mode = mode;
        self.initial_count = 0;
        self.tsc_deadline = 0;
        self.countdown = None;
        true
    }

    /// An initial-count write: starts (or with 0 stops) the countdown; ignored in
    /// TSC-deadline mode. Returns whether the deadline changed.
    pub(crate) fn set_initial_count(&mut self, count: u32, now_tsc: u64) -> bool {
        if self.mode == TimerMode::TscDeadline {
            return false;
        }
        self.initial_count = count;
        let length_ns = u64::from(count) * self.divisor();
        self.countdown = match self.mode {
            _ if count == 0 => None,
            TimerMode::OneShot | TimerMode::Periodic => Some(Countdown {
                anchor_tsc: now_tsc,
                first_ns: length_ns,
                period_ns: if self.mode == TimerMode::Periodic {
                    length_ns
                } else {
                    0
                },
                expirations: 0,
            }),
            TimerMode::TscDeadline | TimerMode::Reserved => None,
        };
        true
    }

    /// A divide-configuration write. A running countdown keeps its current count and goes
    /// on at the new rate (the phase within one divided tick is lost); later periods use the
    /// new rate. Returns whether the deadline changed.
    pub(crate) fn set_divide_config(&mut self, value: u32, now_tsc: u64) -> bool {
        let value = value & DIVIDE_CONFIG_WRITABLE;
        if value == self.divide_config {
            return false;
        }
        let current = self.current_count(now_tsc);
        self.divide_config = value;
        let divisor = self.divisor();
        match &mut self.countdown {
            Some(countdown) if current > 0 => {
                *countdown = Countdown {
                    anchor_tsc: now_tsc,
                    first_ns: u64::from(current) * divisor,
                    period_ns: if countdown.period_ns == 0 {
                        0
                    } else {
                        u64::from(self.initial_count) * divisor
                    },
                    expirations: 0,
                };
                true
            }
            _ => false,
        }
    }

    /// The current-count register: what the counter shows at `now_tsc` (0 when stopped,
    /// expired, or in TSC-deadline mode).
    pub(crate) fn current_count(&self, now_tsc: u64) -> u32 {
        let Some(countdown) = self.countdown else {
            return 0;
        };
        let elapsed_ns = self.ns_of_tsc(now_tsc.saturating_sub(countdown.anchor_tsc));
        let first = u128::from(countdown.first_ns);
        let period = u128::from(countdown.period_ns);
        let remaining_ns = if elapsed_ns < first {
            first - elapsed_ns
        } else if period == 0 {
            0
        } else {
            period - (elapsed_ns - first) % period
        };
        let count = remaining_ns.div_ceil(u128::from(self.divisor()));
        u32::try_from(count).unwrap_or(u32::MAX)
    }

    /// The guest TSC of the next expiry, if armed (it may be in the past: fire at once).
    pub(crate) fn deadline(&self) -> Option<u64> {
        match self.mode {
            TimerMode::TscDeadline => (self.tsc_deadline != 0).then_some(self.tsc_deadline),
            _ => self
                .countdown
                .map(|c| self.countdown_deadline(&c, c.expirations)),
        }
    }

    /// Handles an expiry at `now_tsc`; returns whether the timer fired (false when it is not
    /// armed or `now_tsc` is before the deadline). One-shot and TSC-deadline disarm; periodic
    /// moves to the first deadline of its grid after `now_tsc`, so expiries the VMM was late
    /// for coalesce into this one, as they would in IRR.
    pub(crate) fn expire(&mut self, now_tsc: u64) -> bool {
        if self.deadline().is_none_or(|deadline| now_tsc < deadline) {
            return false;
        }
        if self.mode == TimerMode::TscDeadline {
            self.tsc_deadline = 0;
            return true;
        }
        let Some(mut countdown) = self.countdown else {
            return false;
        };
        if countdown.period_ns == 0 {
            self.countdown = None;
            return true;
        }
        // Smallest n with ceil((first + n*period) * khz / 10^6) > elapsed_tsc, that is
        // (first + n*period) * khz > elapsed_tsc * 10^6.
        let elapsed = u128::from(now_tsc - countdown.anchor_tsc) * NS_PER_MS;
        let first = u128::from(countdown.first_ns) * self.tsc_khz;
        let period = u128::from(countdown.period_ns) * self.tsc_khz;
        let next = match elapsed.checked_sub(first) {
            Some(beyond_first) => beyond_first / period + 1,
            None => 0,
        };
        let next = u64::try_from(next).unwrap_or(u64::MAX);
        countdown.expirations = next.max(countdown.expirations.saturating_add(1));
        self.countdown = Some(countdown);
        true
    }

    /// IA32_TSC_DEADLINE as the guest reads it: 0 unless in TSC-deadline mode.
    pub(crate) fn tsc_deadline(&self) -> u64 {
        if self.mode == TimerMode::TscDeadline {
            self.tsc_deadline
        } else {
            0
        }
    }

    /// A write of IA32_TSC_DEADLINE: arms (0 disarms) in TSC-deadline mode, ignored in the
    /// other modes. Returns whether the deadline changed.
    pub(crate) fn set_tsc_deadline(&mut self, value: u64) -> bool {
        if self.mode != TimerMode::TscDeadline || value == self.tsc_deadline {
            return false;
        }
        self.tsc_deadline = value;
        true
    }

    fn countdown_deadline(&self, countdown: &Countdown, n: u64) -> u64 {
        let ns = u128::from(countdown.first_ns) + u128::from(n) * u128::from(countdown.period_ns);
        let tsc = (ns * self.tsc_khz).div_ceil(NS_PER_MS);
        u64::try_from(tsc)
            .ok()
            .and_then(|tsc| countdown.anchor_tsc.checked_add(tsc))
            .unwrap_or(u64::MAX)
    }

    fn ns_of_tsc(&self, tsc: u64) -> u128 {
        u128::from(tsc) * NS_PER_MS / self.tsc_khz
    }
}

impl LocalApic {
    /// The guest TSC at which the timer next fires (any mode), `None` if not armed. It may be
    /// at or before the current TSC: then call [`LocalApic::timer_expired`] at once.
    pub fn timer_deadline(&self) -> Option<u64> {
        self.timer.deadline()
    }

    /// The VMM's host timer went off and `now_tsc >= timer_deadline()`: raise the LVT timer
    /// vector unless masked, re-arm a periodic timer on its grid (next = previous deadline +
    /// period), disarm one-shot and TSC-deadline (IA32_TSC_DEADLINE then reads 0). A call
    /// before the deadline changes nothing and returns no effects.
    pub fn timer_expired(&mut self, now_tsc: u64) -> ApicEffects {
        let fired = self.timer.expire(now_tsc);
        if fired {
            self.raise_lvt(Lvt::Timer);
        }
        ApicEffects {
            timer_changed: fired,
            ..ApicEffects::default()
        }
    }

    /// IA32_TSC_DEADLINE (MSR 0x6E0) as the guest reads it: 0 unless the LVT timer is in
    /// TSC-deadline mode and armed.
    pub fn tsc_deadline(&self) -> u64 {
        self.timer.tsc_deadline()
    }

    /// A guest write of IA32_TSC_DEADLINE: arms the timer at that TSC (0 disarms); ignored
    /// unless the LVT timer is in TSC-deadline mode. A deadline at or before `now_tsc` shows
    /// up in [`LocalApic::timer_deadline`] as already due.
    pub fn set_tsc_deadline(&mut self, value: u64, now_tsc: u64) -> ApicEffects {
        let _ = now_tsc;
        ApicEffects {
            timer_changed: self.timer.set_tsc_deadline(value),
            ..ApicEffects::default()
        }
    }

    /// The current-count register at `now_tsc`.
    pub fn timer_current_count(&self, now_tsc: u64) -> u32 {
        self.timer.current_count(now_tsc)
    }
}
