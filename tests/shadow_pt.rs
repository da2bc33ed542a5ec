//! Stale shadow translations after the DSM replaces a guest page-table page, on this host's real
//! KVM, in one process and without a cluster (see `vmm::distributed::shadow_zap`).
//!
//! A 4 MiB guest lives in `UffdGuestPages` memory behind a `ShadowZap`; every page is installed
//! through the wrapper before the vCPU runs. Each round the host enters the guest at CPL0, which
//! reloads CR3 and does `invlpg V` (emulated on kvm_pvm), then `iretq`s to CPL3 code that loads
//! `[V]` natively and reports it on port 0x10. Between rounds the host replaces a page-table page
//! the way the DSM does (`drop_page`, then `install` of the new content) and checks which frame the
//! CPL3 load reaches.
//!
//! The cases that show the bug (the same replacement without the zap must read the old frame) run
//! only where KVM shadows guest page tables (`kvm_pvm`); elsewhere they are reported SKIPPED with
//! the reason, never as passed. `cost` prints what a drop costs with and without the zap.
//!
//! A plain-main harness (`harness = false`), so that skips are visible: `cargo test --release -p
//! vmm --test shadow_pt [-- NAME...]`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use dsm::{Access, FaultSource, GuestPages, PageContent, PageFault, UffdGuestPages, PAGE_SIZE};
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm::distributed::shadow_zap::ShadowZap;
use vmm::hypervisor::{Hypervisor, KvmVm};

const MEM: usize = 4 << 20;
const PAGES: u64 = (MEM / PAGE_SIZE) as u64;
const CODE: u64 = 0x1000;
const GDT: u64 = 0x2000;
const PML4: u64 = 0x3000;
const PDPT: u64 = 0x4000;
const PD0: u64 = 0x5000;
const PT0: u64 = 0x6000;
const STACK_TOP: u64 = 0x8000;
/// Page directory for 1 GiB..: entry 0 points at page table `P`.
const PD2: u64 = 0x9000;
/// The page table replaced in the leaf case: entry 0 maps `V` to frame `A`.
const P: u64 = 0xA000;
/// A second page table, entry 0 mapping `V` to `B`.
const P2: u64 = 0xB000;
const A: u64 = 0x10000;
const B: u64 = 0x11000;
/// Present, writable, user, accessed, dirty (KVM then never writes A/D bits).
const FLAGS: u64 = 0x67;
const PAT_A: u32 = 0xAAAA_AAAA;
const PAT_B: u32 = 0xBBBB_BBBB;
const REPORT_PORT: u16 = 0x10;

/// CPL0 at 0x1000: `mov rax,cr3; mov cr3,rax; invlpg [V]; push 0x23; push 0x8000; push 0x3002;
/// push 0x1b; push 0x1100; iretq`. CPL3 at 0x1100: `mov eax,[V]; out 0x10,eax; jmp 0x1100`.
const CPL0_CODE: [u8; 0x23] = [
    0x0f, 0x20, 0xd8, 0x0f, 0x22, 0xd8, 0x0f, 0x01, 0x3c, 0x25, 0x00, 0x00, 0x00, 0x40, 0x6a, 0x23,
    0x68, 0x00, 0x80, 0x00, 0x00, 0x68, 0x02, 0x30, 0x00, 0x00, 0x6a, 0x1b, 0x68, 0x00, 0x11, 0x00,
    0x00, 0x48, 0xcf,
];
const CPL3_CODE: [u8; 11] = [
    0x8b, 0x04, 0x25, 0x00, 0x00, 0x00, 0x40, 0xe7, 0x10, 0xeb, 0xf5,
];

type Pages = ShadowZap<UffdGuestPages>;

