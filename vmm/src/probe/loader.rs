//! Loads a probe image and prepares each local vCPU to enter it directly in 64-bit mode:
//! identity-mapped page tables, a GDT with a TSS per vCPU, an IDT whose gates point at the
//! image's interrupt stubs, and the registers the probe runtime (`images/probes/rt.S`) expects.

use crate::arch::{
    CR0_ET, CR0_MP, CR0_NE, CR0_PE, CR0_PG, CR0_WP, CR4_OSFXSR, CR4_OSXMMEXCPT, CR4_PAE, EFER_LMA,
    EFER_LME, PTE_ACCESSED, PTE_DIRTY, PTE_HUGE, PTE_PRESENT, PTE_USER, PTE_WRITABLE,
};
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use resources::Layout;

use super::layout::*;
use crate::memory::{GuestMemory, MemoryError};

const GIB: u64 = 1 << 30;
/// TSS limit: 104 bytes, the I/O bitmap, and its terminating byte.
const TSS_LIMIT: u64 = 104 + TSS_IO_PORTS / 8;

/// Errors of loading a probe.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// The image is not a probe image.
    #[error("probe image `{name}` is invalid: {problem}")]
    BadImage {
        /// The probe's name.
        name: String,
        /// What is wrong with its image.
        problem: String,
    },
    /// The guest is too small or too large for the probe layout.
    #[error("probe guests need {problem}")]
    Layout {
        /// What the probe layout needs that the guest does not give.
        problem: String,
    },
    /// Writing guest memory failed.
    #[error("loading the probe: {0}")]
    Memory(#[from] MemoryError),
    /// Setting a vCPU's registers failed.
    #[error("setting up vCPU {vcpu} registers: {source}")]
    Registers {
        /// The vCPU being set up.
        vcpu: usize,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
}

/// Where a validated probe image starts.
#[derive(Debug, Clone, Copy)]
pub struct ProbeEntry {
    /// CPL0 entry point.
    pub entry: u64,
}

fn read_u64(img: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(img.get(at..at + 8)?.try_into().ok()?))
}

/// Checks the image header and returns the entry and the 256 interrupt stub addresses.
pub fn parse_image(name: &str, img: &[u8]) -> Result<(ProbeEntry, Vec<u64>), LoaderError> {
    let bad = |problem: &str| LoaderError::BadImage {
        name: name.into(),
        problem: problem.into(),
    };
    if img.len() as u64 > PROBE_IMAGE_MAX {
        return Err(bad(&format!(
            "{} bytes is over the {PROBE_IMAGE_MAX} byte limit",
            img.len()
        )));
    }
    if read_u64(img, 0) != Some(PROBE_MAGIC) {
        return Err(bad("no probe magic at its start"));
    }
    let end = PROBE_LOAD_ADDR + img.len() as u64;
    let inside = |a: u64| a >= PROBE_LOAD_ADDR && a < end;
    let entry = read_u64(img, 8)
        .filter(|&a| inside(a))
        .ok_or_else(|| bad("entry outside the image"))?;
    let table = read_u64(img, 16)
        .filter(|&a| inside(a) && a + 256 * 8 <= end)
        .ok_or_else(|| bad("interrupt stub table outside the image"))?;
    let off = crate::convert::usize_from(table - PROBE_LOAD_ADDR);
    let stubs = (0..256)
        .map(|i| read_u64(img, off + i * 8).filter(|&a| inside(a)))
        .collect::<Option<Vec<u64>>>()
        .ok_or_else(|| bad("an interrupt stub lies outside the image"))?;
    Ok((ProbeEntry { entry }, stubs))
}

