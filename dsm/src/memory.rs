//! What the protocol does to a node's local copy of guest memory.
//!
//! The node state machine ([`crate::NodePages`]) decides; a [`GuestPages`] carries it out. The
//! real implementation is [`crate::UffdGuestPages`]; the simulation tests use an in-memory one.

use thiserror::Error;

use crate::PAGE_SIZE;

/// Content to install in a page.
#[derive(Clone, Copy, Debug)]
pub enum PageContent<'a> {
    /// All zeros (a page no node ever wrote).
    Zero,
    /// These bytes.
    Bytes(&'a [u8; PAGE_SIZE]),
}

/// The local mapping of guest memory, as the protocol sees it: Invalid pages are not present,
/// Shared pages are present and write-protected (a write traps), Modified pages are present and
/// writable.
///
/// Implementations must make each operation's effect visible to every thread of the process
/// before returning (for the uffd one: the kernel flushes TLBs before the ioctl returns).
pub trait GuestPages: Send + Sync {
    /// Pages in the memory (page numbers `0..page_count`).
    fn page_count(&self) -> u64;

    /// Makes an Invalid page present with `content`, writable or write-protected, and wakes the
    /// threads waiting on it.
    fn install(
        &self,
        page: u64,
        content: PageContent<'_>,
        writable: bool,
    ) -> Result<(), MemoryError>;

    /// Write-protects a present page (Modified -> Shared): from its return, no thread can change
    /// the page until [`GuestPages::make_writable`] or a new install.
    fn write_protect(&self, page: u64) -> Result<(), MemoryError>;

    /// Lifts the write protection of a present page (Shared -> Modified) and wakes the threads
    /// waiting on it.
    fn make_writable(&self, page: u64) -> Result<(), MemoryError>;

    /// Drops a present page (-> Invalid): the next access faults.
    fn drop_page(&self, page: u64) -> Result<(), MemoryError>;

    /// Copies a present page that nobody can write (Shared, or Modified and write-protected).
    fn read_page(&self, page: u64, out: &mut [u8; PAGE_SIZE]) -> Result<(), MemoryError>;

    /// Wakes threads that faulted on a page that is already in the state they need.
    fn wake(&self, page: u64) -> Result<(), MemoryError>;

    /// Keeps every blocked access blocked for the rest of the process: called when the node fails,
    /// so that no later teardown can let a guest access through to a page that is not valid
    /// (for uffd: closing the descriptor would map zero pages).
    fn freeze(&self) {}
}

/// Errors of a local memory operation.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum MemoryError {
    /// The page number is beyond the region.
    #[error("page {page:#x} is beyond the {page_count} pages of the guest memory region")]
    PageOutOfRange {
        /// The page asked for.
        page: u64,
        /// Pages in the region.
        page_count: u64,
    },
    /// A page to install was already present: the local state and the mapping disagree.
    #[error(
        "page {page:#x} is already present while the DSM installs it (state and mapping disagree)"
    )]
    AlreadyPresent {
        /// The page.
        page: u64,
    },
    /// A page that must be present is not.
    #[error(
        "page {page:#x} is not present while the DSM {operation} it (state and mapping disagree)"
    )]
    NotPresent {
        /// The page.
        page: u64,
        /// What the DSM was doing.
        operation: &'static str,
    },
    /// A page was copied while still writable: a write could slip in after the copy.
    #[error("page {page:#x} is copied while writable (it must be write-protected first)")]
    CopyOfWritablePage {
        /// The page.
        page: u64,
    },
    /// The kernel refused an operation.
    #[error("{operation} of page {page:#x} failed: {errno}")]
    Os {
        /// What the DSM was doing (the ioctl or call).
        operation: &'static str,
        /// The page.
        page: u64,
        /// The OS error, as text.
        errno: String,
    },
}
