//! Recognising the kernel image and loading it with linux-loader.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{ByteValued, GuestAddress};

use super::memory_map::{CMDLINE_ADDR, CMDLINE_AREA_END, HIMEM_START};
use super::vm_memory_view::VmMemoryView;
use super::BootError;

/// Offset of the setup header in a bzImage (and in the zero page).
const SETUP_HEADER_OFFSET: usize = 0x1f1;
/// Offset of the "HdrS" magic in a bzImage.
const HDRS_OFFSET: usize = 0x202;
/// The "HdrS" magic, little-endian.
pub(crate) const HDRS_MAGIC: u32 = 0x5372_6448;
/// `xloadflags`: the kernel has a 64-bit entry point at `code32_start + 0x200`.
const XLF_KERNEL_64: u16 = 1;
/// Offset of the 64-bit entry from the protected-mode kernel's load address.
const ENTRY_64_OFFSET: u64 = 0x200;
/// ELF identification.
const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const ELFCLASS64: u8 = 2;
const EM_X86_64: u16 = 62;
/// Highest initrd address a 64-bit kernel declares (`initrd_addr_max` of x86-64 bzImages);
/// used for ELF images, which carry no setup header.
pub(crate) const DEFAULT_INITRD_ADDR_MAX: u64 = 0x7fff_ffff;
/// Initrd limit of boot protocols before 2.03.
const OLD_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
/// Where a relocatable bzImage decompresses at the lowest (`LOAD_PHYSICAL_ADDR`) when its
/// header does not say (`pref_address` appeared in protocol 2.10).
const DEFAULT_PREF_ADDRESS: u64 = 0x100_0000;

/// The format of the kernel image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelKind {
    /// An uncompressed `vmlinux`, entered at its ELF entry point.
    Elf,
    /// A bzImage, entered at its 64-bit entry point.
    BzImage,
}

/// A kernel in guest memory.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LoadedKernel {
    pub kind: KernelKind,
    /// 64-bit entry point (guest-physical).
    pub entry: u64,
    /// First guest-physical byte of the image.
    pub start: u64,
    /// End of the memory the kernel needs, its decompression buffer included.
    pub end: u64,
    /// The bzImage's setup header (code32_start set to where it was loaded).
    pub setup_header: Option<setup_header>,
    /// Highest address the initrd may occupy.
    pub initrd_addr_max: u64,
}

/// What the start of the image says about it, before anything is loaded.
pub(crate) struct KernelHeader {
    pub kind: KernelKind,
    pub setup_header: Option<setup_header>,
}

impl KernelHeader {
    /// Longest command line this kernel accepts (without the NUL): the bzImage's
    /// `cmdline_size` (255 before protocol 2.06), 2047 for an ELF image; never more than the
    /// command-line area holds.
    pub fn cmdline_max(&self) -> usize {
        let declared = match &self.setup_header {
            Some(h) if h.version >= 0x0206 => h.cmdline_size as usize,
            Some(_) => 255,
            None => resources::MAX_CMDLINE_LEN,
        };
        declared.min(crate::convert::usize_from(
            CMDLINE_AREA_END - CMDLINE_ADDR - 1,
        ))
    }

    /// Highest address the initrd may occupy.
    pub fn initrd_addr_max(&self) -> u64 {
        match &self.setup_header {
            Some(h) if h.version >= 0x0203 => u64::from(h.initrd_addr_max),
            Some(_) => OLD_INITRD_ADDR_MAX,
            None => DEFAULT_INITRD_ADDR_MAX,
        }
    }
}

/// Opens the kernel image.
pub(crate) fn open(path: &Path) -> Result<File, BootError> {
    File::open(path).map_err(|source| BootError::Missing {
        what: "kernel image",
        path: path.to_path_buf(),
        source,
    })
}

/// Reads the start of the image and tells ELF from bzImage, refusing anything else.
pub(crate) fn identify(path: &Path, file: &mut File) -> Result<KernelHeader, BootError> {
    let mut head = Vec::with_capacity(0x400);
    file.by_ref()
        .take(0x400)
        .read_to_end(&mut head)
        .map_err(|source| BootError::Missing {
            what: "kernel image",
            path: path.to_path_buf(),
            source,
        })?;
    identify_bytes(&head).map_err(|reason| BootError::NotAKernel {
        path: path.to_path_buf(),
        reason,
    })
}

