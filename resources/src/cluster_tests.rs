//! Cluster descriptions and the node files rendered from them.

use std::net::SocketAddr;

use crate::test_support::TestDir;
use crate::{ClusterDescription, GuestImage, NodeConfig, TransportKind};

fn addrs() -> Vec<SocketAddr> {
    vec![
        "127.0.0.1:7100".parse().unwrap(),
        "[::1]:7101".parse().unwrap(),
    ]
}

/// Renders every node's file into `t`, parses it back and checks it has the same layout.
fn assert_round_trip(t: &TestDir, cluster: &ClusterDescription) {
    let secret = t.file("cluster.secret");
    for id in 0..cluster.node_count() {
        let text = cluster.render_node_file(id, &secret);
        let path = t.file(&format!("node{id}.toml"));
        std::fs::write(&path, &text).unwrap();
        let config = NodeConfig::load(&path).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(config.node, id);
        assert_eq!(config.local().id, id);
        assert_eq!(config.secret_path.as_deref(), Some(secret.as_path()));
        assert_eq!(config.layout.canonical(), cluster.layout.canonical());
        assert_eq!(config.layout.hash(), cluster.layout.hash());
        assert_eq!(config.layout, cluster.layout, "paths or homes differ");
        assert_eq!(config.service_priority, cluster.service_priority);
    }
}

#[test]
fn default_cluster_round_trips_probe() {
    let t = TestDir::new();
    let probe = GuestImage::Probe {
        name: "mem-bench_2".to_string(),
        arg: 7,
    };
    let cluster = ClusterDescription::default_cluster(probe, 256, &addrs());
    assert_eq!(cluster.node_count(), 2);
    assert_eq!(cluster.layout.vcpu_count, 2);
    assert_eq!(cluster.layout.transport, TransportKind::Tcp);
    assert_round_trip(&t, &cluster);
}

#[test]
fn default_cluster_round_trips_linux_above_3_gib() {
    let t = TestDir::new();
    std::fs::write(t.file("vmlinux"), b"kernel").unwrap();
    std::fs::write(t.file("initrd"), b"initrd").unwrap();
    std::fs::write(t.file("data.ext4"), [0u8; 4096]).unwrap();
    std::fs::write(t.file("ro.img"), [0u8; 512]).unwrap();
    let linux = GuestImage::Linux {
        kernel: t.file("vmlinux"),
        initrd: Some(t.file("initrd")),
        // Quotes, a backslash and a tab must survive TOML escaping.
        cmdline: "console=ttyS0 init=/init \"quoted\" back\\slash\tx".to_string(),
        disks: vec![
            crate::Disk {
                path: t.file("data.ext4"),
                read_only: false,
            },
            crate::Disk {
                path: t.file("ro.img"),
                read_only: true,
            },
        ],
        net: Some(crate::NetDevice {
            mac: [0x52, 0x54, 0, 0xab, 0xcd, 0xef],
            // Odd characters survive TOML escaping here too.
            tap: "tap\"q".into(),
            netns: Some("spanvm \\test".into()),
        }),
    };
    let cluster = ClusterDescription::default_cluster(linux, 5 * 1024 + 6, &addrs());
    assert_eq!(cluster.layout.ram.len(), 2);
    assert_round_trip(&t, &cluster);
}

#[test]
fn described_cluster_round_trips() {
    let t = TestDir::new();
    let text = r#"
transport = "rdma"
service_priority = "normal"

[guest]
vcpus = 4
memory_mib = 4096
probe = "coherence"

[[guest.home]]
node = 2
start = 0x100000000
size_mib = 1024

[[guest.home]]
node = 0
start = 0
size_mib = 1024

[[guest.home]]
node = 1
start = 0x40000000
size_mib = 2048

[[nodes]]
id = 2
address = "10.0.0.3:7100"
vcpus = [3]

[[nodes]]
id = 0
address = "10.0.0.1:7100"
vcpus = [2, 0]

[[nodes]]
id = 1
address = "10.0.0.2:7100"
vcpus = [1]
"#;
    let cluster = ClusterDescription::parse(text, &t.file("cluster.toml")).unwrap();
    assert_eq!(cluster.secret_path, None);
    assert_eq!(cluster.service_priority, crate::ServicePriority::Normal);
    assert_eq!(cluster.node_count(), 3);
    let ids: Vec<u32> = cluster.layout.nodes.iter().map(|n| n.id).collect();
    assert_eq!(ids, vec![0, 1, 2]);
    assert_eq!(cluster.layout.nodes[0].vcpus, vec![0, 2]);
    assert_eq!(cluster.layout.node_of_vcpu(2), Some(0));
    assert_eq!(cluster.layout.home_of(0x1_0000_0000), Some(2));
    assert_round_trip(&t, &cluster);
}

#[test]
fn cluster_description_rejects_node() {
    let t = TestDir::new();
    let text = "node = 0\n[guest]\nvcpus = 1\nmemory_mib = 64\nprobe = \"x\"\n\
                [[nodes]]\nid = 0\naddress = \"127.0.0.1:7100\"\nvcpus = [0]\n";
    let message = ClusterDescription::parse(text, &t.file("cluster.toml"))
        .unwrap_err()
        .to_string();
    assert!(message.contains("cluster.toml: field `node`"), "{message}");
    assert!(
        message.contains("not allowed in a cluster description"),
        "{message}"
    );
}

#[test]
fn cluster_description_checks_a_given_secret() {
    let t = TestDir::new();
    let text = "secret = \"nope\"\n[guest]\nvcpus = 1\nmemory_mib = 64\nprobe = \"x\"\n\
                [[nodes]]\nid = 0\naddress = \"127.0.0.1:7100\"\nvcpus = [0]\n";
    let message = ClusterDescription::parse(text, &t.file("cluster.toml"))
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("cluster.toml: field `secret`"),
        "{message}"
    );
}
