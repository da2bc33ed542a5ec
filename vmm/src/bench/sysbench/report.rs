//! The results of a run: the table on stdout, `results.csv`, the goals and `summary.md`.

use std::fmt::Write as _;
use std::path::Path;

use super::figures::Delta;
use super::layout::Layout;
use super::workload::{Goal, Kind, Measured, Workload};

/// How many most-faulted pages a row names.
pub const TOP_PAGES: usize = 3;
/// The goal of the cpu, local memory and stress-ng ratios.
pub const GOAL_RATIO: f64 = 0.9;
/// GiantVM's stress-ng result: 1.34x slower than QEMU-KVM with 16 vCPUs (section 5.3,
/// Figure 11 (a)).
pub const GIANTVM_STRESS_NG: f64 = 1.0 / 1.34;

/// Why results could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// A file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A most-faulted page of a workload's interval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HotPage {
    /// Guest physical address of the page.
    pub gpa: u64,
    /// Faults on it in the interval (all nodes).
    pub faults: u64,
    /// False when `faults` is a lower bound (see [`Delta::top_pages`]).
    pub exact: bool,
    /// Its owner: a kernel symbol, or what kind of memory it is.
    pub owner: String,
}

impl std::fmt::Display for HotPage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let bound = if self.exact { "" } else { ">=" };
        write!(f, "{:#x} {} {bound}{}", self.gpa, self.owner, self.faults)
    }
}

/// How a workload went in one layout.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// It ran and printed its figure.
    Done(Measured),
    /// It did not: why.
    Failed(String),
}

/// One workload in one layout.
#[derive(Debug, Clone)]
pub struct Row {
    /// The workload.
    pub workload: Workload,
    /// The layout.
    pub layout: Layout,
    /// Its figure or why there is none.
    pub outcome: Outcome,
    /// What the nodes did while it ran.
    pub delta: Delta,
    /// Its most-faulted pages.
    pub hot_pages: Vec<HotPage>,
}

impl Row {
    /// Its figure, if it has one.
    pub fn value(&self) -> Option<f64> {
        match &self.outcome {
            Outcome::Done(m) => Some(m.value),
            Outcome::Failed(_) => None,
        }
    }
}

/// Every row of the run, in the order they ran.
#[derive(Debug, Clone, Default)]
pub struct Results {
    /// The rows.
    pub rows: Vec<Row>,
    /// Per boot, the seconds its guest took to reach `/init` (none: it never did).
    pub boots: Vec<(Layout, Option<f64>)>,
}

impl Results {
    /// The row of `workload` (by name) in `layout`.
    pub fn row(&self, workload: &str, layout: Layout) -> Option<&Row> {
        self.rows
            .iter()
            .find(|r| r.workload.name == workload && r.layout == layout)
    }

    /// A row's figure divided by its baseline's (the same workload on `1xN`).
    pub fn ratio(&self, row: &Row) -> Option<f64> {
        let base = self
            .row(&row.workload.name, row.layout.baseline())?
            .value()?;
        let value = row.value()?;
        (base > 0.0).then(|| value / base)
    }

    /// The layouts in the order they ran.
    pub fn layouts(&self) -> Vec<Layout> {
        let mut out: Vec<Layout> = Vec::new();
        for r in &self.rows {
            if !out.contains(&r.layout) {
                out.push(r.layout);
            }
        }
        out
    }

    /// The workloads in the order they ran.
    pub fn workloads(&self) -> Vec<Workload> {
        let mut out: Vec<Workload> = Vec::new();
        for r in &self.rows {
            if !out.iter().any(|w| w.name == r.workload.name) {
                out.push(r.workload.clone());
            }
        }
        out
    }

    /// Rows that have no figure.
    pub fn failures(&self) -> usize {
        self.rows.iter().filter(|r| r.value().is_none()).count()
    }
}

fn fixed(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.decimals$}"))
}