/// [`identify`] on the first bytes of an image; the error is the reason it is refused.
pub(crate) fn identify_bytes(head: &[u8]) -> Result<KernelHeader, String> {
    if head.starts_with(ELF_MAGIC) {
        let class = head.get(4).copied();
        let machine = head.get(18..20).map(|b| u16::from_le_bytes([b[0], b[1]]));
        if class != Some(ELFCLASS64) || machine != Some(EM_X86_64) {
            return Err(format!(
                "it is an ELF file but not a 64-bit x86-64 one (class {class:?}, machine {machine:?})"
            ));
        }
        return Ok(KernelHeader {
            kind: KernelKind::Elf,
            setup_header: None,
        });
    }
    if head.get(HDRS_OFFSET..HDRS_OFFSET + 4) == Some(&HDRS_MAGIC.to_le_bytes()[..]) {
        let mut header = setup_header::default();
        let size = std::mem::size_of::<setup_header>();
        let bytes = head
            .get(SETUP_HEADER_OFFSET..SETUP_HEADER_OFFSET + size)
            .ok_or("it is a bzImage cut short inside its setup header")?;
        header.as_mut_slice().copy_from_slice(bytes);
        let (version, xloadflags) = (header.version, header.xloadflags);
        if version < 0x020c || xloadflags & XLF_KERNEL_64 == 0 {
            return Err(format!(
                "it is a bzImage without a 64-bit entry point (boot protocol {}.{:02}, xloadflags {xloadflags:#x}); spanvm needs a 64-bit kernel with boot protocol 2.12 or later",
                version >> 8,
                version & 0xff
            ));
        }
        return Ok(KernelHeader {
            kind: KernelKind::BzImage,
            setup_header: Some(header),
        });
    }
    Err("it has neither the ELF magic of a vmlinux nor the \"HdrS\" magic of a bzImage at offset 0x202".into())
}

/// Loads the identified image into guest memory; `low_ram_end` bounds where it may reach.
pub(crate) fn load(
    path: &Path,
    file: &mut File,
    header: &KernelHeader,
    view: &VmMemoryView<'_>,
    low_ram_end: u64,
) -> Result<LoadedKernel, BootError> {
    let load_err = |source| BootError::KernelLoad {
        path: path.to_path_buf(),
        source,
    };
    let himem = Some(GuestAddress(HIMEM_START));
    let (entry, start, end, setup_header) = match header.kind {
        KernelKind::Elf => {
            let result = Elf::load(&view.guest, None, file, himem).map_err(load_err)?;
            let entry = result.kernel_load.0;
            (entry, entry, result.kernel_end, None)
        }
        KernelKind::BzImage => {
            let result = BzImage::load(&view.guest, None, file, himem).map_err(load_err)?;
            let start = result.kernel_load.0;
            let hdr = result.setup_header.unwrap_or_default();
            (
                start + ENTRY_64_OFFSET,
                start,
                result.kernel_end.max(decompression_end(&hdr, start)),
                Some(hdr),
            )
        }
    };
    if end > low_ram_end {
        return Err(BootError::KernelTooLarge {
            path: path.to_path_buf(),
            end,
            ram_end: low_ram_end,
        });
    }
    Ok(LoadedKernel {
        kind: header.kind,
        entry,
        start,
        end,
        setup_header,
        initrd_addr_max: header.initrd_addr_max(),
    })
}

/// End of the buffer a bzImage decompresses into: a relocatable kernel uses its load address
/// rounded up to `kernel_alignment`, but never below `pref_address`; a fixed one uses
/// `pref_address`. It needs `init_size` bytes there.
fn decompression_end(hdr: &setup_header, load: u64) -> u64 {
    let pref = match hdr.pref_address {
        0 => DEFAULT_PREF_ADDRESS,
        p => p,
    };
    let align = u64::from(hdr.kernel_alignment).max(1);
    let base = if hdr.relocatable_kernel != 0 {
        load.div_ceil(align).saturating_mul(align).max(pref)
    } else {
        pref
    };
    base.saturating_add(u64::from(hdr.init_size))
}
