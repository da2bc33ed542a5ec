//! The guest initramfs built by `images/build.sh`, tested on this host without a VM.
//!
//! Each test unpacks the image (parsing the `newc` cpio format the kernel reads) into a
//! temporary root and runs its `/init` there in host-test mode, in new mount and PID namespaces
//! with that root as `/` (`unshare --root`). Nothing outside the image is reachable, so a run
//! that prints the markers and sysbench's results proves the image holds every binary and
//! shared library it needs, and that `/init` speaks the marker protocol the host parses.
//!
//! The image must have been built first; these tests fail (never skip) when it is missing.
//! `SPANVM_IMAGES_DIR` names the images directory (default: `images/out` in the repository).

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Newc header: magic "070701" then 13 fields of 8 hex digits.
const NEWC_MAGIC: &[u8] = b"070701";
const NEWC_HEADER_LEN: usize = 110;
const NEWC_TRAILER: &str = "TRAILER!!!";

const S_IFMT: u32 = 0o170_000;
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// A hung `/init` (waiting on a console that is not there, say) must fail the test, not hang
/// it. Far above what the runs here need; this bounds a hang, it does not judge speed.
const INIT_DEADLINE: Duration = Duration::from_secs(300);

fn images_dir() -> PathBuf {
    match std::env::var_os("SPANVM_IMAGES_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/out"),
    }
}

/// The built initramfs, checked against the SHA256SUMS the build wrote next to it.
fn built_initramfs() -> PathBuf {
    let dir = images_dir();
    let image = dir.join("initramfs.cpio");
    assert!(
        image.is_file(),
        "no initramfs at {}: build the guest images first with `images/build.sh` \
         (or `images/build.sh apt initramfs` for this image alone), or point \
         SPANVM_IMAGES_DIR at a directory that holds them",
        image.display()
    );
    let sums = fs::read_to_string(dir.join("SHA256SUMS")).unwrap_or_else(|e| {
        panic!(
            "{}/SHA256SUMS unreadable ({e}): run images/build.sh",
            dir.display()
        )
    });
    let expected = sums
        .lines()
        .find_map(|line| {
            let (sum, name) = line.split_once(char::is_whitespace)?;
            (name.trim_start().trim_start_matches('*') == "initramfs.cpio").then_some(sum)
        })
        .unwrap_or_else(|| panic!("{}/SHA256SUMS lists no initramfs.cpio", dir.display()));
    let actual = Command::new("sha256sum")
        .arg(&image)
        .output()
        .expect("sha256sum (coreutils) runs");
    assert!(
        actual.status.success(),
        "sha256sum {} failed",
        image.display()
    );
    let actual = String::from_utf8(actual.stdout).unwrap();
    assert_eq!(
        actual.split_whitespace().next(),
        Some(expected),
        "{} does not match its SHA256SUMS entry: rebuild with images/build.sh",
        image.display()
    );
    image
}

/// What unpacking found besides files, directories and links.
struct Unpacked {
    root: tempfile::TempDir,
    /// Character devices by path: (major, minor). Not created: the chroot does not need them.
    char_devices: BTreeMap<String, (u32, u32)>,
}

fn hex_field(header: &[u8], index: usize) -> u32 {
    let start = NEWC_MAGIC.len() + 8 * index;
    let text = std::str::from_utf8(&header[start..start + 8]).expect("newc field is ASCII");
    u32::from_str_radix(text, 16).expect("newc field is hex")
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// A member name from the archive as a path under the root; never escapes it.
fn member_path(root: &Path, name: &str) -> PathBuf {
    let relative = Path::new(name);
    assert!(
        relative
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir)),
        "cpio member {name:?} is absolute or climbs out of the archive"
    );
    root.join(relative)
}

