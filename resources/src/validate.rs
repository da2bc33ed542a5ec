//! From the raw serde structs to a checked [`Layout`]: every rule of the config format lives
//! here (homes in `homes.rs`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::homes::validate_homes;
use crate::layout::{default_homes, ram_regions};
use crate::raw::{RawConfig, RawDisk, RawGuest, RawLinux, RawNet, RawNode};
use crate::{
    node_index, ConfigError, ConfigWord, Disk, GuestImage, Layout, NetDevice, NodeId, NodeSpec,
    ServicePriority, TransportKind, VcpuId, MAX_CMDLINE_LEN, MAX_DISKS, MAX_MEMORY_MIB, MAX_VCPUS,
    MIB, MIN_MEMORY_MIB, MIN_SECRET_LEN,
};

/// Which of the two file forms is being validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FileKind {
    /// A node file: `node` required, `secret` required with more than one node.
    Node,
    /// A cluster description: no `node`, `secret` optional.
    Cluster,
}

/// A validated file.
#[derive(Debug)]
pub(crate) struct Validated {
    /// The file's `node` (node files only).
    pub node: Option<NodeId>,
    /// The resolved secret path, if given.
    pub secret_path: Option<PathBuf>,
    /// The derived layout.
    pub layout: Layout,
    /// How the fault-service threads are scheduled.
    pub service_priority: ServicePriority,
}

/// Checks every rule of the format and derives the layout; relative paths are resolved
/// against `path`'s directory.
pub(crate) fn validate(
    raw: RawConfig,
    path: &Path,
    kind: FileKind,
) -> Result<Validated, ConfigError> {
    let transport = validate_word(
        path,
        "transport",
        "transport",
        raw.transport.as_deref(),
        TransportKind::Tcp,
    )?;
    let service_priority = validate_word(
        path,
        "service_priority",
        "service priority",
        raw.service_priority.as_deref(),
        ServicePriority::default(),
    )?;
    let vcpu_count = validate_vcpu_count(path, raw.guest.vcpus)?;
    let memory_size = validate_memory(path, raw.guest.memory_mib)?;
    let guest = validate_image(path, &raw.guest)?;
    let nodes = validate_nodes(path, &raw.nodes, vcpu_count)?;

    let node = match (kind, raw.node) {
        (FileKind::Node, None) => {
            return Err(ConfigError::invalid(
                path,
                "node",
                "missing: a node file must say which [[nodes]] entry it is for (node = <id>)",
            ))
        }
        (FileKind::Node, Some(id)) => Some(
            NodeId::try_from(id)
                .ok()
                .filter(|&id| node_index(id) < nodes.len())
                .ok_or_else(|| {
                    ConfigError::invalid(
                        path,
                        "node",
                        format!(
                            "{id} is not the id of a [[nodes]] entry (ids are 0..={})",
                            nodes.len() - 1
                        ),
                    )
                })?,
        ),
        (FileKind::Cluster, Some(_)) => {
            return Err(ConfigError::invalid(
                path,
                "node",
                "not allowed in a cluster description, which describes every node; remove it",
            ))
        }
        (FileKind::Cluster, None) => None,
    };

    let ram = ram_regions(memory_size);
    let homes = match &raw.guest.home {
        Some(entries) => validate_homes(path, entries, &ram, nodes.len())?,
        None => default_homes(&ram, nodes.len()),
    };

    let secret_path = match raw.secret.as_deref() {
        Some(secret) => Some(validate_secret(path, secret)?),
        None if kind == FileKind::Node && nodes.len() > 1 => {
            return Err(ConfigError::invalid(
                path,
                "secret",
                format!(
                    "missing: with {} nodes every node needs the cluster secret, the path of a \
                     file of at least {MIN_SECRET_LEN} bytes shared by all nodes",
                    nodes.len()
                ),
            ))
        }
        None => None,
    };

    Ok(Validated {
        node,
        secret_path,
        service_priority,
        layout: Layout {
            nodes,
            vcpu_count,
            memory_size,
            ram,
            homes,
            transport,
            guest,
        },
    })
}

