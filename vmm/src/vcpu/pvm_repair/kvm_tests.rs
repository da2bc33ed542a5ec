//! Tests on a real vCPU; they need KVM and fail without it. Tiny 64-bit guests
//! (`test_guest.S`, assembled when the tests run) execute every repaired instruction at CPL0,
//! which on kvm_pvm is exactly the emulation-failure path, and make system calls from CPL3.
//! The guests check architectural results, so the same tests show on a VT-x host that the
//! instructions run natively there and nothing is repaired.

use crate::arch::{
    MSR_KERNEL_GS_BASE, MSR_LSTAR, MSR_STAR, MSR_SYSCALL_MASK, MSR_TSC_AUX, PTE_ACCESSED,
    PTE_DIRTY, PTE_HUGE, PTE_PRESENT, PTE_USER, PTE_WRITABLE,
};
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use kvm_bindings::{kvm_msr_entry, kvm_regs, kvm_segment, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{VcpuExit, VcpuFd};
use resources::{GuestImage, HomeRange, Layout, NodeSpec, RamRegion, TransportKind};

use super::semantics::{RFLAGS_AC, RFLAGS_CF, RFLAGS_ZF};
use super::*;
use crate::hypervisor::{Hypervisor, KvmVm};
use crate::memory::GuestMemory;

const RAM: u64 = 4 << 20;
const GDT: u64 = 0x500;
const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PD: u64 = 0x3000;
const IDT: u64 = 0x4000;
const TSS: u64 = 0x6000;
const KERNEL_TEXT: u64 = 0x1_0000;
const KERNEL_STACK_TOP: u64 = 0x8_0000;
const USER_TEXT: u64 = 0x20_0000;
const USER_STACK_TOP: u64 = 0x3f_f000;
const KERNEL_CS: u16 = 0x10;
const KERNEL_DS: u16 = 0x18;
const TSS_SELECTOR: u16 = 0x38;
/// SYSCALL CS 0x10 / SS 0x18; SYSRET base 0x23: user CS 0x33, SS 0x2b (as Linux).
const STAR: u64 = 0x0023_0010_0000_0000;
/// IF, TF, DF and AC: CF survives the SYSCALL, so the test can see FMASK applied.
const FMASK: u64 = 0x4_0700;
const TSC_AUX: u64 = 0x2a;
const FS_BASE: u64 = 0x1234_5678_9000;
const KERNEL_GS_BASE: u64 = 0xffff_8880_1234_0000;

/// Host CPU features the `insns` guest uses only when present (bits of its RDI).
const FEATURE_RDRAND: u64 = 1 << 0;
const FEATURE_RDSEED: u64 = 1 << 1;
const FEATURE_RDPID: u64 = 1 << 2;
const FEATURE_FSGSBASE: u64 = 1 << 3;
const FEATURE_SERIALIZE: u64 = 1 << 4;

/// `results` slots written by the guests (see test_guest.S).
const RESULT_AFTER_STAC: u64 = 0;
const RESULT_AFTER_CLAC: u64 = 1;
const RESULT_BP_RIP: u64 = 2;
const RESULT_POPCNT_R64: u64 = 3;
const RESULT_POPCNT_ZERO: u64 = 4;
const RESULT_POPCNT_ZERO_FLAGS: u64 = 5;
const RESULT_POPCNT_M16_RIP: u64 = 6;
const RESULT_POPCNT_SIB: u64 = 7;
const RESULT_POPCNT_GS: u64 = 8;
const RESULT_POPCNT_ACROSS_PAGES: u64 = 9;
const RESULT_GS_BASE_SWAPPED: u64 = 10;
const RESULT_GS_BASE_BACK: u64 = 11;
const RESULT_KERNEL_GS_BASE_SWAPPED: u64 = 12;
const RESULT_RDRAND_1: u64 = 13;
const RESULT_RDRAND_FLAGS: u64 = 14;
const RESULT_RDRAND_2: u64 = 15;
const RESULT_RDRAND_16: u64 = 16;
const RESULT_RDSEED_FLAGS: u64 = 17;
const RESULT_RDPID: u64 = 18;
const RESULT_FS_BASE: u64 = 19;
const RESULT_FS_BASE_WRITTEN: u64 = 20;
const RESULT_FS_BASE_32: u64 = 21;
const RESULT_REACHED_END: u64 = 22;
const RESULT_SYSCALL_CS: u64 = 32;
const RESULT_SYSCALL_SS: u64 = 33;
const RESULT_SYSCALL_RSP: u64 = 34;
const RESULT_SYSCALL_RCX: u64 = 35;
const RESULT_SYSCALL_R11: u64 = 36;
const RESULT_SYSCALL_RFLAGS: u64 = 37;
const RESULT_SYSCALL2_RCX: u64 = 38;
const RESULT_SYSCALL2_CS: u64 = 39;
const RESULT_NET_GS_BASE_SWAPPED: u64 = 40;
const RESULT_NET_KERNEL_GS_BASE_SWAPPED: u64 = 41;
const RESULT_NET_GS_BASE_BACK: u64 = 42;
const RESULT_NET_RDRAND_FLAGS: u64 = 43;
const RESULT_NET_RDRAND_32: u64 = 44;
const RESULT_NET_RDSEED_FLAGS: u64 = 45;
const RESULT_NET_RDSEED_16: u64 = 46;
const RESULT_NET_RDPID: u64 = 47;
const RESULT_NET_FS_BASE: u64 = 48;
const RESULT_NET_FS_BASE_WRITTEN: u64 = 49;
const RESULT_NET_GS_BASE_WRITTEN_32: u64 = 50;
const RESULT_NET_FS_BASE_AFTER_GP: u64 = 51;
const RESULT_NM_RIP: u64 = 52;
const RESULT_GP_ERROR_CODE: u64 = 53;
const RESULT_GP_RIP: u64 = 54;
const RESULT_FAULT_WORDS: u64 = 60;
const RESULT_FAULT_MARKER: u64 = 63;
const REACHED_END: u64 = 0x600d;

/// The assembled guests.
struct Image {
    kernel: Vec<u8>,
    user: Vec<u8>,
    symbols: HashMap<String, u64>,
}

fn tool(cmd: &mut Command) -> Vec<u8> {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?} (binutils are needed): {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn build_image() -> Image {
    let dir = tempfile::tempdir().unwrap();
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/vcpu/pvm_repair/test_guest.S");
    let object = dir.path().join("guest.o");
    let elf = dir.path().join("guest.elf");
    tool(
        Command::new("as")
            .arg("--64")
            .arg("-o")
            .arg(&object)
            .arg(&source),
    );
    tool(
        Command::new("ld")
            .args(["-m", "elf_x86_64", "-e", "insns"])
            .arg(format!("-Ttext={KERNEL_TEXT:#x}"))
            .arg(format!("--section-start=.utext={USER_TEXT:#x}"))
            .arg("-o")
            .arg(&elf)
            .arg(&object),
    );
    let section = |name: &str| {
        let out = dir.path().join(format!("{name}.bin"));
        tool(
            Command::new("objcopy")
                .args(["-O", "binary", "-j", name])
                .arg(&elf)
                .arg(&out),
        );
        std::fs::read(out).unwrap()
    };
    let nm = String::from_utf8(tool(Command::new("nm").arg(&elf))).unwrap();
    let symbols = nm
        .lines()
        .filter_map(|line| {
            let mut parts = line.split_whitespace();
            let address = u64::from_str_radix(parts.next()?, 16).ok()?;
            let _kind = parts.next()?;
            Some((parts.next()?.to_string(), address))
        })
        .collect();
    Image {
        kernel: section(".text"),
        user: section(".utext"),
        symbols,
    }
}

/// Host CPU features the guest may use (the guest sees the host's CPUID on kvm_pvm, and
/// KVM passes these through on VT-x).
fn host_features() -> u64 {
    let leaf1 = std::arch::x86_64::__cpuid(1);
    let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
    let mut features = 0;
    for (present, bit) in [
        (leaf1.ecx & (1 << 30) != 0, FEATURE_RDRAND),
        (leaf7.ebx & (1 << 18) != 0, FEATURE_RDSEED),
        (leaf7.ecx & (1 << 22) != 0, FEATURE_RDPID),
        (leaf7.ebx & 1 != 0, FEATURE_FSGSBASE),
        (leaf7.edx & (1 << 14) != 0, FEATURE_SERIALIZE),
    ] {
        if present {
            features |= bit;
        }
    }
    features
}

fn layout() -> Layout {
    Layout {
        nodes: vec![NodeSpec {
            id: 0,
            address: "127.0.0.1:1".parse().unwrap(),
            vcpus: vec![0],
        }],
        vcpu_count: 1,
        memory_size: RAM,
        ram: vec![RamRegion { gpa: 0, size: RAM }],
        homes: vec![HomeRange {
            gpa: 0,
            size: RAM,
            node: 0,
        }],
        transport: TransportKind::Tcp,
        guest: GuestImage::Probe {
            name: "pvm-repair-test".into(),
            arg: 0,
        },
    }
}

fn segment(selector: u16, code: bool, base: u64) -> kvm_segment {
    kvm_segment {
        base,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl: 0,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// One vCPU in 64-bit mode at CPL0 at a guest entry point.
struct TestVm {
    vcpu: VcpuFd,
    mem: GuestMemory,
    _vm: KvmVm,
    image: Image,
    features: u64,
}

impl TestVm {
    fn new(entry: &str) -> Self {
        let image = build_image();
        let hypervisor = Hypervisor::open()
            .unwrap_or_else(|e| panic!("these tests run a real guest and need KVM: {e}"));
        let vm = hypervisor.create_vm().unwrap();
        let mem = GuestMemory::new(&layout()).unwrap();
        mem.register(&vm).unwrap();
        let mut features = host_features();

        // Page tables: 0-2 MiB supervisor (the kernel), 2-4 MiB user.
        mem.write_u64(PML4, PDPT | PTE_PRESENT | PTE_WRITABLE | PTE_USER)
            .unwrap();
        mem.write_u64(PDPT, PD | PTE_PRESENT | PTE_WRITABLE | PTE_USER)
            .unwrap();
        let huge = PTE_PRESENT | PTE_WRITABLE | PTE_ACCESSED | PTE_DIRTY | PTE_HUGE;
        mem.write_u64(PD, huge).unwrap();
        mem.write_u64(PD + 8, USER_TEXT | huge | PTE_USER).unwrap();
        // GDT: null, -, kernel code, kernel data, user code32, user data, user code64, TSS.
        let gdt: [u64; 9] = [
            0,
            0,
            0x00af_9b00_0000_ffff,
            0x00cf_9300_0000_ffff,
            0x00cf_fb00_0000_ffff,
            0x00cf_f300_0000_ffff,
            0x00af_fb00_0000_ffff,
            103 | (TSS & 0xff_ffff) << 16 | 0x89 << 40,
            0,
        ];
        for (i, d) in gdt.iter().enumerate() {
            mem.write_u64(GDT + 8 * i as u64, *d).unwrap();
        }
        mem.write_u64(TSS + 4, KERNEL_STACK_TOP).unwrap();
        mem.write(TSS + 102, &104u16.to_le_bytes()).unwrap();
        let symbol = |name: &str| image.symbols[name];
        for vector in 0..256u64 {
            let handler = match vector {
                3 => symbol("bp_handler"),
                7 => symbol("nm_handler"),
                13 => symbol("gp_handler"),
                14 => symbol("pf_handler"),
                _ => symbol("unexpected"),
            };
            let low = (handler & 0xffff)
                | u64::from(KERNEL_CS) << 16
                | 0x8e << 40
                | ((handler >> 16) & 0xffff) << 48;
            mem.write_u64(IDT + vector * 16, low).unwrap();
            mem.write_u64(IDT + vector * 16 + 8, handler >> 32).unwrap();
        }
        mem.write(KERNEL_TEXT, &image.kernel).unwrap();
        mem.write(USER_TEXT, &image.user).unwrap();

        let vcpu = vm.create_vcpu(0).unwrap();
        // KVM's emulator runs rdpid itself and raises #UD when the vCPU's CPUID as KVM knows
        // it lacks the feature (on kvm_pvm it does, though the guest reads the host's CPUID).
        let kvm_cpuid = vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES).unwrap();
        let kvm_has_rdpid = kvm_cpuid
            .as_slice()
            .iter()
            .any(|e| e.function == 7 && e.index == 0 && e.ecx & (1 << 22) != 0);
        if !kvm_has_rdpid {
            features &= !FEATURE_RDPID;
        }
        let mut sregs = vcpu.get_sregs().unwrap();
        sregs.cs = segment(KERNEL_CS, true, 0);
        sregs.ds = segment(KERNEL_DS, false, 0);
        sregs.es = sregs.ds;
        sregs.ss = sregs.ds;
        sregs.fs = segment(KERNEL_DS, false, FS_BASE);
        sregs.gs = segment(KERNEL_DS, false, symbol("table"));
        sregs.tr = kvm_segment {
            base: TSS,
            limit: 103,
            selector: TSS_SELECTOR,
            type_: 0xb,
            present: 1,
            ..Default::default()
        };
        sregs.gdt.base = GDT;
        sregs.gdt.limit = u16::try_from(gdt.len() * 8 - 1).unwrap();
        sregs.idt.base = IDT;
        sregs.idt.limit = 256 * 16 - 1;
        // PE MP ET NE WP PG; PAE OSFXSR OSXMMEXCPT (+ FSGSBASE); SCE LME LMA.
        sregs.cr0 = 0x8005_0033;
        sregs.cr3 = PML4;
        sregs.cr4 = 0x620
            | if features & FEATURE_FSGSBASE != 0 {
                1 << 16
            } else {
                0
            };
        sregs.efer = 0x501;
        vcpu.set_sregs(&sregs).unwrap();
        let msrs = [
            (MSR_STAR, STAR),
            (MSR_LSTAR, symbol("lstar_entry")),
            (MSR_SYSCALL_MASK, FMASK),
            (MSR_KERNEL_GS_BASE, KERNEL_GS_BASE),
            (MSR_TSC_AUX, TSC_AUX),
        ];
        let entries: Vec<kvm_msr_entry> = msrs
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let written = vcpu
            .set_msrs(&Msrs::from_entries(&entries).unwrap())
            .unwrap();
        assert_eq!(
            written,
            entries.len(),
            "KVM refused MSR {:#x}",
            msrs[written].0
        );
        vcpu.set_regs(&kvm_regs {
            rip: symbol(entry),
            rsp: KERNEL_STACK_TOP,
            rflags: 2,
            rdi: features,
            ..Default::default()
        })
        .unwrap();
        Self {
            vcpu,
            mem,
            _vm: vm,
            image,
            features,
        }
    }

    fn symbol(&self, name: &str) -> u64 {
        self.image.symbols[name]
    }

    fn result(&self, slot: u64) -> u64 {
        self.mem
            .read_u64(self.symbol("results") + 8 * slot)
            .unwrap()
    }

    /// Sets bit `bit` of the guest's RDI (its flags at entry).
    fn set_entry_flag(&self, bit: u32) {
        let mut regs = self.vcpu.get_regs().unwrap();
        regs.rdi |= 1 << bit;
        self.vcpu.set_regs(&regs).unwrap();
    }

    /// Runs the guest until it halts, repairing emulation failures (with the instruction bytes
    /// KVM reports, or, with `fetch_from_memory`, reading them from guest memory). With
    /// `end`, a halt anywhere but just before symbol `end` is a stop where the repair is to
    /// carry out the next instruction.
    fn run(
        &mut self,
        repair: &PvmRepair,
        fetch_from_memory: bool,
        end: Option<&str>,
    ) -> Result<(), RepairError> {
        for _ in 0..10_000 {
            match self.vcpu.run() {
                Ok(VcpuExit::Hlt) => {
                    let rip = self.vcpu.get_regs().unwrap().rip;
                    if end.is_some_and(|end| rip != self.symbol(end)) {
                        repair.repair(&mut self.vcpu, &self.mem, None)?;
                        continue;
                    }
                    let marker = self.result(RESULT_FAULT_MARKER);
                    assert_eq!(
                        marker,
                        0,
                        "the guest took an exception it should not have: error code/RIP/CS \
                         {:#x?}",
                        (0..3)
                            .map(|i| self.result(RESULT_FAULT_WORDS + i))
                            .collect::<Vec<_>>()
                    );
                    return Ok(());
                }
                Ok(VcpuExit::InternalError) => {
                    if fetch_from_memory {
                        let reported = execute::exit_instruction_bytes(self.vcpu.get_kvm_run())?;
                        assert!(reported.is_some(), "this KVM reports instruction bytes");
                        repair.repair(&mut self.vcpu, &self.mem, None)?;
                    } else {
                        repair.handle(&mut self.vcpu, &self.mem)?;
                    }
                }
                Ok(other) => {
                    let what = format!("{other:?}");
                    let rip = self.vcpu.get_regs().unwrap().rip;
                    panic!("unexpected exit {what} at RIP {rip:#x}");
                }
                Err(e) => panic!("KVM_RUN failed: {e}"),
            }
        }
        panic!("the guest did not halt");
    }
}

fn check_instructions(fetch_from_memory: bool) {
    let mut vm = TestVm::new("insns");
    let repair = PvmRepair::new();
    vm.run(&repair, fetch_from_memory, None).unwrap();
    let r = |slot| vm.result(slot);
    assert_eq!(r(RESULT_REACHED_END), REACHED_END);

    assert_ne!(r(RESULT_AFTER_STAC) & RFLAGS_AC, 0, "stac sets AC");
    assert_eq!(r(RESULT_AFTER_CLAC) & RFLAGS_AC, 0, "clac clears AC");
    assert_eq!(
        r(RESULT_BP_RIP),
        vm.symbol("after_int3"),
        "#BP pushes the address after int3"
    );
    assert_eq!(r(RESULT_POPCNT_R64), 32);
    assert_eq!(r(RESULT_POPCNT_ZERO), 0, "32-bit popcnt zero-extends");
    let flags = r(RESULT_POPCNT_ZERO_FLAGS);
    assert_eq!(flags & (RFLAGS_ZF | RFLAGS_CF), RFLAGS_ZF, "{flags:#x}");
    assert_eq!(
        r(RESULT_POPCNT_M16_RIP),
        0xffff_ffff_ffff_0005,
        "16-bit popcnt keeps the upper bits"
    );
    assert_eq!(r(RESULT_POPCNT_SIB), 64);
    assert_eq!(r(RESULT_POPCNT_GS), 8);
    assert_eq!(r(RESULT_POPCNT_ACROSS_PAGES), 32);
    let table = vm.symbol("table");
    assert_eq!(r(RESULT_GS_BASE_SWAPPED), KERNEL_GS_BASE);
    assert_eq!(r(RESULT_KERNEL_GS_BASE_SWAPPED), table);
    assert_eq!(r(RESULT_GS_BASE_BACK), table);
    if vm.features & FEATURE_RDRAND != 0 {
        assert_ne!(r(RESULT_RDRAND_FLAGS) & RFLAGS_CF, 0);
        assert_ne!(r(RESULT_RDRAND_1), r(RESULT_RDRAND_2));
        assert_eq!(r(RESULT_RDRAND_16) >> 16, 0xffff_ffff_ffff);
    }
    if vm.features & FEATURE_RDSEED != 0 {
        assert_ne!(r(RESULT_RDSEED_FLAGS) & RFLAGS_CF, 0);
    }
    if vm.features & FEATURE_RDPID != 0 {
        assert_eq!(r(RESULT_RDPID), TSC_AUX);
    }
    if vm.features & FEATURE_FSGSBASE != 0 {
        assert_eq!(r(RESULT_FS_BASE), FS_BASE);
        assert_eq!(r(RESULT_FS_BASE_WRITTEN), 0x7777_0000_1000);
        assert_eq!(r(RESULT_FS_BASE_32), 0x1000);
    }

    let stats = repair.stats();
    eprintln!("host features {:#x}; {stats}", vm.features);
    if is_pvm_host() {
        // What this host's emulator is known to fail on (HOST.md); the rest of the guest's
        // instructions may or may not be emulated by KVM, and their results are checked above
        // either way.
        for (kind, n) in [
            (Repaired::Int3, 1),
            (Repaired::Clac, 1),
            (Repaired::Stac, 1),
            (Repaired::Popcnt, 6),
            (Repaired::Fwait, 1),
        ] {
            assert_eq!(stats.get(kind), n, "{kind}: {stats}");
        }
        assert_eq!(stats.get(Repaired::SyscallFromUser), 0);
    } else {
        assert_eq!(
            stats.total(),
            0,
            "a VT-x host runs them all natively: {stats}"
        );
    }
}

#[test]
fn every_repaired_instruction_gives_the_architectural_result() {
    check_instructions(false);
}

#[test]
fn instruction_bytes_read_from_guest_memory_give_the_same_results() {
    check_instructions(true);
}

/// What the `syscall_test` guest must have seen: two system calls entered at CPL0 with the
/// SYSCALL state, and a sysretq back to user mode in between.
fn check_syscalls(vm: &TestVm) {
    let r = |slot| vm.result(slot);
    assert_eq!(
        r(RESULT_SYSCALL_CS),
        u64::from(KERNEL_CS),
        "kernel CS at LSTAR"
    );
    assert_eq!(
        r(RESULT_SYSCALL_SS),
        u64::from(KERNEL_DS),
        "kernel SS at LSTAR"
    );
    assert_eq!(r(RESULT_SYSCALL_RSP), USER_STACK_TOP, "the user's RSP");
    assert_eq!(r(RESULT_SYSCALL_RCX), vm.symbol("after_syscall1"));
    assert_eq!(r(RESULT_SYSCALL_R11), 0x203, "user RFLAGS: IF, CF");
    assert_eq!(r(RESULT_SYSCALL_RFLAGS), 0x3, "FMASK cleared IF, kept CF");
    assert_eq!(r(RESULT_SYSCALL2_RCX), vm.symbol("after_syscall2"));
    assert_eq!(r(RESULT_SYSCALL2_CS), u64::from(KERNEL_CS));
    let regs = vm.vcpu.get_regs().unwrap();
    assert_eq!(
        regs.r14, 0x77,
        "the kernel's return value reached user mode"
    );
    assert_eq!(regs.r13, 0x33, "sysretq returned to the 64-bit user CS");
    assert_eq!(regs.r12, 0x203, "sysretq restored RFLAGS from R11");
}

#[test]
fn a_syscall_from_user_mode_reaches_the_kernel_and_sysret_returns() {
    let mut vm = TestVm::new("syscall_test");
    let repair = PvmRepair::new();
    vm.run(&repair, false, None).unwrap();
    check_syscalls(&vm);
    let stats = repair.stats();
    eprintln!("{stats}");
    if is_pvm_host() {
        assert_eq!(stats.get(Repaired::SyscallFromUser), 2, "{stats}");
        assert_eq!(stats.get(Repaired::Clac), 0, "{stats}");
    } else {
        assert_eq!(stats.total(), 0, "{stats}");
    }
}

#[test]
fn an_unknown_instruction_stops_the_guest_with_its_address_and_bytes() {
    let mut vm = TestVm::new("unknown_test");
    let repair = PvmRepair::new();
    let result = vm.run(&repair, false, None);
    if is_pvm_host() {
        match result {
            Err(RepairError::Unknown { rip, bytes }) => {
                assert_eq!(rip, vm.symbol("cx16_insn"));
                // cmpxchg16b (%rdi), then whatever follows it.
                assert!(bytes.starts_with("48 0f c7 0f"), "{bytes}");
                let message = RepairError::Unknown { rip, bytes }.to_string();
                assert!(message.contains(&format!("{rip:#x}")), "{message}");
            }
            other => panic!("expected an unknown-instruction error, got {other:?}"),
        }
        assert_eq!(vm.result(RESULT_REACHED_END), 0, "the guest stopped there");
        assert_eq!(repair.stats().total(), 0);
    } else {
        result.unwrap();
        assert_eq!(vm.result(RESULT_REACHED_END), REACHED_END);
        assert_eq!(repair.stats().total(), 0);
    }
}

#[test]
fn sysret_carried_out_by_the_repair_returns_to_user_mode() {
    let mut vm = TestVm::new("syscall_test");
    // The guest stops before its sysretq, and the repair executes it.
    vm.set_entry_flag(5);
    let repair = PvmRepair::new();
    vm.run(&repair, false, Some("syscall_end")).unwrap();
    check_syscalls(&vm);
    let stats = repair.stats();
    eprintln!("{stats}");
    assert_eq!(stats.get(Repaired::Sysret), 1, "{stats}");
    let syscalls = if is_pvm_host() { 2 } else { 0 };
    assert_eq!(stats.get(Repaired::SyscallFromUser), syscalls, "{stats}");
}

/// The instructions kvm_pvm's emulator runs itself today (so they never exit here), each
/// carried out by the repair at a stop just before it; the guest checks the results.
#[test]
fn safety_net_instructions_carried_out_by_the_repair() {
    let mut vm = TestVm::new("safety_net");
    let fsgsbase = vm.features & FEATURE_FSGSBASE != 0;
    assert!(
        fsgsbase,
        "this test sets CR4.FSGSBASE, which needs a host CPU with FSGSBASE"
    );
    let repair = PvmRepair::new();
    vm.run(&repair, false, Some("safety_net_end")).unwrap();
    let r = |slot| vm.result(slot);
    assert_eq!(r(RESULT_REACHED_END), REACHED_END);
    let table = vm.symbol("table");
    assert_eq!(r(RESULT_NET_GS_BASE_SWAPPED), KERNEL_GS_BASE);
    assert_eq!(r(RESULT_NET_KERNEL_GS_BASE_SWAPPED), table);
    assert_eq!(r(RESULT_NET_GS_BASE_BACK), table);
    assert_ne!(r(RESULT_NET_RDRAND_FLAGS) & RFLAGS_CF, 0);
    assert_eq!(
        r(RESULT_NET_RDRAND_32) >> 32,
        0,
        "32-bit rdrand zero-extends"
    );
    assert_ne!(r(RESULT_NET_RDSEED_FLAGS) & RFLAGS_CF, 0);
    assert_eq!(
        r(RESULT_NET_RDSEED_16) >> 16,
        0xffff_ffff_ffff,
        "16-bit rdseed keeps the upper bits"
    );
    assert_eq!(r(RESULT_NET_RDPID), TSC_AUX);
    assert_eq!(r(RESULT_NET_FS_BASE), FS_BASE);
    assert_eq!(r(RESULT_NET_FS_BASE_WRITTEN), 0x7777_0000_2000);
    assert_eq!(r(RESULT_NET_GS_BASE_WRITTEN_32), 0x1234_5678);
    assert_eq!(
        r(RESULT_GP_RIP),
        vm.symbol("wrfsbase_bad"),
        "#GP at the wrfsbase"
    );
    assert_eq!(r(RESULT_GP_ERROR_CODE), 0);
    assert_eq!(
        r(RESULT_NET_FS_BASE_AFTER_GP),
        0x7777_0000_2000,
        "a faulting wrfsbase changes nothing"
    );
    assert_eq!(r(RESULT_NM_RIP), vm.symbol("fwait_nm"), "#NM at the fwait");

    let stats = repair.stats();
    eprintln!("{stats}");
    for (kind, n) in [
        (Repaired::Fence, 3),
        (Repaired::Serialize, 1),
        (Repaired::Swapgs, 2),
        (Repaired::Rdrand, 1),
        (Repaired::Rdseed, 1),
        (Repaired::Rdpid, 1),
        (Repaired::FsGsBase, 7),
        (Repaired::Fwait, 1),
    ] {
        assert_eq!(stats.get(kind), n, "{kind}: {stats}");
    }
}
