//! The cluster description of spanvm: per-node config files and the guest layout every node
//! must agree on.
//!
//! A node reads its TOML file with [`NodeConfig::load`], which validates it completely (every
//! problem is one [`ConfigError`] that names the file and the field) and derives the [`Layout`]:
//! the nodes and their addresses, which node runs which vCPU, the guest-physical memory map,
//! which node is home for which RAM range, the transport and the guest image. Nodes compare
//! [`Layout::hash`] when they connect and explain a mismatch with [`Layout::first_difference`].
//!
//! [`ClusterDescription`] is the one-file form used by `spanvm cluster`: it holds the same
//! schema without `node` and renders each node's file.

mod canonical;
mod cluster;
mod config_word;
mod describe;
mod error;
mod homes;
mod layout;
mod node_config;
mod raw;
mod service_priority;
mod validate;

#[cfg(test)]
mod cluster_tests;
#[cfg(test)]
mod layout_tests;
#[cfg(test)]
mod test_support;
#[cfg(test)]
mod validate_tests;

pub use cluster::ClusterDescription;
pub use config_word::ConfigWord;
pub use error::ConfigError;
pub use layout::{
    format_mac, Disk, GuestImage, HomeRange, Layout, NetDevice, NodeSpec, RamRegion, TransportKind,
};
pub use node_config::NodeConfig;
pub use service_priority::ServicePriority;

/// Index of a node in the cluster; node ids are exactly `0..n`.
///
/// The one node id type of spanvm: transport, dsm and forward re-export it, so ids cross crate
/// boundaries unchanged. Wire formats keep their own widths and convert, with range checks, where
/// they encode and decode.
pub type NodeId = u32;

// `node_index` cannot fail: spanvm runs on x86-64 KVM hosts, where usize has 64 bits.
const _: () = assert!(usize::BITS >= NodeId::BITS);

/// `node` (an id, or a count of nodes) as a `usize`, to index or size a per-node table: the one
/// conversion from node ids to `usize`, so that no other code casts ids.
pub fn node_index(node: NodeId) -> usize {
    usize::try_from(node).expect("usize holds every NodeId (asserted at compile time)")
}
/// Index of a guest vCPU; vCPU ids are exactly `0..vcpu_count`.
pub type VcpuId = u32;

/// Granularity of the distributed shared memory and of home-range alignment.
pub const PAGE_SIZE: u64 = 4096;
/// First guest-physical address of the hole below 4 GiB reserved for MMIO (IOAPIC, LAPIC,
/// devices); RAM above this continues at [`MMIO_GAP_END`].
pub const MMIO_GAP_START: u64 = 0xC000_0000;
/// End (exclusive) of the MMIO hole; RAM beyond the first 3 GiB starts here.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Guest-physical address of the IOAPIC's MMIO window (inside the MMIO gap).
pub const IOAPIC_GPA: u64 = 0xFEC0_0000;
/// Guest-physical address of the local APIC's xAPIC MMIO window (inside the MMIO gap).
pub const LAPIC_GPA: u64 = 0xFEE0_0000;

/// One mebibyte, the unit of `memory_mib` and `size_mib`.
pub const MIB: u64 = 1 << 20;
/// Smallest guest RAM a config may ask for.
pub const MIN_MEMORY_MIB: u64 = 16;
/// Largest guest RAM a config may ask for (1 TiB).
pub const MAX_MEMORY_MIB: u64 = 1 << 20;
/// Largest number of vCPUs a guest may have (xAPIC ids are 8 bits, 0xff is broadcast).
pub const MAX_VCPUS: u32 = 255;
/// Longest kernel command line accepted (bytes, without the terminating NUL).
pub const MAX_CMDLINE_LEN: usize = 2047;
/// The most virtio-blk disks a guest can have: with the entropy and network devices, the
/// eight IOAPIC inputs 16-23 that virtio devices use.
pub const MAX_DISKS: usize = 6;
/// Smallest cluster secret accepted (bytes).
pub const MIN_SECRET_LEN: u64 = 16;
/// Alignment of the boundaries of the default home split.
pub const DEFAULT_HOME_ALIGN: u64 = 2 * MIB;
