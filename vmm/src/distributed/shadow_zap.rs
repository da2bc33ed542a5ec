//! [`ShadowZap`]: guest memory for the DSM on a host whose KVM shadows guest page tables
//! (`kvm_pvm`, see `HOST.md`, "shadow page tables").
//!
//! There, KVM keeps a shadow page per guest page-table page and trusts it as long as the guest
//! does not write the page through KVM. When the DSM replaces a page (another node wrote it: the
//! local copy is dropped with `MADV_DONTNEED`, the new content installed later with
//! `UFFDIO_COPY`), the MMU notifier of the drop only removes KVM's mappings *of* the page as data.
//! If the page was a page table, the translations KVM derived from its old entries survive, and
//! native CPL3 guest code keeps using them even after the guest's `invlpg` or CR3 reload.
//!
//! The fix measured in `experiments/shadow-page-tables` (and again for this module, see
//! `notes/shadow_pt.md`): make KVM's MMU notifier fire on the frames the *old* entries pointed to;
//! KVM then drops every shadow entry mapping those frames, and the next access walks the guest
//! page tables afresh, faulting the new page-table content in through the DSM. Re-applying a
//! frame's *current* uffd protection (`UFFDIO_WRITEPROTECT` with the mode it already has) fires
//! the notifier and changes nothing else, so the DSM's page states stay as they are.
//!
//! [`ShadowZap`] wraps the DSM's [`GuestPages`] and forwards every call. It mirrors each page's
//! local mapping (not present / write-protected / writable) in an atomic byte per page, and in
//! [`GuestPages::drop_page`] it reads the page's old content first, reads it as 512 x86-64 entries
//! and, after the drop, re-applies the current protection to every old target frame that is in
//! guest RAM and mapped here:
//! - only entries with the present, user and accessed bits count: KVM sets the accessed bit of
//!   every guest entry it derives a shadow translation from, as the CPU does for its TLB, and a
//!   translation is usable at CPL3 only if every level allows user access. Supervisor-only
//!   translations need no zap: guest CPL0 code is run by KVM's emulator, which walks the guest
//!   page tables afresh (HOST.md), and native CPL3 code cannot use them. The filter matters for
//!   cost: kernel data pages full of small counters (run queues, timekeeping) otherwise look like
//!   tables that point at frame 0 and cost a scan and ioctls at every drop;
//! - an entry with the PS bit counts as the 2 MiB range it would map in a page directory (as a
//!   leaf entry the bit is PAT, and the 4 KiB frame lies inside that range);
//! - for an entry without PS, the frame itself (the page was a leaf table) and, if that frame is
//!   mapped here and looks like a page table, the frames *its* entries point to (the page was a
//!   page directory: KVM's notifier only removes leaf mappings, so only the final frames help —
//!   measured, the old page-table pages do not). Changes of present entries in PDPT and PML4
//!   pages are not covered (the walk would cover up to the whole of RAM).
//!
//! Frames are coalesced into runs of consecutive pages in the same state (at most 2 MiB each,
//! bridging gaps of up to 3 pages in that state), one `UFFDIO_WRITEPROTECT` per run. Content that is not a page table costs only the scan: its words
//! rarely have the present bit and a frame inside guest RAM.
//!
//! Concurrency: the DSM calls a page's operations under the lock of the page's shard, so calls
//! for one page never overlap, but a zap touches frames of other shards. Each mirror byte has a
//! lock bit: every forwarded state change holds its page's bit across the kernel call and the
//! mirror update, and a zap holds the bits of a run (taken in ascending page order, never more
//! than one run at a time) across its re-protection, so the state it re-applies is the one in
//! force. Nothing blocks while holding a bit.
//!
//! Only needed where KVM shadows guest page tables; [`ShadowZap::for_this_host`] turns it on only
//! on `kvm_pvm` hosts, elsewhere the wrapper only forwards (EPT: guest page tables are not
//! shadowed).

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::time::Instant;

use dsm::{
    FaultSource, GuestPages, MemoryError, PageContent, PageFault, UffdError, UffdGuestPages,
    PAGE_SIZE,
};

use crate::hypervisor::Hypervisor;

/// Entries in a page-table page.
pub const ENTRIES: usize = PAGE_SIZE / 8;