/// The table printed on stdout.
pub fn table(results: &Results) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<22} {:>6} {:>12} {:<10} {:>9} {:>6} {:>10} {:>10} {:>9} {:>9}  most-faulted pages (gpa owner faults)",
        "workload", "layout", "figure", "unit", "p95 ms", "ratio", "DSM flt/s", "remote/s", "fwd irq/s", "fwd io/s"
    );
    for row in &results.rows {
        let figure = match &row.outcome {
            Outcome::Done(m) => format!("{:.2}", m.value),
            Outcome::Failed(_) => "FAILED".to_string(),
        };
        let p95 = match &row.outcome {
            Outcome::Done(m) => fixed(m.p95_ms, 2),
            Outcome::Failed(_) => "-".into(),
        };
        let d = &row.delta;
        let pages: Vec<String> = row.hot_pages.iter().map(ToString::to_string).collect();
        let _ = writeln!(
            out,
            "{:<22} {:>6} {:>12} {:<10} {:>9} {:>6} {:>10.0} {:>10.0} {:>9.1} {:>9.1}  {}",
            row.workload.name,
            row.layout.to_string(),
            figure,
            row.workload.unit(),
            p95,
            fixed(results.ratio(row), 2),
            d.per_second(d.faults),
            d.per_second(d.remote_requests),
            d.per_second(d.interrupts),
            d.per_second(d.io),
            if pages.is_empty() {
                "-".to_string()
            } else {
                pages.join("; ")
            }
        );
        if let Outcome::Failed(why) = &row.outcome {
            let _ = writeln!(out, "{:<22} {:>6} failed: {why}", "", "");
        }
    }
    out
}

/// One CSV field, quoted when it needs to be (RFC 4180).
fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

/// The CSV header.
pub const CSV_HEADER: &str = "workload,layout,nodes,vcpus_per_node,unit,value,p95_ms,ratio_to_baseline,dsm_faults_per_s,remote_faults_per_s,forwarded_interrupts_per_s,forwarded_io_per_s,window_s,top_page_1,top_page_2,top_page_3,status";

/// `results.csv`: one row per workload and layout.
pub fn csv(results: &Results) -> String {
    let mut out = String::from(CSV_HEADER);
    out.push('\n');
    for row in &results.rows {
        let d = &row.delta;
        let (value, p95, status) = match &row.outcome {
            Outcome::Done(m) => (
                format!("{:.4}", m.value),
                m.p95_ms.map(|p| format!("{p:.2}")).unwrap_or_default(),
                "ok".to_string(),
            ),
            Outcome::Failed(why) => (String::new(), String::new(), format!("failed: {why}")),
        };
        let mut fields = vec![
            row.workload.name.clone(),
            row.layout.to_string(),
            row.layout.nodes.to_string(),
            row.layout.per_node.to_string(),
            row.workload.unit().to_string(),
            value,
            p95,
            results
                .ratio(row)
                .map(|r| format!("{r:.4}"))
                .unwrap_or_default(),
            format!("{:.1}", d.per_second(d.faults)),
            format!("{:.1}", d.per_second(d.remote_requests)),
            format!("{:.1}", d.per_second(d.interrupts)),
            format!("{:.1}", d.per_second(d.io)),
            format!("{:.3}", d.seconds),
        ];
        for i in 0..TOP_PAGES {
            fields.push(
                row.hot_pages
                    .get(i)
                    .map(ToString::to_string)
                    .unwrap_or_default(),
            );
        }
        fields.push(status);
        let line: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
        out.push_str(&line.join(","));
        out.push('\n');
    }
    out
}

/// Geometric mean (of ratios).
fn geometric_mean(values: &[f64]) -> Option<f64> {
    if values.is_empty() || values.iter().any(|v| *v <= 0.0) {
        return None;
    }
    let sum: f64 = values.iter().map(|v| v.ln()).sum();
    let n = u32::try_from(values.len()).ok()?;
    Some((sum / f64::from(n)).exp())
}

fn verdict(ratio: Option<f64>) -> String {
    match ratio {
        Some(r) if r >= GOAL_RATIO => format!("{r:.2} met"),
        Some(r) => format!("{r:.2} MISSED"),
        None => "no figure".to_string(),
    }
}

