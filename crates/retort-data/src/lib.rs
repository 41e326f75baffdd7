//! Records that flow through retort, independent of any tensor library, and the readers that
//! turn users' dataset files into them.
//!
//! A [`Conversation`] is a list of [`Message`]s with a [`Role`] each; it is what a chat template
//! renders and what the trainer learns from (the assistant turns carry the loss).
//!
//! ```
//! use retort_data::{Conversation, Message};
//! let conv = Conversation::new(vec![
//!     Message::system("You are an expert for stock markets."),
//!     Message::user("Is Dogcoin a good investment option?"),
//!     Message::assistant("It depends on your horizon and risk tolerance."),
//! ]);
//! assert_eq!(conv.assistant_turns(), 1);
//! ```
//!
//! Datasets (JSONL, JSON arrays, Parquet; OpenAI `messages`, Alpaca, ShareGPT) are read and
//! validated by [`dataset::read`].

#![forbid(unsafe_code)]

pub mod by_name;
mod conversation;
pub mod dataset;
mod error;
pub mod files;
pub mod formats;
mod parquet;
pub mod rouge;

pub use conversation::{Conversation, Message, Role};
pub use dataset::{Dataset, ReadOptions, Record};
pub use error::{Error, Location, RecordError, Result};
pub use formats::Format;