const PTE_PRESENT: u64 = 1;
const PTE_USER: u64 = 1 << 2;
const PTE_ACCESSED: u64 = 1 << 5;
/// The bits of an entry whose stale shadow translation native CPL3 code could still use.
const PTE_USED_BY_USER: u64 = PTE_PRESENT | PTE_USER | PTE_ACCESSED;
const PTE_PS: u64 = 1 << 7;
/// Address bits 12..51 of an entry.
const PTE_FRAME_MASK: u64 = 0x000f_ffff_ffff_f000;
/// Pages in a 2 MiB range.
const LARGE_PAGES: u64 = 512;
/// Longest run re-protected in one call (and so held locked at once).
const MAX_RUN: u64 = LARGE_PAGES;
/// Target spans this close are re-protected together, with the pages between them when those are
/// in the same state: a call costs several microseconds, a page in it about 0.1.
const MAX_GAP: u64 = 3;

const STATE_MASK: u8 = 0x3;
const LOCKED: u8 = 0x80;

/// A page's local mapping as the wrapper mirrors it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocalMapping {
    /// Not present (Invalid).
    NotPresent = 0,
    /// Present and write-protected (Shared).
    ReadOnly = 1,
    /// Present and writable (Modified).
    Writable = 2,
}

impl LocalMapping {
    fn from_bits(bits: u8) -> LocalMapping {
        match bits & STATE_MASK {
            1 => LocalMapping::ReadOnly,
            2 => LocalMapping::Writable,
            _ => LocalMapping::NotPresent,
        }
    }
}

/// What [`ShadowZap`] needs of the memory beyond [`GuestPages`].
pub trait ShadowTarget: GuestPages {
    /// Sets the write protection of `count` present pages from `first` to what it already is
    /// (`writable` false: write-protected), so that the kernel's MMU notifiers see the range.
    fn reapply_protection(&self, first: u64, count: u64, writable: bool)
        -> Result<(), MemoryError>;

    /// Reads a present page as 64-bit words (the guest may be writing it).
    fn read_entries(&self, page: u64, out: &mut [u64; ENTRIES]) -> Result<(), MemoryError>;
}

impl ShadowTarget for UffdGuestPages {
    fn reapply_protection(
        &self,
        first: u64,
        count: u64,
        writable: bool,
    ) -> Result<(), MemoryError> {
        self.set_write_protection(first, count, !writable)
    }

    fn read_entries(&self, page: u64, out: &mut [u64; ENTRIES]) -> Result<(), MemoryError> {
        if page >= UffdGuestPages::page_count(self) {
            return Err(MemoryError::PageOutOfRange {
                page,
                page_count: UffdGuestPages::page_count(self),
            });
        }
        let base = self
            .host_address()
            .wrapping_add(crate::convert::usize_from(page) * PAGE_SIZE)
            as *const u64;
        // SAFETY: `page` is inside the registered region (checked above), so the 4 KiB at `base`
        // are ours and aligned; the caller holds the page present, so the copy does not fault. As
        // for `read_page`, guest vCPUs may write the page meanwhile, which only makes a word stale.
        unsafe { std::ptr::copy_nonoverlapping(base, out.as_mut_ptr(), ENTRIES) };
        Ok(())
    }
}

/// Counters of the zaps done so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZapStats {
    /// Pages dropped through the wrapper while it was on.
    pub drops: u64,
    /// Of those, drops whose old content pointed at a frame mapped here.
    pub zaps: u64,
    /// `UFFDIO_WRITEPROTECT` calls made to re-apply protections.
    pub calls: u64,
    /// Pages covered by those calls.
    pub pages: u64,
    /// Lower-level tables read (entries of the dropped page that pointed at a mapped frame).
    pub tables_read: u64,
    /// Time spent scanning and re-protecting, in nanoseconds.
    pub nanos: u64,
}

impl std::fmt::Display for ZapStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "shadow zap: {} drops, {} with a zap, {} re-protections over {} pages, {} tables \
             read, {:.1} ms in all",
            self.drops,
            self.zaps,
            self.calls,
            self.pages,
            self.tables_read,
            std::time::Duration::from_nanos(self.nanos).as_secs_f64() * 1e3
        )
    }
}

#[derive(Default)]
struct Counters {
    drops: AtomicU64,
    zaps: AtomicU64,
    calls: AtomicU64,
    pages: AtomicU64,
    tables_read: AtomicU64,
    nanos: AtomicU64,
}

