//! One test per kind of bad input: each checks that the message names the file and the field.

use crate::test_support::{TestDir, TWO_NODES};
use crate::{ConfigError, NodeConfig};

/// Asserts that `result` failed with a message naming `node0.toml`, mentioning `field`, and
/// containing `detail`; returns the message.
fn expect_error(result: Result<NodeConfig, ConfigError>, field: &str, detail: &str) -> String {
    let message = match result {
        Ok(config) => panic!("expected an error about {field}, got {config:?}"),
        Err(err) => err.to_string(),
    };
    assert!(message.contains("node0.toml"), "no file name in: {message}");
    assert!(message.contains(field), "no `{field}` in: {message}");
    assert!(message.contains(detail), "no `{detail}` in: {message}");
    message
}

fn invalid_field(t: &TestDir, text: &str, field: &str, detail: &str) -> String {
    expect_error(t.parse(text), &format!("field `{field}`"), detail)
}

/// `TWO_NODES` with its `[guest]` lines replaced: `extra` appended to [guest] after `probe`.
fn with_guest_extra(extra: &str) -> String {
    TWO_NODES.replace(
        "probe = \"hello\"\n",
        &format!("probe = \"hello\"\n{extra}\n"),
    )
}

#[test]
fn template_is_valid() {
    let t = TestDir::new();
    let config = t.parse(TWO_NODES).unwrap();
    assert_eq!(config.node, 0);
    assert_eq!(config.local().vcpus, vec![0]);
    assert_eq!(config.secret_path, Some(t.file("cluster.secret")));
    assert_eq!(config.read_secret().unwrap(), Some(vec![7u8; 32]));
}

#[test]
fn missing_file_names_file_and_os_error() {
    let t = TestDir::new();
    let err = NodeConfig::load(&t.file("node0.toml")).unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }));
    let message = err.to_string();
    assert!(message.contains("node0.toml"), "{message}");
    assert!(message.contains("No such file or directory"), "{message}");
}

#[test]
fn invalid_toml_gives_line_and_column() {
    let t = TestDir::new();
    let text = TWO_NODES.replace("vcpus = 2\n", "vcpus = \n");
    let err = t.parse(&text).unwrap_err();
    let ConfigError::Toml { line, .. } = &err else {
        panic!("expected a TOML error, got {err}");
    };
    assert_eq!(*line, 6);
    let message = err.to_string();
    assert!(message.contains("node0.toml: line 6, column"), "{message}");
    assert!(message.contains("vcpus ="), "{message}");
}

#[test]
fn wrong_type_names_the_key() {
    let t = TestDir::new();
    let text = TWO_NODES.replace("memory_mib = 256", "memory_mib = \"lots\"");
    expect_error(t.parse(&text), "memory_mib", "line 7");
}

#[test]
fn unknown_field_top_level() {
    let t = TestDir::new();
    let text = format!("colour = \"red\"\n{TWO_NODES}");
    expect_error(t.parse(&text), "`colour`", "unknown field");
}

#[test]
fn unknown_field_in_guest() {
    let t = TestDir::new();
    expect_error(
        t.parse(&with_guest_extra("memory_gib = 1")),
        "`memory_gib`",
        "unknown field",
    );
}

#[test]
fn unknown_field_in_nodes() {
    let t = TestDir::new();
    let text = TWO_NODES.replace("vcpus = [1]", "vcpus = [1]\nport = 7");
    expect_error(t.parse(&text), "`port`", "(in `port = 7` under [[nodes]])");
}

#[test]
fn node_not_in_nodes() {
    let t = TestDir::new();
    let text = TWO_NODES.replace("node = 0\n", "node = 2\n");
    invalid_field(&t, &text, "node", "2 is not the id of a [[nodes]] entry");
}

#[test]
fn node_missing_in_node_file() {
    let t = TestDir::new();
    let text = TWO_NODES.replace("node = 0\n", "");
    invalid_field(&t, &text, "node", "missing");
}

#[test]
fn duplicate_node_id() {
    let t = TestDir::new();
    let text = TWO_NODES.replace("id = 1", "id = 0");
    invalid_field(&t, &text, "nodes[1].id", "id 0 is already used by nodes[0]");
}

