//! Guest physical address -> the kernel symbol that owns it, from the unstripped `vmlinux`.
//!
//! The ELF program headers say where each loaded part of the kernel image sits in guest
//! physical memory (`p_paddr`) and in the kernel's virtual space (`p_vaddr`): for the minimal
//! kernel `virt = phys + 0xffffffff80000000` (no KASLR: `CONFIG_RANDOMIZE_BASE` is off). A page
//! inside the image is named by the symbol covering most of it; the per-CPU template
//! (`.data..percpu`, linked at virtual 0) and the init sections are freed after boot and named
//! as such, and so is the padding between the image's sections (`kernel image gap`), which
//! Linux frees after boot; any other page is outside the image, in memory the kernel reaches
//! through its direct map (page tables, per-CPU areas, slab, page cache, user pages).

use std::path::Path;

use object::{Object, ObjectSection, ObjectSegment, ObjectSymbol, SymbolKind};

/// The start of the kernel image's virtual mapping on x86-64 (`__START_KERNEL_map`).
const KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;
const PAGE: u64 = 4096;

/// Why the kernel's symbols are not available.
#[derive(Debug, thiserror::Error)]
pub enum SymbolError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The kernel file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// It is not an ELF file the `object` crate reads.
    #[error("{path} is not an ELF kernel: {reason}")]
    NotElf {
        /// The kernel file.
        path: String,
        /// What the parser said.
        reason: String,
    },
    /// It has no symbol table (a stripped kernel).
    #[error("{0} has no symbol table (stripped)")]
    Stripped(String),
}

/// A loaded part of the kernel image.
#[derive(Debug, Clone, Copy)]
struct Segment {
    phys: u64,
    virt: u64,
    size: u64,
}

/// A symbol: `[addr, addr + size)`.
#[derive(Debug, Clone)]
struct Symbol {
    addr: u64,
    size: u64,
    name: String,
}

/// The kernel's loaded segments and symbols.
#[derive(Debug, Clone)]
pub struct KernelSymbols {
    segments: Vec<Segment>,
    /// Sorted by address.
    symbols: Vec<Symbol>,
    /// `[__init_begin, __init_end)`: freed after boot.
    init: Option<(u64, u64)>,
    /// Allocated sections: `(addr, size, name)`, for pages no symbol covers.
    sections: Vec<(u64, u64, String)>,
}

impl KernelSymbols {
    /// Reads `vmlinux`.
    pub fn load(vmlinux: &Path) -> Result<KernelSymbols, SymbolError> {
        let path = vmlinux.display().to_string();
        let data = std::fs::read(vmlinux).map_err(|source| SymbolError::Read {
            path: path.clone(),
            source,
        })?;
        Self::parse(&data, &path)
    }

    fn parse(data: &[u8], path: &str) -> Result<KernelSymbols, SymbolError> {
        let file = object::File::parse(data).map_err(|e| SymbolError::NotElf {
            path: path.to_string(),
            reason: e.to_string(),
        })?;
        let mut segments = Vec::new();
        if let object::File::Elf64(elf) = &file {
            use object::read::elf::ProgramHeader;
            let endian = elf.endian();
            for header in elf.elf_program_headers() {
                if header.p_type(endian) == object::elf::PT_LOAD {
                    segments.push(Segment {
                        phys: header.p_paddr(endian),
                        virt: header.p_vaddr(endian),
                        size: header.p_memsz(endian),
                    });
                }
            }
        } else {
            for segment in file.segments() {
                segments.push(Segment {
                    phys: segment.address().wrapping_sub(KERNEL_MAP),
                    virt: segment.address(),
                    size: segment.size(),
                });
            }
        }
        let mut symbols: Vec<Symbol> = file
            .symbols()
            .filter(|s| {
                matches!(
                    s.kind(),
                    SymbolKind::Text | SymbolKind::Data | SymbolKind::Unknown
                )
            })
            .filter(|s| s.address() >= KERNEL_MAP)
            .filter_map(|s| {
                let name = s.name().ok()?;
                if name.is_empty() || name.starts_with("__UNIQUE_ID") || name.starts_with(".L") {
                    return None;
                }
                Some(Symbol {
                    addr: s.address(),
                    size: s.size(),
                    name: name.to_string(),
                })
            })
            .collect();
        if symbols.is_empty() {
            return Err(SymbolError::Stripped(path.to_string()));
        }
        symbols.sort_by(|a, b| a.addr.cmp(&b.addr).then(b.size.cmp(&a.size)));
        let find = |name: &str| symbols.iter().find(|s| s.name == name).map(|s| s.addr);
        let init = find("__init_begin").zip(find("__init_end"));
        let sections = file
            .sections()
            .filter(|s| s.address() >= KERNEL_MAP && s.size() > 0)
            .filter_map(|s| Some((s.address(), s.size(), s.name().ok()?.to_string())))
            .collect();
        Ok(KernelSymbols {
            segments,
            symbols,
            init,
            sections,
        })
    }

    /// What owns the 4 KiB guest page at `gpa`: a kernel symbol, or what kind of memory it is.
    pub fn describe(&self, gpa: u64) -> String {
        let page = gpa & !(PAGE - 1);
        let Some(seg) = self
            .segments
            .iter()
            .find(|s| page >= s.phys && page < s.phys.saturating_add(s.size))
        else {
            return "direct map".to_string();
        };
        let virt = seg.virt + (page - seg.phys);
        if seg.virt < KERNEL_MAP {
            return "per-CPU template (freed after boot)".to_string();
        }
        if self.init.is_some_and(|(b, e)| virt >= b && virt < e) {
            return "init memory (freed after boot)".to_string();
        }
        // Linux frees the padding between its text, rodata and data after boot
        // ("Freeing unused kernel image (text/rodata gap) memory"): such a page is free memory
        // again, whatever the image once held there.
        let in_section = self.sections.is_empty()
            || self
                .sections
                .iter()
                .any(|(a, n, _)| virt >= *a && virt - *a < *n);
        if !in_section {
            return "kernel image gap (freed after boot)".to_string();
        }
        self.owner(virt)
            .unwrap_or_else(|| "kernel image (no symbol)".to_string())
    }

