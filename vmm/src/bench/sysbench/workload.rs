//! What runs inside the guest: the workloads, the `/init` command line that runs them all in
//! one boot between markers, and the parsing of what sysbench and stress-ng print.
//!
//! Every workload prints `SB-BEGIN <name>` before it and `SB-END <name> <exit status>` after
//! it, and runs under busybox `timeout -s KILL`, so that one that hangs or fails is reported
//! with its status instead of stopping the run.

/// The stress-ng CPU methods run. GiantVM's section 5.3 (Figures 10 and 11 (a)) ran "CPU
/// methods of stress-ng" without naming them in the text; these cover recursion, integer and
/// bit arithmetic, checksums, floating point, transforms and a cache-heavy matrix product.
pub const STRESS_NG_METHODS: [&str; 6] =
    ["ackermann", "int64", "crc16", "double", "fft", "matrixprod"];

/// Seed of every random number generator (sysbench `--rand-seed`, stress-ng `--seed`).
pub const SEED: u32 = 1;

/// What a workload exercises and how its figure is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// sysbench cpu: primes up to 10000 per event.
    Cpu,
    /// sysbench threads: 10 sched_yield calls (sysbench's default is 1000, about 5 s per event
    /// in a kvm_pvm guest, whose kernel is emulated) and mutexes among 8 locks per event.
    Threads,
    /// sysbench mutex with this many locks.
    Mutex(u32),
    /// sysbench memory writes of `block_kib` blocks, each thread in its own buffer (`local`)
    /// or all in one (`global`).
    Memory {
        /// `--memory-scope=global`.
        global: bool,
        /// `--memory-block-size` in KiB.
        block_kib: u32,
    },
    /// sysbench fileio on the data disk, O_DIRECT, 1 MiB blocks.
    FileIo {
        /// `seqrd` or `seqwr`.
        mode: &'static str,
    },
    /// One stress-ng CPU method on every vCPU.
    StressNg(&'static str),
}

/// Which goal of the issue a workload counts for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Goal {
    /// sysbench cpu >= 0.9 of the baseline.
    Cpu,
    /// memory with local scope >= 0.9.
    MemoryLocal,
    /// the stress-ng CPU methods >= 0.9 (GiantVM: 1/1.34).
    StressNg,
    /// reported only (threads, mutex, global memory, file I/O).
    Reported,
    /// the 4 KiB global write: "slower is faster" reproduced or explained.
    SlowerIsFaster,
}

/// One workload of the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// Its name in the markers, the table and the CSV.
    pub name: String,
    /// What it runs.
    pub kind: Kind,
}

impl Workload {
    fn new(kind: Kind) -> Workload {
        let name = match kind {
            Kind::Cpu => "cpu".to_string(),
            Kind::Threads => "threads".to_string(),
            Kind::Mutex(n) => format!("mutex-{n}"),
            Kind::Memory { global, block_kib } => {
                let scope = if global { "global" } else { "local" };
                if block_kib % 1024 == 0 {
                    format!("memory-{scope}-{}m", block_kib / 1024)
                } else {
                    format!("memory-{scope}-{block_kib}k")
                }
            }
            Kind::FileIo { mode } => format!("fileio-{mode}"),
            Kind::StressNg(method) => format!("stress-ng-{method}"),
        };
        Workload { name, kind }
    }

    /// The unit of its figure.
    pub fn unit(&self) -> &'static str {
        match self.kind {
            Kind::Cpu | Kind::Threads => "events/s",
            Kind::Mutex(_) => "locks/s",
            Kind::Memory { .. } | Kind::FileIo { .. } => "MiB/s",
            Kind::StressNg(_) => "bogo ops/s",
        }
    }

    /// The goal it counts for.
    pub fn goal(&self) -> Goal {
        match self.kind {
            Kind::Cpu => Goal::Cpu,
            Kind::Memory { global: false, .. } => Goal::MemoryLocal,
            Kind::Memory {
                global: true,
                block_kib: 4,
            } => Goal::SlowerIsFaster,
            Kind::StressNg(_) => Goal::StressNg,
            _ => Goal::Reported,
        }
    }
}