/// Guest memory that clears KVM's shadow translations derived from a dropped page (see the
/// module doc).
pub struct ShadowZap<P> {
    inner: P,
    /// Per page: [`LocalMapping`] bits and [`LOCKED`]; empty when off.
    states: Box<[AtomicU8]>,
    /// Entries whose frame has bits at or above this are not page-table entries.
    frame_limit: u64,
    counters: Counters,
    /// Fault injection for tests: installs left before one fails as a refused `UFFDIO_COPY`.
    installs_before_failure: Option<AtomicU64>,
    /// Fault injection for tests: installs of received data left before they install zeros.
    received_before_zero: Option<AtomicU64>,
}

/// Holds one page's lock bit; stores the (possibly updated) state on drop.
struct PageLock<'a> {
    cell: &'a AtomicU8,
    state: u8,
}

impl Drop for PageLock<'_> {
    fn drop(&mut self) {
        self.cell.store(self.state & STATE_MASK, Ordering::Release);
    }
}

/// Takes a page's lock bit. The holder may be inside an ioctl, and the waiter may be a
/// real-time receiver (`service_priority`) on the holder's core: `yield_now` would hand that
/// core to no one of lower priority, so past a short spin the waiter sleeps, which lets a
/// normally scheduled holder run.
fn lock_cell(cell: &AtomicU8) -> u8 {
    let mut spins = 0u32;
    loop {
        let current = cell.load(Ordering::Relaxed);
        if current & LOCKED == 0
            && cell
                .compare_exchange_weak(
                    current,
                    current | LOCKED,
                    Ordering::Acquire,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            return current & STATE_MASK;
        }
        spins += 1;
        if spins < 64 {
            std::hint::spin_loop();
        } else {
            std::thread::sleep(std::time::Duration::from_micros(20));
        }
    }
}

/// Physical address bits of this CPU (the guest sees the host's CPUID here); 52 if unknown.
fn physical_address_bits() -> u32 {
    let max_extended = std::arch::x86_64::__cpuid(0x8000_0000).eax;
    if max_extended < 0x8000_0008 {
        return 52;
    }
    match std::arch::x86_64::__cpuid(0x8000_0008).eax & 0xff {
        bits @ 32..=52 => bits,
        _ => 52,
    }
}

impl<P: ShadowTarget> ShadowZap<P> {
    /// Wraps `inner`, whose pages must all be not present (as after registration). With
    /// `enabled` false the wrapper only forwards.
    pub fn new(inner: P, enabled: bool) -> ShadowZap<P> {
        let count = if enabled {
            crate::convert::usize_from(inner.page_count())
        } else {
            0
        };
        ShadowZap {
            inner,
            states: (0..count).map(|_| AtomicU8::new(0)).collect(),
            frame_limit: 1u64 << (physical_address_bits() - 12),
            counters: Counters::default(),
            installs_before_failure: None,
            received_before_zero: None,
        }
    }

    /// Makes the install after the next `installs` fail as the kernel refusing `UFFDIO_COPY`
    /// (out of memory) would: the path of a real memory failure, for tests of what follows.
    pub fn fail_install_after(mut self, installs: u64) -> ShadowZap<P> {
        self.installs_before_failure = Some(AtomicU64::new(installs));
        self
    }

    /// Makes every install of received data after the next `installs` ones install zeros
    /// instead: the pages a DSM that lost its data would hand out, for tests that must catch it.
    /// Every one, not just the first: a zero page the owner takes back before the guest reads
    /// it proves nothing, and the next fetch of that page must not heal it.
    pub fn zero_received_pages_after(mut self, installs: u64) -> ShadowZap<P> {
        self.received_before_zero = Some(AtomicU64::new(installs));
        self
    }

    /// Wraps `inner`, on only where KVM shadows guest page tables (`kvm_pvm`).
    pub fn for_this_host(inner: P) -> ShadowZap<P> {
        ShadowZap::new(inner, Hypervisor::is_pvm_host())
    }

    /// Whether drops clear shadow translations.
    pub fn is_enabled(&self) -> bool {
        !self.states.is_empty()
    }

    /// The wrapped memory.
    pub fn inner(&self) -> &P {
        &self.inner
    }

