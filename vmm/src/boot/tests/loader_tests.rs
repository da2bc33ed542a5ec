//! `load_linux`: the e820 map, the zero page, the command line, the initrd, and bad input.

use super::support::*;
use crate::boot::memory_map::*;
use crate::boot::*;
use crate::memory::GuestMemory;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn entry(addr: u64, end: u64, kind: u32) -> E820Entry {
    E820Entry {
        addr,
        size: end - addr,
        kind,
    }
}

#[test]
fn e820_of_256_mib_reserves_the_legacy_hole_and_the_mmio_gap() {
    assert_eq!(
        e820_map(&layout(256, &[1])),
        vec![
            entry(0, 0x9fc00, E820_RAM),
            entry(0x9fc00, 0x10_0000, E820_RESERVED),
            entry(0x10_0000, 256 * MIB, E820_RAM),
            entry(0xc000_0000, 4 * GIB, E820_RESERVED),
        ]
    );
}

#[test]
fn e820_of_5_gib_puts_the_rest_of_ram_above_4_gib() {
    assert_eq!(
        e820_map(&layout(5 * 1024, &[1, 1])),
        vec![
            entry(0, 0x9fc00, E820_RAM),
            entry(0x9fc00, 0x10_0000, E820_RESERVED),
            entry(0x10_0000, 3 * GIB, E820_RAM),
            entry(3 * GIB, 4 * GIB, E820_RESERVED),
            entry(4 * GIB, 6 * GIB, E820_RAM),
        ]
    );
}

#[test]
fn elf_kernel_initrd_and_cmdline_are_placed_and_described() {
    let layout = layout(256, &[1]);
    let mem = GuestMemory::new(&layout).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kernel = file(dir.path(), "vmlinux", &tiny_elf(&ENTRY_CODE, 2 * MIB));
    let initrd_bytes = random_bytes(3 * 4096 + 17);
    let initrd = file(dir.path(), "initrd", &initrd_bytes);
    let cmdline = "console=ttyS0 pci=off noxsave";

    let boot = load_linux(&mem, &layout, &kernel, Some(&initrd), cmdline).unwrap();
    assert_eq!(boot.kind, KernelKind::Elf);
    assert_eq!(boot.entry, ELF_ENTRY);
    assert_eq!(boot.boot_params, ZERO_PAGE_ADDR);
    assert_eq!(boot.page_table_root, PML4_ADDR);
    assert_eq!(
        (boot.kernel_start, boot.kernel_end),
        (ELF_ENTRY, ELF_ENTRY + 2 * MIB)
    );
    let mut code = [0u8; ENTRY_CODE.len()];
    mem.read(ELF_ENTRY, &mut code).unwrap();
    assert_eq!(code, ENTRY_CODE);

    // The initrd ends within the last page of low memory and starts on a page boundary.
    let (initrd_gpa, initrd_size) = boot.initrd.unwrap();
    assert_eq!(initrd_size, initrd_bytes.len() as u64);
    assert_eq!(initrd_gpa % 4096, 0);
    assert!(initrd_gpa + initrd_size <= 256 * MIB);
    assert!(initrd_gpa + initrd_size > 256 * MIB - 4096);
    let mut back = vec![0u8; initrd_bytes.len()];
    mem.read(initrd_gpa, &mut back).unwrap();
    assert_eq!(back, initrd_bytes);

    let mut line = vec![0u8; cmdline.len() + 1];
    mem.read(CMDLINE_ADDR, &mut line).unwrap();
    assert_eq!(&line[..cmdline.len()], cmdline.as_bytes());
    assert_eq!(line[cmdline.len()], 0, "command line is NUL-terminated");

    let params = read_zero_page(&mem);
    let hdr = params.hdr;
    assert_eq!({ hdr.header }, 0x5372_6448);
    assert_eq!({ hdr.boot_flag }, 0xaa55);
    assert_eq!({ hdr.type_of_loader }, 0xff);
    assert_eq!({ hdr.cmd_line_ptr }, u32::try_from(CMDLINE_ADDR).unwrap());
    assert_eq!({ hdr.ramdisk_image }, u32::try_from(initrd_gpa).unwrap());
    assert_eq!({ hdr.ramdisk_size }, u32::try_from(initrd_size).unwrap());
    assert_eq!({ params.ext_ramdisk_image }, 0);
    assert_eq!({ params.acpi_rsdp_addr }, ACPI_RSDP_ADDR);
    let table = params.e820_table;
    let written: Vec<E820Entry> = table[..usize::from(params.e820_entries)]
        .iter()
        .map(|e| E820Entry {
            addr: e.addr,
            size: e.size,
            kind: e.r#type,
        })
        .collect();
    assert_eq!(written, e820_map(&layout));
}

