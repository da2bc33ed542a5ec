//! Helpers of the boot tests: layouts from real cluster descriptions, hand-made kernel
//! images, and `iasl -d`.

use std::path::{Path, PathBuf};
use std::process::Command;

use resources::{ClusterDescription, Layout};

/// The layout of a cluster description with `memory_mib` MiB and `node_vcpus[i]` vCPUs on
/// node `i` (numbered in node order), parsed and validated by `resources`.
pub fn layout(memory_mib: u64, node_vcpus: &[u32]) -> Layout {
    let total: u32 = node_vcpus.iter().sum();
    let mut text =
        format!("[guest]\nvcpus = {total}\nmemory_mib = {memory_mib}\nprobe = \"hello\"\n");
    let mut next = 0;
    for (id, &n) in node_vcpus.iter().enumerate() {
        let vcpus: Vec<String> = (next..next + n).map(|v| v.to_string()).collect();
        next += n;
        text += &format!(
            "\n[[nodes]]\nid = {id}\naddress = \"127.0.0.1:{}\"\nvcpus = [{}]\n",
            7300 + id,
            vcpus.join(", ")
        );
    }
    ClusterDescription::parse(&text, Path::new("/nonexistent/cluster.toml"))
        .unwrap()
        .layout
}

/// Where the hand-made ELF kernel is linked and entered.
pub const ELF_ENTRY: u64 = 0x100_0000;

/// A minimal x86-64 ELF executable: one PT_LOAD segment holding `code` at physical
/// [`ELF_ENTRY`] (virtual address in the kernel's high map, as a vmlinux has it), `memsz`
/// bytes in memory, entry at its start.
pub fn tiny_elf(code: &[u8], memsz: u64) -> Vec<u8> {
    let phoff = 64u64;
    let code_off = phoff + 56;
    let mut f = Vec::new();
    f.extend_from_slice(b"\x7fELF");
    f.extend_from_slice(&[2, 1, 1, 0]); // 64-bit, little-endian, version 1, System V
    f.extend_from_slice(&[0; 8]);
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&ELF_ENTRY.to_le_bytes()); // e_entry
    f.extend_from_slice(&phoff.to_le_bytes());
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    f.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    f.extend_from_slice(&64u16.to_le_bytes()); // e_ehsize
    f.extend_from_slice(&56u16.to_le_bytes()); // e_phentsize
    f.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    f.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    f.extend_from_slice(&0u16.to_le_bytes());
    f.extend_from_slice(&0u16.to_le_bytes());
    assert_eq!(f.len() as u64, phoff);
    f.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    f.extend_from_slice(&5u32.to_le_bytes()); // R X
    f.extend_from_slice(&code_off.to_le_bytes());
    f.extend_from_slice(&(0xffff_ffff_8000_0000u64 + ELF_ENTRY).to_le_bytes());
    f.extend_from_slice(&ELF_ENTRY.to_le_bytes());
    f.extend_from_slice(&(code.len() as u64).to_le_bytes());
    f.extend_from_slice(&memsz.to_le_bytes());
    f.extend_from_slice(&0x20_0000u64.to_le_bytes());
    assert_eq!(f.len() as u64, code_off);
    f.extend_from_slice(code);
    f
}

/// Fields of a hand-made bzImage header.
pub struct BzHeader {
    pub version: u16,
    pub xloadflags: u16,
    pub cmdline_size: u32,
    pub init_size: u32,
    pub initrd_addr_max: u32,
}

impl Default for BzHeader {
    fn default() -> Self {
        BzHeader {
            version: 0x020f,
            xloadflags: 0x3, // 64-bit entry, may be loaded above 4 GiB
            cmdline_size: 2047,
            init_size: 0x40_0000,
            initrd_addr_max: 0x7fff_ffff,
        }
    }
}

/// Size of the hand-made bzImage's real-mode part (boot sector + one setup sector).
pub const BZ_SETUP_SIZE: usize = 1024;

