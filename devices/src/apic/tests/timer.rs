//! The APIC timer: divide values, current count, periodic grid, TSC-deadline, masking.

use super::*;

const ONE_SHOT: u32 = 0x0000_0000;
const PERIODIC: u32 = 0x0002_0000;
const TSC_DEADLINE: u32 = 0x0004_0000;
const MASKED: u32 = 0x0001_0000;

/// An enabled APIC whose LVT timer has `mode` and vector 0xEC.
fn timer_apic(mode: u32) -> LocalApic {
    let mut apic = enabled_apic(0);
    write(&mut apic, LVT_TIMER, mode | 0xEC);
    apic
}

#[test]
fn one_shot_deadline_for_every_divide_value() {
    // DCR value -> divisor (bits 3, 1, 0).
    let divides = [
        (0x0, 2),
        (0x1, 4),
        (0x2, 8),
        (0x3, 16),
        (0x8, 32),
        (0x9, 64),
        (0xA, 128),
        (0xB, 1),
    ];
    for (dcr, divisor) in divides {
        let mut apic = timer_apic(ONE_SHOT);
        write(&mut apic, DIVIDE_CONFIG, dcr | 0xF0);
        assert_eq!(read(&mut apic, DIVIDE_CONFIG), dcr);
        let effects = write_at(&mut apic, INITIAL_COUNT, 1000, 5_000);
        assert!(effects.timer_changed);
        // 1000 counts * divisor ns * 3 TSC ticks per ns.
        assert_eq!(
            apic.timer_deadline(),
            Some(5_000 + 1000 * divisor * 3),
            "DCR {dcr:#x}"
        );
        assert_eq!(read_at(&mut apic, CURRENT_COUNT, 5_000), 1000);
    }
}

#[test]
fn deadline_rounds_up_at_an_odd_tsc_rate() {
    // 1.000001 GHz: 7 ns is 7.000007 ticks, which must round up to 8 (never fire early).
    let mut apic = LocalApic::new(0, true, 1_000_001);
    write(&mut apic, SVR, 0x1FF);
    write(&mut apic, DIVIDE_CONFIG, 0xB);
    write_at(&mut apic, INITIAL_COUNT, 7, 100);
    assert_eq!(apic.timer_deadline(), Some(108));
}

#[test]
fn current_count_decreases_by_divided_bus_ticks() {
    let mut apic = timer_apic(ONE_SHOT);
    // Divide by 2: one count per 2 ns = 6 TSC ticks.
    write_at(&mut apic, INITIAL_COUNT, 1000, 1_000);
    assert_eq!(read_at(&mut apic, CURRENT_COUNT, 1_000), 1000);
    assert_eq!(read_at(&mut apic, CURRENT_COUNT, 1_005), 1000);
    assert_eq!(read_at(&mut apic, CURRENT_COUNT, 1_006), 999);
    assert_eq!(read_at(&mut apic, CURRENT_COUNT, 1_000 + 3_000), 500);
    assert_eq!(read_at(&mut apic, CURRENT_COUNT, 1_000 + 5_994), 1);
    assert_eq!(read_at(&mut apic, CURRENT_COUNT, 1_000 + 6_000), 0);
    assert_eq!(read_at(&mut apic, CURRENT_COUNT, 1_000 + 60_000), 0);
    assert_eq!(read(&mut apic, INITIAL_COUNT), 1000);
}

#[test]
fn one_shot_fires_once_and_disarms() {
    let mut apic = timer_apic(ONE_SHOT);
    write_at(&mut apic, INITIAL_COUNT, 100, 0);
    assert_eq!(apic.timer_deadline(), Some(600));
    assert_eq!(
        apic.timer_expired(599),
        ApicEffects::default(),
        "not due yet"
    );
    assert_eq!(apic.has_injectable(), None);
    let effects = apic.timer_expired(650);
    assert!(effects.timer_changed);
    assert_eq!(apic.timer_deadline(), None);
    assert_eq!(apic.acknowledge(), Some(0xEC));
    assert_eq!(read(&mut apic, TMR0 + 0x70), 0, "timer interrupts are edge");
    assert_eq!(apic.timer_expired(10_000), ApicEffects::default());
    assert_eq!(read_at(&mut apic, CURRENT_COUNT, 10_000), 0);
}

#[test]
fn periodic_rearms_on_its_grid_without_drift() {
    let mut apic = timer_apic(PERIODIC);
    write(&mut apic, DIVIDE_CONFIG, 0xB);
    // 100 counts, divide by 1: 100 ns = 300 TSC ticks per period.
    write_at(&mut apic, INITIAL_COUNT, 100, 7);
    for period in 1..=1000_u64 {
        let deadline = apic.timer_deadline().unwrap();
        assert_eq!(deadline, 7 + 300 * period);
        // The VMM is always a little late; the grid must not move.
        assert!(apic.timer_expired(deadline + 17).timer_changed);
        assert_eq!(apic.acknowledge(), Some(0xEC));
        write(&mut apic, EOI, 0);
    }
    assert_eq!(apic.timer_deadline(), Some(7 + 300 * 1001));
}

