//! Knowledge distillation for retort: token-level losses, the chunked objective that applies the
//! LM head only where a loss is taken, and the trainer.

// The one unsafe site outside retort-kernels: the logit cache maps its shard files
// (`cache/reader.rs`, memmap2); everything else is safe code.
#![deny(unsafe_code)]

mod error;
pub mod loss;

pub use error::{Error, Result};
pub use loss::Divergence;
pub mod adamw;
pub mod batch;
pub mod cache;
pub mod fused;
pub mod grads;
pub mod objective;
pub mod onpolicy;
pub mod recipe;
pub mod schedule;
pub mod setup;
pub mod sparse;
pub mod targets;
pub mod trainer;
pub mod xtok;
