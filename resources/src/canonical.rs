//! The canonical text of a layout, its hash, and how two canonical texts differ.
//!
//! Nodes exchange the hash when they connect; on a mismatch they exchange the text, so that
//! the error can name the first fact they disagree on.

use sha2::{Digest, Sha256};

use crate::{GuestImage, Layout};

/// First line of every canonical text; bump when the format changes.
const FORMAT_LINE: &str = "spanvm-layout 1";

impl Layout {
    /// Stable text with one fact per line (`vcpu 3 node 1`, `home 0x0 0x8000000 node 0`, ...).
    /// File paths are not part of it: they may differ between nodes.
    pub fn canonical(&self) -> String {
        let mut lines = vec![FORMAT_LINE.to_string()];
        lines.push(format!("nodes {}", self.nodes.len()));
        for node in &self.nodes {
            lines.push(format!("node {} address {}", node.id, node.address));
        }
        lines.push(format!("vcpus {}", self.vcpu_count));
        for vcpu in 0..self.vcpu_count {
            match self.node_of_vcpu(vcpu) {
                Some(node) => lines.push(format!("vcpu {vcpu} node {node}")),
                None => lines.push(format!("vcpu {vcpu} node none")),
            }
        }
        lines.push(format!("memory {:#x}", self.memory_size));
        for region in &self.ram {
            lines.push(format!("ram {:#x} {:#x}", region.gpa, region.size));
        }
        for home in &self.homes {
            lines.push(format!(
                "home {:#x} {:#x} node {}",
                home.gpa, home.size, home.node
            ));
        }
        lines.push(format!("transport {}", self.transport));
        match &self.guest {
            GuestImage::Probe { name, arg } => lines.push(format!("guest probe {name} arg {arg}")),
            GuestImage::Linux {
                cmdline,
                disks,
                net,
                ..
            } => {
                // Debug quoting keeps a command line with odd characters on one line.
                lines.push(format!("guest linux cmdline {cmdline:?}"));
                // Every node lays out the same devices; where an image lives is the master's.
                for (i, disk) in disks.iter().enumerate() {
                    lines.push(format!("disk {i} read_only {}", disk.read_only));
                }
                // The guest sees the card and its MAC on every node; the tap is the master's.
                if let Some(net) = net {
                    lines.push(format!("net mac {}", net.mac_string()));
                }
            }
        }
        let mut text = lines.join("\n");
        text.push('\n');
        text
    }

    /// SHA-256 of [`Layout::canonical`].
    pub fn hash(&self) -> [u8; 32] {
        Sha256::digest(self.canonical().as_bytes()).into()
    }

    /// The first line where this layout's canonical text and a peer's differ, as
    /// ``line 4: here `vcpu 1 node 1`, peer `vcpu 1 node 0` ``; `None` if they are equal.
    pub fn first_difference(&self, other_canonical: &str) -> Option<String> {
        let here = self.canonical();
        let mut here_lines = here.lines();
        let mut peer_lines = other_canonical.lines();
        let mut number = 0;
        loop {
            number += 1;
            match (here_lines.next(), peer_lines.next()) {
                (None, None) => return None,
                (Some(a), Some(b)) if a == b => continue,
                (a, b) => {
                    return Some(format!(
                        "line {number}: here {}, peer {}",
                        quote_line(a),
                        quote_line(b)
                    ))
                }
            }
        }
    }
}

fn quote_line(line: Option<&str>) -> String {
    match line {
        Some(line) => format!("`{line}`"),
        None => "(no such line)".to_string(),
    }
}
