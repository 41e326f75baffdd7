//! The review's error type, each variant with a `hint:` saying what to do.

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Io(#[from] std::io::Error),

    /// The ledger's review tables (`retort_teacher::synth::review`).
    #[error(transparent)]
    Ledger(#[from] retort_teacher::Error),

    #[error("page template: {0}")]
    Template(#[from] minijinja::Error),

    /// Anything passed in that cannot work, with a fix.
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
