//! The VM's kvmclock and guest TSC, for the `clock` crate: `KVM_GET_CLOCK`/`KVM_SET_CLOCK` on
//! the VM and `KVM_VCPU_TSC_OFFSET` on every vCPU (local or not).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use clock::{ClockError, ClockReading, GuestTsc, TscControl, VmClock};
use kvm_bindings::{
    kvm_clock_data, kvm_device_attr, KVM_CLOCK_HOST_TSC, KVM_CLOCK_REALTIME, KVM_VCPU_TSC_CTRL,
    KVM_VCPU_TSC_OFFSET,
};
use kvm_ioctls::{Cap, VmFd};
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref};

use super::ioctl_numbers::{KVM_GET_DEVICE_ATTR, KVM_HAS_DEVICE_ATTR, KVM_SET_DEVICE_ATTR};
use super::Hypervisor;

/// Why the guest TSC cannot be moved on kvm_pvm (HOST.md).
pub const PVM_TSC_REASON: &str =
    "this host (kvm_pvm) cannot offset or scale the guest TSC, its guest TSC is the host TSC";

/// A VM's clock and its vCPUs' TSC offsets.
pub struct KvmClock {
    pub(super) vm: Arc<VmFd>,
    /// Every vCPU of the VM (duplicates of their fds; the VMM drops the non-local ones).
    pub(super) vcpus: Arc<Mutex<Vec<File>>>,
}

fn kvm_err(what: &'static str, e: impl std::fmt::Display) -> ClockError {
    ClockError::Kvm {
        what,
        detail: e.to_string(),
    }
}

/// The TSC offset attribute of one vCPU, with `value` as its buffer.
fn tsc_offset_attr(value: &mut u64) -> kvm_device_attr {
    kvm_device_attr {
        flags: 0,
        group: KVM_VCPU_TSC_CTRL,
        attr: u64::from(KVM_VCPU_TSC_OFFSET),
        addr: value as *mut u64 as u64,
    }
}

impl KvmClock {
    fn vcpus(&self) -> std::sync::MutexGuard<'_, Vec<File>> {
        self.vcpus.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The guest TSC offset of vCPU `fd` (`None` if this KVM has no `KVM_VCPU_TSC_OFFSET`).
    fn tsc_offset(fd: &File) -> Option<i64> {
        let mut value = 0u64;
        let attr = tsc_offset_attr(&mut value);
        // SAFETY: `fd` is a vCPU fd; KVM_HAS_DEVICE_ATTR only reads the attribute descriptor.
        if unsafe { ioctl_with_ref(fd, KVM_HAS_DEVICE_ATTR(), &attr) } != 0 {
            return None;
        }
        let mut attr = attr;
        // SAFETY: as above; KVM_GET_DEVICE_ATTR writes 8 bytes to `addr`, which points at
        // `value`, alive and unaliased for the call.
        if unsafe { ioctl_with_mut_ref(fd, KVM_GET_DEVICE_ATTR(), &mut attr) } != 0 {
            return None;
        }
        Some(crate::convert::i64_of_bits(value))
    }
}

impl VmClock for KvmClock {
    fn get(&self) -> Result<ClockReading, ClockError> {
        let data = self
            .vm
            .get_clock()
            .map_err(|e| kvm_err("KVM_GET_CLOCK", e))?;
        let host_tsc = if data.flags & KVM_CLOCK_HOST_TSC != 0 {
            data.host_tsc
        } else {
            crate::tsc::host_now()
        };
        Ok(ClockReading {
            clock_ns: data.clock,
            flags: data.flags,
            realtime_ns: data.realtime,
            host_tsc,
        })
    }

    fn set(&self, clock_ns: u64, at_realtime: Option<u64>) -> Result<(), ClockError> {
        let data = kvm_clock_data {
            clock: clock_ns,
            flags: if at_realtime.is_some() {
                KVM_CLOCK_REALTIME
            } else {
                0
            },
            realtime: at_realtime.unwrap_or(0),
            ..Default::default()
        };
        self.vm
            .set_clock(&data)
            .map_err(|e| kvm_err("KVM_SET_CLOCK", e))
    }