/// Writes the image and the shared tables (GDT, TSSes, IDT, page tables) into guest memory.
/// Done once per guest, by the master.
pub fn load(
    name: &str,
    img: &[u8],
    layout: &Layout,
    mem: &GuestMemory,
) -> Result<ProbeEntry, LoaderError> {
    let (entry, stubs) = parse_image(name, img)?;
    let vcpus = u64::from(layout.vcpu_count);
    if vcpus > PROBE_MAX_VCPUS {
        return Err(LoaderError::Layout {
            problem: format!("at most {PROBE_MAX_VCPUS} vCPUs"),
        });
    }
    if layout.ram_end() < PROBE_DATA_ADDR + (1 << 20) || !layout.is_ram(0, PROBE_DATA_ADDR) {
        return Err(LoaderError::Layout {
            problem: format!("at least {} MiB of RAM", (PROBE_DATA_ADDR >> 20) + 1),
        });
    }
    mem.write(PROBE_LOAD_ADDR, img)?;

    // GDT: null, kernel code, kernel data, user data, user code, then a TSS descriptor per vCPU.
    let mut gdt: Vec<u64> = vec![
        0,
        0x00af_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x00cf_f300_0000_ffff,
        0x00af_fb00_0000_ffff,
    ];
    for i in 0..vcpus {
        let base = TSS_ADDR + i * TSS_SLOT;
        let limit = TSS_LIMIT;
        let low = (limit & 0xffff)
            | ((base & 0xff_ffff) << 16)
            | (0x89u64 << 40)
            | (((limit >> 16) & 0xf) << 48)
            | (((base >> 24) & 0xff) << 56);
        gdt.push(low);
        gdt.push(base >> 32);
        // 64-bit TSS: RSP0 at offset 4, I/O map base at 102; a zero bitmap allows CPL3 the
        // low ports, which is how probes reach the console and the probe device (IOPL 3 in
        // RFLAGS is not honoured at CPL3 on every host).
        let mut tss = vec![0u8; crate::convert::usize_from(TSS_LIMIT) + 1];
        let rsp0 = STACKS_ADDR + i * STACK_BLOCK + KERNEL_STACK_TOP;
        tss[4..12].copy_from_slice(&rsp0.to_le_bytes());
        tss[102..104].copy_from_slice(&104u16.to_le_bytes());
        *tss.last_mut().expect("non-empty TSS") = 0xff;
        mem.write(base, &tss)?;
    }
    let gdt_bytes: Vec<u8> = gdt.iter().flat_map(|d| d.to_le_bytes()).collect();
    if GDT_ADDR + gdt_bytes.len() as u64 > IDT_ADDR {
        return Err(LoaderError::Layout {
            problem: "fewer vCPUs (the GDT does not fit)".into(),
        });
    }
    mem.write(GDT_ADDR, &gdt_bytes)?;

    // IDT: interrupt gates (interrupts off in handlers) to the image's stubs, kernel CS, DPL 0.
    let mut idt = Vec::with_capacity(256 * 16);
    for &handler in &stubs {
        let low = (handler & 0xffff)
            | (KERNEL_CS << 16)
            | (0x8eu64 << 40)
            | (((handler >> 16) & 0xffff) << 48);
        idt.extend_from_slice(&low.to_le_bytes());
        idt.extend_from_slice(&(handler >> 32).to_le_bytes());
    }
    mem.write(IDT_ADDR, &idt)?;

    // Identity map of everything up to max(4 GiB, end of RAM), 2 MiB pages, user-accessible so
    // that CPL3 code reaches RAM and the APIC window alike.
    let span_gib = layout.ram_end().max(4 * GIB).div_ceil(GIB);
    if PD_ADDR + span_gib * 4096 > PAGE_TABLES_END || span_gib > 512 {
        return Err(LoaderError::Layout {
            problem: "less guest-physical space (page tables do not fit)".into(),
        });
    }
    // Accessed and dirty are set up front: otherwise the CPU writes them on first use, and in a
    // distributed guest every node's first touch of a 2 MiB region would pull the page-table
    // page over for a one-bit write.
    let flags = PTE_PRESENT | PTE_WRITABLE | PTE_USER | PTE_ACCESSED;
    mem.write_u64(PML4_ADDR, PDPT_ADDR | flags)?;
    for g in 0..span_gib {
        let pd = PD_ADDR + g * 4096;
        mem.write_u64(PDPT_ADDR + g * 8, pd | flags)?;
        let entries: Vec<u8> = (0..512u64)
            .flat_map(|j| ((g * GIB + j * (2 << 20)) | flags | PTE_DIRTY | PTE_HUGE).to_le_bytes())
            .collect();
        mem.write(pd, &entries)?;
    }
    Ok(entry)
}

