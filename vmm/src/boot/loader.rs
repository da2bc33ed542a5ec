//! `load_linux`: kernel, initrd, command line and zero page in guest memory.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use resources::Layout;
use vm_memory::ByteValued;

use super::e820::e820_map;
use super::kernel::{self, KernelKind, LoadedKernel, HDRS_MAGIC};
use super::memory_map::{
    ACPI_RSDP_ADDR, BOOT_STACK_TOP, CMDLINE_ADDR, HIMEM_START, PML4_ADDR, ZERO_PAGE_ADDR,
};
use super::page_tables::write_page_tables;
use super::vm_memory_view::VmMemoryView;
use super::BootError;
use crate::convert::low_u32;
use crate::memory::GuestMemory;

const PAGE: u64 = 4096;
/// `type_of_loader` for a boot loader without an assigned id.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// Alignment a vmlinux is built for (`CONFIG_PHYSICAL_ALIGN` of x86-64 distribution kernels).
const ELF_KERNEL_ALIGNMENT: u32 = 0x100_0000;
/// Chunk in which the initrd is copied into guest memory.
const INITRD_CHUNK: usize = 1 << 20;

/// A loaded Linux guest, ready for [`super::setup_bsp`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinuxBoot {
    /// The kernel's 64-bit entry point.
    pub entry: u64,
    /// Guest-physical address of the zero page (`struct boot_params`), passed in RSI.
    pub boot_params: u64,
    /// CR3: the PML4 of the boot identity map.
    pub page_table_root: u64,
    /// Initial RSP.
    pub stack_top: u64,
    /// The image format.
    pub kind: KernelKind,
    /// Guest-physical range the kernel occupies or will decompress into.
    pub kernel_start: u64,
    /// End (exclusive) of that range.
    pub kernel_end: u64,
    /// Where the initrd was placed, and its size (`None` without initrd).
    pub initrd: Option<(u64, u64)>,
    /// Guest-physical address of the NUL-terminated command line.
    pub cmdline_addr: u64,
}

/// Loads `kernel` (a `vmlinux` ELF or a bzImage), the optional `initrd` (page-aligned, as high
/// in memory below 4 GiB as the kernel allows) and `cmdline` into `mem` for `layout`, and
/// writes the zero page (e820 map from `layout.ram` with the legacy hole and the MMIO gap
/// reserved, RSDP address [`ACPI_RSDP_ADDR`]), the boot page tables and the GDT.
///
/// The ACPI tables are written by [`super::write_acpi`], before or after this.
pub fn load_linux(
    mem: &GuestMemory,
    layout: &Layout,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
) -> Result<LinuxBoot, BootError> {
    let low_ram_end = low_ram_end(layout)?;
    let mut kernel_file = kernel::open(kernel)?;
    let header = kernel::identify(kernel, &mut kernel_file)?;
    check_cmdline(cmdline, header.cmdline_max())?;

    let view = VmMemoryView::new(mem, layout)?;
    let loaded = kernel::load(kernel, &mut kernel_file, &header, &view, low_ram_end)?;
    let initrd = match initrd {
        Some(path) => Some(load_initrd(mem, path, &loaded, low_ram_end)?),
        None => None,
    };

    let mut line = cmdline.as_bytes().to_vec();
    line.push(0);
    mem.write(CMDLINE_ADDR, &line)?;
    write_page_tables(mem)?;
    let params = zero_page(layout, &loaded, initrd, cmdline.len())?;
    mem.write(ZERO_PAGE_ADDR, params.as_slice())?;

    Ok(LinuxBoot {
        entry: loaded.entry,
        boot_params: ZERO_PAGE_ADDR,
        page_table_root: PML4_ADDR,
        stack_top: BOOT_STACK_TOP,
        kind: loaded.kind,
        kernel_start: loaded.start,
        kernel_end: loaded.end,
        initrd,
        cmdline_addr: CMDLINE_ADDR,
    })
}

