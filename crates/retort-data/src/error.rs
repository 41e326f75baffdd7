//! Errors of dataset reading. A bad record names its file, its line (JSONL) or index (JSON array,
//! Parquet row) and the field at fault, and says how to fix it.

use std::fmt;
use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, Error>;

/// Where a record sits in its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Location {
    /// 1-based line of a JSONL file.
    Line(usize),
    /// 0-based index of a record in a JSON array or a Parquet file.
    Index(usize),
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Line(n) => write!(f, "line {n}"),
            Location::Index(n) => write!(f, "record {n}"),
        }
    }
}

/// One invalid record.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RecordError {
    pub path: PathBuf,
    pub location: Location,
    /// The offending field as a path (`messages[2].content`), or empty for the whole record.
    pub field: String,
    pub problem: String,
    pub hint: String,
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.path.display(), self.location)?;
        if !self.field.is_empty() {
            write!(f, ": field `{}`", self.field)?;
        }
        write!(f, ": {}\nhint: {}", self.problem, self.hint)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read `{path}`: {source}\nhint: check the path and that the file is readable")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    /// A record that does not validate (the reader stops at the first unless told to skip).
    #[error(
        "{0}\n(to skip and count bad records instead of stopping: `skip_invalid = true` on the \
         recipe stage, or --skip-invalid with `retort label` and `retort data inspect`)"
    )]
    Record(Box<RecordError>),

    /// The whole file is unusable.
    #[error("`{path}`: {reason}\nhint: {hint}")]
    File {
        path: PathBuf,
        reason: String,
        hint: String,
    },
}
