//! Bad input to `spanvm`: each gives one clear error line, a non-zero exit, and no panic.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{run_spanvm, single_node_config};

fn assert_one_clear_error(args: &[&str], env: &[(&str, &str)], expect: &[&str]) {
    let out = run_spanvm(args, env, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "spanvm {args:?} succeeded; stderr: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "spanvm panicked: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got: {stderr}");
    for e in expect {
        assert!(
            lines[0].contains(e),
            "error line `{}` does not mention `{e}`",
            lines[0]
        );
    }
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

const GOOD: &str = "node = 0\n[guest]\nvcpus = 2\nmemory_mib = 32\nprobe = \"hello\"\n[[nodes]]\nid = 0\naddress = \"127.0.0.1:7901\"\nvcpus = [0, 1]\n";

#[test]
fn missing_config() {
    assert_one_clear_error(
        &["run", "--config", "/nonexistent/node.toml"],
        &[],
        &["/nonexistent/node.toml"],
    );
}

#[test]
fn unreadable_config() {
    let dir = tempfile::tempdir().unwrap();
    // A directory where a file is expected cannot be read as one (works as root too).
    let p = dir.path().join("adir.toml");
    std::fs::create_dir(&p).unwrap();
    assert_one_clear_error(
        &["run", "--config", p.to_str().unwrap()],
        &[],
        &["adir.toml"],
    );
}

#[test]
fn invalid_toml() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "bad.toml", "node = 0\n[guest\nvcpus = 1\n");
    assert_one_clear_error(&["run", "--config", &p], &[], &["bad.toml", "line"]);
}

#[test]
fn unknown_field() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "unknown.toml",
        &GOOD.replace("memory_mib = 32", "memory_mib = 32\nturbo = true"),
    );
    assert_one_clear_error(&["run", "--config", &p], &[], &["unknown.toml", "turbo"]);
}

#[test]
fn duplicate_vcpu_ids() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "dup.toml",
        &GOOD.replace("vcpus = [0, 1]", "vcpus = [0, 0]"),
    );
    assert_one_clear_error(&["check", "--config", &p], &[], &["dup.toml", "vcpu"]);
}

#[test]
fn overlapping_home_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{GOOD}\n[[guest.home]]\nnode = 0\nstart = 0x0\nsize_mib = 20\n[[guest.home]]\nnode = 0\nstart = 0x1000000\nsize_mib = 16\n"
    );
    let p = write(dir.path(), "overlap.toml", &text);
    assert_one_clear_error(
        &["run", "--config", &p],
        &[],
        &["overlap.toml", "guest.home", "overlaps"],
    );
}

#[test]
fn missing_kernel_file() {
    let dir = tempfile::tempdir().unwrap();
    let text = GOOD.replace(
        "probe = \"hello\"",
        "[guest.linux]\nkernel = \"no-such-vmlinux\"\n",
    );
    // [guest.linux] must come after the plain keys of [guest]; move the node list after it.
    let p = write(dir.path(), "nokernel.toml", &text);
    assert_one_clear_error(
        &["run", "--config", &p],
        &[],
        &["nokernel.toml", "kernel", "no-such-vmlinux"],
    );
}

#[test]
fn unknown_probe() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "probe.toml",
        &GOOD.replace("\"hello\"", "\"no-such-probe\""),
    );
    assert_one_clear_error(&["run", "--config", &p], &[], &["no-such-probe", "hello"]);
}

#[test]
fn kvm_device_absent() {
    let dir = tempfile::tempdir().unwrap();
    let p = single_node_config(dir.path(), "hello", 1, 32);
    assert_one_clear_error(
        &["run", "--config", p.to_str().unwrap()],
        &[("SPANVM_KVM_DEVICE", "/nonexistent/kvm")],
        &["/nonexistent/kvm", "KVM"],
    );
}

#[test]
fn bad_command_line() {
    let out = run_spanvm(&["run"], &[], Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--config"), "{stderr}");
    assert!(!stderr.contains("panicked"));
}
