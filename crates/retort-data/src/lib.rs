//! Records that flow through retort, independent of any tensor library.
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

mod conversation;

pub use conversation::{Conversation, Message, Role};
