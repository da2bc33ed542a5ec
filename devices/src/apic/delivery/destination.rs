//! Which local APICs a message reaches (SDM 10.6.2), computed from the addressing replicas.
//!
//! Destination format: a message sent by an x2APIC-mode APIC carries a 32-bit destination
//! (broadcast 0xFFFF_FFFF); one sent by an xAPIC-mode APIC, the IOAPIC or an MSI carries an
//! xAPIC-format destination whose broadcast is 0xFF, also towards x2APIC-mode targets (KVM
//! does the same, so an IOAPIC pin programmed for "all CPUs" keeps working after the guest
//! switches to x2APIC). An xAPIC-mode target never matches a destination wider than 8 bits
//! except the broadcast.

use crate::interrupt::{
    ApicAddressing, DeliveryMode, DestinationMode, InterruptMessage, Shorthand,
};

const XAPIC_BROADCAST: u32 = 0xFF;
const X2APIC_BROADCAST: u32 = 0xFFFF_FFFF;
const DFR_MODEL_FLAT: u32 = 0xF;
const DFR_MODEL_CLUSTER: u32 = 0x0;

/// Whether `target`, in its current state, takes a message of this delivery mode at all.
/// A software-disabled APIC still takes NMI, SMI, INIT and SIPI (SDM 10.4.7.2).
fn takes_delivery_mode(delivery: DeliveryMode, target: &ApicAddressing) -> bool {
    if !target.globally_enabled {
        return false;
    }
    target.enabled
        || matches!(
            delivery,
            DeliveryMode::Nmi | DeliveryMode::Smi | DeliveryMode::Init | DeliveryMode::StartUp
        )
}

/// Whether the destination field of `msg` (shorthand ignored) names `target`.
/// `x2apic_format` is true when the sender was in x2APIC mode (see the module doc).
pub fn destination_matches(
    msg: &InterruptMessage,
    x2apic_format: bool,
    target: &ApicAddressing,
) -> bool {
    let dest = msg.destination;
    let broadcast = if x2apic_format {
        X2APIC_BROADCAST
    } else {
        XAPIC_BROADCAST
    };
    if dest == broadcast {
        return true;
    }
    match msg.dest_mode {
        DestinationMode::Physical => dest == target.apic_id,
        DestinationMode::Logical if target.x2apic => {
            dest >> 16 == target.ldr >> 16 && dest & target.ldr & 0xFFFF != 0
        }
        DestinationMode::Logical => {
            if dest > 0xFF {
                return false;
            }
            let logical_id = target.ldr >> 24;
            match target.dfr >> 28 {
                DFR_MODEL_FLAT => dest & logical_id != 0,
                DFR_MODEL_CLUSTER => dest >> 4 == logical_id >> 4 && dest & logical_id & 0xF != 0,
                // Any other model is undefined (SDM 10.6.2.2): the APIC takes nothing logical.
                _ => false,
            }
        }
    }
}

