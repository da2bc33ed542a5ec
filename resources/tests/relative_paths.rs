//! Paths in a node file are resolved against the file's own directory, not the working
//! directory; a missing kernel is reported with the file, the field and the resolved path.

use std::fs;
use std::path::Path;

use resources::{GuestImage, NodeConfig};

/// Writes `cluster/etc/node1.toml` whose kernel, initrd and secret live in sibling folders.
fn write_cluster(root: &Path, kernel: &str) -> std::path::PathBuf {
    fs::create_dir_all(root.join("cluster/etc")).unwrap();
    fs::create_dir_all(root.join("cluster/images")).unwrap();
    fs::write(root.join("cluster/images/vmlinux"), b"\x7fELF").unwrap();
    fs::write(root.join("cluster/images/initramfs.cpio"), b"070701").unwrap();
    fs::write(
        root.join("cluster/etc/cluster.secret"),
        b"0123456789abcdef0123",
    )
    .unwrap();
    let text = format!(
        r#"
node = 1
secret = "cluster.secret"

[guest]
vcpus = 2
memory_mib = 64

[guest.linux]
kernel = "{kernel}"
initrd = "../images/initramfs.cpio"
cmdline = "console=ttyS0"

[[nodes]]
id = 0
address = "127.0.0.1:7200"
vcpus = [0]

[[nodes]]
id = 1
address = "127.0.0.1:7201"
vcpus = [1]
"#
    );
    let path = root.join("cluster/etc/node1.toml");
    fs::write(&path, text).unwrap();
    path
}

#[test]
fn paths_resolve_against_the_config_directory() {
    let root = tempfile::tempdir().unwrap();
    let path = write_cluster(root.path(), "../images/vmlinux");
    let config = NodeConfig::load(&path).unwrap();
    let GuestImage::Linux {
        kernel,
        initrd,
        cmdline,
        ..
    } = &config.layout.guest
    else {
        panic!("expected a Linux guest");
    };
    let images = root.path().join("cluster/images").canonicalize().unwrap();
    assert!(kernel.is_absolute());
    assert_eq!(kernel.canonicalize().unwrap(), images.join("vmlinux"));
    assert_eq!(
        initrd.as_ref().unwrap().canonicalize().unwrap(),
        images.join("initramfs.cpio")
    );
    assert_eq!(cmdline, "console=ttyS0");
    assert_eq!(config.local().address.port(), 7201);
    assert_eq!(
        config.read_secret().unwrap().unwrap(),
        b"0123456789abcdef0123".to_vec()
    );
}

#[test]
fn missing_kernel_names_file_field_and_resolved_path() {
    let root = tempfile::tempdir().unwrap();
    // Relative to the working directory this would not exist either; relative to the config
    // directory it names cluster/images/bzImage, which is missing.
    let path = write_cluster(root.path(), "../images/bzImage");
    let message = NodeConfig::load(&path).unwrap_err().to_string();
    assert!(message.contains("node1.toml"), "{message}");
    assert!(message.contains("field `guest.linux.kernel`"), "{message}");
    assert!(message.contains("images/bzImage"), "{message}");
    assert!(message.contains("No such file or directory"), "{message}");
}
