//! The teacher logit cache: label a dataset once with the teacher's top-k log-probs and the
//! tail mass per loss token, then distil from it many times without running the teacher.
//!
//! A cache is a directory: `manifest.json` (see [`manifest`]) and `shard-NNNNN.bin` files (see
//! [`shard`]), each a run of per-sample blocks (see [`codec`]) with an index, memory-mapped by
//! the [`reader`]. The format is specified for other tools in `docs/logit-cache.md`.

pub mod codec;
pub mod label;
pub mod manifest;
pub mod reader;
pub mod recode;
pub mod shard;
pub mod topk;

pub use codec::{Codec, TopK};
pub use manifest::Manifest;
pub use reader::Reader;
pub use shard::sample_key;