/// Unpacks a newc cpio archive (the format the kernel reads an initramfs in) into a new
/// temporary directory.
fn unpack_newc(image: &Path) -> Unpacked {
    let mut bytes = Vec::new();
    fs::File::open(image)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .unwrap();
    let root = tempfile::tempdir().unwrap();
    let mut char_devices = BTreeMap::new();
    let mut at = 0;
    loop {
        let header = bytes
            .get(at..at + NEWC_HEADER_LEN)
            .unwrap_or_else(|| panic!("archive ends inside a header at byte {at}"));
        assert_eq!(
            &header[..6],
            NEWC_MAGIC,
            "not a newc (070701) header at byte {at}: the kernel would reject this initramfs"
        );
        let mode = hex_field(header, 1);
        let nlink = hex_field(header, 4);
        let file_size = hex_field(header, 6) as usize;
        let rdev_major = hex_field(header, 9);
        let rdev_minor = hex_field(header, 10);
        let name_size = hex_field(header, 11) as usize;
        let name_start = at + NEWC_HEADER_LEN;
        let name_bytes = &bytes[name_start..name_start + name_size];
        assert_eq!(
            name_bytes.last(),
            Some(&0),
            "member name not NUL-terminated"
        );
        let name = std::str::from_utf8(&name_bytes[..name_size - 1]).unwrap();
        let data_start = align4(name_start + name_size);
        let data = &bytes[data_start..data_start + file_size];
        at = align4(data_start + file_size);
        if name == NEWC_TRAILER {
            break;
        }
        let path = member_path(root.path(), name);
        match mode & S_IFMT {
            S_IFDIR => fs::create_dir_all(&path).unwrap(),
            S_IFREG => {
                assert_eq!(nlink, 1, "{name}: hard links are not expected in the image");
                fs::write(&path, data).unwrap();
                fs::set_permissions(&path, fs::Permissions::from_mode(mode & 0o7777)).unwrap();
            }
            S_IFLNK => symlink(std::str::from_utf8(data).unwrap(), &path).unwrap(),
            S_IFCHR => {
                char_devices.insert(name.to_string(), (rdev_major, rdev_minor));
            }
            other => panic!("{name}: unexpected file type {other:o} in the initramfs"),
        }
    }
    Unpacked { root, char_devices }
}

fn running_as_root() -> bool {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|uids| uids.split_whitespace().nth(1))
        == Some("0")
}

/// What one run of `/init` printed and how it ended.
struct InitRun {
    status: Option<i32>,
    stdout: String,
    stderr: String,
}

impl InitRun {
    /// Values of every `SPANVM-<key> <value>` marker line, in order.
    fn markers(&self, key: &str) -> Vec<&str> {
        let prefix = format!("SPANVM-{key} ");
        self.stdout
            .lines()
            .filter_map(|l| l.strip_prefix(prefix.as_str()))
            .collect()
    }

    /// The one `SPANVM-<key>` marker's value.
    fn marker(&self, key: &str) -> &str {
        match self.markers(key).as_slice() {
            [value] => value,
            values => panic!("want one SPANVM-{key} marker, got {values:?}\n{self}"),
        }
    }

    /// The workload's output: the lines between SPANVM-BEGIN and SPANVM-END.
    fn workload_output(&self) -> String {
        let mut inside = false;
        let mut output = String::new();
        for line in self.stdout.lines() {
            if line.starts_with("SPANVM-BEGIN ") {
                inside = true;
            } else if line.starts_with("SPANVM-END ") {
                return output;
            } else if inside {
                output.push_str(line);
                output.push('\n');
            }
        }
        panic!("no SPANVM-BEGIN ... SPANVM-END block\n{self}")
    }
}

