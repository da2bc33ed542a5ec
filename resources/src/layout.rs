//! The guest layout every node must agree on, and the queries other crates ask of it.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::{
    node_index, ConfigWord, NodeId, VcpuId, DEFAULT_HOME_ALIGN, MMIO_GAP_END, MMIO_GAP_START,
    PAGE_SIZE,
};

/// How nodes talk to each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransportKind {
    /// TCP with `TCP_NODELAY` (the default).
    Tcp,
    /// RDMA reliable-connected queue pairs (needs the transport's `rdma` feature and a device).
    Rdma,
}

impl ConfigWord for TransportKind {
    const ALL: &'static [TransportKind] = &[TransportKind::Tcp, TransportKind::Rdma];

    fn as_str(self) -> &'static str {
        match self {
            TransportKind::Tcp => "tcp",
            TransportKind::Rdma => "rdma",
        }
    }
}

impl std::fmt::Display for TransportKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the guest runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestImage {
    /// A probe guest of this project, by name (see `images/`).
    Probe {
        /// Name of the probe, `[a-z0-9_-]+`.
        name: String,
        /// A number handed to the probe at entry (its meaning is the probe's: a round count,
        /// say); 0 when not given.
        arg: u64,
    },
    /// A Linux kernel (paths are absolute once validated).
    Linux {
        /// `vmlinux` (ELF) or `bzImage`.
        kernel: PathBuf,
        /// Optional initial ramdisk.
        initrd: Option<PathBuf>,
        /// Kernel command line.
        cmdline: String,
        /// virtio-blk disks, in the order the guest sees them (`vda`, `vdb`, ...).
        disks: Vec<Disk>,
        /// The network card, if any (virtio-net on a tap device of the master).
        net: Option<NetDevice>,
    },
}

/// The guest's network card: a virtio-net device the master backs with a tap device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetDevice {
    /// The card's MAC address (unicast, locally administered unless the user chose otherwise).
    pub mac: [u8; 6],
    /// The tap device's name (at most 15 bytes): an existing tap the master attaches to, or,
    /// with `netns`, the tap the master creates in that namespace.
    pub tap: String,
    /// A network namespace (`/run/netns/<name>`) in which the master creates `tap`; `None`:
    /// `tap` exists already in the master's namespace.
    pub netns: Option<String>,
}

impl NetDevice {
    /// The name of the tap spanvm creates in a namespace when `tap` is not given.
    pub const DEFAULT_NETNS_TAP: &'static str = "spanvm0";

    /// The default MAC of a card on `tap` (in `netns`): `52:54:00` (locally administered,
    /// unicast) and three bytes derived from the names, so two guests on one bridge differ.
    pub fn default_mac(tap: &str, netns: Option<&str>) -> [u8; 6] {
        use sha2::{Digest, Sha256};
        let seed = format!("spanvm net {} {tap}", netns.unwrap_or(""));
        let digest = Sha256::digest(seed.as_bytes());
        [0x52, 0x54, 0x00, digest[0], digest[1], digest[2]]
    }

    /// The MAC as `aa:bb:cc:dd:ee:ff`.
    pub fn mac_string(&self) -> String {
        format_mac(&self.mac)
    }
}

/// `mac` as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    let parts: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
    parts.join(":")
}

/// A raw disk image the master serves to the guest as a virtio-blk device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// The image file (absolute once validated).
    pub path: PathBuf,
    /// The guest may only read it.
    pub read_only: bool,
}

/// One node of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    /// Node id, `0..n`.
    pub id: NodeId,
    /// Address the node listens on and peers connect to.
    pub address: SocketAddr,
    /// vCPUs this node runs, ascending.
    pub vcpus: Vec<VcpuId>,
}

/// A contiguous range of guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRegion {
    /// First guest-physical address.
    pub gpa: u64,
    /// Length in bytes.
    pub size: u64,
}

impl RamRegion {
    /// First address after the region.
    pub fn end(&self) -> u64 {
        self.gpa + self.size
    }
}

/// A range of guest RAM whose pages have `node` as their DSM home.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HomeRange {
    /// First guest-physical address.
    pub gpa: u64,
    /// Length in bytes.
    pub size: u64,
    /// The home node.
    pub node: NodeId,
}

impl HomeRange {
    /// First address after the range.
    pub fn end(&self) -> u64 {
        self.gpa + self.size
    }
}

