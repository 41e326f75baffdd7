//! `retort serve`: an OpenAI-compatible server over any local model, so one teacher in memory
//! can serve other tools — and the real server retort's own HTTP backend is tested against.
//!
//! - `GET /v1/models`
//! - `POST /v1/chat/completions`: `n`, `temperature`, `top_p`, `seed`, `max_tokens`, `stop`,
//!   `logprobs` + `top_logprobs`, `stream` (SSE), and vLLM's `continue_final_message`
//!   (a final assistant message is continued, not answered);
//! - `POST /v1/completions` with vLLM's `prompt_logprobs` extension (token-id prompts), scored
//!   by the f32 model: what `retort label --teacher http://…` reads.
//!
//! Every request's choices join one continuous batch on the model thread (`worker.rs`,
//! `retort_model::batching`): a request joins at the next step, each row with its own
//! parameters, and leaves the batch as soon as it is done. Bound to 127.0.0.1 unless told
//! otherwise.
//!
//! [`review`]: `retort review` (the expert-review web page) and `retort export`.

#![forbid(unsafe_code)]

mod api;
mod http;
pub mod review;
mod worker;

pub use api::{ServeOptions, serve};
