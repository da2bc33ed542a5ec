//! Helpers shared by the unit tests: a directory with a secret, and configs written into it.

use std::path::PathBuf;

use crate::{ConfigError, NodeConfig};

/// A temporary directory holding `cluster.secret` (32 bytes).
pub(crate) struct TestDir {
    pub dir: tempfile::TempDir,
}

impl TestDir {
    pub fn new() -> TestDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cluster.secret"), [7u8; 32]).unwrap();
        TestDir { dir }
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Parses `text` as if it were `node0.toml` in this directory.
    pub fn parse(&self, text: &str) -> Result<NodeConfig, ConfigError> {
        NodeConfig::parse(text, &self.file("node0.toml"))
    }
}

/// A valid two-node node file for node 0 with 2 vCPUs and 256 MiB; tests edit it.
pub(crate) const TWO_NODES: &str = r#"
node = 0
secret = "cluster.secret"

[guest]
vcpus = 2
memory_mib = 256
probe = "hello"

[[nodes]]
id = 0
address = "127.0.0.1:7100"
vcpus = [0]

[[nodes]]
id = 1
address = "127.0.0.1:7101"
vcpus = [1]
"#;
