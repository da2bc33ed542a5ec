//! Where one fault spends its time: timestamps of a single traced page along the fault path,
//! for `spanvm bench dsm`'s breakdown.
//!
//! Both nodes of the benchmark live in one process and share one [`FaultTrace`], so their
//! timestamps are on one clock. Only the armed page is recorded, the first time each stage is
//! reached; every other page costs one relaxed load per mark.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::memory::{GuestPages, MemoryError, PageContent};
use crate::PAGE_SIZE;

/// A point on the fault path. Points are arrivals, so that the time between two of them is
/// one node's work plus one hand-off, whichever thread sends what.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The faulting node's fault thread has read the fault from the userfaultfd.
    FaultRead,
    /// The home's receiver has the request frame (not reached when this node is the home).
    HomeReceived,
    /// The owner's receiver has the fetch frame (only when owner and home differ).
    OwnerReceived,
    /// The requester's receiver has the frame carrying the page.
    DataArrived,
    /// That frame is decoded and validated (the page copied out of the receive buffer).
    DataDecoded,
    /// The state machine hands the page to the kernel (`UFFDIO_COPY`, which wakes the
    /// faulting thread).
    Installing,
}

impl Stage {
    /// Every stage, in path order.
    pub const ALL: [Stage; 6] = [
        Stage::FaultRead,
        Stage::HomeReceived,
        Stage::OwnerReceived,
        Stage::DataArrived,
        Stage::DataDecoded,
        Stage::Installing,
    ];
}

/// No page armed.
const NONE: u64 = u64::MAX;

/// The timestamps of one armed page (see the module doc).
pub struct FaultTrace {
    base: Instant,
    page: AtomicU64,
    marks: [AtomicU64; Stage::ALL.len()],
}

impl Default for FaultTrace {
    fn default() -> Self {
        FaultTrace {
            base: Instant::now(),
            page: AtomicU64::new(NONE),
            marks: Default::default(),
        }
    }
}

impl FaultTrace {
    /// Forgets the last page's marks and records `page` from now on.
    pub fn arm(&self, page: u64) {
        self.page.store(NONE, Ordering::SeqCst);
        for mark in &self.marks {
            mark.store(0, Ordering::SeqCst);
        }
        self.page.store(page, Ordering::SeqCst);
    }

    /// Nanoseconds since the trace was made, never 0 (0 means "not reached").
    pub fn now(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// Records `stage` for `page` if it is the armed page and the stage is not recorded yet.
    pub fn mark(&self, page: u64, stage: Stage) {
        if self.page.load(Ordering::Relaxed) != page {
            return;
        }
        let _ = self.marks[stage as usize].compare_exchange(
            0,
            self.now(),
            Ordering::SeqCst,
            Ordering::Relaxed,
        );
    }

    /// When `stage` was reached, in [`FaultTrace::now`]'s nanoseconds.
    pub fn at(&self, stage: Stage) -> Option<u64> {
        match self.marks[stage as usize].load(Ordering::SeqCst) {
            0 => None,
            t => Some(t),
        }
    }
}

/// Guest pages that mark [`Stage::Installing`] as a page goes to the kernel, and otherwise
/// do what the pages they wrap do.
pub(crate) struct TracedPages<'a> {
    pub(crate) pages: &'a dyn GuestPages,
    pub(crate) trace: &'a FaultTrace,
}

impl GuestPages for TracedPages<'_> {
    fn page_count(&self) -> u64 {
        self.pages.page_count()
    }

    fn install(
        &self,
        page: u64,
        content: PageContent<'_>,
        writable: bool,
    ) -> Result<(), MemoryError> {
        self.trace.mark(page, Stage::Installing);
        self.pages.install(page, content, writable)
    }

    fn write_protect(&self, page: u64) -> Result<(), MemoryError> {
        self.pages.write_protect(page)
    }

    fn make_writable(&self, page: u64) -> Result<(), MemoryError> {
        self.trace.mark(page, Stage::Installing);
        self.pages.make_writable(page)
    }

    fn drop_page(&self, page: u64) -> Result<(), MemoryError> {
        self.pages.drop_page(page)
    }

    fn read_page(&self, page: u64, out: &mut [u8; PAGE_SIZE]) -> Result<(), MemoryError> {
        self.pages.read_page(page, out)
    }

    fn wake(&self, page: u64) -> Result<(), MemoryError> {
        self.pages.wake(page)
    }

    fn freeze(&self) {
        self.pages.freeze();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_armed_page_and_only_the_first_mark_count() {
        let trace = FaultTrace::default();
        trace.mark(7, Stage::FaultRead);
        assert_eq!(trace.at(Stage::FaultRead), None);
        trace.arm(7);
        trace.mark(8, Stage::FaultRead);
        assert_eq!(trace.at(Stage::FaultRead), None);
        trace.mark(7, Stage::FaultRead);
        let first = trace.at(Stage::FaultRead).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1));
        trace.mark(7, Stage::FaultRead);
        assert_eq!(trace.at(Stage::FaultRead), Some(first));
        trace.mark(7, Stage::Installing);
        assert!(trace.at(Stage::Installing).unwrap() > first);
        trace.arm(9);
        assert!(Stage::ALL.iter().all(|&s| trace.at(s).is_none()));
    }
}
