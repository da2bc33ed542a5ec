//! `spanvm cluster --stats-interval`: a thread that asks every node for its figures at a fixed
//! interval and prints one summary line per node, with rates since the previous answer.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::stats::client::query_config;
use crate::stats::render::summary_line;
use crate::stats::report::{NodeReport, Rates};

/// Why the watch cannot start.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The thread could not be started.
    #[error("cannot start the statistics watch thread: {0}")]
    Thread(std::io::Error),
}

/// What the thread knows of one node between two rounds.
struct Watched {
    config: PathBuf,
    previous: Option<NodeReport>,
    /// The last error printed, so that a node that does not answer is reported once, not
    /// every interval.
    last_error: Option<String>,
}

/// The running watch; dropping it stops the thread.
pub struct ClusterWatch {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl ClusterWatch {
    /// Starts printing, every `interval`, a line for each node of `configs` (node `i` runs from
    /// `configs[i]`). Start it after the signal mask is set (`handle_signals`).
    pub fn start(configs: Vec<PathBuf>, interval: Duration) -> Result<ClusterWatch, WatchError> {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let watched = configs
            .into_iter()
            .map(|config| Watched {
                config,
                previous: None,
                last_error: None,
            })
            .collect();
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("stats-watch".into())
                .spawn(move || watch(watched, interval, &stop))
                .map_err(WatchError::Thread)?
        };
        Ok(ClusterWatch {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for ClusterWatch {
    fn drop(&mut self) {
        let (flag, wake) = &*self.stop;
        *flag.lock().unwrap_or_else(PoisonError::into_inner) = true;
        wake.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Waits until `deadline` or a stop; returns whether to stop.
fn sleep_until(deadline: Instant, stop: &(Mutex<bool>, Condvar)) -> bool {
    let (flag, wake) = stop;
    let mut stopped = flag.lock().unwrap_or_else(PoisonError::into_inner);
    while !*stopped {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        stopped = wake
            .wait_timeout(stopped, left)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
    }
    true
}

fn watch(mut nodes: Vec<Watched>, interval: Duration, stop: &(Mutex<bool>, Condvar)) {
    // Rounds keep their pace whatever a round takes.
    let mut next = Instant::now() + interval;
    while !sleep_until(next, stop) {
        next += interval;
        for (id, node) in nodes.iter_mut().enumerate() {
            let line = match query_config(&node.config) {
                Ok(report) => {
                    let rates = match &node.previous {
                        // A node that started again counts from its new start.
                        Some(prev) if prev.uptime <= report.uptime => Rates::between(prev, &report),
                        _ => Rates::since_start(&report),
                    };
                    let line = summary_line(&report, &rates);
                    node.previous = Some(report);
                    node.last_error = None;
                    Some(line)
                }
                Err(e) => {
                    let message = e.to_string();
                    let new = node.last_error.as_deref() != Some(message.as_str());
                    node.last_error = Some(message.clone());
                    new.then(|| format!("stats node {id}: no answer: {message}"))
                }
            };
            if let Some(line) = line {
                let _ = writeln!(std::io::stderr().lock(), "{line}");
            }
        }
    }
}
