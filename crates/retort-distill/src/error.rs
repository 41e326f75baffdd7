//! The distillation crate's error type: configuration, data and training failures, each with a
//! `hint:` saying what to do.

use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error(transparent)]
    Model(#[from] retort_model::Error),

    #[error(transparent)]
    Data(#[from] retort_data::Error),

    #[error(transparent)]
    Io(#[from] std::io::Error),

    /// A recipe that does not parse or validate.
    #[error("recipe `{path}`: {reason}\nhint: {hint}")]
    Recipe {
        path: PathBuf,
        reason: String,
        hint: String,
    },

    /// Training produced a non-finite loss or gradient.
    #[error(
        "step {step}: {what} is not finite ({value})\n\
         hint: the last good checkpoint is intact in `{checkpoint}`; lower the learning rate \
         or enable gradient clipping, then resume with `retort train … --resume`"
    )]
    NonFinite {
        step: usize,
        what: &'static str,
        value: f64,
        checkpoint: String,
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
