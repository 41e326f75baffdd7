//! The teacher side of retort: the [`Teacher`] trait with a local backend (a model in this
//! process, batched) and an OpenAI-compatible HTTP backend (concurrent, retried, probed); the
//! OpenAI wire types shared with `retort serve`; and the synthetic-data pipeline
//! ([`synth`]: seeds → few-shot expansion → filters → answers, in a SQLite ledger).

#![forbid(unsafe_code)]

mod error;
pub mod http;
pub mod local;
pub mod openai;
pub mod remote_label;
pub mod retry;
pub mod synth;
pub mod teacher;

pub use error::{Error, Result};
pub use http::{HttpConfig, HttpTeacher};
pub use local::LocalTeacher;
pub use teacher::{Failure, Finish, GenRequest, Generation, Outcome, Sampling, Teacher, TeacherId};
