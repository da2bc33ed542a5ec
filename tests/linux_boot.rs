//! A Linux guest on real KVM: the minimal kernel built by `images/build.sh` boots on one node
//! with 2 vCPUs (the application processor started by INIT/SIPI through the user-space APIC),
//! reads its NUMA layout from our SRAT, uses kvm-clock, and its /init runs sysbench and powers
//! off. On kvm_pvm this takes one to two minutes. Without the images the tests fail and say how
//! to build them.

mod common;

use std::time::Duration;

use common::{image, run_spanvm};

struct Boot {
    stdout: String,
    stderr: String,
    ok: bool,
}

fn boot(kernel: &str, vcpus: u32, run: &str) -> Boot {
    boot_with_input(kernel, vcpus, run, None)
}

/// Boots with `input` (if any) written to spanvm's stdin, as a user would type it.
fn boot_with_input(kernel: &str, vcpus: u32, run: &str, input: Option<&str>) -> Boot {
    let dir = tempfile::tempdir().unwrap();
    let list: Vec<String> = (0..vcpus).map(|v| v.to_string()).collect();
    let config = dir.path().join("linux.toml");
    std::fs::write(
        &config,
        format!(
            "node = 0\n[guest]\nvcpus = {vcpus}\nmemory_mib = 256\n[guest.linux]\nkernel = \"{}\"\ninitrd = \"{}\"\ncmdline = \"console=ttyS0 spanvm.run={run}\"\n\n[[nodes]]\nid = 0\naddress = \"127.0.0.1:7950\"\nvcpus = [{}]\n",
            image(kernel).display(),
            image("initramfs.cpio").display(),
            list.join(", ")
        ),
    )
    .unwrap();
    let args = ["run", "--config", config.to_str().unwrap()];
    let out = match input {
        None => run_spanvm(&args, &[], Duration::from_secs(900)),
        Some(text) => {
            let mut child = std::process::Command::new(common::spanvm())
                .args(args)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let mut stdin = child.stdin.take().unwrap();
            let stdout = child.stdout.take().unwrap();
            let text = text.to_string();
            // Type only once the shell is there, as a user would: the kernel's serial driver
            // empties the UART's FIFO when it starts, so earlier keystrokes would be lost.
            let reader = std::thread::spawn(move || {
                use std::io::{BufRead, Write};
                let mut seen = String::new();
                for line in std::io::BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if line.starts_with("SPANVM-BEGIN") {
                        let _ = stdin.write_all(text.as_bytes());
                        let _ = stdin.flush();
                    }
                    seen.push_str(&line);
                    seen.push('\n');
                }
                seen
            });
            let mut out = common::wait_with_limit(child, Duration::from_secs(900));
            out.stdout = reader.join().unwrap().into_bytes();
            out
        }
    };
    Boot {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        ok: out.status.success(),
    }
}

impl Boot {
    fn assert_line(&self, what: &str) {
        assert!(
            self.stdout.lines().any(|l| l.contains(what)),
            "the guest never printed `{what}`\nconsole:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
    }
    fn marker(&self, name: &str) -> String {
        let prefix = format!("{name} ");
        match self.stdout.lines().find_map(|l| l.strip_prefix(&prefix)) {
            Some(v) => v.trim().to_string(),
            None => panic!(
                "no {name} marker\nconsole:\n{}\nstderr:\n{}",
                self.stdout, self.stderr
            ),
        }
    }
}

#[test]
fn minimal_kernel_boots_2_vcpus_with_srat_and_kvmclock_and_runs_sysbench() {
    let b = boot(
        "minimal.vmlinux",
        2,
        "sysbench+cpu+--threads=2+--time=2+run",
    );
    assert!(
        b.ok,
        "spanvm failed\nconsole:\n{}\nstderr:\n{}",
        b.stdout, b.stderr
    );
    // Both CPUs up: the AP came through INIT/SIPI.
    b.assert_line("smp: Brought up 1 node, 2 CPUs");
    // The NUMA layout and the CPU-to-node mapping come from our SRAT.
    b.assert_line("SRAT: PXM 0 -> APIC 0x00 -> Node 0");
    b.assert_line("SRAT: PXM 0 -> APIC 0x01 -> Node 0");
    b.assert_line("ACPI: SRAT: Node 0 PXM 0 [mem 0x00000000-0x0fffffff]");
    assert_eq!(b.marker("SPANVM-NPROC"), "2");
    assert_eq!(b.marker("SPANVM-NUMA"), "node0 0-1");
    assert_eq!(b.marker("SPANVM-CLOCKSOURCE"), "kvm-clock");
    assert_eq!(
        b.marker("SPANVM-BEGIN"),
        "sysbench cpu --threads=2 --time=2 run"
    );
    let eps: f64 = b
        .stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("events per second:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sysbench result\nconsole:\n{}", b.stdout));
    assert!(eps > 0.0, "sysbench reported {eps} events per second");
    assert_eq!(b.marker("SPANVM-END"), "0");
    b.assert_line("reboot: Power down");
    // KVM's paravirtual features that bypass the user-space APIC or make KVM write per-CPU
    // guest pages are not offered (CPUID) and refused (MSR filter; kernel parameters on
    // kvm_pvm): Linux enables none of them and never trips over a refused MSR.
    for enabled in [
        "KVM setup pv remote TLB flush",
        "setup PV sched yield",
        "setup PV IPIs",
        "PV send IPI",
        "PV spinlocks enabled",
        "setup async PF",
        "stealtime:",
    ] {
        assert!(
            !b.stdout.contains(enabled),
            "the guest enabled a KVM paravirtual feature: `{enabled}`\nconsole:\n{}",
            b.stdout
        );
    }
    assert!(
        !b.stdout.contains("unchecked MSR access"),
        "the guest hit a refused MSR\nconsole:\n{}",
        b.stdout
    );
}

#[test]
fn minimal_bzimage_boots_and_powers_off() {
    let b = boot("minimal.bzImage", 1, "true");
    assert!(
        b.ok,
        "spanvm failed\nconsole:\n{}\nstderr:\n{}",
        b.stdout, b.stderr
    );
    assert_eq!(b.marker("SPANVM-NPROC"), "1");
    assert_eq!(b.marker("SPANVM-END"), "0");
}

#[test]
fn what_the_user_types_reaches_the_guest_shell() {
    // The shell reads the console line by line; the arithmetic proves the guest, not the
    // terminal, evaluated the line.
    let b = boot_with_input(
        "minimal.vmlinux",
        1,
        "shell",
        Some("echo typed-$((6*7))\npoweroff -f\n"),
    );
    assert!(
        b.ok,
        "spanvm failed\nconsole:\n{}\nstderr:\n{}",
        b.stdout, b.stderr
    );
    b.assert_line("typed-42");
}