#[test]
fn gap_in_node_ids() {
    let t = TestDir::new();
    let text = TWO_NODES.replace("id = 1", "id = 2");
    invalid_field(&t, &text, "nodes", "id 1 is missing");
}

#[test]
fn no_nodes() {
    let t = TestDir::new();
    let text = "node = 0\n[guest]\nvcpus = 1\nmemory_mib = 64\nprobe = \"x\"\n";
    invalid_field(&t, text, "nodes", "at least one [[nodes]]");
}

#[test]
fn duplicate_address() {
    let t = TestDir::new();
    let text = TWO_NODES.replace("127.0.0.1:7101", "127.0.0.1:7100");
    invalid_field(
        &t,
        &text,
        "nodes[1].address",
        "127.0.0.1:7100 is already the address of nodes[0]",
    );
}

#[test]
fn unparsable_and_unusable_addresses() {
    let t = TestDir::new();
    let text = TWO_NODES.replace("127.0.0.1:7101", "node1:7101");
    invalid_field(&t, &text, "nodes[1].address", "not an ip:port");
    let text = TWO_NODES.replace("127.0.0.1:7101", "0.0.0.0:7101");
    invalid_field(&t, &text, "nodes[1].address", "unspecified");
    let text = TWO_NODES.replace("127.0.0.1:7101", "127.0.0.1:0");
    invalid_field(&t, &text, "nodes[1].address", "port 0");
}

#[test]
fn guest_vcpus_out_of_range() {
    let t = TestDir::new();
    let text = TWO_NODES.replace("vcpus = 2\n", "vcpus = 0\n");
    invalid_field(&t, &text, "guest.vcpus", "0 is out of range");
    let text = TWO_NODES.replace("vcpus = 2\n", "vcpus = 256\n");
    invalid_field(&t, &text, "guest.vcpus", "256 is out of range");
}

#[test]
fn vcpu_twice_on_one_node() {
    let t = TestDir::new();
    let text = TWO_NODES.replace("vcpus = [1]", "vcpus = [1, 1]");
    invalid_field(
        &t,
        &text,
        "nodes[1].vcpus[1]",
        "vCPU 1 is placed twice: already at nodes[1].vcpus[0] (earlier in this list)",
    );
}

#[test]
fn vcpu_on_two_nodes() {
    let t = TestDir::new();
    let text = TWO_NODES.replace("vcpus = [1]", "vcpus = [0]");
    invalid_field(
        &t,
        &text,
        "nodes[1].vcpus[0]",
        "vCPU 0 is placed twice: already at nodes[0].vcpus[0] (on nodes[0])",
    );
}

#[test]
fn vcpu_not_placed() {
    let t = TestDir::new();
    let text = TWO_NODES.replace("vcpus = 2\n", "vcpus = 3\n");
    invalid_field(&t, &text, "nodes", "vCPU 2 is not placed on any node");
}

#[test]
fn vcpu_id_beyond_guest_vcpus() {
    let t = TestDir::new();
    let text = TWO_NODES.replace("vcpus = [1]", "vcpus = [1, 2]");
    invalid_field(
        &t,
        &text,
        "nodes[1].vcpus[1]",
        "vCPU 2 is out of range: guest.vcpus = 2",
    );
    let text = TWO_NODES.replace("vcpus = [1]", "vcpus = [-1]");
    invalid_field(&t, &text, "nodes[1].vcpus[0]", "vCPU -1 is out of range");
}

#[test]
fn boot_vcpu_must_be_on_master() {
    let t = TestDir::new();
    let text = TWO_NODES
        .replace("vcpus = [0]", "vcpus = [9]")
        .replace("vcpus = [1]", "vcpus = [0]")
        .replace("vcpus = [9]", "vcpus = [1]");
    invalid_field(
        &t,
        &text,
        "nodes[1].vcpus[0]",
        "vCPU 0 is the boot processor",
    );
}

