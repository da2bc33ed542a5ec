//! The one-file description of a whole cluster, and the node files rendered from it.

use std::fmt::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::layout::{default_homes, ram_regions};
use crate::validate::{validate, FileKind};
use crate::{
    raw, ConfigError, ConfigWord, Disk, GuestImage, Layout, NodeId, NodeSpec, ServicePriority,
    TransportKind, MIB,
};

/// A cluster description: the node-file schema without `node`, with `secret` optional.
#[derive(Debug, Clone)]
pub struct ClusterDescription {
    /// The file it was read from, `None` for the built-in default.
    pub path: Option<PathBuf>,
    /// The secret file it names, resolved, if any.
    pub secret_path: Option<PathBuf>,
    /// What every node of the cluster will agree on.
    pub layout: Layout,
    /// How every node schedules its fault-service threads, written into each node file.
    pub service_priority: ServicePriority,
}

impl ClusterDescription {
    /// Reads and validates the cluster description at `path`.
    pub fn load(path: &Path) -> Result<ClusterDescription, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        ClusterDescription::parse(&text, path)
    }

    /// Validates `text` as the cluster description `path` (for messages and relative paths).
    pub fn parse(text: &str, path: &Path) -> Result<ClusterDescription, ConfigError> {
        let raw = raw::parse(text, path)?;
        let validated = validate(raw, path, FileKind::Cluster)?;
        Ok(ClusterDescription {
            path: Some(path.to_path_buf()),
            secret_path: validated.secret_path,
            layout: validated.layout,
            service_priority: validated.service_priority,
        })
    }

    /// The built-in default: 2 nodes with 1 vCPU each (vCPU 0 on node 0, vCPU 1 on node 1),
    /// `memory_mib` MiB split evenly, TCP, the given guest, node `i` at `addrs[i]`.
    ///
    /// # Panics
    /// If `addrs` holds fewer than two addresses (a caller bug, not a user input).
    pub fn default_cluster(
        guest: GuestImage,
        memory_mib: u64,
        addrs: &[SocketAddr],
    ) -> ClusterDescription {
        assert!(
            addrs.len() >= 2,
            "default_cluster needs two node addresses, got {}",
            addrs.len()
        );
        let nodes: Vec<NodeSpec> = (0..2)
            .zip(addrs)
            .map(|(i, &address)| NodeSpec {
                id: i,
                address,
                vcpus: vec![i],
            })
            .collect();
        let memory_size = memory_mib.saturating_mul(MIB);
        let ram = ram_regions(memory_size);
        let homes = default_homes(&ram, nodes.len());
        let guest = match guest {
            GuestImage::Linux {
                kernel,
                initrd,
                cmdline,
                disks,
                net,
            } => GuestImage::Linux {
                kernel: absolute(&kernel),
                initrd: initrd.as_deref().map(absolute),
                cmdline,
                disks: disks
                    .into_iter()
                    .map(|disk| Disk {
                        path: absolute(&disk.path),
                        read_only: disk.read_only,
                    })
                    .collect(),
                net,
            },
            probe => probe,
        };
        ClusterDescription {
            path: None,
            secret_path: None,
            service_priority: ServicePriority::default(),
            layout: Layout {
                nodes,
                vcpu_count: 2,
                memory_size,
                ram,
                homes,
                transport: TransportKind::Tcp,
                guest,
            },
        }
    }

    /// Number of nodes described.
    pub fn node_count(&self) -> NodeId {
        self.layout.node_count()
    }

    /// Node `id`'s TOML file, with absolute paths for kernel, initrd and `secret_path`, such
    /// that [`crate::NodeConfig::parse`] of it yields this layout. Homes are written out
    /// explicitly, so a node file never depends on how the default split is computed. An `id`
    /// that is not a node is written as given; parsing the file then reports it.
    pub fn render_node_file(&self, id: NodeId, secret_path: &Path) -> String {
        let layout = &self.layout;
        let mut out = String::new();
        // Writing to a String cannot fail; the results are ignored for that reason.
        let _ = writeln!(
            out,
            "# spanvm node file for node {id}, rendered from a cluster description"
        );
        let _ = writeln!(out, "node = {id}");
        let _ = writeln!(out, "secret = {}", toml_path(&absolute(secret_path)));
        let _ = writeln!(out, "transport = {}", toml_str(layout.transport.as_str()));
        let _ = writeln!(
            out,
            "service_priority = {}",
            toml_str(self.service_priority.as_str())
        );
        let _ = writeln!(out);
        let _ = writeln!(out, "[guest]");
        let _ = writeln!(out, "vcpus = {}", layout.vcpu_count);
        let _ = writeln!(out, "memory_mib = {}", layout.memory_size / MIB);
        match &layout.guest {
            GuestImage::Probe { name, arg } => {
                let _ = writeln!(out, "probe = {}", toml_str(name));
                let _ = writeln!(out, "probe_arg = {arg}");
            }
            GuestImage::Linux {
                kernel,
                initrd,
                cmdline,
                disks,
                net,
            } => {
                let _ = writeln!(out);
                let _ = writeln!(out, "[guest.linux]");
                let _ = writeln!(out, "kernel = {}", toml_path(&absolute(kernel)));
                if let Some(initrd) = initrd {
                    let _ = writeln!(out, "initrd = {}", toml_path(&absolute(initrd)));
                }
                let _ = writeln!(out, "cmdline = {}", toml_str(cmdline));
                for disk in disks {
                    let _ = writeln!(out);
                    let _ = writeln!(out, "[[guest.disk]]");
                    let _ = writeln!(out, "path = {}", toml_path(&absolute(&disk.path)));
                    let _ = writeln!(out, "read_only = {}", disk.read_only);
                }
                if let Some(net) = net {
                    let _ = writeln!(out);
                    let _ = writeln!(out, "[guest.net]");
                    let _ = writeln!(out, "tap = {}", toml_str(&net.tap));
                    if let Some(netns) = &net.netns {
                        let _ = writeln!(out, "netns = {}", toml_str(netns));
                    }
                    let _ = writeln!(out, "mac = {}", toml_str(&net.mac_string()));
                }
            }
        }
        for home in &layout.homes {
            let _ = writeln!(out);
            let _ = writeln!(out, "[[guest.home]]");
            let _ = writeln!(out, "node = {}", home.node);
            let _ = writeln!(out, "start = {:#x}", home.gpa);
            let _ = writeln!(out, "size_mib = {}", home.size / MIB);
        }
        for node in &layout.nodes {
            let vcpus: Vec<String> = node.vcpus.iter().map(u32::to_string).collect();
            let _ = writeln!(out);
            let _ = writeln!(out, "[[nodes]]");
            let _ = writeln!(out, "id = {}", node.id);
            let _ = writeln!(out, "address = {}", toml_str(&node.address.to_string()));
            let _ = writeln!(out, "vcpus = [{}]", vcpus.join(", "));
        }
        out
    }
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// `text` as a TOML basic string, escaped by `toml` itself.
fn toml_str(text: &str) -> String {
    toml::Value::String(text.to_string()).to_string()
}

/// A path as a TOML string (lossy for non-UTF-8 paths, which TOML cannot hold).
fn toml_path(path: &Path) -> String {
    toml_str(&path.to_string_lossy())
}
