//! `spanvm stats`: one node's figures, with rates over an interval or since its start.

use std::path::Path;
use std::time::Duration;

use crate::stats::client::{query, QueryError};
use crate::stats::render::full_page;
use crate::stats::report::Rates;
use crate::stats::socket_path;

/// Errors of `spanvm stats`.
#[derive(Debug, thiserror::Error)]
pub enum StatsCommandError {
    /// The node could not be asked.
    #[error(transparent)]
    Query(#[from] QueryError),
    /// The socket path cannot be derived from the config.
    #[error(transparent)]
    SocketPath(#[from] crate::stats::SocketPathError),
    /// The node's uptime went back between the two answers.
    #[error("the node restarted between the two answers; ask again")]
    Restarted,
}

/// Reads a duration in seconds (`2`, `0.5`) for `--interval` and `--stats-interval`.
pub fn parse_seconds(text: &str) -> Result<Duration, String> {
    let seconds: f64 = text
        .parse()
        .map_err(|_| format!("`{text}` is not a number of seconds"))?;
    if !(0.01..=86_400.0).contains(&seconds) {
        return Err(format!(
            "{text} s is out of range: give between 0.01 and 86400 seconds"
        ));
    }
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("`{text}`: {e}"))
}

/// Prints the figures of the node that runs from `config`; with `interval`, takes two answers
/// that far apart and prints the rates between them, otherwise averages since the node started.
pub fn run(config: &Path, interval: Option<Duration>) -> Result<(), StatsCommandError> {
    let socket = socket_path(config)?;
    let first = query(config, &socket)?;
    let (report, rates, over) = match interval {
        None => {
            let rates = Rates::since_start(&first);
            (first, rates, "averages since the node started".to_string())
        }
        Some(wait) => {
            std::thread::sleep(wait);
            let second = query(config, &socket)?;
            if second.uptime < first.uptime || second.node != first.node {
                return Err(StatsCommandError::Restarted);
            }
            let rates = Rates::between(&first, &second);
            let over = format!("over the last {:.1} s", rates.over.as_secs_f64());
            (second, rates, over)
        }
    };
    print!("{}", full_page(&report, &rates, &over));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds() {
        assert_eq!(parse_seconds("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_seconds("0.5"), Ok(Duration::from_millis(500)));
        for bad in ["0", "-1", "nan", "inf", "1e9", "two", ""] {
            assert!(parse_seconds(bad).is_err(), "{bad}");
        }
    }
}