#[test]
fn memory_below_minimum() {
    let t = TestDir::new();
    let text = TWO_NODES.replace("memory_mib = 256", "memory_mib = 8");
    invalid_field(
        &t,
        &text,
        "guest.memory_mib",
        "8 MiB is below the minimum of 16 MiB",
    );
}

#[test]
fn memory_above_maximum() {
    let t = TestDir::new();
    let text = TWO_NODES.replace("memory_mib = 256", "memory_mib = 1048577");
    invalid_field(&t, &text, "guest.memory_mib", "above the maximum");
}

fn homes(entries: &[(i64, &str, i64)]) -> String {
    let mut text = String::new();
    for (node, start, size_mib) in entries {
        text.push_str(&format!(
            "[[guest.home]]\nnode = {node}\nstart = {start}\nsize_mib = {size_mib}\n"
        ));
    }
    TWO_NODES.replace("\n[[nodes]]\nid = 0", &format!("{text}\n[[nodes]]\nid = 0"))
}

#[test]
fn explicit_homes_are_used() {
    let t = TestDir::new();
    let text = homes(&[(1, "0x4000000", 192), (0, "0x0", 64)]);
    let layout = t.parse(&text).unwrap().layout;
    assert_eq!(layout.home_of(0), Some(0));
    assert_eq!(layout.home_of(0x400_0000 - 1), Some(0));
    assert_eq!(layout.home_of(0x400_0000), Some(1));
    assert_eq!(layout.homes.len(), 2);
    assert!(layout.homes[0].gpa < layout.homes[1].gpa);
}

#[test]
fn homes_overlap() {
    let t = TestDir::new();
    let text = homes(&[(0, "0x0", 128), (1, "0x7000000", 144)]);
    invalid_field(
        &t,
        &text,
        "guest.home[1]",
        "0x7000000..0x10000000 overlaps guest.home[0] (0x0..0x8000000)",
    );
}

#[test]
fn homes_leave_gap() {
    let t = TestDir::new();
    let text = homes(&[(0, "0x0", 64), (1, "0x8000000", 128)]);
    invalid_field(
        &t,
        &text,
        "guest.home",
        "RAM 0x4000000..0x8000000 is in no home range (between guest.home[0] and guest.home[1])",
    );
    let text = homes(&[(0, "0x0", 128)]);
    invalid_field(&t, &text, "guest.home", "RAM 0x8000000..0x10000000");
}

#[test]
fn home_outside_ram() {
    let t = TestDir::new();
    let text = homes(&[(0, "0x0", 128), (1, "0x8000000", 256)]);
    invalid_field(
        &t,
        &text,
        "guest.home[1]",
        "0x8000000..0x18000000 lies outside guest RAM; RAM is 0x0..0x10000000",
    );
}

#[test]
fn home_in_mmio_gap() {
    let t = TestDir::new();
    let text = homes(&[(0, "0x0", 128), (1, "0xc0000000", 128)]);
    invalid_field(
        &t,
        &text,
        "guest.home[1]",
        "lies in the MMIO gap 0xc0000000..0x100000000",
    );
}

#[test]
fn home_names_unknown_node() {
    let t = TestDir::new();
    let text = homes(&[(0, "0x0", 128), (2, "0x8000000", 128)]);
    invalid_field(
        &t,
        &text,
        "guest.home[1].node",
        "node 2 is not in [[nodes]]",
    );
}

#[test]
fn home_not_page_aligned() {
    let t = TestDir::new();
    let text = homes(&[(0, "0x0", 128), (1, "0x8000800", 128)]);
    invalid_field(
        &t,
        &text,
        "guest.home[1].start",
        "0x8000800 is not aligned to 4 KiB",
    );
}

#[test]
fn home_size_not_positive() {
    let t = TestDir::new();
    let text = homes(&[(0, "0x0", 0)]);
    invalid_field(
        &t,
        &text,
        "guest.home[0].size_mib",
        "0 is not a usable size",
    );
}

#[test]
fn probe_and_linux_both() {
    let t = TestDir::new();
    std::fs::write(t.file("vmlinux"), b"kernel").unwrap();
    let text = with_guest_extra("[guest.linux]\nkernel = \"vmlinux\"");
    invalid_field(
        &t,
        &text,
        "guest.probe",
        "given together with [guest.linux]",
    );
}