/// `rel` resolved against the directory of the config file `config`, made absolute so that it
/// still names the same file when written into another file.
pub(crate) fn resolve(config: &Path, rel: &str) -> PathBuf {
    let dir = config.parent().unwrap_or(Path::new(""));
    let joined = dir.join(rel);
    std::path::absolute(&joined).unwrap_or(joined)
}

/// The choice `text` names for `field` (`what` in the refusal), or `default` when it is absent.
fn validate_word<T: ConfigWord>(
    path: &Path,
    field: &'static str,
    what: &str,
    text: Option<&str>,
    default: T,
) -> Result<T, ConfigError> {
    match text {
        None => Ok(default),
        Some(text) => T::from_config(text).ok_or_else(|| {
            ConfigError::invalid(
                path,
                field,
                format!("unknown {what} {text:?}; use {}", T::choices()),
            )
        }),
    }
}

fn validate_vcpu_count(path: &Path, vcpus: i64) -> Result<u32, ConfigError> {
    u32::try_from(vcpus)
        .ok()
        .filter(|count| (1..=MAX_VCPUS).contains(count))
        .ok_or_else(|| {
            ConfigError::invalid(
                path,
                "guest.vcpus",
                format!("{vcpus} is out of range; a guest has 1..={MAX_VCPUS} vCPUs"),
            )
        })
}

fn validate_memory(path: &Path, memory_mib: i64) -> Result<u64, ConfigError> {
    let mib = u64::try_from(memory_mib).unwrap_or(0);
    if mib < MIN_MEMORY_MIB {
        return Err(ConfigError::invalid(
            path,
            "guest.memory_mib",
            format!("{memory_mib} MiB is below the minimum of {MIN_MEMORY_MIB} MiB"),
        ));
    }
    if mib > MAX_MEMORY_MIB {
        return Err(ConfigError::invalid(
            path,
            "guest.memory_mib",
            format!("{memory_mib} MiB is above the maximum of {MAX_MEMORY_MIB} MiB (1 TiB)"),
        ));
    }
    Ok(mib * MIB)
}

fn validate_image(path: &Path, guest: &RawGuest) -> Result<GuestImage, ConfigError> {
    match (&guest.probe, &guest.linux) {
        (Some(_), Some(_)) => Err(ConfigError::invalid(
            path,
            "guest.probe",
            "given together with [guest.linux]; a guest is either a probe or Linux, remove one",
        )),
        (None, None) => Err(ConfigError::invalid(
            path,
            "guest.probe",
            "missing: give either `probe = \"<name>\"` or a [guest.linux] table with `kernel`",
        )),
        (Some(_), None) if guest.disk.as_ref().is_some_and(|d| !d.is_empty()) => {
            Err(ConfigError::invalid(
                path,
                "guest.disk",
                "given for a probe guest; disks are virtio-blk devices for a Linux guest, remove them",
            ))
        }
        (Some(_), None) if guest.net.is_some() => Err(ConfigError::invalid(
            path,
            "guest.net",
            "given for a probe guest; the network card is a virtio-net device for a Linux guest, remove it",
        )),
        (Some(name), None) => {
            let valid = !name.is_empty()
                && name.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'
                });
            let arg = match guest.probe_arg {
                None => 0,
                Some(a) => u64::try_from(a).map_err(|_| {
                    ConfigError::invalid(
                        path,
                        "guest.probe_arg",
                        format!("{a} is negative; give a number >= 0"),
                    )
                })?,
            };
            if valid {
                Ok(GuestImage::Probe {
                    name: name.clone(),
                    arg,
                })
            } else {
                Err(ConfigError::invalid(
                    path,
                    "guest.probe",
                    format!("{name:?} is not a probe name (non-empty, only a-z 0-9 _ -)"),
                ))
            }
        }
        (None, Some(_)) if guest.probe_arg.is_some() => Err(ConfigError::invalid(
            path,
            "guest.probe_arg",
            "given for a Linux guest; it only applies to probe guests, remove it",
        )),
        (None, Some(linux)) => {
            let mut image = validate_linux(path, linux, guest.disk.as_deref().unwrap_or(&[]))?;
            if let (GuestImage::Linux { net, .. }, Some(raw)) = (&mut image, &guest.net) {
                *net = Some(validate_net(path, raw)?);
            }
            Ok(image)
        }
    }
}