#[test]
fn periodic_grid_is_exact_at_a_fractional_tsc_rate() {
    // 2.400001 GHz: one 1000 ns period is 2400.001 ticks; after 1000 periods exactly
    // 2_400_001 ticks have passed, with no rounding error accumulated.
    let mut apic = LocalApic::new(0, true, 2_400_001);
    write(&mut apic, SVR, 0x1FF);
    write(&mut apic, LVT_TIMER, PERIODIC | 0xEC);
    write(&mut apic, DIVIDE_CONFIG, 0xB);
    write_at(&mut apic, INITIAL_COUNT, 1000, 0);
    assert_eq!(apic.timer_deadline(), Some(2401));
    for _ in 0..999 {
        let deadline = apic.timer_deadline().unwrap();
        apic.timer_expired(deadline);
    }
    assert_eq!(apic.timer_deadline(), Some(2_400_001));
}

#[test]
fn periodic_expiries_missed_by_the_vmm_coalesce() {
    let mut apic = timer_apic(PERIODIC);
    write(&mut apic, DIVIDE_CONFIG, 0xB);
    write_at(&mut apic, INITIAL_COUNT, 100, 0);
    assert!(apic.timer_expired(300 * 5 + 10).timer_changed);
    assert_eq!(apic.timer_deadline(), Some(300 * 6));
    assert_eq!(apic.acknowledge(), Some(0xEC));
    assert_eq!(
        apic.has_injectable(),
        None,
        "one interrupt for the missed periods"
    );
    // Exactly on a grid point: that point counts as passed.
    assert!(apic.timer_expired(300 * 6).timer_changed);
    assert_eq!(apic.timer_deadline(), Some(300 * 7));
}

#[test]
fn periodic_current_count_reloads_each_period() {
    let mut apic = timer_apic(PERIODIC);
    write(&mut apic, DIVIDE_CONFIG, 0xB);
    write_at(&mut apic, INITIAL_COUNT, 100, 0);
    assert_eq!(read_at(&mut apic, CURRENT_COUNT, 150), 50);
    assert_eq!(read_at(&mut apic, CURRENT_COUNT, 300), 100);
    assert_eq!(read_at(&mut apic, CURRENT_COUNT, 300 * 41 + 30), 90);
}

#[test]
fn initial_count_zero_stops_the_timer() {
    let mut apic = timer_apic(PERIODIC);
    write_at(&mut apic, INITIAL_COUNT, 500, 0);
    assert!(apic.timer_deadline().is_some());
    let effects = write_at(&mut apic, INITIAL_COUNT, 0, 100);
    assert!(effects.timer_changed);
    assert_eq!(apic.timer_deadline(), None);
    assert_eq!(read_at(&mut apic, CURRENT_COUNT, 100), 0);
    assert_eq!(apic.timer_expired(1_000_000), ApicEffects::default());
}

#[test]
fn masked_timer_runs_but_raises_nothing() {
    let mut apic = timer_apic(PERIODIC | MASKED);
    write(&mut apic, DIVIDE_CONFIG, 0xB);
    write_at(&mut apic, INITIAL_COUNT, 100, 0);
    assert!(apic.timer_expired(300).timer_changed);
    assert_eq!(apic.has_injectable(), None);
    assert_eq!(read(&mut apic, IRR0 + 0x70), 0);
    assert_eq!(apic.timer_deadline(), Some(600));
    // Unmasking (same mode) keeps the countdown and the next expiry raises the vector.
    assert!(!write(&mut apic, LVT_TIMER, PERIODIC | 0xEC).timer_changed);
    apic.timer_expired(600);
    assert_eq!(apic.has_injectable(), Some(0xEC));
}

#[test]
fn changing_the_mode_disarms_and_clears_the_initial_count() {
    let mut apic = timer_apic(ONE_SHOT);
    write_at(&mut apic, INITIAL_COUNT, 500, 0);
    let effects = write(&mut apic, LVT_TIMER, PERIODIC | 0xEC);
    assert!(effects.timer_changed);
    assert_eq!(apic.timer_deadline(), None);
    assert_eq!(read(&mut apic, INITIAL_COUNT), 0);
}

#[test]
fn divide_change_while_counting_keeps_the_count() {
    let mut apic = timer_apic(ONE_SHOT);
    write_at(&mut apic, INITIAL_COUNT, 1000, 0);
    assert_eq!(read_at(&mut apic, CURRENT_COUNT, 3_000), 500);
    let effects = write_at(&mut apic, DIVIDE_CONFIG, 0x2, 3_000);
    assert!(effects.timer_changed);
    assert_eq!(read_at(&mut apic, CURRENT_COUNT, 3_000), 500);
    // 500 counts left at 8 ns each = 4000 ns = 12000 ticks.
    assert_eq!(apic.timer_deadline(), Some(15_000));
    assert_eq!(read_at(&mut apic, CURRENT_COUNT, 3_000 + 24), 499);
    assert!(!write_at(&mut apic, DIVIDE_CONFIG, 0x2, 4_000).timer_changed);
}

