//! The one error type of config loading and validation.

use std::path::PathBuf;

/// Why a config file (node file or cluster description) cannot be used.
///
/// Every message starts with the file it is about, so a user running several nodes knows
/// which file to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read (missing, no permission, not UTF-8, ...).
    #[error("{}: cannot read config file: {source}", path.display())]
    Read {
        /// The config file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML, or its TOML does not fit the schema (unknown field, wrong
    /// type, missing required field).
    #[error("{}: line {line}, column {column}: {message} (in `{source_line}`{})", path.display(), table_text(table))]
    Toml {
        /// The config file.
        path: PathBuf,
        /// 1-based line of the problem, as `toml` located it.
        line: usize,
        /// 1-based column of the problem, as `toml` located it.
        column: usize,
        /// What `toml`/serde reported (names the field for unknown or missing fields).
        message: String,
        /// The offending line of the file, trimmed, so that the key is visible.
        source_line: String,
        /// The header of the table the line is in (`[guest]`, `[[nodes]]`), if any.
        table: Option<String>,
    },
    /// The file parsed, but a field's value is wrong.
    #[error("{}: field `{field}`: {problem}", path.display())]
    Invalid {
        /// The config file.
        path: PathBuf,
        /// Dotted path of the field, e.g. `guest.home[1]` or `nodes[0].vcpus[2]`.
        field: String,
        /// What is wrong with it, and with what.
        problem: String,
    },
    /// The cluster secret named by the config file could not be read when it was needed.
    #[error("{}: field `secret`: cannot read secret file {}: {source}", path.display(), secret.display())]
    SecretRead {
        /// The config file.
        path: PathBuf,
        /// The secret file it names (resolved).
        secret: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
}

impl ConfigError {
    /// Shorthand for [`ConfigError::Invalid`].
    pub(crate) fn invalid(
        path: &std::path::Path,
        field: impl Into<String>,
        problem: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            path: path.to_path_buf(),
            field: field.into(),
            problem: problem.into(),
        }
    }

    /// Converts a `toml` error into [`ConfigError::Toml`] with line, column and the line text.
    pub(crate) fn from_toml(path: &std::path::Path, text: &str, err: &toml::de::Error) -> Self {
        let offset = err.span().map_or(0, |span| span.start.min(text.len()));
        let before = &text[..floor_char_boundary(text, offset)];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before[line_start..].chars().count() + 1;
        let source_line = text[line_start..]
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_string();
        // The nearest header above names the table, so `unknown field `id`` in `[[nodes]]`
        // and in `[[guest.home]]` can be told apart.
        let table = text[..line_start]
            .lines()
            .rev()
            .map(str::trim)
            .find(|line| line.starts_with('['))
            .filter(|header| *header != source_line)
            .map(str::to_string);
        ConfigError::Toml {
            path: path.to_path_buf(),
            line,
            column,
            // One line: a user reads it in a terminal, and tools read errors line by line.
            message: err
                .message()
                .trim()
                .lines()
                .map(str::trim)
                .collect::<Vec<_>>()
                .join("; "),
            source_line,
            table,
        }
    }
}

fn table_text(table: &Option<String>) -> String {
    match table {
        Some(header) => format!(" under {header}"),
        None => String::new(),
    }
}

/// Largest index `<= offset` that is a char boundary of `text` (toml spans are byte offsets).
fn floor_char_boundary(text: &str, mut offset: usize) -> usize {
    while offset > 0 && !text.is_char_boundary(offset) {
        offset -= 1;
    }
    offset
}