/// The multi-node layouts whose baseline ran.
fn compared_layouts(results: &Results) -> Vec<Layout> {
    let layouts = results.layouts();
    layouts
        .iter()
        .copied()
        .filter(|l| !l.is_baseline() && layouts.contains(&l.baseline()))
        .collect()
}

/// How long each boot took to reach `/init`, and a warning when a layout's boot was far slower
/// or faster than its baseline's: the same kernel boots in about the same time whatever the
/// layout (1.0-1.5x on 2 nodes, see README), so a larger difference says the host's load
/// changed between the boots, and the ratios compare different hosts.
pub fn boot_times(results: &Results) -> String {
    let mut out = String::new();
    let cells: Vec<String> = results
        .boots
        .iter()
        .map(|(l, s)| {
            format!(
                "{l} {}",
                s.map_or_else(|| "never".to_string(), |s| format!("{s:.0} s"))
            )
        })
        .collect();
    let _ = writeln!(out, "guest reached /init after: {}", cells.join(", "));
    for &(layout, up) in &results.boots {
        let base = results
            .boots
            .iter()
            .find(|(l, _)| *l == layout.baseline() && !layout.is_baseline())
            .and_then(|(_, s)| *s);
        if let (Some(up), Some(base)) = (up, base) {
            let r = up / base;
            if !(0.5..=2.5).contains(&r) {
                let _ = writeln!(
                    out,
                    "  warning: {layout} booted in {r:.2}x the time of {}: the host's load changed between the boots; its ratios are unreliable",
                    layout.baseline()
                );
            }
        }
    }
    out
}

/// The goals of the issue, judged against the baseline of the same run.
pub fn goals(results: &Results) -> String {
    let mut out = String::new();
    let compared = compared_layouts(results);
    let _ = writeln!(
        out,
        "goals (ratio to the 1xN baseline of this run; a multi-node layout without its baseline is not judged):"
    );
    if compared.is_empty() {
        let _ = writeln!(
            out,
            "  no multi-node layout with its baseline ran: nothing to judge"
        );
        return out;
    }
    let ratios = |goal: Goal, layout: Layout| -> Vec<(String, Option<f64>)> {
        results
            .rows
            .iter()
            .filter(|r| r.layout == layout && r.workload.goal() == goal)
            .map(|r| (r.workload.name.clone(), results.ratio(r)))
            .collect()
    };
    for (goal, label) in [
        (Goal::Cpu, "sysbench cpu >= 0.9"),
        (Goal::MemoryLocal, "memory, local scope >= 0.9"),
    ] {
        let cells: Vec<String> = compared
            .iter()
            .map(|&l| {
                let each = ratios(goal, l);
                match each.first() {
                    None => format!("{l} not run"),
                    Some((_, r)) => format!("{l} {}", verdict(*r)),
                }
            })
            .collect();
        let _ = writeln!(out, "  {label}: {}", cells.join(", "));
    }
    let cells: Vec<String> = compared
        .iter()
        .map(|&l| {
            let each = ratios(Goal::StressNg, l);
            if each.is_empty() {
                return format!("{l} not run");
            }
            let values: Vec<f64> = each.iter().filter_map(|(_, r)| *r).collect();
            let mean = if values.len() == each.len() {
                geometric_mean(&values)
            } else {
                None
            };
            let detail: Vec<String> = each
                .iter()
                .map(|(n, r)| format!("{} {}", n.trim_start_matches("stress-ng-"), fixed(*r, 2)))
                .collect();
            format!("{l} {} ({})", verdict(mean), detail.join(" "))
        })
        .collect();
    let _ = writeln!(
        out,
        "  stress-ng CPU methods >= 0.9 (geometric mean; GiantVM {GIANTVM_STRESS_NG:.2} at 16 vCPUs): {}",
        cells.join(", ")
    );
    for prefix in ["threads", "mutex"] {
        let cells: Vec<String> = compared
            .iter()
            .flat_map(|&l| {
                results
                    .rows
                    .iter()
                    .filter(move |r| r.layout == l && r.workload.name.starts_with(prefix))
                    .map(move |r| format!("{} {l} {}", r.workload.name, fixed(results.ratio(r), 2)))
            })
            .collect();
        let shown = if cells.is_empty() {
            "not run".to_string()
        } else {
            cells.join(", ")
        };
        let _ = writeln!(out, "  {prefix} (reported): {shown}");
    }
    let _ = writeln!(out, "  4 KiB global write, GiantVM's \"slower is faster\":");
    for &l in &compared {
        let _ = writeln!(out, "    {}", slower_is_faster(results, l));
    }
    out
}