fn page_of(words: &[(usize, u64)]) -> Box<[u8; PAGE_SIZE]> {
    let mut bytes = Box::new([0u8; PAGE_SIZE]);
    for &(i, w) in words {
        bytes[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
    }
    bytes
}

fn filled(pattern: u32) -> Box<[u8; PAGE_SIZE]> {
    let mut bytes = Box::new([0u8; PAGE_SIZE]);
    for chunk in bytes.chunks_exact_mut(4) {
        chunk.copy_from_slice(&pattern.to_le_bytes());
    }
    bytes
}

/// The initial content of guest page `page`, and whether it is installed writable.
fn initial_page(page: u64, a_writable: bool) -> (Box<[u8; PAGE_SIZE]>, bool) {
    let gpa = page << 12;
    match gpa {
        CODE => {
            let mut b = Box::new([0u8; PAGE_SIZE]);
            b[..CPL0_CODE.len()].copy_from_slice(&CPL0_CODE);
            b[0x100..0x100 + CPL3_CODE.len()].copy_from_slice(&CPL3_CODE);
            (b, false)
        }
        GDT => (
            page_of(&[
                (1, 0x00af_9b00_0000_ffff),
                (2, 0x00cf_9300_0000_ffff),
                (3, 0x00af_fb00_0000_ffff),
                (4, 0x00cf_f300_0000_ffff),
            ]),
            true,
        ),
        PML4 => (page_of(&[(0, PDPT | FLAGS)]), true),
        PDPT => (page_of(&[(0, PD0 | FLAGS), (1, PD2 | FLAGS)]), true),
        PD0 => (page_of(&[(0, PT0 | FLAGS)]), true),
        PT0 => {
            let words: Vec<(usize, u64)> =
                (1..512).map(|i| (i, (i as u64) << 12 | FLAGS)).collect();
            (page_of(&words), true)
        }
        PD2 => (page_of(&[(0, P | FLAGS)]), true),
        P => (page_of(&[(0, A | FLAGS)]), true),
        P2 => (page_of(&[(0, B | FLAGS)]), true),
        A => (filled(PAT_A), a_writable),
        B => (filled(PAT_B), false),
        // Low 2 MiB: mixed states (every third page writable); above: all read-only.
        _ => (
            Box::new([0u8; PAGE_SIZE]),
            gpa < STACK_TOP || (page < 512 && page % 3 == 0),
        ),
    }
}

fn segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 11 } else { 3 },
        present: 1,
        dpl: 0,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        ..Default::default()
    }
}

/// A one-vCPU guest over uffd memory behind a `ShadowZap`.
struct Guest {
    pages: Arc<Pages>,
    vcpu: VcpuFd,
    sregs: kvm_sregs,
    faults: Arc<Mutex<Vec<PageFault>>>,
    stop: Arc<AtomicBool>,
    fault_thread: Option<std::thread::JoinHandle<()>>,
    _vm: KvmVm,
}

impl Guest {
    fn new(zap: bool, a_writable: bool) -> Result<Guest, String> {
        let inner = UffdGuestPages::map_anonymous(MEM).map_err(|e| e.to_string())?;
        let pages = Arc::new(ShadowZap::new(inner, zap));
        for page in 0..PAGES {
            let (bytes, writable) = initial_page(page, a_writable);
            pages
                .install(page, PageContent::Bytes(&bytes), writable)
                .map_err(|e| e.to_string())?;
        }
        // Any uffd fault would be a bug of the test (every page is present and nothing writes a
        // read-only one): resolve it so nothing hangs, and record it to fail the case.
        let faults = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let fault_thread = {
            let (pages, faults, stop) = (pages.clone(), faults.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut batch = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    batch.clear();
                    if pages.wait_faults(&mut batch).is_err() {
                        return;
                    }
                    for f in &batch {
                        let _ = match f.access {
                            Access::Write => pages.make_writable(f.page),
                            Access::Read => pages.install(f.page, PageContent::Zero, true),
                        };
                        let _ = pages.wake(f.page);
                    }
                    if let Ok(mut all) = faults.lock() {
                        all.extend_from_slice(&batch);
                    }
                }
            })
        };
        let hv = Hypervisor::open().map_err(|e| e.to_string())?;
        let vm = hv.create_vm().map_err(|e| e.to_string())?;
        let host = pages.inner().host_address() as u64;
        // SAFETY: the mapping belongs to `pages`, which the Guest keeps alive longer than the VM
        // (fields drop in order: `pages` is an Arc also held by the fault thread, joined on drop).
        unsafe { vm.add_memory(0, 0, MEM as u64, host) }.map_err(|e| e.to_string())?;
        let vcpu = vm.create_vcpu(0).map_err(|e| e.to_string())?;
        let mut sregs = vcpu.get_sregs().map_err(|e| e.to_string())?;
        sregs.cs = segment(0x08, true);
        let data = segment(0x10, false);
        (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
        sregs.tr = kvm_segment {
            base: 0x2800,
            limit: 0x67,
            selector: 0x28,
            type_: 11,
            present: 1,
            ..Default::default()
        };
        sregs.gdt.base = GDT;
        sregs.gdt.limit = 0x37;
        sregs.idt.base = 0;
        sregs.idt.limit = 0;
        sregs.cr0 = 0x8005_0033;
        sregs.cr4 = 0x20;
        sregs.efer = 0x500;
        sregs.cr3 = PML4;
        Ok(Guest {
            pages,
            vcpu,
            sregs,
            faults,
            stop,
            fault_thread: Some(fault_thread),
            _vm: vm,
        })
    }

    /// One round: CPL0 flushes (CR3 reload, `invlpg V`), CPL3 loads `[V]`; returns what it read.
    fn read_v(&mut self) -> Result<u32, String> {
        self.vcpu
            .set_sregs(&self.sregs)
            .map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
        let regs = kvm_regs {
            rip: CODE,
            rsp: STACK_TOP,
            rflags: 2,
            ..Default::default()
        };
        self.vcpu
            .set_regs(&regs)
            .map_err(|e| format!("KVM_SET_REGS: {e}"))?;
        for _ in 0..1000 {
            match self.vcpu.run() {
                Ok(VcpuExit::IoOut(REPORT_PORT, data)) => {
                    let mut b = [0u8; 4];
                    let n = data.len().min(4);
                    b[..n].copy_from_slice(&data[..n]);
                    let faults = self.faults.lock().map(|f| f.clone()).unwrap_or_default();
                    if !faults.is_empty() {
                        return Err(format!("unexpected uffd faults: {faults:?}"));
                    }
                    return Ok(u32::from_le_bytes(b));
                }
                Ok(VcpuExit::Intr) | Err(_) => continue,
                Ok(other) => {
                    let what = format!("{other:?}");
                    let rip = self.vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                    return Err(format!("unexpected exit {what} (rip {rip:#x})"));
                }
            }
        }
        Err("the guest never reported".into())
    }

    /// Replaces a page as the DSM does when another node wrote it: drop, then install.
    fn replace(&self, gpa: u64, bytes: &[u8; PAGE_SIZE]) -> Result<(), String> {
        self.pages.drop_page(gpa >> 12).map_err(|e| e.to_string())?;
        self.pages
            .install(gpa >> 12, PageContent::Bytes(bytes), true)
            .map_err(|e| e.to_string())
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.pages.interrupt();
        if let Some(t) = self.fault_thread.take() {
            let _ = t.join();
        }
    }
}

