//! `retort synth`: a person's few seed records → the teacher's few-shot expansion into many new
//! inputs (parsed, filtered for rules and novelty) → the teacher's answers under a system prompt
//! → a training set with provenance. State lives in a SQLite ledger, so runs resume exactly.
//!
//! The ledger (`OUT/ledger.sqlite`) has one owner, this module: [`ledger`] writes the teacher's
//! requests and items, [`review`] the reviewer's decisions beside them (`retort review` serves
//! it over HTTP), and [`mod@export`] turns both into the training sets.

pub mod config;
pub mod export;
pub mod filter;
pub mod ledger;
pub mod parse;
pub mod review;
pub mod run;
#[doc(hidden)]
pub mod testing;

pub use config::Pipeline;
pub use export::{ExportSummary, export, export_with};
pub use ledger::Ledger;
pub use review::{Action, Filter, NewDecision, Origin, Status, Store};
pub use run::{Funnel, SynthObserver, SynthReport, run};