/// A bzImage: boot sector and one setup sector carrying `h`, then a protected-mode part of
/// 0x200 bytes of `nop` (where the 32-bit entry would be) followed by `code64`, the 64-bit
/// entry.
pub fn tiny_bzimage(h: &BzHeader, code64: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; BZ_SETUP_SIZE];
    let put =
        |f: &mut Vec<u8>, at: usize, bytes: &[u8]| f[at..at + bytes.len()].copy_from_slice(bytes);
    put(&mut f, 0x1f1, &[1]); // setup_sects
    put(&mut f, 0x1fe, &0xaa55u16.to_le_bytes());
    put(&mut f, 0x202, b"HdrS");
    put(&mut f, 0x206, &h.version.to_le_bytes());
    put(&mut f, 0x211, &[1]); // loadflags: LOADED_HIGH
    put(&mut f, 0x214, &0x10_0000u32.to_le_bytes()); // code32_start
    put(&mut f, 0x22c, &h.initrd_addr_max.to_le_bytes());
    put(&mut f, 0x230, &0x20_0000u32.to_le_bytes()); // kernel_alignment
    put(&mut f, 0x234, &[1]); // relocatable
    put(&mut f, 0x236, &h.xloadflags.to_le_bytes());
    put(&mut f, 0x238, &h.cmdline_size.to_le_bytes());
    put(&mut f, 0x258, &0x100_0000u64.to_le_bytes()); // pref_address
    put(&mut f, 0x260, &h.init_size.to_le_bytes());
    f.extend_from_slice(&[0x90; 0x200]);
    f.extend_from_slice(code64);
    f
}

/// Writes `bytes` to `dir/name` and returns the path.
pub fn file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Bytes that are no kernel: a fixed pseudo-random sequence (xorshift).
pub fn random_bytes(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect()
}

/// Disassembles one ACPI table with `iasl -d` and returns the `.dsl` text. Fails the test if
/// iasl is missing, exits non-zero, reports an error, or finds a bad checksum.
pub fn iasl_disassemble(name: &str, table: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let input = file(dir.path(), &format!("{name}.dat"), table);
    let output = match Command::new("iasl").arg("-d").arg(&input).current_dir(dir.path()).output() {
        Ok(o) => o,
        Err(e) => panic!(
            "cannot run iasl ({e}): the ACPI tests need it; install Debian's acpica-tools package (apt-get install -y acpica-tools)"
        ),
    };
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "iasl -d {name} failed:\n{log}");
    let dsl = std::fs::read_to_string(dir.path().join(format!("{name}.dsl")))
        .unwrap_or_else(|e| panic!("iasl -d {name} wrote no .dsl ({e}):\n{log}"));
    for bad in ["Error", "Incorrect checksum", "Invalid", "**** "] {
        assert!(!log.contains(bad), "iasl -d {name} reports `{bad}`:\n{log}");
        assert!(
            !dsl.contains(bad),
            "iasl's {name}.dsl contains `{bad}`:\n{dsl}"
        );
    }
    dsl
}

/// The `Name : Value` fields of an iasl data-table disassembly, in order, the value's
/// trailing `[decoded]` part dropped.
pub fn dsl_fields(dsl: &str) -> Vec<(String, String)> {
    dsl.lines()
        .filter_map(|line| {
            let rest = line.trim_start().strip_prefix('[')?;
            let (_, rest) = rest.split_once(']')?;
            let (key, value) = rest.split_once(" : ")?;
            let value = value.split(" [").next().unwrap_or(value);
            Some((key.trim().to_string(), value.trim().to_string()))
        })
        .collect()
}

/// The values of every field named `key`, in order.
pub fn values<'a>(fields: &'a [(String, String)], key: &str) -> Vec<&'a str> {
    fields
        .iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect()
}

/// Parses a hexadecimal iasl value.
pub fn hex(value: &str) -> u64 {
    u64::from_str_radix(value.trim(), 16).unwrap_or_else(|e| panic!("`{value}` is not hex: {e}"))
}

/// The value of the first field `key` that follows the field `marker` (for the fields of a
/// generic address structure, say).
pub fn value_after<'a>(fields: &'a [(String, String)], marker: &str, key: &str) -> &'a str {
    let start = fields
        .iter()
        .position(|(k, _)| k == marker)
        .unwrap_or_else(|| panic!("no field `{marker}`"));
    fields[start..]
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no field `{key}` after `{marker}`"))
}

/// Port the test kernels write to.
pub const ENTRY_PORT: u16 = 0x1234;

/// 64-bit code of the test kernels: reads the "HdrS" magic through RSI (the zero page) and
/// writes it to [`ENTRY_PORT`], then halts.
pub const ENTRY_CODE: [u8; 12] = [
    0x8b, 0x86, 0x02, 0x02, 0x00, 0x00, // mov eax, [rsi + 0x202]
    0x66, 0xba, 0x34, 0x12, // mov dx, 0x1234
    0xef, // out dx, eax
    0xf4, // hlt
];

/// The zero page as `load_linux` left it in `mem`.
pub fn read_zero_page(
    mem: &crate::memory::GuestMemory,
) -> linux_loader::loader::bootparam::boot_params {
    use vm_memory::ByteValued;
    let mut params = linux_loader::loader::bootparam::boot_params::default();
    mem.read(
        crate::boot::memory_map::ZERO_PAGE_ADDR,
        params.as_mut_slice(),
    )
    .unwrap();
    params
}
