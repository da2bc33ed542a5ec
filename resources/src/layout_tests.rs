//! The memory map, home lookup, default home split and layout comparison.

use std::net::SocketAddr;

use crate::layout::{default_homes, ram_regions};
use crate::{
    ClusterDescription, GuestImage, HomeRange, Layout, RamRegion, DEFAULT_HOME_ALIGN, MIB,
    MMIO_GAP_END, MMIO_GAP_START,
};

const GIB: u64 = 1 << 30;

fn addrs() -> Vec<SocketAddr> {
    vec![
        "127.0.0.1:7100".parse().unwrap(),
        "127.0.0.1:7101".parse().unwrap(),
    ]
}

fn two_node_layout(memory_mib: u64) -> Layout {
    let probe = GuestImage::Probe {
        name: "hello".to_string(),
        arg: 0,
    };
    ClusterDescription::default_cluster(probe, memory_mib, &addrs()).layout
}

/// Asserts that `homes` are ascending and cover exactly the bytes of `ram`.
fn assert_tiles(homes: &[HomeRange], ram: &[RamRegion]) {
    let mut homes = homes.iter().peekable();
    for region in ram {
        let mut cursor = region.gpa;
        while cursor < region.end() {
            let home = homes.next().expect("homes end before RAM does");
            assert_eq!(home.gpa, cursor, "home does not start where the last ended");
            assert!(home.size > 0);
            cursor = home.end();
        }
        assert_eq!(cursor, region.end(), "home crosses the end of a RAM region");
    }
    assert!(homes.peek().is_none(), "homes beyond RAM");
}

#[test]
fn ram_below_3_gib_is_one_region() {
    assert_eq!(
        ram_regions(256 * MIB),
        vec![RamRegion {
            gpa: 0,
            size: 256 * MIB
        }]
    );
    assert_eq!(
        ram_regions(3 * GIB),
        vec![RamRegion {
            gpa: 0,
            size: 3 * GIB
        }]
    );
}

#[test]
fn ram_above_3_gib_continues_at_4_gib() {
    assert_eq!(
        ram_regions(4 * GIB + 2 * MIB),
        vec![
            RamRegion {
                gpa: 0,
                size: MMIO_GAP_START
            },
            RamRegion {
                gpa: MMIO_GAP_END,
                size: GIB + 2 * MIB
            },
        ]
    );
}

#[test]
fn queries_below_3_gib() {
    let layout = two_node_layout(256);
    assert_eq!(
        layout.ram,
        vec![RamRegion {
            gpa: 0,
            size: 256 * MIB
        }]
    );
    assert_eq!(layout.ram_end(), 256 * MIB);
    assert_eq!(layout.page_count(), 256 * MIB / 4096);
    assert_eq!(layout.home_of(0), Some(0));
    assert_eq!(layout.home_of(128 * MIB - 1), Some(0));
    assert_eq!(layout.home_of(128 * MIB), Some(1));
    assert_eq!(layout.home_of(256 * MIB - 1), Some(1));
    assert_eq!(layout.home_of(256 * MIB), None);
    assert_eq!(layout.home_of(0xFEE0_0000), None);
    assert!(layout.is_ram(0, 4096));
    assert!(layout.is_ram(256 * MIB - 4096, 4096));
    assert!(!layout.is_ram(256 * MIB - 4096, 4097));
    assert!(!layout.is_ram(256 * MIB, 1));
    assert!(layout.is_ram(5, 0));
    assert!(!layout.is_ram(256 * MIB, 0));
    assert!(!layout.is_ram(u64::MAX, 2));
}