#[test]
fn neither_probe_nor_linux() {
    let t = TestDir::new();
    let text = TWO_NODES.replace("probe = \"hello\"\n", "");
    invalid_field(&t, &text, "guest.probe", "missing: give either");
}

#[test]
fn bad_probe_name() {
    let t = TestDir::new();
    let text = TWO_NODES.replace("probe = \"hello\"", "probe = \"Hello World\"");
    invalid_field(&t, &text, "guest.probe", "is not a probe name");
    let text = TWO_NODES.replace("probe = \"hello\"", "probe = \"\"");
    invalid_field(&t, &text, "guest.probe", "is not a probe name");
}

fn linux_guest(t: &TestDir, linux: &str) -> String {
    std::fs::write(t.file("vmlinux"), b"kernel").unwrap();
    TWO_NODES.replace("probe = \"hello\"\n", &format!("[guest.linux]\n{linux}\n"))
}

#[test]
fn missing_kernel() {
    let t = TestDir::new();
    let text = linux_guest(&t, "kernel = \"bzImage\"");
    let message = invalid_field(&t, &text, "guest.linux.kernel", "No such file or directory");
    assert!(
        message.contains(&t.file("bzImage").display().to_string()),
        "{message}"
    );
}

#[test]
fn missing_initrd() {
    let t = TestDir::new();
    let text = linux_guest(&t, "kernel = \"vmlinux\"\ninitrd = \"initramfs.cpio\"");
    invalid_field(&t, &text, "guest.linux.initrd", "initramfs.cpio");
}

#[test]
fn kernel_is_a_directory() {
    let t = TestDir::new();
    std::fs::create_dir(t.file("kdir")).unwrap();
    let text = linux_guest(&t, "kernel = \"kdir\"");
    invalid_field(&t, &text, "guest.linux.kernel", "is not a regular file");
}

#[test]
fn cmdline_too_long() {
    let t = TestDir::new();
    let long = "a".repeat(2048);
    let text = linux_guest(&t, &format!("kernel = \"vmlinux\"\ncmdline = \"{long}\""));
    invalid_field(
        &t,
        &text,
        "guest.linux.cmdline",
        "2048 bytes long; the maximum is 2047",
    );
    let ok = "a".repeat(2047);
    let text = linux_guest(&t, &format!("kernel = \"vmlinux\"\ncmdline = \"{ok}\""));
    assert!(t.parse(&text).is_ok());
}

fn linux_with_disks(t: &TestDir, disks: &str) -> String {
    linux_guest(t, &format!("kernel = \"vmlinux\"\n{disks}"))
}

#[test]
fn disks_resolve_against_the_config_directory_and_default_to_writable() {
    let t = TestDir::new();
    std::fs::write(t.file("data.ext4"), [0u8; 4096]).unwrap();
    std::fs::write(t.file("seed.img"), [0u8; 512]).unwrap();
    let text = linux_with_disks(
        &t,
        "[[guest.disk]]\npath = \"data.ext4\"\n[[guest.disk]]\npath = \"seed.img\"\nread_only = true",
    );
    let config = t.parse(&text).unwrap();
    let crate::GuestImage::Linux { disks, .. } = &config.layout.guest else {
        panic!("expected a Linux guest");
    };
    assert_eq!(
        disks,
        &vec![
            crate::Disk {
                path: t.file("data.ext4"),
                read_only: false
            },
            crate::Disk {
                path: t.file("seed.img"),
                read_only: true
            },
        ]
    );
}

#[test]
fn bad_disks() {
    let t = TestDir::new();
    let text = linux_with_disks(&t, "[[guest.disk]]\npath = \"nowhere.img\"");
    invalid_field(&t, &text, "guest.disk[0].path", "No such file or directory");
    std::fs::write(t.file("data.ext4"), [0u8; 4096]).unwrap();
    let twice = "[[guest.disk]]\npath = \"data.ext4\"\n[[guest.disk]]\npath = \"./data.ext4\"";
    let text = linux_with_disks(&t, twice);
    invalid_field(&t, &text, "guest.disk[1].path", "already an earlier disk");
    let many = "[[guest.disk]]\npath = \"data.ext4\"\n".repeat(7);
    invalid_field(&t, &linux_with_disks(&t, &many), "guest.disk", "at most 6");
    let text = with_guest_extra("[[guest.disk]]\npath = \"data.ext4\"");
    invalid_field(&t, &text, "guest.disk", "given for a probe guest");
}

