//! Runs the boot state on KVM (this host's /dev/kvm, as spanvm creates its VMs): the BSP
//! enters a hand-made kernel in long mode with RSI at the zero page, and an AP started by
//! SIPI runs real-mode code at its vector's page.

use kvm_ioctls::VcpuExit;

use super::support::*;
use crate::boot::*;
use crate::hypervisor::Hypervisor;
use crate::memory::GuestMemory;

/// Runs `vcpu` until it leaves for something other than an interrupt; returns the first port
/// write (port, data) and checks that the next exit is the `hlt` after it.
fn run_to_port_write(vcpu: &mut kvm_ioctls::VcpuFd) -> (u16, Vec<u8>) {
    let out = loop {
        match vcpu.run().expect("KVM_RUN") {
            VcpuExit::IoOut(port, data) => break (port, data.to_vec()),
            VcpuExit::Intr => continue,
            other => panic!("unexpected exit before the port write: {other:?}"),
        }
    };
    match vcpu.run().expect("KVM_RUN") {
        VcpuExit::Hlt => {}
        other => panic!("expected hlt after the port write, got {other:?}"),
    }
    out
}

#[test]
fn bsp_enters_elf_and_bzimage_kernels_in_long_mode_with_the_zero_page_in_rsi() {
    let layout = layout(256, &[1]);
    let dir = tempfile::tempdir().unwrap();
    let kernels = [
        file(dir.path(), "vmlinux", &tiny_elf(&ENTRY_CODE, 4096)),
        file(
            dir.path(),
            "bzImage",
            &tiny_bzimage(&BzHeader::default(), &ENTRY_CODE),
        ),
    ];
    for kernel in kernels {
        let hv = Hypervisor::open().expect("this test needs /dev/kvm");
        let vm = hv.create_vm().unwrap();
        let mem = GuestMemory::new(&layout).unwrap();
        mem.register(&vm).unwrap();
        write_acpi(&mem, &layout, &[]).unwrap();
        let boot = load_linux(&mem, &layout, &kernel, None, "console=ttyS0").unwrap();
        let mut vcpu = vm.create_vcpu(0).unwrap();
        setup_bsp(&vcpu, &boot).unwrap();

        let (port, data) = run_to_port_write(&mut vcpu);
        assert_eq!(port, ENTRY_PORT, "{}", kernel.display());
        assert_eq!(data, b"HdrS", "the kernel read its zero page through RSI");
        let sregs = vcpu.get_sregs().unwrap();
        assert_eq!(sregs.cs.selector, 0x10);
        assert_eq!(sregs.cs.l, 1, "64-bit mode");
        assert_eq!(sregs.efer & 0x400, 0x400, "long mode active");
        let regs = vcpu.get_regs().unwrap();
        assert_eq!(regs.rsi, boot.boot_params);
        assert_eq!(regs.rip, boot.entry + ENTRY_CODE.len() as u64);
    }
}

#[test]
fn ap_runs_real_mode_code_at_the_sipi_vector() {
    let layout = layout(256, &[2]);
    let hv = Hypervisor::open().expect("this test needs /dev/kvm");
    let vm = hv.create_vm().unwrap();
    let mem = GuestMemory::new(&layout).unwrap();
    mem.register(&vm).unwrap();
    let vector = 0x9a_u8;
    // mov ax, cs; mov dx, 0x1234; out dx, ax; hlt
    let trampoline = [0x8c, 0xc8, 0xba, 0x34, 0x12, 0xef, 0xf4];
    mem.write(u64::from(vector) << 12, &trampoline).unwrap();
    let mut vcpu = vm.create_vcpu(1).unwrap();
    setup_ap_for_sipi(&vcpu, vector).unwrap();

    let (port, data) = run_to_port_write(&mut vcpu);
    assert_eq!(port, ENTRY_PORT);
    assert_eq!(
        data,
        (u16::from(vector) << 8).to_le_bytes(),
        "CS = vector << 8"
    );
    let sregs = vcpu.get_sregs().unwrap();
    assert_eq!(sregs.cr0 & 1, 0, "still real mode");
    assert_eq!(sregs.cs.base, u64::from(vector) << 12);
}