    /// The mirrored mapping of `page` (`NotPresent` when off or out of range).
    pub fn local_mapping(&self, page: u64) -> LocalMapping {
        self.states
            .get(crate::convert::usize_from(page))
            .map_or(LocalMapping::NotPresent, |c| {
                LocalMapping::from_bits(c.load(Ordering::Acquire))
            })
    }

    /// The counters so far.
    pub fn stats(&self) -> ZapStats {
        let c = &self.counters;
        ZapStats {
            drops: c.drops.load(Ordering::Relaxed),
            zaps: c.zaps.load(Ordering::Relaxed),
            calls: c.calls.load(Ordering::Relaxed),
            pages: c.pages.load(Ordering::Relaxed),
            tables_read: c.tables_read.load(Ordering::Relaxed),
            nanos: c.nanos.load(Ordering::Relaxed),
        }
    }

    fn lock(&self, page: u64) -> Option<PageLock<'_>> {
        let cell = self.states.get(crate::convert::usize_from(page))?;
        let state = lock_cell(cell);
        Some(PageLock { cell, state })
    }

    /// Runs a state change of one page under its lock, mirroring `after` if it succeeds.
    fn change(
        &self,
        page: u64,
        after: LocalMapping,
        op: impl FnOnce() -> Result<(), MemoryError>,
    ) -> Result<(), MemoryError> {
        let Some(mut guard) = self.lock(page) else {
            return op();
        };
        op()?;
        guard.state = after as u8;
        Ok(())
    }

    /// Whether `entries` could be a page table here: every present entry's address fits the
    /// physical address width.
    fn looks_like_table(&self, entries: &[u64; ENTRIES]) -> bool {
        entries
            .iter()
            .filter(|&&e| e & PTE_USED_BY_USER == PTE_USED_BY_USER)
            .all(|&e| (e & PTE_FRAME_MASK) >> 12 < self.frame_limit)
    }

    /// Adds the frames `entries` point at to `spans`; returns the non-PS targets in guest RAM.
    fn collect(&self, entries: &[u64; ENTRIES], spans: &mut Vec<(u64, u64)>) -> Vec<u64> {
        let count = self.states.len() as u64;
        let mut tables = Vec::new();
        for &entry in entries
            .iter()
            .filter(|&&e| e & PTE_USED_BY_USER == PTE_USED_BY_USER)
        {
            let frame = (entry & PTE_FRAME_MASK) >> 12;
            if entry & PTE_PS != 0 {
                let base = frame & !(LARGE_PAGES - 1);
                if base < count {
                    spans.push((base, (base + LARGE_PAGES).min(count)));
                }
            } else if frame < count {
                spans.push((frame, frame + 1));
                tables.push(frame);
            }
        }
        tables
    }

    /// Re-applies the current protection of every frame the old content `old` of a dropped page
    /// pointed at, and of every frame the tables it pointed at point at.
    fn zap(&self, old: &[u64; ENTRIES]) -> Result<(), MemoryError> {
        let started = Instant::now();
        let mut spans = Vec::new();
        let mut tables = self.collect(old, &mut spans);
        tables.sort_unstable();
        tables.dedup();
        let mut entries = [0u64; ENTRIES];
        for table in tables {
            let Some(guard) = self.lock(table) else {
                continue;
            };
            if guard.state == LocalMapping::NotPresent as u8 {
                continue;
            }
            self.inner.read_entries(table, &mut entries)?;
            drop(guard);
            self.counters.tables_read.fetch_add(1, Ordering::Relaxed);
            if self.looks_like_table(&entries) {
                self.collect(&entries, &mut spans);
            }
        }
        let result = self.reprotect_spans(spans);
        self.counters.nanos.fetch_add(
            u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        result
    }

    /// Merges `spans` and re-protects their present pages in runs of one state.
    fn reprotect_spans(&self, mut spans: Vec<(u64, u64)>) -> Result<(), MemoryError> {
        spans.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(spans.len());
        for (start, end) in spans {
            match merged.last_mut() {
                Some(last) if start <= last.1 + MAX_GAP => last.1 = last.1.max(end),
                _ => merged.push((start, end)),
            }
        }
        let mut calls = 0u64;
        let mut result = Ok(());
        for (start, end) in merged {
            // The run being built: first page, length, state; its pages are locked.
            let mut run: Option<(u64, u64, u8)> = None;
            for page in start..end {
                let Some(cell) = self.states.get(crate::convert::usize_from(page)) else {
                    break;
                };
                let state = lock_cell(cell);
                let extends = matches!(run, Some((_, len, s)) if s == state && len < MAX_RUN);
                if extends {
                    if let Some((_, len, _)) = run.as_mut() {
                        *len += 1;
                    }
                    continue;
                }
                if let Some(done) = run.take() {
                    calls += 1;
                    result = result.and(self.flush_run(done));
                }
                if state == LocalMapping::NotPresent as u8 {
                    cell.store(state, Ordering::Release);
                } else {
                    run = Some((page, 1, state));
                }
            }
            if let Some(done) = run.take() {
                calls += 1;
                result = result.and(self.flush_run(done));
            }
        }
        if calls > 0 {
            self.counters.zaps.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    /// Re-protects a locked run and unlocks it.
    fn flush_run(&self, (first, len, state): (u64, u64, u8)) -> Result<(), MemoryError> {
        let writable = state == LocalMapping::Writable as u8;
        let result = self.inner.reapply_protection(first, len, writable);
        for page in first..first + len {
            if let Some(cell) = self.states.get(crate::convert::usize_from(page)) {
                cell.store(state, Ordering::Release);
            }
        }
        self.counters.calls.fetch_add(1, Ordering::Relaxed);
        self.counters.pages.fetch_add(len, Ordering::Relaxed);
        result
    }
}

impl<P: ShadowTarget> GuestPages for ShadowZap<P> {
    fn page_count(&self) -> u64 {
        self.inner.page_count()
    }

    fn install(
        &self,
        page: u64,
        content: PageContent<'_>,
        writable: bool,
    ) -> Result<(), MemoryError> {
        // A present page is never replaced by an install (the kernel refuses: AlreadyPresent),
        // so an install has nothing to zap.
        if let Some(left) = &self.installs_before_failure {
            let before =
                left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
            if before == Err(0) {
                return Err(MemoryError::Os {
                    operation: "UFFDIO_COPY",
                    page,
                    errno: "injected failure (SPANVM_TEST_FAIL_INSTALL_AFTER): out of memory"
                        .into(),
                });
            }
        }
        let mut content = content;
        if let (Some(left), PageContent::Bytes(_)) = (&self.received_before_zero, content) {
            let before =
                left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
            if before == Err(0) {
                eprintln!(
                    "spanvm: TEST HOOK SPANVM_TEST_ZERO_PAGE_AFTER FIRED: page {page:#x} \
                     (guest RAM offset {:#x}) installed as zeros instead of the data received",
                    page << 12
                );
                content = PageContent::Zero;
            }
        }
        let after = if writable {
            LocalMapping::Writable
        } else {
            LocalMapping::ReadOnly
        };
        self.change(page, after, || self.inner.install(page, content, writable))
    }

    fn write_protect(&self, page: u64) -> Result<(), MemoryError> {
        self.change(page, LocalMapping::ReadOnly, || {
            self.inner.write_protect(page)
        })
    }

    fn make_writable(&self, page: u64) -> Result<(), MemoryError> {
        self.change(page, LocalMapping::Writable, || {
            self.inner.make_writable(page)
        })
    }

    fn drop_page(&self, page: u64) -> Result<(), MemoryError> {
        let Some(mut guard) = self.lock(page) else {
            return self.inner.drop_page(page);
        };
        self.counters.drops.fetch_add(1, Ordering::Relaxed);
        let mut old = [0u64; ENTRIES];
        let was_present = guard.state != LocalMapping::NotPresent as u8;
        if was_present {
            self.inner.read_entries(page, &mut old)?;
        }
        self.inner.drop_page(page)?;
        guard.state = LocalMapping::NotPresent as u8;
        drop(guard);
        if !was_present {
            return Ok(());
        }
        self.zap(&old)
    }

    fn read_page(&self, page: u64, out: &mut [u8; PAGE_SIZE]) -> Result<(), MemoryError> {
        self.inner.read_page(page, out)
    }

    fn wake(&self, page: u64) -> Result<(), MemoryError> {
        self.inner.wake(page)
    }

    fn freeze(&self) {
        self.inner.freeze()
    }
}

impl<P: ShadowTarget + FaultSource> FaultSource for ShadowZap<P> {
    fn wait_faults(&self, out: &mut Vec<PageFault>) -> Result<(), UffdError> {
        self.inner.wait_faults(out)
    }

    fn interrupt(&self) {
        self.inner.interrupt()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use dsm::{HeapPages, Mapping};

    use super::*;

    /// Heap memory that records the re-protections asked of it.
    struct Recorder {
        pages: HeapPages,
        calls: Mutex<Vec<(u64, u64, bool)>>,
    }

    impl GuestPages for Recorder {
        fn page_count(&self) -> u64 {
            self.pages.page_count()
        }
        fn install(&self, p: u64, c: PageContent<'_>, w: bool) -> Result<(), MemoryError> {
            self.pages.install(p, c, w)
        }
        fn write_protect(&self, p: u64) -> Result<(), MemoryError> {
            self.pages.write_protect(p)
        }
        fn make_writable(&self, p: u64) -> Result<(), MemoryError> {
            self.pages.make_writable(p)
        }
        fn drop_page(&self, p: u64) -> Result<(), MemoryError> {
            self.pages.drop_page(p)
        }
        fn read_page(&self, p: u64, out: &mut [u8; PAGE_SIZE]) -> Result<(), MemoryError> {
            self.pages.read_page(p, out)
        }
        fn wake(&self, p: u64) -> Result<(), MemoryError> {
            self.pages.wake(p)
        }
    }

    impl ShadowTarget for Recorder {
        fn reapply_protection(&self, first: u64, count: u64, w: bool) -> Result<(), MemoryError> {
            for page in first..first + count {
                let want = if w {
                    Mapping::Writable
                } else {
                    Mapping::ReadOnly
                };
                assert_eq!(self.pages.mapping(page), want, "page {page} re-protected");
            }
            self.calls.lock().unwrap().push((first, count, w));
            Ok(())
        }
        fn read_entries(&self, page: u64, out: &mut [u64; ENTRIES]) -> Result<(), MemoryError> {
            for (i, word) in out.iter_mut().enumerate() {
                *word = self
                    .pages
                    .load(page, i * 8)
                    .ok_or(MemoryError::NotPresent {
                        page,
                        operation: "reads",
                    })?;
            }
            Ok(())
        }
    }

    fn zap_over(pages: u64) -> ShadowZap<Recorder> {
        let inner = Recorder {
            pages: HeapPages::new(pages),
            calls: Mutex::new(Vec::new()),
        };
        ShadowZap::new(inner, true)
    }

    fn table(entries: &[(usize, u64)]) -> Box<[u8; PAGE_SIZE]> {
        let mut bytes = Box::new([0u8; PAGE_SIZE]);
        for &(i, e) in entries {
            bytes[i * 8..i * 8 + 8].copy_from_slice(&e.to_le_bytes());
        }
        bytes
    }

    fn calls(z: &ShadowZap<Recorder>) -> Vec<(u64, u64, bool)> {
        std::mem::take(&mut *z.inner().calls.lock().unwrap())
    }

    #[test]
    fn mirrors_states_and_reprotects_old_targets_in_runs() {
        let z = zap_over(2048);
        // Frames 10..14 read-only, 14 writable, 15 absent, 16 read-only.
        for f in 10..14 {
            z.install(f, PageContent::Zero, false).unwrap();
        }
        z.install(14, PageContent::Zero, true).unwrap();
        z.install(16, PageContent::Zero, false).unwrap();
        z.install(18, PageContent::Zero, true).unwrap();
        assert_eq!(z.local_mapping(14), LocalMapping::Writable);
        assert_eq!(z.local_mapping(15), LocalMapping::NotPresent);
        let entries: Vec<(usize, u64)> = (10..=16)
            .map(|f| (crate::convert::usize_from(f), (f << 12) | 0x67))
            .chain([
                (300, 0x0000_7000_0000_0021),
                (301, 5 << 12),
                (302, (2 << 12) | 0x7),
                (303, (18 << 12) | 0x63),
            ])
            .collect();
        z.install(1, PageContent::Bytes(&table(&entries)), false)
            .unwrap();
        z.drop_page(1).unwrap();
        assert_eq!(z.local_mapping(1), LocalMapping::NotPresent);
        assert_eq!(
            calls(&z),
            vec![(10, 4, false), (14, 1, true), (16, 1, false)],
            "entries not present, never used (accessed bit clear) or kernel-only (user bit \
             clear), frames beyond RAM and absent frames are skipped"
        );
        assert_eq!(z.local_mapping(10), LocalMapping::ReadOnly);
        assert_eq!(z.local_mapping(14), LocalMapping::Writable);
        let stats = z.stats();
        assert_eq!(
            (stats.drops, stats.zaps, stats.calls, stats.pages),
            (1, 1, 3, 6)
        );
    }

    #[test]
    fn large_entries_count_as_2mib_and_directories_reach_final_frames() {
        let z = zap_over(2048);
        for f in 512..1024 {
            z.install(f, PageContent::Zero, true).unwrap();
        }
        z.install(1500, PageContent::Zero, false).unwrap();
        // A page table at 20 mapping frame 1500; a directory at 21 pointing at it and at a 2 MiB
        // page at 512 (PS set, address 2 MiB).
        z.install(
            20,
            PageContent::Bytes(&table(&[(0, (1500 << 12) | 0x27)])),
            true,
        )
        .unwrap();
        let dir = table(&[(0, (20 << 12) | 0x27), (1, (1u64 << 21) | 0xa7)]);
        z.install(21, PageContent::Bytes(&dir), false).unwrap();
        z.drop_page(21).unwrap();
        assert_eq!(
            calls(&z),
            vec![(20, 1, true), (512, 512, true), (1500, 1, false)]
        );
        assert_eq!(z.stats().tables_read, 1);
    }

    #[test]
    fn data_content_and_disabled_wrapper_cost_no_calls() {
        let z = zap_over(64);
        z.install(3, PageContent::Zero, true).unwrap();
        let text: Vec<(usize, u64)> = (0..ENTRIES)
            .map(|i| (i, u64::from_le_bytes(*b"spanvm: ") ^ i as u64))
            .collect();
        z.install(2, PageContent::Bytes(&table(&text)), false)
            .unwrap();
        z.drop_page(2).unwrap();
        assert!(calls(&z).is_empty());
        let off = ShadowZap::new(
            Recorder {
                pages: HeapPages::new(8),
                calls: Mutex::new(Vec::new()),
            },
            false,
        );
        off.install(
            1,
            PageContent::Bytes(&table(&[(0, (2 << 12) | 0x21)])),
            false,
        )
        .unwrap();
        off.install(2, PageContent::Zero, false).unwrap();
        off.drop_page(1).unwrap();
        assert!(!off.is_enabled());
        assert!(calls(&off).is_empty());
        assert_eq!(off.stats(), ZapStats::default());
    }

    #[test]
    fn concurrent_state_changes_never_see_a_stale_reprotection() {
        let z = std::sync::Arc::new(zap_over(600));
        for f in 0..512 {
            z.install(f, PageContent::Zero, false).unwrap();
        }
        let dir = table(&[(0, 0xa7)]);
        let flipper = {
            let z = z.clone();
            std::thread::spawn(move || {
                for round in 0..2000u64 {
                    let page = round % 512;
                    z.make_writable(page).unwrap();
                    z.write_protect(page).unwrap();
                }
            })
        };
        for _ in 0..200 {
            z.install(550, PageContent::Bytes(&dir), false).unwrap();
            z.drop_page(550).unwrap();
        }
        flipper.join().unwrap();
        // The Recorder asserted that every re-protected page was in the re-applied state.
        assert!(z.stats().calls >= 200);
    }

    #[test]
    fn the_zero_page_hook_replaces_the_received_pages_after_the_first_n() {
        let z = zap_over(8).zero_received_pages_after(1);
        let data = table(&[(0, 0x5a5a)]);
        z.install(0, PageContent::Bytes(&data), false).unwrap();
        // Zero pages are not received data: they do not count.
        z.install(1, PageContent::Zero, false).unwrap();
        z.install(2, PageContent::Bytes(&data), false).unwrap();
        z.install(3, PageContent::Bytes(&data), false).unwrap();
        let first_word = |page| z.inner().pages.load(page, 0);
        assert_eq!(first_word(0), Some(0x5a5a));
        assert_eq!(first_word(2), Some(0), "the second received page is zeros");
        assert_eq!(first_word(3), Some(0), "and so is every later one");
    }
}