#[test]
fn queries_above_3_gib() {
    let layout = two_node_layout(5 * 1024);
    assert_eq!(
        layout.ram,
        vec![
            RamRegion {
                gpa: 0,
                size: 3 * GIB
            },
            RamRegion {
                gpa: 4 * GIB,
                size: 2 * GIB
            },
        ]
    );
    assert_eq!(layout.ram_end(), 6 * GIB);
    assert_eq!(layout.page_count(), 6 * GIB / 4096);
    // 5 GiB split in two: node 0 has the first 2.5 GiB, node 1 the rest on both sides.
    assert_eq!(layout.home_of(0), Some(0));
    assert_eq!(layout.home_of(2 * GIB + 512 * MIB - 1), Some(0));
    assert_eq!(layout.home_of(2 * GIB + 512 * MIB), Some(1));
    assert_eq!(layout.home_of(3 * GIB - 1), Some(1));
    assert_eq!(layout.home_of(3 * GIB), None);
    assert_eq!(layout.home_of(0xFEC0_0000), None);
    assert_eq!(layout.home_of(4 * GIB), Some(1));
    assert_eq!(layout.home_of(6 * GIB - 1), Some(1));
    assert_eq!(layout.home_of(6 * GIB), None);
    assert!(layout.is_ram(3 * GIB - 4096, 4096));
    assert!(
        !layout.is_ram(3 * GIB - 4096, 8192),
        "a range may not run into the gap"
    );
    assert!(!layout.is_ram(3 * GIB, 4096));
    assert!(!layout.is_ram(4 * GIB - 4096, 8192));
    assert!(layout.is_ram(4 * GIB, 2 * GIB));
    assert!(!layout.is_ram(0, 6 * GIB), "a range may not span the gap");
    assert_tiles(&layout.homes, &layout.ram);
}

#[test]
fn default_split_is_even_in_id_order() {
    let ram = ram_regions(256 * MIB);
    assert_eq!(
        default_homes(&ram, 2),
        vec![
            HomeRange {
                gpa: 0,
                size: 128 * MIB,
                node: 0
            },
            HomeRange {
                gpa: 128 * MIB,
                size: 128 * MIB,
                node: 1
            },
        ]
    );
}

#[test]
fn default_split_rounds_boundaries_to_2_mib() {
    let ram = ram_regions(100 * MIB);
    let homes = default_homes(&ram, 3);
    // 100/3 = 33.3 MiB -> 32 MiB; 200/3 = 66.7 MiB -> 66 MiB.
    assert_eq!(
        homes,
        vec![
            HomeRange {
                gpa: 0,
                size: 32 * MIB,
                node: 0
            },
            HomeRange {
                gpa: 32 * MIB,
                size: 34 * MIB,
                node: 1
            },
            HomeRange {
                gpa: 66 * MIB,
                size: 34 * MIB,
                node: 2
            },
        ]
    );
    assert_tiles(&homes, &ram);
}

#[test]
fn default_split_across_the_gap() {
    let ram = ram_regions(4 * GIB);
    let homes = default_homes(&ram, 3);
    assert_tiles(&homes, &ram);
    for home in &homes[..homes.len() - 1] {
        assert_eq!(home.end() % DEFAULT_HOME_ALIGN, 0);
    }
    // Node 2's share (from 2730 MiB) crosses 3 GiB and is split around the gap.
    let node2: Vec<&HomeRange> = homes.iter().filter(|h| h.node == 2).collect();
    assert_eq!(node2.len(), 2);
    assert_eq!(node2[0].gpa, 2730 * MIB);
    assert_eq!(node2[0].end(), MMIO_GAP_START);
    assert_eq!(node2[1].gpa, MMIO_GAP_END);
    assert_eq!(node2[1].end(), MMIO_GAP_END + GIB);
}

#[test]
fn node_of_vcpu() {
    let layout = two_node_layout(256);
    assert_eq!(layout.master(), 0);
    assert_eq!(layout.node_count(), 2);
    assert_eq!(layout.node_of_vcpu(0), Some(0));
    assert_eq!(layout.node_of_vcpu(1), Some(1));
    assert_eq!(layout.node_of_vcpu(2), None);
}