#[test]
fn secret_file_missing() {
    let t = TestDir::new();
    let text = TWO_NODES.replace("cluster.secret", "other.secret");
    invalid_field(&t, &text, "secret", "No such file or directory");
}

#[test]
fn secret_field_missing_with_two_nodes() {
    let t = TestDir::new();
    let text = TWO_NODES.replace("secret = \"cluster.secret\"\n", "");
    invalid_field(&t, &text, "secret", "missing: with 2 nodes");
}

#[test]
fn secret_too_short() {
    let t = TestDir::new();
    std::fs::write(t.file("short.secret"), b"0123456789").unwrap();
    let text = TWO_NODES.replace("cluster.secret", "short.secret");
    invalid_field(&t, &text, "secret", "holds 10 bytes");
}

#[test]
fn secret_vanished_before_read() {
    let t = TestDir::new();
    let config = t.parse(TWO_NODES).unwrap();
    std::fs::remove_file(t.file("cluster.secret")).unwrap();
    let message = config.read_secret().unwrap_err().to_string();
    assert!(message.contains("node0.toml: field `secret`"), "{message}");
    assert!(message.contains("cluster.secret"), "{message}");
}

#[test]
fn single_node_needs_no_secret() {
    let t = TestDir::new();
    let text = "node = 0\n[guest]\nvcpus = 1\nmemory_mib = 64\nprobe = \"x\"\n\
                [[nodes]]\nid = 0\naddress = \"127.0.0.1:7100\"\nvcpus = [0]\n";
    let config = t.parse(text).unwrap();
    assert_eq!(config.secret_path, None);
    assert_eq!(config.read_secret().unwrap(), None);
    assert_eq!(config.layout.homes.len(), 1);
}

#[test]
fn unknown_transport() {
    let t = TestDir::new();
    let text = TWO_NODES.replace("secret =", "transport = \"udp\"\nsecret =");
    invalid_field(&t, &text, "transport", "unknown transport \"udp\"");
}

#[test]
fn service_priority_defaults_to_realtime_and_refuses_unknown_values() {
    let t = TestDir::new();
    let config = t.parse(TWO_NODES).unwrap();
    assert_eq!(config.service_priority, crate::ServicePriority::Realtime);
    let text = TWO_NODES.replace("secret =", "service_priority = \"normal\"\nsecret =");
    let config = t.parse(&text).unwrap();
    assert_eq!(config.service_priority, crate::ServicePriority::Normal);
    // Node-local: not part of what the nodes compare at the handshake.
    assert_eq!(
        config.layout.canonical(),
        t.parse(TWO_NODES).unwrap().layout.canonical()
    );
    let text = TWO_NODES.replace("secret =", "service_priority = \"fifo\"\nsecret =");
    invalid_field(
        &t,
        &text,
        "service_priority",
        "unknown service priority \"fifo\"",
    );
}

#[test]
fn rdma_transport_accepted() {
    let t = TestDir::new();
    let text = TWO_NODES.replace("secret =", "transport = \"rdma\"\nsecret =");
    let layout = t.parse(&text).unwrap().layout;
    assert_eq!(layout.transport, crate::TransportKind::Rdma);
}

#[test]
fn probe_arg_is_handed_to_the_probe_and_must_not_be_negative() {
    let t = TestDir::new();
    let config = t.parse(&with_guest_extra("probe_arg = 100000")).unwrap();
    assert_eq!(
        config.layout.guest,
        crate::GuestImage::Probe {
            name: "hello".into(),
            arg: 100000
        }
    );
    invalid_field(
        &t,
        &with_guest_extra("probe_arg = -1"),
        "guest.probe_arg",
        "negative",
    );
}