/// Everything all nodes must agree on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Every node, sorted by id, ids `0..n`.
    pub nodes: Vec<NodeSpec>,
    /// Total vCPUs of the guest.
    pub vcpu_count: u32,
    /// Bytes of guest RAM.
    pub memory_size: u64,
    /// RAM regions, ascending.
    pub ram: Vec<RamRegion>,
    /// Home ranges, ascending, tiling `ram` exactly.
    pub homes: Vec<HomeRange>,
    /// How nodes talk to each other.
    pub transport: TransportKind,
    /// What the guest runs (paths do not take part in the hash).
    pub guest: GuestImage,
}

impl Layout {
    /// The node that holds the devices, loads the guest and runs the boot vCPU: always 0.
    pub fn master(&self) -> NodeId {
        0
    }

    /// Number of nodes in the cluster: a `NodeId`, as the ids are `0..node_count`.
    pub fn node_count(&self) -> NodeId {
        NodeId::try_from(self.nodes.len()).expect("validation admits at most NodeId::MAX nodes")
    }

    /// The node that runs `vcpu`, or `None` if no node does (id out of range).
    pub fn node_of_vcpu(&self, vcpu: VcpuId) -> Option<NodeId> {
        self.nodes
            .iter()
            .find(|node| node.vcpus.contains(&vcpu))
            .map(|node| node.id)
    }

    /// The home node of the page holding `gpa`; `None` outside RAM.
    pub fn home_of(&self, gpa: u64) -> Option<NodeId> {
        let index = self.homes.partition_point(|home| home.end() <= gpa);
        self.homes
            .get(index)
            .filter(|home| home.gpa <= gpa)
            .map(|home| home.node)
    }

    /// Whether `gpa..gpa + len` lies entirely inside one RAM region. An empty range (`len`
    /// 0) is RAM when `gpa` is inside a region.
    pub fn is_ram(&self, gpa: u64, len: u64) -> bool {
        let Some(end) = gpa.checked_add(len.max(1)) else {
            return false;
        };
        self.ram
            .iter()
            .any(|region| region.gpa <= gpa && end <= region.end())
    }

    /// Highest RAM guest-physical address + 1.
    pub fn ram_end(&self) -> u64 {
        self.ram.last().map_or(0, RamRegion::end)
    }

    /// Size of the page index space, `ram_end / 4096`, including pages of the MMIO gap.
    pub fn page_count(&self) -> u64 {
        self.ram_end() / PAGE_SIZE
    }

    /// The node spec of node `id`, if it exists.
    pub fn node(&self, id: NodeId) -> Option<&NodeSpec> {
        self.nodes.get(node_index(id)).filter(|node| node.id == id)
    }

    /// The home ranges of node `id`, ascending.
    pub fn homes_of(&self, id: NodeId) -> impl Iterator<Item = &HomeRange> {
        self.homes.iter().filter(move |home| home.node == id)
    }
}

/// The RAM regions for `memory_size` bytes: below the MMIO gap, then from 4 GiB on.
pub(crate) fn ram_regions(memory_size: u64) -> Vec<RamRegion> {
    let low = memory_size.min(MMIO_GAP_START);
    let mut regions = Vec::with_capacity(2);
    if low > 0 {
        regions.push(RamRegion { gpa: 0, size: low });
    }
    if memory_size > low {
        regions.push(RamRegion {
            gpa: MMIO_GAP_END,
            size: memory_size - low,
        });
    }
    regions
}

/// The default homes: RAM split evenly between `node_count` nodes in id order, with the
/// boundaries (counted in bytes of RAM, not in addresses) rounded down to 2 MiB. A share that
/// spans the MMIO gap becomes two ranges.
pub(crate) fn default_homes(ram: &[RamRegion], node_count: usize) -> Vec<HomeRange> {
    let total: u64 = ram.iter().map(|region| region.size).sum();
    let nodes = node_count.max(1) as u64;
    let boundary = |k: u64| -> u64 {
        if k == nodes {
            total
        } else {
            // u128: total * k can exceed u64 for 1 TiB and many nodes only in theory, but
            // staying exact costs nothing.
            let even = u64::try_from(u128::from(total) * u128::from(k) / u128::from(nodes))
                .expect("k < nodes, so total * k / nodes < total fits u64");
            even / DEFAULT_HOME_ALIGN * DEFAULT_HOME_ALIGN
        }
    };
    let mut homes = Vec::new();
    for k in 0..nodes {
        let (share_start, share_end) = (boundary(k), boundary(k + 1));
        let mut region_offset = 0;
        for region in ram {
            let start = share_start.max(region_offset);
            let end = share_end.min(region_offset + region.size);
            if start < end {
                homes.push(HomeRange {
                    gpa: region.gpa + (start - region_offset),
                    size: end - start,
                    node: NodeId::try_from(k)
                        .expect("node ids are exactly 0..n and each is a NodeId, so k < n is one"),
                });
            }
            region_offset += region.size;
        }
    }
    homes
}
