//! The config file as serde reads it, before validation.
//!
//! Integers are `i64` and enumerations are strings so that validation, not serde, reports
//! out-of-range values with the field's full name.

use serde::Deserialize;

/// Top level of a node file or a cluster description.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    /// Which `[[nodes]]` entry this file is for (node files only).
    pub node: Option<i64>,
    /// Path of the cluster secret, relative to the file's directory.
    pub secret: Option<String>,
    /// `"tcp"` or `"rdma"`.
    pub transport: Option<String>,
    /// `"realtime"` or `"normal"`: this node's own choice, not part of the layout.
    pub service_priority: Option<String>,
    /// The guest machine.
    pub guest: RawGuest,
    /// Every node of the cluster.
    #[serde(default)]
    pub nodes: Vec<RawNode>,
}

/// The `[guest]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawGuest {
    pub vcpus: i64,
    pub memory_mib: i64,
    pub probe: Option<String>,
    pub probe_arg: Option<i64>,
    pub linux: Option<RawLinux>,
    pub home: Option<Vec<RawHome>>,
    pub disk: Option<Vec<RawDisk>>,
    pub net: Option<RawNet>,
}

/// The `[guest.net]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawNet {
    pub tap: Option<String>,
    pub netns: Option<String>,
    pub mac: Option<String>,
}

/// One `[[guest.disk]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDisk {
    pub path: String,
    pub read_only: Option<bool>,
}

/// The `[guest.linux]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLinux {
    pub kernel: String,
    pub initrd: Option<String>,
    pub cmdline: Option<String>,
}

/// One `[[guest.home]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHome {
    pub node: i64,
    pub start: i64,
    pub size_mib: i64,
}

/// One `[[nodes]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawNode {
    pub id: i64,
    pub address: String,
    pub vcpus: Vec<i64>,
}

/// Parses `text` into the raw schema; `path` is only used in the error.
pub(crate) fn parse(text: &str, path: &std::path::Path) -> Result<RawConfig, crate::ConfigError> {
    toml::from_str(text).map_err(|err| crate::ConfigError::from_toml(path, text, &err))
}