/// The stress-ng methods of a `--quick` run.
pub const QUICK_STRESS_NG_METHODS: [&str; 2] = ["int64", "fft"];

/// The workloads of a run, in the order they run; the file I/O ones only with a disk. Every
/// program start costs tens of seconds in a kvm_pvm guest (the loader's page faults run in
/// the emulated kernel), so `quick` runs one mutex case and two stress-ng methods.
pub fn workloads(quick: bool, with_disk: bool) -> Vec<Workload> {
    let mut kinds = vec![Kind::Cpu, Kind::Threads, Kind::Mutex(1)];
    if !quick {
        kinds.push(Kind::Mutex(16));
    }
    kinds.extend([
        Kind::Memory {
            global: false,
            block_kib: 4096,
        },
        Kind::Memory {
            global: true,
            block_kib: 4096,
        },
        Kind::Memory {
            global: true,
            block_kib: 4,
        },
    ]);
    let methods: &[&'static str] = if quick {
        &QUICK_STRESS_NG_METHODS
    } else {
        &STRESS_NG_METHODS
    };
    kinds.extend(methods.iter().map(|m| Kind::StressNg(m)));
    if with_disk {
        kinds.push(Kind::FileIo { mode: "seqrd" });
        kinds.push(Kind::FileIo { mode: "seqwr" });
    }
    kinds.into_iter().map(Workload::new).collect()
}

/// `--workloads` names something the run does not have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectionError {
    /// An unknown name (or one that needs `--disk`, or a full run).
    #[error("--workloads: no workload {name:?} in this run; its workloads are: {known}")]
    Unknown {
        /// The name given.
        name: String,
        /// The run's workload names, comma-separated.
        known: String,
    },
    /// Nothing selected.
    #[error("--workloads: no workload named; give names such as cpu,memory-local-4m")]
    Empty,
}

/// The workloads of `all` named in `names` (comma-separated), in the run's order.
pub fn select(all: Vec<Workload>, names: &str) -> Result<Vec<Workload>, SelectionError> {
    let wanted: Vec<&str> = names
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .collect();
    if wanted.is_empty() {
        return Err(SelectionError::Empty);
    }
    if let Some(name) = wanted.iter().find(|n| !all.iter().any(|w| w.name == **n)) {
        let known: Vec<&str> = all.iter().map(|w| w.name.as_str()).collect();
        return Err(SelectionError::Unknown {
            name: (*name).to_string(),
            known: known.join(","),
        });
    }
    Ok(all
        .into_iter()
        .filter(|w| wanted.contains(&w.name.as_str()))
        .collect())
}

/// How long each workload runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Durations {
    /// sysbench `--time` and stress-ng `--timeout`, seconds.
    pub seconds: u32,
    /// sysbench mutex `--mutex-locks` per thread (mutex runs a fixed amount of work).
    pub mutex_locks: u32,
    /// Past this many seconds a workload is killed (`timeout -s KILL`).
    pub limit_seconds: u32,
}

impl Durations {
    /// `--quick`: the shortest runs that still give a figure. Not 1-2 s: sysbench counts its
    /// per-thread start-up (each worker builds a Lua state) in its run time, and in a kvm_pvm
    /// guest, whose kernel is emulated, that start-up took 1-2 s per thread (2 s runs measured
    /// mostly start-up: the threads ran events 10 % of the time). The run itself is cheap next
    /// to the program's start (30-90 s per workload here).
    pub const QUICK: Durations = Durations {
        seconds: 5,
        mutex_locks: 20000,
        limit_seconds: 300,
    };
    /// The default.
    pub const FULL: Durations = Durations {
        seconds: 20,
        mutex_locks: 100_000,
        limit_seconds: 600,
    };
}

