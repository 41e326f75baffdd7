//! `retort review` and `retort export`: a person between the teacher and the student.
//!
//! The review page reads the ledger `retort synth` wrote, shows each item's input and teacher
//! answer, and records what the reviewer does — accept (as is or edited), reject with a reason,
//! skip, or write their own answer — in the same SQLite file, one committed row per decision.
//! `retort export` turns the decisions into the stage-1 set (accepted synthetic items), the
//! stage-2 set (human-written or edited answers) and preference pairs.
//!
//! The decisions themselves, the queue queries and the export live beside the ledger they
//! extend (`retort_teacher::synth::{review, export}`); this module is HTTP only:
//! - [`web`]: the pages (server-rendered, auto-escaped) and routes;
//! - [`guard`]: loopback binding, token, anti-forgery, security headers;
//! - [`diff`]: word diff of an edit against the teacher's original;

pub mod diff;
pub mod error;
pub mod guard;
pub mod web;

pub use error::{Error, Result};
pub use web::{ReviewOptions, router, serve};