/// Which vCPUs (by index into `all`) a message reaches; `source` is the sender's index for
/// shorthands and for the destination format (`None` for IOAPIC and MSI messages).
///
/// Lowest priority: the message goes to exactly one of the APICs that would take it, the
/// `vector % n`-th of the `n` candidates in index order. The SDM picks the APIC with the
/// lowest arbitration priority, but the remote TPRs and ISRs are not known on the node that
/// raises the message; a pure function of the message and the replicas gives every node the
/// same answer without exchanging state, and different vectors (different devices) spread over
/// the candidates. KVM's "vector hashing" makes the same choice.
pub fn destination_set(
    msg: &InterruptMessage,
    source: Option<usize>,
    all: &[ApicAddressing],
) -> Vec<usize> {
    let sender_x2apic = source.and_then(|s| all.get(s)).is_some_and(|a| a.x2apic);
    let takes = |target: &ApicAddressing| takes_delivery_mode(msg.delivery, target);
    let mut set: Vec<usize> = match msg.shorthand {
        Shorthand::SelfOnly => source
            .filter(|&s| all.get(s).is_some_and(takes))
            .into_iter()
            .collect(),
        Shorthand::AllIncludingSelf => (0..all.len()).filter(|&i| takes(&all[i])).collect(),
        Shorthand::AllExcludingSelf => (0..all.len())
            .filter(|&i| Some(i) != source && takes(&all[i]))
            .collect(),
        Shorthand::None => (0..all.len())
            .filter(|&i| takes(&all[i]) && destination_matches(msg, sender_x2apic, &all[i]))
            .collect(),
    };
    if msg.delivery == DeliveryMode::LowestPriority && set.len() > 1 {
        let chosen = set[usize::from(msg.vector) % set.len()];
        set.clear();
        set.push(chosen);
    }
    set
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::TriggerMode;

    fn xapic(apic_id: u32, ldr_byte: u32, dfr: u32) -> ApicAddressing {
        ApicAddressing {
            apic_id,
            enabled: true,
            globally_enabled: true,
            x2apic: false,
            ldr: ldr_byte << 24,
            dfr,
        }
    }

    fn x2apic(apic_id: u32) -> ApicAddressing {
        ApicAddressing {
            apic_id,
            enabled: true,
            globally_enabled: true,
            x2apic: true,
            ldr: (apic_id >> 4) << 16 | 1 << (apic_id & 15),
            dfr: 0xFFFF_FFFF,
        }
    }

    fn msg(
        delivery: DeliveryMode,
        dest_mode: DestinationMode,
        destination: u32,
    ) -> InterruptMessage {
        InterruptMessage {
            vector: 0x40,
            delivery,
            dest_mode,
            destination,
            trigger: TriggerMode::Edge,
            level_assert: true,
            shorthand: Shorthand::None,
        }
    }

    fn with_shorthand(shorthand: Shorthand) -> InterruptMessage {
        InterruptMessage {
            shorthand,
            ..msg(DeliveryMode::Fixed, DestinationMode::Physical, 0)
        }
    }

    #[test]
    fn physical_matches_only_the_named_id() {
        let all = [xapic(0, 0, !0), xapic(1, 0, !0), xapic(7, 0, !0)];
        let m = msg(DeliveryMode::Fixed, DestinationMode::Physical, 7);
        assert_eq!(destination_set(&m, None, &all), vec![2]);
        let none = msg(DeliveryMode::Fixed, DestinationMode::Physical, 3);
        assert_eq!(destination_set(&none, None, &all), Vec::<usize>::new());
        // A 32-bit ID never matches an 8-bit xAPIC ID by truncation.
        let wide = msg(DeliveryMode::Fixed, DestinationMode::Physical, 0x107);
        assert_eq!(destination_set(&wide, None, &all), Vec::<usize>::new());
    }

    #[test]
    fn xapic_broadcast_reaches_every_enabled_apic_also_in_x2apic_mode() {
        let all = [xapic(0, 0, !0), x2apic(1), xapic(2, 0, !0)];
        let m = msg(DeliveryMode::Fixed, DestinationMode::Physical, 0xFF);
        assert_eq!(destination_set(&m, None, &all), vec![0, 1, 2]);
        let logical = msg(DeliveryMode::Fixed, DestinationMode::Logical, 0xFF);
        assert_eq!(destination_set(&logical, None, &all), vec![0, 1, 2]);
    }

    #[test]
    fn x2apic_broadcast_is_all_ones_and_0xff_is_an_id_for_x2apic_senders() {
        let mut all: Vec<ApicAddressing> = (0..3).map(x2apic).collect();
        all.push(x2apic(0xFF));
        let broadcast = msg(DeliveryMode::Fixed, DestinationMode::Physical, 0xFFFF_FFFF);
        assert_eq!(destination_set(&broadcast, Some(0), &all), vec![0, 1, 2, 3]);
        let id_ff = msg(DeliveryMode::Fixed, DestinationMode::Physical, 0xFF);
        assert_eq!(destination_set(&id_ff, Some(0), &all), vec![3]);
        let id_300 = msg(DeliveryMode::Fixed, DestinationMode::Physical, 0x300);
        all.push(x2apic(0x300));
        assert_eq!(destination_set(&id_300, Some(1), &all), vec![4]);
    }

    #[test]
    fn flat_logical_matches_any_common_bit() {
        let flat = 0xFFFF_FFFF;
        let all = [
            xapic(0, 0x01, flat),
            xapic(1, 0x02, flat),
            xapic(2, 0x04, flat),
            xapic(3, 0x80, flat),
        ];
        let m = msg(DeliveryMode::Fixed, DestinationMode::Logical, 0x85);
        assert_eq!(destination_set(&m, None, &all), vec![0, 2, 3]);
        let m = msg(DeliveryMode::Fixed, DestinationMode::Logical, 0x02);
        assert_eq!(destination_set(&m, None, &all), vec![1]);
        let m = msg(DeliveryMode::Fixed, DestinationMode::Logical, 0x70);
        assert_eq!(destination_set(&m, None, &all), Vec::<usize>::new());
    }

    #[test]
    fn cluster_logical_needs_same_cluster_and_a_common_member_bit() {
        let cluster = 0x0FFF_FFFF;
        let all = [
            xapic(0, 0x11, cluster),
            xapic(1, 0x12, cluster),
            xapic(2, 0x21, cluster),
            xapic(3, 0x28, cluster),
        ];
        let m = msg(DeliveryMode::Fixed, DestinationMode::Logical, 0x13);
        assert_eq!(destination_set(&m, None, &all), vec![0, 1]);
        let m = msg(DeliveryMode::Fixed, DestinationMode::Logical, 0x29);
        assert_eq!(destination_set(&m, None, &all), vec![2, 3]);
        let m = msg(DeliveryMode::Fixed, DestinationMode::Logical, 0x31);
        assert_eq!(destination_set(&m, None, &all), Vec::<usize>::new());
    }

    #[test]
    fn undefined_dfr_model_takes_no_logical_message() {
        let all = [xapic(0, 0x01, 0x5FFF_FFFF)];
        let m = msg(DeliveryMode::Fixed, DestinationMode::Logical, 0x01);
        assert_eq!(destination_set(&m, None, &all), Vec::<usize>::new());
    }

    #[test]
    fn x2apic_logical_is_cluster_and_bitmap() {
        // IDs 0x00, 0x01, 0x11, 0x1F: LDRs 0x0000_0001, 0x0000_0002, 0x0001_0002, 0x0001_8000.
        let all = [x2apic(0x00), x2apic(0x01), x2apic(0x11), x2apic(0x1F)];
        assert_eq!(all[3].ldr, 0x0001_8000);
        let m = msg(DeliveryMode::Fixed, DestinationMode::Logical, 0x0001_8002);
        assert_eq!(destination_set(&m, Some(0), &all), vec![2, 3]);
        let m = msg(DeliveryMode::Fixed, DestinationMode::Logical, 0x0000_0003);
        assert_eq!(destination_set(&m, Some(0), &all), vec![0, 1]);
        let m = msg(DeliveryMode::Fixed, DestinationMode::Logical, 0x0002_0002);
        assert_eq!(destination_set(&m, Some(0), &all), Vec::<usize>::new());
    }

    #[test]
    fn shorthands_ignore_the_destination_field() {
        let all = [xapic(0, 0, !0), xapic(1, 0, !0), xapic(2, 0, !0)];
        assert_eq!(
            destination_set(&with_shorthand(Shorthand::SelfOnly), Some(1), &all),
            vec![1]
        );
        assert_eq!(
            destination_set(&with_shorthand(Shorthand::AllIncludingSelf), Some(1), &all),
            vec![0, 1, 2]
        );
        assert_eq!(
            destination_set(&with_shorthand(Shorthand::AllExcludingSelf), Some(1), &all),
            vec![0, 2]
        );
        // A shorthand without a sender (not possible from the IOAPIC) reaches no "self".
        assert_eq!(
            destination_set(&with_shorthand(Shorthand::SelfOnly), None, &all),
            Vec::<usize>::new()
        );
        assert_eq!(
            destination_set(&with_shorthand(Shorthand::AllExcludingSelf), None, &all),
            vec![0, 1, 2]
        );
    }

    #[test]
    fn disabled_apics_take_fixed_but_soft_disabled_take_init_sipi_nmi() {
        let mut soft_disabled = xapic(1, 0, !0);
        soft_disabled.enabled = false;
        let mut hard_disabled = xapic(2, 0, !0);
        hard_disabled.enabled = false;
        hard_disabled.globally_enabled = false;
        let all = [xapic(0, 0, !0), soft_disabled, hard_disabled];
        let broadcast = |delivery| msg(delivery, DestinationMode::Physical, 0xFF);
        assert_eq!(
            destination_set(&broadcast(DeliveryMode::Fixed), None, &all),
            vec![0]
        );
        assert_eq!(
            destination_set(&broadcast(DeliveryMode::ExtInt), None, &all),
            vec![0]
        );
        for mode in [
            DeliveryMode::Init,
            DeliveryMode::StartUp,
            DeliveryMode::Nmi,
            DeliveryMode::Smi,
        ] {
            assert_eq!(
                destination_set(&broadcast(mode), None, &all),
                vec![0, 1],
                "{mode:?}"
            );
        }
        let to_soft = msg(DeliveryMode::Fixed, DestinationMode::Physical, 1);
        assert_eq!(destination_set(&to_soft, None, &all), Vec::<usize>::new());
        let init_hard = msg(DeliveryMode::Init, DestinationMode::Physical, 2);
        assert_eq!(destination_set(&init_hard, None, &all), Vec::<usize>::new());
    }

    #[test]
    fn power_on_replica_of_an_ap_takes_init_and_sipi() {
        let all = [xapic(0, 0, !0), ApicAddressing::power_on(1)];
        let init = msg(DeliveryMode::Init, DestinationMode::Physical, 1);
        assert_eq!(destination_set(&init, Some(0), &all), vec![1]);
    }

    #[test]
    fn lowest_priority_picks_exactly_one_by_vector() {
        let all: Vec<ApicAddressing> = (0..4).map(|i| xapic(i, 1 << i, !0)).collect();
        let mut m = msg(DeliveryMode::LowestPriority, DestinationMode::Logical, 0x0E);
        // Candidates are indices 1, 2, 3; vector 0x40 = 64, 64 % 3 = 1 -> index 2.
        assert_eq!(destination_set(&m, None, &all), vec![2]);
        m.vector = 0x41;
        assert_eq!(destination_set(&m, None, &all), vec![3]);
        m.vector = 0x42;
        assert_eq!(destination_set(&m, None, &all), vec![1]);
        // A single candidate is always chosen.
        let single = msg(DeliveryMode::LowestPriority, DestinationMode::Physical, 3);
        assert_eq!(destination_set(&single, None, &all), vec![3]);
        // Broadcast lowest priority is still one APIC.
        let broadcast = msg(
            DeliveryMode::LowestPriority,
            DestinationMode::Physical,
            0xFF,
        );
        assert_eq!(destination_set(&broadcast, None, &all), vec![0]);
    }
}
