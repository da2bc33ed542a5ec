//! Guest layouts: `AxB` is A node processes with B vCPUs each, and the baseline of a layout
//! with N vCPUs is `1xN`, the same guest on one node.

use std::fmt;
use std::str::FromStr;

/// The most vCPUs of one guest (KVM on the development hosts takes up to 32 per VM).
pub const MAX_VCPUS: usize = 32;
/// The most nodes of one layout on one machine.
pub const MAX_NODES: usize = 8;

/// What the default `--layouts` runs: the baselines for 2 and 4 vCPUs, each spread one vCPU per
/// node, and 2 nodes of 2.
pub const DEFAULT_LAYOUTS: &str = "1x2,2x1,1x4,4x1,2x2";

/// A bad `--layouts` value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// Nothing was given.
    #[error("no layout given: write them like 1x2,2x1 (nodes x vCPUs per node)")]
    Empty,
    /// A layout is not `AxB`.
    #[error("layout '{0}' is not NODESxVCPUS (e.g. 2x1: 2 nodes with 1 vCPU each)")]
    Malformed(String),
    /// A layout has no node or no vCPU.
    #[error("layout '{0}' has no {1}: both numbers must be at least 1")]
    Zero(String, &'static str),
    /// A layout is larger than this machine can run.
    #[error("layout '{layout}' is too large: at most {MAX_NODES} nodes and {MAX_VCPUS} vCPUs")]
    TooLarge {
        /// The layout as given.
        layout: String,
    },
    /// A layout was given twice.
    #[error("layout '{0}' is given twice")]
    Duplicate(String),
}

/// `nodes` node processes with `per_node` vCPUs each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Layout {
    /// Node processes.
    pub nodes: usize,
    /// vCPUs on each node.
    pub per_node: usize,
}

impl Layout {
    /// All vCPUs of the guest.
    pub fn vcpus(self) -> usize {
        self.nodes * self.per_node
    }

    /// The same guest on one node: what this layout is compared with.
    pub fn baseline(self) -> Layout {
        Layout {
            nodes: 1,
            per_node: self.vcpus(),
        }
    }

    /// Whether this layout is its own baseline.
    pub fn is_baseline(self) -> bool {
        self.nodes == 1
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}", self.nodes, self.per_node)
    }
}

impl FromStr for Layout {
    type Err = LayoutError;

    fn from_str(text: &str) -> Result<Layout, LayoutError> {
        let text = text.trim();
        let malformed = || LayoutError::Malformed(text.to_string());
        let (nodes, per_node) = text.split_once(['x', 'X']).ok_or_else(malformed)?;
        let number = |s: &str| {
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(malformed());
            }
            s.parse::<usize>().map_err(|_| LayoutError::TooLarge {
                layout: text.to_string(),
            })
        };
        let layout = Layout {
            nodes: number(nodes)?,
            per_node: number(per_node)?,
        };
        if layout.nodes == 0 {
            return Err(LayoutError::Zero(text.to_string(), "node"));
        }
        if layout.per_node == 0 {
            return Err(LayoutError::Zero(text.to_string(), "vCPU"));
        }
        if layout.nodes > MAX_NODES || layout.per_node > MAX_VCPUS || layout.vcpus() > MAX_VCPUS {
            return Err(LayoutError::TooLarge {
                layout: text.to_string(),
            });
        }
        Ok(layout)
    }
}

/// Parses a comma-separated list such as `1x2,2x1`, in the order given.
pub fn parse_layouts(text: &str) -> Result<Vec<Layout>, LayoutError> {
    let mut layouts: Vec<Layout> = Vec::new();
    for word in text.split(',').map(str::trim) {
        if word.is_empty() {
            if text.trim().is_empty() {
                return Err(LayoutError::Empty);
            }
            return Err(LayoutError::Malformed(text.trim().to_string()));
        }
        let layout: Layout = word.parse()?;
        if layouts.contains(&layout) {
            return Err(LayoutError::Duplicate(layout.to_string()));
        }
        layouts.push(layout);
    }
    Ok(layouts)
}

/// The layouts to boot: those asked for, each multi-node one preceded by its baseline when the
/// list does not have it (a ratio needs it), in an order where every baseline boots before the
/// layouts compared with it.
pub fn boot_order(asked: &[Layout]) -> Vec<Layout> {
    let mut order: Vec<Layout> = Vec::new();
    for &layout in asked {
        let base = layout.baseline();
        if !order.contains(&base) {
            order.push(base);
        }
        if !order.contains(&layout) {
            order.push(layout);
        }
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_list_parses() {
        let layouts = parse_layouts(DEFAULT_LAYOUTS).unwrap();
        let shown: Vec<String> = layouts.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["1x2", "2x1", "1x4", "4x1", "2x2"]);
        assert!(layouts[0].is_baseline() && !layouts[1].is_baseline());
        assert_eq!(
            layouts[4].baseline(),
            Layout {
                nodes: 1,
                per_node: 4
            }
        );
        assert_eq!(parse_layouts(" 2X1 , 1x2").unwrap().len(), 2);
    }

    #[test]
    fn bad_layouts_are_refused_with_the_reason() {
        let err = |s: &str| parse_layouts(s).unwrap_err();
        assert_eq!(err(""), LayoutError::Empty);
        assert_eq!(err("  "), LayoutError::Empty);
        assert!(matches!(err("2"), LayoutError::Malformed(_)));
        assert!(matches!(err("2x"), LayoutError::Malformed(_)));
        assert!(matches!(err("x2"), LayoutError::Malformed(_)));
        assert!(matches!(err("2*2"), LayoutError::Malformed(_)));
        assert!(matches!(err("-1x2"), LayoutError::Malformed(_)));
        assert!(matches!(err("1x2,,2x1"), LayoutError::Malformed(_)));
        assert!(matches!(err("1x2,"), LayoutError::Malformed(_)));
        assert_eq!(err("0x2"), LayoutError::Zero("0x2".into(), "node"));
        assert_eq!(err("2x0"), LayoutError::Zero("2x0".into(), "vCPU"));
        assert!(matches!(err("9x1"), LayoutError::TooLarge { .. }));
        assert!(matches!(err("4x9"), LayoutError::TooLarge { .. }));
        assert!(matches!(
            err("99999999999999999999999x1"),
            LayoutError::TooLarge { .. }
        ));
        assert_eq!(err("1x2,1X2"), LayoutError::Duplicate("1x2".into()));
        assert!(
            err("2x").to_string().contains("NODESxVCPUS"),
            "{}",
            err("2x")
        );
    }

    #[test]
    fn every_baseline_boots_before_what_it_anchors() {
        let asked = parse_layouts("2x1,4x1,1x2").unwrap();
        let order: Vec<String> = boot_order(&asked).iter().map(ToString::to_string).collect();
        assert_eq!(order, ["1x2", "2x1", "1x4", "4x1"]);
    }
}