fn segment(selector: u64, code: bool, dpl: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: u16::try_from(selector).expect("GDT selectors are below 64 KiB"),
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Puts vCPU `index` at the probe's entry in 64-bit mode at CPL0.
pub fn setup_vcpu(
    fd: &VcpuFd,
    index: usize,
    entry: ProbeEntry,
    layout: &Layout,
    node: u32,
    tsc_khz: u32,
    arg: u64,
) -> Result<(), LoaderError> {
    let err = |source| LoaderError::Registers {
        vcpu: index,
        source,
    };
    let i = index as u64;
    let mut sregs: kvm_sregs = fd.get_sregs().map_err(err)?;
    sregs.cs = segment(KERNEL_CS, true, 0);
    for s in [
        &mut sregs.ds,
        &mut sregs.es,
        &mut sregs.fs,
        &mut sregs.gs,
        &mut sregs.ss,
    ] {
        *s = segment(KERNEL_DS, false, 0);
    }
    sregs.tr = kvm_segment {
        base: TSS_ADDR + i * TSS_SLOT,
        limit: u32::try_from(TSS_LIMIT).expect("a TSS is a few hundred bytes"),
        selector: u16::try_from(TSS_SELECTOR_BASE + i * 16)
            .expect("probe guests have at most PROBE_MAX_VCPUS vCPUs"),
        type_: 0xb,
        present: 1,
        s: 0,
        ..Default::default()
    };
    sregs.gdt.base = GDT_ADDR;
    let vcpus = u16::try_from(layout.vcpu_count)
        .expect("probe guests have at most PROBE_MAX_VCPUS vCPUs (checked above)");
    sregs.gdt.limit = (5 * 8 + vcpus * 16) - 1;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 256 * 16 - 1;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA;
    fd.set_sregs(&sregs).map_err(err)?;

    let block = STACKS_ADDR + i * STACK_BLOCK;
    let regs = kvm_regs {
        rip: entry.entry,
        rflags: 0x2,
        rsp: block + KERNEL_STACK_TOP,
        rdi: i,
        rsi: u64::from(layout.vcpu_count),
        rdx: layout.memory_size,
        rcx: u64::from(tsc_khz),
        r8: u64::from(node),
        r9: u64::from(layout.node_count()),
        r10: block + STACK_BLOCK,
        r11: arg,
        ..Default::default()
    };
    fd.set_regs(&regs).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_built_in_probe_has_a_valid_header() {
        let mut n = 0;
        for name in crate::probe::names() {
            let img = crate::probe::image(name).unwrap();
            let (entry, stubs) = parse_image(name, img).unwrap();
            assert!(entry.entry > PROBE_LOAD_ADDR);
            assert_eq!(stubs.len(), 256);
            n += 1;
        }
        assert!(n >= 1);
    }

    #[test]
    fn rejects_images_that_are_not_probes() {
        assert!(matches!(
            parse_image("x", b"not a probe at all, no"),
            Err(LoaderError::BadImage { .. })
        ));
        let mut img = crate::probe::image("hello").unwrap().to_vec();
        img[8..16].copy_from_slice(&0x10u64.to_le_bytes());
        let e = parse_image("hello", &img).unwrap_err().to_string();
        assert!(e.contains("entry outside the image"), "{e}");
        assert!(parse_image(
            "big",
            &vec![0u8; crate::convert::usize_from(PROBE_IMAGE_MAX) + 1]
        )
        .is_err());
    }
}