#[test]
fn canonical_lists_facts_and_hash_follows_it() {
    let layout = two_node_layout(256);
    let text = layout.canonical();
    for line in [
        "vcpu 1 node 1",
        "home 0x0 0x8000000 node 0",
        "home 0x8000000 0x8000000 node 1",
        "ram 0x0 0x10000000",
        "transport tcp",
        "guest probe hello arg 0",
    ] {
        assert!(text.lines().any(|l| l == line), "no `{line}` in\n{text}");
    }
    let mut other = layout.clone();
    assert_eq!(layout.hash(), other.hash());
    other.transport = crate::TransportKind::Rdma;
    assert_ne!(layout.hash(), other.hash());
}

#[test]
fn canonical_excludes_paths() {
    let mut a = two_node_layout(256);
    a.guest = GuestImage::Linux {
        kernel: "/a/vmlinux".into(),
        initrd: None,
        cmdline: "console=ttyS0".into(),
        disks: vec![crate::Disk {
            path: "/a/data.ext4".into(),
            read_only: true,
        }],
        net: Some(crate::NetDevice {
            mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
            tap: "tap-a".into(),
            netns: Some("ns-a".into()),
        }),
    };
    let mut b = a.clone();
    b.guest = GuestImage::Linux {
        kernel: "/elsewhere/vmlinux".into(),
        initrd: Some("/elsewhere/initrd".into()),
        cmdline: "console=ttyS0".into(),
        disks: vec![crate::Disk {
            path: "/elsewhere/data.ext4".into(),
            read_only: true,
        }],
        net: Some(crate::NetDevice {
            mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
            tap: "tap-b".into(),
            netns: None,
        }),
    };
    assert_eq!(a.canonical(), b.canonical());
    assert!(!a.canonical().contains("/a/vmlinux"));
    assert!(!a.canonical().contains("data.ext4"));
    // Which tap backs the card is the master's business too.
    assert!(!a.canonical().contains("tap-a") && !a.canonical().contains("ns-a"));
    // The MAC, and whether there is a card at all, the guest sees on every node.
    let mut c = b.clone();
    if let GuestImage::Linux { net: Some(net), .. } = &mut c.guest {
        net.mac[5] = 0x57;
    }
    assert_ne!(b.canonical(), c.canonical());
    if let GuestImage::Linux { net, .. } = &mut c.guest {
        *net = None;
    }
    assert_ne!(b.canonical(), c.canonical());
    // Whether a disk is writable is the guest's business on every node.
    if let GuestImage::Linux { disks, .. } = &mut b.guest {
        disks[0].read_only = false;
    }
    assert_ne!(a.canonical(), b.canonical());
}

#[test]
fn first_difference_names_the_line() {
    let here = two_node_layout(256);
    assert_eq!(here.first_difference(&here.canonical()), None);

    let mut peer = here.clone();
    peer.nodes[0].vcpus = vec![0, 1];
    peer.nodes[1].vcpus = vec![];
    assert_eq!(
        here.first_difference(&peer.canonical()).unwrap(),
        "line 7: here `vcpu 1 node 1`, peer `vcpu 1 node 0`"
    );

    let text = here.canonical();
    let truncated: String = text.lines().take(3).map(|l| format!("{l}\n")).collect();
    assert_eq!(
        here.first_difference(&truncated).unwrap(),
        "line 4: here `node 1 address 127.0.0.1:7101`, peer (no such line)"
    );
}

#[test]
fn describe_shows_gap_placement_and_homes() {
    let text = two_node_layout(5 * 1024).describe();
    for needle in [
        "MMIO gap",
        "0xfec00000",
        "0xfee00000",
        "node 0 (master) at 127.0.0.1:7100",
        "vCPUs: 1",
        "0xa0000000..0xc0000000 (512 MiB)",
        "0x100000000..0x180000000",
        "transport: tcp",
        "probe `hello`",
    ] {
        assert!(text.contains(needle), "no `{needle}` in\n{text}");
    }
    let gap = text.find("MMIO gap").unwrap();
    assert!(text.find("0x000000000000..").unwrap() < gap);
    assert!(gap < text.find("0x000100000000..").unwrap());
}
