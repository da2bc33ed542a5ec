//! Guest memory for device threads goes through the DSM.
//!
//! On the master node a guest page a device wants to read or write may be held Modified by
//! another node. Before a device touches the buffers of a descriptor chain it pins every one of
//! them ([`DmaPins::pin`]) so that the DSM keeps the pages readable (or writable) until the
//! returned [`DmaPinGuard`] is dropped. A device collects every buffer range of a chain, pins
//! them all at once, does its work, writes the used ring, drops the guard, then signals.
//!
//! The virtqueue rings themselves are not pinned: the transport reads and writes them through
//! the ordinary guest mapping, whose faults the DSM serves like a vCPU's.
//!
//! The DSM refuses pins out of page order (two pinners taking pages in different orders could
//! deadlock each other), so [`pin_pages_in_order`] turns arbitrary buffer ranges into sorted,
//! merged page spans and pins them in increasing page order.

/// The DSM's page size: pins are taken on whole 4 KiB pages.
pub const PAGE_SIZE: u64 = 4096;

/// One guest-physical buffer a device is about to access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaRange {
    /// First guest-physical address of the buffer.
    pub gpa: u64,
    /// Length of the buffer in bytes.
    pub len: u64,
    /// Whether the device writes the buffer (device-writable descriptor) or only reads it.
    pub write: bool,
}

/// A run of whole guest pages to pin with one access mode, as [`page_spans`] produces them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageSpan {
    /// Guest-physical address of the first page (page-aligned).
    pub first_gpa: u64,
    /// Length in bytes (a multiple of [`PAGE_SIZE`]).
    pub len: u64,
    /// Whether the pages are pinned writable.
    pub write: bool,
}

/// Errors of pinning guest memory for a device.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PinError {
    /// A buffer's end lies past the end of the 64-bit guest-physical address space.
    #[error(
        "guest buffer {gpa:#x}+{len:#x} wraps around the guest-physical address space; \
         the guest driver passed a corrupt descriptor"
    )]
    Overflow {
        /// First address of the buffer.
        gpa: u64,
        /// Its length.
        len: u64,
    },
    /// The DSM could not pin a page span (outside guest memory, or the node holding it is
    /// gone).
    #[error("the DSM refused to pin guest pages {first_gpa:#x}+{len:#x}: {reason}")]
    Refused {
        /// First address of the span the DSM refused.
        first_gpa: u64,
        /// Its length.
        len: u64,
        /// What the DSM said.
        reason: String,
    },
}

/// Holds pinned guest pages; dropping it unpins them. The box holds whatever the pinner needs
/// to drop to unpin (for example the per-span guards of [`pin_pages_in_order`]). It is not
/// `Send`: the DSM keeps a thread's pins in that thread's pin order, so they end where they began.
pub struct DmaPinGuard(pub Box<dyn std::any::Any>);

impl DmaPinGuard {
    /// A guard that unpins by dropping `pins` (for example a vector of per-span DSM guards).
    pub fn new(pins: impl std::any::Any) -> Self {
        Self(Box::new(pins))
    }

    /// A guard that holds nothing (for memory that needs no pinning).
    pub fn none() -> Self {
        Self(Box::new(()))
    }
}

impl std::fmt::Debug for DmaPinGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DmaPinGuard")
    }
}

/// Pins guest pages for device access; implemented by the VMM on top of the DSM.
pub trait DmaPins: Send + Sync {
    /// Pins every page that `ranges` touch, readable or (where `write`) writable, until the
    /// returned guard is dropped. Either all are pinned or none (on error).
    fn pin(&self, ranges: &[DmaRange]) -> Result<DmaPinGuard, PinError>;
}

/// Single-node guests: all guest memory is local and always accessible, nothing to pin.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoPins;

impl DmaPins for NoPins {
    fn pin(&self, ranges: &[DmaRange]) -> Result<DmaPinGuard, PinError> {
        // Still refuse what no DSM could pin, so that devices behave the same on one node.
        page_spans(ranges)?;
        Ok(DmaPinGuard::none())
    }
}

