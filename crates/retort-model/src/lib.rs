//! The llama-family model of retort: configuration, weights from GGUF or Hugging Face
//! safetensors, tokenizer and chat template, the decoder itself (frozen teacher or trainable
//! student), checkpoints, depth pruning and generation.
//!
//! ```no_run
//! use retort_model::{checkpoint, generation, WeightFormat};
//! use retort_data::Message;
//! # fn main() -> retort_model::Result<()> {
//! let dev = candle_core::Device::Cpu;
//! let (model, tok) = checkpoint::load("assets/SmolLM2-135M-Instruct.Q4_1.gguf".as_ref(), WeightFormat::F32, &dev)?;
//! let prompt = tok.encode_prompt(&[Message::user("Why is the sky blue?")])?;
//! let out = generation::generate(&model, &tok, &[prompt], &Default::default(), |_, _| {})?;
//! println!("{}", out[0].text);
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]

pub mod batching;
pub mod chat_template;
pub mod checkpoint;
pub mod config;
pub mod device;
mod error;
pub mod generation;
pub mod gguf;
pub mod gguf_write;
pub mod kv_cache;
pub mod lora;
pub mod model;
pub mod rope;
pub mod tokenizer;
pub mod weights;

pub use checkpoint::{Checkpoint, SourceKind};
pub use config::{Arch, Config};
pub use error::{Error, Result};
pub use kv_cache::KvCache;
pub use model::Model;
pub use tokenizer::{EncodedChat, Tokenizer, TurnTokens};
pub use weights::{WeightFormat, Weights};