#[test]
fn bzimage_is_entered_at_its_64_bit_entry_with_its_own_setup_header() {
    let layout = layout(5 * 1024, &[1, 1]);
    let mem = GuestMemory::new(&layout).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let header = BzHeader {
        cmdline_size: 64,
        ..BzHeader::default()
    };
    let kernel = file(dir.path(), "bzImage", &tiny_bzimage(&header, &ENTRY_CODE));
    let initrd = file(dir.path(), "initrd", &random_bytes(10_000));

    let boot = load_linux(&mem, &layout, &kernel, Some(&initrd), "console=ttyS0").unwrap();
    assert_eq!(boot.kind, KernelKind::BzImage);
    assert_eq!(boot.entry, 0x10_0200);
    let mut code = [0u8; ENTRY_CODE.len()];
    mem.read(boot.entry, &mut code).unwrap();
    assert_eq!(code, ENTRY_CODE);
    // The decompressor's buffer: pref_address 16 MiB + init_size.
    assert_eq!(boot.kernel_end, 0x100_0000 + u64::from(header.init_size));

    // Below the kernel's initrd_addr_max (2 GiB - 1), not at the top of the 3 GiB of low RAM.
    let (gpa, size) = boot.initrd.unwrap();
    assert_eq!(gpa % 4096, 0);
    assert!(gpa + size <= 0x8000_0000 && gpa + size > 0x8000_0000 - 4096);

    let hdr = read_zero_page(&mem).hdr;
    assert_eq!({ hdr.version }, header.version);
    assert_eq!({ hdr.code32_start }, 0x10_0000);
    assert_eq!({ hdr.cmdline_size }, 64);
    assert_eq!({ hdr.type_of_loader }, 0xff);
    assert_eq!({ hdr.ramdisk_image }, u32::try_from(gpa).unwrap());

    // The header's limit applies: 64 bytes pass, 65 do not.
    assert!(load_linux(&mem, &layout, &kernel, None, &"x".repeat(64)).is_ok());
    let err = load_linux(&mem, &layout, &kernel, None, &"x".repeat(65)).unwrap_err();
    assert!(
        matches!(err, BootError::CmdlineTooLong { len: 65, max: 64 }),
        "{err}"
    );
}