fn validate_disks(path: &Path, raw: &[RawDisk]) -> Result<Vec<Disk>, ConfigError> {
    if raw.len() > MAX_DISKS {
        return Err(ConfigError::invalid(
            path,
            "guest.disk",
            format!("{} disks given; at most {MAX_DISKS}", raw.len()),
        ));
    }
    let mut disks: Vec<Disk> = Vec::with_capacity(raw.len());
    for (i, disk) in raw.iter().enumerate() {
        let field = format!("guest.disk[{i}].path");
        let resolved = existing_file(path, &field, &disk.path)?;
        if disks.iter().any(|d| d.path == resolved) {
            return Err(ConfigError::invalid(
                path,
                &field,
                format!(
                    "{} is already an earlier disk; two devices on one image would corrupt it",
                    resolved.display()
                ),
            ));
        }
        disks.push(Disk {
            path: resolved,
            read_only: disk.read_only.unwrap_or(false),
        });
    }
    Ok(disks)
}

/// Longest network interface name Linux accepts (`IFNAMSIZ` - 1).
const MAX_IFNAME_LEN: usize = 15;

fn validate_net(path: &Path, raw: &RawNet) -> Result<NetDevice, ConfigError> {
    if let Some(tap) = &raw.tap {
        let bad = if tap.is_empty() {
            Some("empty; give the tap device's name".to_string())
        } else if tap.len() > MAX_IFNAME_LEN {
            Some(format!(
                "{tap:?} is {} bytes long; Linux interface names have at most {MAX_IFNAME_LEN}",
                tap.len()
            ))
        } else if tap == "."
            || tap == ".."
            || tap.bytes().any(|b| b == b'/' || b <= b' ' || b == b':')
        {
            Some(format!(
                "{tap:?} is not an interface name (no '/', ':', spaces or control characters; not . or ..)"
            ))
        } else {
            None
        };
        if let Some(detail) = bad {
            return Err(ConfigError::invalid(path, "guest.net.tap", detail));
        }
    }
    if let Some(netns) = &raw.netns {
        let bad = if netns.is_empty() {
            Some(
                "empty; give the name of a namespace in /run/netns (see `ip netns list`)"
                    .to_string(),
            )
        } else if netns.len() > 255 {
            Some(format!("{} bytes long; at most 255", netns.len()))
        } else if netns == "." || netns == ".." || netns.bytes().any(|b| b == b'/' || b == 0) {
            Some(format!(
                "{netns:?} is not a namespace name (a file name in /run/netns: no '/', not . or ..)"
            ))
        } else {
            None
        };
        if let Some(detail) = bad {
            return Err(ConfigError::invalid(path, "guest.net.netns", detail));
        }
    }
    let (tap, netns) = match (&raw.tap, &raw.netns) {
        (None, None) => {
            return Err(ConfigError::invalid(
                path,
                "guest.net",
                "has neither `tap` nor `netns`; give `tap = \"<existing tap device>\"` or \
                 `netns = \"<namespace in /run/netns>\"` for spanvm to create its tap there",
            ))
        }
        (tap, netns) => (
            tap.clone()
                .unwrap_or_else(|| NetDevice::DEFAULT_NETNS_TAP.to_string()),
            netns.clone(),
        ),
    };
    let mac = match &raw.mac {
        Some(text) => {
            parse_mac(text).map_err(|detail| ConfigError::invalid(path, "guest.net.mac", detail))?
        }
        None => NetDevice::default_mac(&tap, netns.as_deref()),
    };
    Ok(NetDevice { mac, tap, netns })
}

/// A unicast MAC written `aa:bb:cc:dd:ee:ff`.
fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let shape =
        || format!("{text:?} is not a MAC address; write six hex bytes like \"52:54:00:12:34:56\"");
    let parts: Vec<&str> = text.split(':').collect();
    if parts.len() != 6 {
        return Err(shape());
    }
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(&parts) {
        if part.len() != 2 {
            return Err(shape());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| shape())?;
    }
    if mac[0] & 1 != 0 {
        return Err(format!(
            "{text} is a multicast address (lowest bit of the first byte set); a card needs a \
             unicast one, e.g. 52:54:00:12:34:56"
        ));
    }
    if mac == [0; 6] {
        return Err("00:00:00:00:00:00 is not a usable MAC address".to_string());
    }
    Ok(mac)
}

