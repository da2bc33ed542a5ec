//! Linux boot: the kernel, initrd and command line in guest memory, the zero page of the
//! 64-bit boot protocol with its e820 map, the identity-mapped page tables and GDT the kernel
//! is entered with, the ACPI tables that describe the platform (every vCPU, one NUMA node per
//! spanvm node), and the registers of the boot vCPU and of application processors woken by
//! SIPI.
//!
//! How the master boots a guest:
//! 1. [`write_acpi`] and [`load_linux`] (in either order: the RSDP has a fixed address,
//!    [`ACPI_RSDP_ADDR`], which [`load_linux`] stores in the zero page; both must run before
//!    the BSP does);
//! 2. [`setup_bsp`] on vCPU 0 with the [`LinuxBoot`] from step 1;
//! 3. every other vCPU waits until its local APIC receives INIT and then SIPI, and is put in
//!    real mode at the SIPI page with [`setup_ap_for_sipi`].
//!
//! Where everything lives in guest memory is in [`memory_map`].

mod acpi;
mod e820;
mod kernel;
mod loader;
pub mod memory_map;
mod page_tables;
mod registers;
mod vm_memory_view;

#[cfg(test)]
mod tests;

use std::path::PathBuf;

use crate::memory::MemoryError;

pub use acpi::{build_acpi, write_acpi, AcpiTable, AcpiTables, VirtioMmioDevice};
pub use e820::{e820_map, E820Entry, E820_ACPI, E820_RAM, E820_RESERVED};
pub use kernel::KernelKind;
pub use loader::{load_linux, LinuxBoot};
pub use memory_map::ACPI_RSDP_ADDR;
pub use page_tables::write_page_tables;
pub use registers::{set_boot_msrs, setup_ap_for_sipi, setup_bsp};
pub use vm_memory_view::SharedVmMemory;

/// Errors of loading and starting a Linux guest.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// A file named in the guest configuration cannot be opened or read.
    #[error("cannot read the {what} {path}: {source}")]
    Missing {
        /// "kernel image" or "initrd".
        what: &'static str,
        /// The file as the configuration names it.
        path: PathBuf,
        /// Why opening or reading it failed.
        source: std::io::Error,
    },
    /// The kernel file is neither an x86-64 ELF `vmlinux` nor a bzImage.
    #[error("{path} is not a Linux kernel spanvm can boot: {reason}")]
    NotAKernel {
        /// The kernel file.
        path: PathBuf,
        /// What about its header is not a bootable x86-64 kernel.
        reason: String,
    },
    /// linux-loader refused the image (a damaged file, or one that does not fit in RAM).
    #[error("cannot load the kernel {path}: {source}")]
    KernelLoad {
        /// The kernel file.
        path: PathBuf,
        /// linux-loader's reason.
        source: linux_loader::loader::Error,
    },
    /// The loaded kernel (with the room its decompressor needs) ends beyond low RAM.
    #[error("the kernel {path} needs guest memory up to {end:#x}, but RAM below 4 GiB ends at {ram_end:#x}: give the guest more memory")]
    KernelTooLarge {
        /// The kernel file.
        path: PathBuf,
        /// First guest-physical address past the kernel and its decompression room.
        end: u64,
        /// First guest-physical address past RAM below 4 GiB.
        ram_end: u64,
    },
    /// The initrd does not fit between the kernel and the top of low memory.
    #[error("the initrd {path} is {size} bytes but only {room} bytes of guest memory are free for it (between the kernel and the top of memory below 4 GiB): give the guest more memory or use a smaller initrd")]
    InitrdTooLarge {
        /// The initrd file.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
        /// Bytes of low guest memory free between the kernel and the top of RAM below 4 GiB.
        room: u64,
    },
    /// The command line is longer than the kernel accepts.
    #[error("the kernel command line is {len} bytes, over this kernel's limit of {max} bytes")]
    CmdlineTooLong {
        /// Length of the command line in bytes, without the terminating NUL.
        len: usize,
        /// The kernel's limit from its boot protocol header.
        max: usize,
    },
    /// The command line contains a NUL byte, which would cut it short.
    #[error("the kernel command line contains a NUL byte at offset {at}")]
    CmdlineNul {
        /// Byte offset of the NUL in the command line.
        at: usize,
    },
    /// The guest layout cannot hold a Linux boot (no RAM at address 0, or too little).
    #[error("this guest layout cannot boot Linux: {problem}")]
    Layout {
        /// What the layout lacks.
        problem: String,
    },
    /// The guest memory mapping could not be shown to linux-loader.
    #[error("cannot hand guest memory to the kernel loader: {0}")]
    MemoryView(String),
    /// The ACPI tables outgrow the area reserved for them.
    #[error("the ACPI tables need {size} bytes but the ACPI area holds {room}: use fewer vCPUs, nodes or devices")]
    AcpiTooLarge {
        /// Bytes the tables need.
        size: u64,
        /// Bytes of the ACPI area.
        room: u64,
    },
    /// Writing guest memory failed.
    #[error("writing boot data into guest memory: {0}")]
    Memory(#[from] MemoryError),
    /// KVM refused a register or MSR setting.
    #[error("setting the vCPU's {what} for boot: {source}")]
    Registers {
        /// The register group or MSR being set.
        what: &'static str,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// KVM accepted fewer boot MSRs than given.
    #[error("KVM set only {set} of the {wanted} boot MSRs")]
    Msrs {
        /// How many MSRs KVM set.
        set: usize,
        /// How many were given.
        wanted: usize,
    },
}