fn linux_with_net(t: &TestDir, net: &str) -> String {
    linux_guest(t, &format!("kernel = \"vmlinux\"\n[guest.net]\n{net}"))
}

fn net_of(config: &NodeConfig) -> crate::NetDevice {
    let crate::GuestImage::Linux { net, .. } = &config.layout.guest else {
        panic!("expected a Linux guest");
    };
    net.clone().expect("a network card")
}

#[test]
fn net_on_an_existing_tap_with_a_given_mac() {
    let t = TestDir::new();
    let text = linux_with_net(&t, "tap = \"tap0\"\nmac = \"52:54:00:AB:cd:0f\"");
    let net = net_of(&t.parse(&text).unwrap());
    assert_eq!(
        net,
        crate::NetDevice {
            mac: [0x52, 0x54, 0x00, 0xab, 0xcd, 0x0f],
            tap: "tap0".into(),
            netns: None,
        }
    );
    assert_eq!(net.mac_string(), "52:54:00:ab:cd:0f");
}

#[test]
fn net_in_a_namespace_defaults_its_tap_and_mac() {
    let t = TestDir::new();
    let net = net_of(&t.parse(&linux_with_net(&t, "netns = \"lab\"")).unwrap());
    assert_eq!(net.tap, "spanvm0");
    assert_eq!(net.netns.as_deref(), Some("lab"));
    // Deterministic, unicast, locally administered.
    assert_eq!(
        net.mac,
        crate::NetDevice::default_mac("spanvm0", Some("lab"))
    );
    assert_eq!(net.mac[0] & 0b11, 0b10);
    let again = net_of(&t.parse(&linux_with_net(&t, "netns = \"lab\"")).unwrap());
    assert_eq!(net.mac, again.mac);
    let other = net_of(&t.parse(&linux_with_net(&t, "netns = \"lab2\"")).unwrap());
    assert_ne!(net.mac, other.mac);
    let named = net_of(
        &t.parse(&linux_with_net(&t, "netns = \"lab\"\ntap = \"vm1\""))
            .unwrap(),
    );
    assert_eq!(named.tap, "vm1");
    assert_eq!(named.netns.as_deref(), Some("lab"));
}

#[test]
fn bad_net() {
    let t = TestDir::new();
    let cases = [
        (
            "mac = \"52:54:00:12:34:56\"",
            "guest.net",
            "neither `tap` nor `netns`",
        ),
        ("tap = \"\"", "guest.net.tap", "empty"),
        ("tap = \"a-very-long-tap-0\"", "guest.net.tap", "at most 15"),
        ("tap = \"a/b\"", "guest.net.tap", "not an interface name"),
        ("netns = \"\"", "guest.net.netns", "empty"),
        (
            "netns = \"../x\"",
            "guest.net.netns",
            "not a namespace name",
        ),
        (
            "tap = \"t\"\nmac = \"52:54:00:12:34\"",
            "guest.net.mac",
            "not a MAC address",
        ),
        (
            "tap = \"t\"\nmac = \"52:54:00:12:34:5g\"",
            "guest.net.mac",
            "not a MAC address",
        ),
        (
            "tap = \"t\"\nmac = \"52-54-00-12-34-56\"",
            "guest.net.mac",
            "not a MAC address",
        ),
        (
            "tap = \"t\"\nmac = \"01:00:5e:00:00:01\"",
            "guest.net.mac",
            "multicast",
        ),
        (
            "tap = \"t\"\nmac = \"00:00:00:00:00:00\"",
            "guest.net.mac",
            "not a usable",
        ),
    ];
    for (net, field, detail) in cases {
        invalid_field(&t, &linux_with_net(&t, net), field, detail);
    }
    // Exactly 15 bytes is fine.
    assert!(t
        .parse(&linux_with_net(&t, "tap = \"a-very-long-tap\""))
        .is_ok());
    let text = with_guest_extra("[guest.net]\ntap = \"tap0\"");
    invalid_field(&t, &text, "guest.net", "given for a probe guest");
    let text = linux_with_net(&t, "tap = \"t\"\nbridge = \"br0\"");
    assert!(t.parse(&text).is_err());
}