/// The page spans covering `ranges`: sorted by address, non-overlapping, page-aligned; pages
/// touched by any writing range are writable (write wins over read on a shared page); adjacent
/// pages with the same mode form one span. Empty ranges are skipped.
pub fn page_spans(ranges: &[DmaRange]) -> Result<Vec<PageSpan>, PinError> {
    // Page-number intervals [first, end) per range.
    let mut pages: Vec<(u64, u64, bool)> = Vec::with_capacity(ranges.len());
    for r in ranges.iter().filter(|r| r.len != 0) {
        let last = r.gpa.checked_add(r.len - 1).ok_or(PinError::Overflow {
            gpa: r.gpa,
            len: r.len,
        })?;
        // `last / PAGE_SIZE + 1` cannot overflow: PAGE_SIZE > 1.
        pages.push((r.gpa / PAGE_SIZE, last / PAGE_SIZE + 1, r.write));
    }
    // Elementary intervals between every start and end; each is either fully covered by a
    // range or not covered, so one look decides its mode.
    let mut bounds: Vec<u64> = pages.iter().flat_map(|&(s, e, _)| [s, e]).collect();
    bounds.sort_unstable();
    bounds.dedup();
    let mut spans: Vec<PageSpan> = Vec::new();
    let mut last_end: Option<u64> = None;
    for w in bounds.windows(2) {
        let (start, end) = (w[0], w[1]);
        let mut covered = false;
        let mut write = false;
        for &(s, e, wr) in &pages {
            if s <= start && end <= e {
                covered = true;
                write |= wr;
            }
        }
        if !covered {
            continue;
        }
        let first_gpa = start * PAGE_SIZE;
        let len = (end - start) * PAGE_SIZE;
        match spans.last_mut() {
            Some(prev) if last_end == Some(start) && prev.write == write => prev.len += len,
            _ => spans.push(PageSpan {
                first_gpa,
                len,
                write,
            }),
        }
        last_end = Some(end);
    }
    Ok(spans)
}

