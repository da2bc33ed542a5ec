//! The KVM side of a node, kept behind a small surface: open the device, create the VM with no
//! in-kernel irqchip, register guest memory, ask for user-space MSR exits, create vCPUs, and the
//! few ioctls kvm-ioctls does not wrap. Nothing outside `vmm` sees KVM types.

pub mod cpuid;
pub mod kvm_clock;

use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_enable_cap, kvm_interrupt, kvm_userspace_memory_region, KVM_CAP_X86_USER_SPACE_MSR,
};
use kvm_ioctls::{
    Cap, Kvm, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VcpuFd, VmFd,
};
use vmm_sys_util::ioctl::ioctl_with_ref;

/// MSRs that KVM would silently swallow without an in-kernel local APIC, so they are filtered
/// to exit to user space: IA32_APIC_BASE (x2APIC enable) and IA32_TSC_DEADLINE.
pub const MSR_APIC_BASE: u32 = 0x1b;
/// IA32_TSC_DEADLINE, the local APIC timer deadline, filtered for the same reason as
/// [`MSR_APIC_BASE`].
pub const MSR_TSC_DEADLINE: u32 = 0x6e0;

/// KVM's paravirtual MSRs that spanvm refuses (denied in the MSR filter, so they exit to user
/// space instead of reaching KVM): `MSR_KVM_ASYNC_PF_EN` (0x4b564d02), `MSR_KVM_STEAL_TIME`
/// (..03), `MSR_KVM_PV_EOI_EN` (..04), `MSR_KVM_POLL_CONTROL` (..05), `MSR_KVM_ASYNC_PF_INT`
/// (..06) and `MSR_KVM_ASYNC_PF_ACK` (..07). Each makes KVM write a per-CPU guest page on its
/// own (steal time on every entry, async page faults, PV EOI), which on a distributed guest is
/// a DSM page pulled to whichever node runs the vCPU, or needs an in-kernel local APIC. The
/// kvmclock MSRs (0x4b564d00/01, 0x11/0x12) stay with KVM. Where the guest's CPUID can be set
/// the features are not offered at all ([`cpuid`]); on kvm_pvm, where it cannot, the Linux
/// guest also gets kernel parameters that keep it from trying
/// (`crate::vcpu::pvm_repair::PVM_KERNEL_PARAMS`).
pub const REFUSED_PV_MSRS: std::ops::RangeInclusive<u32> = 0x4b56_4d02..=0x4b56_4d07;

const KVMIO: u32 = 0xAE;

/// ioctl numbers kvm-ioctls has no wrapper for. The macro makes `pub fn`s; a private module
/// keeps them out of the crate's API.
mod ioctl_numbers {
    use kvm_bindings::{kvm_device_attr, kvm_interrupt};
    use vmm_sys_util::ioctl_iow_nr;

    use super::KVMIO;

    ioctl_iow_nr!(KVM_INTERRUPT, KVMIO, 0x86, kvm_interrupt);
    ioctl_iow_nr!(KVM_SET_DEVICE_ATTR, KVMIO, 0xe1, kvm_device_attr);
    ioctl_iow_nr!(KVM_GET_DEVICE_ATTR, KVMIO, 0xe2, kvm_device_attr);
    ioctl_iow_nr!(KVM_HAS_DEVICE_ATTR, KVMIO, 0xe3, kvm_device_attr);
}
use ioctl_numbers::KVM_INTERRUPT;

const KVM_MSR_EXIT_REASON_INVAL: u64 = 1 << 0;
const KVM_MSR_EXIT_REASON_UNKNOWN: u64 = 1 << 1;
const KVM_MSR_EXIT_REASON_FILTER: u64 = 1 << 2;