#[test]
fn tsc_deadline_arms_fires_and_disarms() {
    let mut apic = timer_apic(TSC_DEADLINE);
    assert_eq!(apic.timer_deadline(), None);
    let effects = apic.set_tsc_deadline(50_000, 1_000);
    assert!(effects.timer_changed);
    assert_eq!(apic.tsc_deadline(), 50_000);
    assert_eq!(apic.timer_deadline(), Some(50_000));
    assert_eq!(apic.timer_expired(49_999), ApicEffects::default());
    assert!(apic.timer_expired(50_003).timer_changed);
    assert_eq!(apic.has_injectable(), Some(0xEC));
    assert_eq!(apic.tsc_deadline(), 0);
    assert_eq!(apic.timer_deadline(), None);
    // Writing 0 disarms an armed deadline.
    apic.set_tsc_deadline(90_000, 60_000);
    assert!(apic.set_tsc_deadline(0, 60_000).timer_changed);
    assert_eq!(apic.timer_deadline(), None);
    assert_eq!(apic.timer_expired(100_000), ApicEffects::default());
    // A deadline in the past is reported as due.
    apic.set_tsc_deadline(10, 60_000);
    assert_eq!(apic.timer_deadline(), Some(10));
}

#[test]
fn tsc_deadline_mode_ignores_the_counter_registers() {
    let mut apic = timer_apic(TSC_DEADLINE);
    assert!(!write_at(&mut apic, INITIAL_COUNT, 1000, 0).timer_changed);
    assert_eq!(read(&mut apic, INITIAL_COUNT), 0);
    assert_eq!(read_at(&mut apic, CURRENT_COUNT, 10), 0);
    assert_eq!(apic.timer_deadline(), None);
}

#[test]
fn tsc_deadline_writes_are_ignored_in_other_modes() {
    let mut apic = timer_apic(ONE_SHOT);
    assert_eq!(apic.set_tsc_deadline(5_000, 0), ApicEffects::default());
    assert_eq!(apic.tsc_deadline(), 0);
    assert_eq!(apic.timer_deadline(), None);
    // Leaving TSC-deadline mode clears an armed deadline.
    let mut apic = timer_apic(TSC_DEADLINE);
    apic.set_tsc_deadline(5_000, 0);
    assert!(write(&mut apic, LVT_TIMER, ONE_SHOT | 0xEC).timer_changed);
    assert_eq!(apic.timer_deadline(), None);
    write(&mut apic, LVT_TIMER, TSC_DEADLINE | 0xEC);
    assert_eq!(apic.tsc_deadline(), 0);
}

#[test]
fn masked_tsc_deadline_fires_silently() {
    let mut apic = timer_apic(TSC_DEADLINE | MASKED);
    apic.set_tsc_deadline(100, 0);
    assert!(apic.timer_expired(100).timer_changed);
    assert_eq!(apic.has_injectable(), None);
    assert_eq!(apic.tsc_deadline(), 0);
}

#[test]
fn reserved_timer_mode_never_arms() {
    let mut apic = timer_apic(0x0006_0000);
    assert_eq!(read(&mut apic, LVT_TIMER), 0x0006_00EC);
    write_at(&mut apic, INITIAL_COUNT, 100, 0);
    assert_eq!(apic.timer_deadline(), None);
    assert_eq!(apic.set_tsc_deadline(100, 0), ApicEffects::default());
}

#[test]
fn extreme_values_do_not_overflow() {
    let mut apic = LocalApic::new(0, true, u32::MAX);
    write(&mut apic, SVR, 0x1FF);
    write(&mut apic, LVT_TIMER, PERIODIC | 0xEC);
    write(&mut apic, DIVIDE_CONFIG, 0xA);
    write_at(&mut apic, INITIAL_COUNT, u32::MAX, 0);
    // ceil((2^32 - 1) * 128 ns * (2^32 - 1) kHz / 10^6).
    assert_eq!(apic.timer_deadline(), Some(2_361_183_240_335_311));
    assert_eq!(read_at(&mut apic, CURRENT_COUNT, 0), u32::MAX);
    // Anchored near the end of the TSC range, the deadline saturates.
    write_at(&mut apic, INITIAL_COUNT, u32::MAX, u64::MAX - 10);
    assert_eq!(apic.timer_deadline(), Some(u64::MAX));
    assert!(apic.timer_expired(u64::MAX).timer_changed);
    // A zero TSC rate is taken as 1 kHz rather than dividing by zero.
    let mut slow = LocalApic::new(0, true, 0);
    write(&mut slow, SVR, 0x1FF);
    write(&mut slow, DIVIDE_CONFIG, 0xB);
    write_at(&mut slow, INITIAL_COUNT, 1_000_000, 0);
    assert_eq!(slow.timer_deadline(), Some(1));
}
