//! The teacher crate's error type, each variant with a `hint:` saying what to do.

use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Model(#[from] retort_model::Error),

    #[error(transparent)]
    Distill(#[from] retort_distill::Error),

    #[error(transparent)]
    Io(#[from] std::io::Error),

    #[error(
        "SQLite ledger: {0}\nhint: the ledger is a plain SQLite file; check it with `sqlite3 FILE .tables`, or start over with a new --out directory"
    )]
    Sqlite(#[from] rusqlite::Error),

    /// A pipeline file that does not parse or validate.
    #[error("pipeline `{path}`: {reason}\nhint: {hint}")]
    Pipeline {
        path: PathBuf,
        reason: String,
        hint: String,
    },

    /// The server could not be used (after retries where retrying made sense).
    #[error("teacher server {url}: {reason}\nhint: {hint}")]
    Server {
        url: String,
        reason: String,
        hint: String,
    },

    /// Anything else the caller passed that cannot work, with a fix.
    #[error("{reason}\nhint: {hint}")]
    Invalid { reason: String, hint: String },
}

impl Error {
    pub(crate) fn invalid(reason: impl Into<String>, hint: impl Into<String>) -> Self {
        Error::Invalid {
            reason: reason.into(),
            hint: hint.into(),
        }
    }
}