/// The `spanvm.run=` value (with its double quotes) that runs `workloads` on `vcpus` threads.
///
/// Kernel command line traps: no double quote inside (it would end the value), no lone `--`
/// word (the kernel hands everything after it to init), and short (the command line is at most
/// 2048 bytes on x86-64). Hence one shell function `b` for the markers and variables for the
/// common options; single quotes are safe.
pub fn guest_run(workloads: &[Workload], vcpus: usize, d: Durations) -> String {
    let mut script = format!(
        "b(){{ n=$1;shift;echo SB-BEGIN $n;timeout -s KILL {} $@ 2>&1;echo SB-END $n $?; }};\
         S='sysbench --threads={vcpus} --time={} --rand-seed={SEED} --percentile=95';\
         M='memory --memory-oper=write --memory-total-size=1T';\
         G='--cpu {vcpus} --timeout {} --metrics-brief --seed {SEED} --temp-path /tmp';",
        d.limit_seconds, d.seconds, d.seconds
    );
    let mut file_io = Vec::new();
    for w in workloads {
        let n = &w.name;
        match w.kind {
            Kind::Cpu => script.push_str(&format!("b {n} $S cpu run;")),
            Kind::Threads => script.push_str(&format!("b {n} $S threads --thread-yields=10 run;")),
            Kind::Mutex(locks) => script.push_str(&format!(
                "b {n} $S mutex --mutex-num={locks} --mutex-locks={} run;",
                d.mutex_locks
            )),
            Kind::Memory { global, block_kib } => script.push_str(&format!(
                "b {n} $S $M --memory-scope={} --memory-block-size={block_kib}K run;",
                if global { "global" } else { "local" }
            )),
            Kind::StressNg(method) => {
                script.push_str(&format!("b {n} stress-ng $G --cpu-method {method};"));
            }
            Kind::FileIo { mode } => {
                file_io.push(format!("b {n} $S $F --file-test-mode={mode} run;"));
            }
        }
    }
    if !file_io.is_empty() {
        script.push_str(
            "F='fileio --file-num=1 --file-total-size=16M --file-block-size=1M --file-extra-flags=direct';\
             if mount -t ext4 /dev/vda /mnt;then cd /mnt;sysbench $F prepare >/dev/null;",
        );
        for line in file_io {
            script.push_str(&line);
        }
        script.push_str(
            "sysbench $F cleanup >/dev/null;cd /;umount /mnt;else echo SB-SKIP fileio;fi",
        );
    }
    format!("\"{script}\"")
}

/// What is wrong with a workload's output.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// An expected figure is not in the output.
    #[error("no '{0}' in its output")]
    Missing(&'static str),
    /// A figure is there but zero or negative, which no run of these workloads gives.
    #[error("'{0}' is not positive")]
    NotPositive(&'static str),
}

/// A workload's result.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measured {
    /// Its figure, in [`Workload::unit`].
    pub value: f64,
    /// The 95th percentile of the event latency, ms (sysbench only).
    pub p95_ms: Option<f64>,
}

/// The number after `key` on the first line that has it (`key` may be in the middle of the
/// line); a trailing unit letter such as the `s` of `1.0006s` is dropped.
fn number_after(text: &str, key: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let (_, rest) = line.split_once(key)?;
        let word = rest.split_whitespace().next()?;
        word.trim_end_matches(|c: char| c.is_ascii_alphabetic() || c == ')')
            .parse::<f64>()
            .ok()
    })
}

/// sysbench memory's rate: `14294.00 MiB transferred (14167.56 MiB/sec)`.
fn memory_rate(text: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let (_, rest) = line.split_once("MiB transferred (")?;
        rest.split_whitespace().next()?.parse::<f64>().ok()
    })
}

