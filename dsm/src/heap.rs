//! [`HeapPages`]: guest memory on the heap with the same rules as the userfaultfd mapping, for
//! protocol tests and simulations that run without a kernel.
//!
//! It refuses what the kernel would refuse or what would corrupt memory: installing over a
//! present page (`EEXIST`), protecting, reading or dropping a page that is not present. Its
//! [`HeapPages::load`] and [`HeapPages::store`] behave like CPU accesses: they fail (a "fault")
//! where the real mapping would fault.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::memory::{GuestPages, MemoryError, PageContent};
use crate::protocol::{new_page_buf, PageBuf};
use crate::PAGE_SIZE;

/// How a page is mapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// Not present: any access faults.
    NotPresent,
    /// Present and write-protected: a write faults.
    ReadOnly,
    /// Present and writable.
    Writable,
}

struct HeapPage {
    bytes: PageBuf,
    writable: bool,
}

#[derive(Default)]
struct HeapState {
    pages: HashMap<u64, HeapPage>,
    woken: Vec<u64>,
}

/// Guest memory on the heap (see the module doc).
pub struct HeapPages {
    page_count: u64,
    state: Mutex<HeapState>,
}

impl HeapPages {
    /// `page_count` pages, none present.
    pub fn new(page_count: u64) -> HeapPages {
        HeapPages {
            page_count,
            state: Mutex::new(HeapState::default()),
        }
    }

    /// How `page` is mapped now.
    pub fn mapping(&self, page: u64) -> Mapping {
        match self.lock().pages.get(&page) {
            None => Mapping::NotPresent,
            Some(p) if p.writable => Mapping::Writable,
            Some(_) => Mapping::ReadOnly,
        }
    }

    /// A CPU load of the `u64` at `offset` (8-byte aligned) in `page`; `None` if it faults.
    pub fn load(&self, page: u64, offset: usize) -> Option<u64> {
        let state = self.lock();
        let p = state.pages.get(&page)?;
        let mut word = [0u8; 8];
        word.copy_from_slice(p.bytes.get(offset..offset + 8)?);
        Some(u64::from_le_bytes(word))
    }

    /// A CPU store of `value` at `offset` in `page`; `false` if it faults.
    pub fn store(&self, page: u64, offset: usize, value: u64) -> bool {
        let mut state = self.lock();
        match state.pages.get_mut(&page) {
            Some(p) if p.writable => match p.bytes.get_mut(offset..offset + 8) {
                Some(word) => {
                    word.copy_from_slice(&value.to_le_bytes());
                    true
                }
                None => false,
            },
            _ => false,
        }
    }

    /// Pages whose waiting accesses were woken since the last call, in order.
    pub fn take_woken(&self) -> Vec<u64> {
        std::mem::take(&mut self.lock().woken)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HeapState> {
        // A panic while holding this lock is already a failed test; keep the data visible.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check(&self, page: u64) -> Result<(), MemoryError> {
        if page < self.page_count {
            Ok(())
        } else {
            Err(MemoryError::PageOutOfRange {
                page,
                page_count: self.page_count,
            })
        }
    }

    fn present<'a>(
        state: &'a mut HeapState,
        page: u64,
        operation: &'static str,
    ) -> Result<&'a mut HeapPage, MemoryError> {
        state
            .pages
            .get_mut(&page)
            .ok_or(MemoryError::NotPresent { page, operation })
    }
}

impl GuestPages for HeapPages {
    fn page_count(&self) -> u64 {
        self.page_count
    }

    fn install(
        &self,
        page: u64,
        content: PageContent<'_>,
        writable: bool,
    ) -> Result<(), MemoryError> {
        self.check(page)?;
        let mut state = self.lock();
        if state.pages.contains_key(&page) {
            return Err(MemoryError::AlreadyPresent { page });
        }
        let mut bytes = new_page_buf();
        if let PageContent::Bytes(src) = content {
            bytes.copy_from_slice(src);
        }
        state.pages.insert(page, HeapPage { bytes, writable });
        state.woken.push(page);
        Ok(())
    }

    fn write_protect(&self, page: u64) -> Result<(), MemoryError> {
        self.check(page)?;
        Self::present(&mut self.lock(), page, "write-protects")?.writable = false;
        Ok(())
    }

    fn make_writable(&self, page: u64) -> Result<(), MemoryError> {
        self.check(page)?;
        let mut state = self.lock();
        Self::present(&mut state, page, "makes writable")?.writable = true;
        state.woken.push(page);
        Ok(())
    }

    fn drop_page(&self, page: u64) -> Result<(), MemoryError> {
        self.check(page)?;
        let mut state = self.lock();
        Self::present(&mut state, page, "drops")?;
        state.pages.remove(&page);
        Ok(())
    }

    fn read_page(&self, page: u64, out: &mut [u8; PAGE_SIZE]) -> Result<(), MemoryError> {
        self.check(page)?;
        let mut state = self.lock();
        let p = Self::present(&mut state, page, "reads")?;
        if p.writable {
            return Err(MemoryError::CopyOfWritablePage { page });
        }
        out.copy_from_slice(&p.bytes[..]);
        Ok(())
    }

    fn wake(&self, page: u64) -> Result<(), MemoryError> {
        self.check(page)?;
        self.lock().woken.push(page);
        Ok(())
    }
}