/// Errors of the KVM layer.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    /// The KVM device node could not be opened.
    #[error("cannot open the KVM device {path}: {source} (is KVM available on this host and do you have access to it? SPANVM_KVM_DEVICE overrides the path)")]
    Open {
        /// The device node, /dev/kvm unless SPANVM_KVM_DEVICE says otherwise.
        path: PathBuf,
        /// Why opening it failed.
        source: kvm_ioctls::Error,
    },
    /// A capability spanvm cannot work without.
    #[error("this KVM lacks {0}, which spanvm needs")]
    MissingCapability(&'static str),
    /// An ioctl failed.
    #[error("KVM {what} failed: {source}")]
    Ioctl {
        /// The operation, e.g. "KVM_CREATE_VCPU".
        what: &'static str,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
}

fn ioctl_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> HypervisorError {
    move |source| HypervisorError::Ioctl { what, source }
}

/// The path of the KVM device: `/dev/kvm`, or `$SPANVM_KVM_DEVICE`.
pub fn kvm_device_path() -> PathBuf {
    std::env::var_os("SPANVM_KVM_DEVICE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/dev/kvm"))
}

/// An open KVM device.
pub struct Hypervisor {
    kvm: Kvm,
}

impl Hypervisor {
    /// Opens the KVM device named by [`kvm_device_path`].
    pub fn open() -> Result<Self, HypervisorError> {
        let path = kvm_device_path();
        let c_path =
            CString::new(path.as_os_str().as_bytes()).map_err(|_| HypervisorError::Open {
                path: path.clone(),
                source: kvm_ioctls::Error::new(libc::EINVAL),
            })?;
        let kvm =
            Kvm::new_with_path(&c_path).map_err(|source| HypervisorError::Open { path, source })?;
        Ok(Self { kvm })
    }

    /// Whether this host's KVM is `kvm_pvm` (guest CPL0 emulated; see HOST.md).
    pub fn is_pvm_host() -> bool {
        std::path::Path::new("/sys/module/kvm_pvm").exists()
    }

    /// Creates a VM for spanvm: no in-kernel irqchip (so every IPI and APIC access reaches user
    /// space), user-space exits for x2APIC MSRs (INVAL), unknown MSRs, and the filtered ones.
    pub fn create_vm(&self) -> Result<KvmVm, HypervisorError> {
        for (cap, name) in [
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
            (Cap::X86UserSpaceMsr, "KVM_CAP_X86_USER_SPACE_MSR"),
            (Cap::X86MsrFilter, "KVM_CAP_X86_MSR_FILTER"),
        ] {
            if !self.kvm.check_extension(cap) {
                return Err(HypervisorError::MissingCapability(name));
            }
        }
        let vm = self.kvm.create_vm().map_err(ioctl_err("KVM_CREATE_VM"))?;
        let cap = kvm_enable_cap {
            cap: KVM_CAP_X86_USER_SPACE_MSR,
            args: [
                KVM_MSR_EXIT_REASON_INVAL
                    | KVM_MSR_EXIT_REASON_UNKNOWN
                    | KVM_MSR_EXIT_REASON_FILTER,
                0,
                0,
                0,
            ],
            ..Default::default()
        };
        vm.enable_cap(&cap)
            .map_err(ioctl_err("enabling user-space MSR exits"))?;
        // One bit per MSR, 0 = deny = exit to user space.
        let deny_one = [0u8; 1];
        let deny_pv = [0u8; 1];
        let ranges = [
            MsrFilterRange {
                flags: MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE,
                base: MSR_APIC_BASE,
                msr_count: 1,
                bitmap: &deny_one,
            },
            MsrFilterRange {
                flags: MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE,
                base: MSR_TSC_DEADLINE,
                msr_count: 1,
                bitmap: &deny_one,
            },
            MsrFilterRange {
                flags: MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE,
                base: *REFUSED_PV_MSRS.start(),
                msr_count: REFUSED_PV_MSRS.end() - REFUSED_PV_MSRS.start() + 1,
                bitmap: &deny_pv,
            },
        ];
        vm.set_msr_filter(MsrFilterDefaultAction::ALLOW, &ranges)
            .map_err(ioctl_err("KVM_X86_SET_MSR_FILTER"))?;
        // Needed on VT-x hosts for real-mode guests (the AP trampoline); harmless elsewhere.
        vm.set_tss_address(0xfffb_d000)
            .map_err(ioctl_err("KVM_SET_TSS_ADDR"))?;
        let cpuid = self
            .kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl_err("KVM_GET_SUPPORTED_CPUID"))?;
        Ok(KvmVm {
            vm: Arc::new(vm),
            cpuid,
            vcpus: Arc::new(Mutex::new(Vec::new())),
        })
    }
}