    fn can_set_at_realtime(&self) -> bool {
        let flags = self.vm.check_extension_int(Cap::AdjustClock);
        u32::try_from(flags).is_ok_and(|flags| flags & KVM_CLOCK_REALTIME != 0)
    }
}

impl GuestTsc for KvmClock {
    fn control(&self) -> TscControl {
        if Hypervisor::is_pvm_host() {
            return TscControl::Fixed {
                reason: PVM_TSC_REASON.into(),
            };
        }
        let vcpus = self.vcpus();
        let Some(first) = vcpus.first() else {
            return TscControl::Fixed {
                reason: "this VM has no vCPU to read a TSC offset from".into(),
            };
        };
        match Self::tsc_offset(first) {
            Some(offset) => TscControl::Offset { offset },
            None => TscControl::Fixed {
                reason: "this KVM has no KVM_VCPU_TSC_OFFSET (Linux 5.16 or later has it), \
                         so spanvm cannot offset the guest TSC"
                    .into(),
            },
        }
    }

    fn set_offset(&self, offset: i64) -> Result<(), ClockError> {
        // The same offset on every vCPU of the VM, so that KVM still sees matched TSCs and
        // keeps its stable master clock (KVM_CLOCK_TSC_STABLE).
        for (i, fd) in self.vcpus().iter().enumerate() {
            let mut value = crate::convert::bits_of_i64(offset);
            let attr = tsc_offset_attr(&mut value);
            // SAFETY: `fd` is a vCPU fd; KVM_SET_DEVICE_ATTR reads the descriptor and 8 bytes at
            // `addr`, which points at `value`, alive for the call.
            if unsafe { ioctl_with_ref(fd, KVM_SET_DEVICE_ATTR(), &attr) } != 0 {
                return Err(kvm_err(
                    "KVM_SET_DEVICE_ATTR(KVM_VCPU_TSC_OFFSET)",
                    format!("vCPU {i}: {}", std::io::Error::last_os_error()),
                ));
            }
        }
        crate::tsc::set_guest_offset(offset);
        Ok(())
    }
}

impl std::fmt::Debug for KvmClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmClock")
            .field("vm", &self.vm.as_raw_fd())
            .field("vcpus", &self.vcpus().len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vm_clock_reads_sets_and_reports_what_the_host_allows() {
        let hv = Hypervisor::open().expect("these tests need KVM");
        let vm = hv.create_vm().unwrap();
        let _vcpus: Vec<_> = (0..2).map(|i| vm.create_vcpu(i).unwrap()).collect();
        let clock = vm.clock();
        assert_eq!(clock.vcpus().len(), 2);
        let a = clock.get().unwrap();
        let b = clock.get().unwrap();
        assert!(b.clock_ns >= a.clock_ns && b.host_tsc >= a.host_tsc);
        // Ten seconds ahead, as of now.
        let now = clock.get().unwrap();
        let target = now.clock_ns + 10_000_000_000;
        let at = if clock.can_set_at_realtime() {
            now.realtime()
        } else {
            None
        };
        clock.set(target, at).unwrap();
        let after = clock.get().unwrap();
        assert!(
            after.clock_ns >= target && after.clock_ns < target + 1_000_000_000,
            "set {target}, read {}",
            after.clock_ns
        );
        match clock.control() {
            TscControl::Fixed { reason } => {
                assert!(Hypervisor::is_pvm_host() || reason.contains("KVM_VCPU_TSC_OFFSET"))
            }
            TscControl::Offset { offset } => {
                assert!(!Hypervisor::is_pvm_host());
                clock.set_offset(offset).unwrap();
                assert_eq!(clock.control(), TscControl::Offset { offset });
                crate::tsc::set_guest_offset(0);
            }
        }
    }
}