/// Whether the 4 KiB global write beat its baseline on `layout`, and what the figures say.
pub fn slower_is_faster(results: &Results, layout: Layout) -> String {
    let Some(row) = results
        .rows
        .iter()
        .find(|r| r.layout == layout && r.workload.goal() == Goal::SlowerIsFaster)
    else {
        return format!("{layout}: not run");
    };
    let (Some(ratio), Some(value)) = (results.ratio(row), row.value()) else {
        return format!("{layout}: no figure (see the table)");
    };
    let block_kib = match row.workload.kind {
        Kind::Memory { block_kib, .. } => f64::from(block_kib),
        _ => 4.0,
    };
    // Writes of one block per second, all threads.
    let writes = value * 1024.0 / block_kib;
    let moves = row.delta.per_second(row.delta.remote_requests);
    let per_move = if moves > 0.0 {
        format!("{:.0} block writes per remote request", writes / moves)
    } else {
        "no remote request counted".to_string()
    };
    let hottest = row
        .hot_pages
        .first()
        .map_or_else(String::new, |p| format!("; most-faulted page {p}"));
    if ratio > 1.0 {
        format!(
            "{layout}: REPRODUCED, {ratio:.2}x the baseline: {writes:.0} block writes/s against the \
             baseline's {:.0}, {moves:.0} remote DSM requests/s ({per_move}){hottest}. While a node \
             holds the page its vCPU writes it at full speed, where on one node the vCPUs contend \
             for its 64-byte cache lines at every write",
            writes / ratio
        )
    } else {
        // Why depends on how long a node keeps the page: with many writes per transfer the
        // transfers cost little and what is left is that only one node may write at a time.
        let why = if moves > 0.0 && writes / moves >= 100.0 {
            "With that many writes per transfer the transfers cost little: what is left is the \
             single writer. Only the node holding the page writes, so 2 nodes reach at most one \
             vCPU's speed, while on one node both vCPUs write at once (the host's caches keep \
             them coherent 64 bytes at a time)"
        } else {
            "A page transfer here is a loopback TCP round trip, a userfaultfd fault and the \
             vCPU's exit and re-entry, hundreds of µs on this 2-core kvm_pvm host (GiantVM's \
             RDMA miss: ~15 µs), and the DSM's threads compete with the vCPUs for the cores: \
             too few writes between transfers to beat the cache-line contention the baseline pays"
        };
        format!(
            "{layout}: not reproduced, {ratio:.2}x the baseline: {writes:.0} block writes/s against \
             the baseline's {:.0}, {moves:.0} remote DSM requests/s ({per_move}){hottest}. {why}",
            writes / ratio
        )
    }
}

/// GiantVM's published result for a workload (section and figure of the seed paper).
fn giantvm(workload: &Workload) -> &'static str {
    match workload.kind {
        Kind::Cpu => "not run by GiantVM (its CPU-bound figures are stress-ng's)",
        Kind::Threads => "not run by GiantVM",
        Kind::Mutex(1) => {
            "§5.2 Mutex, Fig. 7 (a), {1, *}: latency-oriented, the cache system keeps a significant advantage (no number in the text)"
        }
        Kind::Mutex(_) => {
            "§5.2 Mutex, Fig. 7 (a), {16, *}: false sharing, the 16 locks share one page (no number in the text)"
        }
        Kind::Memory { global: false, .. } => {
            "§5.2 Memory, Fig. 5: local scope runs at full speed, slightly below the baseline (timer interrupts)"
        }
        Kind::Memory {
            global: true,
            block_kib: 4,
        } => "§5.2 Memory, Fig. 5 and 6, {4K, global, write}: GiantVM above the baseline (\"slower is faster\"; IPoIB > RDMA > baseline)",
        Kind::Memory { global: true, .. } => {
            "§5.2 Memory, Fig. 5, {4MiB, global, write}: \"slower is faster\" gone, far below the baseline"
        }
        Kind::FileIo { .. } => "§5.2 File I/O, Fig. 7 (b): \"catastrophic\" (DSM 43.75 % of CPU time, Table 2)",
        Kind::StressNg(_) => "§5.3, Fig. 11 (a): 1.34x slower than QEMU-KVM on average with 16 vCPUs (ratio 0.75)",
    }
}

