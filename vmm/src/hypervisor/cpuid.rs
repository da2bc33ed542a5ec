//! The CPUID each vCPU sees. On VT-x hosts this is what the guest reads; on `kvm_pvm` the guest
//! sees the host's CPUID whatever we set (HOST.md), which is why the platform supports x2APIC
//! and TSC-deadline in any case.

use kvm_bindings::CpuId;

const LEAF_FEATURES: u32 = 1;
const LEAF_X2APIC_TOPOLOGY: u32 = 0xb;
const LEAF_V2_TOPOLOGY: u32 = 0x1f;
const ECX_X2APIC: u32 = 1 << 21;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_HYPERVISOR: u32 = 1 << 31;

/// KVM's supported CPUID with this vCPU's APIC ID filled in and the features our user-space
/// APIC provides announced.
pub fn for_vcpu(supported: &CpuId, apic_id: u32) -> CpuId {
    let mut cpuid = supported.clone();
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            LEAF_FEATURES => {
                entry.ebx = (entry.ebx & 0x00ff_ffff) | ((apic_id & 0xff) << 24);
                entry.ecx |= ECX_X2APIC | ECX_TSC_DEADLINE | ECX_HYPERVISOR;
            }
            LEAF_X2APIC_TOPOLOGY | LEAF_V2_TOPOLOGY => entry.edx = apic_id,
            _ => {}
        }
    }
    cpuid
}