impl std::fmt::Display for InitRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "/init exit status {:?}\n--- stdout\n{}--- stderr\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Runs the image's `/init` in host-test mode with `root` as `/`, with `run` (if any) as the
/// workload in SPANVM_RUN.
fn run_init(root: &Path, run: Option<&str>) -> InitRun {
    let mut command = Command::new("unshare");
    if !running_as_root() {
        command.args(["--user", "--map-root-user"]);
    }
    command
        .args(["--mount", "--pid", "--fork"])
        .arg(format!("--root={}", root.display()))
        .arg("/init")
        .env_clear()
        .env("SPANVM_INIT_HOST_TEST", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(run) = run {
        command.env("SPANVM_RUN", run);
    }
    let mut child = command.spawn().expect("unshare (util-linux) starts");
    let started = Instant::now();
    // Read both pipes on their own threads so a chatty /init never blocks on a full pipe.
    let mut stdout_pipe = child.stdout.take().unwrap();
    let mut stderr_pipe = child.stderr.take().unwrap();
    let stdout = std::thread::spawn(move || {
        let mut s = String::new();
        stdout_pipe.read_to_string(&mut s).map(|_| s)
    });
    let stderr = std::thread::spawn(move || {
        let mut s = String::new();
        stderr_pipe.read_to_string(&mut s).map(|_| s)
    });
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > INIT_DEADLINE {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("/init still running after {INIT_DEADLINE:?}; killed it");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    InitRun {
        status: status.code(),
        stdout: stdout.join().unwrap().unwrap(),
        stderr: stderr.join().unwrap().unwrap(),
    }
}

/// Parses sysbench's "events per second:" and "total number of events:" numbers.
fn sysbench_numbers(output: &str) -> (f64, u64) {
    let value = |label: &str| {
        output
            .lines()
            .find_map(|l| l.trim().strip_prefix(label))
            .map(str::trim)
            .unwrap_or_else(|| panic!("sysbench printed no {label:?}:\n{output}"))
    };
    let per_second: f64 = value("events per second:").parse().unwrap();
    let total: u64 = value("total number of events:").parse().unwrap();
    (per_second, total)
}

#[test]
fn sysbench_cpu_runs_from_the_unpacked_initramfs_and_reports_between_markers() {
    let image = unpack_newc(&built_initramfs());
    let root = image.root.path();
    let init_mode = fs::metadata(root.join("init"))
        .unwrap()
        .permissions()
        .mode();
    assert!(init_mode & 0o111 != 0, "/init is not executable");
    assert_eq!(
        image.char_devices.get("dev/console"),
        Some(&(5, 1)),
        "the image needs /dev/console (5,1): the kernel opens it for /init before any mount"
    );

    let spec = "sysbench cpu --threads=2 --events=2000 --time=0 run";
    let run = run_init(root, Some(spec));
    assert_eq!(run.status, Some(0), "{run}");
    assert_eq!(run.marker("BEGIN"), spec);
    assert_eq!(run.marker("END"), "0");
    let nproc: u32 = run.marker("NPROC").parse().unwrap();
    assert!(nproc >= 1, "{run}");
    assert!(!run.marker("KERNEL").is_empty());
    // No sysfs in the chroot: the NUMA and clocksource markers still come, saying so.
    assert_eq!(run.markers("NUMA"), ["none"]);
    assert_eq!(run.marker("CLOCKSOURCE"), "unknown");

    let output = run.workload_output();
    assert!(output.contains("Number of threads: 2"), "{run}");
    let (per_second, total) = sysbench_numbers(&output);
    assert_eq!(
        total, 2000,
        "sysbench ran a different number of events\n{run}"
    );
    assert!(per_second > 0.0, "{run}");
}

#[test]
fn the_workload_comes_from_spanvm_run_on_the_command_line_with_plus_for_spaces() {
    let image = unpack_newc(&built_initramfs());
    let root = image.root.path();
    // /proc is not mounted in host-test mode, so this file is the command line /init reads.
    fs::write(
        root.join("proc/cmdline"),
        "console=ttyS0 xspanvm.run=decoy spanvm.run=sysbench+cpu+--threads=1+--events=300+--time=0+run quiet\n",
    )
    .unwrap();
    let run = run_init(root, None);
    assert_eq!(run.status, Some(0), "{run}");
    assert_eq!(
        run.marker("BEGIN"),
        "sysbench cpu --threads=1 --events=300 --time=0 run"
    );
    assert_eq!(run.marker("END"), "0");
    let (_, total) = sysbench_numbers(&run.workload_output());
    assert_eq!(total, 300, "{run}");
}

#[test]
fn a_quoted_spanvm_run_is_taken_as_is_and_its_exit_status_is_reported() {
    let image = unpack_newc(&built_initramfs());
    let root = image.root.path();
    fs::write(
        root.join("proc/cmdline"),
        "console=ttyS0 spanvm.run=\"echo a+b  c; exit 7\" quiet\n",
    )
    .unwrap();
    let run = run_init(root, None);
    assert_eq!(run.marker("BEGIN"), "echo a+b  c; exit 7");
    assert_eq!(run.workload_output(), "a+b c\n");
    assert_eq!(run.marker("END"), "7");
    assert_eq!(
        run.status,
        Some(7),
        "/init passes the status on in host-test mode\n{run}"
    );
}

#[test]
fn host_test_mode_without_a_workload_fails_instead_of_guessing() {
    let image = unpack_newc(&built_initramfs());
    let root = image.root.path();
    fs::write(root.join("proc/cmdline"), "console=ttyS0 quiet\n").unwrap();
    let run = run_init(root, None);
    assert_eq!(run.status, Some(2), "{run}");
    assert!(run.markers("BEGIN").is_empty(), "{run}");
    assert!(run.stderr.contains("SPANVM-ERROR"), "{run}");
}
