//! The eval crate's error type, each variant with a `hint:` where there is one.

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error(transparent)]
    Model(#[from] retort_model::Error),

    #[error(transparent)]
    Distill(#[from] retort_distill::Error),

    #[error(transparent)]
    Io(#[from] std::io::Error),

    #[error(transparent)]
    Teacher(#[from] retort_teacher::Error),

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
