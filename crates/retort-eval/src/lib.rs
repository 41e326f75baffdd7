//! Did distillation pay off? Metrics of a model on held-out data with reference answers, alone and
//! against a teacher, and the pre-flight probe that guesses the answer before any training.
//!
//! - [`tokens`]: per-token sums on the answer tokens — NLL of the reference, and against a
//!   teacher KL(p_T‖p_S), top-1 agreement, entropies (teacher-forced on the same tokens);
//! - [`text`]: exact match of generated answers (ROUGE-L is `retort_data::rouge`);
//! - [`eval`]: a dataset through both (`retort eval`), with a JSON and Markdown report;
//! - [`probe`]: `retort probe`'s verdict on whether KD is likely to beat SFT here;
//! - [`experiment`]: `retort experiment`, a resumable grid of train + eval runs, and
//!   [`report`], its `report.md` and plots.

#![forbid(unsafe_code)]

pub mod error;
pub mod eval;
pub mod experiment;
pub mod probe;
pub mod report;
pub mod text;
pub mod tokens;

pub use error::{Error, Result};
pub use eval::{EvalOptions, EvalReport, evaluate};
pub use probe::{Likelihood, Verdict, verdict};
pub use tokens::TokenSums;
