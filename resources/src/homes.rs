//! Validation of explicit `[[guest.home]]` ranges: each must be page aligned, inside one RAM
//! region, name a node, and together they must tile RAM without overlap or gap.

use std::path::Path;

use crate::layout::{HomeRange, RamRegion};
use crate::raw::RawHome;
use crate::{node_index, ConfigError, NodeId, MIB, MMIO_GAP_END, MMIO_GAP_START, PAGE_SIZE};

/// Checks `raw` against `ram` and `node_count`; returns the ranges ascending.
pub(crate) fn validate_homes(
    path: &Path,
    raw: &[RawHome],
    ram: &[RamRegion],
    node_count: usize,
) -> Result<Vec<HomeRange>, ConfigError> {
    let mut homes = Vec::with_capacity(raw.len());
    for (index, entry) in raw.iter().enumerate() {
        homes.push(validate_one(path, index, entry, ram, node_count)?);
    }

    // Sort file indices by start so that messages can still name entries as written.
    let mut order: Vec<usize> = (0..homes.len()).collect();
    order.sort_by_key(|&i| (homes[i].gpa, homes[i].end()));
    for pair in order.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        if homes[b].gpa < homes[a].end() {
            let (earlier, later) = (a.min(b), a.max(b));
            return Err(ConfigError::invalid(
                path,
                format!("guest.home[{later}]"),
                format!(
                    "{} overlaps guest.home[{earlier}] ({})",
                    range_text(homes[later].gpa, homes[later].end()),
                    range_text(homes[earlier].gpa, homes[earlier].end())
                ),
            ));
        }
    }

    check_coverage(path, &homes, &order, ram)?;
    Ok(order.into_iter().map(|i| homes[i]).collect())
}

fn validate_one(
    path: &Path,
    index: usize,
    entry: &RawHome,
    ram: &[RamRegion],
    node_count: usize,
) -> Result<HomeRange, ConfigError> {
    let field = |name: &str| format!("guest.home[{index}].{name}");
    let node = NodeId::try_from(entry.node)
        .ok()
        .filter(|&node| node_index(node) < node_count)
        .ok_or_else(|| {
            ConfigError::invalid(
                path,
                field("node"),
                format!(
                    "node {} is not in [[nodes]] (node ids are 0..={})",
                    entry.node,
                    node_count.saturating_sub(1)
                ),
            )
        })?;
    let gpa = u64::try_from(entry.start).map_err(|_| {
        ConfigError::invalid(
            path,
            field("start"),
            format!("{} is negative; give a guest-physical address", entry.start),
        )
    })?;
    if gpa % PAGE_SIZE != 0 {
        return Err(ConfigError::invalid(
            path,
            field("start"),
            format!("{gpa:#x} is not aligned to 4 KiB (0x1000)"),
        ));
    }
    let size = u64::try_from(entry.size_mib)
        .ok()
        .filter(|&mib| mib > 0)
        .and_then(|mib| mib.checked_mul(MIB))
        .ok_or_else(|| {
            ConfigError::invalid(
                path,
                field("size_mib"),
                format!(
                    "{} is not a usable size in MiB (must be > 0)",
                    entry.size_mib
                ),
            )
        })?;
    let Some(end) = gpa.checked_add(size) else {
        return Err(ConfigError::invalid(
            path,
            format!("guest.home[{index}]"),
            format!(
                "{gpa:#x} + {} MiB goes past the end of the address space",
                entry.size_mib
            ),
        ));
    };
    if gpa < MMIO_GAP_END && end > MMIO_GAP_START {
        return Err(ConfigError::invalid(
            path,
            format!("guest.home[{index}]"),
            format!(
                "{} lies in the MMIO gap {}, which is not RAM; RAM is {}",
                range_text(gpa, end),
                range_text(MMIO_GAP_START, MMIO_GAP_END),
                ram_text(ram)
            ),
        ));
    }
    if !ram
        .iter()
        .any(|region| region.gpa <= gpa && end <= region.end())
    {
        return Err(ConfigError::invalid(
            path,
            format!("guest.home[{index}]"),
            format!(
                "{} lies outside guest RAM; RAM is {}",
                range_text(gpa, end),
                ram_text(ram)
            ),
        ));
    }
    Ok(HomeRange { gpa, size, node })
}

/// With `order` sorting non-overlapping `homes` by address, checks that every RAM byte is in
/// some home range.
fn check_coverage(
    path: &Path,
    homes: &[HomeRange],
    order: &[usize],
    ram: &[RamRegion],
) -> Result<(), ConfigError> {
    let mut next = order.iter().peekable();
    let mut previous: Option<usize> = None;
    for region in ram {
        let mut cursor = region.gpa;
        while cursor < region.end() {
            let Some(&&index) = next.peek() else {
                return Err(gap_error(path, cursor, region.end(), previous, None));
            };
            let home = homes[index];
            if home.gpa >= region.end() {
                return Err(gap_error(path, cursor, region.end(), previous, Some(index)));
            }
            if home.gpa > cursor {
                return Err(gap_error(path, cursor, home.gpa, previous, Some(index)));
            }
            cursor = home.end();
            previous = Some(index);
            next.next();
        }
    }
    Ok(())
}

fn gap_error(
    path: &Path,
    start: u64,
    end: u64,
    before: Option<usize>,
    after: Option<usize>,
) -> ConfigError {
    let context = match (before, after) {
        (Some(b), Some(a)) => format!(" (between guest.home[{b}] and guest.home[{a}])"),
        (Some(b), None) => format!(" (after guest.home[{b}], the last range)"),
        (None, Some(a)) => format!(" (before guest.home[{a}], the first range)"),
        (None, None) => " (no ranges are given)".to_string(),
    };
    ConfigError::invalid(
        path,
        "guest.home",
        format!(
            "leaves a gap: RAM {} is in no home range{context}; the ranges must cover all RAM",
            range_text(start, end)
        ),
    )
}

pub(crate) fn range_text(start: u64, end: u64) -> String {
    format!("{start:#x}..{end:#x}")
}

pub(crate) fn ram_text(ram: &[RamRegion]) -> String {
    let parts: Vec<String> = ram
        .iter()
        .map(|region| range_text(region.gpa, region.end()))
        .collect();
    parts.join(" and ")
}