/// `summary.md`: GiantVM's published ratios beside ours.
pub fn summary(results: &Results, how: &str) -> String {
    let mut out = String::new();
    let compared = compared_layouts(results);
    let _ = writeln!(out, "# spanvm bench sysbench: summary\n");
    let _ = writeln!(out, "{how}\n");
    let _ = writeln!(
        out,
        "Ratios are a layout's figure over the same workload on one node with the same number of vCPUs \
         (`1xN`), measured in the same run. GiantVM (VEE 2020, the seed paper) compared 4 nodes x N/4 vCPUs \
         over 56 Gbit/s InfiniBand (RDMA) with vanilla QEMU-KVM on one machine, averaging five runs; here \
         the nodes are processes on one machine talking over loopback TCP, on a `kvm_pvm` host where guest \
         kernel code is emulated. The text of the paper gives numbers only where quoted below; the rest of \
         its figures are bars whose values did not survive into the text.\n"
    );
    let mut header = String::from("| workload | GiantVM (seed paper) |");
    let mut rule = String::from("| --- | --- |");
    for l in &compared {
        let _ = write!(header, " {l} / {} |", l.baseline());
        rule.push_str(" ---: |");
    }
    let _ = writeln!(out, "{header}\n{rule}");
    for w in results.workloads() {
        let mut line = format!("| {} | {} |", w.name, giantvm(&w));
        for &l in &compared {
            let cell = results
                .row(&w.name, l)
                .and_then(|r| results.ratio(r))
                .map_or_else(|| "-".to_string(), |r| format!("{r:.2}"));
            let _ = write!(line, " {cell} |");
        }
        let _ = writeln!(out, "{line}");
    }
    let _ = writeln!(out, "\n## Goals\n\n```\n{}```\n", goals(results));
    let _ = writeln!(out, "```\n{}```\n", boot_times(results));
    let _ = writeln!(
        out,
        "The stress-ng methods are the bench's choice ({}): the paper's text says only \"CPU methods of stress-ng\".",
        super::workload::STRESS_NG_METHODS.join(", ")
    );
    out
}

