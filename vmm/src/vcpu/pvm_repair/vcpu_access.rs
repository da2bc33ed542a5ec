//! The vCPU as the repair sees it: its registers (read once, written back once), its segment
//! registers (read only when needed), guest-virtual memory through `KVM_TRANSLATE`, MSRs, and
//! exception injection.

use kvm_bindings::{kvm_msr_entry, kvm_regs, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;

use super::decode::MAX_INSTRUCTION_LEN;
use super::RepairError;
use crate::memory::GuestMemory;

const PAGE_SIZE: u64 = 4096;
const EFER_LMA: u64 = 1 << 10;

/// Read access to guest-physical memory, which the VMM provides.
pub trait GuestMemoryAccess {
    /// Copies guest-physical `gpa..gpa + out.len()` into `out`; false if any of it is not
    /// guest RAM.
    fn read_phys(&self, gpa: u64, out: &mut [u8]) -> bool;
}

impl GuestMemoryAccess for GuestMemory {
    fn read_phys(&self, gpa: u64, out: &mut [u8]) -> bool {
        self.read(gpa, out).is_ok()
    }
}

/// Up to 15 instruction bytes, as KVM reported them or as read from guest memory.
#[derive(Debug, Clone, Copy, Default)]
pub struct InstructionBytes {
    bytes: [u8; MAX_INSTRUCTION_LEN],
    len: usize,
}

impl InstructionBytes {
    /// The first `min(len, 15)` bytes of `bytes`.
    pub fn new(bytes: &[u8]) -> Self {
        let len = bytes.len().min(MAX_INSTRUCTION_LEN);
        let mut out = Self {
            len,
            ..Self::default()
        };
        out.bytes[..len].copy_from_slice(&bytes[..len]);
        out
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    /// Whether all 15 bytes are there.
    pub fn is_complete(&self) -> bool {
        self.len == MAX_INSTRUCTION_LEN
    }

    /// `0f 01 ca ...`, for messages.
    pub fn hex(&self) -> String {
        if self.len == 0 {
            return "none".into();
        }
        self.as_slice()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

pub(super) fn kvm_error(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RepairError {
    move |source| RepairError::Kvm { what, source }
}

/// A vCPU stopped on an emulation failure, with its registers.
pub struct Cpu<'a> {
    vcpu: &'a VcpuFd,
    mem: &'a dyn GuestMemoryAccess,
    /// General registers; written back by [`Cpu::commit_regs`].
    pub regs: kvm_regs,
    sregs: Option<kvm_sregs>,
    /// The instruction bytes known so far, for messages.
    pub bytes: InstructionBytes,
}

impl<'a> Cpu<'a> {
    /// Reads the general registers of `vcpu`.
    pub fn new(vcpu: &'a VcpuFd, mem: &'a dyn GuestMemoryAccess) -> Result<Self, RepairError> {
        Ok(Self {
            vcpu,
            mem,
            regs: vcpu.get_regs().map_err(kvm_error("KVM_GET_REGS"))?,
            sregs: None,
            bytes: InstructionBytes::default(),
        })
    }

    /// The RIP of the failed instruction (until the repair moves it).
    pub fn rip(&self) -> u64 {
        self.regs.rip
    }

    /// The segment registers, read from KVM on first use.
    pub fn sregs(&mut self) -> Result<&mut kvm_sregs, RepairError> {
        let sregs = match self.sregs {
            Some(s) => s,
            None => self.vcpu.get_sregs().map_err(kvm_error("KVM_GET_SREGS"))?,
        };
        Ok(self.sregs.insert(sregs))
    }

    /// Whether the vCPU is in 64-bit mode (long mode with a 64-bit code segment).
    pub fn in_64_bit_mode(&mut self) -> Result<bool, RepairError> {
        let s = self.sregs()?;
        Ok(s.efer & EFER_LMA != 0 && s.cs.l == 1)
    }

    /// The current privilege level (CS.RPL, which the processor keeps equal to CPL).
    pub fn cpl(&mut self) -> Result<u8, RepairError> {
        Ok((self.sregs()?.cs.selector & 3) as u8)
    }

    /// Writes the general registers back.
    pub fn commit_regs(&self) -> Result<(), RepairError> {
        self.vcpu
            .set_regs(&self.regs)
            .map_err(kvm_error("KVM_SET_REGS"))
    }

    /// Writes the segment registers back (if they were read).
    pub fn commit_sregs(&self) -> Result<(), RepairError> {
        match &self.sregs {
            Some(s) => self.vcpu.set_sregs(s).map_err(kvm_error("KVM_SET_SREGS")),
            None => Ok(()),
        }
    }

    /// Reads guest-virtual `gva..` into `out` page by page, stopping at the first page that is
    /// not mapped or not RAM; returns how many bytes it read.
    pub fn read_virtual_prefix(&self, gva: u64, out: &mut [u8]) -> Result<usize, RepairError> {
        let mut done = 0;
        while done < out.len() {
            let address = gva.wrapping_add(done as u64);
            let in_page = crate::convert::usize_from(PAGE_SIZE - (address % PAGE_SIZE));
            let n = in_page.min(out.len() - done);
            let translation = self
                .vcpu
                .translate_gva(address)
                .map_err(kvm_error("KVM_TRANSLATE"))?;
            if translation.valid == 0
                || !self
                    .mem
                    .read_phys(translation.physical_address, &mut out[done..done + n])
            {
                break;
            }
            done += n;
        }
        Ok(done)
    }

    /// Reads all of guest-virtual `gva..gva + out.len()`; false if some of it is not mapped to
    /// RAM.
    pub fn read_virtual(&self, gva: u64, out: &mut [u8]) -> Result<bool, RepairError> {
        Ok(self.read_virtual_prefix(gva, out)? == out.len())
    }

    /// Like [`read_virtual`](Self::read_virtual), but unreadable memory is an error naming
    /// `what` (a memory operand the instruction cannot do without).
    pub fn read_operand(
        &self,
        what: &'static str,
        gva: u64,
        out: &mut [u8],
    ) -> Result<(), RepairError> {
        if self.read_virtual(gva, out)? {
            Ok(())
        } else {
            Err(RepairError::Unreadable {
                what,
                rip: self.rip(),
                bytes: self.bytes.hex(),
                address: gva,
            })
        }
    }

    /// Reads MSRs.
    pub fn read_msrs<const N: usize>(&self, indices: [u32; N]) -> Result<[u64; N], RepairError> {
        let entries = indices.map(|index| kvm_msr_entry {
            index,
            ..Default::default()
        });
        let unavailable = |i: usize| RepairError::Msr {
            access: "read",
            msr: indices[i],
            rip: self.rip(),
        };
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| unavailable(0))?;
        let n = self
            .vcpu
            .get_msrs(&mut msrs)
            .map_err(kvm_error("KVM_GET_MSRS"))?;
        if n < N {
            return Err(unavailable(n));
        }
        let mut out = [0u64; N];
        for (o, e) in out.iter_mut().zip(msrs.as_slice()) {
            *o = e.data;
        }
        Ok(out)
    }

    /// Writes one MSR.
    pub fn write_msr(&self, index: u32, data: u64) -> Result<(), RepairError> {
        let refused = || RepairError::Msr {
            access: "write",
            msr: index,
            rip: self.rip(),
        };
        let msrs = Msrs::from_entries(&[kvm_msr_entry {
            index,
            data,
            ..Default::default()
        }])
        .map_err(|_| refused())?;
        let n = self
            .vcpu
            .set_msrs(&msrs)
            .map_err(kvm_error("KVM_SET_MSRS"))?;
        if n != 1 {
            return Err(refused());
        }
        Ok(())
    }

    /// Injects exception `vector` (with `error_code` if it has one) for delivery at the next
    /// entry. For a fault RIP must still point at the instruction; for a trap (#BP) past it.
    pub fn inject_exception(&self, vector: u8, error_code: Option<u32>) -> Result<(), RepairError> {
        let mut events = self
            .vcpu
            .get_vcpu_events()
            .map_err(kvm_error("KVM_GET_VCPU_EVENTS"))?;
        events.exception.injected = 1;
        events.exception.pending = 0;
        events.exception.nr = vector;
        events.exception.has_error_code = u8::from(error_code.is_some());
        events.exception.error_code = error_code.unwrap_or(0);
        events.exception_has_payload = 0;
        events.exception_payload = 0;
        self.vcpu
            .set_vcpu_events(&events)
            .map_err(kvm_error("KVM_SET_VCPU_EVENTS"))
    }

    /// The x87 status word.
    pub fn fpu_status(&self) -> Result<u16, RepairError> {
        Ok(self.vcpu.get_fpu().map_err(kvm_error("KVM_GET_FPU"))?.fsw)
    }
}
