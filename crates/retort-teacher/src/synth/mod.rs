//! `retort synth`: a person's few seed records → the teacher's few-shot expansion into many new
//! inputs (parsed, filtered for rules and novelty) → the teacher's answers under a system prompt
//! → a training set with provenance. State lives in a SQLite ledger, so runs resume exactly.

pub mod config;
pub mod filter;
pub mod ledger;
pub mod parse;
pub mod run;

pub use config::Pipeline;
pub use ledger::Ledger;
pub use run::{Funnel, SynthObserver, SynthReport, run};