/// stress-ng `--metrics-brief`: the bogo ops per second (real time) of the `cpu` stressor,
/// from `stress-ng: metrc: [pid] cpu  <ops> <real s> <usr s> <sys s> <ops/s real> <ops/s cpu>`
/// (`info:` instead of `metrc:` in older versions).
fn stress_ng_rate(text: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let (_, rest) = line.split_once("] ")?;
        if !line.starts_with("stress-ng:") {
            return None;
        }
        let mut words = rest.split_whitespace();
        if words.next()? != "cpu" {
            return None;
        }
        let numbers: Vec<f64> = words.map_while(|w| w.parse::<f64>().ok()).collect();
        numbers.get(4).copied()
    })
}

/// Reads the figure of `workload` out of its output.
pub fn parse_output(workload: &Workload, text: &str, d: Durations) -> Result<Measured, ParseError> {
    let need = |v: Option<f64>, what: &'static str| v.ok_or(ParseError::Missing(what));
    let value = match workload.kind {
        Kind::Cpu => need(
            number_after(text, "events per second:"),
            "events per second",
        )?,
        Kind::Threads => {
            let events = need(
                number_after(text, "total number of events:"),
                "total number of events",
            )?;
            let time = need(number_after(text, "total time:"), "total time")?;
            if time <= 0.0 {
                return Err(ParseError::NotPositive("total time"));
            }
            events / time
        }
        Kind::Mutex(_) => {
            let time = need(number_after(text, "total time:"), "total time")?;
            if time <= 0.0 {
                return Err(ParseError::NotPositive("total time"));
            }
            // Every thread takes and releases a lock --mutex-locks times: one "event".
            let events = need(
                number_after(text, "total number of events:"),
                "total number of events",
            )?;
            events * f64::from(d.mutex_locks) / time
        }
        Kind::Memory { .. } => need(memory_rate(text), "MiB transferred")?,
        Kind::FileIo { mode } => {
            let key = if mode.ends_with("wr") {
                "written, MiB/s:"
            } else {
                "read, MiB/s:"
            };
            need(number_after(text, key), "MiB/s")?
        }
        Kind::StressNg(_) => need(stress_ng_rate(text), "stress-ng cpu bogo ops/s")?,
    };
    if value <= 0.0 || !value.is_finite() {
        return Err(ParseError::NotPositive("the figure"));
    }
    let p95_ms = match workload.kind {
        Kind::StressNg(_) => None,
        _ => number_after(text, "95th percentile:"),
    };
    Ok(Measured { value, p95_ms })
}

/// One workload's section of the console: what it printed and its exit status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    /// The workload's name.
    pub name: String,
    /// Its output between the markers.
    pub text: String,
    /// Its exit status (`None`: the end marker never came).
    pub status: Option<i32>,
}

/// What a console line means to the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Marker {
    /// `SB-BEGIN name`.
    Begin(String),
    /// `SB-END name status`.
    End(String, i32),
    /// `SB-SKIP what`: a group of workloads could not run (the disk did not mount).
    Skip(String),
    /// `SPANVM-BEGIN`: `/init` started the run.
    InitStarted,
    /// `SPANVM-END`: the run is over.
    InitDone,
    /// Anything else.
    Text,
}

/// Reads a console line (without the `[node N] ` prefix a cluster adds).
pub fn marker(line: &str) -> Marker {
    let line = line.trim_end();
    if let Some(name) = line.strip_prefix("SB-BEGIN ") {
        return Marker::Begin(name.trim().to_string());
    }
    if let Some(rest) = line.strip_prefix("SB-END ") {
        let mut words = rest.split_whitespace();
        if let (Some(name), Some(Ok(status))) = (words.next(), words.next().map(str::parse)) {
            return Marker::End(name.to_string(), status);
        }
    }
    if let Some(what) = line.strip_prefix("SB-SKIP ") {
        return Marker::Skip(what.trim().to_string());
    }
    if line.starts_with("SPANVM-BEGIN") {
        return Marker::InitStarted;
    }
    if line.starts_with("SPANVM-END") {
        return Marker::InitDone;
    }
    Marker::Text
}

