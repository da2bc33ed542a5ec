//! The CPUID each vCPU sees. On VT-x hosts this is what the guest reads; on `kvm_pvm` the guest
//! sees the host's CPUID whatever we set (HOST.md), which is why the platform supports x2APIC
//! and TSC-deadline in any case, and why KVM's paravirtual MSRs are also refused in the MSR
//! filter there ([`super::REFUSED_PV_MSRS`]).

use kvm_bindings::CpuId;

const LEAF_FEATURES: u32 = 1;
const LEAF_X2APIC_TOPOLOGY: u32 = 0xb;
const LEAF_V2_TOPOLOGY: u32 = 0x1f;
const ECX_X2APIC: u32 = 1 << 21;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_HYPERVISOR: u32 = 1 << 31;

/// KVM's paravirtual feature leaf (`KVM_CPUID_FEATURES`): EAX features, EDX hints.
pub const LEAF_KVM_FEATURES: u32 = 0x4000_0001;
const KVM_FEATURE_ASYNC_PF: u32 = 1 << 4;
const KVM_FEATURE_STEAL_TIME: u32 = 1 << 5;
const KVM_FEATURE_PV_EOI: u32 = 1 << 6;
const KVM_FEATURE_PV_UNHALT: u32 = 1 << 7;
const KVM_FEATURE_PV_TLB_FLUSH: u32 = 1 << 9;
const KVM_FEATURE_ASYNC_PF_VMEXIT: u32 = 1 << 10;
const KVM_FEATURE_PV_SEND_IPI: u32 = 1 << 11;
const KVM_FEATURE_POLL_CONTROL: u32 = 1 << 12;
const KVM_FEATURE_PV_SCHED_YIELD: u32 = 1 << 13;
const KVM_FEATURE_ASYNC_PF_INT: u32 = 1 << 14;
const KVM_HINTS_REALTIME: u32 = 1 << 0;

/// The KVM paravirtual features a spanvm guest is not offered:
/// * serviced by KVM itself, so they bypass the user-space APIC and never reach another node:
///   PV send-IPI (a hypercall to KVM's APIC), PV TLB flush and PV sched-yield (they skip the
///   flush IPI or yield through KVM, based on steal time), PV unhalt (PV spinlock kicks by
///   hypercall);
/// * making KVM write a per-CPU guest page on its own: steal time (every entry), PV EOI,
///   async page faults (all three delivery forms), poll control.
///
/// kvmclock (`CLOCKSOURCE`, `CLOCKSOURCE2`, `CLOCKSOURCE_STABLE_BIT`) and the harmless ones
/// (`NOP_IO_DELAY`, ...) stay.
pub const HIDDEN_KVM_FEATURES: u32 = KVM_FEATURE_ASYNC_PF
    | KVM_FEATURE_STEAL_TIME
    | KVM_FEATURE_PV_EOI
    | KVM_FEATURE_PV_UNHALT
    | KVM_FEATURE_PV_TLB_FLUSH
    | KVM_FEATURE_ASYNC_PF_VMEXIT
    | KVM_FEATURE_PV_SEND_IPI
    | KVM_FEATURE_POLL_CONTROL
    | KVM_FEATURE_PV_SCHED_YIELD
    | KVM_FEATURE_ASYNC_PF_INT;

/// KVM's supported CPUID with this vCPU's APIC ID filled in, the features our user-space
/// APIC provides announced, and the KVM paravirtual features spanvm cannot allow hidden.
pub fn for_vcpu(supported: &CpuId, apic_id: u32) -> CpuId {
    let mut cpuid = supported.clone();
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            LEAF_FEATURES => {
                entry.ebx = (entry.ebx & 0x00ff_ffff) | ((apic_id & 0xff) << 24);
                entry.ecx |= ECX_X2APIC | ECX_TSC_DEADLINE | ECX_HYPERVISOR;
            }
            LEAF_X2APIC_TOPOLOGY | LEAF_V2_TOPOLOGY => entry.edx = apic_id,
            LEAF_KVM_FEATURES => {
                entry.eax &= !HIDDEN_KVM_FEATURES;
                // "Realtime" hints that vCPUs never get preempted; not across nodes.
                entry.edx &= !KVM_HINTS_REALTIME;
            }
            _ => {}
        }
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn kvm_pv_features_are_hidden_and_kvmclock_stays() {
        // What this development host's KVM offers (0x01007efb).
        let entry = kvm_cpuid_entry2 {
            function: LEAF_KVM_FEATURES,
            eax: 0x0100_7efb,
            edx: KVM_HINTS_REALTIME,
            ..Default::default()
        };
        let supported = CpuId::from_entries(&[entry]).unwrap();
        let out = for_vcpu(&supported, 3);
        let e = out.as_slice()[0];
        // CLOCKSOURCE, NOP_IO_DELAY, CLOCKSOURCE2 and CLOCKSOURCE_STABLE_BIT only.
        assert_eq!(e.eax, (1 << 0) | (1 << 1) | (1 << 3) | (1 << 24));
        assert_eq!(e.edx, 0);
    }
}
