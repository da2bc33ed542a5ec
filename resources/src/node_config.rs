//! One node's config file: which node it is, where the secret is, and the cluster layout.

use std::path::{Path, PathBuf};

use crate::validate::{check_secret_len, validate, FileKind};
use crate::{node_index, raw, ConfigError, Layout, NodeId, NodeSpec, ServicePriority};

/// A validated node file.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The file it was read from (as given, used in messages).
    pub path: PathBuf,
    /// Which node this process is.
    pub node: NodeId,
    /// The cluster secret file, resolved; required when the cluster has more than one node.
    pub secret_path: Option<PathBuf>,
    /// What all nodes agree on.
    pub layout: Layout,
    /// How this node schedules its fault-service threads (`service_priority`).
    pub service_priority: ServicePriority,
}

impl NodeConfig {
    /// Reads and validates the node file at `path`.
    pub fn load(path: &Path) -> Result<NodeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        NodeConfig::parse(&text, path)
    }

    /// Validates `text` as the node file `path`; `path` names the file in messages and is the
    /// base of relative paths (kernel, initrd, secret).
    pub fn parse(text: &str, path: &Path) -> Result<NodeConfig, ConfigError> {
        let raw = raw::parse(text, path)?;
        let validated = validate(raw, path, FileKind::Node)?;
        Ok(NodeConfig {
            path: path.to_path_buf(),
            // validate() returns Some for FileKind::Node; 0 is only a formal fallback.
            node: validated.node.unwrap_or(0),
            secret_path: validated.secret_path,
            layout: validated.layout,
            service_priority: validated.service_priority,
        })
    }

    /// This node's entry of the layout.
    pub fn local(&self) -> &NodeSpec {
        // parse() checked that `node` is an index of `nodes`, which is sorted by id 0..n.
        &self.layout.nodes[node_index(self.node)]
    }

    /// The cluster secret's bytes, or `None` if the file names none (single-node cluster).
    pub fn read_secret(&self) -> Result<Option<Vec<u8>>, ConfigError> {
        let Some(secret) = &self.secret_path else {
            return Ok(None);
        };
        let bytes = std::fs::read(secret).map_err(|source| ConfigError::SecretRead {
            path: self.path.clone(),
            secret: secret.clone(),
            source,
        })?;
        check_secret_len(&self.path, secret, bytes.len() as u64)?;
        Ok(Some(bytes))
    }
}