fn name_of(v: u32) -> &'static str {
    match v {
        PAT_A => "A (old frame)",
        PAT_B => "B (new frame)",
        _ => "neither A nor B",
    }
}

fn expect(what: &str, got: u32, want: u32) -> Result<(), String> {
    if got == want {
        Ok(())
    } else {
        Err(format!(
            "{what}: CPL3 read {got:#x} = {}, expected {}",
            name_of(got),
            name_of(want)
        ))
    }
}

/// Replaces the leaf table `P` (entry 0: A -> B); returns what CPL3 reads after it.
fn leaf_case(zap: bool) -> Result<u32, String> {
    let mut g = Guest::new(zap, false)?;
    expect("before", g.read_v()?, PAT_A)?;
    expect("before, again", g.read_v()?, PAT_A)?;
    g.replace(P, &page_of(&[(0, B | FLAGS)]))?;
    let after = g.read_v()?;
    if zap {
        let s = g.pages.stats();
        if s.calls == 0 {
            return Err(format!("the drop re-protected nothing: {s:?}"));
        }
        expect("after the first replacement", after, PAT_B)?;
        // And back: the zap must work again on the page it installed.
        g.replace(P, &page_of(&[(0, A | FLAGS)]))?;
        expect("after replacing it back", g.read_v()?, PAT_A)?;
    }
    Ok(after)
}

/// Replaces the directory `PD2` (entry 0: P -> P2); returns what CPL3 reads after it.
fn directory_case(zap: bool) -> Result<u32, String> {
    let mut g = Guest::new(zap, true)?;
    expect("before", g.read_v()?, PAT_A)?;
    g.replace(PD2, &page_of(&[(0, P2 | FLAGS)]))?;
    let after = g.read_v()?;
    if zap {
        expect("after the replacement", after, PAT_B)?;
        let s = g.pages.stats();
        if s.tables_read == 0 {
            return Err(format!("the zap did not read the old page table: {s:?}"));
        }
    }
    Ok(after)
}

