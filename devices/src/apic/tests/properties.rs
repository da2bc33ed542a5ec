//! Properties of the timer arithmetic and of message routing over random inputs.

use super::*;
use crate::interrupt::destination_set;
use proptest::prelude::*;

const DIVIDE_CONFIGS: [u32; 8] = [0x0, 0x1, 0x2, 0x3, 0x8, 0x9, 0xA, 0xB];

proptest! {
    /// A one-shot timer is due exactly when the counter reads 0, never a TSC tick early.
    #[test]
    fn one_shot_fires_when_the_count_reaches_zero(
        tsc_khz in 1_000u32..=5_000_000,
        count in 1u32..=1_000_000,
        dcr_index in 0usize..8,
        start in 0u64..1 << 50,
    ) {
        let mut apic = LocalApic::new(0, true, tsc_khz);
        write(&mut apic, SVR, 0x1FF);
        write(&mut apic, DIVIDE_CONFIG, DIVIDE_CONFIGS[dcr_index]);
        write_at(&mut apic, INITIAL_COUNT, count, start);
        let deadline = apic.timer_deadline().unwrap();
        prop_assert!(deadline > start);
        prop_assert!(read_at(&mut apic, CURRENT_COUNT, deadline - 1) >= 1);
        prop_assert_eq!(read_at(&mut apic, CURRENT_COUNT, deadline), 0);
    }

    /// The n-th periodic deadline stays within one TSC tick after the ideal point
    /// start + n * period, however late the VMM handles each expiry.
    #[test]
    fn periodic_deadlines_never_drift(
        tsc_khz in 1_000u32..=5_000_000,
        count in 1u32..=100_000,
        dcr_index in 0usize..8,
        start in 0u64..1 << 50,
        lateness in proptest::collection::vec(0u64..1_000, 1..40),
    ) {
        let mut apic = LocalApic::new(0, true, tsc_khz);
        write(&mut apic, SVR, 0x1FF);
        write(&mut apic, LVT_TIMER, 0x0002_00EC);
        write(&mut apic, DIVIDE_CONFIG, DIVIDE_CONFIGS[dcr_index]);
        write_at(&mut apic, INITIAL_COUNT, count, start);
        let divisor = 1u128 << ((((DIVIDE_CONFIGS[dcr_index] & 8) >> 1 | DIVIDE_CONFIGS[dcr_index] & 3) + 1) & 7);
        let period_ns = u128::from(count) * divisor;
        let mut previous = start;
        let mut n = 1u128;
        for late in lateness {
            let deadline = apic.timer_deadline().unwrap();
            prop_assert!(deadline > previous);
            // Which grid point is next: the VMM may have skipped some by being late.
            let scaled = u128::from(deadline - start) * 1_000_000;
            while (n * period_ns) * u128::from(tsc_khz) <= scaled.saturating_sub(1_000_000) {
                n += 1;
            }
            let ideal = n * period_ns * u128::from(tsc_khz);
            prop_assert!(scaled >= ideal && scaled - ideal < 1_000_000, "n={} off grid", n);
            prop_assert!(apic.timer_expired(deadline + late).timer_changed);
            previous = deadline;
        }
    }

    /// Packing for the wire loses nothing.
    #[test]
    fn packed_messages_round_trip(
        vector: u8, mode in 0u32..8, logical: bool, destination: u32, level: bool,
        assert_bit: bool, shorthand in 0u32..4,
    ) {
        prop_assume!(mode != 3);
        let msg = InterruptMessage {
            vector,
            delivery: DeliveryMode::from_bits(mode).unwrap(),
            dest_mode: if logical { DestinationMode::Logical } else { DestinationMode::Physical },
            destination,
            trigger: if level { TriggerMode::Level } else { TriggerMode::Edge },
            level_assert: assert_bit,
            shorthand: Shorthand::from_bits(shorthand),
        };
        prop_assert_eq!(InterruptMessage::unpack(msg.pack()), Ok(msg));
    }

    /// Lowest priority delivers to exactly one of the APICs a fixed message would reach.
    #[test]
    fn lowest_priority_picks_one_of_the_fixed_set(
        ldrs in proptest::collection::vec(0u32..256, 1..16),
        destination in 0u32..256,
        vector in 16u8..=255,
        cluster: bool,
    ) {
        let dfr = if cluster { 0x0FFF_FFFF } else { 0xFFFF_FFFF };
        let all: Vec<ApicAddressing> = ldrs.iter().enumerate().map(|(i, &ldr)| ApicAddressing {
            apic_id: u32::try_from(i).unwrap(),
            enabled: true,
            globally_enabled: true,
            x2apic: false,
            ldr: ldr << 24,
            dfr,
        }).collect();
        let fixed = InterruptMessage {
            dest_mode: DestinationMode::Logical,
            ..InterruptMessage::fixed(vector, destination)
        };
        let lowest = InterruptMessage { delivery: DeliveryMode::LowestPriority, ..fixed };
        let fixed_set = destination_set(&fixed, None, &all);
        let lowest_set = destination_set(&lowest, None, &all);
        prop_assert_eq!(lowest_set.len(), fixed_set.len().min(1));
        prop_assert!(lowest_set.iter().all(|i| fixed_set.contains(i)));
    }
}