fn validate_linux(
    path: &Path,
    linux: &RawLinux,
    disks: &[RawDisk],
) -> Result<GuestImage, ConfigError> {
    let kernel = existing_file(path, "guest.linux.kernel", &linux.kernel)?;
    let initrd = match &linux.initrd {
        Some(initrd) => Some(existing_file(path, "guest.linux.initrd", initrd)?),
        None => None,
    };
    let cmdline = linux.cmdline.clone().unwrap_or_default();
    if cmdline.len() > MAX_CMDLINE_LEN {
        return Err(ConfigError::invalid(
            path,
            "guest.linux.cmdline",
            format!(
                "{} bytes long; the maximum is {MAX_CMDLINE_LEN}",
                cmdline.len()
            ),
        ));
    }
    if cmdline.contains('\0') {
        return Err(ConfigError::invalid(
            path,
            "guest.linux.cmdline",
            "contains a NUL character, which would cut it short in the guest",
        ));
    }
    Ok(GuestImage::Linux {
        kernel,
        initrd,
        cmdline,
        disks: validate_disks(path, disks)?,
        net: None,
    })
}

/// Resolves `rel` and checks that it names a readable regular file.
fn existing_file(path: &Path, field: &str, rel: &str) -> Result<PathBuf, ConfigError> {
    if rel.is_empty() {
        return Err(ConfigError::invalid(path, field, "empty path"));
    }
    let resolved = resolve(path, rel);
    match std::fs::metadata(&resolved) {
        Ok(meta) if meta.is_file() => Ok(resolved),
        Ok(_) => Err(ConfigError::invalid(
            path,
            field,
            format!("{} is not a regular file", resolved.display()),
        )),
        Err(err) => Err(ConfigError::invalid(
            path,
            field,
            format!("cannot use {}: {err}", resolved.display()),
        )),
    }
}

/// Resolves the secret path and checks the file is there and long enough.
fn validate_secret(path: &Path, rel: &str) -> Result<PathBuf, ConfigError> {
    let resolved = existing_file(path, "secret", rel)?;
    check_secret_len(path, &resolved, file_len(&resolved))?;
    Ok(resolved)
}

fn file_len(file: &Path) -> u64 {
    std::fs::metadata(file).map_or(0, |meta| meta.len())
}

/// Rejects a secret shorter than [`MIN_SECRET_LEN`].
pub(crate) fn check_secret_len(path: &Path, secret: &Path, len: u64) -> Result<(), ConfigError> {
    if len < MIN_SECRET_LEN {
        return Err(ConfigError::invalid(
            path,
            "secret",
            format!(
                "{} holds {len} bytes; a cluster secret needs at least {MIN_SECRET_LEN}",
                secret.display()
            ),
        ));
    }
    Ok(())
}