type Outcome = Result<Option<String>, String>;
type Case = (&'static str, fn() -> Outcome);

fn with_zap_leaf() -> Outcome {
    leaf_case(true).map(|_| None)
}

fn with_zap_directory() -> Outcome {
    directory_case(true).map(|_| None)
}

fn skip_reason() -> Option<String> {
    (!Hypervisor::is_pvm_host()).then(|| {
        "this KVM is not kvm_pvm (no /sys/module/kvm_pvm): it does not shadow guest page \
         tables, so the stale translation cannot occur here"
            .to_string()
    })
}

fn without_zap_leaf_is_stale() -> Outcome {
    if let Some(reason) = skip_reason() {
        return Ok(Some(reason));
    }
    expect(
        "leaf table replaced without the zap",
        leaf_case(false)?,
        PAT_A,
    )
    .map(|_| None)
}

fn without_zap_directory_is_stale() -> Outcome {
    if let Some(reason) = skip_reason() {
        return Ok(Some(reason));
    }
    expect(
        "directory replaced without the zap",
        directory_case(false)?,
        PAT_A,
    )
    .map(|_| None)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Microseconds per `drop_page` of a page with `content`, zap on and off (median of `reps`).
fn drop_cost(
    content: &[u8; PAGE_SIZE],
    page: u64,
    reps: usize,
) -> Result<(f64, f64, String), String> {
    let mut out = [0.0; 2];
    let mut calls = String::new();
    for (i, zap) in [true, false].into_iter().enumerate() {
        let mut g = Guest::new(zap, true)?;
        g.read_v()?;
        g.pages.drop_page(page).map_err(|e| e.to_string())?;
        let mut samples = Vec::with_capacity(reps);
        for _ in 0..reps {
            g.pages
                .install(page, PageContent::Bytes(content), false)
                .map_err(|e| e.to_string())?;
            g.read_v()?;
            let t = Instant::now();
            g.pages.drop_page(page).map_err(|e| e.to_string())?;
            samples.push(t.elapsed().as_secs_f64() * 1e6);
        }
        g.pages
            .install(page, PageContent::Zero, true)
            .map_err(|e| e.to_string())?;
        out[i] = median(samples);
        if zap {
            let s = g.pages.stats();
            calls = format!(
                "{} calls, {} pages, {} tables read",
                s.calls / reps as u64,
                s.pages / reps as u64,
                s.tables_read / reps as u64
            );
        }
    }
    Ok((out[0], out[1], calls))
}

/// Prints the cost of a drop with the zap on and off, for page-table-like and data-like pages.
fn cost() -> Outcome {
    let victim = 0x1ff; // a page the guest does not use
    let table = |f: &dyn Fn(u64) -> u64| {
        let words: Vec<(usize, u64)> = (0..512).map(|i| (i, f(i as u64) << 12 | FLAGS)).collect();
        page_of(&words)
    };
    let mut text = Box::new([0u8; PAGE_SIZE]);
    let line = b"spanvm: a node's copy of a guest page; 0123456789 abcdefghijklmnopqrstuvwxyz\n";
    for (i, b) in text.iter_mut().enumerate() {
        *b = line[i % line.len()];
    }
    let mut random = Box::new([0u8; PAGE_SIZE]);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for chunk in random.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    let small_ints = page_of(&(0..512).map(|i| (i, (i as u64) | 1)).collect::<Vec<_>>());
    let cases: Vec<(&str, Box<[u8; PAGE_SIZE]>)> = vec![
        ("zero page", Box::new([0u8; PAGE_SIZE])),
        ("text", text),
        ("random bytes", random),
        ("odd small integers 0..511", small_ints),
        ("PT: 1 entry", page_of(&[(0, A | FLAGS)])),
        ("PT: 512 contiguous frames", table(&|i| 512 + i)),
        ("PT: 512 frames, stride 2", table(&|i| 2 * i)),
        ("PT: 64 frames, stride 2", {
            let words: Vec<(usize, u64)> =
                (0..64).map(|i| (i, (2 * i as u64) << 12 | FLAGS)).collect();
            page_of(&words)
        }),
        (
            "PD: 1 entry -> PT0 (511 frames)",
            page_of(&[(0, PT0 | FLAGS)]),
        ),
        (
            "PD: 1 PS entry (2 MiB)",
            page_of(&[(1, (1 << 21) | FLAGS | 0x80)]),
        ),
    ];
    println!("    drop_page cost, µs (median of 15; zap on / off / difference):");
    for (name, content) in &cases {
        let (on, off, calls) = drop_cost(content, victim, 15)?;
        println!(
            "    {name:<34} {on:>9.1} {off:>7.1} {:>9.1}   per drop: {calls}",
            on - off
        );
    }
    Ok(None)
}

fn main() {
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let cases: [Case; 5] = [
        ("leaf_table_replacement_is_seen_with_the_zap", with_zap_leaf),
        (
            "directory_replacement_is_seen_with_the_zap",
            with_zap_directory,
        ),
        (
            "leaf_table_replacement_is_stale_without_the_zap",
            without_zap_leaf_is_stale,
        ),
        (
            "directory_replacement_is_stale_without_the_zap",
            without_zap_directory_is_stale,
        ),
        ("cost", cost),
    ];
    let mut failed = 0;
    for (name, case) in cases {
        if !filters.is_empty() && !filters.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        match case() {
            Ok(None) => println!("test {name} ... ok"),
            Ok(Some(reason)) => println!("test {name} ... SKIPPED: {reason}"),
            Err(e) => {
                println!("test {name} ... FAILED: {e}");
                failed += 1;
            }
        }
    }
    if failed > 0 {
        println!("{failed} failed");
        std::process::exit(1);
    }
}