/// A KVM VM with no in-kernel irqchip.
pub struct KvmVm {
    vm: Arc<VmFd>,
    cpuid: kvm_bindings::CpuId,
    /// A duplicate of every vCPU's fd, local or not: the TSC offset goes on all of them.
    vcpus: Arc<Mutex<Vec<File>>>,
}

impl KvmVm {
    /// Registers `size` bytes at host address `host` as guest-physical `gpa` in memory slot
    /// `slot`.
    ///
    /// # Safety
    /// `host..host+size` must be a mapping that outlives the VM and that nothing else unmaps.
    pub unsafe fn add_memory(
        &self,
        slot: u32,
        gpa: u64,
        size: u64,
        host: u64,
    ) -> Result<(), HypervisorError> {
        let region = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: host,
            flags: 0,
        };
        // SAFETY: the caller guarantees the mapping stays valid for the VM's lifetime.
        unsafe { self.vm.set_user_memory_region(region) }
            .map_err(ioctl_err("KVM_SET_USER_MEMORY_REGION"))
    }

    /// Creates vCPU `index` (its APIC ID is its index) with its CPUID set up.
    pub fn create_vcpu(&self, index: u32) -> Result<VcpuFd, HypervisorError> {
        let vcpu = self
            .vm
            .create_vcpu(u64::from(index))
            .map_err(ioctl_err("KVM_CREATE_VCPU"))?;
        let cpuid = cpuid::for_vcpu(&self.cpuid, index);
        vcpu.set_cpuid2(&cpuid)
            .map_err(ioctl_err("KVM_SET_CPUID2"))?;
        // SAFETY: `vcpu` owns a valid open fd for the duration of this borrow.
        let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(vcpu.as_raw_fd()) };
        let dup = borrowed
            .try_clone_to_owned()
            .map_err(|e| HypervisorError::Ioctl {
                what: "duplicating a vCPU fd",
                source: kvm_ioctls::Error::new(e.raw_os_error().unwrap_or(libc::EBADF)),
            })?;
        self.vcpus
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(File::from(dup));
        Ok(vcpu)
    }

    /// The VM's kvmclock and guest TSC, for clock synchronisation (see the `clock` crate);
    /// covers the vCPUs created so far.
    pub fn clock(&self) -> kvm_clock::KvmClock {
        kvm_clock::KvmClock {
            vm: self.vm.clone(),
            vcpus: self.vcpus.clone(),
        }
    }
}

/// Queues external interrupt `vector` for injection at the next entry (`KVM_INTERRUPT`; valid
/// only without an in-kernel irqchip and when the vCPU is ready for injection).
pub fn inject_interrupt(vcpu: &VcpuFd, vector: u8) -> Result<(), HypervisorError> {
    let irq = kvm_interrupt {
        irq: u32::from(vector),
    };
    // SAFETY: `vcpu` is a valid vCPU fd and KVM_INTERRUPT reads exactly one kvm_interrupt.
    let ret = unsafe { ioctl_with_ref(vcpu, KVM_INTERRUPT(), &irq) };
    if ret < 0 {
        return Err(HypervisorError::Ioctl {
            what: "KVM_INTERRUPT",
            source: kvm_ioctls::Error::last(),
        });
    }
    Ok(())
}