/// Pins the pages of `ranges` in increasing page order by calling `pin_one(first_gpa, len,
/// write)` once per [`PageSpan`] of [`page_spans`]. Stops at the first error, dropping (so
/// unpinning) what it had pinned; on success returns the per-span guards in address order.
pub fn pin_pages_in_order<G, E>(
    ranges: &[DmaRange],
    mut pin_one: impl FnMut(u64, u64, bool) -> Result<G, E>,
) -> Result<Vec<G>, E>
where
    E: From<PinError>,
{
    let spans = page_spans(ranges)?;
    let mut guards = Vec::with_capacity(spans.len());
    for s in spans {
        guards.push(pin_one(s.first_gpa, s.len, s.write)?);
    }
    Ok(guards)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(gpa: u64, len: u64, write: bool) -> DmaRange {
        DmaRange { gpa, len, write }
    }
    fn s(first_gpa: u64, len: u64, write: bool) -> PageSpan {
        PageSpan {
            first_gpa,
            len,
            write,
        }
    }

    #[test]
    fn one_range_covers_its_pages() {
        assert_eq!(
            page_spans(&[r(0x1ff0, 0x20, false)]).unwrap(),
            vec![s(0x1000, 0x2000, false)]
        );
        assert_eq!(
            page_spans(&[r(0x3000, 0x1000, true)]).unwrap(),
            vec![s(0x3000, 0x1000, true)]
        );
    }

    #[test]
    fn sorts_and_merges_overlapping_and_adjacent() {
        let spans = page_spans(&[
            r(0x9000, 0x10, false),
            r(0x1000, 0x10, false),
            r(0x2010, 0x10, false),  // adjacent page: merged
            r(0x1800, 0x100, false), // same page: merged
            r(0x5000, 0x2000, false),
            r(0x6000, 0x10, false), // inside the previous
        ])
        .unwrap();
        assert_eq!(
            spans,
            vec![
                s(0x1000, 0x2000, false),
                s(0x5000, 0x2000, false),
                s(0x9000, 0x1000, false)
            ]
        );
    }

    #[test]
    fn write_wins_on_a_shared_page_only() {
        // Header read at 0x1000..0x1010, status byte written at 0x1010 (same page); data read
        // from 0x2000..0x4000.
        let spans = page_spans(&[
            r(0x1000, 0x10, false),
            r(0x1010, 1, true),
            r(0x2000, 0x2000, false),
        ])
        .unwrap();
        assert_eq!(
            spans,
            vec![s(0x1000, 0x1000, true), s(0x2000, 0x2000, false)]
        );
        // A write range in the middle of a read range splits it.
        let spans = page_spans(&[r(0x0, 0x5000, false), r(0x2100, 0x10, true)]).unwrap();
        assert_eq!(
            spans,
            vec![
                s(0x0, 0x2000, false),
                s(0x2000, 0x1000, true),
                s(0x3000, 0x2000, false)
            ]
        );
    }

    #[test]
    fn skips_empty_and_refuses_wrapping_ranges() {
        assert_eq!(page_spans(&[r(0x1234, 0, true)]).unwrap(), vec![]);
        assert_eq!(
            page_spans(&[r(u64::MAX - 1, 4, false)]),
            Err(PinError::Overflow {
                gpa: u64::MAX - 1,
                len: 4
            })
        );
        // The last page of the address space is fine.
        assert_eq!(
            page_spans(&[r(u64::MAX - 1, 2, false)]).unwrap(),
            vec![s(u64::MAX - 0xfff, 0x1000, false)]
        );
    }

    #[test]
    fn pins_in_increasing_order_and_stops_at_the_first_refusal() {
        let ranges = [r(0x8000, 1, true), r(0x1000, 1, false), r(0x4000, 1, false)];
        let mut order = Vec::new();
        let guards = pin_pages_in_order::<_, PinError>(&ranges, |gpa, len, write| {
            order.push((gpa, len, write));
            Ok(gpa)
        })
        .unwrap();
        assert_eq!(guards, vec![0x1000, 0x4000, 0x8000]);
        assert_eq!(
            order,
            vec![
                (0x1000, 0x1000, false),
                (0x4000, 0x1000, false),
                (0x8000, 0x1000, true)
            ]
        );
        let mut calls = 0;
        let err = pin_pages_in_order::<u64, PinError>(&ranges, |gpa, len, _| {
            calls += 1;
            if gpa == 0x4000 {
                Err(PinError::Refused {
                    first_gpa: gpa,
                    len,
                    reason: "test".into(),
                })
            } else {
                Ok(gpa)
            }
        });
        assert!(matches!(
            err,
            Err(PinError::Refused {
                first_gpa: 0x4000,
                ..
            })
        ));
        assert_eq!(calls, 2);
    }

    proptest::proptest! {
        #[test]
        fn spans_cover_exactly_the_touched_pages(
            raw in proptest::collection::vec((0u64..64, 0u64..3 * PAGE_SIZE, proptest::bool::ANY), 0..12)
        ) {
            let ranges: Vec<DmaRange> = raw
                .iter()
                .map(|&(page, len, write)| r(page * 512, len, write))
                .collect();
            let spans = page_spans(&ranges).unwrap();
            for w in spans.windows(2) {
                proptest::prop_assert!(w[0].first_gpa + w[0].len <= w[1].first_gpa);
                if w[0].first_gpa + w[0].len == w[1].first_gpa {
                    proptest::prop_assert!(w[0].write != w[1].write);
                }
            }
            for page in 0..(64 * 512 + 3 * PAGE_SIZE) / PAGE_SIZE + 1 {
                let lo = page * PAGE_SIZE;
                let hi = lo + PAGE_SIZE;
                let touching: Vec<_> = ranges.iter().filter(|r| r.len > 0 && r.gpa < hi && lo < r.gpa + r.len).collect();
                let span = spans.iter().find(|s| s.first_gpa <= lo && hi <= s.first_gpa + s.len);
                match span {
                    None => proptest::prop_assert!(touching.is_empty()),
                    Some(s) => {
                        proptest::prop_assert!(!touching.is_empty());
                        proptest::prop_assert_eq!(s.write, touching.iter().any(|r| r.write));
                    }
                }
            }
        }
    }
}