/// Writes `text` to `dir/name`.
pub fn write(dir: &Path, name: &str, text: &str) -> Result<(), ReportError> {
    let path = dir.join(name);
    std::fs::write(&path, text).map_err(|source| ReportError::Write {
        path: path.display().to_string(),
        source,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::bench::sysbench::workload::workloads;

    pub(crate) fn sample() -> Results {
        let mut results = Results::default();
        let one = Layout {
            nodes: 1,
            per_node: 2,
        };
        let two = Layout {
            nodes: 2,
            per_node: 1,
        };
        for (layout, scale) in [(one, 1.0), (two, 0.5)] {
            for w in workloads(false, false) {
                let outcome = if w.name == "threads" && layout == two {
                    Outcome::Failed("exit status 137 (killed after 120 s)".into())
                } else {
                    Outcome::Done(Measured {
                        value: 100.0 * scale,
                        p95_ms: Some(1.5),
                    })
                };
                let delta = if layout == two {
                    Delta {
                        seconds: 2.0,
                        faults: 4000,
                        remote_requests: 3000,
                        interrupts: 10,
                        io: 4,
                        top_pages: vec![(0x1bdb000, 100, true)],
                    }
                } else {
                    Delta::default()
                };
                let hot_pages = delta
                    .top_pages
                    .iter()
                    .map(|&(gpa, faults, exact)| HotPage {
                        gpa,
                        faults,
                        exact,
                        owner: "tk_core, timekeeping".into(),
                    })
                    .collect();
                results.rows.push(Row {
                    workload: w,
                    layout,
                    outcome,
                    delta,
                    hot_pages,
                });
            }
        }
        results
    }

    #[test]
    fn csv_has_a_quoted_row_per_workload_and_layout() {
        let results = sample();
        let text = csv(&results);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], CSV_HEADER);
        assert_eq!(lines.len(), 1 + results.rows.len());
        let columns = CSV_HEADER.split(',').count();
        let cpu_2x1 = lines.iter().find(|l| l.starts_with("cpu,2x1,")).unwrap();
        assert!(cpu_2x1.contains(",0.5000,"), "{cpu_2x1}");
        assert!(
            cpu_2x1.contains(",2000.0,1500.0,5.0,2.0,2.000,"),
            "{cpu_2x1}"
        );
        // The owner has a comma: the field is quoted.
        assert!(
            cpu_2x1.contains(",\"0x1bdb000 tk_core, timekeeping 100\","),
            "{cpu_2x1}"
        );
        let failed = lines
            .iter()
            .find(|l| l.starts_with("threads,2x1,"))
            .unwrap();
        assert!(
            failed.ends_with(",failed: exit status 137 (killed after 120 s)"),
            "{failed}"
        );
        // Unquoted fields count: every line has the header's columns.
        for line in &lines[1..] {
            let mut n = 1;
            let mut quoted = false;
            for c in line.chars() {
                match c {
                    '"' => quoted = !quoted,
                    ',' if !quoted => n += 1,
                    _ => {}
                }
            }
            assert_eq!(n, columns, "{line}");
        }
        assert_eq!(csv_field("a\"b"), "\"a\"\"b\"");
    }

    #[test]
    fn table_goals_and_summary() {
        let results = sample();
        let t = table(&results);
        assert!(
            t.contains("FAILED") && t.contains("failed: exit status 137"),
            "{t}"
        );
        let g = goals(&results);
        assert!(g.contains("sysbench cpu >= 0.9: 2x1 0.50 MISSED"), "{g}");
        assert!(g.contains("not reproduced, 0.50x"), "{g}");
        // 50 MiB/s of 4 KiB blocks against 1500 transfers/s: 8.5 writes per transfer.
        assert!(g.contains("too few writes between transfers"), "{g}");
        assert!(g.contains("threads (reported): threads 2x1 -"), "{g}");
        let s = summary(&results, "how");
        assert!(s.contains("| cpu |") && s.contains("2x1 / 1x2"), "{s}");
        assert!(s.contains("1.34x slower"), "{s}");
        assert_eq!(results.failures(), 1);
        let mut r = results.clone();
        let (one, two) = (r.layouts()[0], r.layouts()[1]);
        r.boots = vec![(one, Some(100.0)), (two, Some(140.0))];
        assert!(!boot_times(&r).contains("warning"), "{}", boot_times(&r));
        r.boots = vec![(one, Some(600.0)), (two, Some(150.0))];
        assert!(
            boot_times(&r).contains("warning: 2x1 booted in 0.25x"),
            "{}",
            boot_times(&r)
        );
    }

    #[test]
    fn goals_of_workloads_left_out_say_not_run() {
        let mut results = sample();
        results.rows.retain(|r| r.workload.name == "cpu");
        let g = goals(&results);
        assert!(g.contains("sysbench cpu >= 0.9: 2x1 0.50 MISSED"), "{g}");
        assert!(g.contains("memory, local scope >= 0.9: 2x1 not run"), "{g}");
        assert!(
            g.contains("(geometric mean; GiantVM 0.75 at 16 vCPUs): 2x1 not run"),
            "{g}"
        );
        assert!(g.contains("threads (reported): not run"), "{g}");
        assert!(g.contains("mutex (reported): not run"), "{g}");
        assert!(g.contains("2x1: not run"), "{g}");
    }

    #[test]
    fn geometric_mean_of_ratios() {
        assert!((geometric_mean(&[0.5, 2.0]).unwrap() - 1.0).abs() < 1e-12);
        assert_eq!(geometric_mean(&[]), None);
        assert_eq!(geometric_mean(&[1.0, 0.0]), None);
    }
}