/// A console line without the `[node N] ` prefix `spanvm cluster` puts before node output.
pub fn strip_node_prefix(line: &str) -> &str {
    if let Some(rest) = line.strip_prefix("[node ") {
        if let Some((node, text)) = rest.split_once("] ") {
            if node.bytes().all(|b| b.is_ascii_digit()) {
                return text;
            }
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    // Real outputs from the guest (1 node x 2 vCPUs on the kvm_pvm host): sysbench cpu,
    // threads, mutex, memory and stress-ng of a 2 s trial run, fileio of `--quick --disk`.
    const CPU: &str = include_str!("samples/cpu.txt");
    const THREADS: &str = include_str!("samples/threads.txt");
    const MUTEX: &str = include_str!("samples/mutex.txt");
    const MEMORY: &str = include_str!("samples/memory.txt");
    const FILEIO_RD: &str = include_str!("samples/fileio-seqrd.txt");
    const FILEIO_WR: &str = include_str!("samples/fileio-seqwr.txt");
    const STRESS_NG: &str = include_str!("samples/stress-ng.txt");

    fn find(kind: Kind) -> Workload {
        Workload::new(kind)
    }

    #[test]
    fn a_selection_keeps_the_run_order_and_refuses_unknown_names() {
        let picked = select(workloads(true, false), " memory-local-4m,cpu ").unwrap();
        let names: Vec<&str> = picked.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(names, ["cpu", "memory-local-4m"]);
        let err = select(workloads(true, false), "cpu,fileio-seqrd").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("\"fileio-seqrd\"") && text.contains("cpu,threads"),
            "{text}"
        );
        assert_eq!(
            select(workloads(true, false), " , ").unwrap_err(),
            SelectionError::Empty
        );
    }

    #[test]
    fn sysbench_figures() {
        let d = Durations::QUICK;
        let cpu = parse_output(&find(Kind::Cpu), CPU, d).unwrap();
        assert!(cpu.value > 0.0 && cpu.p95_ms.is_some(), "{cpu:?}");
        let threads = parse_output(&find(Kind::Threads), THREADS, d).unwrap();
        assert!(threads.value > 0.0 && threads.p95_ms.is_some());
        let mutex = parse_output(&find(Kind::Mutex(16)), MUTEX, d).unwrap();
        assert!(mutex.value > 0.0);
        let memory = find(Kind::Memory {
            global: false,
            block_kib: 4096,
        });
        let m = parse_output(&memory, MEMORY, d).unwrap();
        assert!(m.value > 0.0 && m.p95_ms.is_some());
        let rd = parse_output(&find(Kind::FileIo { mode: "seqrd" }), FILEIO_RD, d).unwrap();
        let wr = parse_output(&find(Kind::FileIo { mode: "seqwr" }), FILEIO_WR, d).unwrap();
        assert!(rd.value > 0.0 && wr.value > 0.0);
    }

    #[test]
    fn exact_values_of_hand_written_outputs() {
        let d = Durations::QUICK;
        let cpu = "CPU speed:\n    events per second:  1813.76\n\nLatency (ms):\n         95th percentile:                        8.28\n";
        let m = parse_output(&find(Kind::Cpu), cpu, d).unwrap();
        assert_eq!((m.value, m.p95_ms), (1813.76, Some(8.28)));
        let threads = "    total time:                          2.0000s\n    total number of events:              424\n";
        let m = parse_output(&find(Kind::Threads), threads, d).unwrap();
        assert!((m.value - 212.0).abs() < 1e-9);
        assert_eq!(m.p95_ms, None);
        let mutex = "    total time:                          0.5000s\n    total number of events:              2\n";
        let m = parse_output(&find(Kind::Mutex(1)), mutex, d).unwrap();
        assert!((m.value - 2.0 * f64::from(d.mutex_locks) / 0.5).abs() < 1e-9);
        let memory = "Total operations: 14294 (14167.56 per second)\n\n14294.00 MiB transferred (14167.56 MiB/sec)\n";
        let w = find(Kind::Memory {
            global: true,
            block_kib: 4,
        });
        assert_eq!(parse_output(&w, memory, d).unwrap().value, 14167.56);
        let fileio = "Throughput:\n    read, MiB/s:                  0.00\n    written, MiB/s:               12.50\n";
        let w = find(Kind::FileIo { mode: "seqwr" });
        assert_eq!(parse_output(&w, fileio, d).unwrap().value, 12.5);
        let w = find(Kind::FileIo { mode: "seqrd" });
        assert_eq!(
            parse_output(&w, fileio, d).unwrap_err(),
            ParseError::NotPositive("the figure")
        );
    }

    #[test]
    fn stress_ng_metrics_brief() {
        let w = find(Kind::StressNg("fft"));
        let m = parse_output(&w, STRESS_NG, Durations::QUICK).unwrap();
        assert!(m.value > 0.0 && m.p95_ms.is_none());
        let text = "stress-ng: info:  [8278] dispatching hogs: 2 cpu\n\
                    stress-ng: metrc: [8278] stressor       bogo ops real time  usr time  sys time   bogo ops/s     bogo ops/s\n\
                    stress-ng: metrc: [8278]                           (secs)    (secs)    (secs)   (real time) (usr+sys time)\n\
                    stress-ng: metrc: [8278] cpu                1324      1.00      0.64      0.00      1318.37        2074.58\n";
        assert_eq!(
            parse_output(&w, text, Durations::QUICK).unwrap().value,
            1318.37
        );
    }

    #[test]
    fn failures_say_what_is_missing() {
        let d = Durations::QUICK;
        let err = parse_output(&find(Kind::Cpu), "Killed\n", d).unwrap_err();
        assert_eq!(err, ParseError::Missing("events per second"));
        assert!(err.to_string().contains("events per second"));
        let w = find(Kind::StressNg("int64"));
        let text = "stress-ng: error: [1] cpu-method 'x' is not known\n";
        assert!(parse_output(&w, text, d).is_err());
    }

    #[test]
    fn markers() {
        assert_eq!(marker("SB-BEGIN cpu\r"), Marker::Begin("cpu".into()));
        assert_eq!(marker("SB-END cpu 0"), Marker::End("cpu".into(), 0));
        assert_eq!(
            marker("SB-END mutex-1 137"),
            Marker::End("mutex-1".into(), 137)
        );
        assert_eq!(marker("SB-END cpu"), Marker::Text);
        assert_eq!(marker("SB-SKIP fileio"), Marker::Skip("fileio".into()));
        assert_eq!(marker("SPANVM-END 0"), Marker::InitDone);
        assert_eq!(marker("SPANVM-BEGIN b(){ ..."), Marker::InitStarted);
        assert_eq!(strip_node_prefix("[node 0] SB-BEGIN cpu"), "SB-BEGIN cpu");
        assert_eq!(strip_node_prefix("[node x] y"), "[node x] y");
        assert_eq!(strip_node_prefix("plain"), "plain");
    }

    #[test]
    fn the_guest_run_fits_the_kernel_command_line() {
        let all = workloads(false, true);
        assert_eq!(all.len(), 7 + STRESS_NG_METHODS.len() + 2);
        assert_eq!(
            workloads(true, false).len(),
            6 + QUICK_STRESS_NG_METHODS.len()
        );
        let run = guest_run(&all, 4, Durations::FULL);
        assert!(run.len() < 1700, "{} bytes", run.len());
        assert_eq!(run.matches('"').count(), 2, "{run}");
        assert!(!run.split_whitespace().any(|w| w == "--"), "{run}");
        for w in &all {
            assert!(
                run.contains(&format!("b {} ", w.name)),
                "{} missing: {run}",
                w.name
            );
        }
        assert!(!guest_run(&workloads(true, false), 2, Durations::QUICK).contains("fileio"));
        let names: Vec<&str> = all.iter().map(|w| w.name.as_str()).collect();
        assert!(names.contains(&"memory-global-4k") && names.contains(&"memory-local-4m"));
        assert_eq!(all[6].goal(), Goal::SlowerIsFaster);
    }
}