/// End of the RAM region at address 0, which must hold the boot structures and the kernel.
fn low_ram_end(layout: &Layout) -> Result<u64, BootError> {
    match layout.ram.first() {
        Some(r) if r.gpa == 0 && r.size > 2 * HIMEM_START => Ok(r.end()),
        _ => Err(BootError::Layout {
            problem: "Linux needs RAM from address 0 to well beyond 1 MiB".into(),
        }),
    }
}

fn check_cmdline(cmdline: &str, max: usize) -> Result<(), BootError> {
    if let Some(at) = cmdline.bytes().position(|b| b == 0) {
        return Err(BootError::CmdlineNul { at });
    }
    if cmdline.len() > max {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max,
        });
    }
    Ok(())
}

/// Copies the initrd to the top of low memory (below the kernel's `initrd_addr_max`),
/// page-aligned and above the kernel.
fn load_initrd(
    mem: &GuestMemory,
    path: &Path,
    kernel: &LoadedKernel,
    low_ram_end: u64,
) -> Result<(u64, u64), BootError> {
    let missing = |source| BootError::Missing {
        what: "initrd",
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(missing)?;
    let size = file.metadata().map_err(missing)?.len();
    let top = low_ram_end.min(kernel.initrd_addr_max.saturating_add(1)) / PAGE * PAGE;
    let bottom = kernel.end.div_ceil(PAGE) * PAGE;
    let room = top.saturating_sub(bottom);
    if size > room {
        return Err(BootError::InitrdTooLarge {
            path: path.to_path_buf(),
            size,
            room,
        });
    }
    let gpa = (top - size) / PAGE * PAGE;
    let mut buf = vec![0u8; INITRD_CHUNK];
    let mut copied = 0u64;
    while copied < size {
        let want = INITRD_CHUNK.min(crate::convert::usize_from(size - copied));
        let got = file.read(&mut buf[..want]).map_err(missing)?;
        if got == 0 {
            return Err(missing(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("the file shrank to {copied} bytes while being read"),
            )));
        }
        mem.write(gpa + copied, &buf[..got])?;
        copied += got as u64;
    }
    Ok((gpa, size))
}

/// The zero page: the kernel's own setup header (bzImage) or a minimal one (ELF), completed
/// with what the boot loader fills in.
fn zero_page(
    layout: &Layout,
    kernel: &LoadedKernel,
    initrd: Option<(u64, u64)>,
    cmdline_len: usize,
) -> Result<boot_params, BootError> {
    let mut params = boot_params::default();
    match kernel.setup_header {
        Some(hdr) => params.hdr = hdr,
        None => {
            params.hdr.header = HDRS_MAGIC;
            params.hdr.kernel_alignment = ELF_KERNEL_ALIGNMENT;
            params.hdr.cmdline_size = u32::try_from(cmdline_len + 1)
                .expect("the command line was checked against the kernel's u32 limit");
        }
    }
    params.hdr.boot_flag = BOOT_FLAG_MAGIC;
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.cmd_line_ptr = low_u32(CMDLINE_ADDR);
    params.ext_cmd_line_ptr = (CMDLINE_ADDR >> 32) as u32;
    if let Some((gpa, size)) = initrd {
        params.hdr.ramdisk_image = low_u32(gpa);
        params.ext_ramdisk_image = (gpa >> 32) as u32;
        params.hdr.ramdisk_size = low_u32(size);
        params.ext_ramdisk_size = (size >> 32) as u32;
    }
    params.acpi_rsdp_addr = ACPI_RSDP_ADDR;

    let map = e820_map(layout);
    let mut table = params.e820_table;
    if map.len() > table.len() {
        return Err(BootError::Layout {
            problem: format!(
                "its memory map has {} ranges, more than the {} the zero page holds",
                map.len(),
                table.len()
            ),
        });
    }
    for (slot, entry) in table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: entry.kind,
        };
    }
    params.e820_table = table;
    params.e820_entries =
        u8::try_from(map.len()).expect("at most the zero page's 128 entries (checked above)");
    Ok(params)
}