fn validate_nodes(
    path: &Path,
    raw: &[RawNode],
    vcpu_count: u32,
) -> Result<Vec<NodeSpec>, ConfigError> {
    if raw.is_empty() {
        return Err(ConfigError::invalid(
            path,
            "nodes",
            "missing: at least one [[nodes]] entry (id, address, vcpus) is required",
        ));
    }
    let count = raw.len();
    // Counts of nodes are NodeIds (`Layout::node_count`), like the ids `0..count`.
    if NodeId::try_from(count).is_err() {
        return Err(ConfigError::invalid(
            path,
            "nodes",
            format!(
                "{count} entries; a cluster has at most {} nodes",
                NodeId::MAX
            ),
        ));
    }
    let mut by_id: Vec<Option<usize>> = vec![None; count];
    let mut addresses: HashMap<SocketAddr, usize> = HashMap::new();
    let mut placed: Vec<Option<(usize, usize)>> = vec![None; vcpu_count as usize];
    let mut nodes = Vec::with_capacity(count);

    for (index, node) in raw.iter().enumerate() {
        let id = NodeId::try_from(node.id).map_err(|_| {
            ConfigError::invalid(
                path,
                format!("nodes[{index}].id"),
                format!("{} is negative; node ids are 0..={}", node.id, count - 1),
            )
        })?;
        if node_index(id) < count {
            if let Some(other) = by_id[node_index(id)] {
                return Err(ConfigError::invalid(
                    path,
                    format!("nodes[{index}].id"),
                    format!("id {id} is already used by nodes[{other}]"),
                ));
            }
            by_id[node_index(id)] = Some(index);
        } else if let Some(other) = raw[..index].iter().position(|n| n.id == node.id) {
            return Err(ConfigError::invalid(
                path,
                format!("nodes[{index}].id"),
                format!("id {id} is already used by nodes[{other}]"),
            ));
        }

        let address = validate_address(path, index, &node.address)?;
        if let Some(other) = addresses.insert(address, index) {
            return Err(ConfigError::invalid(
                path,
                format!("nodes[{index}].address"),
                format!("{address} is already the address of nodes[{other}]"),
            ));
        }

        let mut vcpus = Vec::with_capacity(node.vcpus.len());
        for (slot, &vcpu) in node.vcpus.iter().enumerate() {
            let field = format!("nodes[{index}].vcpus[{slot}]");
            let id = VcpuId::try_from(vcpu)
                .ok()
                .filter(|&v| v < vcpu_count)
                .ok_or_else(|| {
                    ConfigError::invalid(
                        path,
                        &field,
                        format!(
                            "vCPU {vcpu} is out of range: guest.vcpus = {vcpu_count}, so vCPU ids are 0..={}",
                            vcpu_count - 1
                        ),
                    )
                })?;
            if let Some((other_node, other_slot)) = placed[id as usize] {
                let where_ = if other_node == index {
                    "earlier in this list".to_string()
                } else {
                    format!("on nodes[{other_node}]")
                };
                return Err(ConfigError::invalid(
                    path,
                    field,
                    format!(
                        "vCPU {id} is placed twice: already at nodes[{other_node}].vcpus[{other_slot}] ({where_})"
                    ),
                ));
            }
            placed[id as usize] = Some((index, slot));
            vcpus.push(id);
        }
        vcpus.sort_unstable();
        nodes.push(NodeSpec { id, address, vcpus });
    }

    if let Some(missing) = by_id.iter().position(Option::is_none) {
        return Err(ConfigError::invalid(
            path,
            "nodes",
            format!(
                "node ids must be exactly 0..={} (one [[nodes]] entry each); id {missing} is missing",
                count - 1
            ),
        ));
    }
    if let Some(unplaced) = placed.iter().position(Option::is_none) {
        return Err(ConfigError::invalid(
            path,
            "nodes",
            format!(
                "vCPU {unplaced} is not placed on any node; every vCPU id 0..={} must appear in \
                 exactly one nodes[].vcpus list",
                vcpu_count - 1
            ),
        ));
    }
    nodes.sort_by_key(|node| node.id);
    if !nodes[0].vcpus.contains(&0) {
        let (index, slot) = placed[0].unwrap_or((0, 0));
        return Err(ConfigError::invalid(
            path,
            format!("nodes[{index}].vcpus[{slot}]"),
            "vCPU 0 is the boot processor and must run on node 0, the master that loads the guest",
        ));
    }
    Ok(nodes)
}

fn validate_address(path: &Path, index: usize, text: &str) -> Result<SocketAddr, ConfigError> {
    let field = format!("nodes[{index}].address");
    let address: SocketAddr = text.parse().map_err(|_| {
        ConfigError::invalid(
            path,
            &field,
            format!("{text:?} is not an ip:port socket address (e.g. \"10.0.0.2:7100\"; host names are not resolved)"),
        )
    })?;
    if address.ip().is_unspecified() {
        return Err(ConfigError::invalid(
            path,
            field,
            format!("{address}: peers connect to this address, so it must be a concrete IP, not an unspecified one"),
        ));
    }
    if address.port() == 0 {
        return Err(ConfigError::invalid(
            path,
            field,
            format!("{address}: port 0 cannot be connected to; give a fixed port"),
        ));
    }
    Ok(address)
}