#[test]
fn elf_command_line_limit_is_2047_bytes() {
    let layout = layout(256, &[1]);
    let mem = GuestMemory::new(&layout).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kernel = file(dir.path(), "vmlinux", &tiny_elf(&ENTRY_CODE, 4096));
    let err = load_linux(&mem, &layout, &kernel, None, &"a".repeat(2048)).unwrap_err();
    assert!(
        matches!(
            err,
            BootError::CmdlineTooLong {
                len: 2048,
                max: 2047
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("2048 bytes"), "{err}");
    load_linux(&mem, &layout, &kernel, None, &"a".repeat(2047)).unwrap();
    let err = load_linux(&mem, &layout, &kernel, None, "a\0b").unwrap_err();
    assert!(matches!(err, BootError::CmdlineNul { at: 1 }), "{err}");
}

#[test]
fn initrd_larger_than_free_low_memory_is_refused() {
    let layout = layout(256, &[1]);
    let mem = GuestMemory::new(&layout).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kernel = file(dir.path(), "vmlinux", &tiny_elf(&ENTRY_CODE, 2 * MIB));
    let initrd = dir.path().join("huge.img");
    std::fs::File::create(&initrd)
        .unwrap()
        .set_len(300 * MIB)
        .unwrap();
    let err = load_linux(&mem, &layout, &kernel, Some(&initrd), "").unwrap_err();
    // Free: from the end of the kernel (16 MiB + 2 MiB) to the top of RAM.
    let room = 256 * MIB - (ELF_ENTRY + 2 * MIB);
    match &err {
        BootError::InitrdTooLarge { size, room: r, .. } => {
            assert_eq!(*size, 300 * MIB);
            assert_eq!(*r, room);
        }
        other => panic!("expected InitrdTooLarge, got {other}"),
    }
    assert!(err.to_string().contains("huge.img"), "{err}");

    // Exactly the room fits.
    std::fs::File::create(&initrd)
        .unwrap()
        .set_len(room)
        .unwrap();
    let boot = load_linux(&mem, &layout, &kernel, Some(&initrd), "").unwrap();
    assert_eq!(boot.initrd, Some((ELF_ENTRY + 2 * MIB, room)));
}

#[test]
fn files_that_are_not_kernels_are_refused() {
    let layout = layout(256, &[1]);
    let mem = GuestMemory::new(&layout).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let not_kernel = |name: &str, bytes: &[u8]| {
        let path = file(dir.path(), name, bytes);
        let err = load_linux(&mem, &layout, &path, None, "").unwrap_err();
        match &err {
            BootError::NotAKernel { path: p, reason } => {
                assert_eq!(p, &path);
                reason.clone()
            }
            other => panic!("{name}: expected NotAKernel, got {other}"),
        }
    };
    let reason = not_kernel("random", &random_bytes(64 * 1024));
    assert!(reason.contains("neither"), "{reason}");
    assert!(not_kernel("empty", &[]).contains("neither"));

    let mut elf32 = tiny_elf(&ENTRY_CODE, 4096);
    elf32[4] = 1; // ELFCLASS32
    assert!(not_kernel("elf32", &elf32).contains("64-bit"));
    let mut arm = tiny_elf(&ENTRY_CODE, 4096);
    arm[18..20].copy_from_slice(&183u16.to_le_bytes()); // EM_AARCH64
    assert!(not_kernel("arm64", &arm).contains("x86-64"));

    let old = BzHeader {
        version: 0x020b,
        xloadflags: 0,
        ..BzHeader::default()
    };
    let reason = not_kernel("old-bzImage", &tiny_bzimage(&old, &ENTRY_CODE));
    assert!(reason.contains("64-bit entry"), "{reason}");
    let no64 = BzHeader {
        xloadflags: 0,
        ..BzHeader::default()
    };
    assert!(not_kernel("bzImage32", &tiny_bzimage(&no64, &ENTRY_CODE)).contains("2.12"));
}

#[test]
fn missing_kernel_and_initrd_are_named() {
    let layout = layout(256, &[1]);
    let mem = GuestMemory::new(&layout).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-vmlinux");
    let err = load_linux(&mem, &layout, &missing, None, "").unwrap_err();
    assert!(
        matches!(&err, BootError::Missing { what: "kernel image", path, .. } if path == &missing),
        "{err}"
    );
    assert!(err.to_string().contains("no-such-vmlinux"), "{err}");

    let kernel = file(dir.path(), "vmlinux", &tiny_elf(&ENTRY_CODE, 4096));
    let no_initrd = dir.path().join("no-such-initrd");
    let err = load_linux(&mem, &layout, &kernel, Some(&no_initrd), "").unwrap_err();
    assert!(
        matches!(&err, BootError::Missing { what: "initrd", path, .. } if path == &no_initrd),
        "{err}"
    );
}

#[test]
fn kernel_beyond_low_ram_is_refused() {
    let layout = layout(256, &[1]);
    let mem = GuestMemory::new(&layout).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // A small file whose segment claims 300 MiB in memory (a huge .bss).
    let kernel = file(dir.path(), "vmlinux", &tiny_elf(&ENTRY_CODE, 300 * MIB));
    let err = load_linux(&mem, &layout, &kernel, None, "").unwrap_err();
    assert!(
        matches!(err, BootError::KernelTooLarge { end, ram_end, .. }
            if end == ELF_ENTRY + 300 * MIB && ram_end == 256 * MIB),
        "{err}"
    );
    // A segment whose bytes land beyond RAM: linux-loader refuses to write them.
    let mut beyond = tiny_elf(&ENTRY_CODE, 4096);
    let paddr = 0x2000_0000u64; // 512 MiB
    beyond[24..32].copy_from_slice(&paddr.to_le_bytes()); // e_entry
    beyond[64 + 24..64 + 32].copy_from_slice(&paddr.to_le_bytes()); // p_paddr
    let kernel = file(dir.path(), "vmlinux-high", &beyond);
    let err = load_linux(&mem, &layout, &kernel, None, "").unwrap_err();
    assert!(matches!(err, BootError::KernelLoad { .. }), "{err}");
}