    /// The symbol covering most of the page at `virt`, with how many others share the page.
    fn owner(&self, virt: u64) -> Option<String> {
        let end = virt + PAGE;
        // Symbols starting before the page may reach into it; sizes of kernel objects are far
        // below 16 MiB, so looking back that far finds every one of them.
        let first = self
            .symbols
            .partition_point(|s| s.addr.saturating_add(16 << 20) <= virt);
        let mut best: Option<(&Symbol, u64)> = None;
        let mut sharing = 0;
        for s in self.symbols[first..].iter().take_while(|s| s.addr < end) {
            let (lo, hi) = (
                s.addr.max(virt),
                s.addr.saturating_add(s.size.max(1)).min(end),
            );
            if hi <= lo {
                continue;
            }
            sharing += 1;
            if best.is_none_or(|(_, overlap)| hi - lo > overlap) {
                best = Some((s, hi - lo));
            }
        }
        match best {
            Some((s, _)) if sharing > 1 => Some(format!("{} (+{} more)", s.name, sharing - 1)),
            Some((s, _)) => Some(s.name.clone()),
            None => {
                // No sized symbol covers it: the nearest one before it if it is close, else
                // the section.
                let i = self.symbols.partition_point(|s| s.addr <= virt);
                let near = self
                    .symbols
                    .get(i.checked_sub(1)?)
                    .filter(|s| virt - s.addr < PAGE);
                if let Some(s) = near {
                    return Some(format!("{}+{:#x}", s.name, virt - s.addr));
                }
                self.sections
                    .iter()
                    .find(|(a, n, _)| virt >= *a && virt - *a < *n)
                    .map(|(_, _, name)| format!("{name} (no symbol)"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn symbols() -> KernelSymbols {
        let sym = |addr: u64, size: u64, name: &str| Symbol {
            addr,
            size,
            name: name.to_string(),
        };
        KernelSymbols {
            segments: vec![
                Segment {
                    phys: 0x100_0000,
                    virt: 0xffff_ffff_8100_0000,
                    size: 0x10_0000,
                },
                Segment {
                    phys: 0x110_0000,
                    virt: 0,
                    size: 0x2_0000,
                },
            ],
            symbols: vec![
                sym(0xffff_ffff_8100_0000, 0x2000, "big_table"),
                sym(0xffff_ffff_8100_2000, 0x100, "jiffies"),
                sym(0xffff_ffff_8100_2100, 0x800, "tk_core"),
                sym(0xffff_ffff_8100_8000, 0, "label"),
                sym(0xffff_ffff_8100_a000, 0, "__init_begin"),
                sym(0xffff_ffff_8100_c000, 0, "__init_end"),
            ],
            init: Some((0xffff_ffff_8100_a000, 0xffff_ffff_8100_c000)),
            sections: vec![
                (0xffff_ffff_8100_0000, 0x8000, ".data".to_string()),
                (0xffff_ffff_8100_8000, 0x2000, ".rodata".to_string()),
                (0xffff_ffff_8100_a000, 0x5000, ".init.data".to_string()),
            ],
        }
    }

    #[test]
    fn pages_by_owner() {
        let k = symbols();
        assert_eq!(k.describe(0x100_1234), "big_table");
        assert_eq!(k.describe(0x100_2000), "tk_core (+1 more)");
        assert_eq!(k.describe(0x100_8800), "label");
        assert_eq!(k.describe(0x100_9000), ".rodata (no symbol)");
        assert_eq!(k.describe(0x100_e000), ".init.data (no symbol)");
        assert_eq!(
            k.describe(0x100_f000),
            "kernel image gap (freed after boot)"
        );
        assert_eq!(k.describe(0x100_b000), "init memory (freed after boot)");
        assert_eq!(
            k.describe(0x110_1000),
            "per-CPU template (freed after boot)"
        );
        assert_eq!(k.describe(0x7a2_0000), "direct map");
    }

    #[test]
    fn the_minimal_kernel_if_built() {
        // A real vmlinux, when images/build.sh made one (the Linux tests need it anyway).
        let path = crate::bench::boot::images_dir().join("minimal.vmlinux");
        let Ok(k) = KernelSymbols::load(&path) else {
            eprintln!(
                "{} not readable: only the synthetic table was checked",
                path.display()
            );
            return;
        };
        // A page in the middle of a large object is that object's.
        let big = k
            .symbols
            .iter()
            .find(|s| s.size >= 3 * PAGE && s.addr >= KERNEL_MAP)
            .expect("a kernel has objects over 12 KiB");
        let middle = (big.addr + PAGE) & !(PAGE - 1);
        assert_eq!(k.describe(middle - KERNEL_MAP), big.name);
        // jiffies shares its page with other variables: named as the largest of them, with
        // the count of the others.
        let jiffies = k
            .symbols
            .iter()
            .find(|s| s.name == "jiffies")
            .map(|s| s.addr);
        if let Some(virt) = jiffies {
            let d = k.describe(virt - KERNEL_MAP);
            assert!(d.contains("jiffies") || d.contains("more)"), "{d}");
        }
        assert_eq!(k.describe(0x0f00_0000), "direct map");
    }

    #[test]
    fn not_a_kernel() {
        let err = KernelSymbols::parse(b"not an elf", "x").unwrap_err();
        assert!(err.to_string().contains("not an ELF"), "{err}");
    }
}
