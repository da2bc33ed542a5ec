//! The human-readable summary of a layout shown by `spanvm check`.

use std::fmt::Write;

use crate::{GuestImage, Layout, IOAPIC_GPA, LAPIC_GPA, MIB, MMIO_GAP_END, MMIO_GAP_START};

impl Layout {
    /// A summary for people: guest, transport, master, memory map with the MMIO gap, and per
    /// node its address, vCPUs and home ranges.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail; the results are ignored for that reason.
        let _ = writeln!(out, "guest: {}", describe_guest(&self.guest));
        let _ = writeln!(out, "transport: {}", self.transport);
        let master = self.master();
        match self.node(master) {
            Some(node) => {
                let _ = writeln!(
                    out,
                    "master: node {master} ({}): holds the devices, loads the guest, runs vCPU 0",
                    node.address
                );
            }
            None => {
                let _ = writeln!(out, "master: node {master}");
            }
        }
        let _ = writeln!(
            out,
            "memory: {} of RAM, {} vCPUs, {} pages of 4 KiB in the page index space",
            size_text(self.memory_size),
            self.vcpu_count,
            self.page_count()
        );
        let _ = writeln!(out, "memory map:");
        let mut gap_shown = false;
        for region in &self.ram {
            if region.gpa >= MMIO_GAP_END && !gap_shown {
                write_gap(&mut out);
                gap_shown = true;
            }
            let _ = writeln!(
                out,
                "  {:#014x}..{:#014x}  RAM       {}",
                region.gpa,
                region.end(),
                size_text(region.size)
            );
        }
        if !gap_shown {
            write_gap(&mut out);
        }
        let _ = writeln!(out, "nodes:");
        for node in &self.nodes {
            let vcpus: Vec<String> = node.vcpus.iter().map(u32::to_string).collect();
            let role = if node.id == master { " (master)" } else { "" };
            let _ = writeln!(out, "  node {}{role} at {}", node.id, node.address);
            let _ = writeln!(out, "    vCPUs: {}", list_or_none(&vcpus));
            let homes: Vec<String> = self
                .homes_of(node.id)
                .map(|home| {
                    format!(
                        "{:#x}..{:#x} ({})",
                        home.gpa,
                        home.end(),
                        size_text(home.size)
                    )
                })
                .collect();
            let homed: u64 = self.homes_of(node.id).map(|home| home.size).sum();
            let _ = writeln!(
                out,
                "    home of {}: {}",
                size_text(homed),
                list_or_none(&homes)
            );
        }
        out
    }
}

fn write_gap(out: &mut String) {
    let _ = writeln!(
        out,
        "  {MMIO_GAP_START:#014x}..{MMIO_GAP_END:#014x}  MMIO gap  (IOAPIC {IOAPIC_GPA:#x}, LAPIC {LAPIC_GPA:#x}, devices)"
    );
}

fn describe_guest(guest: &GuestImage) -> String {
    match guest {
        GuestImage::Probe { name, arg } => format!("probe `{name}` (arg {arg})"),
        GuestImage::Linux {
            kernel,
            initrd,
            cmdline,
            disks,
            net,
        } => {
            let initrd = match initrd {
                Some(path) => path.display().to_string(),
                None => "none".to_string(),
            };
            let mut text = format!(
                "linux kernel {}, initrd {initrd}, cmdline {cmdline:?}",
                kernel.display()
            );
            for (i, disk) in disks.iter().enumerate() {
                let access = if disk.read_only {
                    "read-only"
                } else {
                    "read-write"
                };
                text.push_str(&format!(", disk {i} {} ({access})", disk.path.display()));
            }
            if let Some(net) = net {
                match &net.netns {
                    Some(netns) => text.push_str(&format!(
                        ", net {} on tap {} created in netns {netns}",
                        net.mac_string(),
                        net.tap
                    )),
                    None => {
                        text.push_str(&format!(", net {} on tap {}", net.mac_string(), net.tap))
                    }
                }
            }
            text
        }
    }
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "none".to_string()
    } else {
        items.join(", ")
    }
}

/// `size` in the largest of GiB/MiB/KiB that divides it, else bytes.
fn size_text(size: u64) -> String {
    const GIB: u64 = 1 << 30;
    if size >= GIB && size % GIB == 0 {
        format!("{} GiB", size / GIB)
    } else if size >= MIB && size % MIB == 0 {
        format!("{} MiB", size / MIB)
    } else if size >= 1024 && size % 1024 == 0 {
        format!("{} KiB", size / 1024)
    } else {
        format!("{size} bytes")
    }
}
