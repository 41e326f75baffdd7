//! The model crate's error type. Every variant names the file or field it is about and, where the
//! user can do something, carries a `hint:` saying what.

use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error(transparent)]
    Io(#[from] std::io::Error),

    /// A weights file that cannot be parsed (truncated download, wrong file, corrupt header).
    #[error(
        "cannot read `{path}` as {format}: {reason}\n\
         hint: the file is truncated or not a {format} file; download it again \
         (for the default teacher: `scripts/fetch-assets`)"
    )]
    CorruptWeights {
        path: PathBuf,
        format: &'static str,
        reason: String,
    },

    /// A model architecture we do not implement.
    #[error(
        "`{path}` holds a `{arch}` model, which retort does not support\n\
         hint: supported architectures are llama (Llama, SmolLM, Mistral-style) and qwen2"
    )]
    UnsupportedArchitecture { path: PathBuf, arch: String },

    /// A required configuration field is absent or of the wrong type.
    #[error("`{path}`: field `{field}` {problem}\nhint: {hint}")]
    Config {
        path: PathBuf,
        field: String,
        problem: String,
        hint: String,
    },

    /// A tensor is missing or its shape disagrees with the configuration.
    #[error(
        "`{path}`: tensor `{name}` {problem}\n\
         hint: the weights do not belong to this config.json; use the config that came with them"
    )]
    Weights {
        path: PathBuf,
        name: String,
        problem: String,
    },

    /// No tokenizer could be found next to the model.
    #[error("no tokenizer for `{path}`: {reason}\nhint: {hint}")]
    Tokenizer {
        path: PathBuf,
        reason: String,
        hint: String,
    },

    /// The chat template failed to parse or render.
    #[error("chat template: {reason}\nhint: {hint}")]
    Template { reason: String, hint: String },

    /// Anything the caller passed that cannot work, with a fix.
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
